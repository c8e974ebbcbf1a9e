"""The config files, the demo, and the loop's behaviour around objectives that need a second
model (KD teacher, DPO reference), interruption and bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import configurator
from helpers import ROOT, metrics, refused, run_train, script_defaults, tiny_hf, train_defaults, warm_run

def apply_config(path, cfg):
    """configurator.apply as train.py calls it: the KEY_i of its per-objective keys are known too."""
    configurator.apply([path], cfg, verbose=False, per_objective=train_defaults()[1])

@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "config")) if f.endswith(".py")))
def test_every_config_applies(name):
    if name.startswith("bench_"):  # presets of bench.py
        configurator.apply([os.path.join(ROOT, "config", name)], script_defaults("bench.py"), verbose=False)
        return
    if name.startswith("study_"):  # study.py's configs (tests/test_study.py runs one's --quick section)
        import study
        for quick in ([], ["--quick"]):
            study.load_config([os.path.join(ROOT, "config", name), *quick])
        return
    cfg = train_defaults()[0]
    apply_config(os.path.join(ROOT, "config", name), cfg)

def test_bench_preset_is_the_llama_1b_shape():
    """config/bench_llama1b.py: Llama-3.2-1B's shape, bf16 autocast, 4 x 1024 tokens."""
    cfg = script_defaults("bench.py")
    configurator.apply([os.path.join(ROOT, "config", "bench_llama1b.py")], cfg, verbose=False)
    want = dict(model_vocab_size=128256, model_n_layer=16, model_n_head=32, model_n_kv_head=8, model_n_embd=2048,
                model_intermediate_size=8192, dtype="bfloat16", batch_size=4, seq_len=1024, lora_rank=0)
    assert {k: cfg[k] for k in want} == want

def test_seed_recipes_are_faithful():
    """config/kd_sft.py and config/select.py carry the original tool's example commands."""
    kd = train_defaults()[0]
    apply_config(os.path.join(ROOT, "config/kd_sft.py"), kd)
    want = dict(pretrain="meta-llama/Meta-Llama-3-8B", ref_model="meta-llama/Meta-Llama-3-8B-Instruct", lora_rank=16,
                lora_alpha=16, target_modules="q_proj,v_proj", train_batch_size=32, micro_train_batch_size=1,
                learning_rate=1e-5, obj_1="kd", dataset_1="Open-Orca/OpenOrca", input_key="question",
                output_key="response", max_samples_1=6400, obj_2="sft", dataset_2="Open-Orca/OpenOrca",
                max_samples_2=6400, max_epochs=2, zero_stage=3, dtype="bfloat16", gradient_checkpointing=True)
    assert {k: kd[k] for k in want} == want
    sel = train_defaults()[0]
    apply_config(os.path.join(ROOT, "config/select.py"), sel)
    want = dict(method="select", pretrain="EleutherAI/pythia-1b", lora_rank=16, lora_alpha=16,
                target_modules="query_key_value", upperlevel_weight=0.5, train_batch_size=16, micro_train_batch_size=1,
                learning_rate=1e-5, obj_1="sft", dataset_1="Open-Orca/OpenOrca", input_key="question",
                output_key="response", max_samples_1=9600, obj_2="sft", dataset_2="yahma/alpaca-cleaned",
                selector_learning_rate=1e-4, selector_activation="softmax", max_samples_2=9600, max_epochs=3,
                zero_stage=2, dtype="bfloat16", gradient_checkpointing=True)
    assert {k: sel[k] for k in want} == want

