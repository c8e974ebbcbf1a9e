"""
losses.py against plain references: full logits hidden @ weight.T, F.log_softmax, no chunking.
"""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import losses  # noqa: E402

B, T, C, C_T, V = 4, 8, 8, 6, 64
# row 0: prompt, response, last position; row 1: fully masked; rows 2-3: scattered -> N = 17 (prime)
MASK = torch.tensor([
    [0, 0, 1, 1, 1, 1, 1, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 1, 1, 1, 1, 1, 1, 0],
    [1, 0, 1, 1, 0, 1, 1, 1],
], dtype=torch.bool)
N = int(MASK.sum())
CHUNKS = [1, 4, N, 100, 0]  # 4 does not divide N, 100 > N, 0 = auto (one chunk at V = 64)

def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, requires_grad=True)
    weight = (0.5 * torch.randn(V, C, generator=g)).requires_grad_()
    teacher_hidden = torch.randn(B, T, C_T, generator=g, requires_grad=True)
    teacher_weight = (0.5 * torch.randn(V, C_T, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g).masked_fill(~MASK, -100)
    return hidden, weight, teacher_hidden, teacher_weight, labels

def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)

def assert_same(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)

# -----------------------------------------------------------------------------
# plain references

def capped(logits, cap):
    return cap * torch.tanh(logits / cap) if cap else logits

def ref_token_logps(hidden, weight, labels, temperature=1.0, cap=0.0):
    lp = F.log_softmax(capped(hidden @ weight.T, cap) / temperature, dim=-1)  # (B, T, V)
    mask = labels != -100
    picked = lp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked))

def ref_kd(hidden, weight, teacher_hidden, teacher_weight, labels, kind, beta=0.5, top_k=0, temperature=1.0,
           cap=0.0, teacher_cap=0.0):
    s = F.log_softmax(capped(hidden @ weight.T, cap) / temperature, dim=-1)  # (B, T, V)
    t_logits = (capped(teacher_hidden @ teacher_weight.T, teacher_cap) / temperature).detach()
    if top_k:
        t_logits, top = torch.sort(t_logits, dim=-1, descending=True)
        t_logits, s = t_logits[..., :top_k], s.gather(-1, top[..., :top_k])
    pt = F.softmax(t_logits, dim=-1)
    ps = s.exp()
    if kind == "forward":
        per_token = -(pt * s).sum(-1)
    elif kind == "reverse":
        per_token = (ps * (ps.log() - pt.log())).sum(-1)
    else:
        m = beta * pt + (1 - beta) * ps
        per_token = beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)
    return per_token * (labels != -100)

# -----------------------------------------------------------------------------
# SFT, token and sequence log-probs

@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_token_logps_matches_reference(chunk_size):
    hidden, weight, _, _, labels = make_batch()
    g = torch.randn(B, T)  # random upstream gradient
    out = losses.token_logps(hidden, weight, labels, chunk_size=chunk_size, temperature=1.7)
    ref = ref_token_logps(hidden, weight, labels, temperature=1.7)
    assert out.dtype == torch.float32 and out.shape == (B, T)
    assert_same(out, ref)
    assert (out[~MASK] == 0).all()
    for a, b in zip(grads((out * g).sum(), hidden, weight), grads((ref * g).sum(), hidden, weight)):
        assert_same(a, b)

@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_sft_loss_matches_reference(chunk_size):
    hidden, weight, _, _, labels = make_batch()
    out = losses.sft_loss(hidden, weight, labels, chunk_size=chunk_size)
    ref = -ref_token_logps(hidden, weight, labels).sum() / N
    assert_same(out, ref)
    for a, b in zip(grads(out, hidden, weight), grads(ref, hidden, weight)):
        assert_same(a, b)

