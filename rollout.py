"""
Online objectives (docs/algorithms.md §1.7): the rows of a step are made from its prompts by the
policy itself. grpo samples num_generations completions of each prompt, scores them (rewards.py)
and turns the rewards into advantages within each prompt's group; kd with kd_on_policy=True
samples one completion of each prompt, which the teacher then scores token by token (kd's loss).

Sampling is counter-based: the draw for token t of completion g of prompt `id` in the n-th rollout
of objective i is a hash of (seed, i, n, id, g, t). A completion therefore depends on its prompt
and its key alone, not on the batch, the rank or the process count that generated it (2 ranks
sample what 1 does), and resuming needs no random state: the rollout counter n is the state.
"""
import hashlib
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import data as D
import losses as L
from errors import ConfigError
from decoding import completion, generate

# -----------------------------------------------------------------------------
# prompts

def tokenize_prompts(rows, tokenizer, max_len, prompt_key="prompt", input_key="input", template="User: {}\nAssistant: ",
                     apply_chat_template=False, max_new_tokens=64, source="", verbose=False):
    """prompt examples {"id", "prompt_ids", "prompt", "columns"} of rows holding a prompt (prompt_key,
    else input_key) or chat messages (their last assistant turn, if any, left out); columns are the
    rows' other fields, passed to the reward functions: every field any row has, None where a row
    lacks it (as a datasets column holds it, and TRL passes it). An empty or blank prompt is an error
    naming the row. A prompt longer than max_len - max_new_tokens tokens is dropped (counted), so
    every completion fits in max_len."""
    out, dropped, fields = [], 0, {}
    room = max_len - max_new_tokens
    for i, row in enumerate(rows):
        where = D._where(source, row, i)
        if "messages" in row and prompt_key not in row and input_key not in row:
            msgs = row["messages"]
            msgs = msgs[:-1] if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant" else msgs
            if not msgs or not tokenizer.chat_template:
                raise ConfigError(f"{where}: 'messages' need a user turn and a tokenizer with a chat template")
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            if prompt_key not in row and input_key not in row:
                raise ConfigError(f"{where}: missing key {prompt_key!r} (the prompt; or {input_key!r}, or 'messages'; "
                                  f"keys present: {D._keys(row)})")
            key = prompt_key if prompt_key in row else input_key
            prompt = D._field(row, key, where)
            if not prompt.strip():
                raise ConfigError(f"{where}: field {key!r} is {'empty' if not prompt else 'blank'}: "
                                  f"there is no prompt to answer")
            text = D._prompt(tokenizer, prompt, template, apply_chat_template)
        ids = D._encode(tokenizer, [text], [])[0][0]
        if len(ids) > room:
            dropped += 1
            continue
        columns = {k: v for k, v in row.items() if k not in (prompt_key, input_key, "messages", "_id")}
        fields.update(dict.fromkeys(columns))
        out.append({"id": row.get("_id", i), "prompt_ids": ids, "prompt": text, "columns": columns})
    for e in out:  # every row gets every column
        e["columns"] = {k: e["columns"].get(k) for k in fields}
    if rows and not out:
        raise ConfigError(f"{source}: no prompt fits max_len - max_new_tokens = {room} tokens")
    if verbose and len(rows):
        print(f"{source or 'data'}: {len(out)} prompts from {len(rows)} rows, {dropped} dropped (longer than "
              f"max_len - max_new_tokens = {room} tokens)")
    return out

def collate_prompts(examples, pad_id=0, c=None, packing=False):
    """a micro-batch of prompts: lists, tensors come with the rollout."""
    return {"ids": [e["id"] for e in examples], "prompt_ids": [list(map(int, e["prompt_ids"])) for e in examples],
            "prompts": [e["prompt"] for e in examples], "columns": [dict(e["columns"]) for e in examples]}

# -----------------------------------------------------------------------------
# counter-based draws

_M = 0xFFFFFFFF

def _mix(x):
    # a 32-bit integer hash (int64 tensors holding values < 2^32: no product overflows)
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M
    return (x >> 16) ^ x

def row_keys(seed, i, n, ids, g):
    """one 32-bit key per row: (seed, objective, rollout, prompt id, completion index)."""
    h = lambda pid, gg: int.from_bytes(
        hashlib.blake2b(repr((seed, i, n, pid, gg)).encode(), digest_size=4).digest(), "big"
    )
    return torch.tensor([h(pid, gg) for pid, gg in zip(ids, g)], dtype=torch.int64)

