"""
Behaviour metrics: what the model says on the held-out prompts, judged per objective.

  sft  exact_match (the generated answer equals the reference) and rouge_l (F1 of the longest
       common subsequence of lower-cased words) against the reference answers
  dpo  win_rate: the policy's greedy answer against the reference policy's, judged by a reward
       model (any transformers sequence-classification checkpoint with one output) or, without
       one, by the DPO implicit reward beta * (log pi(y|x) - log pi_ref(y|x)); a tie counts 1/2.
       pref_accuracy: the same judge prefers chosen to rejected on the held-out pairs
  simpo, orpo  pref_accuracy: the share of held-out pairs whose chosen answer has the higher mean
       token log-prob (or the reward model's score); no win rate: there is no reference policy
  kto  reward_sign_accuracy (_desirable, _undesirable): the share of held-out rows whose implicit
       reward log pi(y|x) - log pi_ref(y|x) has the sign of the row's label
  kd   teacher_exact (the student's greedy answer equals the teacher's), teacher_token_agreement
       (positions where both emit the same token, over the longer answer), seq_kl: the sum over
       the student's own greedy answer of KL(student || teacher) at each position, per answer
       (seq_kl_per_token: per token)

Prompts are the tokenized eval examples of data.py (the prompt exactly as trained); answers are
greedy, up to eos or max_new_tokens. A reward model reads text: the prompt and the answer are
decoded and re-encoded with the reward model's own tokenizer, so it may differ from the policy's
(only the text is shared); a reward model with more than one output is an error.
train.py runs this with eval_gen_interval; generate.py writes the same answers for other uses.
"""
import contextlib
import json
import os
import re

import torch
import torch.nn.functional as F

from decoding import generate
from model import softcap as cap

# -----------------------------------------------------------------------------
# text metrics

def _words(text):
    return re.findall(r"\w+", text.lower())

def rouge_l(pred, ref):
    """F1 of the longest common subsequence of lower-cased words (ROUGE-L, beta = 1)."""
    a, b = _words(pred), _words(ref)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)  # LCS table, one row at a time
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)

def exact_match(pred, ref):
    return float(pred.strip() == ref.strip())

def win_rate(a, b):
    """share of i with a[i] > b[i], ties counting 1/2."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a > b).double() + 0.5 * (a == b).double()).mean().item()

def token_agreement(a, b):
    """positions where two token lists agree, over the longer one's length (1 for two empty)."""
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n if n else 1.0

# -----------------------------------------------------------------------------
# models

def split_example(ids, labels):
    """(prompt ids, response ids, its eos included) of a tokenized example (data.py's labels:
    labels[t] = ids[t + 1] on the response, -100 before)."""
    p = next(t for t, y in enumerate(labels) if y != -100) + 1
    return [int(t) for t in ids[:p]], [int(t) for t in ids[p:]]  # python ints, from a list or a numpy view

def greedy(model, prompts, max_new_tokens, eos, pad, batch_size=32):
    """greedy answers (token lists, cut before eos) of a list of prompt token lists."""
    dev = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together
    out = [None] * len(prompts)
    for j in range(0, len(order), batch_size):
        idx = order[j:j + batch_size]
        T = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, T - len(prompts[i]):], mask[r, T - len(prompts[i]):] = torch.tensor(prompts[i]), 1
        y = generate(
            model, ids.to(dev), max_new_tokens, eos_token_id=eos, attention_mask=mask.to(dev), pad_token_id=pad
        )
        for r, i in enumerate(idx):
            new = y[r, T:].tolist()
            out[i] = new[:new.index(eos)] if eos in new else new
    return out

def _batch(prompts, answers, pad, device):
    """right-padded rows prompt + answer: ids, segment mask, labels (-100 but on answer tokens)."""
    T = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    labels = torch.full((len(prompts), T), -100, dtype=torch.long)
    for r, (p, a) in enumerate(zip(prompts, answers)):
        ids[r, :len(p) + len(a)] = torch.tensor(p + a)
        mask[r, :len(p) + len(a)] = 1
        labels[r, len(p) - 1:len(p) + len(a) - 1] = torch.tensor(a, dtype=torch.long)  # next-token targets
    return ids.to(device), mask.to(device), labels.to(device)

