"""
selector.py against closed forms written out by hand (float64 loops, no autograd).

Batch entries k = 1..b carry the id p_k and the loss l_k; n = num_samples. With
L = (1/n) sum_k w_{p_k} l_k:
  softmax, w = N s, s = softmax(omega), ds_i/domega_j = s_i (delta_ij - s_j):
    dL/domega_j = (N/n) sum_k s_{p_k} (delta_{p_k j} - s_j) l_k = (N s_j / n) (c_j - S),
    c_j = sum_{k: p_k = j} l_k (0 for an id not in the batch), S = sum_k s_{p_k} l_k.
    An id outside the batch gets -(N s_j / n) S: negative whenever the losses are positive.
  sigmoid, w = 2 sigma(omega): dL/domega_j = (2/n) sigma_j (1 - sigma_j) c_j.
Adam's first step from zero state is -lr * g / (|g| + eps) per coordinate (both bias corrections
cancel), with exp_avg = 0.1 g and exp_avg_sq = 0.05 g^2.
"""
import io
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import selector as sel_mod  # noqa: E402
from selector import (Selector, decayed_weight, export_selected, memory_efficient_losses,  # noqa: E402
                      penalty_omega_loss, summary)

def random_selector(ids, activation="softmax", seed=0, scale=2.0):
    s = Selector(ids, activation)
    with torch.no_grad():
        s.logits.copy_(scale * torch.randn(len(ids), generator=torch.Generator().manual_seed(seed)))
    return s

def expected_grad(logits, activation, ids_pos, losses, n):
    om = [float(x) for x in logits]
    N = len(om)
    c = [0.0] * N
    for p, l in zip(ids_pos, losses):
        c[p] += l
    if activation == "softmax":
        m = max(om)
        z = sum(math.exp(x - m) for x in om)
        s = [math.exp(x - m) / z for x in om]
        S = sum(s[p] * l for p, l in zip(ids_pos, losses))
        return torch.tensor([N * s[j] / n * (c[j] - S) for j in range(N)], dtype=torch.float64)
    sig = [1 / (1 + math.exp(-x)) for x in om]
    return torch.tensor([2 / n * sig[j] * (1 - sig[j]) * c[j] for j in range(N)], dtype=torch.float64)

def close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=atol, rtol=1e-5)

# -----------------------------------------------------------------------------
# weights

def test_softmax_weights_average_one():
    s = Selector(range(37))
    assert s.logits.dtype == torch.float32 and s.logits.shape == (37,)
    assert abs(s.weights().mean().item() - 1) < 1e-6 and torch.allclose(s.weights(), torch.ones(37))
    s = random_selector(list(range(37)), scale=5.0)
    assert abs(s.weights().double().mean().item() - 1) < 1e-6
    full = s.weights()
    assert torch.equal(s.weights([5, 0, 36, 5]), full[[5, 0, 36, 5]])
    assert torch.equal(s.weights(torch.tensor([3, 4])), full[[3, 4]])

def test_sigmoid_weights_extremes_and_string_ids():
    ids = ["a:0", "a:1", "b:0", "b:7"]
    s = Selector(ids, "sigmoid")
    assert torch.allclose(s.weights(), torch.ones(4))
    with torch.no_grad():
        s.logits.copy_(torch.tensor([-50.0, 50.0, 3.0, -3.0]))
    w = s.weights()
    assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 2).all()
    assert 0 < w[0] < 1e-20 and w[1] == 2.0  # 2 sigma(50) rounds to 2 in float32
    assert 0 < w[3] < w[2] < 2
    w.sum().backward()
    assert torch.isfinite(s.logits.grad).all()
    assert torch.equal(s.weights(["b:7", "a:0"]), w.detach()[[3, 0]])
    assert s.positions(["b:0", "a:1"]).tolist() == [2, 1]

def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="softmax.*sigmoid"):
        Selector([0, 1], "tanh")
    with pytest.raises(KeyError, match="'x:9'"):
        Selector(["x:1", "x:2"]).positions(["x:1", "x:9"])
    with pytest.raises(ValueError, match="unique"):
        Selector([0, 1, 1])