def test_demo_quick(tmp_path, monkeypatch, capsys):
    """demo.main(quick=True) in this process, its train.py runs as warm_run's forks (as subprocesses
    where none serves): every number of its JSON, tables and plot from those runs."""
    import demo
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    monkeypatch.setattr(demo, "run", lambda cmd: warm_run(cmd, ROOT, env) or subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600))
    monkeypatch.chdir(ROOT)
    demo.main(quick=True)
    p = subprocess.CompletedProcess([], 0, capsys.readouterr().out, "")
    res = json.load(open(os.path.join(ROOT, "out/demo_quick/demo.json")))
    assert set(res["methods"]) == {
        "sequential",
        "mix",
        "alright",
        "maxright",
        "constrained_half",
        "constrained_quarter",
    }
    for row in res["methods"].values():
        assert abs(row["ideal_distance"] - (row["gap_1"] ** 2 + row["gap_2"] ** 2) ** 0.5) < 1e-9
    for name, frac in (("constrained_half", 0.5), ("constrained_quarter", 0.25)):  # budgets from ALRIGHT's SFT gap
        c = res["methods"][name]  # the summary's verdict is the final gap against the budget
        assert c["budget_1"] == round(frac * res["methods"]["alright"]["gap_1"], 4)
        assert c["budgets_held"] == (c["gap_1"] <= c["budget_1"]) and sum(c["steps"].values()) == 16 + c["settle_iters"]
    k3 = res["k3"]  # K = 3 beside it: three methods, the distance to (f_1*, f_2*, f_3*) over three gaps
    assert set(k3["methods"]) == {"sequential", "alright", "maxright"} and k3["opt"][:2] == res["opt"]
    for row in k3["methods"].values():
        assert abs(row["ideal_distance"] - sum((a - b) ** 2 for a, b in zip(row["f"], k3["opt"])) ** 0.5) < 1e-9
        assert sum(row["steps"].values()) == 16
    assert os.path.exists(os.path.join(ROOT, "out/demo_quick/pareto.png"))
    assert "ideal dist" in p.stdout and "selection: kept" in p.stdout
    assert set(res["behaviour"]) >= {"alright_simpo", "constrained_half"} and "alright_simpo" in p.stdout
    grpo = res["grpo"]  # the online objective beside SFT: both methods, the same step budget, the reward logged
    assert set(grpo) == {"sequential", "alright"} and all(sum(r["steps"].values()) == 16 for r in grpo.values())
    assert all(0 <= r["reward_2"] <= 2 for r in grpo.values()) and "online objective 2 (GRPO" in p.stdout
    md = open(os.path.join(ROOT, "out/demo_quick/tables.md")).read()  # the README's tables, from these numbers
    assert "commit " in md and f"| sequential | {res['methods']['sequential']['f_1']:.3f} |" in md

def test_kd_eval_loss_is_the_teacher_cross_entropy(tmp_path):
    """KD (forward, cross-entropy form) with teacher = a different tiny model: the logged eval loss
    at iteration 0 equals -sum_v p_T log p_S averaged over response tokens, computed here with
    transformers' own models and full logits."""
    import data as D
    student, teacher = tiny_hf(tmp_path / "student", 0), tiny_hf(tmp_path / "teacher", 1)
    run_train(tmp_path / "run", f"--pretrain={tmp_path / 'student'}", f"--ref_model={tmp_path / 'teacher'}",
              "--obj_1=kd", "--obj_2=", "--max_iters=2", "--eval_iters=1", "--train_batch_size=4",
              "--micro_train_batch_size=2")
    ev0 = metrics(tmp_path / "run", "eval")[0]
    from model import byte_tokenizer
    rows = D.load_rows(os.path.join(ROOT, "data/toy_sft_eval.jsonl"))[:4]
    total, n = 0.0, 0
    for e in D.tokenize_sft(rows, byte_tokenizer(), 40):
        ids = torch.tensor([e["input_ids"]])
        y = torch.tensor(e["labels"])
        with torch.no_grad():
            ls, lt = student(ids).logits[0].log_softmax(-1), teacher(ids).logits[0].log_softmax(-1)
        keep = y != -100
        total += -(lt[keep].exp() * ls[keep]).sum().item()
        n += int(keep.sum())
    assert abs(ev0["eval_loss_1"] - total / n) <= 1e-4

def test_precomputed_reference_gives_the_same_losses(tmp_path):
    args = ["--obj_1=dpo", "--dataset_1=data/toy_pref.jsonl", "--eval_split_1=data/toy_pref_eval.jsonl", "--obj_2=",
            "--max_iters=4", "--train_batch_size=4", "--micro_train_batch_size=2", "--dtype=float64"]
    run_train(tmp_path / "live", *args)
    run_train(tmp_path / "cached", *args, "--precompute_ref=True")
    a, b = metrics(tmp_path / "live"), metrics(tmp_path / "cached")
    assert [round(l["loss"], 10) for l in a] == [round(l["loss"], 10) for l in b]
    assert any(f.startswith("ref_logps_1_") for f in os.listdir(tmp_path / "cached"))

