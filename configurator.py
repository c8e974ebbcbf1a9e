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
from dataclasses import dataclass

from errors import ConfigError, before_exit, one_line_errors  # noqa: F401 (the commands' one import)

MAX_OBJECTIVES = 8
DATA_FILES = (".jsonl", ".parquet", ".csv", ".tsv", ".arrow", ".txt", ".gz", ".zst")  # never run as a config

@dataclass(frozen=True)
class Key:
    """a config key's declaration where its owner declares it (a method's class, a kind's table entry):
    its default (which fixes its type), its rule as a refusal states it ("> 0", ">= 1", "[0, 1)",
    "finite", "one of a, b"; after "or" one more allowed value; after ";" what a special value means)
    and what it does."""
    default: object
    rule: str = ""
    doc: str = ""

def _closest(key, known):
    m = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean {m[0]!r}?)" if m else ""

def _coerce(key, value, default, where):
    """value of a known key, converted to the type of its default or an error naming both."""
    if default is None:  # an optional number (obj_opt: None = not given, estimate it)
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return None if value is None else float(value)
        raise ConfigError(f"{where}: config key {key!r} expects a number or None (default None), "
                          f"got {type(value).__name__} {value!r}")
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
    if default is None and text.strip().lower() in ("", "none"):
        return None
    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
        raise ConfigError(f"{where}: config key {key!r} expects {type(default).__name__} "
                         f"(default {default!r}), cannot read {text!r}") from None
    return _coerce(key, value, default, where)

def _is_config(name, value):
    return not name.startswith("_") and not isinstance(value, (types.ModuleType, types.FunctionType, type))

UNKNOWN = object()  # not a key (None is a default: obj_opt)

def _suffixed(key, config, per_objective):
    """KEY_i of a per-objective KEY, i in 1..MAX_OBJECTIVES: KEY's default; else UNKNOWN."""
    base, _, n = key.rpartition("_")
    if base in per_objective and base in config and n.isdigit() and 1 <= int(n) <= MAX_OBJECTIVES and n == str(int(n)):
        return config[base]
    return UNKNOWN

def _config_file(path, config):
    """the keys a config file sets: a .py file run with the config as its globals (what it
    assigns), or a run's config.json (every key in it). A data file or a directory is refused."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} not found")
    ext = os.path.splitext(path.removesuffix(os.sep))[1].lower()
    data = f"config files are .py (or a run's config.json); pass data as --dataset_1={path}"
    if os.path.isdir(path) or ext in DATA_FILES:
        raise ConfigError(
            f"{path} is {'a directory' if os.path.isdir(path) else 'a data file'}, not a config file: {data}"
        )
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

def usage(args, doc):
    """--help / -h among a command's arguments: print its docstring (its usage) and exit 0."""
    if any(a in ("--help", "-h") for a in args):
        print(doc.strip())
        raise SystemExit(0)

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
                if default is UNKNOWN:
                    raise ConfigError(f"{arg}: unknown config key {k!r}{_closest(k, known)} "
                                     f"(prefix helper names with '_')")
                config[k] = _coerce(k, v, default, arg)
                changed.append(k)
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"argument {arg!r}: expected --key=value")
            default = defaults[key] if key in defaults else _suffixed(key, defaults, per_objective)
            if default is UNKNOWN:
                raise ConfigError(f"unknown config key {key!r}{_closest(key, known)}")
            config[key] = _parse(key, text, default, f"--{key}")
            changed.append(key)
            if verbose:
                print(f"overriding: {key} = {config[key]!r}")
    return changed

# -----------------------------------------------------------------------------
# the range rules of numeric keys


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

def objective_keys(c, i, per_objective):
    """objective i's per-objective keys: KEY_i where set, else KEY."""
    return types.SimpleNamespace(**{k: c.get(f"{k}_{i}", c[k]) for k in per_objective})
