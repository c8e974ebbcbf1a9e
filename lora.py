"""
Hand-written LoRA (Hu et al. 2021): y = W x + (alpha / r) B A x with W frozen and only A (r, in)
and B (out, r) trained. Adapters are injected in place into a model.GPT, switched off for a
reference/teacher forward, merged into the weights for export, and saved/loaded in PEFT's file
layout, so an adapter trained here loads with peft.PeftModel.from_pretrained on the matching
transformers model (and one trained with PEFT loads here).
"""
import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import hf_names, quantized

class LoRALinear(nn.Module):
    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # zero: the model starts unchanged
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # a plain attribute, not a buffer: nothing for DDP/FSDP2 to shard or sync
        self.train(base.training)  # injected into an eval() model, dropout stays off

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}, enabled={self.enabled}"

# -----------------------------------------------------------------------------
# module paths: ours ('blocks.0.attn.qkv_proj') and the HF ones ('transformer.h.0.attn.c_attn')

def _unwrap(model):
    # DDP keeps the model in .module, torch.compile in ._orig_mod
    while isinstance(inner := getattr(model, "module", None) or getattr(model, "_orig_mod", None), nn.Module):
        model = inner
    return model

def _hf_paths(model):
    return {v[:-7]: k[:-7] for k, v in hf_names(model.config).items() if v.endswith(".weight")}

def _linears(model):
    # {our path: module} for every Linear in the blocks; an adapted one appears as its LoRALinear
    return {n: m for n, m in model.named_modules()
            if n.startswith("blocks.") and isinstance(m, (nn.Linear, LoRALinear)) and not n.endswith(".base")}

def _adapted(model):
    return {p: m for p, m in _linears(model).items() if isinstance(m, LoRALinear)}

def _matches(path, names):
    # peft's rule: a name is the whole path or its trailing part ('q_proj', 'attn.c_proj')
    return any(path == n or path.endswith("." + n) for n in names)

# -----------------------------------------------------------------------------

def inject(model, rank, alpha, dropout=0.0, target_modules="all-linear"):
    """Wraps the chosen Linear layers of the blocks in LoRALinear (in place), freezes everything
    else and returns the wrapped module paths. target_modules: 'all-linear' (every Linear in the
    blocks; lm_head is never adapted), or names as a comma-separated string or a list, matched
    against our module path or the HF one: 'q_proj,v_proj', 'query_key_value', 'c_attn' and
    'qkv_proj' all work. Call it before wrapping the model in DDP/FSDP2."""
    model = _unwrap(model)
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    linears, to_hf = _linears(model), _hf_paths(model)
    if _adapted(model):
        raise ValueError("the model already has LoRA adapters")
    if target_modules == "all-linear":
        chosen = list(linears)
    else:
        names = target_modules.split(",") if isinstance(target_modules, str) else list(target_modules)
        names = [n.strip() for n in names if n.strip()]
        hit = lambda p, ns: _matches(p, ns) or _matches(to_hf[p], ns)
        missing = [n for n in names if not any(hit(p, [n]) for p in linears)]
        if missing or not names:
            leaves = sorted({p.rsplit(".", 1)[1] for p in linears} | {to_hf[p].rsplit(".", 1)[1] for p in linears})
            raise ValueError(f"target_modules {missing or target_modules!r} match no linear layer of this "
                             f"{model.config.model_type} model; available: {', '.join(leaves)}")
        chosen = [p for p in linears if hit(p, names)]
    for p in chosen:
        parent, leaf = p.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, LoRALinear(linears[p], rank, alpha, dropout))
    mark_only_lora_trainable(model)
    return chosen

def lora_parameters(model):
    return [(n, p) for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]

def mark_only_lora_trainable(model):
    for n, p in model.named_parameters():
        p.requires_grad = n.endswith((".lora_A", ".lora_B"))