# -----------------------------------------------------------------------------
# losses

@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_memory_efficient_losses_closed_form(activation):
    ids = [10, 11, 13, 14, 17, 19, 20]  # 12, 15, 16, 18 dropped before the selector was built
    s = random_selector(ids, activation, seed=1)
    batch = [14, 20, 10, 14]  # a repeated id (a padded sampler) counts twice
    losses = torch.tensor([2.0, 0.3, 1.1, 0.7], requires_grad=True)
    up = torch.tensor(1.7, requires_grad=True)
    rho, n = 0.3, 6
    lt, lo = memory_efficient_losses(s, batch, losses, up, rho, num_samples=n)
    (lt + lo).backward()
    pos = [ids.index(i) for i in batch]
    close(s.logits.grad, expected_grad(s.logits.detach(), activation, pos, losses.tolist(), n))
    w = s.weights(batch).detach()
    close(losses.grad, (1 - rho) * w / n)  # L_omega sees the losses detached
    close(up.grad, rho)
    close(lt.item(), rho * 1.7 + (1 - rho) * (w * losses.detach()).sum().item() / n)
    close(lo.item(), (w * losses.detach()).sum().item() / n)
    # num_samples=None normalizes by the batch's own length
    s.logits.grad = None
    memory_efficient_losses(s, batch, losses.detach(), up.detach(), rho)[1].backward()
    close(s.logits.grad, expected_grad(s.logits.detach(), activation, pos, losses.tolist(), len(batch)))

@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_penalty_omega_loss_closed_form(activation):
    ids = list(range(9))
    s = random_selector(ids, activation, seed=2)
    batch = [8, 2, 5]
    l_theta = torch.tensor([1.5, 0.4, 2.2], requires_grad=True)
    l_aux = torch.tensor([1.0, 0.9, 2.0], requires_grad=True)
    loss = penalty_omega_loss(s, batch, l_theta, l_aux, num_samples=4)
    g_th, g_aux = torch.autograd.grad(loss, [l_theta, l_aux], allow_unused=True, retain_graph=True)
    assert g_th is None and g_aux is None
    loss.backward()
    diff = (l_theta - l_aux).tolist()
    close(s.logits.grad, expected_grad(s.logits.detach(), activation, batch, diff, 4))

# -----------------------------------------------------------------------------
# the optimizer

def omega_step(s, opt, batch, losses, max_norm=10.0):
    _, lo = memory_efficient_losses(s, batch, torch.tensor(losses), torch.tensor(0.0), 0.5)
    lo.backward()
    return s.step(opt, max_norm)

def test_adam_step_direction():
    s = Selector(["a", "b", "c", "d"])
    with torch.no_grad():
        s.logits.copy_(torch.tensor([0.0, 0.0, 1.0, -1.0]))  # c and d: gradients 7x apart
    before = s.logits.detach().clone()
    lr = 0.01
    opt = s.make_optimizer(lr)
    g = expected_grad(before, "softmax", [0, 1], [3.0, 0.5], 2)
    assert g[0] > 0 and g[1] < 0 and g[2] < 0 and g[3] < 0 and g[2] / g[3] > 5
    omega_step(s, opt, ["a", "b"], [3.0, 0.5])
    delta = s.logits.detach() - before
    assert s.logits[0] < s.logits[1]  # the higher loss ends lower
    close(delta, [-lr, lr, lr, lr], atol=1e-6)  # not in the batch: both rise by lr, as documented
    assert s.logits.grad is None

def test_optimizer_settings():
    opt = Selector([1, 2]).make_optimizer(3e-4)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.Adam)
    assert group["lr"] == 3e-4 and group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8
    assert group["weight_decay"] == 0