@torch.no_grad()
def answer_logps(model, prompts, answers, pad, batch_size=16):
    """[N] float64: log p(answer | prompt), the answer's token log-probs summed."""
    dev = next(model.parameters()).device
    out = []
    for j in range(0, len(prompts), batch_size):
        ids, mask, labels = _batch(prompts[j:j + batch_size], answers[j:j + batch_size], pad, dev)

        def head(h, w, softcap=0.0):  # inside the forward: (B,) summed log-probs of the targets, one row at a time
            rows = []
            for b in range(h.shape[0]):
                keep = labels[b] != -100
                lp = F.log_softmax(cap((h[b, keep] @ w.t()).double(), softcap), dim=-1)
                rows.append(lp.gather(-1, labels[b, keep, None]).sum())
            return torch.stack(rows) if rows else h.new_zeros(0, dtype=torch.float64)
        out.append(model(ids, attention_mask=mask, head_fn=head))
    return torch.cat(out).cpu()

@torch.no_grad()
def sequence_kl(student, teacher, prompts, answers, pad, batch_size=4):
    """[N] float64: sum over answer positions of KL(student || teacher), full vocabulary."""
    dev = next(student.parameters()).device
    out = []
    for j in range(0, len(prompts), batch_size):
        ids, mask, labels = _batch(prompts[j:j + batch_size], answers[j:j + batch_size], pad, dev)
        keep = labels != -100
        # log-probs at the positions that predict an answer token: (n, V) each, n over the batch
        head = lambda h, w, softcap=0.0: F.log_softmax(cap((h[keep] @ w.t()).double(), softcap), dim=-1)
        s = student(ids, attention_mask=mask, head_fn=head)
        with as_model(student, teacher) as m:
            t = m(ids, attention_mask=mask, head_fn=head)
        kl = (s.exp() * (s - t)).sum(-1)  # (n,)
        row = keep.nonzero()[:, 0]
        out.append(torch.zeros(ids.shape[0], dtype=torch.float64, device=dev).index_add_(0, row, kl))
    return torch.cat(out).cpu()

@contextlib.contextmanager
def as_model(policy, ref):
    """the reference / teacher as a model: ref itself, or for ref == 'self' (train.py's LoRA runs)
    the policy with its adapters off."""
    if ref == "self":
        from lora import disabled
        with disabled(policy):
            yield policy
    else:
        yield ref

def check_reward_model(name, key="reward_model"):
    """a ConfigError naming key unless name's config (read alone, no weights) is a checkpoint with
    one output: train.py checks this before training, the weights load at the first eval_gen."""
    from transformers import AutoConfig

    from errors import ConfigError
    try:
        cfg = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"config key {key}: cannot read the config of {name!r} ({type(e).__name__}: {first})"
        ) from None
    if cfg.num_labels != 1:
        raise ConfigError(
            f"config key {key}: {name!r} has {cfg.num_labels} outputs; a reward model gives one score (num_labels=1)"
        )

def load_reward_model(name, device="cpu", dtype=torch.float32):
    """(model, tokenizer) of a transformers sequence-classification checkpoint with one output."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    rm = AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype).to(device).eval()
    if rm.config.num_labels != 1:
        raise ValueError(
            f"reward_model {name!r} has {rm.config.num_labels} outputs; a reward model gives one score (num_labels=1)"
        )
    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rm.config.pad_token_id = tok.pad_token_id
    return rm, tok

@torch.no_grad()
def reward_scores(rm, rm_tok, texts, batch_size=16):
    """[N] float64: the reward model's score of each text, re-tokenized with its own tokenizer."""
    dev = next(rm.parameters()).device
    out = []
    for j in range(0, len(texts), batch_size):
        enc = rm_tok(texts[j:j + batch_size], return_tensors="pt", padding=True).to(dev)
        out.append(rm(**enc).logits[:, 0].double())
    return torch.cat(out).cpu()

# -----------------------------------------------------------------------------
# per objective

def sft_metrics(preds, refs):
    n = max(len(preds), 1)
    return {"exact_match": sum(map(exact_match, preds, refs)) / n, "rouge_l": sum(map(rouge_l, preds, refs)) / n}

def kd_metrics(student, teacher, prompts, student_answers, teacher_answers, pad):
    kl = sequence_kl(student, teacher, prompts, student_answers, pad)
    n_tok = sum(len(a) for a in student_answers)
    return {"teacher_exact": sum(a == b for a, b in zip(student_answers, teacher_answers)) / max(len(prompts), 1),
            "teacher_token_agreement":
                sum(map(token_agreement, student_answers, teacher_answers)) / max(len(prompts), 1),
            "seq_kl": kl.mean().item() if len(kl) else 0.0, "seq_kl_per_token": kl.sum().item() / max(n_tok, 1)}

