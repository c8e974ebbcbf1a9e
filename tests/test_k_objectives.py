"""K objectives: the per-objective keys, lambd as K weights, each method's pick (methods.py) against
its definition, the same ALRIGHT draws as the two-objective rule, and a K = 3 run that resumes
bit-exactly."""
import math
import random

import pytest
import torch

import configurator
import methods
from helpers import metrics, resume_after_cut, run_train

# the third objective of the toy: prefer "RED FOX." over "RED FOX!" (data/make_toy.py)
K3 = ["--obj_3=dpo", "--dataset_3=data/toy_calm.jsonl", "--eval_split_3=data/toy_calm_eval.jsonl",
      "--max_samples_3=96", "--max_len_3=40"]

def test_k2_draws_are_the_two_objective_rule():
    # the rule before K objectives, `i = 1 if r.random() < lambd else 2` with random.Random(42),
    # lambd = 0.3: its first 20 draws, computed once and written down
    before = [2, 1, 1, 1, 2, 2, 2, 1, 2, 1, 1, 2, 1, 1, 2, 2, 1, 2, 2, 1]
    assert methods.alright_draws(42, methods.weights(0.3, 2), 20) == before
    assert methods.alright_draws(42, methods.weights((0.3, 0.7), 2), 20) == before
    r = random.Random(7)  # and for other weights and seeds, step by step
    for lambd in (0.0, 0.01, 0.5, 0.77, 1.0):
        a, b = random.Random(lambd), random.Random(lambd)
        assert all(
            methods.alright_pick(a, methods.weights(lambd, 2)) == (1 if b.random() < lambd else 2) for _ in range(500)
        )

def test_k2_run_draws_as_before(tmp_path):
    """the loop itself: a seed-42 ALRIGHT run with lambd = 0.3 trains the same objectives as before."""
    run_train(tmp_path, "--method=alright", "--lambd=0.3", "--max_iters=20", "--train_batch_size=4",
              "--micro_train_batch_size=4", "--max_samples_1=16", "--max_samples_2=16")
    assert [l["obj"] for l in metrics(tmp_path)] == [2, 1, 1, 1, 2, 2, 2, 1, 2, 1, 1, 2, 1, 1, 2, 2, 1, 2, 2, 1]