def uniforms(keys):
    """step t -> (rows,) draws in [0, 1) (24 bits) from the rows' keys."""
    def draw(t):
        x = _mix(keys ^ (((t + 1) * 0x9E3779B1) & _M))
        return (_mix(x) >> 8).double() / 2 ** 24
    return draw

# -----------------------------------------------------------------------------
# the state an online objective carries between steps

@dataclass
class Online:
    tokenizer: Any
    seed: int
    rewards: Any = None           # rewards.Rewards (grpo)
    rollouts: int = 0             # rollouts made: the sampling counter
    buffer: Any = None            # grpo_inner_steps > 1: the rollout's micro-batches, reused
    uses: int = 0                 # steps taken on the buffer
    times: dict = field(default_factory=dict)

    def next_step(self, o):
        """the micro-batches of o's next step: the buffered rollout while grpo_inner_steps allow, else
        fresh prompts from the loader (rolled out in the step: Step.train calls the kind's prepare)."""
        inner = getattr(o.cfg, "grpo_inner_steps", 1)
        if self.buffer is not None and self.uses < inner:
            self.uses += 1
            return self.buffer
        self.buffer, self.uses = o.loader.next_step(), 1
        return self.buffer

    def state_dict(self):
        buf = None if self.buffer is None or "advantages" not in self.buffer[0] else [
            {k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in self.buffer]
        return {"rollouts": self.rollouts, "uses": self.uses if buf is not None else 0, "buffer": buf}

    def load_state_dict(self, d):
        self.rollouts, self.uses, self.buffer = int(d["rollouts"]), int(d["uses"]), d["buffer"]

# -----------------------------------------------------------------------------
# sampling

def _all_done(step):
    if step.world_size == 1:
        return None
    return lambda local: step.all_sum(0.0 if local else 1.0).item() == 0

def sample(step, o, prompt_ids, keys, temperature, max_new_tokens):
    """completions (lists of token ids, each ending at its eos inclusive or cut at max_new_tokens) of
    the prompts, one per row, drawn with the rows' keys (temperature 0: greedy). Every rank takes
    the same number of decoding steps."""
    tok, model = o.online.tokenizer, step.raw_model
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    T = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompt_ids):
        ids[r, T - len(p):], mask[r, T - len(p):] = torch.tensor(p), 1
    was_training = model.training
    model.eval()
    try:
        with step.autocast:
            y = generate(model, ids.to(step.device), max_new_tokens, temperature=temperature, top_k=o.cfg.top_k,
                         top_p=o.cfg.top_p, eos_token_id=eos, attention_mask=mask.to(step.device), pad_token_id=pad,
                         uniforms=uniforms(keys.to(step.device)), all_done=_all_done(step))
    finally:
        model.train(was_training)
    out = []
    for row in y[:, T:].tolist():
        out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out

def _training_rows(prompt_ids, completions, ids, pad_id, no_loss=()):
    """right-padded rows prompt + completion, labels on the completion (data.py's shifted layout); the
    rows numbered in no_loss get no labels (mask_truncated)."""
    rows = []
    for r, (p, c) in enumerate(zip(prompt_ids, completions)):
        seq = p + c
        labels = [seq[t + 1] if t + 1 >= len(p) and r not in no_loss else L.IGNORE_INDEX for t in range(len(seq) - 1)]
        rows.append(D._row([{"input_ids": seq, "labels": labels + [L.IGNORE_INDEX]}]))
    return D._batch(rows, pad_id, ids)

@torch.no_grad()
def token_logps(step, x, reference=None):
    """(rows, T) token log-probs of the labels of rows x (on the device): of the policy, or of o's
    reference when reference is an objective (no grad)."""
    if reference is not None:
        h, w, cap = step.reference_hidden(reference, x)
        return L.token_logps(h, w, x["labels"], step.chunk_size, softcap=cap)
    with step.autocast:
        return step.model(x["input_ids"], x["attention_mask"], x["position_ids"],
                          head_fn=lambda h, w, softcap=0.0: L.token_logps(h, w, x["labels"], step.chunk_size,
                                                                          softcap=softcap))

