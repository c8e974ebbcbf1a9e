"""One live run per out_dir. Two train.py runs into one out_dir, with and without --overwrite in
both orders and with kill -9 of either, never mix their metrics.jsonl lines and never delete a
live run's checkpoints; then the lock's rules one by one: a live holder is refused whatever the
flags, a dead one's lock (torn or whole) is taken over, a lock from another host needs
takeover_lock, and a run removes only a lock that is still its own."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import checkpoint
import configurator
from helpers import ROOT, TINY, refused, run_train

HOST = socket.gethostname()
SMALL = ["--train_batch_size=4", "--micro_train_batch_size=4"]
LONG = [*SMALL, "--max_iters=1000000", "--save_interval=5", "--keep_last=2"]  # runs until killed

def wait_for(cond, what, timeout=120):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.1)

def start(out, log, *args):
    """train.py in the background, its output unbuffered into the file log (a pipe nobody reads
    would fill and stop it), at a lower priority: the runs started against it get the CPU first."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "train.py", *TINY, *args, f"--out_dir={out}"], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(10))

def lines(out):
    """metrics.jsonl's lines; a last line cut by kill -9 is left out (as a resume drops it)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    raw = [l for l in open(path, "rb").read().split(b"\n") if l.strip()]
    got = []
    for j, l in enumerate(raw):
        try:
            got.append(json.loads(l))
        except ValueError:
            assert j == len(raw) - 1, f"line {j + 1} of {len(raw)} is not JSON: {l[:80]!r}"
    return got

def trained(out, lr):
    """the train lines so far, after checking that metrics.jsonl is one run's: its evaluation at
    iteration 0, then iterations 1, 2, 3, ... in order, every one at learning rate lr (each run
    here trains at a learning rate of its own, so a line of another run would show)."""
    got = lines(out)
    if not got:
        return 0
    train = [l for l in got if l["kind"] == "train"]
    assert [(l["kind"], l["iter"]) for l in got] == [("eval", 0)] + [("train", j) for j in range(1, len(train) + 1)], \
        [(l["kind"], l["iter"]) for l in got]
    assert {l["lr"] for l in train} <= {lr}, {l["lr"] for l in train}
    return len(train)

def checkpoints(out):
    root = os.path.join(out, "ckpt")
    return sorted(d for d in os.listdir(root) if d.startswith("iter_")) if os.path.isdir(root) else []

def holds(out, p):
    lock = os.path.join(out, ".lock")
    return os.path.exists(lock) and open(lock, "rb").read() == f"{HOST} {p.pid}\n".encode()

def refused_by(out, holder, *args):
    """a run (new or --overwrite=True) into the out_dir of the live run `holder`:
    one line naming its pid, recommending nothing that would take the live run's out_dir."""
    last = refused(run_train(out, *SMALL, "--max_iters=3", *args, check=False),
                   f"out_dir {out} is in use by process {holder.pid} on host {HOST}")
    assert "overwrite" not in last and "takeover" not in last and "delete" not in last, last
    assert holder.poll() is None and holds(out, holder)

def goes_on(out, holder, lr):
    """the live run keeps writing its own lines and checkpoints after the refusals."""
    n, kept = trained(out, lr), checkpoints(out)
    assert kept, "the live run's checkpoints are gone"
    wait_for(lambda: trained(out, lr) >= n + 10 and checkpoints(out) != kept, "the live run stopped writing")
    assert holder.poll() is None and holds(out, holder)

