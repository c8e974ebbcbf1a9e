"""A run's config: a resume that changes the run's length, config files that are not config files,
and every numeric key's range, each refused with one line that names the key (or the file) before
anything heavy is loaded."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

import checkpoint
import checks
import configurator
import methods
from helpers import ROOT, check_config, header, metrics, refused, run_train, train_defaults

SMALL = ["--train_batch_size=4", "--micro_train_batch_size=4"]

def train_config(**over):
    """train.py's defaults (its header run alone) for K = 2 (sft + dpo) with `over`, and its per-objective keys."""
    return train_defaults(
        **{"obj_2": "dpo", "dataset_1": "data/toy_sft.jsonl", "dataset_2": "data/toy_pref.jsonl", **over}
    )

def refusal(c, per_objective):
    with pytest.raises(configurator.ConfigError) as e:
        check_config(c, per_objective)
    return str(e.value)

# -----------------------------------------------------------------------------
# a resume that changes the run's length (max_iters / max_epochs)

def cosine_lr(j, T, lr=3e-3, floor=0.1):
    return lr * floor + 0.5 * (lr - lr * floor) * (1 + math.cos(math.pi * j / T))

RUN = [*SMALL, "--method=sequential", "--lr_scheduler=cosine"]

@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory):
    """sequential, cosine learning rate over 4 steps: objective 1, 1, 2, 2; checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("cosine") / "run"
    run_train(out, *RUN, "--max_iters=4", "--save_interval=2", "--keep_last=5")
    return out

def test_resume_longer_cosine_sequential_run_is_refused_unless_rescheduled(cosine_run, tmp_path):
    """resumed at 4 with max_iters=8: the 4 steps taken are not those of an 8-step run (the
    learning rate would jump from the floor back up; over 8 steps, step 3 is objective 1), so
    the run is refused; --reschedule=True goes on with the 8-step schedule, and its checkpoints
    then hold the new length."""
    import torch
    out = tmp_path / "run"
    shutil.copytree(cosine_run, out)
    assert [l["lr"] for l in metrics(out)] == pytest.approx([cosine_lr(j, 4) for j in range(4)], rel=1e-12)
    assert [l["obj"] for l in metrics(out)] == [1, 1, 2, 2]
    before = {f: (out / f).read_bytes() for f in ("metrics.jsonl", "config.json")}
    refused(run_train(out, *RUN, "--max_iters=8", "--resume=True", check=False),
            "from 4 to 8 steps", f"step 2: learning rate {cosine_lr(1, 4):.4g} -> {cosine_lr(1, 8):.4g}",
            "--reschedule=True")
    assert {f: (out / f).read_bytes() for f in before} == before
    p = run_train(out, *RUN, "--max_iters=8", "--save_interval=2", "--resume=True", "--reschedule=True")
    assert (
        f"from 4 to 8 steps at step 5 (step 5: learning rate {cosine_lr(4, 4):.4g} -> {cosine_lr(4, 8):.4g})"
        in p.stdout
    )
    lrs = [l["lr"] for l in metrics(out)]
    assert lrs == pytest.approx([cosine_lr(j, 4) for j in range(4)] + [cosine_lr(j, 8) for j in range(4, 8)], rel=1e-12)
    assert [l["obj"] for l in metrics(out)] == [1, 1, 2, 2, 2, 2, 2, 2]  # 8 steps: 1 for 4, then 2 for 4
    assert torch.load(out / "ckpt" / "iter_0000006" / "state.pt", weights_only=True)["total_iters"] == 8

def test_schedule_comparison_matches_a_straight_run():
    """check_total_iters lets a resume through exactly when the steps taken are those of a run of
    the new length: constant (same warm-up steps) yes; cosine, a changed warm-up, sequential no."""
    import runtime
    def at(sched, warmup=0.0, seq=False):
        return lambda j, T: (
            runtime.lr_at(j, T, 1.0, warmup, sched),
            methods.sequential_pick(j, [0.5, 0.5], T) if seq else 1,
        )
    checkpoint.check_total_iters(100, 100, 400, at("constant"))
    # no warm-up step either way (round(0.1), round(0.4))
    checkpoint.check_total_iters(100, 100, 400, at("constant", 0.001))
    for bad, first in ((at("cosine"), "step 2: learning rate 0.9998 -> 1"), (at("constant", 0.05), "step 1: learning "
                       # warm-up 5 steps, then 20
                       "rate 0.2 -> 0.05"), (at("constant", seq=True), "step 51: objective 2 -> 1")):
        with pytest.raises(configurator.ConfigError, match=f"from 100 to 400 steps.*{first}.*--reschedule=True"):
            checkpoint.check_total_iters(100, 100, 400, bad)
    checkpoint.check_total_iters(100, 100, 400, at("cosine"), reschedule=True, log=lambda *a: None)
    checkpoint.check_total_iters(0, 100, 400, at("cosine"))  # nothing taken yet

# -----------------------------------------------------------------------------
# config files and keys that used to end in a traceback (or ran a data file as Python)

@pytest.mark.parametrize("args,words", [
    (["--learning_rate=-1e-3"], ["config key learning_rate must be >= 0 (0 = no update), got -0.001"]),
    (["--adam_betas=(0.9,)"], ["config key adam_betas: two values", "(0.9,)"]),
    (["--method=maxright", "--eval_frac=0", "--eval_split_1=", "--eval_split_2="],
     ["method=maxright", "objective 1 has no eval set", "eval_frac", "eval_split_1", "obj_opt_1"]),
    (["--pareto_front=/no/such/front.json", "--eps=0.1"],
     ["config key pareto_front='/no/such/front.json'", "cannot read"]),
    (["data/toy_sft.jsonl"],
     ["data/toy_sft.jsonl is a data file", "config files are .py", "--dataset_1=data/toy_sft.jsonl"]),
])
def test_refused_before_anything_loads(tmp_path, args, words):
    p = run_train(tmp_path / "out", "--pretrain=/no/such/model", *args, check=False)
    refused(p, *words)
    assert not os.path.exists(tmp_path / "out")

def test_empty_out_dir_is_refused():
    refused(run_train("", check=False), "config key out_dir must name a directory")

def test_pareto_front_flat_or_wrong_width_or_without_eps(tmp_path):
    f = tmp_path / "front.json"
    c, po = train_config(pareto_front=str(f), eps=1e-4)
    for text, words in [("[5.0, 0.7]", "a flat list of numbers"), ("[]", "expected a JSON list of points"),
                        ("[[1.0, 2.0], [1.0]]", "point 1 is [1.0], expected 2 finite numbers"),
                        ("[[1.0, NaN]]", "point 0"), ("{\"a\": 1}", "expected a JSON list"), ("[[1, 2", "not JSON")]:
        f.write_text(text)
        msg = refusal(dict(c), po)
        assert msg.startswith(f"config key pareto_front={str(f)!r}") and words in msg, msg
    f.write_text("[[5.0, 0.7]]")
    assert "eps=0" in refusal(dict(c, eps=0.0), po)
    # sweep.py's front.json: its runs marked front
    f.write_text(json.dumps({"opt": [0, 0], "rows": [{"f": [1.0, 2.0], "front": True},
                                                     {"f": [3.0, 3.0], "front": False},
                                                     {"f": [2.0, 1.0], "front": True}]}))
    assert checks.pareto_points(str(f), 2) == [[1.0, 2.0], [2.0, 1.0]]
    check_config(dict(c), po)

def test_a_runs_config_json_reruns_its_config(cosine_run, tmp_path):
    """train.py RUN/config.json reads the run's resolved config (JSON), not Python (`true` was a NameError)."""
    saved = json.loads((cosine_run / "config.json").read_text())
    p = subprocess.run([sys.executable, "train.py", str(cosine_run / "config.json"), "--print_config=True"], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert dict(json.loads(p.stdout.strip().splitlines()[-1]), print_config=False) == saved

def test_config_files_that_are_not_configs(tmp_path):
    c, po = train_config()
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"input": "a", "output": "b"}]))
    with pytest.raises(
        configurator.ConfigError, match=f"{rows} holds JSON data \\(list\\), not a config.*--dataset_1="
    ):
        configurator.apply([str(rows)], c, verbose=False, per_objective=po)
    for name in ("rows.jsonl", "rows.parquet"):
        (tmp_path / name).write_text('{"input": "a", "output": "b"}\n')  # valid Python too: it used to run
        with pytest.raises(configurator.ConfigError, match=f"{tmp_path / name} is a data file, not a config file"):
            configurator.apply([str(tmp_path / name)], c, verbose=False, per_objective=po)
    with pytest.raises(configurator.ConfigError, match="is a directory"):
        configurator.apply([str(tmp_path)], c, verbose=False, per_objective=po)
    bad = tmp_path / "cfg.py"
    bad.write_text("max_iters = 10\nlearning_rate = base_lr * 2\n")
    with pytest.raises(configurator.ConfigError, match=f"{bad}, line 2: NameError: name 'base_lr' is not defined"):
        configurator.apply([str(bad)], c, verbose=False, per_objective=po)
    bad.write_text("max_iters = (10\n")
    with pytest.raises(configurator.ConfigError, match=f"{bad}, line 1: SyntaxError"):
        configurator.apply([str(bad)], c, verbose=False, per_objective=po)

