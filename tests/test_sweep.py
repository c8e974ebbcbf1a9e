"""sweep.py: the grid, the front marking on hand-made sets, a restarted sweep that runs only what is
missing, and a real (tiny) sweep whose table agrees with its runs' summaries."""
import json
import os
import subprocess
import sys

import pytest

import sweep
from helpers import ROOT, TINY

def test_simplex_grid():
    assert sweep.simplex_grid(2, 5) == [(1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0)]
    g = sweep.simplex_grid(3, 5)
    assert len(g) == 15 and len(set(g)) == 15  # C(4 + 2, 2)
    assert all(abs(sum(w) - 1) < 1e-12 and all(4 * x == round(4 * x) for x in w) for w in g)
    runs = sweep.plan(3, 3, ["alright", "maxright"])  # 3 corners once, 3 inner points per method
    assert [r[0] for r in runs[:3]] == ["single_1", "single_2", "single_3"]
    assert sorted(r[2] for r in runs[3:6]) == [(0.0, 0.5, 0.5), (0.5, 0.0, 0.5), (0.5, 0.5, 0.0)] and len(runs) == 9

def test_pareto_mask_hand_made():
    # 2-D, minimized. c is dominated by b; f by everything to its lower left; g by a (same f_1,
    # larger f_2); b and its duplicate e dominate nothing of each other; d is the f_2 extreme
    pts = [(1, 5), (2, 3), (3, 3), (4, 1), (2, 3), (5, 5), (1, 6)]
    assert sweep.pareto_mask(pts) == [True, True, False, True, True, False, False]
    # 3-D: (2, 2, 2) is dominated by (1, 2, 2); (1, 1, 3) and (0, 5, 5) trade off against the rest
    pts = [(1, 1, 3), (1, 2, 2), (2, 2, 2), (0, 5, 5), (1, 2, 3)]
    assert sweep.pareto_mask(pts) == [True, True, False, True, False]
    assert sweep.pareto_mask([(1.0, 1.0)]) == [True]

FAKE = r'''
import json, os, subprocess, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[2:] if a.startswith("--"))
out = args["out_dir"]
name = os.path.basename(out)
with open(os.environ["SWEEP_LOG"], "a") as f:
    f.write(json.dumps([name, "resume" in args]) + "\n")
os.makedirs(out, exist_ok=True)
# config.json as train.py writes it before training (its checked config): a sweep reuses or resumes a run only under it
cfg = subprocess.run([sys.executable, sys.argv[1], *sys.argv[2:], "--print_config=True"], capture_output=True,
                     text=True, check=True)
open(os.path.join(out, "config.json"), "w").write(cfg.stdout.strip().splitlines()[-1])
if name in os.environ.get("SWEEP_FAIL", "").split(","):
    if name.startswith("alright"):  # died after a checkpoint
        os.makedirs(os.path.join(out, "ckpt", "iter_0000003"))
    else:                           # died before one
        open(os.path.join(out, "metrics.jsonl"), "w").write("{}\n")
    sys.exit(1)
w = [float(x) for x in args["lambd"].split(",")]
f = {f"eval_loss_{i}": 1.0 + (1 - x) ** 2 for i, x in enumerate(w, 1)}  # a convex front: every run on it
json.dump(dict(f, iters=10, train_s=1.0, wall_s=2.0, tokens=5), open(os.path.join(out, "summary.json"), "w"))
'''

