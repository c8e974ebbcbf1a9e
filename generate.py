"""
Batched generation from a trained run or any Hugging Face checkpoint, with a KV cache.

    python generate.py --out_dir=out/demo/alright --prompt="red fox" --temperature=0
    python generate.py --pretrain=DIR_OR_HUB_ID --prompts=in.jsonl --out=out.jsonl --max_new_tokens=64 --temperature=0
    python generate.py --out_dir=RUN --objective=1 --out=eval_gen_1.jsonl   # the run's held-out prompts

The model: --out_dir=RUN reads RUN/final (LoRA already merged there), or with --ckpt=latest (or
RUN/ckpt/iter_N) a checkpoint of the run on its base rebuilt as the run built it (its pretrain, or
its model_* keys from its seed); --pretrain=DIR_OR_HUB_ID any checkpoint, plus
--adapter=DIR for an unmerged PEFT-layout LoRA adapter (e.g. RUN/final/adapter).
Prompts: --prompt=TEXT, --prompts=FILE.jsonl (JSON lines, one JSON list of rows or one row; a row's
text is its prompt_key field, else the first of "prompt", input_key, "instruction"; a
{"messages": [...]} row ends with the user's turn, a trailing assistant turn is dropped), or
--objective=i: the rows the run held out of objective i (data.objective_splits, as train.py,
streaming included).
Formatting is train.py's: input_template (--input_template={} passes a prompt unchanged) or the
tokenizer's chat template (apply_chat_template: '' = the run's setting when --out_dir has one, else
input_template when given, else the chat template when the tokenizer has one). Output rows keep the
prompt row's fields and add `instruction` (the prompt text), `output` and `generator` (AlpacaEval's
format).
Stop: at eos, and at any of --stop (a JSON list of strings, else the string itself: '[/INST]' is
one stop string; matched on the text with special tokens; the output ends before it).
Limits: a prompt longer than the model's context (max_position_embeddings) is an error;
generation ends at the context length. An empty prompt text is an error, as is a stop string the
tokenizer cannot encode (it maps to the unknown token).
--out is refused when it exists (above all an input, or a run's metrics.jsonl / config.json /
final/) unless --overwrite=True, and is written whole then renamed. An --adapter already merged
into the model (a run's final/ given its own final/adapter) is refused. Bad input stops with one
line `error: ...` naming the key, or the file and line, and exit status 2, before the model loads.
Every default below is a config key: override it as --key=value (or in a config file).
"""
import json
import os
import sys

import torch

from decoding import format_prompt, generate_texts, parse_stop

# -----------------------------------------------------------------------------
out_dir = ""              # a training run: generates from out_dir/final
pretrain = ""             # or a HF checkpoint dir / hub id
adapter = ""              # a PEFT-layout LoRA adapter dir to apply on pretrain (unmerged)
ckpt = ""                 # with out_dir: a checkpoint of the run instead of final/ ('latest' or out_dir/ckpt/iter_N)
prompt = ""               # one prompt
prompts = ""              # a JSONL of prompt rows (or a .json list)
objective = 0             # i > 0: the eval split of the run's objective i (needs out_dir)
out = ""                  # JSONL of output rows (.json: one JSON list; '' = print); never an existing file unless
                          # overwrite
overwrite = False         # True: --out may replace an existing file
generator_name = ""       # the `generator` field ('' = the run's / checkpoint's name)
max_new_tokens = 64
temperature = 0.0         # 0 = greedy
top_k = 0                 # sample among the k most likely tokens (0 = all)
top_p = 1.0               # nucleus: the smallest set of tokens with probability >= top_p (1 = all)
stop = ""                 # a stop string, or a JSON list of them
num_samples = 1           # completions per prompt (rows get a `sample` index when > 1)
batch_size = 32
seed = 1337
prompt_key = ""           # '' = "prompt", else input_key, else "instruction"
input_key = "input"
input_template = "User: {}\nAssistant: "  # train.py's input_template_1 default
apply_chat_template = ""  # '' = auto (see above) | true | false
max_prompts = 0           # 0 = all
device = ""               # '' = cuda when available, else cpu
dtype = ""                # '' = bfloat16 where the GPU supports it, else float32 | float16 | float64
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]