@pytest.mark.parametrize("K", range(3, 9))
def test_lambd_suggestion_is_itself_accepted(K):
    with pytest.raises(configurator.ConfigError) as e:
        methods.weights(0.5, K)
    suggested = str(e.value).split("--lambd=")[1].split(")")[0]
    w = methods.weights(tuple(float(x) for x in suggested.split(",")), K)
    assert len(w) == K and max(w) - min(w) < 0.01

# -----------------------------------------------------------------------------
# every numeric key's range, named (in process: configurator.check is what train.py runs first)

INF, NAN = math.inf, math.nan
BAD = {  # out-of-range values of each numeric key of train.py (and the objectives' keys), by what the key means
    "log_interval": [0], "eval_interval": [-1], "eval_iters": [-1], "eval_gen_interval": [-2], "eval_gen_samples": [-1],
    "eval_gen_max_new_tokens": [0], "save_interval": [-1], "keep_last": [-1],
    "model_n_layer": [0], "model_n_head": [0], "model_n_kv_head": [0], "model_n_embd": [0],
    "model_intermediate_size": [0], "model_max_len": [0], "router_aux_loss": [-0.5, INF],
    "lora_rank": [-1], "lora_alpha": [0], "lora_dropout": [1.0, -0.1],
    "lambd": [1.5, -0.5, (0.5, 1.5)], "opt_estimate_iters": [-1], "maxright_interval": [0], "eps": [-0.1, INF],
    "loss_chunk_size": [-1], "dual_lr": [0.0, -0.1], "budget_margin": [1.0, -0.1], "max_settle_iters": [-2],
    "max_len": [0], "max_samples": [-1], "eval_max_samples": [-1], "obj_opt": [-0.5, INF], "budget": [-2.0, NAN],
    "dpo_beta": [0.0, -0.1, NAN], "dpo_label_smoothing": [0.5, -0.1], "dpo_nll_loss_coef": [-1.0],
    "simpo_gamma": [INF, NAN], "orpo_lambda": [-0.1], "kto_desirable_weight": [-1.0], "kto_undesirable_weight": [-1.0],
    "kd_beta": [1.5, -0.5], "kd_top_k": [-1], "kd_temperature": [0.0, -1.0],
    "max_new_tokens": [0], "temperature": [-0.5], "top_p": [0.0, 1.5], "top_k": [-1], "num_generations": [1],
    "grpo_epsilon": [0.0], "grpo_inner_steps": [0], "grpo_beta": [-0.1], "grpo_epsilon_high": [0.0, -0.5],
    "max_resample": [-1], "overlong_buffer": [-1], "kl_anchor": [-0.1, NAN],
    "eval_frac": [1.0, -0.1], "dataset_num_proc": [-1],
    "selector_learning_rate": [-0.1, INF], "aux_learning_rate": [-1e-3], "aux_steps": [0],
    "upperlevel_weight": [1.5, -0.1], "upperlevel_weight_decay": [-0.1], "select_ratio": [0.0, 1.5],
    "train_batch_size": [0], "micro_train_batch_size": [0], "learning_rate": [-1e-3, INF, NAN], "warmup_ratio": [1.5],
    "min_lr_ratio": [-0.1, 1.5], "weight_decay": [-0.1],
    "adam_betas": [(0.9, 1.0), (-0.1, 0.9), (0.9,), (0.9, 0.95, 0.99)], "max_norm": [-1.0],
    "max_epochs": [-1], "max_iters": [-1], "seed": [-1], "zero_stage": [4, -1], "dist_timeout_s": [0],
}

