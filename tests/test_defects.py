"""Defects of the flagship recipes as users run them (hub checkpoints, real configs): each test
holds a number or a refusal that the code before the fix got wrong."""
import pytest

from helpers import metrics, refused, run_train

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
    kd = ["--obj_1=kd", "--obj_2=", "--max_iters=1", "--train_batch_size=4", "--micro_train_batch_size=2", f"--ref_model={ckpt}"]
    run_train(tmp_path / "self", f"--pretrain={ckpt}", *kd)
    first, ev0 = metrics(tmp_path / "self")[0], metrics(tmp_path / "self", "eval")[0]
    assert abs(first["kd_kl"]) < 1e-6 and abs(ev0["eval_kd_kl_1"]) < 1e-6
    assert first["loss"] > 1 and ev0["eval_loss_1"] > 1
    run_train(tmp_path / "fresh", *kd)
    ev = metrics(tmp_path / "fresh", "eval")[0]
    assert ev["eval_kd_kl_1"] > 0.01 and abs(ev["eval_kd_kl_1"] - (ev["eval_loss_1"] - ev0["eval_loss_1"])) < 1e-5
