"""The anti-forgetting options of an sft objective (docs/algorithms.md §1.8): DFT (sft_loss=dft) and
the KL anchor (kl_anchor = beta), alone and together (ASFT). Each against its formula written out
here on transformers' own logits (loss, stats and gradient; weighted rows; two micro-batches of
one global token mean), the chunked KL against full logits, and train.py: the first logged loss is
the formula, 2 ranks = 1 process, and the reference is ref_model, else the starting model, else
under LoRA the base with the adapters off (KL exactly 0 at the first step in both)."""
import json

import pytest
import torch
import torch.nn.functional as F

import configurator
import data as D
import losses
import objectives
from helpers import check_config, metrics, run_train, tiny_hf, train_defaults
from model import GPT, byte_tokenizer
from step import Step

TEMPLATE = "User: {}\nAssistant: "
ROWS = [{"input": "red fox", "output": "RED FOX", "w": 2.0}, {"input": "sky", "output": "SKY!", "w": 0.5},
        {"input": "old oak tree", "output": "OLD OAK TREE", "w": 1.0}, {"input": "cat", "output": "a cat", "w": 3.0}]

# -----------------------------------------------------------------------------
# the chunked KL against full logits

def kl_reference(hidden, weight, ref_hidden, ref_weight, labels, cap=0.0, ref_cap=0.0):
    """[B, T] KL(p || q) from full [B, T, V] logits through autograd (q detached), 0 where masked."""
    capped = lambda z, c: c * torch.tanh(z / c) if c else z
    lp = F.log_softmax(capped(hidden @ weight.T, cap), -1)
    lq = F.log_softmax(capped(ref_hidden @ ref_weight.T, ref_cap), -1).detach()
    return (lp.exp() * (lp - lq)).sum(-1) * (labels != -100)

