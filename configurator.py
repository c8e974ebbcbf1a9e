"""
Config files and --key=value overrides, applied to train.py's globals (nanoGPT style):

    python train.py config/kd_sft.py --lambd=0.3 --learning_rate=1e-5

Config files are plain Python, exec'd in order; then --key=value overrides; later wins. Every
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
import errno
import os
import sys
import types

MAX_OBJECTIVES = 8

class ConfigError(ValueError):
    """a bad config key or bad input data: the script prints it as one line, without a traceback."""

def one_line_errors():
    """sys.excepthook for train.py: a ConfigError (and a full disk) ends the run with `error: ...`
    on stderr (rank 0 only under torchrun) and exit status 2 (1 for the disk); any other
    exception keeps its traceback."""
    def hook(kind, e, tb):
        disk = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if not (isinstance(e, ConfigError) or disk):
            return sys.__excepthook__(kind, e, tb)
        sys.stdout.flush()
        if int(os.environ.get("RANK", 0)) == 0:
            # the real stderr: torch.distributed wraps this hook and buffers sys.stderr until it returns
            bar = "tqdm" in sys.modules and bool(getattr(sys.modules["tqdm"].tqdm, "_instances", None))
            print(("\n" if bar else "") + f"error: {e.strerror if disk and e.strerror else e}", file=sys.__stderr__, flush=True)
        os._exit(1 if disk else 2)  # skips the process group's teardown, which would wait for the other ranks
    sys.excepthook = hook

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
            if not os.path.exists(arg):
                raise ConfigError(f"config file {arg!r} not found")
            if verbose:
                print(f"overriding config with {arg}")
            scope = dict(config)
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), scope)
            for k, v in scope.items():
                if k == "__builtins__" or not _is_config(k, v):
                    continue
                default = defaults[k] if k in defaults else _suffixed(k, defaults, per_objective)
                if default is None:
                    raise ConfigError(f"{arg}: unknown config key {k!r}{_closest(k, known)} "
                                     f"(prefix helper names with '_')")
                if k not in config or v is not config[k]:
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

def objective_keys(c, i, per_objective):
    """objective i's per-objective keys: KEY_i where set, else KEY."""
    return types.SimpleNamespace(**{k: c.get(f"{k}_{i}", c[k]) for k in per_objective})

def check(c, per_objective, world_size=1):
    """train.py's config c: every key's range and every combination, each a ConfigError naming the
    key. Runs before a model or a dataset is loaded. Returns the objectives' kinds [obj_1 .. obj_K]."""
    import torch

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
    methods.weights(c["lambd"], K)  # K weights on the simplex, or a ConfigError naming lambd
    for k, v in c.items():  # the configurator lets a float key take a tuple: only lambd may
        _require(not isinstance(v, tuple) or k in ("lambd", "adam_betas"),
                 f"config key {k}: one number, got {v!r} (only lambd takes one weight per objective)")
    dev = c["device"]
    _require(not dev.startswith("cuda") or torch.cuda.is_available(), f"config key device: {dev!r}, but this torch "
             f"({torch.__version__}) sees no CUDA device; use --device=cpu or leave device empty")
    _require(c["dtype"] in ("", "float32", "bfloat16", "float64"),
             f"config key dtype: {c['dtype']!r} is not float32, bfloat16 or float64" + (
                 " (float16 gradients underflow without loss scaling, which train.py does not do: use bfloat16, or float32 "
                 "where the GPU has no bfloat16)" if c["dtype"] == "float16" else ""))
    for k in ("log_interval", "maxright_interval", "micro_train_batch_size", "train_batch_size", "aux_steps"):
        _require(c[k] >= 1, f"config key {k} must be >= 1, got {c[k]}")
    for k in ("eval_interval", "save_interval", "eval_iters", "keep_last", "max_iters", "max_epochs", "opt_estimate_iters",
              "loss_chunk_size", "max_norm", "weight_decay", "eps", "dataset_num_proc"):
        _require(c[k] >= 0, f"config key {k} must be >= 0 (0 = off or automatic), got {c[k]}")
    _require(c["dist_timeout_s"] > 0, f"config key dist_timeout_s must be > 0, got {c['dist_timeout_s']}")
    _require(c["max_iters"] > 0 or c["max_epochs"] > 0, "config keys max_iters and max_epochs are both 0: nothing to train")
    _require(0 <= c["eval_frac"] < 1, f"config key eval_frac must lie in [0, 1), got {c['eval_frac']}")
    _require(0 <= c["warmup_ratio"] <= 1, f"config key warmup_ratio must lie in [0, 1], got {c['warmup_ratio']}")
    _require(c["learning_rate"] >= 0, f"config key learning_rate must be >= 0, got {c['learning_rate']}")
    per_step = c["micro_train_batch_size"] * world_size
    _require(c["train_batch_size"] % per_step == 0, f"config key train_batch_size ({c['train_batch_size']}) must be a "
             f"multiple of micro_train_batch_size x world size ({per_step})")
    _require(c["zero_stage"] in (0, 1, 2, 3), f"config key zero_stage must be 0..3, got {c['zero_stage']}")
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
        _require(0 < c["select_ratio"] <= 1, f"config key select_ratio must lie in (0, 1], got {c['select_ratio']}")
    for i, kind in enumerate(kinds, 1):
        o, spec = objective_keys(c, i, per_objective), objectives.KINDS[kind]
        _require(o.dataset != "", f"config key dataset_{i} (or dataset) must be set for objective {i} ({kind})")
        _require(o.max_len > 0, f"config key max_len_{i} (or max_len) must be > 0, got {o.max_len}")
        _require(spec.reference != "required" or o.ref_model or c["lora_rank"], f"objective {i} is {kind}: set "
                 f"ref_model_{i} (or ref_model) to the teacher (or train LoRA adapters: the base model is the teacher)")
        _require(o.budget < 0 or method == "constrained", f"config key budget_{i} is set, but method={method!r}: "
                 f"a forgetting budget needs method=constrained")
        spec.check(i, o)
    if method == "constrained" and K > 1:
        budgets = [i for i in range(1, K + 1) if objective_keys(c, i, per_objective).budget >= 0]
        _require(budgets, "method=constrained needs a forgetting budget: set budget_i >= 0 (the largest gap f_i - f_i* "
                 "objective i may end with) for at least one objective, e.g. --budget_1=0.1")
        _require(c["dual_lr"] > 0, f"config key dual_lr must be > 0, got {c['dual_lr']}")
    return kinds