def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    from helpers import TINY
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", *TINY, "--max_iters=100000", "--train_batch_size=4",
           "--micro_train_batch_size=4", "--log_interval=1", f"--out_dir={out}"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(out / "metrics.jsonl") and len(metrics(out)) >= 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    ckpts = os.listdir(out / "ckpt")
    assert len(ckpts) == 1 and ckpts[0].startswith("iter_")
    stopped = int(ckpts[0][5:])
    assert stopped == metrics(out)[-1]["iter"]
    run_train(out, "--resume=True", f"--max_iters={stopped + 2}", "--train_batch_size=4", "--micro_train_batch_size=4")
    assert [l["iter"] for l in metrics(out)] == list(range(1, stopped + 3))

def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    p = run_train(tmp_path, "--learning_rate=1e12", "--max_iters=50", "--save_interval=1", "--keep_last=1",
                  "--train_batch_size=4", "--micro_train_batch_size=4", "--max_norm=0", check=False)
    assert p.returncode != 0 and "non-finite loss" in p.stderr and "at iteration" in p.stderr
    ckpts = [d for d in os.listdir(tmp_path / "ckpt")]
    assert len(ckpts) == 1 and ckpts[0].startswith("iter_")
    state = torch.load(tmp_path / "ckpt" / ckpts[0] / "state.pt", weights_only=False)
    model = torch.load(tmp_path / "ckpt" / ckpts[0] / "model.pt")
    assert all(torch.isfinite(v).all() for v in model.values()) and state["iter"] == int(ckpts[0][5:])

@pytest.mark.parametrize("arg,message", [
    ("--lamda=0.3", "unknown config key 'lamda' (did you mean 'lambd'?)"),
    ("--obj_2=ppo", "config key obj_2: 'ppo' is not one of sft, dpo, simpo, orpo, kto, kd"),
    ("--train_batch_size=6", "config key train_batch_size (6) must be a multiple"),
    ("--method=maxleft", "config key method: 'maxleft' is not one of"),
])
def test_bad_config_is_a_clear_error(tmp_path, arg, message):
    p = run_train(tmp_path, "--micro_train_batch_size=4", arg, check=False)
    assert p.returncode != 0 and message in p.stderr

def test_early_stop_on_gap_and_on_pareto_front(tmp_path):
    """eps > 0: stop at the first evaluation where a gap f_i - f_i* <= eps, or where the eval point
    weakly dominates (within eps) a point of the given reference front."""
    args = [
        "--method=alright",
        "--max_iters=40",
        "--eval_interval=5",
        "--train_batch_size=4",
        "--micro_train_batch_size=4",
    ]
    run_train(tmp_path / "gap", *args, "--obj_opt_1=0.0", "--obj_opt_2=0.68", "--eps=0.01")
    ev = metrics(tmp_path / "gap", "eval")
    stop = ev[-1]
    assert stop["iter"] < 40 and stop["eval_loss_2"] - 0.68 <= 0.01
    assert all(e["eval_loss_2"] - 0.68 > 0.01 and e["eval_loss_1"] > 0.01 for e in ev[:-1])
    front = tmp_path / "front.json"
    front.write_text(json.dumps([[5.0, 0.7]]))
    run_train(tmp_path / "front", *args, "--obj_opt_1=0.0", "--obj_opt_2=0.0", "--eps=1e-4", f"--pareto_front={front}")
    ev = metrics(tmp_path / "front", "eval")
    assert ev[-1]["iter"] < 40 and ev[-1]["eval_loss_1"] <= 5.0 + 1e-4 and ev[-1]["eval_loss_2"] <= 0.7 + 1e-4
    assert all(e["eval_loss_1"] > 5.0 + 1e-4 or e["eval_loss_2"] > 0.7 + 1e-4 for e in ev[:-1])

