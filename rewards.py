"""
Rewards of an online objective (obj_i=grpo): functions of the decoded text, or a reward model.

    reward_fn_1 = "exact_answer"                          # one shipped below
    reward_fn_1 = "exact_answer,answer_format"            # several, summed with reward_weights_1 (default 1 each)
    reward_fn_1 = "my_rewards.py:score"                   # a function in a file (path relative to the caller)
    reward_fn_1 = "my_package.rewards:score"              # or in an importable module
    reward_model_1 = "path/to/a/sequence-classification/checkpoint"

A reward function is called as TRL calls one: fn(prompts=[...], completions=[...], **columns),
prompts and completions the decoded texts of the batch (a prompt repeated once per completion),
columns the rows' other fields (each a list, one value per completion: every column of the dataset,
None for a row that lacks it, as TRL passes a datasets column), plus completion_ids (the completions'
token ids) when its signature takes them or **kwargs; it returns one number per completion (a list,
tuple or 1-D tensor). A function that raises (sys.exit too), returns another type, a wrong count or a
non-finite value stops the run with one line naming the function (and the row); so does a reward
file that cannot be loaded (its line). A reward model sees prompt + completion cut to its context
from the left (the completion, which it scores at the last token, is kept).
"""
import importlib
import importlib.util
import inspect
import math
import os
import re
import traceback

import torch

from errors import ConfigError

# -----------------------------------------------------------------------------
# shipped reward functions

_HASHES = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")

def _last_boxed(text):
    # the content of the last \boxed{...}, braces balanced (\boxed{\frac{1}{2}}), or None
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None

