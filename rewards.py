"""
Rewards of an online objective (obj_i=grpo): functions of the decoded text, or a reward model.

    reward_fn_1 = "exact_answer"                          # one shipped below
    reward_fn_1 = "exact_answer,answer_format"            # several, summed with reward_weights_1 (default 1 each)
    reward_fn_1 = "my_rewards.py:score"                   # a function in a file (path relative to the caller)
    reward_fn_1 = "my_package.rewards:score"              # or in an importable module
    reward_model_1 = "path/to/a/sequence-classification/checkpoint"

A reward function is called as TRL calls one: fn(prompts=[...], completions=[...], **columns),
prompts and completions the decoded texts of the batch (a prompt repeated once per completion),
columns the rows' other fields (each a list, one value per completion), and returns one number per
completion. A function that raises, returns a wrong count or a non-finite value stops the run with
one line naming the function (and the row).
"""
import importlib
import importlib.util
import math
import os
import re

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

def exact_answer(prompts, completions, answer=None, solution=None, **_):
    """1.0 when the completion's final answer (final_answer) equals the row's `answer` column (or
    `solution`, as NuminaMath names it), else 0.0. A column holding a worked solution (GSM8K's
    '... #### 72', MATH's '... \\boxed{72}') is cut to its final answer first."""
    refs = answer if answer is not None else solution
    if refs is None:
        raise KeyError("exact_answer needs an 'answer' or 'solution' column")
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

def char_match(prompts, completions, answer, **_):
    """partial credit: the share of positions where the completion's character equals the answer
    column's, over the longer of the two (1.0 = exactly the answer)."""
    score = lambda c, a: sum(x == y for x, y in zip(c, a)) / max(len(c), len(a), 1)
    return [score(c, str(a)) for c, a in zip(completions, answer)]

SHIPPED = {f.__name__: f for f in (exact_answer, answer_format, length, lowercase, char_match)}

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
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"config key {key}: cannot import module {where!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"config key {key}: {where!r} has no function {name!r}")
    return fn

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
        specs = [s.strip() for s in fn_spec.split(",") if s.strip()] if fn_spec else []
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

    def __call__(self, prompts, completions, columns):
        """(total reward (N,) float64, {name: mean}) of N completions; columns: one dict per completion."""
        n = len(completions)
        cols = {k: [c.get(k) for c in columns] for k in (columns[0] if columns else {})}
        total, parts = torch.zeros(n, dtype=torch.float64), {}
        for name, fn, w in zip(self.names, self.fns + [None], self.weights):
            if fn is None:  # the reward model, fed prompt + completion as one text
                from evalgen import reward_scores
                r = reward_scores(*self.model, [p + c for p, c in zip(prompts, completions)]).tolist()
            else:
                try:
                    r = fn(prompts=prompts, completions=completions, **cols)
                except Exception as e:  # noqa: BLE001 - the user's code: name it, stop the run
                    raise ConfigError(f"reward_fn_{self.i} {name!r} raised {type(e).__name__}: {e}") from None
            r = list(r) if r is not None else []
            if len(r) != n:
                raise ConfigError(f"reward_fn_{self.i} {name!r} returned {len(r)} values for {n} completions")
            for j, x in enumerate(r):
                try:
                    ok = math.isfinite(float(x))
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise ConfigError(f"reward_fn_{self.i} {name!r} returned {x!r} for completion {j} "
                                      f"(row {columns[j].get('_id', j) if columns else j}): not a finite number")
            r = torch.tensor([float(x) for x in r], dtype=torch.float64)
            parts[name] = float(r.mean()) if n else 0.0
            total += w * r
        return total, parts
