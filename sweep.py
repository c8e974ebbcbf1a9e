"""
The trade-off front in one command: a grid of methods x weights from one base config, each run
of train.py in its own out_dir, then a table and a plot of what they reached.

    python sweep.py config/demo.py --methods=sequential,alright,maxright --grid=5 --out_dir=out/sweep
    python sweep.py config/kd_sft.py --grid=3 --launcher="torchrun --nproc_per_node=8"
    python sweep.py config/demo.py --methods=alright --grid=0.1,0.3,0.5   # lambd_1 of each point (K = 2)

grid = points per edge of the weight simplex (5: lambd in {0, .25, .5, .75, 1} for K = 2), or a
list of points: lambd_1 values for K = 2, or K weights joined by ':' (0.5:0.3:0.2). A sweep of more
than max_runs (100) runs is refused. The corners (one objective alone) run once, as
method=sequential with lambd = e_i, before any other: they give f_i*, which every other run gets
as obj_opt_i (maxright needs it); a run whose corners did not finish waits for the next sweep. The
other points run once per method. Any other --key=value (and config file) passes through to every
run (lambd is each run's own: no --lambd is needed for K >= 3). The runs start in the directory
sweep.py is started in, so relative paths (config files, data, out_dir) mean what they mean to
train.py there.

Resumable: a run whose summary.json exists is reused only if its config.json is the config this
sweep would run now (else it runs again, and the sweep prints the keys that differ); a run that
stopped after writing a checkpoint under that config resumes (--resume=True); any other starts
again (--overwrite=True). A failed run is reported and the others still run; the table covers the
finished ones. Ctrl-C (or SIGTERM) is passed to the running child once, and the sweep waits for it
to save its checkpoint and exit; the child gets SIGTERM when the sweep dies, even by kill -9.

Writes out_dir/front.md and front.json (every run: weights, f_i, gaps, ideal distance, whether it
is on the front, cost) and front.png (f_1 vs f_2; for K >= 3 every pairwise projection).
"""
import ctypes
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys

import configurator

ROOT = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(ROOT, "train.py")
METHODS = ("sequential", "mix", "alright", "maxright", "constrained")
MARKERS = {"single": "*", "sequential": "s", "mix": "D", "alright": "o", "maxright": "^", "constrained": "v"}
MAX_RUNS = 100
# keys that change neither a run's numbers nor its summary: a finished run is compared without them
BOOKKEEPING = {"out_dir", "resume", "overwrite", "print_config", "log_interval", "save_interval", "keep_last",
               "wandb_log", "wandb_project", "wandb_run_name", "tensorboard", "dist_timeout_s", "dataset_num_proc",
               "takeover_lock"}

def base_config(args):
    """train.py's config after the config files and overrides in `args`, checked by train.py itself
    (`--print_config=True`: nothing is loaded or trained). A bad key is train.py's one-line error.
    lambd is each run's own: the base is checked with K equal weights, for K = 2, 3, ... until
    the count matches the objectives the config sets."""
    for K in range(2, configurator.MAX_OBJECTIVES + 1):
        lambd = ",".join([repr(1 / K)] * K)
        p = subprocess.run(
            [sys.executable, TRAIN, *args, f"--lambd={lambd}", "--print_config=True"], capture_output=True, text=True
        )
        err = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        if p.returncode == 0 or "config key lambd" not in err:
            break
    if p.returncode != 0:
        raise configurator.ConfigError(f"sweep: the base config: {err.removeprefix('error: ')}")
    return json.loads(p.stdout.strip().splitlines()[-1])

def simplex_grid(K, n):
    """every lambd on the simplex with coordinates in {0, 1/(n-1), ..., 1}, as tuples of floats."""
    m = n - 1
    pts = [c for c in itertools.product(range(m + 1), repeat=K) if sum(c) == m]
    return [tuple(x / m for x in c) for c in sorted(pts, reverse=True)]