@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_sequence_logps_and_per_sample_mean(chunk_size):
    hidden, weight, _, _, labels = make_batch()
    tok = losses.token_logps(hidden, weight, labels, chunk_size=chunk_size)
    seq = losses.sequence_logps(hidden, weight, labels, chunk_size=chunk_size)
    per = losses.per_sample_mean(tok, labels)
    ref_tok = ref_token_logps(hidden, weight, labels)
    ref_seq = ref_tok.sum(-1)
    ref_per = torch.stack([ref_tok[b][MASK[b]].mean() if MASK[b].any() else torch.tensor(0.0) for b in range(B)])
    assert_same(seq, ref_seq)
    assert_same(per, ref_per)
    assert seq[1] == 0 and per[1] == 0  # the fully masked row
    g = torch.randn(B)
    for a, b in zip(grads((seq * g).sum() + (per * g).sum(), hidden, weight),
                    grads((ref_seq * g).sum() + (ref_per * g).sum(), hidden, weight)):
        assert_same(a, b)

def test_count_tokens_and_num_tokens():
    hidden, weight, _, _, labels = make_batch()
    assert int(losses.count_tokens(labels)) == N
    full = losses.sft_loss(hidden, weight, labels, chunk_size=4)
    assert_same(losses.sft_loss(hidden, weight, labels, num_tokens=2 * N, chunk_size=4), full / 2)
    assert_same(losses.sft_loss(hidden, weight, labels, num_tokens=torch.tensor(2 * N), chunk_size=4), full / 2)

def test_fully_masked_batch_gives_zero_loss_and_zero_grads():
    hidden, weight, _, _, labels = make_batch()
    labels = torch.full_like(labels, -100)
    loss = losses.sft_loss(hidden, weight, labels, chunk_size=4)
    assert loss.item() == 0
    gh, gw = grads(loss, hidden, weight)  # still in the graph: backward works on an empty micro-batch
    assert (gh == 0).all() and (gw == 0).all()

def test_bf16_inputs_give_float32_logps():
    hidden, weight, _, _, labels = make_batch()
    h, w = hidden.detach().bfloat16(), weight.detach().bfloat16()
    out = losses.token_logps(h, w, labels, chunk_size=4)
    assert out.dtype == torch.float32
    assert_same(out, ref_token_logps(h.float(), w.float(), labels), atol=5e-2)
    # gradients through the bf16 scratch buffer (upcast before the in-place softmax) match float32
    g = torch.randn(B, T)
    h32, w32 = h.float().requires_grad_(), w.float().requires_grad_()
    h, w = h.requires_grad_(), w.requires_grad_()
    ours = grads((losses.token_logps(h, w, labels, chunk_size=4) * g).sum(), h, w)
    ref = grads((ref_token_logps(h32, w32, labels) * g).sum(), h32, w32)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=0.05, rtol=0.05)

