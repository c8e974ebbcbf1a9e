"""The preference kinds users compare against (SimPO, ORPO, KTO) and per-row weights: each loss
against its formula worked out here on transformers' own logits (value and gradient) and against
the first step of a train.py run; KTO's reference point; the kinds under LoRA, 2 ranks and resume
beside SFT and DPO; weights 1 = no weights to the bit, weight 2 = the row twice."""
import json

import pytest
import torch
import torch.nn.functional as F

import data as D
import objectives
from helpers import metrics, run_train, tiny_hf
from model import GPT, byte_tokenizer
from step import Step

TEMPLATE = "User: {}\nAssistant: "

def pref_rows():
    return [
        {"prompt": p, "chosen": p.upper() + "!", "rejected": p.upper()}
        for p in ("red fox", "sky", "old oak tree", "cat")
    ]

def kto_rows():
    return [{"prompt": "red fox", "completion": "RED FOX!", "label": True},
            {"prompt": "sky", "completion": "sky", "label": False},
            {"prompt": "old oak", "completion": "OLD OAK!", "label": True},
            {"prompt": "cat", "completion": "CAT", "label": False}]

def hf_logps(m, ids, labels):
    """[rows] summed and [rows] mean response-token log-probs of transformers' model m."""
    mask = (ids != 257).long()
    lp = F.log_softmax(m(input_ids=ids, attention_mask=mask).logits.double(), -1)
    keep = labels != -100
    tok = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * keep
    return tok.sum(-1), tok.sum(-1) / keep.sum(-1), tok

def pair_formula(kind, m, b, beta=2.0, gamma=0.5, lam=0.1):
    """SimPO / ORPO on transformers' logits of the same rows (b: 2B rows, chosen then rejected)."""
    s, mean, tok = hf_logps(m, b["input_ids"], b["labels"])
    a, r = mean.chunk(2)
    if kind == "simpo":
        return -F.logsigmoid(beta * (a - r) - gamma).mean()
    odds = lambda x: x - torch.log(1 - torch.exp(x))
    n = len(a)
    nll = -tok[:n].sum() / (b["labels"][:n] != -100).sum()
    return nll + lam * -F.logsigmoid(odds(a) - odds(r)).mean()

def kto_formula(m, ref, examples, beta=0.5, wd=1.0, wu=1.0):
    """KTO with the mismatched rows built here: row i's prompt with row i+1's completion, cycled."""
    split = [D._split_prompt(e["input_ids"], e["labels"]) for e in examples]
    kl = [D._example(split[i][0], split[(i + 1) % len(split)][1], 0) for i in range(len(split))]
    rows = lambda pairs: D._batch([(torch.tensor(i).numpy(), torch.tensor(l).numpy(), [1] * len(i), list(range(len(i))))
                                   for i, l in pairs], 257, list(range(len(pairs))))
    b = rows([(e["input_ids"], e["labels"]) for e in examples])
    bk = rows([(i, l) for i, l, _ in kl])
    r = hf_logps(m, b["input_ids"], b["labels"])[0] - hf_logps(ref, b["input_ids"], b["labels"])[0].detach()
    with torch.no_grad():
        z0 = max(
            0.0,
            (hf_logps(m, bk["input_ids"], bk["labels"])[0] - hf_logps(ref, bk["input_ids"], bk["labels"])[0])
            .mean()
            .item(),
        )
    good = torch.tensor([e["desirable"][0] == 1 for e in examples])
    return torch.where(
        good, wd * (1 - torch.sigmoid(beta * (r - z0))), wu * (1 - torch.sigmoid(beta * (z0 - r)))
    ).mean()

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    return d, tiny_hf(d / "policy", 0).double(), tiny_hf(d / "ref", 1).double()