def read_grid(text):
    """--grid as a count of points per edge (an int >= 2) or a list of points (lists of weights in
    [0, 1]); what needs K (lengths, sums) is checked by grid_points."""
    bad = lambda why: configurator.ConfigError(f"sweep: --grid={text}: {why}")
    if text.strip().isdigit():
        if int(text) < 2:
            raise bad("the points per edge must be an integer >= 2 (2: the corners alone)")
        return int(text)
    points = []
    for p in text.split(","):
        try:
            w = [float(x) for x in p.split(":")]
        except ValueError:
            raise bad(f"{p!r} is not a number: give the points per edge (an integer >= 2, e.g. 5) or a list of "
                      f"points (lambd_1 values for 2 objectives, e.g. 0.25,0.5,0.75; "
                      f"or K weights joined by ':')") from None
        for x in w:
            if not 0 <= x <= 1:  # nan too
                raise bad(
                    f"the weight {x!r} is not in [0, 1]"
                    + (" (the points per edge are an integer >= 2)" if x > 1 else "")
                )
        points.append(w)
    return points

def grid_points(grid, K):
    """the points of a read_grid value for K objectives, as tuples of K weights."""
    if isinstance(grid, int):
        return simplex_grid(K, grid)
    points = []
    for w in grid:
        w = [w[0], 1.0 - w[0]] if K == 2 and len(w) == 1 else w
        if len(w) != K or abs(sum(w) - 1) > 1e-6:
            raise configurator.ConfigError(f"sweep: --grid: the point {':'.join(map(repr, w))} needs {K} weights "
                                           f"summing to 1, joined by ':' (one per objective)")
        points.append(tuple(w))
    return points

def pareto_mask(points):
    """True for each point that no other point dominates (<= in every coordinate, < in one); all
    coordinates are minimized. Equal points do not dominate each other."""
    dom = lambda q, p: all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
    return [not any(dom(q, p) for q in points) for p in points]

def fmt(w):
    return "_".join(f"{x:.3g}" for x in w)

def plan(K, n, methods):
    """[(name, method, lambd)]: the K corners first (single), then methods x the other points of
    the grid (n points per edge, or a list of points)."""
    corners = [tuple(float(i == j) for j in range(K)) for i in range(K)]
    runs = [(f"single_{i + 1}", "single", c) for i, c in enumerate(corners)]
    inner = [w for w in (simplex_grid(K, n) if isinstance(n, int) else n) if w not in corners]
    runs += [(f"{m}_{fmt(w)}", m, w) for m in methods for w in dict.fromkeys(inner)]
    names = [r[0] for r in runs]
    dup = next((x for x in names if names.count(x) > 1), None)
    if dup:
        raise configurator.ConfigError(f"sweep: --grid: two points are both run {dup} (equal to 3 digits)")
    return runs

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # missing (or cut off while writing)

def read_summary(run_dir):
    s = read_json(os.path.join(run_dir, "summary.json"))
    return s if isinstance(s, dict) else None

def config_diff(saved, now):
    """'key: saved -> now' for every key but BOOKKEEPING whose value differs; a per-objective KEY_i
    set on one side only is compared with KEY's value on the other (it applies there)."""
    def value(c, k):
        if k in c:
            return c[k]
        base, _, i = k.rpartition("_")
        return c.get(base, "(unset)") if i.isdigit() else "(unset)"
    order = {k: j for j, k in enumerate(now)}
    keys = sorted(set(saved) | set(now), key=lambda k: (order.get(k, len(order)), k))
    return [f"{k}: {value(saved, k)!r} -> {value(now, k)!r}" for k in keys
            if k not in BOOKKEEPING and value(saved, k) != value(now, k)]

def has_checkpoint(run_dir):
    ckpt = os.path.join(run_dir, "ckpt")
    return os.path.isdir(ckpt) and any(d.startswith(("iter_", "old_iter_")) for d in os.listdir(ckpt))

def has_outputs(run_dir):
    """what train.py refuses to start over without --overwrite=True (checkpoint.previous_run)."""
    m = os.path.join(run_dir, "metrics.jsonl")
    return (has_checkpoint(run_dir) or os.path.isdir(os.path.join(run_dir, "final")) or
            (os.path.exists(m) and os.path.getsize(m) > 0) or os.path.exists(os.path.join(run_dir, "summary.json")))

