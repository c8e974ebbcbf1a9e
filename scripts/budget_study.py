"""
method=constrained against ALRIGHT at the best fixed lambd and against another commit's rule, on the
shipped toy (config/demo.py, 400 steps, learning rate 3e-3): per seed, f* from each objective alone,
ALRIGHT at lambd 0.5 .. 0.9, then budgets of half and a quarter of ALRIGHT's SFT gap at lambd 0.5.
Prints a markdown table (docs/demo.md holds one); every run is a train.py subprocess, reused when
its summary exists.

    python scripts/budget_study.py --seeds=42,1,2 --out=out/budget_study
    python scripts/budget_study.py --seeds=42,1,2 --compare=06f01d8    # also that commit's rule (from git)
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["config/demo.py", "--learning_rate=3e-3", "--max_iters=400", "--eval_interval=100"]
LAMBDS = (0.5, 0.6, 0.7, 0.8, 0.9)

def run(out, root, *args):
    if not os.path.exists(os.path.join(out, "summary.json")):
        subprocess.run([sys.executable, "train.py", *BASE, *args, f"--out_dir={out}", "--overwrite=True"], cwd=root,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), check=True, capture_output=True)
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)

def main(seeds, out, compare=""):
    other = ""
    if compare:  # that commit's tree, from git, to run its constrained rule on the same runs
        other = tempfile.mkdtemp()
        subprocess.run(f"git -C {ROOT} archive {compare} | tar -x -C {other}", shell=True, check=True)
    lines = ["| seed | budget_1 | ALRIGHT at the best fixed lambd within it: lambd, gap_1, gap_2 | "
             + (f"{compare}'s rule: gap_1, gap_2, DPO steps | " if compare else "")
             + "constrained: gap_1, gap_2, DPO steps (steps in all) |",
             "|---|---|---|" + ("---|" if compare else "") + "---|"]
    for seed in seeds:
        d = os.path.join(out, f"seed_{seed}")
        s = [f"--seed={seed}"]
        f1 = run(f"{d}/single_1", ROOT, *s, "--obj_2=")["eval_loss_1"]
        f2 = run(f"{d}/single_2", ROOT, *s, "--obj_1=dpo", "--dataset_1=data/toy_pref.jsonl",
                 "--eval_split_1=data/toy_pref_eval.jsonl", "--obj_2=")["eval_loss_1"]
        known = [*s, f"--obj_opt_1={f1}", f"--obj_opt_2={f2}"]
        alright = {x: run(f"{d}/alright_{x}", ROOT, *known, f"--lambd={x}") for x in LAMBDS}
        gap = alright[0.5]["eval_loss_1"] - f1
        for name, frac in (("half", 0.5), ("a quarter", 0.25)):
            b = round(frac * gap, 4)
            within = [
                (r["eval_loss_2"] - f2, x, r["eval_loss_1"] - f1)
                for x, r in alright.items()
                if r["eval_loss_1"] - f1 <= b
            ]
            best = f"{min(within)[1]}: {min(within)[2]:.3f}, {min(within)[0]:.3f}" if within else "none of 0.5-0.9"
            budget = ["--method=constrained", "--lambd=0.5", f"--budget_1={b}"]
            cell = lambda r: (f"{r['eval_loss_1'] - f1:.3f}{'' if r['eval_loss_1'] - f1 <= b else ' (over)'}, "
                              f"{r['eval_loss_2'] - f2:.3f}, {r['counts']['2']}")
            ours = run(f"{d}/constrained_{frac}", ROOT, *known, *budget)
            theirs = f" {cell(run(f'{d}/{compare}_{frac}', other, *known, *budget))} |" if compare else ""
            lines.append(f"| {seed} | {b:.3f} ({name}) | {best} |{theirs} {cell(ours)} ({ours['iters']}) |")
            print(lines[-1], flush=True)
    print("\n".join(lines))

if __name__ == "__main__":
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    if {"-h", "--help"} & set(sys.argv[1:]) or set(args) - {"seeds", "out", "compare"}:
        sys.exit(print(__doc__) or 0)
    main(
        [int(x) for x in args.get("seeds", "42").split(",")],
        args.get("out", "out/budget_study"),
        args.get("compare", ""),
    )