@pytest.mark.parametrize("chunk_size", [1, 5, 0])
@pytest.mark.parametrize("uniform,caps", [(u, c) for c in ((0.0, 0.0), (1.5, 2.5)) for u in (True, False)])
def test_kl_anchor_matches_full_logits(chunk_size, uniform, caps):
    """values, and gradients in the policy's hidden states and head, on every gradient path: the
    one computed in the forward (uniform: a token sum) and the closed-form recompute (unequal token
    weights); soft-capped logits too. The reference gets no gradient."""
    g = torch.Generator().manual_seed(0)
    B, T, C, C_R, V = 3, 7, 8, 6, 50
    hidden = torch.randn(B, T, C, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (0.7 * torch.randn(V, C, generator=g, dtype=torch.float64)).requires_grad_()
    ref_hidden = torch.randn(B, T, C_R, generator=g, dtype=torch.float64, requires_grad=True)
    ref_weight = (0.7 * torch.randn(V, C_R, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3], labels[1, :] = -100, -100  # a prompt, and a row with no target
    tok = losses.kl_anchor_token_losses(hidden, weight, ref_hidden, ref_weight, labels, chunk_size, uniform, *caps)
    want = kl_reference(hidden, weight, ref_hidden, ref_weight, labels, *caps)
    assert (want[labels != -100] > 1e-3).all() and (tok[labels == -100] == 0).all()
    torch.testing.assert_close(tok, want, atol=1e-12, rtol=1e-10)
    w = torch.ones(B, T, dtype=torch.float64) if uniform else torch.rand(B, T, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((tok * w).sum(), [hidden, weight])
    theirs = torch.autograd.grad((want * w).sum(), [hidden, weight])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    tok = losses.kl_anchor_token_losses(hidden, weight, ref_hidden, ref_weight, labels, chunk_size, uniform, *caps)
    tok.sum().backward()
    assert ref_hidden.grad is None and ref_weight.grad is None

def test_dft_token_losses_is_the_detached_probability_times_the_nll():
    logp = torch.tensor([[-0.1, -2.0, 0.0]], dtype=torch.float64, requires_grad=True)  # 0.0: a masked position
    tok = losses.dft_token_losses(logp)
    want = torch.tensor([[0.1 * torch.e ** -0.1, 2.0 * torch.e ** -2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(tok, want)
    g, = torch.autograd.grad(tok.sum(), logp)  # d(-sg(p) log p) / d log p = -p
    torch.testing.assert_close(g, -torch.tensor([[torch.e ** -0.1, torch.e ** -2.0, 1.0]], dtype=torch.float64))

# -----------------------------------------------------------------------------
# the kind against transformers' logits

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    return d, tiny_hf(d / "policy", 0).double(), tiny_hf(d / "ref", 1).double()

def formula(hf, hf_ref, b, sft_loss, beta):
    """(loss, nll, anchor_kl) of rows b on transformers' logits: each target token t of row r
    contributes w_r (l_t + beta KL_t) with l_t = -log p(y_t) (nll) or -sg(p(y_t)) log p(y_t) (dft),
    KL_t = sum_v p(v) (log p(v) - log q(v)) the policy's against the reference's next-token
    distributions; divided by sum w_r over the target tokens (w = 1 without weights)."""
    ids, labels = b["input_ids"], b["labels"]
    mask = (ids != 257).long()
    lp = F.log_softmax(hf(input_ids=ids, attention_mask=mask).logits.double(), -1)
    with torch.no_grad():
        lq = F.log_softmax(hf_ref(input_ids=ids, attention_mask=mask).logits.double(), -1)
    keep = (labels != -100).double()
    w = keep * (b["weights"] if "weights" in b else 1.0)
    logp = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    nll = -logp
    l = -logp.detach().exp() * logp if sft_loss == "dft" else nll
    kl = (lp.exp() * (lp - lq)).sum(-1)
    n = w.sum()
    return ((l + beta * kl) * w).sum() / n, (nll * w).sum().item() / n.item(), (kl * w).sum().item() / n.item()

CASES = [("nll", 0.5, False), ("dft", 0.0, False), ("dft", 0.5, False), ("dft", 0.5, True), ("nll", 0.3, True)]

@pytest.mark.parametrize("sft_loss,beta,weighted", CASES)
def test_loss_stats_and_gradient_against_transformers_logits(models, sft_loss, beta, weighted):
    """SFT with the KL anchor, DFT, ASFT (DFT + anchor), weighted rows: one global batch split into
    two micro-batches (the global token count, Step.accumulate), against the formula on all rows."""
    d, hf, hf_ref = models
    tok = byte_tokenizer()
    policy = GPT.from_pretrained(str(d / "policy"), dtype=torch.float64)
    ref = GPT.from_pretrained(str(d / "ref"), dtype=torch.float64).requires_grad_(False)
    ex = D.tokenize_sft(ROWS, tok, 40, template=TEMPLATE, weight_key="w" if weighted else "")
    o = objectives.make("sft", ref=ref, sft_loss=sft_loss, kl_anchor=beta, weight_key="w" if weighted else "")
    micro = [D.collate_sft(ex[:2], tok.pad_token_id), D.collate_sft(ex[2:], tok.pad_token_id)]
    step = Step(policy, policy, chunk_size=7, pad_id=tok.pad_token_id)
    norm = step.normalizers(o, micro)
    totals = step.accumulate([[(o, b, norm)] for b in micro], [1.0])
    (loss, stats), = step.reduce([o], totals, [norm])
    want, nll, kl = formula(hf, hf_ref, D.collate_sft(ex, tok.pad_token_id), sft_loss, beta)
    # transformers' RMSNorm rounds through float32 even in a float64 model: agreement to ~1e-9
    assert abs(loss - want.item()) < 1e-8, (loss, want.item())
    assert abs(stats["nll"] - nll) < 1e-8 and (beta == 0 or abs(stats["anchor_kl"] - kl) < 1e-8), (stats, nll, kl)
    assert kl > 0.01 and ("anchor_kl" in stats) == (beta > 0)
    ours = [policy.lm_head.weight.grad, policy.blocks[0].attn.q_proj.weight.grad]
    theirs = torch.autograd.grad(want, [hf.lm_head.weight, hf.model.layers[0].self_attn.q_proj.weight])
    for a, r in zip(ours, theirs):  # DFT's token weights are p(y_t) ~ 1/V on a random model: small gradients
        assert ((a - r).norm() / r.norm()).item() < 1e-6 and r.norm() > 1e-6

def test_defaults_are_plain_sft_without_a_reference():
    o = objectives.make("sft")
    assert (o.cfg.sft_loss, o.cfg.kl_anchor) == ("nll", 0.0)
    assert not o.kind.uses_reference(o.cfg) and not o.kind.recomputes_head(o.cfg)
    assert o.kind.uses_reference(objectives.make("sft", kl_anchor=0.1).cfg)
    assert o.kind.recomputes_head(objectives.make("sft", sft_loss="dft").cfg)  # unequal token weights

@pytest.mark.parametrize("key,value,words", [("sft_loss_1", "focal", ("sft_loss_1", "'focal'", "nll", "dft")),
                                             ("kl_anchor_1", -0.1, ("kl_anchor_1", ">= 0", "-0.1"))])
def test_bad_values_are_refused_naming_the_key(key, value, words):
    c, per = train_defaults(dataset_1="data/toy_sft.jsonl", obj_2="", **{key: value})
    with pytest.raises(configurator.ConfigError) as e:
        check_config(c, per)
    assert all(w in str(e.value) for w in words), str(e.value)

# -----------------------------------------------------------------------------
# train.py: the first logged loss, 2 ranks, and the three references

def run_args(d, path, *extra):
    return [f"--pretrain={d / 'policy'}", "--obj_1=sft", "--obj_2=", f"--dataset_1={path}", f"--eval_split_1={path}",
            "--max_len_1=40", "--train_batch_size=4", "--micro_train_batch_size=2", "--max_iters=2", "--dtype=float64",
            "--learning_rate=1e-2", "--input_template_1=" + TEMPLATE, "--eval_interval=0", "--sft_loss_1=dft",
            "--kl_anchor_1=0.5", *extra]

def test_runs_first_step_two_ranks_and_references(tmp_path, models):
    """ASFT through train.py on 4 rows, one global batch of 2 micro-batches (of 1 per rank on 2
    ranks): the first logged loss and anchor_kl are the formula with ref_model as the reference
    (and the eval at step 0, on the same rows, too); 2 ranks log the same lines; without ref_model
    the reference is the starting model (a frozen copy), under LoRA the base with the adapters
    off: KL exactly 0 at the first step, > 0 at the second."""
    d, hf, hf_ref = models
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({k: r[k] for k in ("input", "output")}) + "\n" for r in ROWS))
    run_train(tmp_path / "ref", *run_args(d, path, f"--ref_model_1={d / 'ref'}"), base=[])
    b = D.collate_sft(D.tokenize_sft(ROWS, byte_tokenizer(), 40, template=TEMPLATE), 257)
    want, nll, kl = formula(hf, hf_ref, b, "dft", 0.5)
    first, ev = metrics(tmp_path / "ref")[0], metrics(tmp_path / "ref", "eval")[0]
    assert abs(first["loss"] - want.item()) < 1e-8 and abs(first["anchor_kl"] - kl) < 1e-8, (first, want.item(), kl)
    assert abs(first["nll"] - nll) < 1e-8
    assert ev["iter"] == 0 and abs(ev["eval_loss_1"] - want.item()) < 1e-8 and abs(ev["eval_anchor_kl_1"] - kl) < 1e-8
    run_train(tmp_path / "two", *run_args(d, path, f"--ref_model_1={d / 'ref'}"), nproc=2, base=[])
    for a, c in zip(metrics(tmp_path / "ref"), metrics(tmp_path / "two")):
        assert a.keys() == c.keys()
        assert all(abs(a[k] - c[k]) <= 1e-9 * max(1.0, abs(a[k])) for k in a if k not in ("elapsed_s", "kind")), (a, c)
    for name, extra in (("initial", []), ("lora", ["--lora_rank=4", "--lora_alpha=8", "--learning_rate=5e-2"])):
        run_train(tmp_path / name, *run_args(d, path, *extra), base=[])
        lines = metrics(tmp_path / name)
        assert lines[0]["anchor_kl"] == 0.0 and lines[1]["anchor_kl"] > 1e-6, (name, lines)
        dft_alone = formula(hf, hf, b, "dft", 0.0)[0].item()  # the reference is the policy itself at step 1
        assert abs(lines[0]["loss"] - dft_alone) < 1e-8, (name, lines[0], dft_alone)