# -----------------------------------------------------------------------------
# loading

def run_config(run_dir):
    p = os.path.join(run_dir, "config.json")
    if not os.path.exists(p):
        return {}
    with open(p) as f:
        return json.load(f)

def obj_key(cfg, key, i):
    """a per-objective key of a run's config: key_i, else ('' or absent, as input_key_2) key."""
    v = cfg.get(f"{key}_{i}")
    return cfg.get(key) if v is None or v == "" else v

def checkpoint_path(out_dir, ckpt):
    """the checkpoint dir of --ckpt (out_dir/ckpt/iter_N, or 'latest') and the run's config."""
    import checkpoint
    cfg = run_config(out_dir)
    if not cfg:
        raise ValueError(f"{out_dir}/config.json does not exist: a checkpoint needs the run's config")
    path = checkpoint.latest(os.path.join(out_dir, "ckpt")) if ckpt == "latest" else ckpt
    if not path or not os.path.exists(os.path.join(path, "model.pt")):
        raise ValueError(f"no checkpoint at {path or os.path.join(out_dir, 'ckpt')} (a dir with model.pt)")
    return path, cfg

def model_from_checkpoint(out_dir, ckpt):
    """(model, tokenizer, path) of a run's checkpoint (out_dir/ckpt/iter_N, or 'latest'): the model
    the run started from (its pretrain, or a fresh one of its model_* keys, built as train.py builds
    it: from its seed) with the checkpoint's trained weights; LoRA adapters merged. A LoRA
    checkpoint holds the adapters alone, so a fresh base must be the run's to the bit."""
    from model import GPT, Config, load_tokenizer
    path, cfg = checkpoint_path(out_dir, ckpt)
    tok = load_tokenizer(cfg.get("pretrain", ""))
    with torch.random.fork_rng(devices=[]):  # the run's initial weights; the caller's random state is kept
        torch.manual_seed(cfg.get("seed", 42))
        if cfg.get("pretrain"):
            model = GPT.from_pretrained(cfg["pretrain"])
        else:
            g = lambda k: cfg[f"model_{k}"]
            model = GPT(Config(vocab_size=len(tok), n_layer=g("n_layer"), n_head=g("n_head"), n_kv_head=g("n_kv_head"),
                               n_embd=g("n_embd"), head_dim=g("n_embd") // g("n_head"),
                               intermediate_size=g("intermediate_size"), max_position_embeddings=g("max_len"),
                               norm_eps=1e-5))
        if cfg.get("lora_rank"):
            from lora import inject
            inject(model, cfg["lora_rank"], cfg["lora_alpha"], 0.0, cfg["target_modules"])
    sd = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
    bad = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False).unexpected_keys
    if bad:
        raise ValueError(f"{path}/model.pt holds {bad[:3]}, which the run's model has not")
    if cfg.get("lora_rank"):
        from lora import merge
        model = merge(model)
    return model, tok, path

def check_adapter(path, adapter):
    """--adapter on the checkpoint at path: a PEFT-layout dir, and not the adapter already merged
    into path. train.py's final/ holds the merged weights and, in final/adapter, the adapter it
    merged: the same adapter applied again doubles its update. Compared by content, so copies of
    either are recognized."""
    import filecmp
    given = os.path.join(adapter, "adapter_model.safetensors")
    if not (os.path.isfile(os.path.join(adapter, "adapter_config.json")) and os.path.isfile(given)):
        raise ValueError(f"adapter: {adapter} is not a PEFT-layout LoRA adapter dir (adapter_config.json and "
                         f"adapter_model.safetensors)")
    own = os.path.join(path, "adapter", "adapter_model.safetensors")
    if os.path.isfile(own) and filecmp.cmp(own, given, shallow=False):
        with open(os.path.join(adapter, "adapter_config.json")) as f:
            base = json.load(f).get("base_model_name_or_path") or "the run's base model"
        raise ValueError(f"adapter: {adapter} is already merged into {path} ({os.path.join(path, 'adapter')} holds the "
                         f"same weights); generate from {path} without --adapter, or apply the adapter to {base}")

