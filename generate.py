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
input_template when given, else the chat template when the tokenizer has one). Output rows keep the prompt row's fields and add
`instruction` (the prompt text), `output` and `generator` (AlpacaEval's format).
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

from model import linear, softcap as cap

# -----------------------------------------------------------------------------
out_dir = ""              # a training run: generates from out_dir/final
pretrain = ""             # or a HF checkpoint dir / hub id
adapter = ""              # a PEFT-layout LoRA adapter dir to apply on pretrain (unmerged)
ckpt = ""                 # with out_dir: a checkpoint of the run instead of final/ ('latest' or out_dir/ckpt/iter_N)
prompt = ""               # one prompt
prompts = ""              # a JSONL of prompt rows (or a .json list)
objective = 0             # i > 0: the eval split of the run's objective i (needs out_dir)
out = ""                  # JSONL of output rows (.json: one JSON list; '' = print); never an existing file unless overwrite
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
# decoding

def sample_next(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None, uniform=None):
    """logits (B, V) float -> next tokens (B,). Temperature, then top-k, then top-p, as in
    transformers; temperature 0 is greedy. uniform: (B,) draws in [0, 1), one per row, used by
    inverse-CDF sampling instead of the generator (rollout.py: a row's draws then depend on its
    own key alone, not on the batch it is in)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = logits.sort(dim=-1, descending=True)
        p = srt.softmax(dim=-1)
        drop = p.cumsum(dim=-1) - p >= top_p  # the better tokens already hold top_p (never the first)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    if uniform is not None:
        cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # a masked token has an empty interval: never drawn
        u = (uniform.to(cdf.dtype) * cdf[:, -1])[:, None]
        return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)

def last_logits(h, w, softcap=0.0):
    """the head over the last position only: (B, T, C) -> (B, V) logits (soft-capped, gemma 2)."""
    return cap(linear(h[:, -1], w), softcap)

def left_align(input_ids, attention_mask):
    """moves each row's tokens to the right end, padding to the left (a stable sort of the mask
    keeps token order): generation continues every row from its last token."""
    order = torch.sort(attention_mask.long(), dim=1, stable=True).indices
    return input_ids.gather(1, order), attention_mask.gather(1, order)

def generate(model, input_ids, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, eos_token_id=None,
             generator=None, attention_mask=None, pad_token_id=None, stop_fn=None, use_cache=True, fuse=True,
             cuda_graph=None, uniforms=None, all_done=None):
    """Extends input_ids (B, T) by up to max_new_tokens; returns (B, T + n), n <= max_new_tokens.
    attention_mask (B, T) 0/1 marks padding (left, right or anywhere: rows are left-aligned first,
    and the result is left-padded). A row is done after eos_token_id or when stop_fn(row index,
    its new tokens) says so; done rows are filled with pad_token_id (default eos) and generation
    ends once every row is done. use_cache=False recomputes the full forward every step (the slow
    reference). fuse: the cache runs q|k|v and gate|up as one matrix product each, on weights
    concatenated once per call (KVCache.fuse: a copy of those weights while generating; False
    saves that memory). generator (on the model's device) makes sampling reproducible.
    cuda_graph: each decoding step is one replay of a CUDA graph of the model's forward (see
    decoder()); None = on CUDA for a plain module outside autocast without experts (an FSDP-sharded
    model gathers its weights in hooks a replay would skip, autocast caches its weight casts, and
    the experts' routing picks tokens on the host: those decode eagerly); True on a CPU runs the
    same one-shape step eagerly (what the tests check). uniforms(step) -> (B,) draws in [0, 1) replaces
    the generator (sample_next). all_done(local) -> bool: whether every row of every rank is done,
    given whether this rank's are (an all-reduce), so that the ranks of a sharded model take the
    same number of decoding steps (each step's forward is collective under FSDP)."""
    if cuda_graph is None:
        cuda_graph = (input_ids.is_cuda and not torch.is_autocast_enabled("cuda")
                      and not any(getattr(model.config, "moe_layers", None) or [])
                      and not any(hasattr(p, "full_tensor") for p in model.parameters()))  # a DTensor: FSDP2
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP2: DTensor parameters
    # inference_mode: no autograd bookkeeping at all (~10% of a small model's step); but FSDP2 keeps
    # its all-gather buffers across forwards, and one made here could not be written by training's
    with torch.no_grad() if sharded else torch.inference_mode():
        y = _generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator,
                      attention_mask, pad_token_id, stop_fn, use_cache, fuse, cuda_graph, uniforms, all_done)
    return y.clone()  # a normal tensor: an inference tensor cannot enter a later backward

def _generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator,
              attention_mask, pad_token_id, stop_fn, use_cache, fuse, cuda_graph, uniforms=None, all_done=None):
    from model import KVCache
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ids, mask = left_align(input_ids, attention_mask)
    if not bool(mask[:, -1].all()):
        raise ValueError("generate: a prompt has no tokens")
    ctx = model.config.max_position_embeddings
    if T > ctx:
        raise ValueError(f"generate: prompts of {T} tokens exceed the model's context of {ctx} positions")
    n_new = min(max_new_tokens, ctx - T)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T): each row's positions start at its first token
    dt = next(model.parameters()).dtype  # or the autocast dtype: what the keys and values come out in
    if torch.is_autocast_enabled(ids.device.type):
        dt = torch.get_autocast_dtype(ids.device.type)
    cache = KVCache(model.config, B, T + n_new, ids.device, dt) if use_cache else None
    if use_cache and fuse:
        cache.fuse(model)
    if use_cache:
        logits = model(ids, attention_mask=mask, position_ids=pos, head_fn=last_logits, kv_cache=cache)
        decode = decoder(model, cache, cuda_graph)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    out = torch.empty(B, T + n_new, dtype=ids.dtype, device=ids.device)  # filled step by step: no per-step cat
    out[:, :T] = ids
    new_pos = pos[:, -1:] + torch.arange(1, n_new + 1, device=ids.device)  # (B, n_new): each step's positions
    end = T
    for step in range(n_new):
        if not use_cache:
            m = torch.cat([mask, mask.new_ones(B, step)], dim=1)
            p = torch.cat([pos, new_pos[:, :step]], dim=1)
            logits = model(out[:, :end], attention_mask=m, position_ids=p, head_fn=last_logits)
        nxt = sample_next(logits.float(), temperature, top_k, top_p, generator,
                          None if uniforms is None or temperature == 0 else uniforms(step))
        if pad is not None:
            nxt = nxt.masked_fill(done, pad)
        out[:, end] = nxt
        end += 1
        if eos_token_id is not None:
            done = done | (nxt == eos_token_id)
        if stop_fn is not None:
            for b in (~done).nonzero().flatten().tolist():
                if stop_fn(b, out[b, T:end]):
                    done[b] = True
        if (eos_token_id is not None or stop_fn is not None) and (
                bool(done.all()) if all_done is None else all_done(bool(done.all()))):
            break
        if use_cache and step + 1 < n_new:
            logits = decode(nxt, new_pos[:, step:step + 1])
    return out[:, :end]