def test_step_clips_and_matches_hand_adam():
    s = Selector(range(4))
    opt = s.make_optimizer(0.1)
    s.logits.grad = torch.tensor([3.0, 0.0, -4.0, 0.0])  # norm 5, clipped to 1
    norm = s.step(opt, max_norm=1.0)
    close(norm, 5.0)
    g = torch.tensor([0.6, 0.0, -0.8, 0.0])
    state = opt.state[s.logits]
    close(state["exp_avg"], 0.1 * g)
    close(state["exp_avg_sq"], 0.05 * g * g)
    close(s.logits.detach(), -0.1 * g / (g.abs() + 1e-8))
    assert s.logits.grad is None
    s.step(opt)  # no backward since: a zero gradient, momentum only
    close(opt.state[s.logits]["exp_avg"], 0.09 * g)

def test_step_averages_over_ranks(monkeypatch):
    other = torch.tensor([1.0, -2.0, 0.5])  # what the second rank holds
    monkeypatch.setattr(sel_mod.dist, "is_available", lambda: True)
    monkeypatch.setattr(sel_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sel_mod.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(sel_mod.dist, "all_reduce", lambda t, *a, **k: t.add_(other))
    s = Selector(range(3))
    opt = s.make_optimizer(0.1)
    s.logits.grad = torch.tensor([3.0, 1.0, -0.5])
    s.step(opt)
    close(opt.state[s.logits]["exp_avg"], 0.1 * torch.tensor([2.0, -0.5, 0.0]))

def test_state_dict_round_trip_restores_next_step():
    ids = [f"src:{i}" for i in range(6)]
    batches = [(["src:1", "src:4"], [1.3, 0.2]), (["src:0", "src:4", "src:5"], [0.9, 2.5, 0.4])]
    straight = random_selector(ids, seed=3)
    opt = straight.make_optimizer(0.05)
    for b, l in batches:
        omega_step(straight, opt, b, l)
    first = random_selector(ids, seed=3)
    opt = first.make_optimizer(0.05)
    omega_step(first, opt, *batches[0])
    buf = io.BytesIO()
    torch.save({"selector": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed, fresh = Selector(ids), Selector(ids)
    resumed.load_state_dict(ckpt["selector"])
    fresh.load_state_dict(ckpt["selector"])
    opt = resumed.make_optimizer(0.05)
    opt.load_state_dict(ckpt["opt"])
    omega_step(resumed, opt, *batches[1])
    assert torch.equal(resumed.logits, straight.logits)
    omega_step(fresh, fresh.make_optimizer(0.05), *batches[1])  # without the Adam state: another point
    assert not torch.allclose(fresh.logits, straight.logits)

def test_selection_state_round_trip_with_theta_hat():
    """selector.state_dict / load_state_dict (what train.py checkpoints for method=select): the
    logits, their Adam, theta-hat and its AdamW come back, so the next steps match a straight run."""
    import selector as sel
    def setup(seed):
        torch.manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
        return params, sel.make(["a", "b", "c"], "softmax", 0.05, "penalty", params, 0.01, (0.9, 0.95), "cpu")
    def step(params, s, so, aux, ao, k):
        omega_step(s, so, ["a", "c"], [1.0 + k, 0.5])
        with torch.no_grad():  # one theta-hat step, as train.py's swap / step / swap
            for p, q in zip(params, aux):
                p.data, q.data = q.data.clone(), p.data.clone()
        (params[0] ** 2).sum().mul(1 + k).backward()
        ao.step()
        ao.zero_grad()
        with torch.no_grad():
            for p, q in zip(params, aux):
                p.data, q.data = q.data.clone(), p.data.clone()
    params, (s, so, aux, ao) = setup(0)
    for k in range(3):
        step(params, s, so, aux, ao, k)
    params2, (s2, so2, aux2, ao2) = setup(0)
    step(params2, s2, so2, aux2, ao2, 0)
    buf = io.BytesIO()
    torch.save(sel.state_dict(s2, so2, aux2, ao2), buf)
    buf.seek(0)
    params3, (s3, so3, aux3, ao3) = setup(1)  # other initial values: everything must come from the state
    with torch.no_grad():
        params3[0].copy_(params2[0])
    sel.load_state_dict(torch.load(buf, weights_only=True), s3, so3, aux3, ao3)
    for k in (1, 2):
        step(params3, s3, so3, aux3, ao3, k)
    assert torch.equal(s3.logits, s.logits) and torch.equal(aux3[0], aux[0])
    with pytest.raises(ValueError, match="selector_algorithm"):
        sel.make(["a"], "softmax", 0.1, "exact", params, 0.01, (0.9, 0.95), "cpu")

def test_decayed_weight():
    assert [decayed_weight(0.5, 0.1, e) for e in range(4)] == pytest.approx([0.5, 0.4, 0.3, 0.2])
    assert decayed_weight(0.5, 0.1, 7) == 0.0 and decayed_weight(1.0, 0.03, 0) == 1.0
    assert decayed_weight(1.2, 0.0, 3) == 1.0
    assert decayed_weight(1.0, 0.03, 2) == pytest.approx(0.94)

# -----------------------------------------------------------------------------
# output

def test_ranked_ids_stable_ties():
    s = Selector(["a", "b", "c", "d", "e"])
    with torch.no_grad():
        s.logits.copy_(torch.tensor([1.0, 2.0, 1.0, 2.0, 0.0]))
    assert s.ranked_ids() == ["b", "d", "a", "c", "e"]

@pytest.mark.parametrize("ratio,k", [(0.5, 4), (0.3, 2), (0.01, 1), (1.0, 8)])
def test_export_selected(tmp_path, ratio, k):
    rows = [{"_id": i, "instruction": f"q{i} é", "output": {"text": [i, None]}} for i in range(10)]
    ids = [0, 1, 2, 4, 5, 6, 8, 9]  # rows 3 and 7 were dropped for length
    logits = [0.3, -1.0, 2.0, 0.1, 1.5, -0.2, 0.9, -2.0]
    s = Selector(ids)
    with torch.no_grad():
        s.logits.copy_(torch.tensor(logits))
    top = {ids[j] for j in sorted(range(8), key=lambda j: logits[j], reverse=True)[:k]}
    path = tmp_path / "selected.jsonl"
    assert export_selected(rows, s, ratio, str(path)) == k
    got = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert got == [{f: v for f, v in r.items() if f != "_id"} for r in rows if r["_id"] in top]
    assert os.listdir(tmp_path) == ["selected.jsonl"]

def test_save_jsonl(tmp_path):
    ids = [0, "src:3", 7, "other:0"]
    s = random_selector(ids, seed=4)
    path = tmp_path / "selector.jsonl"
    path.write_text("stale\n")
    s.save_jsonl(str(path))
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in recs] == ids and [type(r["id"]) for r in recs] == [int, str, int, str]
    logits = [r["logit"] for r in recs]
    close(logits, s.logits.detach())
    z = sum(math.exp(x) for x in logits)
    close([r["weight"] for r in recs], [4 * math.exp(x) / z for x in logits])
    assert os.listdir(tmp_path) == ["selector.jsonl"]

def test_summary(tmp_path):
    s = Selector(range(10))
    with torch.no_grad():
        s.logits.copy_(torch.arange(9, -1, -1, dtype=torch.float32) / 3)  # id 0 highest
    labels = {i: i in (2, 5, 8, 9) for i in range(10)}  # True = corrupted
    png = tmp_path / "weights.png"
    text = summary(s, png_path=str(png), labels=labels)
    bars = [line.split() for line in text.splitlines() if " .. " in line]
    assert len(bars) == 10 and sum(int(b[3]) for b in bars) == 10
    assert any(b[-1] == "#" * 40 for b in bars)  # the fullest bin draws the longest bar
    assert "clean fraction in kept top 70%: 0.7143 (5/7" in text  # ids 0..6, corrupted 2 and 5
    assert "clean fraction in kept top 80%: 0.7500 (6/8" in text
    w = s.weights().tolist()
    clean, bad = [w[i] for i in range(10) if not labels[i]], [w[i] for i in range(10) if labels[i]]
    assert f"mean weight: clean {sum(clean) / 6:.4f}, corrupted {sum(bad) / 4:.4f}" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    flat = summary(Selector(range(5)))  # at init every weight is 1: one full bin
    assert "clean fraction" not in flat and "mean 1.0000" in flat and " 5 " + "#" * 40 in flat