def judge(policy, ref, tokenizer, prompts, answers, beta, rm=None):
    """[N] scores of answers: the reward model's when given, else the DPO implicit reward."""
    if rm is not None:
        texts = [tokenizer.decode(p, skip_special_tokens=True) + tokenizer.decode(a, skip_special_tokens=True)
                 for p, a in zip(prompts, answers)]
        return reward_scores(*rm, texts)
    pad = tokenizer.pad_token_id
    lp = answer_logps(policy, prompts, answers, pad)
    with as_model(policy, ref) as m:
        return beta * (lp - answer_logps(m, prompts, answers, pad))

def _sequences(tokenizer, examples):
    """(prompts, reference answers without eos) of sft / kd examples."""
    eos = tokenizer.eos_token_id
    split = [split_example(e["input_ids"], e["labels"]) for e in examples]
    return [p for p, _ in split], [r[:-1] if r[-1:] == [eos] else r for _, r in split]

def _answers(policy, tokenizer, prompts, max_new_tokens, batch_size):
    answers = greedy(policy, prompts, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, batch_size)
    dec = lambda t: tokenizer.decode(t, skip_special_tokens=True)
    return answers, [{"prompt": dec(p), "output": dec(a)} for p, a in zip(prompts, answers)]

def _ref_answers(policy, ref, tokenizer, prompts, gens, max_new_tokens, batch_size):
    with as_model(policy, ref) as m:
        ref_answers = greedy(m, prompts, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, batch_size)
    for g, a in zip(gens, ref_answers):
        g["ref_output"] = tokenizer.decode(a, skip_special_tokens=True)
    return ref_answers

def evaluate_sft(policy, ref, tokenizer, examples, max_new_tokens=64, keys=None, rm=None, batch_size=32):
    prompts, refs = _sequences(tokenizer, examples)
    _, gens = _answers(policy, tokenizer, prompts, max_new_tokens, batch_size)
    for g, r in zip(gens, refs):
        g["reference"] = tokenizer.decode(r, skip_special_tokens=True)
    return sft_metrics([g["output"] for g in gens], [g["reference"] for g in gens]), gens

def evaluate_kd(policy, ref, tokenizer, examples, max_new_tokens=64, keys=None, rm=None, batch_size=32):
    prompts, _ = _sequences(tokenizer, examples)
    answers, gens = _answers(policy, tokenizer, prompts, max_new_tokens, batch_size)
    ref_answers = _ref_answers(policy, ref, tokenizer, prompts, gens, max_new_tokens, batch_size)
    return kd_metrics(policy, ref, prompts, answers, ref_answers, tokenizer.pad_token_id), gens

def evaluate_dpo(policy, ref, tokenizer, examples, max_new_tokens=64, keys=None, rm=None, batch_size=32):
    eos, beta = tokenizer.eos_token_id, getattr(keys, "dpo_beta", 0.1)
    pairs = [(split_example(e["chosen_ids"], e["chosen_labels"]),
              split_example(e["rejected_ids"], e["rejected_labels"])) for e in examples]
    prompts = [c[0] for c, _ in pairs]
    chosen = [c[1][:-1] if c[1][-1:] == [eos] else c[1] for c, _ in pairs]
    rejected = [r[1][:-1] if r[1][-1:] == [eos] else r[1] for _, r in pairs]
    answers, gens = _answers(policy, tokenizer, prompts, max_new_tokens, batch_size)
    ref_answers = _ref_answers(policy, ref, tokenizer, prompts, gens, max_new_tokens, batch_size)
    # answers end with eos where the model ended them, as the preference data's do
    close = lambda a: a + [eos] if len(a) < max_new_tokens else a
    ours = judge(policy, ref, tokenizer, prompts, [close(a) for a in answers], beta, rm)
    theirs = judge(policy, ref, tokenizer, prompts, [close(a) for a in ref_answers], beta, rm)
    pc = judge(policy, ref, tokenizer, prompts, [c + [eos] for c in chosen], beta, rm)
    pr = judge(policy, ref, tokenizer, prompts, [r + [eos] for r in rejected], beta, rm)
    return {"win_rate": win_rate(ours, theirs), "pref_accuracy": win_rate(pc, pr),
            "judge": "reward_model" if rm is not None else "implicit"}, gens