def test_categorical_draw_matches_lambd():
    """n draws: each count is Binomial(n, lambd_i), sd sqrt(n p (1 - p)); a 5-sd band fails by
    chance with probability < 6e-7 per objective (normal tail, n p(1-p) >= 1600 here). The draw
    is seeded, so the test is deterministic anyway; a uniform or a shifted draw misses by > 30 sd."""
    n = 40000
    for w in [(0.5, 0.3, 0.2), (0.1, 0.2, 0.3, 0.4), (0.6, 0.0, 0.4)]:
        draws = methods.alright_draws(123, w, n)
        for i, p in enumerate(w, 1):
            c = draws.count(i)
            if p == 0:
                assert c == 0
            else:
                assert abs(c - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (w, i, c)
    # one uniform per step: draw t is fixed by the t-th r.random() alone, whatever the weights
    u = random.Random(9)
    us = [u.random() for _ in range(200)]
    w = (0.2, 0.5, 0.3)
    want = [1 if x < 0.2 else 2 if x < 0.7 else 3 for x in us]
    assert methods.alright_draws(9, w, 200) == want

def test_sequential_rounds_to_exactly_T():
    assert methods.sequential_steps((0.25, 0.75), 8) == [2, 6]  # K = 2: round(lambd T), the rest
    for w, T in [((0.5, 0.3, 0.2), 12), ((1 / 3, 1 / 3, 1 / 3), 10), ((0.3, 0.3, 0.4), 5), ((0.0, 1.0, 0.0), 7),
                 ((0.1, 0.2, 0.3, 0.4), 33)]:
        n = methods.sequential_steps(w, T)
        assert sum(n) == T and all(abs(k - x * T) <= 1 for k, x in zip(n, w)), (w, T, n)
        picks = [methods.sequential_pick(it, w, T) for it in range(T)]
        assert picks == sorted(picks) and [picks.count(i) for i in range(1, len(w) + 1)] == n
    assert methods.sequential_steps((0.5, 0.3, 0.2), 12) == [6, 4, 2]  # 6, round(9.6) - 6, 12 - 10

def test_maxright_is_argmax_ties_to_lowest():
    assert methods.maxright_pick({1: 0.1, 2: 0.5, 3: 0.2}) == 2
    assert methods.maxright_pick({1: 0.3, 2: 0.3, 3: 0.3}) == 1
    assert methods.maxright_pick({1: -1.0, 2: 0.2, 3: 0.2}) == 2

def test_lambd_must_be_k_weights():
    assert methods.weights(0.3, 2) == (0.3, 0.7) and methods.weights(0.9, 1) == (1.0,)
    assert methods.weights((0.5, 0.3, 0.2), 3) == (0.5, 0.3, 0.2)
    for lambd, K in [(0.5, 3), ((0.5, 0.5), 3), ((0.5, 0.6, -0.1), 3), ((0.5, 0.3, 0.3), 3), (1.2, 2)]:
        with pytest.raises(configurator.ConfigError, match="config key lambd"):
            methods.weights(lambd, K)

def test_configurator_per_objective_keys_and_weights():
    table = {"dataset": "", "max_len": 512, "dpo_beta": 0.1}
    c = dict(table, lambd=0.5, learning_rate=1e-5)
    configurator.apply(["--dataset_3=x.jsonl", "--max_len_8=40", "--dpo_beta_2=1", "--lambd=0.5,0.3,0.2"], c,
                       verbose=False, per_objective=table)
    assert c["dataset_3"] == "x.jsonl" and c["max_len_8"] == 40 and c["dpo_beta_2"] == 1.0
    assert c["lambd"] == (0.5, 0.3, 0.2)
    c = dict(table, lambd=0.5)  # a file's K weights, then one number on the command line: both were lambd's
    configurator.apply(["--lambd=0.2,0.8", "--lambd=0.25"], c, verbose=False, per_objective=table)
    assert c["lambd"] == 0.25
    with pytest.raises(configurator.ConfigError, match=r"'max_len_3' expects int"):
        configurator.apply(["--max_len_3=4.5"], c, verbose=False, per_objective=table)
    for bad, near in [("datset_2", "dataset_2"), ("max_len_9", None), ("learning_rate_2", "learning_rate"),
                      ("max_len_0", None), ("max_len_02", None)]:
        with pytest.raises(configurator.ConfigError, match="unknown config key " + repr(bad)):
            configurator.apply([f"--{bad}=1"], c, verbose=False, per_objective=table)
    with pytest.raises(configurator.ConfigError, match="unknown config key 'datset_2' .did you mean 'dataset_2'"):
        configurator.apply(["--datset_2=1"], c, verbose=False, per_objective=table)

def test_config_file_sets_objective_keys(tmp_path):
    table = {"dataset": "", "max_len": 512}
    f = tmp_path / "k3.py"
    f.write_text("dataset_1 = 'a'\ndataset_3 = 'c'\nmax_len_1 = max_len_2 = 48\nlambd = (0.2, 0.3, 0.5)\n")
    c = dict(table, lambd=0.5)
    configurator.apply([str(f)], c, verbose=False, per_objective=table)
    assert (c["dataset_1"], c["dataset_3"], c["max_len_1"], c["max_len_2"], c["lambd"]) == (
        "a",
        "c",
        48,
        48,
        (0.2, 0.3, 0.5),
    )

def test_bad_k_configs_are_clear_errors(tmp_path):
    p = run_train(tmp_path / "a", *K3, "--lambd=0.5", "--max_iters=1", check=False)
    assert p.returncode != 0 and "config key lambd: 3 objectives need 3 weights" in p.stderr
    p = run_train(tmp_path / "b", "--obj_4=sft", "--max_iters=1", check=False)
    assert p.returncode != 0 and "obj_3 is not set" in p.stderr
    p = run_train(tmp_path / "c", "--obj_3=sft", "--lambd=0.4,0.4,0.2", "--max_iters=1", check=False)
    assert p.returncode != 0 and "dataset_3" in p.stderr
    p = run_train(tmp_path / "d", "--dpo_beta_2=0.1,0.2", "--max_iters=1", check=False)
    assert p.returncode != 0 and "config key dpo_beta_2: one number" in p.stderr

def losses(out):
    return [(l["iter"], l["obj"], l["loss"]) for l in metrics(out)]

@pytest.mark.parametrize("method", ["alright", "maxright"])
def test_k3_resume_is_bit_exact(tmp_path, method):
    """K = 3: 10 steps straight == 5 steps, stop, resume, 5 steps: the same objectives, losses,
    evaluations and final weights, bit for bit (the draws' generator and maxright's three gaps
    are in the checkpoint)."""
    from safetensors.torch import load_file
    args = [*K3, f"--method={method}", "--lambd=0.4,0.35,0.25", "--max_samples_1=36", "--max_samples_2=44",
            "--max_samples_3=28", "--train_batch_size=8", "--micro_train_batch_size=4", "--max_iters=10",
            "--save_interval=5", "--keep_last=5", "--opt_estimate_iters=2", "--maxright_interval=3",
            "--eval_interval=5"]
    straight = tmp_path / "straight"
    run_train(straight, *args)
    cut = tmp_path / "cut"
    resume_after_cut(straight, cut, args, "iter_0000010")
    a, b = losses(straight), losses(cut)
    assert a == b and {o for _, o, _ in a} == {1, 2, 3}
    strip = lambda ls: [{k: v for k, v in l.items() if k != "elapsed_s"} for l in ls]
    assert strip(metrics(straight, "eval")) == strip(metrics(cut, "eval"))
    assert all("gap_3" in l for l in metrics(straight, "eval")) == (method == "maxright")
    wa, wb = load_file(straight / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

def test_k3_toy_alright_and_maxright_beat_sequential(tmp_path):
    """Three conflicting objectives (SFT: "RED FOX"; DPO: "RED FOX!" over "RED FOX"; DPO: "RED FOX."
    over "RED FOX!"), lambd = 1/3 each, the same 40 steps: sequential ends on objective 3 and has
    forgotten the others, ALRIGHT and MAXRIGHT stay closer to the ideal point (f_1*, f_2*, f_3*),
    each f_i* being objective i trained alone for the same 40 steps."""
    import json
    args = [*K3, "--max_samples=64", "--max_samples_1=64", "--max_samples_2=64", "--max_samples_3=64",
            "--train_batch_size=8", "--micro_train_batch_size=8", "--max_iters=40"]
    summary = lambda d: json.load(open(d / "summary.json"))
    opt = []
    for i in (1, 2, 3):
        run_train(
            tmp_path / f"single_{i}",
            *args,
            "--method=sequential",
            "--lambd=" + ",".join("1" if j == i else "0" for j in (1, 2, 3)),
        )
        opt.append(summary(tmp_path / f"single_{i}")[f"eval_loss_{i}"])
    third = ",".join([repr(1 / 3)] * 2 + [repr(1 - 2 / 3)])
    dist = {}
    for m in ("sequential", "alright", "maxright"):
        run_train(
            tmp_path / m,
            *args,
            f"--method={m}",
            f"--lambd={third}",
            *(f"--obj_opt_{i}={v!r}" for i, v in enumerate(opt, 1)),
        )
        s = summary(tmp_path / m)
        gaps = [s[f"eval_loss_{i}"] - opt[i - 1] for i in (1, 2, 3)]
        assert abs(s["ideal_distance"] - math.sqrt(sum(g * g for g in gaps))) < 1e-9  # the distance over K = 3
        assert s["iters"] == 40 and sum(s["counts"].values()) == 40
        dist[m] = s["ideal_distance"]
    assert dist["alright"] < dist["sequential"] and dist["maxright"] < dist["sequential"], dist
