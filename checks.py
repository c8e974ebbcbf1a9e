"""
Every check of train.py's config, before anything is read or loaded: each key's range (declared
where the key is: train.py's own keys, a method's class, a kind's table entry), then the
combinations, each a ConfigError naming the key. A method checks its own combinations
(methods.py: its `check`), a kind its own keys (objectives.py: its entry's `check`).
"""
import json
import math
import os

import data
import methods
import objectives
import quant
from configurator import MAX_OBJECTIVES, check_range, objective_keys
from errors import ConfigError

def _require(cond, msg):
    if not cond:
        raise ConfigError(msg)

def all_rules(run_rules):
    """every key's rule as its refusal states it: the run's own keys' (train.py's `rules`), each
    method's keys and per-objective keys (declared in its class), each objective's (objectives.py:
    the common keys, each kind's in its table entry)."""
    out = {**run_rules, **objectives.rules()}
    for m in methods.METHODS.values():
        out.update({k: key.rule for k, key in {**m.keys, **m.objective_keys}.items() if key.rule})
    return out

def check_value(name, v, rule):
    """a ConfigError naming the key where v breaks its rule: a string not among a rule's choices
    ("one of a, b"), a number (or a value of the tuple v) out of its range."""
    if rule.startswith("one of "):
        choices = [x.strip() for x in rule[len("one of "):].partition(";")[0].split(",")]
        _require(v in choices, f"config key {name}: {v!r} is not one of {', '.join(choices)}")
    else:
        check_range(name, v, rule)

def check_ranges(c, per_objective, kinds, run_rules):
    """every key against its rule: first each objective's own keys as it resolves them (KEY_i, else
    KEY: named 'KEY_i (or KEY)'), then every other key set, under its own name."""
    done, rule = set(), all_rules(run_rules)
    for i, kind in enumerate(kinds, 1):
        for k in (*objectives.COMMON_KEYS, *objectives.KINDS[kind].keys, *methods.per_objective_keys()):
            if k in rule:
                name = f"{k}_{i}" if f"{k}_{i}" in c else f"{k}_{i} (or {k})"
                check_value(name, c.get(f"{k}_{i}", c[k]), rule[k])
                done.add(f"{k}_{i}")
    for k, v in c.items():
        base = k if k in rule else k.rpartition("_")[0] if k.rpartition("_")[0] in per_objective else ""
        if base in rule and k not in done:
            check_value(k, v, rule[base])

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

def _hub_id(name):
    # a name the hub could hold ('name' or 'org/name'): what is not one is a local path
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(name)
        return True
    except ValueError:
        return False

