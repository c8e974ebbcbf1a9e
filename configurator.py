"""
Config files and --key=value overrides, applied to train.py's globals (nanoGPT style):

    python train.py config/kd_sft.py --lambd=0.3 --learning_rate=1e-5

Config files are plain Python, exec'd in order (a run's config.json is read as JSON: it reruns
that run's config); then --key=value overrides; later wins. Every
key must already exist in train.py (a typo is an error naming the closest known key); names a
config file starts with '_' are its private helpers. Types follow the default: an int is
accepted for a float key, true/false for a bool key, and a str key takes the text as is; a float
key also takes a tuple of numbers (lambd's K weights: --lambd=0.5,0.3,0.2, or a tuple in a file;
the script checks where a tuple is allowed).

Per-objective keys: for every key KEY of the `per_objective` table the caller passes, KEY_i
(i = 1..MAX_OBJECTIVES) is known too, with KEY's type: it sets KEY for objective i alone.
"""
import ast
import difflib
import json
import math
import os
import traceback
import types

from errors import ConfigError, before_exit, one_line_errors  # noqa: F401 (the commands' one import)

MAX_OBJECTIVES = 8
DATA_FILES = (".jsonl", ".parquet", ".csv", ".tsv", ".arrow", ".txt", ".gz", ".zst")  # never run as a config
def _closest(key, known):
    m = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean {m[0]!r}?)" if m else ""

def _coerce(key, value, default, where):
    """value of a known key, converted to the type of its default or an error naming both."""
    want = type(default)
    if isinstance(value, want) and not (want is int and isinstance(value, bool)):
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is tuple and isinstance(value, list):
        return tuple(value)
    if want is float and isinstance(value, (tuple, list)) and value and \
            all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        return tuple(float(x) for x in value)  # K weights (lambd)
    raise ConfigError(f"{where}: config key {key!r} expects {want.__name__} (default {default!r}), "
                     f"got {type(value).__name__} {value!r}")

def _parse(key, text, default, where):
    if isinstance(default, str):
        return text
    if isinstance(default, bool) and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
        raise ConfigError(f"{where}: config key {key!r} expects {type(default).__name__} "
                         f"(default {default!r}), cannot read {text!r}") from None
    return _coerce(key, value, default, where)

def _is_config(name, value):
    return not name.startswith("_") and not isinstance(value, (types.ModuleType, types.FunctionType, type))

def _suffixed(key, config, per_objective):
    """KEY_i of a per-objective KEY, i in 1..MAX_OBJECTIVES: KEY's default; else None."""
    base, _, n = key.rpartition("_")
    if base in per_objective and base in config and n.isdigit() and 1 <= int(n) <= MAX_OBJECTIVES and n == str(int(n)):
        return config[base]
    return None