def test_bfloat16_autocast_path_matches_float32(tmp_path):
    """dtype=bfloat16 (autocast; LoRA base weights stored in bf16, adapters in float32) runs the
    same math as float32 within bf16 rounding. Slow matmuls on CPUs without bf16 units: tiny run."""
    tiny_hf(tmp_path / "base")
    args = [f"--pretrain={tmp_path / 'base'}", "--lora_rank=4", "--max_iters=3", "--train_batch_size=4",
            "--micro_train_batch_size=4", "--method=alright"]
    run_train(tmp_path / "f32", *args, "--dtype=float32")
    run_train(tmp_path / "bf16", *args, "--dtype=bfloat16")
    a, b = metrics(tmp_path / "f32"), metrics(tmp_path / "bf16")
    assert [l["obj"] for l in a] == [l["obj"] for l in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 0.02 * abs(x["loss"]) + 1e-3

def test_hub_ids_fail_clearly_offline(monkeypatch):
    """hub ids go through huggingface_hub / datasets; offline, the error names what was asked for."""
    import data as D
    from model import GPT
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="'nobody/no-such-model' is not a local directory"):
        GPT.from_pretrained("nobody/no-such-model")
    with pytest.raises(ValueError, match="nobody/no-such-dataset"):
        D.load_rows("nobody/no-such-dataset")

# -----------------------------------------------------------------------------
# the flagship recipes' defects, as users ran them: each a number or a refusal the code once got wrong

SELECT = ["config/demo_select.py", "--max_epochs=1", "--max_samples_1=32", "--max_samples_2=32"]

def test_select_refuses_packing(tmp_path):
    """the selector weighs one loss per document; a packed row holds several (a shape error, or a
    silent broadcast when everything packs into one row)."""
    refused(run_train(tmp_path, *SELECT, "--packing=True", check=False, base=[]), "method=select", "packing=True")

def test_float16_is_refused(tmp_path):
    """nothing scales the loss, so float16 gradients would underflow: refused, naming bfloat16."""
    refused(run_train(tmp_path, "--dtype=float16", "--max_iters=1", check=False), "float16", "loss scaling", "bfloat16")

def test_lambd_under_select_names_upperlevel_weight(tmp_path):
    """the original's --lambd set the upper-level weight; here that is upperlevel_weight, and lambd
    would do nothing."""
    refused(run_train(tmp_path, *SELECT, "--lambd=0.3", check=False, base=[]), "lambd=0.3", "upperlevel_weight")

@pytest.mark.parametrize("zero_stage", [0, 1])
def test_cpu_offload_needs_fsdp(tmp_path, zero_stage):
    refused(run_train(tmp_path, "--cpu_offload=True", f"--zero_stage={zero_stage}", "--max_iters=1", check=False),
            "cpu_offload", f"zero_stage={zero_stage}")

def test_early_stop_on_the_front_alone_and_not_for_sequential(tmp_path):
    """a front point (100, 100) is weakly dominated by any loss point at the first evaluation: the
    joint run stops there with no f* known; sequential (joint methods only) trains all its steps;
    a gap needs only its own f_i*."""
    (tmp_path / "front.json").write_text("[[100.0, 100.0]]")
    args = ["--train_batch_size=4", "--micro_train_batch_size=4", "--max_iters=3", "--eps=1e-4", "--eval_interval=1"]
    front = [f"--pareto_front={tmp_path / 'front.json'}"]
    run_train(tmp_path / "alright", *args, *front, "--method=alright")
    assert metrics(tmp_path / "alright") == [] and [l["iter"] for l in metrics(tmp_path / "alright", "eval")] == [0]
    run_train(tmp_path / "seq", *args, *front, "--method=sequential", "--obj_opt_1=100", "--obj_opt_2=100")
    assert [l["iter"] for l in metrics(tmp_path / "seq")] == [1, 2, 3]
    run_train(tmp_path / "gap", *args, "--method=alright", "--obj_opt_1=100")  # f_1 - f_1* < 0 <= eps
    assert metrics(tmp_path / "gap") == []

