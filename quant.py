"""
Frozen weights in 4 bits (QLoRA, Dettmers et al. 2023). Every frozen Linear weight of a model.GPT's
blocks (the attention and MLP projections, the experts, under LoRA's wrapper too) becomes NF4:
one 4-bit NormalFloat code per weight and one absmax scale per block of 64 weights, the scales
themselves stored in int8 per group of 256 (double quantization, on by default) or in float32.
torchao's NF4Tensor holds them: F.linear on it dequantizes the weight to the input's dtype and
multiplies, and its backward gives the input its gradient through the same weight (the weight
gets none), so every forward of model.py runs unchanged on it: the chunked head, gradient
checkpointing, LoRA on and off, the KV cache, torch.compile of the blocks, FSDP2 (NF4Tensor shards
and all-gathers its codes and scales; DDP must leave the 4-bit weights alone: ddp_ignored). Norms,
the embedding, the routers and the output head stay in the compute dtype (the head too with
head=True when it is not the embedding's). 4.13 bits a weight with double quantization, 4.5
without, against 16 in bf16. Why torchao and not bitsandbytes: BENCHMARKS.md, "4-bit frozen weights".

    quantize(model)             # in place, after the dtype / device cast, before or after lora.inject
    dequantize(model)           # back to full precision: the dequantized weights (an export that asks for them)
    restore_base(model, path)   # the original weights re-read from the checkpoint: merge then equals an unquantized run
    copy(model)                 # deepcopy, each 4-bit weight copied exactly
"""
import importlib.util

import torch
import torch.nn as nn

from errors import ConfigError
from model import checkpoint_files, hf_names, needs_transpose, quantized, resolve_checkpoint

FORMATS = ("", "nf4")
BLOCK_SIZE = 64       # weights per absmax scale (QLoRA's)
SCALER_BLOCK = 256    # scales per int8 group under double quantization (QLoRA's)

def _torchao():
    import logging
    # torchao's import logs a warning per CUDA extension a CPU build lacks, and torch one about its
    # enum registration: nothing about NF4, so those two loggers are quiet while it imports
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, SubclassTensorArgs, to_nf4
    except ImportError as e:
        raise ImportError("quantize='nf4' needs torchao: pip install torchao (or pip install -e '.[quant]')") from e
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return NF4Tensor, to_nf4, SubclassTensorArgs

def _unwrap(model):
    # DDP keeps the model in .module, torch.compile in ._orig_mod
    while isinstance(inner := getattr(model, "module", None) or getattr(model, "_orig_mod", None), nn.Module):
        model = inner
    return model

def scaler_block(n_blocks):
    """scales per int8 group for a weight of n_blocks blocks: QLoRA's 256, or the largest divisor of
    n_blocks below it (small weights). It depends on the weight's shape alone, so a model quantizes
    the same on any number of ranks."""
    return next(d for d in range(min(SCALER_BLOCK, n_blocks), 0, -1) if n_blocks % d == 0)

def to_nf4(w, double_quant=True):
    """w (out, in) -> an NF4Tensor of the same shape and dtype. double_quant=False keeps the
    absmax scales exact (float, 0.5 bits a weight instead of 0.13): torchao's own codes and scales,
    with the int8 step of its double quantization left out (a factor of 1 and a mean of 0)."""
    NF4Tensor, to_nf4_, Meta = _torchao()
    w = w.detach().contiguous()
    if w.numel() % BLOCK_SIZE:
        raise ValueError(f"{tuple(w.shape)}: {w.numel()} weights are not a whole number of {BLOCK_SIZE}-weight blocks")
    n = w.numel() // BLOCK_SIZE
    q = to_nf4_(w, BLOCK_SIZE, scaler_block(n))
    if double_quant:
        return q
    scales = w.reshape(n, BLOCK_SIZE).abs().amax(dim=1)  # the absmax each block's codes were taken against
    groups = n // q.scaler_block_size
    return NF4Tensor(Meta(w.shape, w.stride(), w.storage_offset(), w.dtype, w.device, False), BLOCK_SIZE, n,
                     q.scaler_block_size, scales, torch.ones(groups, dtype=w.dtype, device=w.device),
                     torch.zeros((), dtype=w.dtype, device=w.device), q.quantized_data, q.nf4)