def status(run_dir, now, K):
    """what to do with run_dir for config `now`: ('reuse', summary), ('resume', why) or ('start', why)."""
    s, saved = read_summary(run_dir), read_json(os.path.join(run_dir, "config.json"))
    diff = config_diff(saved, now) if isinstance(saved, dict) else None
    if s is None and not has_checkpoint(run_dir):
        return "start", "it stopped before its first checkpoint" if has_outputs(run_dir) else ""
    if diff is None:
        return "start", f"{run_dir}/config.json is missing, so its config cannot be compared"
    if diff:
        return "start", f"its config differs from this sweep's: {'; '.join(diff)}"
    if s is None:
        return "resume", ""
    lacks = [f"eval_loss_{i}" for i in range(1, K + 1) if not isinstance(s.get(f"eval_loss_{i}"), (int, float))]
    if lacks:
        return "start", f"its summary.json has no {', '.join(lacks)}"
    return "reuse", s

# -----------------------------------------------------------------------------
# the children: Ctrl-C reaches them once, through the sweep, and they stop when the sweep dies

_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform.startswith("linux") else None

def child_setup(parent):
    """runs in the child before exec. Its own process group: the terminal's Ctrl-C goes to the
    sweep alone, which passes it on exactly once (torchrun treats a second SIGINT as 'kill the
    workers now'). Linux: SIGTERM when the sweep dies, even by kill -9 (prctl PR_SET_PDEATHSIG), which
    train.py (and torchrun, for its workers) answers by saving a checkpoint and exiting; SIGKILL
    would stop torchrun without its workers, which run in sessions of their own."""
    def setup():
        os.setpgid(0, 0)
        if _prctl is not None:
            _prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the sweep died before the death signal was set
                os.kill(os.getpid(), signal.SIGTERM)
    return setup

def kill(child, signum):
    try:
        os.killpg(child.pid, signum)  # its group: the launcher and what it started there
    except ProcessLookupError:
        pass  # exited meanwhile