@pytest.mark.parametrize("kind", ["sft", "kd"])
def test_autocast_head_runs_in_bf16_with_float32_statistics(kind, monkeypatch):
    """float32 master weights under bf16 autocast (the GPU training set-up): every head GEMM gets
    bf16 operands (tensor cores) and writes float32 logits; loss and gradients stay float32 and
    match the float32 reference within bf16 rounding (atol 2e-2 on values ~1: 8 mantissa bits)."""
    hidden, weight, teacher_hidden, teacher_weight, labels = make_batch()
    seen = []
    for name, ops in (("mm_into", (0, 1)), ("addmm_into", (1, 2))):  # (a, b, out), (acc, a, b)
        real = getattr(losses, name)
        monkeypatch.setattr(
            losses, name, lambda *a, _r=real, _o=ops: (seen.append(tuple(a[i].dtype for i in _o)), _r(*a))[1]
        )
    g = torch.randn(B, T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if kind == "sft":
            out = losses.token_logps(hidden, weight, labels, chunk_size=4)
        else:
            out = losses.kd_token_losses(hidden, weight, teacher_hidden, teacher_weight, labels, chunk_size=4)
    ours = grads((out * g).sum(), hidden, weight)
    ref = (ref_token_logps(hidden, weight, labels) if kind == "sft"
           else ref_kd(hidden, weight, teacher_hidden, teacher_weight, labels, kind="forward"))
    assert out.dtype == torch.float32 and seen
    assert all(d == (torch.bfloat16, torch.bfloat16) for d in seen)  # bf16 operands, float32 results
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(ours, grads((ref * g).sum(), hidden, weight)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-2, rtol=5e-2)

@pytest.mark.parametrize("kind", ["sft", "kd", "kd_top_k"])
def test_uniform_head_gradient_equals_recompute(kind):
    """the forward-computed gradient (uniform token weights: SFT, KD token means) equals the
    recomputing backward's, for a weight shared by every token; unequal weights are refused."""
    hidden, weight, teacher_hidden, teacher_weight, labels = make_batch()
    def tok(uniform):
        if kind == "sft":
            return losses.token_logps(hidden, weight, labels, 4, temperature=1.5, uniform=uniform)
        return losses.kd_token_losses(hidden, weight, teacher_hidden, teacher_weight, labels,
                                      top_k=5 if kind == "kd_top_k" else 0, temperature=2.0, chunk_size=4,
                                      uniform=uniform)
    a, b = tok(True), tok(False)
    assert_same(a, b)
    for x, y in zip(grads(a.sum() * 0.37, hidden, weight), grads(b.sum() * 0.37, hidden, weight)):
        assert_same(x, y)
    with pytest.raises(AssertionError, match="unequal token weights"):
        (tok(True) * torch.rand(B, T)).sum().backward()

@pytest.mark.parametrize("top_k,uniform", [(0, True), (0, False), (5, True)])
def test_kd_teacher_entropy_stat(top_k, uniform):
    """forward KD's stats["teacher_entropy"] is -sum p_T log p_T over the labelled tokens (of the top-k
    renormalized teacher with top_k), computed plainly here; loss less it is KL(p_T || p_S) >= 0."""
    hidden, weight, teacher_hidden, teacher_weight, labels = make_batch()
    stats = {}
    tok = losses.kd_token_losses(hidden, weight, teacher_hidden, teacher_weight, labels, top_k=top_k, temperature=2.0,
                                 chunk_size=4, uniform=uniform, stats=stats)
    t = (teacher_hidden @ teacher_weight.t()) / 2.0
    if top_k:
        t = t.topk(top_k, dim=-1).values
    pt = torch.softmax(t, -1)
    want = (-(pt * pt.log()).sum(-1) * (labels != -100)).sum()
    torch.testing.assert_close(stats["teacher_entropy"].float(), want, atol=1e-4, rtol=1e-5)
    assert tok.sum().item() - stats["teacher_entropy"].item() > 0

def test_auto_chunk_size():
    # at least 128 tokens; small vocabularies get chunks of about 2^22 logits
    assert losses.auto_chunk_size(128256) == 128 and losses.auto_chunk_size(32000) == 131
    assert losses.auto_chunk_size(8192) == 512 and losses.auto_chunk_size(258) == 16256
    assert losses.auto_chunk_size(128256, "cuda") == 523  # 2^26 logits on a GPU

# -----------------------------------------------------------------------------
# KD

KD_CASES = [("forward", 0), ("forward", 5), ("reverse", 0), ("jsd", 0)]

@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("kind,top_k", KD_CASES)
def test_kd_matches_reference(kind, top_k, chunk_size):
    hidden, weight, teacher_hidden, teacher_weight, labels = make_batch()
    kw = dict(kind=kind, beta=0.3, top_k=top_k, temperature=2.0)
    tok = losses.kd_token_losses(hidden, weight, teacher_hidden, teacher_weight, labels, chunk_size=chunk_size, **kw)
    ref_tok = ref_kd(hidden, weight, teacher_hidden, teacher_weight, labels, **kw)
    assert_same(tok, ref_tok)
    out = losses.kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels, chunk_size=chunk_size, **kw)
    ref = ref_tok.sum() / N
    assert_same(out, ref)
    for a, b in zip(grads(out, hidden, weight), grads(ref, hidden, weight)):
        assert_same(a, b)