def model_source(out_dir="", pretrain="", adapter="", ckpt=""):
    """(the checkpoint dir or hub id the model loads from, the one its tokenizer loads from), each
    argument checked before anything is loaded."""
    if ckpt:
        if not out_dir:
            raise ValueError("ckpt: give the run's --out_dir too (its config.json builds the model)")
        if adapter:
            raise ValueError(
                "adapter: a checkpoint of a LoRA run merges its own adapters; give --adapter with --pretrain"
            )
        path, cfg = checkpoint_path(out_dir, ckpt)
        return path, cfg.get("pretrain", "")
    if out_dir:
        path = os.path.join(out_dir, "final")
        if not os.path.isdir(path):
            raise ValueError(f"{path} does not exist: train first (python train.py ... --out_dir={out_dir}) "
                             f"or pass --pretrain=<HF checkpoint dir or hub id>")
    elif pretrain:
        path = pretrain
    else:
        raise ValueError("give --out_dir=RUN (its final/) or --pretrain=<HF checkpoint dir or hub id>")
    if adapter:
        check_adapter(path, adapter)
    return path, path

def load_model(out_dir="", pretrain="", adapter="", device="cpu", dtype=torch.float32, ckpt=""):
    """(model, tokenizer, path) from out_dir/final, a checkpoint of out_dir, or pretrain (+ a PEFT
    adapter)."""
    from model import GPT, load_tokenizer
    path, _ = model_source(out_dir, pretrain, adapter, ckpt)
    if ckpt:
        model, tok, path = model_from_checkpoint(out_dir, ckpt)
        return model.to(device=device, dtype=dtype).eval(), tok, path
    model = GPT.from_pretrained(path, dtype=dtype, device=device)
    if adapter:
        from lora import load_adapter, merge
        load_adapter(model, adapter)
        model = merge(model).to(device=device, dtype=dtype)
    return model.eval(), load_tokenizer(path), path

def _json_value(text):
    try:
        json.loads(text)
        return True
    except ValueError:
        return False

def read_prompts_file(path):
    """(rows, where each row is: 'FILE, line N' or 'FILE, item N') of a prompts file: JSON lines,
    one JSON list of objects (AlpacaEval ships its prompts so), or one JSON object (one row). What
    is wrong (not UTF-8, malformed JSON, a row that is not an object, no rows) names the file and
    line."""
    import data as D
    if not os.path.isfile(path):
        raise ValueError(f"prompts: {path}: no such file")
    with open(path, "rb") as f:
        text = D._decode(path, f.read())
    # data.py's JSON lines: one row per non-blank line
    lines = [n for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise ValueError(f"prompts: {path}: no prompt rows (the file is empty)")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:  # JSON lines (their second value is 'Extra data'), or a broken document
        whole = None
        if e.msg != "Extra data" and not _json_value(text.split("\n")[lines[0] - 1]):
            raise ValueError(f"{path}, line {e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    if isinstance(whole, dict):
        return [whole], [f"{path}, line {lines[0]}"]
    if isinstance(whole, list):
        for j, r in enumerate(whole, 1):
            if not isinstance(r, dict):
                raise ValueError(f"{path}, item {j} of its list: expected a JSON object (a prompt row), found "
                                 f"{type(r).__name__} {json.dumps(r)[:40]}")
        if not whole:
            raise ValueError(f"prompts: {path}: no prompt rows (an empty list)")
        return whole, [f"{path}, item {j}" for j in range(1, len(whole) + 1)]
    return D._read_jsonl(path, text), [f"{path}, line {n}" for n in lines]

def held_out_rows(run_cfg, i):
    """(rows, where each row is) that train.py held out of the run's objective i: the same
    function of the same keys (data.objective_splits), streaming included; nothing else is read."""
    import configurator
    import data as D
    import methods
    import objectives
    if not run_cfg:
        raise ValueError("objective: needs --out_dir of a run (its config.json names the data)")
    keys = objectives.per_objective_keys()
    o = configurator.objective_keys({**keys, **run_cfg}, i, keys)  # KEY_i where the run set it, else KEY
    K = sum(bool(run_cfg.get(f"obj_{j}", "sft" if j == 1 else "")) for j in range(1, configurator.MAX_OBJECTIVES + 1))
    if not 1 <= i <= K:
        raise ValueError(f"objective: --objective={i}, but the run trained {K} objective(s) (1 to {K})")
    if not o.dataset:
        raise ValueError(f"objective: the run has no dataset_{i}")
    method = methods.make(run_cfg.get("method", "alright"), (1 / K,) * K, **run_cfg)  # which rows it held out
    frac = method.eval_frac(i, run_cfg.get("eval_frac", 0.0))
    _, rows = D.objective_splits(
        o, run_cfg.get("seed", 42), frac, run_cfg.get("streaming", False), lazy=True, _train=False
    )
    rows = list(rows)
    if not rows:
        why = (f"method={method.name} holds out none of dataset_{i}" if method.eval_frac(i, 1.0) == 0 else
               f"eval_frac=0 and no eval_split_{i}")
        raise ValueError(f"objective: the run held out no rows of objective {i} ({why})")
    source = o.eval_split if o.eval_split and D._is_dataset(o.eval_split) else o.dataset
    return ([{k: v for k, v in r.items() if k != "_id"} for r in rows],  # _id: data.py's bookkeeping
            [f"{source}, row {r.get('_id', j)} (held out of objective {i})" for j, r in enumerate(rows)])

def read_prompt_rows(prompt="", prompts="", objective=0, run_cfg=None, where=False):
    """the prompt rows of --prompt, --prompts or --objective (and, with where=True, where each is,
    for errors). Exactly one of them."""
    given = [k for k, v in (("--prompt", prompt), ("--prompts", prompts), ("--objective", objective)) if v]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)}: give one source of prompts")
    if prompt:
        rows, places = [{"prompt": prompt}], ["--prompt"]
    elif prompts:
        rows, places = read_prompts_file(prompts)
    elif objective:
        rows, places = held_out_rows(run_cfg, objective)
    else:
        raise ValueError("give --prompt=TEXT, --prompts=FILE.jsonl or --objective=i")
    return (rows, places) if where else rows

