"""
Decoding with a KV cache: sampling one next token (temperature, top-k, top-p, counter-based
uniforms), batched generation of left-padded prompts with stop conditions, prompt formatting and
the text of a completion. generate.py (the command), rollout.py (online objectives) and evalgen.py
(behaviour metrics) use it.
"""
import json

import torch

from model import linear, softcap as cap

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
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(isinstance(m, dict) for m in msgs)
            or not tokenizer.chat_template
        ):
            raise ValueError(
                f"{where}: 'messages' need a list of turns ending with the user's and a tokenizer with a chat template"
            )
        return msgs[-1].get("content"), tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    keys = [key] if key else ["prompt", input_key, "instruction"]
    k = next((k for k in keys if k in row), None)
    if k is None:
        raise ValueError(f"{where}: none of the keys {keys} (keys present: {list(row)})")
    text = row[k]
    if not isinstance(text, str):
        raise ValueError(
            f"{where}: the prompt in {k!r} is not a string ({type(text).__name__} {json.dumps(text)[:40]})"
        )
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