def _config_file(path, config):
    """the keys a config file sets: a .py file run with the config as its globals (what it
    assigns), or a run's config.json (every key in it). A data file or a directory is refused."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} not found")
    ext = os.path.splitext(path.removesuffix(os.sep))[1].lower()
    data = f"config files are .py (or a run's config.json); pass data as --dataset_1={path}"
    if os.path.isdir(path) or ext in DATA_FILES:
        raise ConfigError(f"{path} is {'a directory' if os.path.isdir(path) else 'a data file'}, not a config file: {data}")
    if ext == ".json":
        try:
            with open(path) as f:
                keys = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not a JSON config ({e})") from None
        if not isinstance(keys, dict):
            raise ConfigError(f"{path} holds JSON data ({type(keys).__name__}), not a config: {data}")
        return keys
    scope = dict(config)
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), scope)
    except ConfigError:
        raise
    except Exception as e:  # the file's own line, not this one
        line = e.lineno if isinstance(e, SyntaxError) else \
            next((t.lineno for t in reversed(traceback.extract_tb(e.__traceback__)) if t.filename == path), "?")
        raise ConfigError(f"{path}, line {line}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in scope.items() if k != "__builtins__" and (k not in config or v is not config[k])}

def apply(args, config, verbose=None, per_objective=()):
    """Applies config files and --key=value `args` to the dict `config` (train.py's globals,
    restricted to its config keys by the caller) in place; returns the keys that changed.
    per_objective: the keys that also exist as KEY_1 ... KEY_8 (added to `config` when set)."""
    if verbose is None:
        verbose = int(os.environ.get("RANK", 0)) == 0
    known = list(config) + [f"{k}_{i}" for k in per_objective for i in range(1, MAX_OBJECTIVES + 1)]
    defaults = dict(config)  # types follow the values before these args (lambd: a number or K weights)
    changed = []
    for arg in args:
        if not arg.startswith("--"):
            keys = _config_file(arg, config)
            if verbose:
                print(f"overriding config with {arg}")
            for k, v in keys.items():
                if not _is_config(k, v):
                    continue
                default = defaults[k] if k in defaults else _suffixed(k, defaults, per_objective)
                if default is None:
                    raise ConfigError(f"{arg}: unknown config key {k!r}{_closest(k, known)} "
                                     f"(prefix helper names with '_')")
                config[k] = _coerce(k, v, default, arg)
                changed.append(k)
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"argument {arg!r}: expected --key=value")
            default = defaults[key] if key in defaults else _suffixed(key, defaults, per_objective)
            if default is None:
                raise ConfigError(f"unknown config key {key!r}{_closest(key, known)}")
            config[key] = _parse(key, text, default, f"--{key}")
            changed.append(key)
            if verbose:
                print(f"overriding: {key} = {config[key]!r}")
    return changed

# -----------------------------------------------------------------------------
# every check of train.py's config, before anything is read or loaded

def _require(cond, msg):
    if not cond:
        raise ConfigError(msg)

# the range of every numeric key of train.py (a per-objective KEY's covers its KEY_i), as the
# refusal states it: "> a", ">= a", an interval "[a, b)" (a tuple: each value), "finite", and after
# "or" one more allowed value; after ";" what a special value means
RANGES = dict(
    # I/O
    log_interval=">= 1", eval_interval=">= 0; 0 = start and end only", eval_iters=">= 0; 0 = the whole eval set",
    eval_gen_interval=">= 0 or -1; 0 = at the end only, -1 = off", eval_gen_samples=">= 0; 0 = all",
    eval_gen_max_new_tokens=">= 1", save_interval=">= 0; 0 = only at the end", keep_last=">= 0; 0 = all",
    # model, LoRA
    model_n_layer=">= 1", model_n_head=">= 1", model_n_kv_head=">= 1", model_n_embd=">= 1",
    model_intermediate_size=">= 1", model_max_len=">= 1",
    lora_rank=">= 0; 0 = full fine-tuning", lora_alpha="> 0", lora_dropout="[0, 1)",
    router_aux_loss=">= 0 or -1; -1 = the checkpoint's",
    # objectives and methods
    lambd="[0, 1]", opt_estimate_iters=">= 0; 0 = max(10, T // 10)", maxright_interval=">= 1", eps=">= 0; 0 = off",
    loss_chunk_size=">= 0; 0 = automatic", dual_lr="> 0",
    # per objective (objectives.COMMON_KEYS and each kind's keys)
    max_len=">= 1", max_samples=">= 0; 0 = all", eval_max_samples=">= 0; 0 = no cap",
    obj_opt=">= 0 or -1; -1 = estimate it", budget=">= 0 or -1; -1 = none",
    dpo_beta="> 0", dpo_label_smoothing="[0, 0.5)", dpo_nll_loss_coef=">= 0", simpo_gamma="finite",
    orpo_lambda=">= 0", kto_desirable_weight=">= 0", kto_undesirable_weight=">= 0",
    kd_beta="[0, 1]", kd_top_k=">= 0; 0 = the full vocabulary", kd_temperature="> 0",
    max_new_tokens=">= 1", temperature=">= 0; 0 = greedy", top_p="(0, 1]", top_k=">= 0; 0 = off",  # online kinds' sampling
    num_generations=">= 2", grpo_epsilon="> 0", grpo_inner_steps=">= 1", grpo_beta=">= 0",
    # data
    eval_frac="[0, 1)", dataset_num_proc=">= 0; 0 = this process",
    # selector
    selector_learning_rate=">= 0; 0 = uniform weights", aux_learning_rate="> 0", aux_steps=">= 1",
    upperlevel_weight="[0, 1]", upperlevel_weight_decay=">= 0", select_ratio="(0, 1]",
    # optimization
    train_batch_size=">= 1", micro_train_batch_size=">= 1", learning_rate=">= 0; 0 = no update",
    warmup_ratio="[0, 1]", min_lr_ratio="[0, 1]", weight_decay=">= 0", adam_betas="[0, 1)", max_norm=">= 0; 0 = no clipping",
    max_epochs=">= 0", max_iters=">= 0; 0 = max_epochs decides", seed=">= 0",
    # distributed
    zero_stage="[0, 3]", dist_timeout_s="> 0",
)

def in_range(v, rule):
    """v (a number) satisfies a RANGES rule."""
    rule, _, other = rule.partition(";")[0].partition(" or ")
    if other and v == float(other):
        return True
    if not math.isfinite(v):
        return False
    if rule == "finite":
        return True
    if rule[0] in "[(":
        lo, hi = (float(x) for x in rule[1:-1].split(","))
        return (lo < v if rule[0] == "(" else lo <= v) and (v < hi if rule[-1] == ")" else v <= hi)
    op, a = rule.split()
    return v > float(a) if op == ">" else v >= float(a)

def check_range(name, v, rule):
    """a ConfigError naming the key where the number v (or a value of the tuple v) is out of range."""
    for x in v if isinstance(v, tuple) else (v,):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        if not in_range(x, rule):
            want, _, note = rule.partition("; ")
            want = f"lie in {want}" if want[0] in "[(" else f"be {'a finite number' if want == 'finite' else want}"
            raise ConfigError(f"config key {name} must {want}{f' ({note})' if note else ''}, got {v}")

def check_ranges(c, per_objective, kinds):
    """every numeric key against RANGES: first each objective's own keys as it resolves them
    (KEY_i, else KEY: named 'KEY_i (or KEY)'), then every other key set, under its own name."""
    import objectives
    done = set()
    for i, kind in enumerate(kinds, 1):
        for k in (*objectives.COMMON_KEYS, *objectives.KINDS[kind].keys):
            if k in RANGES:
                name = f"{k}_{i}" if f"{k}_{i}" in c else f"{k}_{i} (or {k})"
                check_range(name, c.get(f"{k}_{i}", c[k]), RANGES[k])
                done.add(f"{k}_{i}")
    for k, v in c.items():
        base = k if k in RANGES else k.rpartition("_")[0] if k.rpartition("_")[0] in per_objective else ""
        if base in RANGES and k not in done:
            check_range(k, v, RANGES[base])

def pareto_points(path, K):
    """the points [[f_1, ..., f_K], ...] of config key pareto_front's file: a JSON list of points,
    or a sweep's front.json (its runs marked front). A ConfigError names the key and the file."""
    where = f"config key pareto_front={path!r}"
    try:
        with open(path) as f:
            points = json.load(f)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: not JSON ({e})") from None
    if isinstance(points, dict) and isinstance(points.get("rows"), list):  # sweep.py's front.json
        points = [r.get("f") for r in points["rows"] if isinstance(r, dict) and r.get("front")]
    num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    _require(isinstance(points, list) and points, f"{where}: expected a JSON list of points [[f_1, ..., f_{K}], ...], "
             f"got {json.dumps(points)[:60]}")
    _require(not all(num(x) for x in points), f"{where}: a flat list of numbers; a front is a list of points: "
             f"[{json.dumps(points)[:60]}] for one point")
    for j, p in enumerate(points):
        _require(isinstance(p, list) and len(p) == K and all(map(num, p)), f"{where}: point {j} is "
                 f"{json.dumps(p)[:60]}, expected {K} finite numbers (f_1 ... f_{K}, one per objective)")
    return [[float(x) for x in p] for p in points]