def launch(launcher, run_dir, args, extra):
    """one run of train.py; returns (exit status, the signal that interrupted the sweep or None)."""
    cmd = [*launcher, TRAIN, *args, *extra, f"--out_dir={run_dir}"]
    print(f"sweep: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    got, child = [], None

    def forward(signum, frame):
        got.append(signum)
        if child is None:
            return  # not started yet: forwarded as soon as it is
        if len(got) == 1:
            kill(child, signum)
        print(f"\nsweep: waiting for {run_dir} to save a checkpoint and exit (kill -9 {child.pid} stops it "
              f"without saving)", file=sys.stderr, flush=True)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        child = subprocess.Popen(cmd, preexec_fn=child_setup(os.getpid()))
        if got:
            kill(child, got[0])
        rc = child.wait()  # a signal runs forward(), then the wait goes on (PEP 475)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return rc, (got[0] if got else None)

def run_all(args, methods, grid, out_dir, launcher, max_runs=MAX_RUNS):
    """runs what is missing; returns ({name: summary}, {name: (method, lambd)}, failed names, K,
    the signal that interrupted the sweep or None)."""
    # checked as its runs will be: the budgets of a constrained sweep, none for the other methods
    cfg = base_config([*args, "--method=constrained"] if "constrained" in methods else
                      [*args, "--method=sequential",
                       *(f"--budget_{i}=-1.0" for i in range(1, configurator.MAX_OBJECTIVES + 1))])
    bad = [k for k in ("resume", "overwrite") if cfg[k]]
    if bad:
        raise configurator.ConfigError(f"sweep: config key {bad[0]} is the sweep's to set, run by run (it resumes "
                                       f"a run that stopped and starts over one of another config): leave it out")
    K = sum(bool(cfg[f"obj_{i}"]) for i in range(1, configurator.MAX_OBJECTIVES + 1))
    if K < 2:
        raise configurator.ConfigError("sweep: the base config trains one objective; set obj_2 (and obj_3, ...)")
    for i in range(1, K + 1):  # the front compares eval losses: every objective needs held-out rows
        if not cfg.get(f"eval_split_{i}", cfg["eval_split"]) and cfg["eval_frac"] <= 0:
            raise configurator.ConfigError(f"sweep: objective {i} has no eval set (eval_split_{i} is empty and "
                                           f"eval_frac={cfg['eval_frac']}): the front compares each run's eval "
                                           f"losses; set eval_split_{i} or eval_frac > 0")
    # counted before the grid is built: C(n + K - 2, K - 1) points, of which K are the corners
    inner = math.comb(grid + K - 2, K - 1) - K if isinstance(grid, int) else len(grid)
    n = K + inner * len(methods)
    if n > max_runs:
        raise configurator.ConfigError(
            f"sweep: --grid={grid if isinstance(grid, int) else ','.join(':'.join(map(repr, w)) for w in grid)} "
            f"plans {n:,} runs ({K} objectives, {len(methods)} method(s)), more than --max_runs={max_runs}: "
            f"use a smaller grid or a list of points, or raise --max_runs")
    runs = plan(K, grid_points(grid, K), methods)
    os.makedirs(out_dir, exist_ok=True)
    done, failed, spec = {}, [], {name: (method, w) for name, method, w in runs}
    for name, method, w in runs:
        run_dir = os.path.join(out_dir, name)
        m = "sequential" if method == "single" else method
        extra = [f"--method={m}", f"--lambd={','.join(map(repr, w))}"]
        now = dict(cfg, method=m, lambd=list(w))  # the config train.py will run (and save as config.json)
        if method != "constrained":  # a forgetting budget is constrained's alone
            extra += [f"--budget_{i}=-1.0" for i in range(1, K + 1)]
            now.update({f"budget_{i}": -1.0 for i in range(1, K + 1)})
        if method != "single":  # f* = the corners' losses: they ran first, and a run without them waits
            missing = [f"single_{i}" for i in range(1, K + 1) if f"single_{i}" not in done]
            if missing:
                print(f"sweep: {name} not run: it needs f* from {', '.join(missing)}, which did not finish; "
                      f"run the same command again", flush=True)
                failed.append(name)
                continue
            opt = [done[f"single_{i}"][f"eval_loss_{i}"] for i in range(1, K + 1)]
            extra += [f"--obj_opt_{i}={v!r}" for i, v in enumerate(opt, 1)]
            now.update({f"obj_opt_{i}": v for i, v in enumerate(opt, 1)})
        todo, why = status(run_dir, now, K)
        if todo == "reuse":
            print(f"sweep: {name} finished before with this config, reused", flush=True)
            done[name] = why
            continue
        if why:
            print(f"sweep: {name} runs again: {why}", flush=True)
        if todo == "resume":
            extra.append("--resume=True")
        elif has_outputs(run_dir):
            extra.append("--overwrite=True")  # train.py clears that run's outputs itself
        rc, sig = launch(launcher, run_dir, args, extra)
        if sig is not None:
            print(f"sweep: interrupted; {name} stopped (exit {rc})"
                  f"{' with a checkpoint' if has_checkpoint(run_dir) else ''}: run the same command again to go on",
                  file=sys.stderr, flush=True)
            return done, spec, failed + [name], K, sig
        todo, s = status(run_dir, now, K)
        if rc != 0 or todo != "reuse":
            print(f"sweep: {name} failed (exit {rc}" + ("" if rc else f", but {s or 'no summary.json in ' + run_dir}") +
                  "); run the same command again to retry it", flush=True)
            failed.append(name)
            continue
        done[name] = s
    return done, spec, failed, K, None

def front_rows(done, spec, K):
    """one row per finished run, with f_i, the gaps to f* = the single-objective runs' losses
    (else the best any run reached), the ideal distance and the front mark."""
    names = [n for n in spec if n in done]
    f = {n: [done[n][f"eval_loss_{i}"] for i in range(1, K + 1)] for n in names}
    opt = [done[f"single_{i}"][f"eval_loss_{i}"] if f"single_{i}" in done else min(v[i - 1] for v in f.values())
           for i in range(1, K + 1)]
    mask = pareto_mask([f[n] for n in names])
    rows = []
    for n, front in zip(names, mask):
        s, (m, w) = done[n], spec[n]
        gaps = [a - b for a, b in zip(f[n], opt)]
        rows.append(dict(run=n, method=m, lambd=list(w), f=f[n], gaps=gaps,
                         ideal_distance=math.sqrt(sum(g * g for g in gaps)), front=front, iters=s.get("iters"),
                         train_s=s.get("train_s"), wall_s=s.get("wall_s"), tokens=s.get("tokens"),
                         peak_memory_mb=s.get("peak_memory_mb")))
    return rows, opt

def write_table(rows, opt, K, out_dir):
    with open(os.path.join(out_dir, "front.json"), "w") as f:
        json.dump(dict(opt=opt, rows=rows), f, indent=2)
    head = ["run", "method", "lambd", *(f"f_{i}" for i in range(1, K + 1)), "ideal dist", "front", "train s", "wall s"]
    lines = ["f* = (" + ", ".join(f"{v:.4f}" for v in opt) + "): the single-objective runs", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["method"], ", ".join(f"{x:.3g}" for x in r["lambd"]), *(f"{v:.4f}" for v in r["f"]),
                 f"{r['ideal_distance']:.4f}", "yes" if r["front"] else "", f"{r['train_s']:.1f}", f"{r['wall_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "front.md"), "w") as f:
        f.write(text)
    return text

def plot(rows, opt, K, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = list(itertools.combinations(range(K), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.5), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        for k, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
            for front in (True, False):  # non-dominated: solid, black edge; dominated: faded, no edge
                rs = [r for r in rows if r["method"] == m and r["front"] == front]
                ax.scatter([r["f"][a] for r in rs], [r["f"][b] for r in rs], marker=MARKERS.get(m, "x"), s=70,
                           color=f"C{k}", alpha=0.9 if front else 0.35, edgecolors="black" if front else "none",
                           linewidths=1.2,
                           label=m if front or not any(r["front"] for r in rows if r["method"] == m) else None)
        ax.scatter([opt[a]], [opt[b]], marker="*", s=250, color="gold", edgecolors="black", zorder=4, label="f*")
        ax.set(xlabel=f"f_{a + 1} (eval loss)", ylabel=f"f_{b + 1} (eval loss)")
        for axis, j in (("x", a), ("y", b)):  # losses that span decades (a forgotten objective): log scale
            v = [r["f"][j] for r in rows] + [opt[j]]
            if min(v) > 0 and max(v) / min(v) > 30:
                getattr(ax, f"set_{axis}scale")("log")
        if K == 2:  # the front itself, in order of f_1
            fr = sorted((r["f"][a], r["f"][b]) for r in rows if r["front"])
            ax.plot(*zip(*fr), color="gray", lw=1, zorder=0, label="front")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        "solid: non-dominated, faded: dominated" + ("" if K == 2 else " (in all K losses); pairwise projections"),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

def main(argv):
    own = dict(methods="sequential,alright,maxright", grid="5", out_dir="out/sweep",
               launcher=shlex.quote(sys.executable), max_runs=str(MAX_RUNS))
    args = []
    for a in argv:
        key, sep, val = a[2:].partition("=")
        if a.startswith("--") and sep and key in own:
            own[key] = val
        else:
            args.append(a)  # config files and train.py keys: every run gets them
    methods = [m for m in own["methods"].split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise configurator.ConfigError(f"sweep: --methods={own['methods']}: each must be one of {', '.join(METHODS)}")
    grid = read_grid(own["grid"])
    if not own["max_runs"].strip().isdigit() or int(own["max_runs"]) < 1:
        raise configurator.ConfigError(f"sweep: --max_runs={own['max_runs']}: expected an integer >= 1")
    out_dir = own["out_dir"]
    if not out_dir.strip():
        raise configurator.ConfigError("sweep: --out_dir is empty: give the directory of the sweep's runs")
    try:
        launcher = shlex.split(own["launcher"])
    except ValueError as e:
        raise configurator.ConfigError(f"sweep: --launcher={own['launcher']}: {e}") from None
    if not launcher or shutil.which(launcher[0]) is None:
        raise configurator.ConfigError(f"sweep: --launcher={own['launcher']!r}: " + (
            f"no command {launcher[0]!r}" if launcher else "empty") + " (e.g. --launcher=python or "
            "--launcher=\"torchrun --nproc_per_node=8\")")
    done, spec, failed, K, sig = run_all(args, methods, grid, out_dir, launcher, int(own["max_runs"]))
    if sig is not None:
        return 128 + sig
    rows, opt = front_rows(done, spec, K)
    if rows:
        print(write_table(rows, opt, K, out_dir))
        plot(rows, opt, K, os.path.join(out_dir, "front.png"))
        print(f"sweep: {len(rows)} runs -> {out_dir}/front.md, front.json, front.png")
    if failed:
        print(f"sweep: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    configurator.one_line_errors()
    try:
        configurator.usage(sys.argv[1:], __doc__)
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # between runs: no child to wait for
        print("\nsweep: interrupted", file=sys.stderr)
        sys.exit(130)