def decoder(model, cache, graph):
    """one decoding step after the prefill: (B,) tokens, (B, 1) positions -> (B, V) next logits.
    graph=False: the model's forward on the growing cache. graph=True: the cache frozen to one shape
    (KVCache.freeze) and, on CUDA, the step's forward captured once as a CUDA graph and replayed:
    one launch per token instead of one per kernel (hundreds), where decoding a small model on a
    GPU is launch-bound (BENCHMARKS.md: 43 ms per step at 7M parameters on an H200, 2.5 ms on two
    CPU cores). A capture that fails (a model with data-dependent shapes, such as the experts'
    routing) falls back to the same step run eagerly, with a warning. The logits returned are the
    graph's output buffer: read them before the next step."""
    if not graph:
        return lambda tok, pos: model(tok[:, None], position_ids=pos, head_fn=last_logits, kv_cache=cache)
    cache.freeze()
    B, dev = cache.k.shape[1], cache.k.device
    tok, pos = torch.zeros(B, 1, dtype=torch.long, device=dev), torch.zeros(B, 1, dtype=torch.long, device=dev)
    run = lambda: model(tok, position_ids=pos, head_fn=last_logits, kv_cache=cache)
    replay = run
    if dev.type == "cuda":
        try:  # warm-up on a side stream, then capture; both write a key/value the first real step overwrites
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                run()
            torch.cuda.current_stream(dev).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = run()
            replay = lambda: (g.replay(), out)[1]
        except Exception as e:  # noqa: BLE001 - any capture failure: decode eagerly instead
            import warnings
            warnings.warn(f"generate: no CUDA graph for this model ({type(e).__name__}: {e}); decoding eagerly")

    def step(t, p):
        tok.copy_(t[:, None])
        pos.copy_(p)
        logits = replay()
        cache.cur.add_(1)
        return logits
    return step