@pytest.mark.parametrize("kind", ["simpo", "orpo", "kto"])
def test_loss_and_gradient_against_transformers_logits(models, kind):
    d, hf, hf_ref = models
    tok = byte_tokenizer()
    policy = GPT.from_pretrained(str(d / "policy"), dtype=torch.float64)
    if kind == "kto":
        ex = D.tokenize_kto(kto_rows(), tok, 40, template=TEMPLATE)
        o = objectives.make("kto", ref=GPT.from_pretrained(str(d / "ref"), dtype=torch.float64).requires_grad_(False),
                            dpo_beta=0.5, kto_undesirable_weight=1.5)
        b = D.collate_kto(ex, tok.pad_token_id)
        want = kto_formula(hf, hf_ref, [{"input_ids": e["chosen_ids"], "labels": e["chosen_labels"], **e} for e in ex],
                           beta=0.5, wu=1.5)
    else:
        ex = D.tokenize_dpo(pref_rows(), tok, 40, template=TEMPLATE)
        o = objectives.make(kind, dpo_beta=2.0, simpo_gamma=0.5, orpo_lambda=0.1)
        b = D.collate_dpo(ex, tok.pad_token_id)
        want = pair_formula(kind, hf, b)
    step = Step(policy, policy, chunk_size=7, pad_id=tok.pad_token_id)
    (loss, _), = step.losses([(o, b, step.normalizers(o, [b]))])
    # transformers' RMSNorm rounds through float32 even in a float64 model: agreement to ~1e-9
    assert abs(loss.item() - want.item()) < 1e-8, (loss.item(), want.item())
    ours = torch.autograd.grad(loss, [policy.lm_head.weight, policy.blocks[0].attn.q_proj.weight])
    theirs = torch.autograd.grad(want, [hf.lm_head.weight, hf.model.layers[0].self_attn.q_proj.weight])
    for a, r in zip(ours, theirs):
        assert ((a - r).norm() / r.norm()).item() < 1e-6 and r.norm() > 1e-3

@pytest.mark.parametrize("kind", ["simpo", "orpo", "kto"])
def test_first_step_of_a_run_is_the_formula(tmp_path, models, kind):
    """train.py on 4 rows, one global batch of 2 micro-batches (KTO's z0 is over the whole step):
    its first logged loss is the formula on transformers' logits of the initial weights."""
    d, hf, hf_ref = models
    rows = kto_rows() if kind == "kto" else pref_rows()
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_train(tmp_path / "out", f"--pretrain={d / 'policy'}", f"--obj_1={kind}", f"--dataset_1={path}",
              f"--eval_split_1={path}", "--obj_2=", "--max_len_1=40", "--train_batch_size=4",
              "--micro_train_batch_size=2", "--max_iters=1", "--dtype=float64",
              "--dpo_beta=0.5" if kind == "kto" else "--dpo_beta=2.0", f"--ref_model={d / 'ref'}",
              "--input_template=" + TEMPLATE, base=[])
    tok = byte_tokenizer()
    if kind == "kto":
        ex = D.tokenize_kto(rows, tok, 40, template=TEMPLATE)
        want = kto_formula(
            hf, hf_ref, [{"input_ids": e["chosen_ids"], "labels": e["chosen_labels"], **e} for e in ex], beta=0.5
        )
    else:
        want = pair_formula(kind, hf, D.collate_dpo(D.tokenize_dpo(rows, tok, 40, template=TEMPLATE), tok.pad_token_id))
    first = metrics(tmp_path / "out")[0]
    # float32 rounding inside transformers' norms
    assert abs(first["loss"] - want.item()) < 1e-8, (first["loss"], want.item())

def test_kto_reference_point_ignores_row_order_when_prompts_are_equal(models):
    """rows with one prompt: the mismatched rows are that prompt with every completion once, in
    whatever order the rows come, so z0 is the same."""
    d, _, _ = models
    tok = byte_tokenizer()
    policy = GPT.from_pretrained(str(d / "policy"), dtype=torch.float64)
    ref = GPT.from_pretrained(str(d / "ref"), dtype=torch.float64).requires_grad_(False)
    rows = [
        {"prompt": "fox", "completion": c, "label": i % 2 == 0}
        for i, c in enumerate(["FOX!", "fox", "FOX", "F!", "xx"])
    ]
    z0 = []
    for order in ([0, 1, 2, 3, 4], [3, 0, 4, 2, 1], [4, 3, 2, 1, 0]):
        b = D.collate_kto(D.tokenize_kto([rows[k] for k in order], tok, 40, template=TEMPLATE), tok.pad_token_id)
        step = Step(policy, policy, pad_id=tok.pad_token_id)
        z0.append(step.normalizers(objectives.make("kto", ref=ref), [b])["z0"])
    assert z0[0] > 0 and max(z0) - min(z0) < 1e-12, z0

# -----------------------------------------------------------------------------
# the new kinds in the loop: LoRA, K = 3 beside SFT and DPO, 2 ranks, resume

ALL = ["--obj_3=simpo", "--obj_4=orpo", "--obj_5=kto", *(f"--{k}_{i}={v}" for i in (3, 4, 5) for k, v in (
    ("dataset", "data/toy_pref.jsonl"), ("eval_split", "data/toy_pref_eval.jsonl"), ("max_samples", 64),
    ("max_len", 40))),
       "--dpo_beta_3=2.0", "--lambd=0.2,0.2,0.2,0.2,0.2", "--method=mix", "--lora_rank=4", "--learning_rate=3e-2",
       "--train_batch_size=4", "--micro_train_batch_size=2", "--max_iters=4", "--dtype=float64", "--save_interval=2"]

