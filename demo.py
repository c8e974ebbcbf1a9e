"""
The embedded default: the toy trade-off end to end on CPU (a few minutes on 2 cores).

    python demo.py            # writes out/demo/: one folder per run, pareto.png, demo.json
    python demo.py --quick    # a seconds-long smoke version (what the test suite runs)

out/demo/tables.md holds the tables the README shows, with the commit and date they came from.

1. objective 1 alone (SFT) and objective 2 alone (DPO) give f_1*, f_2*;
2. sequential, mix, alright and maxright at lambd = 0.5 with the same step budget, and constrained
   (lambd = 0.5) with a forgetting budget on SFT of half, then a quarter, of ALRIGHT's SFT gap;
3. one table: final eval losses, optimality gaps, ideal distance, time, peak memory;
4. K = 3: a third objective that conflicts with both (DPO preferring "RED FOX." over "RED FOX!",
   data/toy_calm.jsonl) alone, then sequential, alright and maxright over all three at lambd = 1/3 each;
5. objective 2 as SimPO (no reference model) instead of DPO, with ALRIGHT: its behaviour beside DPO's;
6. an online objective 2: GRPO on "whisper" prompts with a reward for lowercase answers
   (config/demo_grpo.py), sequential against ALRIGHT: the SFT loss and the reward at the end;
7. bilevel data selection on the noisy toy set: the fraction of clean rows kept.
Every run is a plain `python train.py config/demo.py --key=value` subprocess, printed as it starts.
"""
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
METHODS = ("sequential", "mix", "alright", "maxright")
BUDGETS = {"constrained_half": 0.5, "constrained_quarter": 0.25}  # constrained: budget_1 = this x ALRIGHT's SFT gap

