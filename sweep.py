"""
The trade-off front in one command: a grid of methods x weights from one base config, each run
of train.py in its own out_dir, then a table and a plot of what they reached.

    python sweep.py config/demo.py --methods=sequential,alright,maxright --grid=5 --out_dir=out/sweep
    python sweep.py config/kd_sft.py --grid=3 --launcher="torchrun --nproc_per_node=8"

grid = points per edge of the weight simplex (5: lambd in {0, .25, .5, .75, 1} for K = 2). The
corners (one objective alone) run once, as method=sequential with lambd = e_i: they give f_i*,
which every other run gets as obj_opt_i (maxright needs it). The other points run once per
method. Any other --key=value (and config file) passes through to every run.

Resumable: a run whose summary.json exists is skipped; a run that died after writing a checkpoint
is resumed (--resume=True); one that died before its first checkpoint starts again from scratch.
A failed run is reported and the others still run; the table covers the finished ones.

Writes out_dir/front.md and front.json (every run: weights, f_i, gaps, ideal distance, whether it
is on the front, cost) and front.png (f_1 vs f_2; for K >= 3 every pairwise projection).
"""
import itertools
import json
import math
import os
import shlex
import shutil
import subprocess
import sys

import configurator

ROOT = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(ROOT, "train.py")
METHODS = ("sequential", "mix", "alright", "maxright", "constrained")
MARKERS = {"single": "*", "sequential": "s", "mix": "D", "alright": "o", "maxright": "^", "constrained": "v"}

def base_config(args):
    """train.py's config after the config files and overrides in `args`, checked by train.py itself
    (`--print_config=True`: nothing is loaded or trained). A bad key is train.py's one-line error."""
    p = subprocess.run([sys.executable, TRAIN, *args, "--print_config=True"], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        raise configurator.ConfigError(f"sweep: the base config: {err.removeprefix('error: ')}")
    return json.loads(p.stdout.strip().splitlines()[-1])

def simplex_grid(K, n):
    """every lambd on the simplex with coordinates in {0, 1/(n-1), ..., 1}, as tuples of floats."""
    m = n - 1
    pts = [c for c in itertools.product(range(m + 1), repeat=K) if sum(c) == m]
    return [tuple(x / m for x in c) for c in sorted(pts, reverse=True)]

def pareto_mask(points):
    """True for each point that no other point dominates (<= in every coordinate, < in one); all
    coordinates are minimized. Equal points do not dominate each other."""
    dom = lambda q, p: all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
    return [not any(dom(q, p) for q in points) for p in points]

def fmt(w):
    return "_".join(f"{x:.3g}" for x in w)

def plan(K, n, methods):
    """[(name, method, lambd)]: the K corners first (single), then methods x the other points."""
    corners = [tuple(float(i == j) for j in range(K)) for i in range(K)]
    runs = [(f"single_{i + 1}", "single", c) for i, c in enumerate(corners)]
    inner = [w for w in simplex_grid(K, n) if w not in corners]
    return runs + [(f"{m}_{fmt(w)}", m, w) for m in methods for w in inner]

def read_summary(run_dir):
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # not finished (or cut off while writing)

def launch(launcher, run_dir, args, extra):
    """one run of train.py; resumes a run that left a checkpoint, restarts one that did not."""
    again = []
    ckpt = os.path.join(run_dir, "ckpt")
    if os.path.isdir(ckpt) and any(d.startswith("iter_") for d in os.listdir(ckpt)):
        again = ["--resume=True"]
    elif os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # died before its first checkpoint: nothing to keep
    cmd = [*launcher, TRAIN, *args, *extra, f"--out_dir={run_dir}", *again]
    print(f"sweep: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode

def run_all(args, methods, n, out_dir, launcher):
    """runs what is missing; returns ({name: summary}, {name: (method, lambd)}, failed names, K)."""
    # checked as its runs will be: the budgets of a constrained sweep, none for the other methods
    cfg = base_config([*args, "--method=constrained"] if "constrained" in methods else
                      [*args, *(f"--budget_{i}=-1.0" for i in range(1, configurator.MAX_OBJECTIVES + 1))])
    K = sum(bool(cfg[f"obj_{i}"]) for i in range(1, configurator.MAX_OBJECTIVES + 1))
    if K < 2:
        raise configurator.ConfigError("sweep: the base config trains one objective; set obj_2 (and obj_3, ...)")
    runs = plan(K, n, methods)
    done, failed = {}, []
    for name, method, w in runs:
        run_dir = os.path.join(out_dir, name)
        s = read_summary(run_dir)
        if s is not None:
            print(f"sweep: {name} finished before, skipped", flush=True)
        else:
            extra = [f"--method={'sequential' if method == 'single' else method}", f"--lambd={','.join(map(repr, w))}"]
            if method != "constrained":  # a forgetting budget is constrained's alone
                extra += [f"--budget_{i}=-1.0" for i in range(1, K + 1)]
            if method != "single":
                opt = [done[f"single_{i}"][f"eval_loss_{i}"] for i in range(1, K + 1) if f"single_{i}" in done]
                extra += [f"--obj_opt_{i}={v!r}" for i, v in enumerate(opt, 1)] if len(opt) == K else []
            rc = launch(launcher, run_dir, args, extra)
            s = read_summary(run_dir) if rc == 0 else None
            if s is None:
                print(f"sweep: {name} failed (exit {rc}); run the same command again to retry it", flush=True)
                failed.append(name)
                continue
        done[name] = s
    return done, {name: (m, w) for name, m, w in runs}, failed, K

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
        rows.append(dict(run=n, method=m, lambd=list(w), f=f[n], gaps=gaps, ideal_distance=math.sqrt(sum(g * g for g in gaps)),
                         front=front, iters=s.get("iters"), train_s=s.get("train_s"), wall_s=s.get("wall_s"),
                         tokens=s.get("tokens"), peak_memory_mb=s.get("peak_memory_mb")))
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
                           linewidths=1.2, label=m if front or not any(r["front"] for r in rows if r["method"] == m) else None)
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
    fig.suptitle("solid: non-dominated, faded: dominated" + ("" if K == 2 else " (in all K losses); pairwise projections"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

def main(argv):
    own = dict(methods="sequential,alright,maxright", grid="5", out_dir="out/sweep", launcher=shlex.quote(sys.executable))
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
    n = int(own["grid"])
    if n < 2:
        raise configurator.ConfigError(f"sweep: --grid={n}: at least 2 points per edge (the corners)")
    out_dir = own["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    done, spec, failed, K = run_all(args, methods, n, out_dir, shlex.split(own["launcher"]))
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
    sys.exit(main(sys.argv[1:]))