def evaluate_pairs(policy, ref, tokenizer, examples, max_new_tokens=64, keys=None, rm=None, batch_size=32):
    """reference-free preference kinds (simpo, orpo): pref_accuracy, the share of held-out pairs whose
    chosen answer has the higher mean token log-prob (the ranking both losses train), or the reward
    model's preference when one is given; the greedy answers are written for reading."""
    pairs = [(split_example(e["chosen_ids"], e["chosen_labels"]),
              split_example(e["rejected_ids"], e["rejected_labels"])) for e in examples]
    prompts = [c[0] for c, _ in pairs]
    _, gens = _answers(policy, tokenizer, prompts, max_new_tokens, batch_size)
    if rm is not None:
        score = lambda ans: judge(policy, None, tokenizer, prompts, ans, 1.0, rm)
    else:
        pad = tokenizer.pad_token_id
        score = lambda ans: answer_logps(policy, prompts, ans, pad) / torch.tensor([max(len(a), 1) for a in ans])
    pc, pr = score([c[1] for c, _ in pairs]), score([r[1] for _, r in pairs])
    return {"pref_accuracy": win_rate(pc, pr), "judge": "reward_model" if rm is not None else "mean_logp"}, gens

def evaluate_kto(policy, ref, tokenizer, examples, max_new_tokens=64, keys=None, rm=None, batch_size=32):
    """kto: accuracy of the sign of the implicit reward r = log pi(y|x) - log pi_ref(y|x) on the
    held-out rows, by label (desirable: r > 0; undesirable: r < 0)."""
    split = [split_example(e["chosen_ids"], e["chosen_labels"]) for e in examples]
    prompts, answers = [p for p, _ in split], [a for _, a in split]
    _, gens = _answers(policy, tokenizer, prompts, max_new_tokens, batch_size)
    pad = tokenizer.pad_token_id
    r = answer_logps(policy, prompts, answers, pad)
    with as_model(policy, ref) as m:
        r = r - answer_logps(m, prompts, answers, pad)
    good = [bool(e["desirable"][0]) for e in examples]
    acc = lambda want: [float((x > 0) == want) for x, g in zip(r.tolist(), good) if g == want]
    mean = lambda v: sum(v) / len(v) if v else float("nan")
    return {"reward_sign_accuracy_desirable": mean(acc(True)), "reward_sign_accuracy_undesirable": mean(acc(False)),
            "reward_sign_accuracy": mean(acc(True) + acc(False))}, gens

# -----------------------------------------------------------------------------
# train.py's eval_gen

_reward_models = {}

def run(objectives, model, tokenizer, it, out_dir, samples=64, max_new_tokens=64, reward_model="", master=True,
        autocast=contextlib.nullcontext()):
    """Every objective's metrics on its first `samples` eval examples (0 = all). objectives:
    train.py's namespaces (kind, i, eval, ref, beta). Every rank computes the same (under FSDP the
    forward is collective); the master appends {"iter", "objectives": {i: metrics}} to
    out_dir/eval_gen.json and writes the answers to out_dir/eval_gen/iter_N_i.jsonl. Returns
    {gen_<metric>_<i>: value} for the metrics line and the summary."""
    if reward_model and reward_model not in _reward_models:
        _reward_models[reward_model] = load_reward_model(reward_model, next(model.parameters()).device)
    rm = _reward_models.get(reward_model)
    was_training = model.training
    model.eval()
    flat, per = {}, {}
    try:
        for o in objectives:
            ex = o.eval[:samples or None]
            if not ex:
                continue
            if o.kind.evaluate is None:
                per[o.i] = {"skipped": f"objective kind {o.kind.name} has no behaviour metrics"}
                continue
            if o.kind.reference != "none" and o.kind.uses_reference(o.cfg) and not o.has_reference():
                per[o.i] = {"skipped": "no reference model in memory (precompute_ref)"}
                continue
            ref = "self" if o.ref_is_policy else o.ref
            with autocast:
                m, gens = o.kind.evaluate(model, ref, tokenizer, ex, max_new_tokens, o.cfg, rm)
            per[o.i] = m
            flat.update({f"gen_{k}_{o.i}": v for k, v in m.items() if isinstance(v, float)})
            if master:
                os.makedirs(os.path.join(out_dir, "eval_gen"), exist_ok=True)
                with open(os.path.join(out_dir, "eval_gen", f"iter_{it:07d}_{o.i}.jsonl"), "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(g, ensure_ascii=False) + "\n" for g in gens)
    finally:
        model.train(was_training)
    if master:
        path = os.path.join(out_dir, "eval_gen.json")
        history = json.load(open(path)) if os.path.exists(path) else []
        history = [h for h in history if h["iter"] < it] + [{"iter": it, "objectives": per}]  # a resumed run rewrites
        with open(path + ".tmp", "w") as f:
            json.dump(history, f, indent=2)
        os.replace(path + ".tmp", path)
    return flat