def test_selector_is_kept_after_each_epoch(tmp_path):
    """selector_epoch{e}.jsonl holds the weights after e epochs: epoch 1 of a 2-epoch run equals a
    1-epoch run's (constant learning rate), epoch 2 is the latest selector.jsonl."""
    args = [*SELECT, "--lr_scheduler=constant", "--train_batch_size=16", "--micro_train_batch_size=16"]
    run_train(tmp_path / "one", *args, "--max_epochs=1", base=[])
    run_train(tmp_path / "two", *args, "--max_epochs=2", base=[])
    read = lambda p: p.read_text().splitlines()
    assert read(tmp_path / "two" / "selector_epoch1.jsonl") == read(tmp_path / "one" / "selector.jsonl")
    assert read(tmp_path / "two" / "selector_epoch2.jsonl") == read(tmp_path / "two" / "selector.jsonl")
    assert read(tmp_path / "two" / "selector_epoch1.jsonl") != read(tmp_path / "two" / "selector.jsonl")

def test_final_has_generation_config_and_one_dtype_key(tmp_path):
    """final/ as transformers writes a model: generation_config.json with the byte tokenizer's eos
    (256) and pad (257), and config.json with the same dtype key as transformers' own save."""
    import json
    import transformers
    run_train(tmp_path, "--max_iters=1")
    final = tmp_path / "final"
    gen = transformers.GenerationConfig.from_pretrained(final)
    assert (gen.eos_token_id, gen.pad_token_id, gen.bos_token_id) == (256, 257, None)
    ours = json.loads((final / "config.json").read_text())
    transformers.AutoConfig.from_pretrained(final).save_pretrained(tmp_path / "theirs")
    theirs = json.loads((tmp_path / "theirs" / "config.json").read_text())
    keys = lambda d: {k for k in d if k in ("dtype", "torch_dtype")}
    assert keys(ours) == keys(theirs) and len(keys(ours)) == 1 and ours[keys(ours).pop()] == "float32"

def test_chat_template_notice(tmp_path):
    """a checkpoint whose tokenizer has a chat template, trained with the default input_template:
    one start-up line says so and names apply_chat_template_i; none where the template is used or
    for the byte tokenizer of a model built from scratch."""
    base = run_train(tmp_path / "base", "--max_iters=1")
    assert "chat template" not in base.stdout
    ckpt = [f"--pretrain={tmp_path / 'base' / 'final'}", "--max_iters=1"]
    p = run_train(tmp_path / "plain", *ckpt)
    assert [l for l in p.stdout.splitlines() if "chat template" in l] == [
        f"note: {tmp_path / 'base' / 'final'}'s tokenizer has a chat template; objective(s) [1, 2] format prompts with "
        "input_template 'User: {}\\nAssistant: ': set apply_chat_template_i=True to use the chat template"]
    p = run_train(tmp_path / "chat", *ckpt, "--apply_chat_template_1=True", "--input_template_2=Q: {} A: ")
    assert "chat template" not in p.stdout

def test_forward_kd_logs_the_kl(tmp_path):
    """the student starts as its teacher (the same checkpoint): KL(p_T || p_S) = 0, while the loss,
    the cross-entropy, is the teacher's entropy H(p_T). A fresh student of the same teacher:
    kd_kl = its cross-entropy less that H(p_T), on the same eval rows."""
    run_train(tmp_path / "base", "--max_iters=20")
    ckpt = tmp_path / "base" / "final"
    kd = [
        "--obj_1=kd",
        "--obj_2=",
        "--max_iters=1",
        "--train_batch_size=4",
        "--micro_train_batch_size=2",
        f"--ref_model={ckpt}",
    ]
    run_train(tmp_path / "self", f"--pretrain={ckpt}", *kd)
    first, ev0 = metrics(tmp_path / "self")[0], metrics(tmp_path / "self", "eval")[0]
    assert abs(first["kd_kl"]) < 1e-6 and abs(ev0["eval_kd_kl_1"]) < 1e-6
    assert first["loss"] > 1 and ev0["eval_loss_1"] > 1
    run_train(tmp_path / "fresh", *kd)
    ev = metrics(tmp_path / "fresh", "eval")[0]
    assert ev["eval_kd_kl_1"] > 0.01 and abs(ev["eval_kd_kl_1"] - (ev["eval_loss_1"] - ev0["eval_loss_1"])) < 1e-5
