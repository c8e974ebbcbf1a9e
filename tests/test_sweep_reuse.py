"""sweep.py, nothing silently wrong: a finished run is reused only under the config the sweep would
run now (the rest run again, saying which keys differ); inner runs wait for the corners' f*; Ctrl-C
reaches the child once and the sweep waits for its checkpoint; a killed sweep takes its child with
it; paths resolve against the caller's directory; bad sweep keys are one line naming the key.
Most cases use a stand-in for train.py (FAKE) that writes what train.py writes, so they take
seconds; one sweep of the real train.py checks that the saved configs are the ones compared."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from pytest import approx

from helpers import ROOT, TINY, refused

# train.py's stand-in: config.json from train.py itself (--print_config=True: the checked config,
# as a real run writes it), then a summary whose losses follow lambd and learning_rate. SWEEP_FAIL
# names runs that exit 1 before a checkpoint (and config.json); SWEEP_HANG runs that train until SIGINT / SIGTERM,
# then take SAVE_S seconds to write a checkpoint and exit 130, as train.py does.
FAKE = r'''
import json, os, signal, subprocess, sys, time
argv = sys.argv[2:]
args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
out = args["out_dir"]
name = os.path.basename(out)
with open(os.environ["SWEEP_LOG"], "a") as f:
    opt = {k: v for k, v in args.items() if k.startswith("obj_opt")}
    f.write(json.dumps([name, args.get("resume") == "True", opt]) + "\n")
os.makedirs(out, exist_ok=True)
if name in os.environ.get("SWEEP_FAIL", "").split(","):
    open(os.path.join(out, "metrics.jsonl"), "w").write("{}\n")
    sys.exit(1)
cfg = subprocess.run([sys.executable, sys.argv[1], *argv, "--print_config=True"], capture_output=True, text=True,
                     check=True)
config = json.loads(cfg.stdout.strip().splitlines()[-1])
json.dump(config, open(os.path.join(out, "config.json"), "w"))
if name in os.environ.get("SWEEP_HANG", "").split(","):
    got = []
    def stop(signum, frame):
        got.append(signum)
        with open(os.path.join(out, "signals"), "a") as f:
            f.write(f"{signum}\n")
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    open(os.path.join(out, "pid"), "w").write(str(os.getpid()))
    while not got:
        time.sleep(0.05)
    time.sleep(float(os.environ.get("SAVE_S", "1.0")))  # writing the checkpoint
    os.makedirs(os.path.join(out, "ckpt", "iter_0000003"))
    open(os.path.join(out, "saved"), "w").close()
    sys.exit(130)
K = sum(bool(config[f"obj_{i}"]) for i in range(1, 9))
w = config["lambd"] if isinstance(config["lambd"], list) else [config["lambd"], 1 - config["lambd"]]
f = {f"eval_loss_{i}": 1.0 + (1 - w[i - 1]) ** 2 + config["learning_rate"] for i in range(1, K + 1)}
json.dump(dict(f, iters=10, train_s=1.0, wall_s=2.0, tokens=5), open(os.path.join(out, "summary.json"), "w"))
'''

TOY = ["--obj_1=sft", "--obj_2=dpo", "--dataset_1=data/toy_sft.jsonl", "--dataset_2=data/toy_pref.jsonl",
       "--eval_split_1=data/toy_sft_eval.jsonl", "--eval_split_2=data/toy_pref_eval.jsonl", "--max_iters=10",
       "--learning_rate=0.01"]
THIRD = ["--obj_3=dpo", "--dataset_3=data/toy_calm.jsonl", "--eval_split_3=data/toy_calm_eval.jsonl"]

def sweep_cmd(tmp_path, *args):
    return [sys.executable, os.path.join(ROOT, "sweep.py"), f"--out_dir={tmp_path / 'sweep'}",
            f"--launcher={sys.executable} {tmp_path / 'fake_train.py'}", *args]  # later wins: args may replace them

@pytest.fixture(scope="module")
def corners(tmp_path_factory):
    """a finished K = 2 sweep of the stand-in with grid 2 (the two corners), copied by the tests."""
    tmp = tmp_path_factory.mktemp("corners")
    (tmp / "fake_train.py").write_text(FAKE)
    p = subprocess.run(sweep_cmd(tmp, *TOY, "--methods=alright", "--grid=2"), cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, SWEEP_LOG=str(tmp / "log.jsonl")), timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert [json.loads(l)[0] for l in open(tmp / "log.jsonl")] == ["single_1", "single_2"]
    return tmp / "sweep"

@pytest.fixture
def fake(tmp_path, corners):
    """runs sweep.py with the stand-in in tmp_path/sweep, which starts as a copy of `corners`;
    returns (run(*args, **env) -> CompletedProcess, launched() -> [[name, resumed, obj_opt args]]
    since the last call)."""
    (tmp_path / "fake_train.py").write_text(FAKE)
    shutil.copytree(corners, tmp_path / "sweep")
    log = tmp_path / "log.jsonl"

    def run(*args, **env):
        return subprocess.run(sweep_cmd(tmp_path, *args), cwd=ROOT, env=dict(os.environ, SWEEP_LOG=str(log), **env),
                              capture_output=True, text=True, timeout=120)

    def launched():
        rows = [json.loads(l) for l in open(log)] if log.exists() else []
        log.unlink(missing_ok=True)
        return rows
    return run, launched

def front(tmp_path):
    return {r["run"]: r["f"] for r in json.load(open(tmp_path / "sweep" / "front.json"))["rows"]}

# a finished run is reused only when its config.json is the config the sweep would run now
def test_changed_key_reruns_finished_runs_and_says_why(fake, tmp_path):
    run, launched = fake
    p = run(*TOY, "--methods=alright", "--grid=2")
    assert p.returncode == 0 and launched() == [] and p.stdout.count("reused") == 2  # the same config: reused
    p = run(*TOY, "--methods=alright", "--grid=2", "--learning_rate=1e-3", "--max_iters=20")
    assert p.returncode == 0, p.stderr[-2000:]
    assert [n for n, _, _ in launched()] == ["single_1", "single_2"]
    assert "learning_rate: 0.01 -> 0.001" in p.stdout and "max_iters: 10 -> 20" in p.stdout
    # the table holds the new runs' losses (the stand-in adds learning_rate to each), not the old ones
    assert front(tmp_path) == {"single_1": approx([1.001, 2.001]), "single_2": approx([2.001, 1.001])}

def test_third_objective_reruns_the_two_objective_corners(fake, tmp_path):
    """a K = 2 sweep reused after adding obj_3: its corners trained without objective 3 (and their
    summaries hold no eval_loss_3), so they run again; the table has K = 3 losses for every run."""
    run, launched = fake
    p = run(*TOY, *THIRD, "--methods=alright", "--grid=2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert [n for n, _, _ in launched()] == ["single_1", "single_2", "single_3"]
    assert "obj_3: '' -> 'dpo'" in p.stdout
    assert front(tmp_path)["single_1"] == approx([1.01, 2.01, 2.01]) and front(tmp_path)["single_3"] == approx(
        [2.01, 2.01, 1.01]
    )

def test_inner_runs_wait_for_the_corners_and_rerun_on_their_new_f_star(fake, tmp_path):
    """with a corner missing, no inner run trains on an estimated f*; one that did (written by an
    earlier sweep) runs again once the corner exists, with the corners' losses as obj_opt_i."""
    run, launched = fake
    shutil.rmtree(tmp_path / "sweep" / "single_2")
    p = run(*TOY, "--methods=maxright", "--grid=3", SWEEP_FAIL="single_2")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert [n for n, _, _ in launched()] == ["single_2"]  # maxright waits for f_2*
    assert "maxright_0.5_0.5 not run" in p.stdout and "single_2" in p.stdout.split("maxright_0.5_0.5")[-1]
    # a maxright run that estimated f* itself (what a sweep did while a corner was missing)
    inner = tmp_path / "sweep" / "maxright_0.5_0.5"
    subprocess.run([sys.executable, str(tmp_path / "fake_train.py"), os.path.join(ROOT, "train.py"), *TOY,
                    "--method=maxright", "--lambd=0.5,0.5", "--budget_1=-1.0", "--budget_2=-1.0", f"--out_dir={inner}"],
                   cwd=ROOT, env=dict(os.environ, SWEEP_LOG=str(tmp_path / "log.jsonl")), check=True)
    launched()
    p = run(*TOY, "--methods=maxright", "--grid=3")
    assert p.returncode == 0, p.stderr[-2000:]
    rows = launched()
    assert [n for n, _, _ in rows] == ["single_2", "maxright_0.5_0.5"]
    assert rows[1][2] == {"obj_opt_1": repr(1.01), "obj_opt_2": repr(1.01)}  # the corners' eval losses
    assert "obj_opt_1: None -> 1.01" in p.stdout
    assert json.load(open(inner / "config.json"))["obj_opt_2"] == 1.01

