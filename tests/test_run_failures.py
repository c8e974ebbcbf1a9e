"""Nothing silently wrong: stale caches, reused out_dirs, resumes under a changed config, planted
checkpoint files, corrupt metrics, full disks, ranks on different data, zero intervals, exploding
gradients, bad bytes. Each case runs train.py as users do (tiny model) and checks that it either
gives the right numbers or stops with one line that names what to fix."""
import builtins
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, metrics, refused, run_train, write_jsonl

BASE = ["--method=alright", "--train_batch_size=4", "--micro_train_batch_size=4", "--max_iters=6", "--save_interval=3",
        "--keep_last=5"]

@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """a finished 6-step run with checkpoints at steps 3 and 6 (copied by each test)."""
    out = tmp_path_factory.mktemp("base") / "run"
    run_train(out, *BASE)
    return out

def copy_of(base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"

def toy_rows(name, n):
    with open(os.path.join(ROOT, "data", name)) as f:
        return [json.loads(l) for l in f][:n]

# 1. the DPO reference cache is keyed on what it depends on
def test_reference_cache_follows_the_data_and_the_weights(tmp_path):
    """at step 1 the policy is the reference, so the DPO loss is -log sigmoid(0) = ln 2 exactly,
    unless the cached reference log-probs belong to other rows or other weights."""
    pref = tmp_path / "pref.jsonl"
    rows = toy_rows("toy_pref.jsonl", 32)
    write_jsonl(pref, rows)
    out = tmp_path / "run"
    args = ["--obj_1=dpo", "--obj_2=", f"--dataset_1={pref}", "--eval_split_1=data/toy_pref_eval.jsonl",
            "--max_iters=1", "--train_batch_size=8", "--micro_train_batch_size=8", "--precompute_ref=True",
            "--overwrite=True"]
    run_train(out, *args)
    assert abs(metrics(out)[0]["loss"] - math.log(2)) < 1e-5
    write_jsonl(pref, [dict(r, rejected=r["rejected"].lower() + " no") for r in rows])  # same ids, prompts, counts
    run_train(out, *args)
    assert abs(metrics(out)[0]["loss"] - math.log(2)) < 1e-5
    run_train(out, *args, "--seed=7")  # other initial weights, so another reference
    assert abs(metrics(out)[0]["loss"] - math.log(2)) < 1e-5
    assert len([f for f in os.listdir(out) if f.startswith("ref_logps_1_")]) == 3

# 2. a new run never mixes with another run's outputs
def test_new_run_refuses_an_out_dir_holding_another_run(base_run, tmp_path):
    out = copy_of(base_run, tmp_path)
    before = (out / "metrics.jsonl").read_bytes()
    refused(run_train(out, *BASE, check=False), str(out), "ckpt", "metrics.jsonl", "--resume=True", "--overwrite=True")
    assert (out / "metrics.jsonl").read_bytes() == before
    p = run_train(out, *BASE, "--overwrite=True", "--max_iters=2", "--save_interval=1", "--keep_last=1")
    assert "removed the previous run's ckpt, final, metrics.jsonl, summary.json" in p.stdout
    assert os.listdir(out / "ckpt") == ["iter_0000002"]  # the old run's iter_0000006 no longer outranks it
    assert [l["iter"] for l in metrics(out)] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["iters"] == 2
    assert json.loads((out / "config.json").read_text())["max_iters"] == 2
    refused(run_train(out, *BASE, "--resume=True", "--overwrite=True", check=False), "resume and overwrite")

# 3. a resume compares the config with the checkpoint's run
def test_resume_refuses_keys_that_change_a_step_and_takes_harmless_ones(base_run, tmp_path):
    out = copy_of(base_run, tmp_path)
    other = tmp_path / "other.jsonl"
    write_jsonl(other, toy_rows("toy_sft.jsonl", 96)[::-1])
    p = run_train(out, *BASE, "--resume=True", "--train_batch_size=8", "--obj_2=", f"--dataset_1={other}",
                  "--model_n_embd=64", check=False)
    refused(p, "train_batch_size: 4 -> 8", "obj_2: 'dpo' -> ''", f"dataset_1: 'data/toy_sft.jsonl' -> '{other}'",
            "model_n_embd: 32 -> 64")
    shutil.rmtree(out / "ckpt" / "iter_0000006")
    run_train(out, *BASE, "--resume=True", "--max_iters=8", "--eval_interval=4", "--log_interval=2")
    assert [l["iter"] for l in metrics(out)] == [1, 2, 3, 4, 6, 8]  # log_interval 1 up to the checkpoint at 3
    assert [l["iter"] for l in metrics(out, "eval")] == [0, 4, 8]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["max_iters"], saved["eval_interval"], saved["log_interval"]) == (8, 4, 2)

