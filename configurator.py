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