def advantages(r, mode="grpo", eps=1e-4, scale="group", batch_std=None):
    """(P, G) rewards -> (P, G) advantages within each prompt's group. grpo: (r - mean) / (std + eps),
    the std the group's (scale "group"), the global batch's (scale "batch": batch_std, which the caller
    takes over all ranks; None = r's own) or none ("none": r - mean, Dr. GRPO); stds unbiased (torch's,
    as TRL's). rloo: r minus the mean of the other G - 1 rewards (no std)."""
    G = r.shape[1]
    centred = r - r.mean(1, keepdim=True)
    if mode == "rloo":
        return centred * G / (G - 1)
    if scale == "none":
        return centred
    std = r.std(1, keepdim=True) if scale == "group" else r.std() if batch_std is None else batch_std
    return centred / (std + eps)

def _batch_std(step, r):
    """the unbiased std of the rewards r (this rank's) over all ranks' (two passes: mean, then squares)."""
    s = step.all_sum([float(r.sum()), float(len(r))]).tolist()
    mean = s[0] / max(s[1], 1.0)
    return (step.all_sum(float(((r - mean) ** 2).sum())).item() / max(s[1] - 1, 1.0)) ** 0.5

def score(o, prompts, completions, columns):
    """(rewards (N,), {name: (N,)}) of completions (token ids) of prompts (texts): decoded, then scored by
    o's rewards, which also get the ids and the objective's max_new_tokens / overlong_buffer."""
    on = o.online
    texts = [completion(on.tokenizer, x, on.tokenizer.eos_token_id, ()) for x in completions]
    return on.rewards(prompts, texts, columns, completion_ids=completions, max_new_tokens=o.cfg.max_new_tokens,
                      overlong_buffer=o.cfg.overlong_buffer)

def _sample_groups(step, o, micro_batches, times):
    """one rollout of this rank's prompt micro-batches: [group] in their order, a group being one
    prompt's G completions and their rewards (times: gen_s and reward_s added to)."""
    c, on = o.cfg, o.online
    G, n = c.num_generations, on.rollouts
    on.rollouts += 1
    groups = []
    for b in micro_batches:
        t0 = time.time()
        pids = [p for p in b["prompt_ids"] for _ in range(G)]
        rid = [pid for pid in b["ids"] for _ in range(G)]
        comps = sample(step, o, pids, row_keys(on.seed, o.i, n, rid, [g for _ in b["ids"] for g in range(G)]),
                       c.temperature, c.max_new_tokens)
        t1 = time.time()
        r, parts = score(o, [p for p in b["prompts"] for _ in range(G)], comps,
                         [dict(col, _id=pid) for pid, col in zip(b["ids"], b["columns"]) for _ in range(G)])
        times["gen_s"] += t1 - t0
        times["reward_s"] += time.time() - t1
        for j, pid in enumerate(b["ids"]):
            cut = slice(j * G, (j + 1) * G)
            groups.append(dict(id=pid, prompt_ids=b["prompt_ids"][j], prompt=b["prompts"][j], columns=b["columns"][j],
                               completions=comps[cut], reward=r[cut], parts={k: v[cut] for k, v in parts.items()}))
    return groups

def _dynamic_sampling(step, o, micro_batches, groups, times):
    """DAPO's dynamic sampling: groups whose rewards are all equal (zero advantage) are dropped and the
    loader's next prompts rolled out, until the kept groups of all ranks fill the step (P) or
    max_resample more rollouts are spent. The kept groups are ordered as one process would see them
    (rollout, then place in the global batch), the first P trained, shared out over (micro-batch,
    rank) slots in turn: the same groups train on any number of ranks. Returns (this rank's groups
    per micro-batch, every group it sampled, the rollouts taken)."""
    n_local, world = sum(len(b["ids"]) for b in micro_batches), step.world_size
    want, rank = n_local * world, getattr(o.loader, "rank", 0)
    sampled, kept, rounds = [], [], 0
    while True:
        for q, g in enumerate(groups):
            g["order"] = (rounds, rank * n_local + q)  # the loader gives rank r the block [r n, (r + 1) n) of a step
        sampled += groups
        kept += [g for g in groups if g["reward"].max() > g["reward"].min()]
        rounds += 1
        if step.all_sum(float(len(kept))).item() >= want or rounds > o.cfg.max_resample:
            break
        groups = _sample_groups(step, o, o.loader.next_step(), times)
    if world > 1:
        kept = [g for part in _all_gather(step, rank, kept) for g in part]
    kept = sorted(kept, key=lambda g: g["order"])[:want]
    slots = world * len(micro_batches)
    return [kept[m * world + rank::slots] for m in range(len(micro_batches))], sampled, rounds