def test_checkpoint_of_another_model_shape_names_the_tensor(tmp_path):
    import checkpoint
    from configurator import ConfigError
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 6)
    checkpoint.save(str(tmp_path), 1, a, torch.optim.AdamW(a.parameters()), {"iter": 1})
    with pytest.raises(ConfigError, match=r"model.pt: weight has shape \(4, 4\), this model's is \(6, 4\)"):
        checkpoint.load(checkpoint.latest(str(tmp_path)), b, torch.optim.AdamW(b.parameters()))

# 4. checkpoints hold data, never code
class Planted:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)

def test_object_planted_in_a_checkpoint_is_refused(base_run, tmp_path):
    out = copy_of(base_run, tmp_path)
    marker = tmp_path / "it_ran"
    rng = out / "ckpt" / "iter_0000006" / "rng_0.pt"
    torch.save({"torch": Planted(f"touch {marker}"), "python": None, "cuda": None}, rng)
    p = run_train(out, *BASE, "--resume=True", "--max_iters=8", check=False)
    refused(p, str(rng), "refused to load")
    assert not marker.exists()

# 5. metrics.jsonl after a crash mid-write
def test_partial_last_metrics_line_is_dropped_and_a_corrupt_one_named(base_run, tmp_path):
    out = copy_of(base_run, tmp_path)
    shutil.rmtree(out / "ckpt" / "iter_0000006")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "iter": 7, "lo')  # the crash of a longer run
    n = len((out / "metrics.jsonl").read_text().splitlines())
    p = run_train(out, *BASE, "--resume=True")
    assert f"metrics.jsonl, line {n}: incomplete last line dropped" in p.stdout
    assert [l["iter"] for l in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert not os.path.exists(out / "metrics.jsonl.tmp")
    out2 = copy_of(base_run, tmp_path / "b")
    lines = (out2 / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]
    (out2 / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    refused(run_train(out2, *BASE, "--resume=True", check=False), f"{out2 / 'metrics.jsonl'}, line 3")

# 6. a full disk
def test_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import checkpoint
    m = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(m.parameters())
    checkpoint.save(str(tmp_path), 1, m, opt, {"iter": 1})
    full = lambda path, mode="r", *a, **k: builtins.open(
        "/dev/full" if path.endswith("optimizer.pt") else path, mode, *a, **k
    )
    monkeypatch.setattr(checkpoint, "open", full, raising=False)  # writes there fail with ENOSPC, as on a full disk
    with pytest.raises(OSError, match=r"tmp_iter_0000002/optimizer.pt: no space left on device .* "
                                      r"the previous checkpoint .*iter_0000001 is kept"):
        checkpoint.save(str(tmp_path), 2, m, opt, {"iter": 2})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001"]
    assert checkpoint.load(checkpoint.latest(str(tmp_path)), m, opt) == {"iter": 1}
    # train.py prints it as one line
    p = subprocess.run([sys.executable, "-c", "import configurator; configurator.one_line_errors(); "
                        "raise OSError(28, 'writing x/model.pt: no space left on device')"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr == "error: writing x/model.pt: no space left on device\n"

# 7. ranks on different data, and a rank that never arrives
def test_ranks_reading_different_rows_are_refused(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rows = toy_rows("toy_sft.jsonl", 24)
    write_jsonl(a, rows)
    write_jsonl(b, [dict(r, output=r["output"] + "!") for r in rows])  # same count and ids, other texts
    cfg = tmp_path / "per_rank.py"
    cfg.write_text(f"import os\ndataset_1 = {str(a)!r} if os.environ['RANK'] == '0' else {str(b)!r}\n")
    p = run_train(tmp_path / "run", str(cfg), "--obj_2=", "--max_iters=2", "--train_batch_size=4",
                  "--micro_train_batch_size=2", nproc=2, check=False)
    assert p.returncode != 0 and "error: objective 1 (dataset_1): rank(s) [1] read other rows than rank 0" in p.stderr

def test_process_group_timeout_is_the_config_key(tmp_path):
    cfg = tmp_path / "late.py"
    cfg.write_text("import os, time\nif os.environ['RANK'] == '1':\n    time.sleep(60)\n")
    p = run_train(tmp_path / "run", str(cfg), "--obj_2=", "--max_iters=2", "--train_batch_size=4",
                  "--micro_train_batch_size=2", "--dist_timeout_s=2", nproc=2, check=False)
    assert p.returncode != 0 and "timeout after 2000ms" in p.stderr

# 8. zero intervals and batch sizes
@pytest.mark.parametrize("arg", ["--log_interval=0", "--maxright_interval=0", "--micro_train_batch_size=0"])
def test_zero_interval_or_batch_is_named(tmp_path, arg):
    key = arg[2:].split("=")[0]
    refused(run_train(tmp_path, "--method=maxright", arg, check=False), f"config key {key} must be >= 1, got 0")

# 9. exploding gradients
def test_non_finite_gradient_norm_stops_before_the_update(tmp_path):
    """dpo_beta=1e38: the DPO loss is finite but its gradient overflows float32. Two SFT steps,
    then DPO: the stop names the checkpoint of step 2, whose weights are finite, and writes none."""
    args = ["--method=sequential", "--lambd=0.5", "--max_iters=4", "--save_interval=1", "--keep_last=5",
            "--dpo_beta=1e38", "--train_batch_size=4", "--micro_train_batch_size=4"]
    p = run_train(tmp_path / "a", *args, check=False)
    assert p.returncode != 0 and "non-finite gradient norm" in p.stderr and "at iteration 3" in p.stderr
    assert f"the last good checkpoint is {tmp_path / 'a' / 'ckpt' / 'iter_0000002'}" in p.stderr
    assert sorted(os.listdir(tmp_path / "a" / "ckpt")) == ["iter_0000001", "iter_0000002"]
    model = torch.load(tmp_path / "a" / "ckpt" / "iter_0000002" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in model.values())
    p = run_train(tmp_path / "b", "--obj_1=dpo", "--obj_2=", "--dataset_1=data/toy_pref.jsonl",
                  "--eval_split_1=data/toy_pref_eval.jsonl", *args[2:], "--save_interval=0", check=False)
    assert p.returncode != 0 and "at iteration 1" in p.stderr and "no checkpoint was written" in p.stderr
    assert not os.path.exists(tmp_path / "b" / "ckpt")

# 10. bad bytes, useless pairs, a missing GPU: one line each
def test_non_utf8_byte_is_named_by_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in toy_rows("toy_sft.jsonl", 20)).encode()
    lines = text.split(b"\n")
    lines[4] = lines[4][:12] + b"\xff" + lines[4][12:]
    bad.write_bytes(b"\n".join(lines))
    refused(run_train(tmp_path / "run", f"--dataset_1={bad}", "--obj_2=", check=False),
            f"{bad}, line 5: not UTF-8 (byte 0xff at column 13)")

def test_pair_with_chosen_equal_to_rejected_is_named(tmp_path):
    pref = tmp_path / "pref.jsonl"
    rows = toy_rows("toy_pref.jsonl", 20)
    rows[7]["rejected"] = rows[7]["chosen"]
    write_jsonl(pref, rows)
    refused(run_train(tmp_path / "run", f"--dataset_2={pref}", check=False),
            f"{pref} row 7: 'chosen' and 'rejected' are the same response")

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_named(tmp_path):
    refused(run_train(tmp_path, "--device=cuda", check=False), "config key device: 'cuda'", "--device=cpu")

# 11. durable checkpoints
def test_checkpoint_files_and_directories_are_fsynced(tmp_path, monkeypatch):
    import checkpoint
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    m = torch.nn.Linear(4, 4)
    checkpoint.save(str(tmp_path), 5, m, torch.optim.AdamW(m.parameters()), {"iter": 5})
    tmp = os.path.realpath(tmp_path / "tmp_iter_0000005")
    files = [os.path.join(tmp, f) for f in ("model.pt", "optimizer.pt", "state.pt", "rng_0.pt")]
    assert set(files) <= set(synced)
    # the files, then their directory, before the rename; the parent directory after it
    assert synced.index(tmp) > max(synced.index(f) for f in files) and synced[-1] == os.path.realpath(tmp_path)