@pytest.mark.parametrize("first, second", [("", "--overwrite=True"), ("--overwrite=True", "")])
def test_two_runs_into_one_out_dir_never_mix(tmp_path, first, second):
    """run A (learning rate 3e-3) trains; B (learning rate 2e-3) is refused while A lives, and A
    goes on. After kill -9 of A: B with --overwrite=True clears A's outputs and trains; B without
    it is refused (A's outputs are there: resume or overwrite them), and a resume continues A's run
    from its last checkpoint (its lock torn by the crash). Then that run is the live one: the other
    flag is refused alike, and after its kill -9 a run with --overwrite=True replaces it and ends,
    leaving no lock. metrics.jsonl is one run's at every point."""
    out, flags = tmp_path / "run", {"": [], "--overwrite=True": ["--overwrite=True"]}
    procs = []
    try:
        a = start(out, tmp_path / "a.log", *flags[first], *LONG)
        procs.append(a)
        wait_for(lambda: holds(out, a) and trained(out, 3e-3) >= 6 and checkpoints(out), "run A wrote no checkpoint")
        refused_by(out, a, "--learning_rate=2e-3", *flags[second])
        goes_on(out, a, 3e-3)
        a.kill()
        a.wait()
        last = checkpoints(out)
        assert last and trained(out, 3e-3) > 0  # A's last checkpoint and lines outlive it
        if second:  # A is dead: its outputs may be replaced
            b, lr = start(out, tmp_path / "b.log", "--learning_rate=2e-3", *flags[second], *LONG), 2e-3
            procs.append(b)
            cleared = f"overwrite=True: removed the previous run's ckpt, metrics.jsonl from {out}"
            wait_for(lambda: cleared in (tmp_path / "b.log").read_text(), "run B did not clear A's run")
            wait_for(lambda: trained(out, lr) >= 6 and checkpoints(out), "run B wrote no checkpoint")
        else:
            refused(run_train(out, *SMALL, "--learning_rate=2e-3", "--max_iters=3", check=False),
                    f"out_dir {out} holds another run's ckpt, metrics.jsonl", "--resume=True", "--overwrite=True")
            assert checkpoints(out) == last
            with open(out / ".lock", "wb") as f:  # and A's lock torn by the crash
                f.write(b"\xff\xfe" + HOST.encode()[:3])
            b, lr = start(out, tmp_path / "b.log", "--resume=True", *LONG), 3e-3
            procs.append(b)
            n = trained(out, lr)
            wait_for(lambda: holds(out, b) and trained(out, lr) >= n + 10, "the resume of A did not go on")
        refused_by(out, b, "--learning_rate=1e-3", *flags[first])
        goes_on(out, b, lr)
        b.kill()
        b.wait()
        run_train(out, *SMALL, "--learning_rate=1e-3", "--max_iters=3", "--overwrite=True")
        got = lines(out)
        assert [(l["kind"], l["iter"]) for l in got] == [("eval", 0), *(("train", j) for j in (1, 2, 3)), ("eval", 3)]
        assert {l["lr"] for l in got if l["kind"] == "train"} == {1e-3}
        assert checkpoints(out) == ["iter_0000003"] and (out / "final").is_dir() and not (out / ".lock").exists()
    finally:
        for p in procs:
            p.kill()
            p.wait()

# -----------------------------------------------------------------------------
# the lock's rules, in process

def test_a_live_holder_is_never_taken_over(tmp_path, monkeypatch):
    """a lock whose flock is held (here by this process through another open file) is refused,
    takeover_lock or not, and the refusal recommends nothing that takes it; where the file system
    has no flock, a live pid on this host is refused alike."""
    lock = tmp_path / ".lock"
    first = checkpoint.hold(str(tmp_path))
    for takeover in (False, True):
        with pytest.raises(configurator.ConfigError) as e:
            checkpoint.hold(str(tmp_path), takeover)
        assert str(e.value) == (f"out_dir {tmp_path} is in use by process {os.getpid()} on host {HOST} ({lock}): "
                                f"wait for that run to end, or use another out_dir")
    assert lock.read_text() == f"{HOST} {os.getpid()}\n"
    first()
    assert not lock.exists()

    def no_flock(f, how):
        raise OSError(95, "Operation not supported")
    monkeypatch.setattr(checkpoint.fcntl, "flock", no_flock)
    lock.write_text(f"{HOST} {os.getpid()}\n")
    with pytest.raises(configurator.ConfigError, match=f"in use by process {os.getpid()} on host {HOST} .*out_dir$"):
        checkpoint.hold(str(tmp_path), True)
    assert lock.read_text() == f"{HOST} {os.getpid()}\n"