def check_out(out, overwrite, inputs=(), runs=()):
    """--out: a file name (not a directory), and, unless overwrite, no existing file: above all
    not an input (the prompts file) nor a file of a run (its metrics.jsonl, config.json, final/)."""
    if not out:
        return
    if os.path.isdir(out) or out.endswith(("/", os.sep)):
        raise ValueError(f"out: {out} is a directory; give a file name (.jsonl, or .json for one JSON list)")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"out: {parent} is a file, so {out} cannot be written")
    if overwrite or not os.path.exists(out):
        return
    what = "exists"
    if any(os.path.exists(p) and os.path.samefile(out, p) for p in inputs):
        what = "is the prompts file this reads"
    else:
        d = os.path.dirname(os.path.abspath(out))
        while d != os.path.dirname(d):  # a run: a dir of --out_dir, or one holding metrics.jsonl
            if any(os.path.isdir(r) and os.path.samefile(d, r) for r in runs) or os.path.exists(
                os.path.join(d, "metrics.jsonl")
            ):
                what = f"is a file of the run {d}"
                break
            d = os.path.dirname(d)
    raise ValueError(f"out: {out} {what}; pass --overwrite=True to replace it, or name another file")

def write_rows(out, rows):
    """rows to out (.json: one JSON list, AlpacaEval's model_outputs; else JSON lines), written
    beside it and renamed: an interrupted write leaves the previous file whole."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            if out.endswith(".json"):
                json.dump(rows, f, ensure_ascii=False, indent=1)
            else:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def main(argv):
    import checks
    import configurator
    from model import load_tokenizer
    c = {k: globals()[k] for k in config_keys}
    changed = set(configurator.apply(argv, c))
    # every check that needs no model first: a bad key, --out, the prompts, their formatting, --stop
    for k, ok, want in (("temperature", c["temperature"] >= 0, ">= 0 (0 = greedy)"),
                        ("max_new_tokens", c["max_new_tokens"] > 0, "> 0"),
                        ("top_p", 0 < c["top_p"] <= 1, "in (0, 1]"), ("top_k", c["top_k"] >= 0, ">= 0 (0 = off)"),
                        ("batch_size", c["batch_size"] >= 1, ">= 1"), ("num_samples", c["num_samples"] >= 1, ">= 1"),
                        ("max_prompts", c["max_prompts"] >= 0, ">= 0 (0 = all)"),
                        ("objective", c["objective"] >= 0, ">= 1 (0 = off)"),
                        ("dtype", c["dtype"] in ("", "float32", "bfloat16", "float16", "float64"),
                         "float32, bfloat16, float16 or float64")):
        if not ok:
            raise ValueError(f"--{k} must be {want}, got {c[k]!r}")
    check_out(c["out"], c["overwrite"], [c["prompts"]] if c["prompts"] else [], [c["out_dir"]] if c["out_dir"] else [])
    path, tok_path = model_source(c["out_dir"], c["pretrain"], c["adapter"], c["ckpt"])
    key = "pretrain" if c["pretrain"] and not c["out_dir"] else "out_dir"
    if tok_path and not os.path.exists(tok_path) and not checks._hub_id(tok_path):
        raise ValueError(f"{key}: {tok_path}: no such directory (nor a hub id)")
    try:
        tok = load_tokenizer(tok_path)
    except OSError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{key}: no tokenizer at {tok_path!r} (a checkpoint dir or hub id): {first}") from None
    run_cfg = run_config(c["out_dir"]) if c["out_dir"] else {}
    i = c["objective"] or 1
    # the run's formatting unless given here
    if run_cfg and "input_template" not in changed and obj_key(run_cfg, "input_template", i) is not None:
        c["input_template"] = obj_key(run_cfg, "input_template", i)
    if run_cfg and "input_key" not in changed and c["objective"]:
        c["input_key"] = obj_key(run_cfg, "input_key", i) or c["input_key"]
    if run_cfg and "prompt_key" not in changed and c["objective"]:
        from objectives import KINDS  # the key that holds a row's prompt, as the objective's kind says
        kind = KINDS.get(obj_key(run_cfg, "obj", i))
        c["prompt_key"] = obj_key(run_cfg, kind.prompt_key if kind else "input_key", i) or ""
    chat = c["apply_chat_template"].lower()
    if chat not in ("", "true", "false"):
        raise ValueError(f"apply_chat_template: {c['apply_chat_template']!r} is not '', true or false")
    if chat == "":
        run_chat = obj_key(run_cfg, "apply_chat_template", i) if run_cfg else None
        chat = bool(run_chat) if run_chat is not None else "input_template" not in changed and bool(tok.chat_template)
    else:
        chat = chat == "true"
    rows, places = read_prompt_rows(c["prompt"], c["prompts"], c["objective"], run_cfg, where=True)
    if c["max_prompts"]:
        rows = rows[:c["max_prompts"]]
    shown, texts = zip(*[format_prompt(tok, r, j, c["prompt_key"], c["input_key"], c["input_template"], chat, where=w)
                         for j, (r, w) in enumerate(zip(rows, places))])
    stops = parse_stop(tok, c["stop"])
    dev = c["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = c["dtype"] or ("bfloat16" if dev.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32")
    model, tok, path = load_model(c["out_dir"], c["pretrain"], c["adapter"], dev, getattr(torch, dt), c["ckpt"])
    torch.manual_seed(c["seed"])
    gen = torch.Generator(device=dev).manual_seed(c["seed"])
    n = c["num_samples"] if c["temperature"] > 0 else 1
    outs = generate_texts(model, tok, [t for t in texts for _ in range(n)], c["max_new_tokens"], c["batch_size"],
                          stops, temperature=c["temperature"], top_k=c["top_k"], top_p=c["top_p"], generator=gen)
    name = c["generator_name"] or os.path.basename(os.path.normpath(c["out_dir"] or path))
    result = []
    for j, row in enumerate(rows):
        for s in range(n):
            r = {**row, "instruction": row.get("instruction", shown[j]), "output": outs[j * n + s], "generator": name}
            if n > 1:
                r["sample"] = s
            result.append(r)
    if c["out"]:
        write_rows(c["out"], result)
    else:
        for j, r in enumerate(result):
            print(texts[j // n] + r["output"])
            print("---------------")
    return result

if __name__ == "__main__":
    import configurator
    configurator.usage(sys.argv[1:], __doc__)
    try:
        main(sys.argv[1:])
    except ValueError as e:  # bad input (configurator.ConfigError and data.py's errors included): one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
