"""study.py --quick: the real-checkpoint study's pipeline (config/study_smollm2.py's runs, train.py
subprocesses) on a tiny random model and the toy data. Every number of its table is checked against
the runs' own files (summary.json, metrics.jsonl, eval_gen answers, config.json): f_1* and the start
from objective 1 alone, the gaps, objective 2's metric, the steps, the budget and f* the methods
were given; then a rerun reuses the finished runs and reruns a deleted one to the same numbers."""
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import ROOT, metrics, refused

METRIC = {"dpo": "eval_acc_2", "grpo": "eval_reward_2", "sft": "eval_nll_2"}

def study(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "study.py", "config/study_smollm2.py", "--quick", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)

def read(path):
    with open(path) as f:
        return json.load(f)

@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "q"
    p = study(f"--out_dir={out}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p

def test_table_is_the_runs_numbers(quick):
    out, p = quick
    st = read(out / "study.json")
    one = read(out / "obj1_alone" / "summary.json")
    opt1, start1 = one["eval_loss_1"], metrics(out / "obj1_alone", "eval")[0]["eval_loss_1"]
    assert (st["opt_1"], st["start_1"]) == (opt1, start1) and st["failed"] == []
    md = (out / "study.md").read_text()
    names = set()
    for conflict, t in st["conflicts"].items():
        f2 = read(out / conflict / "obj2_alone" / "summary.json")["eval_loss_2"]
        assert t["f_2_opt"] == f2
        for r in t["rows"]:
            d = out / conflict / r["run"]
            s, cfg = read(d / "summary.json"), read(d / "config.json")
            names.add(f"{conflict}/{r['run']}")
            assert r["f_1"] == s["eval_loss_1"] and r["eval_loss_2"] == s["eval_loss_2"]
            assert math.isclose(r["gap_1"], s["eval_loss_1"] - opt1, abs_tol=1e-12)
            assert math.isclose(r["drift_1"], s["eval_loss_1"] - start1, abs_tol=1e-12)
            assert r["metric_2"] == s.get(METRIC[conflict], s["eval_loss_2"])  # plain sft logs no eval_nll_2: its loss
            if conflict == "sft":
                assert r["extra_2"] == [s["gen_exact_match_2"]]
            if conflict == "dpo":  # the greedy answers that are the chosen one, counted here; the log-ratio margin
                pairs = {p["prompt"]: p["chosen"] for p in map(json.loads, open(f"{ROOT}/data/toy_pref_eval.jsonl"))}
                gens = [json.loads(l) for l in open(d / "eval_gen" / "iter_0000004_2.jsonl")]
                norm = lambda t: t.strip().rstrip(".").strip()  # a trailing period aside
                prompt = lambda g: g["prompt"].removeprefix("User: ").removesuffix("\nAssistant: ")
                said = [norm(g["output"]) == norm(pairs[prompt(g)]) for g in gens]
                margin = (s["eval_chosen_reward_2"] - s["eval_rejected_reward_2"]) / cfg.get("dpo_beta_2", 0.1)
                assert r["extra_2"][0] == sum(said) / len(said) and math.isclose(r["extra_2"][1], margin)
            steps = [s["counts"][str(i)] for i in (1, 2)]
            assert r["steps"] == steps and sum(steps) == (8 if r["method"] == "mix" else 4)
            cost = read(out / conflict / f"{r['run']}.json")
            assert (r["process_s"], r["cpu_s"]) == (cost["process_s"], cost["cpu_s"]) and r["cpu_s"] > 0
            answers = [json.loads(l) for l in open(d / "eval_gen" / "iter_0000004_1.jsonl")]
            assert math.isclose(r["answer_words"], sum(len(a["output"].split()) for a in answers) / len(answers))
            if r["method"] in ("single", "baseline"):  # objective 2 alone, objective 1 only evaluated
                assert steps == [0, 4] and cfg["method"] == "sequential" and cfg["lambd"] == [0.0, 1.0]
            if r["method"] in ("maxright", "constrained"):
                assert cfg["obj_opt_1"] == opt1
            if r["method"] == "maxright":  # f_2*: the single run's, or estimated where train.py refused it (< 0)
                assert cfg.get("obj_opt_2") == f2 or (f2 < 0 and any(conflict in n for n in st["notes"]))
            if r["method"] == "constrained":
                assert math.isclose(cfg["budget_1"], max(0.0, start1 + 0.1 - opt1), rel_tol=1e-12)
                assert r["budgets_held"] == s["budgets_held"] and r["budget_1"] == s["budget_1"]
            cells = (f"| {r['run']} | {steps[0]}/{steps[1]} | {r['f_1']:.3f} | {r['gap_1']:.3f} | {r['drift_1']:.3f} | "
                     f"{r['metric_2']:.3f} |")
            assert cells in md, cells
    assert names == {"dpo/obj2_alone", "dpo/dpo_beta=0.5", "dpo/dpo_beta=2", *(f"dpo/{m}" for m in
                     ("sequential", "mix", "alright", "maxright", "constrained")), "grpo/obj2_alone", "grpo/maxright",
                     "sft/obj2_alone", "sft/asft"}
    asft = read(out / "sft" / "asft" / "config.json")
    assert (asft["sft_loss_2"], asft["kl_anchor_2"]) == ("dft", 0.5)
    assert (out / "study.png").stat().st_size > 10_000
    assert not (out / "dpo" / "mix" / "ckpt").exists()  # keep_weights=False: checkpoints and merged weights removed
    assert not any(f.endswith(".safetensors") for f in os.listdir(out / "dpo" / "mix" / "final"))

def test_rerun_reuses_finished_runs_and_reruns_a_missing_one(quick):
    out, _ = quick
    before = read(out / "dpo" / "alright" / "summary.json")
    os.remove(out / "dpo" / "alright" / "summary.json")
    p = study(f"--out_dir={out}", "--runs=obj1_alone,dpo/alright")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"{out}/obj1_alone finished before with this config, reused" in p.stdout
    assert sum("study: " in l and "train.py" in l for l in p.stdout.splitlines()) == 1  # one train.py run: alright
    after = read(out / "dpo" / "alright" / "summary.json")
    assert all(after[k] == before[k] for k in ("eval_loss_1", "eval_loss_2", "counts", "eval_acc_2"))

def test_bad_key_is_one_line(tmp_path):
    p = study(f"--out_dir={tmp_path}", "--stepz=3")
    refused(p, "study: --stepz=3", "steps")