def test_a_lock_from_another_host_needs_takeover_lock(tmp_path):
    """whether a process on another host lives cannot be told from here: refused, naming the key
    that takes it once that run has ended; with takeover_lock=True the lock is taken (logged)."""
    lock, logged = tmp_path / ".lock", []
    lock.write_text("elsewhere 123\n")
    with pytest.raises(configurator.ConfigError) as e:
        checkpoint.hold(str(tmp_path))
    assert str(e.value) == (f"out_dir {tmp_path} is in use by process 123 on host elsewhere ({lock}), whose state "
                            f"cannot be checked from host {HOST}: wait for that run to end, or use another out_dir; "
                            f"once that run has ended, pass --takeover_lock=True to take its lock")
    assert lock.read_text() == "elsewhere 123\n"
    release = checkpoint.hold(str(tmp_path), True, log=logged.append)
    assert logged == [f"out_dir {tmp_path}: took over the lock of process 123 on elsewhere (takeover_lock=True)"]
    assert lock.read_text() == f"{HOST} {os.getpid()}\n"
    release()
    assert not lock.exists()

def test_a_run_removes_only_its_own_lock(tmp_path):
    """a run whose lock was taken meanwhile (rewritten in place by a run on another host given
    takeover_lock, or replaced by a new file) leaves it when it ends."""
    lock = tmp_path / ".lock"
    release = checkpoint.hold(str(tmp_path))
    with open(lock, "r+") as f:  # the same file, another holder's name
        f.write("elsewhere 77\n")
    release()
    assert lock.read_text() == "elsewhere 77\n"
    lock.unlink()
    release = checkpoint.hold(str(tmp_path))
    lock.unlink()
    lock.write_text(f"{HOST} {os.getpid()}\n")  # another file, naming this process
    release()
    assert lock.read_text() == f"{HOST} {os.getpid()}\n"

@pytest.mark.parametrize("torn", [b"\xff\xfe\x00", b"myhost 12\xe9", b"myhost", b"\x00\x00\x00\x00"])
def test_a_torn_lock_is_a_dead_holders(tmp_path, torn):
    """a lock whose bytes are not a "host pid" line (not UTF-8, cut short, zeros: a crash during
    its write) and whose flock nobody holds is its dead holder's: taken over with one line
    naming the file. Held by a live process, the same bytes are refused."""
    lock, logged = tmp_path / ".lock", []
    lock.write_bytes(torn)
    with open(lock, "rb") as held:
        checkpoint.fcntl.flock(held, checkpoint.fcntl.LOCK_EX | checkpoint.fcntl.LOCK_NB)
        with pytest.raises(configurator.ConfigError, match=r"in use by another process \(the lock does not name it"):
            checkpoint.hold(str(tmp_path))
    release = checkpoint.hold(str(tmp_path), log=logged.append)
    assert logged == [f"out_dir {tmp_path}: took over the unreadable lock {lock} ({torn[:40]!r}: not a 'host pid' "
                      f"line, torn when its run ended)"]
    assert lock.read_text() == f"{HOST} {os.getpid()}\n"
    release()
    assert not lock.exists()