@pytest.mark.parametrize("kind,top_k", KD_CASES)
def test_kd_bf16_inputs_match_float32(kind, top_k):
    # bf16 student and teacher: loss in float32 and gradients (closed form for forward KD, through the
    # bf16 scratch buffer) match the float32 reference on the same bf16-rounded values
    hidden, weight, teacher_hidden, teacher_weight, labels = make_batch()
    h, w, th, tw = (x.detach().bfloat16().requires_grad_() for x in (hidden, weight, teacher_hidden, teacher_weight))
    ref_in = [x.detach().float().requires_grad_() for x in (h, w)]
    kw = dict(kind=kind, beta=0.3, top_k=top_k, temperature=2.0)
    out = losses.kd_loss(h, w, th, tw, labels, chunk_size=4, **kw)
    ref = ref_kd(*ref_in, th.float(), tw.float(), labels, **kw).sum() / N
    assert out.dtype == torch.float32
    assert_same(out, ref, atol=1e-4)  # bf16 logits are upcast before any softmax
    for a, b in zip(grads(out, h, w), grads(ref, *ref_in)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=0.02, rtol=0.05)

@pytest.mark.parametrize("kind,top_k", KD_CASES)
def test_kd_teacher_gets_no_gradient(kind, top_k):
    hidden, weight, teacher_hidden, teacher_weight, labels = make_batch()
    loss = losses.kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels, kind=kind, top_k=top_k, chunk_size=4)
    loss.backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None
    assert hidden.grad is not None and weight.grad is not None

def test_kd_identical_distributions():
    """Student == teacher: forward (cross-entropy) equals the entropy -sum p log p, computed here from
    full logits; reverse KL and JSD are exactly 0; top_k = V equals no top_k."""
    hidden, weight, _, _, labels = make_batch()
    args = (hidden, weight, hidden.detach().clone(), weight.detach().clone(), labels)
    p = F.softmax(hidden @ weight.T / 1.5, dim=-1)
    entropy = -(p * p.log()).sum(-1) * MASK
    forward = losses.kd_token_losses(*args, kind="forward", temperature=1.5, chunk_size=4)
    assert_same(forward, entropy)
    assert (losses.kd_token_losses(*args, kind="reverse", temperature=1.5, chunk_size=4) == 0).all()
    for beta in (0.1, 0.5, 0.9):
        assert (losses.kd_token_losses(*args, kind="jsd", beta=beta, temperature=1.5, chunk_size=4) == 0).all()
    top_all = losses.kd_token_losses(*args, kind="forward", top_k=V, temperature=1.5, chunk_size=4)
    assert_same(top_all, forward)

def test_kd_top_k_all_equals_full_on_different_teacher():
    hidden, weight, teacher_hidden, teacher_weight, labels = make_batch()
    full = losses.kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels, chunk_size=4)
    top_all = losses.kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels, top_k=V, chunk_size=4)
    assert_same(top_all, full)

def test_kd_bad_options():
    hidden, weight, teacher_hidden, teacher_weight, labels = make_batch()
    args = (hidden, weight, teacher_hidden, teacher_weight, labels)
    with pytest.raises(ValueError, match="forward"):
        losses.kd_loss(*args, kind="kl")
    with pytest.raises(ValueError, match="top_k"):
        losses.kd_loss(*args, kind="reverse", top_k=4)
    with pytest.raises(ValueError, match="beta"):
        losses.kd_loss(*args, kind="jsd", beta=1.0)

# -----------------------------------------------------------------------------
# DPO