def objective_keys(c, i, per_objective):
    """objective i's per-objective keys: KEY_i where set, else KEY."""
    return types.SimpleNamespace(**{k: c.get(f"{k}_{i}", c[k]) for k in per_objective})

def _hub_id(name):
    # a name the hub could hold ('name' or 'org/name'): what is not one is a local path
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(name)
        return True
    except ValueError:
        return False

def check(c, per_objective, world_size=1):
    """train.py's config c: every key's range and every combination, each a ConfigError naming the
    key. Runs before a model or a dataset is loaded. Returns the objectives' kinds [obj_1 .. obj_K]."""
    import torch

    import data  # (data imports this module's ConfigError)
    import methods
    import objectives
    kinds = [c[f"obj_{i}"] for i in range(1, MAX_OBJECTIVES + 1)]
    K = sum(map(bool, kinds))
    for i, v in enumerate(kinds, 1):
        if v:
            objectives.kind(v, f"obj_{i}")
    _require(bool(kinds[0]), "config key obj_1 must be set")
    gap = kinds.index("") + 1 if "" in kinds else None
    _require(all(kinds[:K]), f"config keys obj_1 ... obj_{K}: objectives are numbered 1..K without gaps, obj_{gap} is not set")
    kinds = kinds[:K]
    method = c["method"]
    _require(method in methods.METHODS, f"config key method: {method!r} is not one of {', '.join(methods.METHODS)}")
    w = methods.weights(c["lambd"], K)  # K weights on the simplex, or a ConfigError naming lambd
    for k, v in c.items():  # the configurator lets a float key take a tuple: only lambd may
        _require(not isinstance(v, tuple) or k in ("lambd", "adam_betas"),
                 f"config key {k}: one number, got {v!r} (only lambd takes one weight per objective)")
    _require(len(c["adam_betas"]) == 2, f"config key adam_betas: two values (beta1, beta2) in [0, 1), got {c['adam_betas']}")
    check_ranges(c, per_objective, kinds)
    _require(c["out_dir"].strip() != "", "config key out_dir must name a directory, got ''")
    dev = c["device"]
    _require(not dev.startswith("cuda") or torch.cuda.is_available(), f"config key device: {dev!r}, but this torch "
             f"({torch.__version__}) sees no CUDA device; use --device=cpu or leave device empty")
    _require(c["dtype"] in ("", "float32", "bfloat16", "float64"),
             f"config key dtype: {c['dtype']!r} is not float32, bfloat16 or float64" + (
                 " (float16 gradients underflow without loss scaling, which train.py does not do: use bfloat16, or float32 "
                 "where the GPU has no bfloat16)" if c["dtype"] == "float16" else ""))
    _require(c["max_iters"] > 0 or c["max_epochs"] > 0, "config keys max_iters and max_epochs are both 0: nothing to train")
    _require(c["pretrain"] or c["model_n_head"] % c["model_n_kv_head"] == 0, f"config key model_n_kv_head "
             f"({c['model_n_kv_head']}) must divide model_n_head ({c['model_n_head']}): each key/value head serves a group")
    if c["pareto_front"]:
        pareto_points(c["pareto_front"], K)
        _require(c["eps"] > 0, f"config key pareto_front={c['pareto_front']!r} is set, but eps=0 (early stop off): "
                 f"set eps > 0 (e.g. --eps=1e-4)")
    for k in sorted(k for k in c if k == "reward_model" or k.startswith("reward_model_")):  # loaded after training, else
        _require(not c[k] or os.path.exists(c[k]) or _hub_id(c[k]), f"config key {k}: {c[k]!r} is neither a local "
                 f"path that exists nor a hub id")
    per_step = c["micro_train_batch_size"] * world_size
    _require(c["train_batch_size"] % per_step == 0, f"config key train_batch_size ({c['train_batch_size']}) must be a "
             f"multiple of micro_train_batch_size x world size ({per_step})")
    _require(c["lr_scheduler"] in ("constant", "cosine"), f"config key lr_scheduler: {c['lr_scheduler']!r} is not constant or cosine")
    _require(not c["cpu_offload"] or c["zero_stage"] >= 2, f"config keys cpu_offload=True and zero_stage={c['zero_stage']}: "
             f"offloading is FSDP2's, set zero_stage=2 or 3")
    _require(not (c["resume"] and c["overwrite"]), "config keys resume and overwrite exclude each other: resume continues "
             "the run in out_dir, overwrite replaces it")
    _require(c["selector_algorithm"] in ("memory", "penalty"),
             f"config key selector_algorithm: {c['selector_algorithm']!r} is not memory or penalty")
    _require(c["selector_activation"] in ("softmax", "sigmoid"),
             f"config key selector_activation: {c['selector_activation']!r} is not softmax or sigmoid")
    if method == "select":
        _require(K == 2 and all(objectives.KINDS[k].per_row for k in kinds), "method=select needs obj_1 and obj_2 of kinds "
                 f"with per-row losses ({', '.join(k for k, v in objectives.KINDS.items() if v.per_row)}) and no obj_3: "
                 f"dataset_1 is the trusted set, dataset_2 the one to filter")
        _require(not c["packing"], "config keys method=select and packing=True: the selector weighs each document's "
                 "loss, a packed row holds several documents; set packing=False")
        _require(c["lambd"] == 0.5, f"config key lambd={c['lambd']!r} does nothing under method=select: the upper-level "
                 f"weight (the original's --lambd) is config key upperlevel_weight")
        _require(c["selector_algorithm"] == "memory" or world_size == 1 or c["zero_stage"] <= 1,
                 "selector_algorithm=penalty supports zero_stage 0 and 1")
    for i, kind in enumerate(kinds, 1):
        o, spec = objective_keys(c, i, per_objective), objectives.KINDS[kind]
        _require(o.dataset != "", f"config key dataset_{i} (or dataset) must be set for objective {i} ({kind})")
        named = lambda k: f"{k}_{i}" if f"{k}_{i}" in c else k  # the key the value came from
        data.check_blend(o.dataset, o.dataset_probs, named("dataset"), named("dataset_probs"),
                         unique=method == "select" and i == 2, own_probs=f"dataset_probs_{i}" in c)
        _require(spec.reference != "required" or o.ref_model or c["lora_rank"], f"objective {i} is {kind}: set "
                 f"ref_model_{i} (or ref_model) to the teacher (or train LoRA adapters: the base model is the teacher)")
        _require(o.budget < 0 or method == "constrained", f"config key budget_{i} is set, but method={method!r}: "
                 f"a forgetting budget needs method=constrained")
        spec.check(i, o)
        _require(c["micro_train_batch_size"] % spec.rows_per_example(o) == 0, f"config key micro_train_batch_size "
                 f"({c['micro_train_batch_size']}) must be a multiple of objective {i}'s rows per example "
                 f"({spec.rows_per_example(o)}: num_generations_{i} completions of each prompt)")
    if method == "constrained" and K > 1:
        budgets = [i for i in range(1, K + 1) if objective_keys(c, i, per_objective).budget >= 0]
        _require(budgets, "method=constrained needs a forgetting budget: set budget_i >= 0 (the largest gap f_i - f_i* "
                 "objective i may end with) for at least one objective, e.g. --budget_1=0.1")
    if K > 1:  # f_i* estimated as an eval loss needs an eval set
        O = {i: objective_keys(c, i, per_objective) for i in range(1, K + 1)}
        m = methods.make(method, w, budgets={i: o.budget for i, o in O.items() if o.budget >= 0})
        for i, o in O.items():
            _require(not (m.needs(i) and o.obj_opt < 0 and not o.eval_split and c["eval_frac"] == 0),
                     f"method={method} estimates f_{i}* as objective {i}'s eval loss, but objective {i} has no eval set "
                     f"(eval_frac=0 and eval_split_{i} empty): set eval_frac > 0, eval_split_{i}, or obj_opt_{i} (a known f_{i}*)")
    return kinds