def test_train_py_takes_a_lock_from_another_host_only_with_takeover_lock(tmp_path):
    """the key through train.py: refused naming it, then taken with it (a key a resume may change)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("elsewhere 123\n")
    last = refused(run_train(out, *SMALL, "--max_iters=2", check=False), "in use by process 123 on host elsewhere",
                   "--takeover_lock=True")
    assert "overwrite" not in last and (out / ".lock").read_text() == "elsewhere 123\n"
    p = run_train(out, *SMALL, "--max_iters=2", "--takeover_lock=True")
    assert f"out_dir {out}: took over the lock of process 123 on elsewhere (takeover_lock=True)" in p.stdout + p.stderr
    assert not (out / ".lock").exists() and (out / "final").is_dir()
    saved = json.loads((out / "config.json").read_text())
    assert checkpoint.config_changes(saved, {**saved, "takeover_lock": False}) == []

# -----------------------------------------------------------------------------
# a run holds its out_dir

def test_a_second_run_into_a_held_out_dir_is_refused(tmp_path):
    """run A trains; B into the same out_dir, new or resumed, is refused naming A's host, pid and
    lock file; A goes on, and removes its lock when it ends (here on Ctrl-C)."""
    out, host = tmp_path / "run", socket.gethostname()
    cmd = [sys.executable, "train.py", *TINY, *SMALL, "--max_iters=100000", f"--out_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    a = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / ".lock").exists() and (out / ".lock").read_text(), "run A took no lock")
        assert (out / ".lock").read_text() == f"{host} {a.pid}\n"
        # A is training (a Ctrl-C during its imports is the interpreter's, not the lock's, to handle)
        wait_for(lambda: (out / "metrics.jsonl").exists() and '"train"' in (out / "metrics.jsonl").read_text(),
                 "run A did not start training")
        refused(run_train(out, *SMALL, "--max_iters=4", "--resume=True", check=False),
                f"out_dir {out} is in use by process {a.pid} on host {host} ({out / '.lock'})")
        assert a.poll() is None
    finally:
        a.send_signal(signal.SIGINT)
        a.communicate(timeout=120)
    assert not (out / ".lock").exists()

def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    """kill -9 leaves the lock file; the kernel dropped its flock, so the next run on this host takes it."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, checkpoint; checkpoint.hold(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(configurator.ConfigError, match=f"in use by process {holder.pid}"):
        checkpoint.hold(str(tmp_path))
    holder.kill()
    holder.wait()
    logged = []
    release = checkpoint.hold(str(tmp_path), log=logged.append)
    assert logged == [f"out_dir {tmp_path}: took over the lock of process {holder.pid} on {socket.gethostname()} "
                      f"(no longer running)"]
    assert (tmp_path / ".lock").read_text() == f"{socket.gethostname()} {os.getpid()}\n"
    release()
    assert not (tmp_path / ".lock").exists()

def test_under_torchrun_rank_0_holds_the_lock_and_every_rank_stops(tmp_path):
    """2 ranks into a held out_dir: rank 0 finds the lock, the other rank stops with it at once
    (no collective left waiting out dist_timeout_s), and the holder's lock stays as it was."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, checkpoint; checkpoint.hold(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(120)", str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        t = time.time()
        p = run_train(tmp_path, *SMALL, "--micro_train_batch_size=2", "--obj_2=", "--max_iters=2",
                      "--dist_timeout_s=60", nproc=2, check=False)
        assert p.returncode != 0 and time.time() - t < 60
        assert f"error: out_dir {tmp_path} is in use by process {holder.pid} on host {socket.gethostname()}" in p.stderr
        assert 'train.py", line' not in p.stderr  # (torchrun's own traceback reports the failed ranks)
        assert (tmp_path / ".lock").read_text() == f"{socket.gethostname()} {holder.pid}\n"
        assert sorted(os.listdir(tmp_path)) == [".lock"]
    finally:
        holder.kill()
        holder.wait()

def test_a_refused_run_leaves_no_lock(tmp_path):
    """an error after the lock is taken (here a dataset that does not exist) ends with the one
    line, and the lock goes with it."""
    p = run_train(tmp_path, *SMALL, "--max_iters=1", "--dataset_1=/no/such/rows.jsonl", check=False)
    refused(p, "/no/such/rows.jsonl")
    assert not (tmp_path / ".lock").exists()

def test_lock_where_the_file_system_has_no_flock_goes_by_the_pid(tmp_path, monkeypatch):
    def no_flock(f, how):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(checkpoint.fcntl, "flock", no_flock)
    host, lock, logged = socket.gethostname(), tmp_path / ".lock", []
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{host} {sleeper.pid}\n")
        with pytest.raises(configurator.ConfigError, match=f"in use by process {sleeper.pid} on host {host}"):
            checkpoint.hold(str(tmp_path), log=logged.append)
    finally:
        sleeper.kill()
        sleeper.wait()
    release = checkpoint.hold(str(tmp_path), log=logged.append)  # its process is gone
    assert lock.read_text() == f"{host} {os.getpid()}\n"
    assert logged == [f"out_dir {tmp_path}: took over the lock of process {sleeper.pid} on {host} (no longer running)"]
    release()
    assert not lock.exists()