def test_dpo_hand_derived():
    """h = beta * ((pc - pr) - (rc - rr)).
    Sigmoid, beta = 1, margins 0, 1, 2 -> h = 0, 1, 2: loss = log(1 + e^-h) = log 2, log(1 + e^-1),
    log(1 + e^-2) = 0.693147, 0.313262, 0.126928.
    Label smoothing eps = 0.1: -(0.9) logsig(h) - 0.1 logsig(-h) = log(1 + e^-h) + 0.1 h
    (since log(1 + e^h) = h + log(1 + e^-h)): 0.693147, 0.413262, 0.326928.
    IPO, beta = 0.1: (h/beta - 1/(2 beta))^2 = (margin - 5)^2: margins 2, 5, 7 -> 9, 0, 4.
    Rewards, beta = 0.5, pc = -3, rc = -5, pr = -6, rr = -4: chosen 0.5 * 2 = 1, rejected
    0.5 * (-2) = -1, so the pair counts as correct (chosen > rejected); swapped, it does not."""
    zero = torch.zeros(3)
    pc = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    losses_, _, _ = losses.dpo_loss(pc, zero, zero, zero, beta=1.0)
    assert_same(losses_, torch.tensor([math.log(2), math.log(1 + math.exp(-1)), math.log(1 + math.exp(-2))]))
    # the margin can sit anywhere among the four inputs
    losses_, _, _ = losses.dpo_loss(zero + 3, zero + 5, -torch.tensor([0.0, 1.0, 2.0]) - 2, zero, beta=1.0)
    assert_same(losses_, torch.tensor([math.log(2), math.log(1 + math.exp(-1)), math.log(1 + math.exp(-2))]))
    smooth, _, _ = losses.dpo_loss(pc, zero, zero, zero, beta=1.0, label_smoothing=0.1)
    assert_same(smooth, torch.tensor([0.693147, 0.413262, 0.326928]))
    ipo, _, _ = losses.dpo_loss(torch.tensor([2.0, 5.0, 7.0]), zero, zero, zero, beta=0.1, ipo=True)
    assert_same(ipo, torch.tensor([9.0, 0.0, 4.0]), atol=1e-4)
    # d loss / d pc at h = 0 is -sigmoid(-0) = -0.5 (beta = 1)
    assert_same(grads(losses.dpo_loss(pc, zero, zero, zero, beta=1.0)[0][0], pc)[0], torch.tensor([-0.5, 0.0, 0.0]))

def test_dpo_rewards():
    pc, rc = torch.tensor([-3.0], requires_grad=True), torch.tensor([-5.0])
    pr, rr = torch.tensor([-6.0], requires_grad=True), torch.tensor([-4.0])
    _, chosen, rejected = losses.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert_same(chosen, torch.tensor([1.0]))
    assert_same(rejected, torch.tensor([-1.0]))
    assert not chosen.requires_grad and not rejected.requires_grad
    assert (chosen > rejected).float().mean() == 1.0
    _, chosen, rejected = losses.dpo_loss(pr, pc, rr, rc, beta=0.5)
    assert (chosen > rejected).float().mean() == 0.0

# -----------------------------------------------------------------------------
# memory: the recomputed chunks never save [N, V] logits for backward

def saved_for_backward(fn):
    """(largest saved tensor numel, bytes of all distinct saved storages) while running fn()."""
    largest, storages = [0], {}
    def pack(t):
        largest[0] = max(largest[0], t.numel())
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return largest[0], sum(storages.values())