def run(cmd):
    """one train.py process, its output captured (tests/test_recipes.py runs it in a warm interpreter)."""
    return subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def train(out_dir, *args, config="config/demo.py"):
    # a rerun replaces its runs
    cmd = [sys.executable, "train.py", config, f"--out_dir={out_dir}", "--overwrite=True", *args]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    p = run(cmd)
    if p.returncode != 0:
        sys.exit(f"run failed ({' '.join(cmd)}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    with open(os.path.join(ROOT, out_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(ROOT, out_dir, "metrics.jsonl")) as f:
        summary["evals"] = [l for l in map(json.loads, f) if l["kind"] == "eval"]
    summary["process_s"] = time.time() - t0
    return summary

def behaviour(run_dir):
    """what a run's model says at the end (eval_gen's greedy answers to its held-out prompts, SFT
    and preference prompts alike): fmt = share answered in the SFT format (UPPERCASE words, then
    '!' or nothing), pref = share answered in that format with the preferred '!'; exact = share
    answered exactly as the SFT data would (the prompt in UPPERCASE)."""
    d = os.path.join(ROOT, run_dir, "eval_gen")
    last = max(f.split("_")[1] for f in os.listdir(d))
    gens = [json.loads(l) for f in sorted(os.listdir(d)) if f.split("_")[1] == last for l in open(os.path.join(d, f))]
    words = [g["prompt"].split("User: ", 1)[-1].rsplit("\nAssistant: ", 1)[0] for g in gens]
    fmt = [a.rstrip("!").replace(" ", "").isalpha() and a.rstrip("!").isupper() for a in (g["output"] for g in gens)]
    return {"fmt": sum(fmt) / len(gens),
            "pref": sum(f and g["output"].endswith("!") for f, g in zip(fmt, gens)) / len(gens),
            "exact": sum(g["output"].rstrip("!") == w.upper() for g, w in zip(gens, words)) / len(gens)}

def plot(results, opt, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    names = list(results)  # the behaviour panel: what each model says at the end
    for k, (key, label) in enumerate((("fmt", "SFT format"), ("pref", "preferred '!'"))):
        bx.bar(
            [j + 0.4 * k for j in range(len(names))], [results[m]["behaviour"][key] for m in names], 0.4, label=label
        )
    bx.set_xticks([j + 0.2 for j in range(len(names))], names, rotation=20)
    bx.set_ylim(0, 1.2)  # room for the legend above the bars
    bx.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    bx.set_title("what each model says: share of held-out prompts")
    bx.legend(loc="upper center", ncol=2)
    for m, r in results.items():
        xs = [e["eval_loss_1"] for e in r["evals"]]
        ys = [e["eval_loss_2"] for e in r["evals"]]
        ax.plot(xs, ys, marker=".", label=m, alpha=0.8)
        ax.scatter(xs[-1:], ys[-1:], s=60, edgecolors="black", zorder=3)
    ax.scatter([opt[0]], [opt[1]], marker="*", s=200, color="gold", edgecolors="black", zorder=4, label="(f_1*, f_2*)")
    ax.set_xlabel("objective 1: SFT eval loss")
    ax.set_ylabel("objective 2: DPO eval loss")
    ax.set_xscale("log")
    ax.set_title("toy trade-off, lambd = 0.5 (big dot: end of run)")
    ax.legend(loc="upper right", fontsize=8)  # the empty corner: the runs end near the star, bottom left
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")

THIRD = ["--obj_3=dpo", "--dataset_3=data/toy_calm.jsonl", "--eval_split_3=data/toy_calm_eval.jsonl", "--max_len_3=48"]

def three_objectives(out, opt, budget, quick):
    """K = 3 beside the K = 2 table: f_3* from the third objective alone, then three methods with the
    same step budget as every other run; prints and returns their table."""
    # losses only
    budget = [a for a in budget if not a.startswith("--eval_gen")] + (["--max_samples_3=128"] if quick else [])
    alone = train(f"{out}/calm_alone", "--obj_1=dpo", "--dataset_1=data/toy_calm.jsonl",
                  "--eval_split_1=data/toy_calm_eval.jsonl", "--obj_2=", *budget)
    opt3 = (*opt, alone["eval_loss_1"])
    third = f"--lambd={1 / 3!r},{1 / 3!r},{1 - 2 / 3!r}"
    print(f"\nK = 3: f_3* (the third objective alone) = {opt3[2]:.4f}, lambd = 1/3 each\n")
    head = (
        f"{'method':>10}  {'f_1':>7}  {'f_2':>7}  {'f_3':>7}  {'ideal dist':>10}  {'steps 1/2/3':>11}  {'train s':>7}"
    )
    print(head + "\n" + "-" * len(head))
    table = {}
    for m in ("sequential", "alright", "maxright"):
        r = train(
            f"{out}/k3_{m}",
            f"--method={m}",
            third,
            *THIRD,
            *(f"--obj_opt_{i}={v!r}" for i, v in enumerate(opt3, 1)),
            *budget,
        )
        f = [r[f"eval_loss_{i}"] for i in (1, 2, 3)]
        table[m] = dict(f=f, ideal_distance=math.dist(f, opt3), steps=r["counts"], train_s=r["train_s"])
        print(f"{m:>10}  {f[0]:7.4f}  {f[1]:7.4f}  {f[2]:7.4f}  {table[m]['ideal_distance']:10.4f}  "
              f"{'/'.join(str(v) for v in r['counts'].values()):>11}  {r['train_s']:7.1f}")
    return {"opt": opt3, "methods": table}

def online(out, budget, quick):
    """SFT + GRPO (config/demo_grpo.py), sequential and ALRIGHT at lambd = 0.5, the same step budget:
    the SFT eval loss, the held-out mean reward of greedy answers, the SFT format share."""
    budget = [a for a in budget if not a.startswith("--max_samples_2")] + (["--max_samples_2=64"] if quick else [])
    print("\nonline objective 2 (GRPO, 'whisper' prompts, reward = lowercase share + characters matching the "
          "lowercase words)\n")
    head = f"{'method':>10}  {'SFT loss':>8}  {'reward':>6}  {'SFT format':>10}  {'train s':>7}"
    print(head + "\n" + "-" * len(head))
    table = {}
    for m in ("sequential", "alright"):
        r = train(f"{out}/grpo_{m}", f"--method={m}", *budget, config="config/demo_grpo.py")
        table[m] = dict(f_1=r["eval_loss_1"], reward_2=r["eval_reward_2"], behaviour=behaviour(f"{out}/grpo_{m}"),
                        train_s=r["train_s"], steps=r["counts"])
        print(f"{m:>10}  {r['eval_loss_1']:8.4f}  {r['eval_reward_2']:6.3f}  {table[m]['behaviour']['fmt']:10.1%}  "
              f"{r['train_s']:7.1f}")
    return table

NAMES = {"sft_alone": "SFT alone", "dpo_alone": "DPO alone", "alright": "ALRIGHT", "maxright": "MAXRIGHT",
         "constrained_half": "constrained (budget_1 = ALRIGHT's gap_1 / 2)",
         "constrained_quarter": "constrained (budget_1 = ALRIGHT's gap_1 / 4)",
         "alright_simpo": "ALRIGHT, SFT + SimPO (`dpo_beta=2`)"}

def tables_md(res, seconds):
    """the README's demo tables as markdown, with the commit and date they came from (out/demo/tables.md)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        commit, dirty = "unknown", ""
    opt, m = res["opt"], res["methods"]
    out = [f"`python demo.py`, commit {commit or 'unknown'}{' with local changes' if dirty else ''}, "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds:.0f} s in all; "
           f"f_1* = {opt[0]:.3f}, f_2* = {opt[1]:.4f}", "",
           "| method | f_1 (SFT) | f_2 (DPO) | gap_1 | gap_2 | ideal distance | steps 1/2 | time vs sequential |",
           "|---|---|---|---|---|---|---|---|"]
    def held(r):  # constrained: its budget, whether it held, the steps it took after T
        if "budget_1" not in r:
            return ""
        after = f", {r['settle_iters']} steps after T" if r["settle_iters"] else ""
        return f" (budget {r['budget_1']:.3f}: {'held' if r['budgets_held'] else 'NOT held'}{after})"
    out += [f"| {k.replace('_', ' ')} | {r['f_1']:.3f} | {r['f_2']:.3f} | {r['gap_1']:.3f}{held(r)} | "
            f"{r['gap_2']:.3f} | {r['ideal_distance']:.3f} | {'/'.join(str(v) for v in r['steps'].values())} | "
            f"{r['time_vs_sequential']:.2f} |"
            for k, r in m.items()]
    out += ["", "| run | SFT format | with the preferred `!` | exactly right |", "|---|---|---|---|"]
    out += [
        f"| {NAMES.get(k, k)} | {b['fmt']:.0%} | {b['pref']:.0%} | {b['exact']:.0%} |"
        for k, b in res["behaviour"].items()
    ]
    k3 = res["k3"]
    out += ["", f"K = 3 (f_3* = {k3['opt'][2]:.4f}, lambd = 1/3 each):", "",
            "| method | f_1 | f_2 | f_3 | ideal distance | steps 1/2/3 |", "|---|---|---|---|---|---|"]
    out += [f"| {k} | {r['f'][0]:.3f} | {r['f'][1]:.3f} | {r['f'][2]:.3f} | {r['ideal_distance']:.3f} | "
            f"{'/'.join(str(v) for v in r['steps'].values())} |" for k, r in k3["methods"].items()]
    out += ["", "Online objective 2 (GRPO, config/demo_grpo.py, lambd = 0.5):", "",
            "| method | SFT eval loss | held-out reward (greedy) | SFT format | train s |", "|---|---|---|---|---|"]
    out += [f"| {k} | {r['f_1']:.3f} | {r['reward_2']:.3f} | {r['behaviour']['fmt']:.0%} | {r['train_s']:.1f} |"
            for k, r in res["grpo"].items()]
    out += ["", f"Selection: {res['selection_clean_fraction']:.1%} of the kept rows are clean."]
    return "\n".join(out) + "\n"

def main(quick=False):
    out = "out/demo_quick" if quick else "out/demo"
    budget = ["--max_iters=16", "--eval_interval=8", "--max_samples_1=128", "--max_samples_2=128"] if quick else []
    budget += ["--eval_gen_interval=0", "--eval_gen_max_new_tokens=24"]  # greedy answers at the end: behaviour
    t0 = time.time()
    # f* of each objective: its eval loss after training it alone with the same budget
    sft_alone = train(f"{out}/sft_alone", "--obj_2=", *budget)
    dpo_alone = train(f"{out}/dpo_alone", "--obj_1=dpo", "--dataset_1=data/toy_pref.jsonl",
                      "--eval_split_1=data/toy_pref_eval.jsonl", "--obj_2=", *budget)
    opt = (sft_alone["eval_loss_1"], dpo_alone["eval_loss_1"])
    known = [f"--obj_opt_1={opt[0]}", f"--obj_opt_2={opt[1]}"]
    results = {m: train(f"{out}/{m}", f"--method={m}", *known, *budget) for m in METHODS}
    gap = results["alright"]["eval_loss_1"] - opt[0]
    for name, frac in BUDGETS.items():  # a forgetting budget of a share of ALRIGHT's SFT gap at the same lambd
        results[name] = train(f"{out}/{name}", "--method=constrained", f"--budget_1={frac * gap:.4f}", *known, *budget)
    # SimPO's beta
    simpo = train(f"{out}/alright_simpo", "--method=alright", "--obj_2=simpo", "--dpo_beta=2.0", *budget)
    for m, r in [("sft_alone", sft_alone), ("dpo_alone", dpo_alone), *results.items(), ("alright_simpo", simpo)]:
        r["behaviour"] = behaviour(f"{out}/{m}")
    sel_budget = ["--max_epochs=1", "--max_samples_2=256"] if quick else []
    train(f"{out}/select", *sel_budget, config="config/demo_select.py")

    base = results["sequential"]
    print(f"\nf_1* (SFT alone) = {opt[0]:.4f}   f_2* (DPO alone) = {opt[1]:.4f}   lambd = 0.5, "
          f"{base['iters']} steps each (constrained: budget_1 = {', '.join(f'{x:g}' for x in BUDGETS.values())} "
          f"x ALRIGHT's gap_1 {gap:.4f})\n")
    head = (f"{'method':>10}  {'f_1':>7}  {'f_2':>7}  {'gap_1':>7}  {'gap_2':>7}  {'ideal dist':>10}  "
            f"{'train s':>7}  {'x seq':>5}  {'peak MiB':>8}")
    print(head)
    print("-" * len(head))
    table = {}
    for m, r in results.items():
        g1, g2 = r["eval_loss_1"] - opt[0], r["eval_loss_2"] - opt[1]
        row = dict(f_1=r["eval_loss_1"], f_2=r["eval_loss_2"], gap_1=g1, gap_2=g2, ideal_distance=math.hypot(g1, g2),
                   train_s=r["train_s"], time_vs_sequential=r["train_s"] / base["train_s"],
                   peak_memory_mb=r["peak_memory_mb"], steps=r["counts"])
        if "budgets_held" in r:
            row.update(budget_1=r["budget_1"], budgets_held=r["budgets_held"], settle_iters=r["settle_iters"])
        table[m] = row
        print(f"{m:>10}  {row['f_1']:7.4f}  {row['f_2']:7.4f}  {g1:7.4f}  {g2:7.4f}  {row['ideal_distance']:10.4f}  "
              f"{row['train_s']:7.1f}  {row['time_vs_sequential']:5.2f}  {row['peak_memory_mb']:8.0f}"
              + (f"  (budget_1 {row['budget_1']:.4f} {'held' if row['budgets_held'] else 'NOT held'}, steps "
                 f"{'/'.join(map(str, row['steps'].values()))}, {row['settle_iters']} after T)"
                 if "budgets_held" in row else ""))
    print("\nbehaviour: share of the held-out prompts (eval_gen_samples of each objective) answered, greedy, in the "
          "SFT format (UPPERCASE words), in it with the preferred '!', and exactly right")
    for m, r in [("sft_alone", sft_alone), ("dpo_alone", dpo_alone), *results.items(), ("alright_simpo", simpo)]:
        print(f"{m:>13}  format {r['behaviour']['fmt']:6.1%}  with the preferred '!' {r['behaviour']['pref']:6.1%}  "
              f"exactly the prompt in UPPERCASE ('!' or not) {r['behaviour']['exact']:6.1%}")
    k3 = three_objectives(out, opt, budget, quick)
    grpo = online(out, budget, quick)
    with open(os.path.join(ROOT, "data/toy_noisy_labels.jsonl")) as f:
        corrupted = {r["id"]: r["corrupted"] for r in map(json.loads, f)}
    with open(os.path.join(ROOT, out, "select", "selector.jsonl")) as f:
        ranked = sorted((json.loads(l) for l in f), key=lambda r: -r["logit"])
    n_kept = sum(1 for _ in open(os.path.join(ROOT, out, "select", "selected.jsonl")))
    clean = sum(not corrupted[r["id"]] for r in ranked[:n_kept]) / n_kept
    base_rate = sum(not corrupted[r["id"]] for r in ranked) / len(ranked)
    print(f"\nselection: kept {n_kept} of {len(ranked)} noisy rows; {clean:.1%} of the kept rows are clean "
          f"(the set is {base_rate:.0%} clean)")
    plot(results, opt, os.path.join(ROOT, out, "pareto.png"))
    with open(os.path.join(ROOT, out, "demo.json"), "w") as f:
        json.dump({"opt": opt, "methods": table, "selection_clean_fraction": clean, "k3": k3, "grpo": grpo,
                   "behaviour": {m: r["behaviour"] for m, r in [("sft_alone", sft_alone), ("dpo_alone", dpo_alone),
                                                                *results.items(), ("alright_simpo", simpo)]},
                   "alright_simpo": {"f_1": simpo["eval_loss_1"], "f_2_simpo": simpo["eval_loss_2"],
                                     "gap_1": simpo["eval_loss_1"] - opt[0]}},
                  f, indent=2)
    with open(os.path.join(ROOT, out, "demo.json")) as f:
        md = tables_md(json.load(f), time.time() - t0)
    with open(os.path.join(ROOT, out, "tables.md"), "w") as f:  # what the README's demo tables are, regenerated
        f.write(md)
    print(f"demo done in {time.time() - t0:.0f} s; runs, metrics and final models under {out}/")
    return table, clean

if __name__ == "__main__":
    args = sys.argv[1:]
    if {"-h", "--help"} & set(args) or set(args) - {"--quick"}:
        print(__doc__)
        sys.exit(0 if {"-h", "--help"} & set(args) else f"demo.py: unknown arguments {sorted(set(args) - {'--quick'})}")
    main(quick="--quick" in args)