@contextmanager
def disabled(model):
    """All adapters off inside: the base model (DPO reference, same-model KD teacher) without a
    second copy of the weights. Each adapter's previous state is restored on exit. Run a forward
    that needs gradients and its backward in the same state: gradient checkpointing recomputes."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e

@torch.no_grad()
def merge(model):
    """Folds (alpha / r) B A into each base weight and puts the plain nn.Linear back, so the model
    saves with GPT.save_pretrained. Needs full (unsharded) weights: merge after training, on the
    unwrapped model or on a fresh one given the adapter with load_adapter."""
    inner = _unwrap(model)
    four = [p for p, m in _adapted(inner).items() if quantized(m.base.weight)]
    if four:  # copy_ into a 4-bit weight would quantize the merged weight again
        raise ValueError(f"merge: the base weight of {four[0]} (and {len(four) - 1} more) is 4-bit; put the "
                         f"full-precision base back first (quant.restore_base, or quant.dequantize for the "
                         f"dequantized weights)")
    for p, m in _adapted(inner).items():
        w = m.base.weight
        ct = torch.promote_types(w.dtype, torch.float32)  # bf16 merges in float32, float64 in float64
        w.copy_((w.to(ct) + (m.lora_B.to(ct) @ m.lora_A.to(ct)) * m.scaling).to(w.dtype))
        parent, leaf = p.rsplit(".", 1)
        setattr(inner.get_submodule(parent), leaf, m.base)
    return model

# -----------------------------------------------------------------------------
# PEFT file layout: adapter_config.json + adapter_model.safetensors with tensors named
# base_model.model.<HF module path>.lora_A.weight (r, in) and .lora_B.weight (out, r)

def save_adapter(model, out_dir, base_model_name_or_path=""):
    """Writes the adapter in PEFT's layout. Under FSDP2 every rank must call it (the shards are
    gathered); only rank 0 writes."""
    from safetensors.torch import save_file
    model = _unwrap(model)
    linears, adapted, to_hf = _linears(model), _adapted(model), _hf_paths(model)
    if not adapted:
        raise ValueError("the model has no LoRA adapters to save")
    tensors = {}
    for p, m in adapted.items():
        for kind in ("lora_A", "lora_B"):
            t = getattr(m, kind).detach()
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            tensors[f"base_model.model.{to_hf[p]}.{kind}.weight"] = t.contiguous().cpu()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    # peft adapts every module whose path ends with a listed name: leaf names when they pick out
    # exactly our modules, else the full paths (gpt2's 'c_proj' is both attn.c_proj and mlp.c_proj)
    targets = sorted({to_hf[p].rsplit(".", 1)[1] for p in adapted})
    if {p for p in linears if _matches(to_hf[p], targets)} != set(adapted):
        targets = sorted(to_hf[p] for p in adapted)
    m = next(iter(adapted.values()))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": m.rank, "lora_alpha": m.alpha,
              "lora_dropout": getattr(m.dropout, "p", 0.0), "target_modules": targets, "bias": "none",
              "fan_in_fan_out": model.config.model_type == "gpt2",  # gpt2's Conv1D stores (in, out)
              "base_model_name_or_path": base_model_name_or_path or None, "inference_mode": True,
              "use_rslora": False, "use_dora": False}  # peft fills in the rest with its defaults
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})

def load_adapter(model, adapter_dir):
    """Loads a PEFT-layout LoRA adapter (saved here or by PEFT) into model, injecting the layers
    named in the file first when the model has no adapters. Returns the adapted module paths.
    Call it before wrapping the model in DDP/FSDP2."""
    from safetensors.torch import load_file
    model = _unwrap(model)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        c = json.load(f)
    bad = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save",
                       "layers_to_transform", "lora_bias") if c.get(k)]
    if c.get("peft_type") != "LORA" or c.get("bias", "none") != "none" or bad:
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters load here (peft_type "
                         f"{c.get('peft_type')!r}, bias {c.get('bias')!r}, options {bad})")
    to_hf = _hf_paths(model)
    from_hf = {h: p for p, h in to_hf.items()}
    weights, file = {}, os.path.join(adapter_dir, "adapter_model.safetensors")
    for key, t in load_file(file).items():
        path, kind, leaf = key.removeprefix("base_model.model.").rsplit(".", 2)
        if kind not in ("lora_A", "lora_B") or leaf != "weight" or path not in from_hf:
            raise ValueError(f"{adapter_dir}: unexpected tensor {key!r} for model_type {model.config.model_type}")
        weights[from_hf[path], kind] = key, t
    if not _adapted(model):
        inject(model, c["r"], c["lora_alpha"], c.get("lora_dropout", 0.0), sorted({p for p, _ in weights}))
    for p, m in _adapted(model).items():
        m.alpha, m.scaling = c["lora_alpha"], c["lora_alpha"] / c["r"]
        for kind in ("lora_A", "lora_B"):
            if (p, kind) not in weights:
                raise ValueError(f"{adapter_dir}: no {kind} for {to_hf[p]}")
            key, t = weights.pop((p, kind))
            want = getattr(m, kind)
            if t.shape != want.shape:  # an adapter of another rank, or trained on a model of another width
                raise ValueError(f"{file}: {key} has shape {tuple(t.shape)}, this model's {kind} of {to_hf[p]} is "
                                 f"{tuple(want.shape)} (rank {m.rank}, adapter_config.json r={c['r']})")
            with torch.no_grad():
                want.copy_(t)
    if weights:
        raise ValueError(f"{adapter_dir}: the model has no adapter at {sorted({p for p, _ in weights})[:3]}")
    return list(_adapted(model))