# -----------------------------------------------------------------------------
# prompts and text

def prompt_ids(tokenizer, text):
    """token ids of a formatted prompt, as training saw them: a bos where the tokenizer adds one
    by default, once."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("")["input_ids"][:1] == [bos] and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids

def format_prompt(tokenizer, row, i, key="", input_key="input", template="User: {}\nAssistant: ", chat=False, where=""):
    """(text shown as `instruction`, formatted prompt) of a prompt row; an error names it as
    `where` (a file and line) or else as prompt row i."""
    where = where or f"prompt row {i}"
    if "messages" in row and not key:
        msgs = row["messages"]
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs) or not tokenizer.chat_template:
            raise ValueError(f"{where}: 'messages' need a list of turns ending with the user's and a tokenizer with a chat template")
        return msgs[-1].get("content"), tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    keys = [key] if key else ["prompt", input_key, "instruction"]
    k = next((k for k in keys if k in row), None)
    if k is None:
        raise ValueError(f"{where}: none of the keys {keys} (keys present: {list(row)})")
    text = row[k]
    if not isinstance(text, str):
        raise ValueError(f"{where}: the prompt in {k!r} is not a string ({type(text).__name__} {json.dumps(text)[:40]})")
    if not text.strip():
        raise ValueError(f"{where}: empty prompt in {k!r}")
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("apply_chat_template: the tokenizer has no chat template; use input_template")
        return text, tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)
    if "{}" not in template:
        raise ValueError(f"input_template {template!r} has no '{{}}' for the prompt text")
    return text, template.replace("{}", text, 1)

def parse_stop(tokenizer, stop):
    """the stop strings of --stop: a JSON list of strings, else the text itself ('[/INST]' is one
    stop string); an empty one, or one with characters the tokenizer cannot encode (its unknown
    token), is an error: it could never be generated."""
    if not stop:
        return []
    try:
        stops = json.loads(stop)
    except ValueError:
        stops = None
    if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        stops = [stop]
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop: {s!r} is not a non-empty string")
        unk = tokenizer.unk_token_id
        if unk is not None and unk in tokenizer(s, add_special_tokens=False)["input_ids"]:
            raise ValueError(f"stop: {s!r} contains text this tokenizer cannot encode (it maps to "
                             f"{tokenizer.unk_token!r}), so it could never be generated")
    return stops

def stop_checker(tokenizer, stops):
    """stop_fn for generate: does a stop string end the text of a row's new tokens? Decodes only a
    tail long enough to hold the longest stop string (checked every step)."""
    n = max(len(s.encode("utf-8")) for s in stops) + 2  # a token is at least one byte
    return lambda b, row: any(s in tokenizer.decode(row[-n:].tolist()) for s in stops)

def completion(tokenizer, new_ids, eos_token_id, stops):
    """the text of one row's new tokens: up to eos, then up to the first stop string; special
    tokens removed."""
    if eos_token_id is not None and eos_token_id in new_ids:
        new_ids = new_ids[:new_ids.index(eos_token_id)]
    text = tokenizer.decode(new_ids)
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    if cut >= 0:
        text = text[:cut]
    for t in tokenizer.all_special_tokens:
        text = text.replace(t, "")
    return text

def generate_texts(model, tokenizer, texts, max_new_tokens, batch_size=32, stops=(), **kw):
    """completions of formatted prompt texts, in batches of similar length (less padding)."""
    dev = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    seqs = [prompt_ids(tokenizer, t) for t in texts]
    ctx = model.config.max_position_embeddings
    for i, s in enumerate(seqs):
        if not s or len(s) > ctx:
            raise ValueError(f"prompt {i}: {len(s)} tokens, the model's context holds 1 to {ctx}")
    stop_fn = stop_checker(tokenizer, stops) if stops else None
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    outs = [None] * len(seqs)
    for j in range(0, len(order), batch_size):
        idx = order[j:j + batch_size]
        T = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), T), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):  # left-padded
            ids[r, T - len(seqs[i]):], mask[r, T - len(seqs[i]):] = torch.tensor(seqs[i]), 1
        y = generate(model, ids.to(dev), max_new_tokens, eos_token_id=eos, attention_mask=mask.to(dev),
                     pad_token_id=pad, stop_fn=stop_fn, **kw)
        for r, i in enumerate(idx):
            outs[i] = completion(tokenizer, y[r, T:].tolist(), eos, stops)
    return outs

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
                               n_embd=g("n_embd"), head_dim=g("n_embd") // g("n_head"), intermediate_size=g("intermediate_size"),
                               max_position_embeddings=g("max_len"), norm_eps=1e-5))
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
            raise ValueError("adapter: a checkpoint of a LoRA run merges its own adapters; give --adapter with --pretrain")
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
    lines = [n for n, line in enumerate(text.split("\n"), 1) if line.strip()]  # data.py's JSON lines: one row per non-blank line
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
    import objectives
    if not run_cfg:
        raise ValueError("objective: needs --out_dir of a run (its config.json names the data)")
    keys = objectives.per_objective_keys()
    o = configurator.objective_keys({**keys, **run_cfg}, i, keys)  # KEY_i where the run set it, else KEY
    if not o.dataset:
        raise ValueError(f"objective: the run has no dataset_{i}")
    select = run_cfg.get("method") == "select" and i == 2  # train.py: a selection run weighs every row of dataset_2
    frac = 0.0 if select else run_cfg.get("eval_frac", 0.0)
    _, rows = D.objective_splits(o, run_cfg.get("seed", 42), frac, run_cfg.get("streaming", False), lazy=True, _train=False)
    rows = list(rows)
    if not rows:
        why = "method=select holds out none of dataset_2" if select else f"eval_frac=0 and no eval_split_{i}"
        raise ValueError(f"objective: the run held out no rows of objective {i} ({why})")
    source = o.eval_split if o.eval_split and D._is_dataset(o.eval_split) else o.dataset
    return ([{k: v for k, v in r.items() if k != "_id"} for r in rows],  # _id: data.py's bookkeeping
            [f"{source}, row {r.get('_id', j)} (held out of objective {i})" for j, r in enumerate(rows)])

def read_prompt_rows(prompt="", prompts="", objective=0, run_cfg=None, where=False):
    """the prompt rows of --prompt, --prompts or --objective (and, with where=True, where each is,
    for errors)."""
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
            if any(os.path.isdir(r) and os.path.samefile(d, r) for r in runs) or os.path.exists(os.path.join(d, "metrics.jsonl")):
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
    import configurator
    from model import load_tokenizer
    c = {k: globals()[k] for k in config_keys}
    changed = set(configurator.apply(argv, c))
    # every check that needs no model first: a bad key, --out, the prompts, their formatting, --stop
    for k, ok, want in (("temperature", c["temperature"] >= 0, ">= 0 (0 = greedy)"), ("max_new_tokens", c["max_new_tokens"] > 0, "> 0"),
                        ("top_p", 0 < c["top_p"] <= 1, "in (0, 1]"), ("top_k", c["top_k"] >= 0, ">= 0 (0 = off)"),
                        ("batch_size", c["batch_size"] >= 1, ">= 1"), ("num_samples", c["num_samples"] >= 1, ">= 1"),
                        ("max_prompts", c["max_prompts"] >= 0, ">= 0 (0 = all)"), ("objective", c["objective"] >= 0, ">= 1 (0 = off)"),
                        ("dtype", c["dtype"] in ("", "float32", "bfloat16", "float16", "float64"), "float32, bfloat16, float16 or float64")):
        if not ok:
            raise ValueError(f"--{k} must be {want}, got {c[k]!r}")
    check_out(c["out"], c["overwrite"], [c["prompts"]] if c["prompts"] else [], [c["out_dir"]] if c["out_dir"] else [])
    path, tok_path = model_source(c["out_dir"], c["pretrain"], c["adapter"], c["ckpt"])
    key = "pretrain" if c["pretrain"] and not c["out_dir"] else "out_dir"
    if tok_path and not os.path.exists(tok_path) and not configurator._hub_id(tok_path):
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
    try:
        main(sys.argv[1:])
    except ValueError as e:  # bad input (configurator.ConfigError and data.py's errors included): one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