def numeric_keys():
    c, po = train_config()
    return (
        sorted(k for k, v in c.items() if isinstance(v, (int, float, tuple, type(None))) and not isinstance(v, bool)),
        po,
    )

def test_every_numeric_key_has_a_range_and_a_bad_value_here():
    keys, _ = numeric_keys()
    # not a string's choices
    ranged = {k for k, rule in checks.all_rules(header("train.py")["rules"]).items() if not rule.startswith("one of")}
    assert set(keys) == ranged, set(keys) ^ ranged
    assert set(keys) == set(BAD), set(keys) ^ set(BAD)

@pytest.mark.parametrize("key", sorted(BAD))
def test_each_bad_value_is_refused_naming_the_key(key):
    c, po = train_config()
    check_config(dict(c), po)  # the defaults pass
    for v in BAD[key]:
        msg = refusal(dict(c, **{key: v}), po)
        assert msg.startswith("config key") and key in msg, (key, v, msg)
        if key in po and not isinstance(v, tuple):  # KEY_2 alone: named as such
            msg = refusal(dict(c, **{f"{key}_2": v}), po)
            assert f"{key}_2" in msg, (key, v, msg)

@pytest.mark.parametrize("key,value", [("eval_gen_interval", -1), ("obj_opt", None), ("obj_opt", 0.0), ("budget", -1.0),
                                       ("max_samples", 0), ("max_settle_iters", -1), ("budget_margin", 0.0),
                                       ("grpo_epsilon_high", -1.0), ("overlong_buffer", 0), ("kl_anchor", 0.0),
                                       ("kd_beta", 0.0), ("lora_dropout", 0.0), ("warmup_ratio", 1.0),
                                       ("select_ratio", 1.0), ("upperlevel_weight", 0.0), ("eps", 0.0),
                                       ("max_norm", 0.0), ("simpo_gamma", -1.0), ("adam_betas", (0.0, 0.999)),
                                       ("zero_stage", 3), ("lambd", (0.0, 1.0)), ("learning_rate", 0.0),
                                       ("selector_learning_rate", 0.0)])
def test_edge_values_that_mean_something_pass(key, value):
    c, po = train_config(**{key: value})
    check_config(c, po)