def test_interrupted_sweep_runs_only_the_missing_runs(tmp_path):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE)
    log = tmp_path / "log.jsonl"
    out = tmp_path / "sweep"
    cmd = [sys.executable, "sweep.py", "config/demo.py", "--methods=sequential,alright", "--grid=3",
           f"--out_dir={out}", f"--launcher={sys.executable} {fake}", "--max_iters=10"]
    env = dict(os.environ, SWEEP_LOG=str(log), SWEEP_FAIL="sequential_0.5_0.5,alright_0.5_0.5")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    first = [json.loads(l) for l in open(log)]
    assert p.returncode == 1 and "2 run(s) failed" in p.stderr
    assert [n for n, _ in first] == ["single_1", "single_2", "sequential_0.5_0.5", "alright_0.5_0.5"]
    rows = json.load(open(out / "front.json"))["rows"]
    assert [r["run"] for r in rows] == ["single_1", "single_2"]
    log.unlink()
    env["SWEEP_FAIL"] = ""
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    # only the two that failed ran again: the one with a checkpoint resumed, the other from scratch
    assert [json.loads(l) for l in open(log)] == [["sequential_0.5_0.5", False], ["alright_0.5_0.5", True]]
    front = json.load(open(out / "front.json"))
    assert [r["run"] for r in front["rows"]] == ["single_1", "single_2", "sequential_0.5_0.5", "alright_0.5_0.5"]
    assert front["opt"] == [1.0, 1.0] and all(r["front"] for r in front["rows"])
    assert (out / "front.png").stat().st_size > 0 and "| single_1 | single |" in (out / "front.md").read_text()
    # a third call runs nothing
    log.unlink()
    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert not log.exists()

def test_real_sweep_table_matches_its_runs(tmp_path):
    """K = 2, grid 3, one method: 3 runs of train.py; f* = the corner runs' losses, every row's f_i
    its run's summary, gaps and ideal distance from them, and maxright got f* as obj_opt_i."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "sweep.py", *TINY, "--methods=maxright", "--grid=3", f"--out_dir={out}", "--max_iters=6",
           "--train_batch_size=4", "--micro_train_batch_size=4", "--max_samples_1=32", "--max_samples_2=32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    front = json.load(open(out / "front.json"))
    s = {n: json.load(open(out / n / "summary.json")) for n in ("single_1", "single_2", "maxright_0.5_0.5")}
    assert front["opt"] == [s["single_1"]["eval_loss_1"], s["single_2"]["eval_loss_2"]]
    assert s["single_1"]["counts"] == {"1": 6, "2": 0} and s["single_2"]["counts"] == {"1": 0, "2": 6}
    assert s["maxright_0.5_0.5"]["opt"] == {"1": front["opt"][0], "2": front["opt"][1]}  # not re-estimated
    for r in front["rows"]:
        f = [s[r["run"]]["eval_loss_1"], s[r["run"]]["eval_loss_2"]]
        gaps = [f[0] - front["opt"][0], f[1] - front["opt"][1]]
        assert (
            r["f"] == f
            and r["gaps"] == gaps
            and abs(r["ideal_distance"] - (gaps[0] ** 2 + gaps[1] ** 2) ** 0.5) < 1e-12
        )
        assert r["train_s"] == s[r["run"]]["train_s"]
    assert [r["front"] for r in front["rows"]] == sweep.pareto_mask([r["f"] for r in front["rows"]])
    assert (out / "front.png").exists()

def test_maxright_sweep_over_grpo_uses_negative_f_star(tmp_path):
    """SFT + GRPO: a GRPO objective's eval loss is minus its reward, so its f* is negative. The
    sweep finishes, and the inner MAXRIGHT run takes the corner's f* as given, not re-estimated."""
    out = tmp_path / "sweep"
    (tmp_path / "r.py").write_text("def score(prompts, completions, **_):\n"
                                   "    return [1.0 + len(c) / 100 for c in completions]  # > 0: f* < 0\n")
    cmd = [sys.executable, "sweep.py", *TINY, "--obj_2=grpo", "--dataset_2=data/toy_whisper.jsonl",
           "--eval_split_2=data/toy_whisper_eval.jsonl", f"--reward_fn_2={tmp_path / 'r.py'}:score",
           "--max_new_tokens_2=6", "--num_generations_2=2", "--eval_max_samples_2=4", "--methods=maxright", "--grid=3",
           f"--out_dir={out}", "--max_iters=4", "--train_batch_size=4", "--micro_train_batch_size=2",
           "--max_samples_1=32", "--max_samples_2=32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    front = json.load(open(out / "front.json"))
    inner = json.load(open(out / "maxright_0.5_0.5" / "summary.json"))
    assert front["opt"][1] < 0 and inner["opt"] == {"1": front["opt"][0], "2": front["opt"][1]}
    assert json.load(open(out / "maxright_0.5_0.5" / "config.json"))["obj_opt_2"] == front["opt"][1]