@pytest.mark.parametrize("kd", [False, True])
def test_chunked_backward_never_saves_full_logits(kd, monkeypatch):
    """Chunking alone keeps each saved tensor under [N, V]; recomputing the chunks in backward also
    keeps everything saved together under the bytes of one float32 [N, V] (plain autograd over the
    same chunks saves the per-chunk log-softmax outputs, N * V floats in all)."""
    g = torch.Generator().manual_seed(1)
    b, t, c, v, chunk = 4, 64, 8, 512, 16
    hidden = torch.randn(b, t, c, generator=g, requires_grad=True)
    weight = torch.randn(v, c, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :5] = -100
    n = int(losses.count_tokens(labels))
    if kd:
        teacher = (torch.randn(b, t, c, generator=g), torch.randn(v, c, generator=g))
        chunked = lambda: losses.kd_loss(hidden, weight, *teacher, labels, chunk_size=chunk)
        plain = lambda: ref_kd(hidden, weight, *teacher, labels, "forward").sum() / n
    else:
        chunked = lambda: losses.sft_loss(hidden, weight, labels, chunk_size=chunk)
        plain = lambda: -ref_token_logps(hidden, weight, labels).sum() / n
    assert saved_for_backward(plain)[0] >= n * v  # the hook does see full logits when they are saved
    largest, total_bytes = saved_for_backward(chunked)
    assert largest < n * v
    assert total_bytes < n * v * 4
    # control: the same chunks through plain autograd keep every [chunk, V] log-softmax for backward
    def plain_chunks(fn, cs, w, h, *rest):
        return torch.cat([fn(h[i:i + cs] @ w.t(), *[r[i:i + cs] for r in rest]) for i in range(0, h.shape[0], cs)])
    monkeypatch.setattr(losses._ChunkedHead, "apply", plain_chunks)
    monkeypatch.setattr(losses._ChunkedHeadUniform, "apply", plain_chunks)
    assert saved_for_backward(chunked)[1] >= n * v * 4

# -----------------------------------------------------------------------------
# gemma 2's final logit soft-cap

SOFTCAP_CASES = [("logps", 0, True), ("logps", 0, False), ("forward", 0, True), ("forward", 0, False),
                 ("forward", 5, True), ("forward", 5, False), ("reverse", 0, False), ("jsd", 0, False)]

@pytest.mark.parametrize("chunk_size", [4, 0])
@pytest.mark.parametrize("kind,top_k,uniform", SOFTCAP_CASES)
def test_final_softcap_matches_reference(kind, top_k, uniform, chunk_size):
    """cap * tanh(logits / cap) inside the chunked head, for the student and (KD) the teacher: values
    and gradients equal full capped logits through autograd on every gradient path: the forward-
    computed one (uniform: a token sum), the closed-form recompute (unequal token weights) and
    autograd (reverse KL, JSD)."""
    hidden, weight, teacher_hidden, teacher_weight, labels = make_batch()
    cap, teacher_cap = 1.5, 2.5  # this batch's logits reach about +-5: both caps bend them
    if kind == "logps":
        tok = losses.token_logps(hidden, weight, labels, chunk_size, 2.0, uniform=uniform, softcap=cap)
        ref_tok = ref_token_logps(hidden, weight, labels, 2.0, cap)
        uncapped = ref_token_logps(hidden, weight, labels, 2.0)
    else:
        kw = dict(kind=kind, beta=0.3, top_k=top_k, temperature=2.0)
        tok = losses.kd_token_losses(hidden, weight, teacher_hidden, teacher_weight, labels, chunk_size=chunk_size,
                                     uniform=uniform, softcap=cap, teacher_softcap=teacher_cap, **kw)
        ref_tok = ref_kd(hidden, weight, teacher_hidden, teacher_weight, labels, cap=cap, teacher_cap=teacher_cap, **kw)
        uncapped = ref_kd(hidden, weight, teacher_hidden, teacher_weight, labels, **kw)
    assert (ref_tok - uncapped).abs().max() > 0.05  # the cap changes the numbers
    assert_same(tok, ref_tok)
    w = torch.ones(B, T) if uniform else torch.rand(B, T, generator=torch.Generator().manual_seed(3))
    for a, b in zip(grads((tok * w).sum(), hidden, weight), grads((ref_tok * w).sum(), hidden, weight)):
        assert_same(a, b)