def check(c, per_objective, run_rules, world_size=1):
    """train.py's config c (its per-objective keys, and the rules of its own keys): every key's rule
    and every combination, each a ConfigError naming the key. Runs before a model or a dataset is
    loaded. Returns the objectives' kinds [obj_1 .. obj_K]."""
    import torch
    kinds = [c[f"obj_{i}"] for i in range(1, MAX_OBJECTIVES + 1)]
    K = sum(map(bool, kinds))
    for i, v in enumerate(kinds, 1):
        if v:
            objectives.kind(v, f"obj_{i}")
    _require(bool(kinds[0]), "config key obj_1 must be set")
    gap = kinds.index("") + 1 if "" in kinds else None
    _require(
        all(kinds[:K]),
        f"config keys obj_1 ... obj_{K}: objectives are numbered 1..K without gaps, obj_{gap} is not set",
    )
    kinds = kinds[:K]
    method = c["method"]
    _require(method in methods.METHODS, f"config key method: {method!r} is not one of {', '.join(methods.METHODS)}")
    w = methods.weights(c["lambd"], K)  # K weights on the simplex, or a ConfigError naming lambd
    for k, v in c.items():  # the configurator lets a float key take a tuple: only lambd may
        _require(not isinstance(v, tuple) or k in ("lambd", "adam_betas"),
                 f"config key {k}: one number, got {v!r} (only lambd takes one weight per objective)")
    _require(
        len(c["adam_betas"]) == 2, f"config key adam_betas: two values (beta1, beta2) in [0, 1), got {c['adam_betas']}"
    )
    check_ranges(c, per_objective, kinds, run_rules)
    _require(c["out_dir"].strip() != "", "config key out_dir must name a directory, got ''")
    dev = c["device"]
    _require(not dev.startswith("cuda") or torch.cuda.is_available(), f"config key device: {dev!r}, but this torch "
             f"({torch.__version__}) sees no CUDA device; use --device=cpu or leave device empty")
    _require(c["dtype"] in ("", "float32", "bfloat16", "float64"),
             f"config key dtype: {c['dtype']!r} is not float32, bfloat16 or float64" + (
                 " (float16 gradients underflow without loss scaling, which train.py does not do: use bfloat16, "
                 "or float32 where the GPU has no bfloat16)" if c["dtype"] == "float16" else ""))
    _require(
        c["max_iters"] > 0 or c["max_epochs"] > 0, "config keys max_iters and max_epochs are both 0: nothing to train"
    )
    _require(c["pretrain"] or c["model_n_head"] % c["model_n_kv_head"] == 0,
             f"config key model_n_kv_head ({c['model_n_kv_head']}) must divide model_n_head ({c['model_n_head']}): "
             f"each key/value head serves a group")
    if c["pareto_front"]:
        pareto_points(c["pareto_front"], K)
        _require(c["eps"] > 0, f"config key pareto_front={c['pareto_front']!r} is set, but eps=0 (early stop off): "
                 f"set eps > 0 (e.g. --eps=1e-4)")
    # loaded after training, else
    for k in sorted(k for k in c if k == "reward_model" or k.startswith("reward_model_")):
        _require(not c[k] or os.path.exists(c[k]) or _hub_id(c[k]), f"config key {k}: {c[k]!r} is neither a local "
                 f"path that exists nor a hub id")
    per_step = c["micro_train_batch_size"] * world_size
    _require(c["train_batch_size"] % per_step == 0, f"config key train_batch_size ({c['train_batch_size']}) must be a "
             f"multiple of micro_train_batch_size x world size ({per_step})")
    _require(not c["cpu_offload"] or c["zero_stage"] >= 2, f"config keys cpu_offload=True and "
             f"zero_stage={c['zero_stage']}: offloading is FSDP2's, set zero_stage=2 or 3")
    _require(not (c["resume"] and c["overwrite"]), "config keys resume and overwrite exclude each other: resume "
             "continues the run in out_dir, overwrite replaces it")
    objective = lambda i: objective_keys(c, i, per_objective)
    methods.METHODS[method].check(c, kinds, world_size, objective)
    m = methods.make(method, w, **c)
    for i, kind in enumerate(kinds, 1):
        o, spec = objective(i), objectives.KINDS[kind]
        _require(o.dataset != "", f"config key dataset_{i} (or dataset) must be set for objective {i} ({kind})")
        named = lambda k: f"{k}_{i}" if f"{k}_{i}" in c else k  # the key the value came from
        data.check_blend(o.dataset, o.dataset_probs, named("dataset"), named("dataset_probs"),
                         unique=m.eval_frac(i, 1.0) == 0, own_probs=f"dataset_probs_{i}" in c)
        _require(spec.reference != "required" or o.ref_model or c["lora_rank"], f"objective {i} is {kind}: set "
                 f"ref_model_{i} (or ref_model) to the teacher (or train LoRA adapters: the base model is the teacher)")
        for other in methods.METHODS.values():  # another method's per-objective key (budget_i) would do nothing
            for k, key in other.objective_keys.items():
                _require(other.name == method or getattr(o, k) == key.default, f"config key {named(k)} is set, but "
                         f"method={method!r}: {k}_i belongs to method={other.name}")
                _require(K > 1 or getattr(o, k) == key.default, f"config key {named(k)} is set, but the run has one "
                         f"objective (obj_2 is empty): {k}_i belongs to method={other.name} over several objectives")
        for k in sorted(set(objectives.per_objective_keys()) - set(objectives.COMMON_KEYS) - set(spec.keys)):
            owners = [name for name, other in objectives.KINDS.items() if k in other.keys]
            _require(f"{k}_{i}" not in c, f"config key {k}_{i} is set, but objective {i} is {kind}: {k} is a key of "
                     f"{' / '.join(owners)} objectives")
        _require(o.obj_opt is None or spec.min_loss is None or o.obj_opt >= spec.min_loss, f"config key "
                 f"{named('obj_opt')}={o.obj_opt}: objective {i} ({kind}) has losses >= {spec.min_loss}, so f_{i}* "
                 f"cannot be {o.obj_opt} (unset it, or set none, to estimate f_{i}*)")
        spec.check(i, o)
        _require(c["micro_train_batch_size"] % spec.rows_per_example(o) == 0, f"config key micro_train_batch_size "
                 f"({c['micro_train_batch_size']}) must be a multiple of objective {i}'s rows per example "
                 f"({spec.rows_per_example(o)}: num_generations_{i} completions of each prompt)")
    for k, key in methods.per_objective_keys().items():  # budget_3 of a 2-objective run
        beyond = [j for j in range(K + 1, MAX_OBJECTIVES + 1) if c.get(f"{k}_{j}", key) != key]
        _require(not beyond, f"config key {k}_{beyond[0] if beyond else 0} is set, but the run has {K} objective(s)")
    for i in range(1, K + 1) if K > 1 else ():  # f_i* estimated as an eval loss needs an eval set
        o = objective(i)
        _require(not (m.needs(i) and o.obj_opt is None and not o.eval_split and c["eval_frac"] == 0),
                 f"method={method} estimates f_{i}* as objective {i}'s eval loss, but objective {i} has no eval set "
                 f"(eval_frac=0 and eval_split_{i} empty): set eval_frac > 0, eval_split_{i}, or obj_opt_{i} "
                 f"(a known f_{i}*)")
    spec = lambda i: objectives.KINDS[kinds[i - 1]]  # objective i's reference or teacher, whose weights quantize_i sets
    quant.check_keys(c, kinds, lambda i: spec(i).reference != "none" and spec(i).uses_reference(objective(i)))
    return kinds