def test_new_kinds_with_lora_beside_sft_and_dpo_two_ranks_and_resume(tmp_path):
    """simpo, orpo and kto beside sft and dpo (K = 5, mix: every kind in every step), LoRA (kto's
    reference: the policy with its adapters off), float64: 2 ranks give the 1-process losses and
    every kind's stats; a run cut after its checkpoint at 2 resumes to the same lines to the bit."""
    run_train(tmp_path / "one", *ALL)
    lines = metrics(tmp_path / "one")
    assert (
        all(f"loss_{i}" in l for l in lines for i in range(1, 6))
        and "log_odds_ratio_4" in lines[0]
        and "z0_5" in lines[0]
    )
    run_train(tmp_path / "two", *ALL, nproc=2)
    for a, b in zip(lines, metrics(tmp_path / "two")):
        assert a.keys() == b.keys()
        for k in a:
            if k not in ("elapsed_s", "kind"):
                assert abs(a[k] - b[k]) <= 1e-9 * max(1.0, abs(a[k])), (k, a[k], b[k])
    import shutil
    shutil.copytree(tmp_path / "one", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "ckpt" / "iter_0000004")
    shutil.rmtree(tmp_path / "cut" / "final")
    (tmp_path / "cut" / "summary.json").unlink()
    run_train(tmp_path / "cut", *ALL, "--resume=True")
    drop = lambda ls: [{k: v for k, v in l.items() if k != "elapsed_s"} for l in ls]
    assert drop(metrics(tmp_path / "cut")) == drop(lines)

# -----------------------------------------------------------------------------
# per-row weights

def weighted_file(path, rows, weights):
    path.write_text("".join(json.dumps({**r, "w": w}) + "\n" for r, w in zip(rows, weights)))

def toy(name, n):
    with open(f"data/{name}") as f:
        return [json.loads(l) for l in f][:n]

@pytest.mark.parametrize("kind,file", [("sft", "toy_sft.jsonl"), ("dpo", "toy_pref.jsonl")])
def test_weights(tmp_path, kind, file):
    """weights 1 give the unweighted run's losses to the bit; weight 2 on half the rows gives the
    run on those rows duplicated (one global batch of every row per step, float64)."""
    rows = toy(file, 8)
    common = [f"--obj_1={kind}", "--obj_2=", "--max_len_1=40", "--micro_train_batch_size=4", "--max_iters=3",
              "--dtype=float64", "--eval_split_1=" + f"data/{file.replace('.jsonl', '_eval.jsonl')}", "--eval_iters=1",
              "--model_n_layer=2", "--model_n_embd=32", "--model_n_head=4", "--model_n_kv_head=2",
              "--model_intermediate_size=64", "--learning_rate=3e-3", "--eval_interval=0"]
    weighted_file(tmp_path / "ones.jsonl", rows, [1] * 8)
    run_train(
        tmp_path / "ones",
        *common,
        f"--dataset_1={tmp_path / 'ones.jsonl'}",
        "--weight_key=w",
        "--train_batch_size=8",
        base=[],
    )
    run_train(tmp_path / "plain", *common, f"--dataset_1={tmp_path / 'ones.jsonl'}", "--train_batch_size=8", base=[])
    assert [l["loss"] for l in metrics(tmp_path / "ones")] == [l["loss"] for l in metrics(tmp_path / "plain")]
    weighted_file(tmp_path / "twos.jsonl", rows, [2, 1] * 4)
    weighted_file(tmp_path / "dup.jsonl", rows + rows[::2], [1] * 12)
    run_train(
        tmp_path / "twos",
        *common,
        f"--dataset_1={tmp_path / 'twos.jsonl'}",
        "--weight_key=w",
        "--train_batch_size=8",
        base=[],
    )
    run_train(tmp_path / "dup", *common, f"--dataset_1={tmp_path / 'dup.jsonl'}", "--train_batch_size=12", base=[])
    a, b = metrics(tmp_path / "twos"), metrics(tmp_path / "dup")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-10, (x, y)

@pytest.mark.parametrize("value,words", [(-1, "finite number >= 0"), (-0.5, "-0.5"), (None, "missing key 'w'")])
def test_bad_weights_are_refused_naming_the_row(tmp_path, value, words):
    rows = toy("toy_sft.jsonl", 6)
    rows = [dict(r, w=1.0) for r in rows]
    if value is None:
        del rows[4]["w"]
    else:
        rows[4]["w"] = value
    (tmp_path / "w.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from helpers import refused
    p = run_train(tmp_path / "out", f"--dataset_1={tmp_path / 'w.jsonl'}", "--obj_2=", "--weight_key=w", check=False)
    refused(p, "row 4", words)