def _all_gather(step, rank, obj):
    """every rank's obj (picklable), in rank order, through step.all_sum: each rank writes its pickled
    bytes into its own row of a zero tensor, the sum holds them all."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = step.all_sum(torch.nn.functional.one_hot(torch.tensor(rank), step.world_size).double() * len(data))
    sizes = [int(n) for n in sizes.tolist()]
    rows = torch.zeros(step.world_size, max(sizes), dtype=torch.float64)
    rows[rank, :len(data)] = data.double()
    rows = step.all_sum(rows).cpu().to(torch.uint8)
    return [pickle.loads(rows[r, :n].numpy().tobytes()) for r, n in enumerate(sizes)]

def grpo_rollout(micro_batches, step, o):
    """GRPO's rollout, in place on the step's prompt micro-batches: each becomes its prompts' P x G
    training rows with "advantages" (rows,), "old_logps" (rows, T) when grpo_inner_steps > 1,
    "ref_token_logps" when grpo_beta > 0, and "rollout" (its rewards and lengths; the first
    micro-batch's "step" holds the whole rollout's, for the log). With dynamic_sampling the groups
    are those _dynamic_sampling keeps (a micro-batch left without one gets a row that counts for
    nothing: every rank runs the same micro-steps). A buffered (already rolled out) step is left as it is."""
    if "advantages" in micro_batches[0]:
        return micro_batches
    c, on = o.cfg, o.online
    G, eos = c.num_generations, on.tokenizer.eos_token_id
    pad = on.tokenizer.pad_token_id if on.tokenizer.pad_token_id is not None else 0
    times = {"gen_s": 0.0, "reward_s": 0.0}
    groups = _sample_groups(step, o, micro_batches, times)
    if c.dynamic_sampling:
        slots, sampled, rounds = _dynamic_sampling(step, o, micro_batches, groups, times)
    else:  # each micro-batch trains its own prompts' groups
        ends = [sum(len(b["ids"]) for b in micro_batches[:m + 1]) for m in range(len(micro_batches))]
        slots, sampled, rounds = [groups[e - len(b["ids"]):e] for b, e in zip(micro_batches, ends)], groups, 1
    trained = torch.cat([g["reward"] for slot in slots for g in slot] or [torch.zeros(0, dtype=torch.float64)])
    batch_std = _batch_std(step, trained) if c.advantage == "grpo" and c.scale_rewards == "batch" else None
    for b, slot in zip(micro_batches, slots):
        b.clear()
        if slot:
            r = torch.cat([g["reward"] for g in slot])
            A = advantages(r.view(-1, G), c.advantage, scale=c.scale_rewards, batch_std=batch_std).view(-1)
            comps = [x for g in slot for x in g["completions"]]
            cut = {j for j, x in enumerate(comps) if eos not in x} if c.mask_truncated else ()
            x = _training_rows([g["prompt_ids"] for g in slot for _ in range(G)], comps,
                               [(g["id"], k) for g in slot for k in range(G)], pad, cut)
            parts = {k: float(torch.cat([g["parts"][k] for g in slot]).mean()) for k in slot[0]["parts"]}
        else:  # one row without labels, id None
            r, A, comps, parts = torch.zeros(0, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), [], {}
            x = _training_rows([[pad]], [[]], [None], pad)
        lengths = torch.tensor([len(q) for q in comps], dtype=torch.float64)
        b.update(x, advantages=A, prompt_ids=[g["prompt_ids"] for g in slot], prompts=[g["prompt"] for g in slot],
                 columns=[g["columns"] for g in slot], rollout={"reward": r, "length": lengths, "parts": parts})
        dev = D.pad_cat([b], step.pad_id, step.device)
        if c.grpo_inner_steps > 1:
            b["old_logps"] = token_logps(step, dev).float()
        if c.grpo_beta > 0:
            b["ref_token_logps"] = token_logps(step, dev, o).float()
    lengths = torch.tensor([len(q) for g in sampled for q in g["completions"]], dtype=torch.float64)
    micro_batches[0]["rollout"]["step"] = dict(
        times, reward=torch.cat([g["reward"] for g in sampled]), length=lengths, groups=len(sampled),
        equal=sum(bool(g["reward"].max() == g["reward"].min()) for g in sampled), trained=sum(map(len, slots)),
        rollouts=rounds)
    return micro_batches

def _rollout_stats(micro_batches):
    """the step's rollout figures on this rank (a buffer saved before they were kept: its micro-batches')."""
    st = micro_batches[0]["rollout"].get("step")
    if st is not None:
        return st
    r = torch.cat([b["rollout"]["reward"] for b in micro_batches])
    return dict(reward=r, length=torch.cat([b["rollout"]["length"] for b in micro_batches]), groups=0, equal=0,
                trained=0, rollouts=1, gen_s=sum(b["rollout"]["gen_s"] for b in micro_batches),
                reward_s=sum(b["rollout"]["reward_s"] for b in micro_batches))

def count_completions(micro_batches, step, o):
    """GRPO's global counts: loss tokens and completions (the normalizers of grpo_loss token, sequence,
    constant), and the rollout's statistics for the log over every completion it sampled (reward mean /
    std, completion length, the share of groups whose rewards are all equal, seconds generating and
    scoring; with dynamic_sampling the rollouts taken and the groups trained)."""
    tokens = sum(L.count_tokens(b["labels"]).item() for b in micro_batches)
    completions = sum(i is not None for b in micro_batches for i in b["ids"])
    st = _rollout_stats(micro_batches)
    r, n_tok = st["reward"], st["length"]
    s = step.all_sum([tokens, completions, float(r.sum()), float((r * r).sum()), float(len(r)), float(n_tok.sum()),
                      st["gen_s"], st["reward_s"], st["groups"], st["equal"], st["trained"]]).tolist()
    N = max(s[4], 1.0)
    mean = s[2] / N
    log = {"reward": mean, "reward_std": max(s[3] / N - mean * mean, 0.0) ** 0.5, "completion_len": s[5] / N,
           "groups_all_equal": s[9] / max(s[8], 1.0), "gen_s": s[6] / step.world_size,
           "reward_s": s[7] / step.world_size}
    if o.cfg.dynamic_sampling:
        log.update(rollouts=st["rollouts"], groups_trained=s[10])
    return {"tokens": max(s[0], 1), "completions": max(s[1], 1), "log": log}

@torch.no_grad()
def eval_reward(step, o, batches):
    """an online objective's eval loss: minus the mean reward of greedy completions of the held-out
    prompts (eval fillers, id None, count for nothing), over all ranks; stats {"reward": the mean}."""
    total, n = 0.0, 0.0
    for b in batches:
        comps = sample(
            step, o, b["prompt_ids"], torch.zeros(len(b["ids"]), dtype=torch.int64), 0.0, o.cfg.max_new_tokens
        )
        r, _ = score(o, b["prompts"], comps, [dict(col, _id=i) for i, col in zip(b["ids"], b["columns"])])
        real = torch.tensor([i is not None for i in b["ids"]], dtype=torch.float64)
        total += float((r * real).sum())
        n += float(real.sum())
    s = step.all_sum([total, n]).tolist()
    mean = s[0] / max(s[1], 1.0)
    return -mean, {"reward": mean}

# -----------------------------------------------------------------------------
# on-policy distillation

def kd_rollout(micro_batches, step, o):
    """kd with kd_on_policy=True, in place: each row's response is replaced by the student's own
    sample of its prompt (GKD with lambda = 1); the teacher then scores those tokens (kd's loss)."""
    if not o.cfg.kd_on_policy or "rollout" in micro_batches[0]:
        return micro_batches
    on, n = o.online, o.online.rollouts
    on.rollouts += 1
    for b in micro_batches:
        t0 = time.time()
        pids = []
        for ids, labels, m in zip(b["input_ids"].tolist(), b["labels"].tolist(), b["attention_mask"].tolist()):
            start = next(t for t, y in enumerate(labels) if y != L.IGNORE_INDEX) + 1
            pids.append(ids[:start])
        comps = sample(step, o, pids, row_keys(on.seed, o.i, n, b["ids"], [0] * len(pids)), o.cfg.temperature,
                       o.cfg.max_new_tokens)
        pad = on.tokenizer.pad_token_id if on.tokenizer.pad_token_id is not None else 0
        x = _training_rows(pids, comps, b["ids"], pad)
        b.clear()
        b.update(x, rollout={"gen_s": time.time() - t0})
    return micro_batches