# Ctrl-C reaches the child once, the sweep waits for its checkpoint, and the rerun resumes it
@pytest.mark.parametrize("to", ["group", "sweep"])
def test_ctrl_c_waits_for_the_child_to_save(fake, tmp_path, to):
    """to='group': the terminal's Ctrl-C (SIGINT to the whole foreground process group); 'sweep':
    SIGINT to the sweep's pid alone. Either way the child gets one SIGINT, takes 1 s to save (past
    the 0.25 s after which subprocess.run would SIGKILL it), the sweep exits 130 without a
    traceback and starts no other run; the next sweep resumes that run."""
    run, launched = fake
    env = dict(os.environ, SWEEP_LOG=str(tmp_path / "log.jsonl"), SWEEP_HANG="alright_0.25_0.75")
    p = subprocess.Popen(sweep_cmd(tmp_path, *TOY, "--methods=alright", "--grid=0.25,0.5"), cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    run_dir = tmp_path / "sweep" / "alright_0.25_0.75"
    try:
        deadline = time.time() + 60
        while not (run_dir / "pid").exists() and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGINT) if to == "group" else os.kill(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert (run_dir / "saved").exists(), err[-2000:]
    assert (run_dir / "signals").read_text() == f"{int(signal.SIGINT)}\n"
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert [n for n, _, _ in launched()] == ["alright_0.25_0.75"]  # nothing started after the interrupt
    if to == "group":
        p = run(*TOY, "--methods=alright", "--grid=0.25")
        assert p.returncode == 0, p.stderr[-2000:]
        assert [(n, resumed) for n, resumed, _ in launched()] == [("alright_0.25_0.75", True)]

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"  # a zombie no parent reaped is dead too
    except FileNotFoundError:
        return False

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the death signal is Linux's prctl")
def test_killed_sweep_takes_its_child_with_it(fake, tmp_path):
    """kill -9 of the sweep: its child gets SIGTERM (train.py saves a checkpoint on it and exits)
    instead of training on as an orphan."""
    env = dict(os.environ, SWEEP_LOG=str(tmp_path / "log.jsonl"), SWEEP_HANG="alright_0.5_0.5", SAVE_S="0.2")
    p = subprocess.Popen(sweep_cmd(tmp_path, *TOY, "--methods=alright", "--grid=3"), cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = tmp_path / "sweep" / "alright_0.5_0.5"
    child = None
    try:
        deadline = time.time() + 60
        while not (run_dir / "pid").exists() and time.time() < deadline:
            time.sleep(0.05)
        child = int((run_dir / "pid").read_text())
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        deadline = time.time() + 10
        while alive(child) and time.time() < deadline:
            time.sleep(0.05)
        assert not alive(child)
        assert (run_dir / "signals").read_text() == f"{int(signal.SIGTERM)}\n" and (run_dir / "saved").exists()
    finally:
        if child and alive(child):
            os.kill(child, signal.SIGKILL)

# run from another directory: paths are the caller's, the results land there and count as finished
def test_sweep_from_another_directory_real_runs(tmp_path):
    """the real train.py, K = 2, grid 2 (the two corners, 2 steps each), started in a directory
    holding its own config file and data under relative paths: the runs read them, write under the
    caller's out_dir, and count as finished; the same command again reuses both (their config.json
    is what the sweep compares)."""
    os.makedirs(tmp_path / "mydata")
    for f in ("toy_sft.jsonl", "toy_sft_eval.jsonl", "toy_pref.jsonl", "toy_pref_eval.jsonl"):
        shutil.copy(os.path.join(ROOT, "data", f), tmp_path / "mydata")
    (tmp_path / "mycfg.py").write_text(
        'dataset_1 = "mydata/toy_sft.jsonl"\neval_split_1 = "mydata/toy_sft_eval.jsonl"\n'
    )
    tiny = [a for a in TINY if not a.startswith(("--dataset_1=", "--eval_split_1=", "--dataset_2=", "--eval_split_2="))]
    cmd = [sys.executable, os.path.join(ROOT, "sweep.py"), "mycfg.py", *tiny, "--dataset_2=mydata/toy_pref.jsonl",
           "--eval_split_2=mydata/toy_pref_eval.jsonl", "--methods=alright", "--grid=2", "--out_dir=out/sw",
           "--max_iters=2", "--train_batch_size=4", "--micro_train_batch_size=4", "--max_samples_1=16",
           "--max_samples_2=16"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    s = {n: json.load(open(tmp_path / "out" / "sw" / n / "summary.json")) for n in ("single_1", "single_2")}
    assert json.load(open(tmp_path / "out" / "sw" / "front.json"))["opt"] == [s["single_1"]["eval_loss_1"],
                                                                              s["single_2"]["eval_loss_2"]]
    assert json.load(open(tmp_path / "out" / "sw" / "single_1" / "config.json"))["dataset_1"] == "mydata/toy_sft.jsonl"
    assert not os.path.exists(os.path.join(ROOT, "out", "sw"))
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "train.py" not in p.stdout and p.stdout.count("reused") == 2, p.stdout[-2000:]

# bad sweep keys: one line naming the key, before any run starts
@pytest.mark.parametrize("arg, words", [("--grid=abc", ["--grid=abc"]), ("--grid=2.5", ["--grid=2.5", "integer"]),
                                        ("--grid=1", ["--grid=1", ">= 2"]),
                                        ("--grid=0.5,1.5", ["--grid", "1.5", "[0, 1]"]),
                                        ("--grid=200", ["--grid=200", "596 runs", "--max_runs"]),
                                        ("--grid=100000", ["--grid=100000", "299,996 runs"]),
                                        ("--launcher=", ["--launcher"]),
                                        ("--launcher=/nope/python", ["--launcher", "/nope/python"]),
                                        ("--out_dir=", ["--out_dir"]), ("--max_runs=0", ["--max_runs"]),
                                        ("--eval_frac=0", ["eval_split_1", "eval_frac"]),
                                        ("--overwrite=True", ["overwrite"])])
def test_bad_sweep_keys_are_refused(fake, arg, words):
    run, launched = fake
    extra = ["--eval_split_1="] if arg == "--eval_frac=0" else []
    p = run(*TOY, *extra, "--methods=sequential,alright,maxright", arg)
    refused(p, *words)
    assert launched() == []

def test_grid_as_a_list_of_weights(fake, tmp_path):
    run, launched = fake
    p = run(*TOY, "--methods=alright", "--grid=0.9,0.25:0.75")
    assert p.returncode == 0, p.stderr[-2000:]
    assert [n for n, _, _ in launched()] == ["alright_0.9_0.1", "alright_0.25_0.75"]
    assert front(tmp_path)["alright_0.9_0.1"] == approx([1.01 + 0.1 ** 2, 1.01 + 0.9 ** 2])
    assert front(tmp_path)["alright_0.25_0.75"] == approx([1.01 + 0.75 ** 2, 1.01 + 0.25 ** 2])

# pareto_front (train.py's early stop against a reference front) passes through a sweep: a missing
# file or a flat list is refused by the base config, naming the key, before any run
@pytest.mark.parametrize("content", [None, "[0.5, 0.3]"])
def test_sweep_refuses_a_bad_pareto_front(fake, tmp_path, content):
    run, launched = fake
    path = tmp_path / "front.json"
    if content is not None:
        path.write_text(content)
    refused(
        run(*TOY, "--methods=alright", "--grid=3", "--eps=0.1", f"--pareto_front={path}"), "pareto_front", "front.json"
    )
    assert launched() == []