def final_answer(text):
    """the final answer of a completion: after the last '####' (GSM8K style), else inside the last
    \\boxed{} (MATH style), else the last number in it; None when there is none."""
    found = _HASHES.findall(text)
    if found:
        return found[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    found = _NUMBER.findall(text)
    return found[-1] if found else None

def _same(a, b):
    norm = lambda x: str(x).strip().replace(",", "").rstrip(".")
    a, b = norm(a), norm(b)
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return a == b

class RowError(ValueError):
    """a shipped reward's complaint about completion `index` of its batch (Rewards names the row)."""

    def __init__(self, index, message):
        super().__init__(message)
        self.index = index

def _column(values, n, name):
    """a column as n values (one given for all alike), each present, else a RowError naming the first lacking it."""
    values = values if isinstance(values, list) else [values] * n
    for j, v in enumerate(values):
        if v is None:
            raise RowError(j, f"has no {name!r} value")
    return values

def exact_answer(prompts, completions, answer=None, solution=None, **_):
    """1.0 when the completion's final answer (final_answer) equals the row's `answer` column (or
    `solution`, as NuminaMath names it, where a row has no answer), else 0.0. A column holding a
    worked solution (GSM8K's '... #### 72', MATH's '... \\boxed{72}') is cut to its final answer first."""
    n = len(completions)
    if answer is None and solution is None:
        raise RowError(0, "exact_answer needs an 'answer' or a 'solution' column")
    a = answer if isinstance(answer, list) else [answer] * n
    b = solution if isinstance(solution, list) else [solution] * n
    refs = [x if x is not None else y for x, y in zip(a, b)]
    refs = _column(refs, n, "answer' or 'solution")
    ref = lambda a: final_answer(str(a)) if ("####" in str(a) or "\\boxed{" in str(a)) else str(a)
    return [float(final_answer(c) is not None and _same(final_answer(c), ref(a))) for c, a in zip(completions, refs)]

def answer_format(prompts, completions, **_):
    """1.0 when the completion ends with a final answer line '#### <number>', else 0.0."""
    return [float(re.search(r"####\s*-?[\d,]*\.?\d+\s*$", c) is not None) for c in completions]

def length(prompts, completions, target_chars=0, **_):
    """minus the distance of the completion's length in characters from target_chars (a column, or
    0: shorter is better), in units of 100 characters."""
    t = target_chars if isinstance(target_chars, list) else [target_chars] * len(completions)
    return [-abs(len(c) - int(n)) / 100.0 for c, n in zip(completions, t)]

def lowercase(prompts, completions, **_):
    """the share of the completion's characters that are lowercase letters a-z (0.0 for an empty one)."""
    return [sum("a" <= ch <= "z" for ch in c) / len(c) if c else 0.0 for c in completions]

def char_match(prompts, completions, answer=None, **_):
    """partial credit: the share of positions where the completion's character equals the answer
    column's, over the longer of the two (1.0 = exactly the answer)."""
    if answer is None:
        raise RowError(0, "char_match needs an 'answer' column")
    score = lambda c, a: sum(x == y for x, y in zip(c, a)) / max(len(c), len(a), 1)
    return [score(c, str(a)) for c, a in zip(completions, _column(answer, len(completions), "answer"))]

def overlong(prompts, completions, completion_ids=None, max_new_tokens=0, overlong_buffer=0, **_):
    """DAPO's soft overlong punishment of a completion of n tokens (its eos included), with L =
    max_new_tokens and B = overlong_buffer (0: L // 5): 0 up to L - B tokens, then (L - B - n) / B,
    falling linearly to -1 at n = L (and -1 beyond). Added to the other rewards (reward_weights)."""
    L = int(max_new_tokens)
    B = int(overlong_buffer) or max(1, L // 5)
    if completion_ids is None or L < 1:
        raise RowError(0, "overlong needs the completions' token ids and max_new_tokens (a grpo objective's)")
    return [0.0 if len(ids) <= L - B else max(-1.0, (L - B - len(ids)) / B) for ids in completion_ids]

SHIPPED = {f.__name__: f for f in (exact_answer, answer_format, length, lowercase, char_match, overlong)}
SETTINGS = ("max_new_tokens", "overlong_buffer")  # the objective's keys a shipped reward may take

def names(spec):
    """the reward functions named in a reward_fn value: comma-separated, blanks dropped."""
    return [s.strip() for s in (spec or "").split(",") if s.strip()]

# -----------------------------------------------------------------------------
# loading

def load_function(spec, key="reward_fn"):
    """the function named by spec: a shipped name, 'path/to/file.py:function' or 'module:function'."""
    if spec in SHIPPED:
        return SHIPPED[spec]
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(f"config key {key}: {spec!r} is neither a shipped reward ({', '.join(SHIPPED)}) nor "
                          f"'file.py:function' / 'module:function'")
    if where.endswith(".py"):
        path = os.path.abspath(where)
        if not os.path.exists(path):
            raise ConfigError(f"config key {key}: reward file {where!r} not found")
        mod_spec = importlib.util.spec_from_file_location(f"_bipost_reward_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's file: name it and its line, stop the run
            raise ConfigError(f"config key {key}: reward file {where!r} {_load_failure(e, path)}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"config key {key}: cannot import module {where!r} ({_first_line(e)})") from None
        except (Exception, SystemExit) as e:  # noqa: BLE001
            failure = _load_failure(e, getattr(e, "filename", None))
            raise ConfigError(f"config key {key}: module {where!r} {failure}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"config key {key}: {where!r} has no function {name!r}")
    return fn

def _first_line(e):
    return (str(e).strip().splitlines() or [""])[0]

def _failure(e):
    if isinstance(e, SystemExit):
        return f"called sys.exit({e.code!r})"
    return f"raised {type(e).__name__}: {_first_line(e)}" if str(e).strip() else f"raised {type(e).__name__}"

def _load_failure(e, path):
    """what went wrong loading a reward file, with its line: a syntax error's, or the file's last frame."""
    if isinstance(e, SyntaxError) and e.lineno is not None:
        return f"line {e.lineno}: {type(e).__name__}: {e.msg}"
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if path and os.path.abspath(f.filename) == path]
    return f"failed to load{f' at line {lines[-1]}' if lines else ''}: {_failure(e)}"

def _takes(fn, name):
    """fn's signature names `name` (or, for completion_ids, takes **kwargs, as TRL passes it to every function)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or (name == "completion_ids" and any(p.kind == p.VAR_KEYWORD for p in params.values()))

def parse_weights(text, n, key="reward_weights"):
    """reward_weights: '' (1 each) or n comma-separated finite numbers."""
    if text in ("", None):
        return [1.0] * n
    try:
        w = [float(x) for x in str(text).strip("()[] ").split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"config key {key}: {text!r} is not a comma-separated list of numbers") from None
    if len(w) != n or not all(math.isfinite(x) for x in w):
        raise ConfigError(f"config key {key}: {text!r} must be {n} finite number(s), one per reward function")
    return w

class Rewards:
    """the reward of objective i: a weighted sum of functions and/or a reward model's score."""

    def __init__(self, fn_spec="", weights="", model="", i=1, device="cpu"):
        specs = names(fn_spec)
        if not specs and not model:
            raise ConfigError(f"config key reward_fn_{i}: {fn_spec!r} names no reward function, and no "
                              f"reward_model_{i} is set: every reward would be 0")
        self.names = specs + ([f"reward_model:{model}"] if model else [])
        self.fns = [load_function(s, f"reward_fn_{i}") for s in specs]
        self.weights = parse_weights(weights, len(self.names), f"reward_weights_{i}")
        self.model, self.i, self.device = None, i, device
        if model:
            from evalgen import load_reward_model
            try:
                self.model = load_reward_model(model, device)
            except (OSError, ValueError) as e:  # not a checkpoint, or not one score per text
                raise ConfigError(f"config key reward_model_{i} (or reward_model): {e}") from None
            self.model[1].truncation_side = "left"  # a text longer than its context keeps the completion

    def model_scores(self, texts, batch_size=16):
        """[N] float64: the reward model's score of each text (its own tokenizer), cut to its context."""
        rm, tok = self.model
        ctx = [n for n in (getattr(rm.config, k, None) for k in ("max_position_embeddings", "n_positions"))
               if isinstance(n, int) and n > 0]
        ctx = min(ctx) if ctx else None
        dev, out = next(rm.parameters()).device, []
        with torch.no_grad():
            for j in range(0, len(texts), batch_size):
                enc = tok(texts[j:j + batch_size], return_tensors="pt", padding=True, truncation=ctx is not None,
                          max_length=ctx).to(dev)
                out.append(rm(**enc).logits[:, 0].double())
        return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.float64)

    def __call__(self, prompts, completions, columns, completion_ids=None, **settings):
        """(total reward (N,) float64, {name: its rewards (N,)}) of N completions; columns: one dict per
        completion, passed per column over the union of their keys (None where a row lacks one);
        completion_ids: the token ids, for the functions that take them; settings: the objective's
        max_new_tokens / overlong_buffer, for the shipped rewards that name them."""
        n = len(completions)
        keys = list(dict.fromkeys(k for c in columns for k in c))
        cols = {k: [c.get(k) for c in columns] for k in keys}
        row = lambda j: columns[j].get("_id", j) if j < len(columns) else j
        total, parts = torch.zeros(n, dtype=torch.float64), {}
        for name, fn, w in zip(self.names, self.fns + [None], self.weights):
            if fn is None:  # the reward model, fed prompt + completion as one text
                r = self.model_scores([p + c for p, c in zip(prompts, completions)]).tolist()
            else:
                shipped = fn in SHIPPED.values()
                extra = {k: v for k, v in settings.items() if shipped and k in SETTINGS and _takes(fn, k)}
                if completion_ids is not None and _takes(fn, "completion_ids"):
                    extra["completion_ids"] = completion_ids
                try:
                    r = fn(prompts=prompts, completions=completions, **cols, **extra)
                except RowError as e:
                    raise ConfigError(f"reward_fn_{self.i} {name!r}: row {row(e.index)} {e}") from None
                except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code: name it, stop the run
                    raise ConfigError(f"reward_fn_{self.i} {name!r} {_failure(e)}") from None
                if torch.is_tensor(r) or type(r).__module__ == "numpy":
                    r = r.tolist() if getattr(r, "ndim", 1) == 1 else r
                if not isinstance(r, (list, tuple)):
                    raise ConfigError(f"reward_fn_{self.i} {name!r} returned a {type(r).__name__}; a reward function "
                                      f"returns a list of {n} numbers, one per completion")
            if len(r) != n:
                raise ConfigError(f"reward_fn_{self.i} {name!r} returned {len(r)} values for {n} completions")
            for j, x in enumerate(r):
                try:
                    ok = math.isfinite(float(x))
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise ConfigError(f"reward_fn_{self.i} {name!r} returned {x!r} for completion {j} "
                                      f"(row {row(j)}): not a finite number")
            r = torch.tensor([float(x) for x in r], dtype=torch.float64)
            parts[name] = r
            total += w * r
        return total, parts