def dequantized(w):
    """the full-precision weight a 4-bit one multiplies as (its dtype); any other weight as it is."""
    return w.get_original_weight() if quantized(w) else w

def scales(w):
    """a 4-bit weight's per-block absmax scales as its forward applies them (after double
    quantization), (n_blocks,) in its dtype."""
    return w.dequantize_scalers(w.quantized_scalers, w.quantization_factor, w.scaler_block_size)

def targets(model, head=False):
    """{path: nn.Linear} whose weights quantize() makes 4-bit: every Linear of the blocks (under LoRA
    the wrapped base, 'blocks.0.attn.q_proj.base'), and lm_head with head=True."""
    model = _unwrap(model)
    out = {n: m for n, m in model.named_modules() if n.startswith("blocks.") and type(m) is nn.Linear}
    if head:
        out["lm_head"] = model.lm_head
    return out

@torch.no_grad()
def quantize(model, fmt="nf4", head=False, double_quant=True, device=None):
    """Makes the frozen Linear weights of model (a model.GPT, in place) 4-bit; returns their
    parameter names. Those weights are frozen from then on (requires_grad False): quantize the
    base under LoRA, a reference or a teacher, never a policy that trains all its weights. Call it
    after the model has its compute dtype (nn.Module.to(dtype) would re-quantize the 4-bit weights
    in the new dtype), before or after lora.inject, before DDP / FSDP2 wrap the model. device:
    each weight is moved there and quantized there, one at a time, then the rest of the model
    follows: a model loaded on the CPU reaches a GPU in 4 bits without ever being whole there.
    head=True quantizes the output head too (refused when it is the input embedding, tied)."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize: {fmt!r} is not one of {FORMATS}")
    if not fmt:
        return []
    model = _unwrap(model)
    if head and model.config.tie_word_embeddings:
        raise ValueError("quantize: the output head is the input embedding (tie_word_embeddings), which stays in "
                         "the compute dtype; quantize without the head")
    names = []
    for path, lin in targets(model, head).items():
        w = lin.weight
        if quantized(w):
            continue
        try:
            q = to_nf4(w.to(device) if device is not None else w, double_quant)
        except ValueError as e:
            raise ValueError(f"quantize: {path}.weight {e}") from None
        lin.weight = nn.Parameter(q, requires_grad=False)
        del w  # the full-precision weight goes before the next one is quantized
        names.append(f"{path}.weight")
    if device is not None:
        model.to(device)
    return names

def frozen(model, fmt, head=False, device=None, key="quantize"):
    """quantize() as train.py calls it on a frozen model (LoRA's base, a reference, a teacher):
    what cannot be quantized (a head that is the embedding, a weight of no whole number of blocks)
    is a ConfigError naming the key (key: the one that asked for fmt)."""
    try:
        return quantize(model, fmt, head=head, device=device)
    except ValueError as e:
        keys = f"config keys {key}={fmt!r} and quantize_head=True" if head else f"config key {key}={fmt!r}"
        raise ConfigError(f"{keys}: {str(e).removeprefix('quantize: ')}") from None

def quantized_names(model):
    return [n for n, p in _unwrap(model).named_parameters() if quantized(p)]

def is_quantized(model):
    return any(quantized(p) for p in _unwrap(model).parameters())

@torch.no_grad()
def dequantize(model, dtype=None):
    """Every 4-bit weight of model back to a plain frozen Parameter holding its dequantized values
    (in dtype, default its own), in place; returns their names. Merging LoRA into the result gives
    the adapter on the weights it trained over (an export of the dequantized model)."""
    model = _unwrap(model)
    names = []
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear) and quantized(w):
            m.weight = nn.Parameter(w.get_original_weight().to(dtype or w.dtype), requires_grad=False)
            names.append(f"{n}.weight")
    return names

def read_base(path, config, names, dtype=None):
    """{name: the full-precision tensor} for parameter names of a model.GPT of this config (LoRA's
    'blocks.0.attn.q_proj.base.weight' as well as 'blocks.0.attn.q_proj.weight'), read from the HF
    checkpoint at path (only those tensors, file by file; in dtype, default the checkpoint's):
    the original weights of the 4-bit ones, for an export that merges into the real base."""
    from safetensors import safe_open
    path = resolve_checkpoint(path)  # a hub id: the local snapshot the run was loaded from
    want = {n.replace(".base.", "."): n for n in names}  # ours without LoRA's wrapper: what hf_names knows
    from_hf = {h: o for h, o in hf_names(config).items() if o in want}
    if set(from_hf.values()) != set(want):
        raise ValueError(f"{path}: no checkpoint name for {sorted(set(want) - set(from_hf.values()))[:3]}")
    out = {}
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in from_hf:
                    t = f.get_tensor(key)
                    t = t.t() if needs_transpose(config, key) else t
                    out[want[from_hf[key]]] = t.to(dtype or t.dtype).contiguous()
    missing = set(want.values()) - set(out)
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {sorted(missing)[:3]} ({len(missing)} tensors)")
    return out

@torch.no_grad()
def restore_base(model, path, dtype=None):
    """Every 4-bit weight of model replaced, in place, by the full-precision tensor it was made
    from, re-read from the HF checkpoint at path (the run's pretrain; read_base) in dtype (default
    the 4-bit weight's own). LoRA adapters are kept, so lora.merge then folds them into the original
    base, as an unquantized run would. Returns the names replaced."""
    model = _unwrap(model)
    names = quantized_names(model)
    for name, t in read_base(path, model.config, names).items():
        parent, leaf = name.rsplit(".", 1)
        m = model.get_submodule(parent)
        old = getattr(m, leaf)
        if tuple(t.shape) != tuple(old.shape):
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)} there, {tuple(old.shape)} in the model")
        setattr(m, leaf, nn.Parameter(t.to(old.device, dtype or old.dtype), requires_grad=False))
    return names

def _clone(w):
    # an exact copy of a 4-bit weight: its codes and scales cloned (torchao's clone re-quantizes)
    NF4Tensor = _torchao()[0]
    attrs, meta = w.__tensor_flatten__()
    return NF4Tensor.__tensor_unflatten__({a: getattr(w, a).clone() for a in attrs}, meta, w.shape, w.stride())

def copy(model):
    """copy.deepcopy of a model with 4-bit weights, each copied exactly (a plain deepcopy clones
    them through torchao, which quantizes the dequantized weight again: other scales)."""
    import copy as copy_
    memo = {}
    for p in _unwrap(model).parameters():
        if quantized(p) and id(p) not in memo:
            memo[id(p)] = nn.Parameter(_clone(p), requires_grad=False)
    return copy_.deepcopy(model, memo)

def weight_bytes(model):
    """bytes held by model's parameters, a 4-bit weight counted by its codes and scales."""
    total = 0
    for p in _unwrap(model).parameters():
        if quantized(p):
            total += sum(getattr(p, a).nbytes for a in ("quantized_data", "quantized_scalers", "quantization_factor"))
        else:
            total += p.nbytes
    return total

# -----------------------------------------------------------------------------
# config checks: each a ConfigError naming the key

def check_keys(c, kinds, uses_reference):
    """train.py's quantization keys in config c: quantize ('' | 'nf4': the frozen weights, i.e. the
    policy's base under LoRA and every separate reference / teacher), quantize_i (objective i's
    reference / teacher; default quantize), quantize_head. kinds: the objectives' kinds, [obj_1 ..
    obj_K]; uses_reference(i) -> whether objective i has a reference or teacher model (its own or
    the policy's base). Refuses: an unknown format; a quantize that quantizes nothing (full fine-tuning,
    no reference or teacher); a quantize_i on an objective without a reference or whose reference
    is the policy's own base (LoRA, no ref_model_i: the base is quantized as quantize says), or
    beyond the run's objectives; quantize_head or export_dequantized where nothing asks for them;
    a format without torchao installed."""
    for k in ["quantize"] + [f"quantize_{i}" for i in range(1, len(kinds) + 1)]:
        if k in c and c[k] not in FORMATS:
            raise ConfigError(f"config key {k}: {c[k]!r} is not one of {', '.join(repr(f) for f in FORMATS)}")
    beyond = [k for k in c if k.startswith("quantize_") and k.removeprefix("quantize_").isdigit()
              and not 1 <= int(k.removeprefix("quantize_")) <= len(kinds)]
    if beyond:
        raise ConfigError(f"config key {beyond[0]} is set, but the run has {len(kinds)} objective(s)")
    lora = c.get("lora_rank", 0) > 0
    refs = [i for i in range(1, len(kinds) + 1) if uses_reference(i)]
    for i in range(1, len(kinds) + 1):
        k = f"quantize_{i}"
        if k not in c:
            continue
        if i not in refs:
            raise ConfigError(f"config key {k}={c[k]!r}: objective {i} ({kinds[i - 1]}) has no reference or teacher "
                              f"model to quantize")
        own = c.get(f"ref_model_{i}", c.get("ref_model", ""))
        if lora and not own and c[k] != c.get("quantize", ""):
            raise ConfigError(f"config key {k}={c[k]!r}: objective {i}'s reference is the policy's base with its "
                              f"adapters off (lora_rank={c['lora_rank']}, no ref_model_{i}), which is quantized as "
                              f"quantize={c.get('quantize', '')!r} says; set ref_model_{i} for a separate reference")
    fmts = {c.get(f"quantize_{i}", c.get("quantize", "")) for i in refs}
    if c.get("quantize") and not lora and not any(fmts):
        why = "every reference / teacher has quantize_i=''" if refs else "no objective has a reference or teacher model"
        raise ConfigError(f"config key quantize={c['quantize']!r}: nothing frozen to quantize (lora_rank=0 trains "
                          f"every weight of the policy, and {why})")
    if c.get("quantize_head") and not (c.get("quantize") or any(fmts)):
        raise ConfigError("config key quantize_head=True: set quantize (the head is quantized with the rest)")
    if c.get("export_dequantized") and not (lora and c.get("quantize")):
        raise ConfigError("config key export_dequantized=True: final/ merges LoRA adapters into a 4-bit base only "
                          "with lora_rank > 0 and quantize set; this run's final/ holds its own weights")
    used = [k for k in ["quantize"] + [f"quantize_{i}" for i in refs] if c.get(k)]
    if used and importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"config key {used[0]}={c[used[0]]!r} needs torchao: pip install torchao "
                          f"(or pip install -e '.[quant]')")

def check_shards(model, world_size, zero_stage):
    """FSDP2 (zero_stage 2/3) shards a 4-bit weight by whole groups of scales (torchao's NF4Tensor
    splits its codes, scales and int8 factors along the rows): each weight's groups must divide
    among the ranks. A ConfigError naming the keys and the first weight that does not."""
    if zero_stage < 2 or world_size == 1:
        return
    for n, p in _unwrap(model).named_parameters():
        if quantized(p):
            groups = p.n_blocks // p.scaler_block_size
            if groups % world_size or p.shape[0] % world_size:
                raise ConfigError(f"config keys quantize and zero_stage={zero_stage}: {n} {tuple(p.shape)} has "
                                  f"{groups} groups of {p.scaler_block_size * BLOCK_SIZE} weights, which FSDP2 "
                                  f"cannot shard over {world_size} ranks; use zero_stage 0 or 1 (DDP)")

def ddp_ignored(model):
    """the names DDP must leave alone (its broadcast and gradient buckets take plain tensors): the
    4-bit weights, frozen and the same on every rank. For
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)."""
    return quantized_names(model)
