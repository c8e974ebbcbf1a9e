"""
One decoder-only transformer for the Llama family (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3,
SmolLM, TinyLlama), Gemma 1/2/3, Phi-3, GPT-NeoX (Pythia) and GPT-2, driven by a Config of flags (litgpt style).
Loads and saves Hugging Face checkpoints (config.json + safetensors), so a trained model goes
straight back into transformers. Also: tokenizer loading, and a byte-level tokenizer for
models built from scratch.
"""
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# tokenizers

def _bytes_to_unicode():
    # the GPT-2 byte <-> printable-char table, so every byte is one token
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}

BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)

def byte_tokenizer():
    """A transformers tokenizer with one token per byte (ids 0..255 = the byte value), then
    <|endoftext|> = 256 (eos) and <|pad|> = 257. Saves and loads like any HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    t.chat_template = BYTE_CHAT_TEMPLATE
    return t

def load_tokenizer(name_or_dir):
    """AutoTokenizer from a checkpoint dir or hub id ('' -> the byte tokenizer). A missing pad
    token falls back to eos (the loss masks padding, so the choice does not matter)."""
    if not name_or_dir:
        return byte_tokenizer()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(name_or_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok

# -----------------------------------------------------------------------------
# config: one dataclass of flags covers every supported family

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe",
             "qwen3_moe", "gpt_neox", "gpt2")

@dataclass
class Config:
    model_type: str = "llama"
    vocab_size: int = 258
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 64
    head_dim: int = 16
    intermediate_size: int = 172
    norm: str = "rms"              # 'rms' | 'layer'
    norm_eps: float = 1e-6
    norm_unit_offset: bool = False  # gemma: rmsnorm in float32, scaled by (1 + w)
    mlp: str = "swiglu"            # 'swiglu' (gate/up/down) | 'gelu' (up/down)
    act: str = "silu"              # silu | gelu | gelu_tanh
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused_qkv: str = ""            # '' separate q/k/v | 'neox' per-head [q,k,v] | 'gpt2' [q|k|v] (gpt2, phi3)
    fused_gate_up: bool = False    # phi3: one gate_up_proj, [gate | up]
    qk_norm: bool = False          # qwen3: rmsnorm over head_dim on q and k
    parallel_residual: bool = False  # gpt-neox: x + attn(ln1 x) + mlp(ln2 x)
    post_norms: bool = False       # gemma 2/3: x + norm(attn(ln1 x)), then x + norm(mlp(ln2 x))
    scale_embeddings: bool = False # gemma: token embeddings times sqrt(n_embd)
    attn_scale: float = 0.0        # 0 = head_dim ** -0.5; gemma 2/3: query_pre_attn_scalar ** -0.5
    attn_softcap: float = 0.0      # gemma 2: scores = cap * tanh(scores / cap); 0 = off
    final_softcap: float = 0.0     # gemma 2: the same on the output logits
    sliding_window: int = 0        # window of the layers marked sliding: a query sees the last W keys
    layer_types: list = field(default_factory=list)  # per layer 'sliding_attention' | 'full_attention'
    rope_local_theta: float = 0.0  # gemma 3: rope base of the sliding layers (0 = rope_theta)
    n_expert: int = 0              # mixture of experts (mixtral, qwen-moe): swiglu experts per moe layer
    n_expert_per_tok: int = 2      # experts each token is routed to
    expert_size: int = 0           # an expert's intermediate size (0 = intermediate_size)
    shared_expert_size: int = 0    # qwen2-moe: one always-on expert behind a sigmoid gate
    norm_topk: bool = True         # renormalize the chosen experts' router probabilities to sum to 1
    moe_layers: list = field(default_factory=list)  # per layer: True = experts, False = a dense mlp
    # weight of the router load-balancing loss in training (0 = none): see router_aux_loss
    router_aux_coef: float = 0.0
    rope_theta: float = 10000.0
    rotary_dim: int = -1           # -1 = head_dim; fewer = partial rotary (pythia); 0 = no rope (gpt2)
    rope_scaling: dict = field(default_factory=dict)  # {'rope_type': 'llama3'|'linear', ...}
    n_positions: int = 0           # learned absolute positions (gpt2)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hf: dict = field(default_factory=dict)  # the original HF config.json, written back on save

    def __post_init__(self):
        if self.rotary_dim < 0:
            self.rotary_dim = self.head_dim

    @staticmethod
    def from_hf(d):
        t = d.get("model_type")
        if t not in SUPPORTED:
            raise ValueError(f"unsupported model_type {t!r}; supported: {', '.join(SUPPORTED)}")
        rp = dict(d.get("rope_parameters") or {})  # transformers v5 layout
        scaling = dict(d.get("rope_scaling") or rp)
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = {}
        theta = rp.get("rope_theta", d.get("rope_theta", d.get("rotary_emb_base", 10000.0)))
        if t == "gpt2":
            C = d["n_embd"]
            if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
                raise ValueError(
                    "gpt2 options scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not supported"
                )
            return Config(model_type=t, vocab_size=d["vocab_size"], n_layer=d["n_layer"], n_head=d["n_head"],
                          n_kv_head=d["n_head"], n_embd=C, head_dim=C // d["n_head"],
                          intermediate_size=d.get("n_inner") or 4 * C, norm="layer",
                          norm_eps=d.get("layer_norm_epsilon", 1e-5), mlp="gelu", act="gelu_tanh",
                          qkv_bias=True, o_bias=True, mlp_bias=True, fused_qkv="gpt2", rotary_dim=0,
                          n_positions=d["n_positions"], max_position_embeddings=d["n_positions"],
                          tie_word_embeddings=True, hf=d)
        C, H = d["hidden_size"], d["num_attention_heads"]
        hd = d.get("head_dim") or C // H
        if t == "gpt_neox":
            pct = rp.get("partial_rotary_factor", d.get("rotary_pct", 1.0))
            return Config(model_type=t, vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=H,
                          n_kv_head=H, n_embd=C, head_dim=hd, intermediate_size=d["intermediate_size"],
                          norm="layer", norm_eps=d.get("layer_norm_eps", 1e-5), mlp="gelu",
                          act={"gelu": "gelu", "gelu_new": "gelu_tanh",
                               "gelu_fast": "gelu_tanh"}[d.get("hidden_act", "gelu")],
                          qkv_bias=d.get("attention_bias", True), o_bias=d.get("attention_bias", True),
                          mlp_bias=True, fused_qkv="neox", parallel_residual=d.get("use_parallel_residual", True),
                          rope_theta=theta, rotary_dim=int(hd * pct), rope_scaling=scaling,
                          max_position_embeddings=d.get("max_position_embeddings", 2048),
                          tie_word_embeddings=d.get("tie_word_embeddings", False), hf=d)
        gemma = t.startswith("gemma")
        act = d.get("hidden_activation") if t in ("gemma2", "gemma3_text") else d.get("hidden_act", "silu")
        acts = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"} if gemma else {"silu": "silu"}
        if t == "gemma":  # transformers reads gemma's legacy 'gelu' as the tanh approximation it meant
            acts["gelu"] = "gelu_tanh"
        if act not in acts:
            raise ValueError(f"{t}: hidden_act {act!r} is not supported ({', '.join(acts)})")
        local_theta = 0.0
        if "full_attention" in rp:  # gemma 3, v5 layout: rope parameters per layer type
            full, scaling = rp["full_attention"], dict(rp["full_attention"])
            theta, local_theta = full.get("rope_theta", 1e6), rp["sliding_attention"].get("rope_theta", 1e4)
            scaling = {} if scaling.get("rope_type", "default") == "default" else scaling
        elif t == "gemma3_text":
            local_theta = d.get("rope_local_base_freq", 1e4)
        window, n = d.get("sliding_window") or 0, d["num_hidden_layers"]
        if t in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not d.get("use_sliding_window"):
            window = 0
        types = d.get("layer_types")
        if not types:  # configs written before layer_types: each family's own rule
            every = {"gemma2": 2, "gemma3_text": d.get("sliding_window_pattern", 6)}.get(t)
            if every:
                types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
            elif t in ("qwen2", "qwen3", "qwen2_moe"):
                types = [
                    "sliding_attention" if i >= d.get("max_window_layers", n) else "full_attention" for i in range(n)
                ]
        if t in ("mistral", "phi3", "mixtral", "qwen3_moe") or not types:  # their models window every layer
            types = ["sliding_attention"] * n
        if not window:
            types = ["full_attention"] * n
        bias = d.get("attention_bias", d.get("qkv_bias", t in ("qwen2", "qwen2_moe")))
        E, sparse = d.get("num_local_experts") or d.get("num_experts") or 0, d.get("decoder_sparse_step") or 1
        moe = [bool(E) and i not in (d.get("mlp_only_layers") or []) and (i + 1) % sparse == 0 for i in range(n)]
        scalar = d.get("query_pre_attn_scalar") if t in ("gemma2", "gemma3_text") else None
        return Config(model_type=t, vocab_size=d["vocab_size"], n_layer=n, n_head=H,
                      n_kv_head=d.get("num_key_value_heads") or H, n_embd=C, head_dim=hd,
                      intermediate_size=d["intermediate_size"], norm="rms", norm_eps=d.get("rms_norm_eps", 1e-6),
                      norm_unit_offset=gemma, act=acts[act],
                      qkv_bias=bias, o_bias=bias and t not in ("qwen2", "qwen2_moe"), mlp_bias=d.get("mlp_bias", False),
                      fused_qkv="gpt2" if t == "phi3" else "", fused_gate_up=t == "phi3",
                      qk_norm=t in ("qwen3", "qwen3_moe", "gemma3_text"), post_norms=t in ("gemma2", "gemma3_text"),
                      scale_embeddings=gemma, attn_scale=scalar ** -0.5 if scalar else 0.0,
                      attn_softcap=d.get("attn_logit_softcapping") or 0.0,
                      final_softcap=d.get("final_logit_softcapping") or 0.0,
                      sliding_window=window, layer_types=list(types), rope_local_theta=local_theta,
                      n_expert=E, n_expert_per_tok=d.get("num_experts_per_tok", 2),
                      expert_size=d.get("moe_intermediate_size") or 0,
                      shared_expert_size=d.get("shared_expert_intermediate_size") or 0,
                      norm_topk=d.get("norm_topk_prob", t == "mixtral"), moe_layers=moe if E else [],
                      router_aux_coef=router_aux_coef(d) if E else 0.0, rope_theta=theta,
                      rotary_dim=int(hd * rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))),
                      rope_scaling=scaling, max_position_embeddings=d.get("max_position_embeddings", 2048),
                      tie_word_embeddings=d.get("tie_word_embeddings", gemma), hf=d)

    def to_hf(self):
        """The HF config.json dict: the loaded one when there is one, else a llama config."""
        if self.hf:
            return self.hf
        assert self.model_type == "llama", "a model built from scratch is a llama"
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
                "hidden_size": self.n_embd, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
                "num_key_value_heads": self.n_kv_head, "head_dim": self.head_dim, "hidden_act": "silu",
                "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.norm_eps,
                "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie_word_embeddings,
                "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
                "bos_token_id": None, "eos_token_id": 256, "pad_token_id": 257}

def router_aux_coef(d):
    """the weight of the router load-balancing loss that transformers adds to a mixture of experts'
    training loss: router_aux_loss_coef (its config classes' default 0.001) when the config's
    output_router_logits is true, else none. Mixtral's and Qwen's published checkpoints ship it
    false: fine-tuning them with transformers adds no such loss, and neither does this code; set
    output_router_logits (and router_aux_loss_coef) in the checkpoint's config.json to train with it."""
    return float(d.get("router_aux_loss_coef", 0.001)) if d.get("output_router_logits") else 0.0

# -----------------------------------------------------------------------------
# the network

def rope_inv_freq(cfg, local=False):
    # local: gemma 3's sliding layers, their own base and no scaling
    d = cfg.rotary_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = {} if local else cfg.rope_scaling
    kind = s.get("rope_type", s.get("type", "default")) if s else "default"
    if kind == "linear":
        inv = inv / s["factor"]
    elif kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)  # long waves: slowed down
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (wavelen >= old / hi) & (wavelen <= old / lo)  # in between: interpolated
        inv = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")
    return inv.float()

def apply_rope(x, cos, sin):
    # x (B, nh, T, hs); rotates the first rotary_dim channels in the rotate-half layout
    r = cos.shape[-1]
    xr = x[..., :r] if r < x.shape[-1] else x
    x1, x2 = xr.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    out = xr * cos + rot * sin
    return out if xr is x else torch.cat((out, x[..., r:]), dim=-1)  # partial rotary: the rest as is

class UnitOffsetRMSNorm(nn.Module):
    """gemma's rmsnorm: x / rms(x) * (1 + w) computed in float32, w stored as is (zero = identity)."""
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)

def make_norm(cfg, dim):
    if cfg.norm == "rms" and cfg.norm_unit_offset:
        return UnitOffsetRMSNorm(dim, cfg.norm_eps)
    if cfg.norm == "rms":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)

def needs_mask(seg):
    """False when plain causal attention is exact for every real token: each row is one segment
    followed only by padding (right-padded). Then attention runs with is_causal and no mask (the
    fastest SDPA / flash kernels); padded positions see real tokens, but no loss reads them."""
    after_pad = (seg[:, 1:] > 0) & (seg[:, :-1] == 0)
    return bool((after_pad.any() | (seg > 1).any()).item())  # one host sync per forward

def segment_mask(seg):
    """seg (B, T): 0 = padding, k > 0 = segment k. Returns bool (B, 1, T, T): causal attention
    within a segment. Padding rows attend to themselves so no row is empty (no NaN)."""
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    eye = torch.eye(T, dtype=torch.bool, device=seg.device)
    return ((same & causal) | eye)[:, None]

def window_mask(mask, window, t0, T, device):
    """restricts mask (bool (B, 1, T, t0 + T), or None = causal) so the query at index i sees only
    keys j with i - window < j <= i: indices in the row, padding included, as transformers counts
    them. Returns mask unchanged when no query reaches past the window (then None keeps the
    is_causal fast path)."""
    if t0 + T <= window:
        return mask
    i = torch.arange(t0, t0 + T, device=device)[:, None]
    j = torch.arange(t0 + T, device=device)[None]
    band = (j > i - window) & (j <= i)  # (T, t0 + T)
    return band if mask is None else mask & band

def quantized(w):
    """w is a 4-bit weight (quant.py: torchao's NF4Tensor). F.linear and nn.Linear dequantize it
    inside the product; the weight-first product below and torch.cat cannot take it."""
    return hasattr(w, "get_original_weight")

def few_rows(x):
    """x is a decoding step's input on a CPU: float32, no autograd, at most 64 rows (8 on one
    thread, where w @ x.T loses at 16 and more: BENCHMARKS.md, "Generation")."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and x.numel() <= (64 if torch.get_num_threads() > 1 else 8) * x.shape[-1])

def _weight_first(x, w, b):
    # x @ w.T + b computed as (w @ x.T).T, laid out as F.linear's result
    xt = x.reshape(-1, x.shape[-1]).t()
    y = torch.mm(w, xt) if b is None else torch.addmm(b[:, None], w, xt)
    return y.t().contiguous().view(*x.shape[:-1], w.shape[0])

def linear(x, w, b=None):
    """F.linear(x, w, b), except for few_rows(x) (decoding: one token per row): there it runs as
    w @ x.T. MKL streams the weight through that product up to ~1.7x faster than through x @ w.T
    when x has a few rows, and a decoding step is mostly these products (BENCHMARKS.md,
    "Generation"). The same dot products, summed in another order (~1e-7 relative). Forwards with
    autograd (training), GPUs and longer inputs keep F.linear."""
    return _weight_first(x, w, b) if few_rows(x) else F.linear(x, w, b)

def dense(layer, x):
    """layer(x) for a projection; a plain nn.Linear (not LoRA's wrapper) on few_rows(x) runs as
    linear() above does."""
    plain = type(layer) is nn.Linear and not quantized(layer.weight)
    return _weight_first(x, layer.weight, layer.bias) if plain and few_rows(x) else layer(x)

def softcap(logits, cap):
    """gemma 2's final logit soft-cap: cap * tanh(logits / cap); cap = 0 leaves the logits as they are."""
    return torch.tanh(logits / cap) * cap if cap else logits

def attend(q, k, v, mask, is_causal, scale=None, softcap=0.0):
    """q (B, nh, T, hs), k and v (B, nkv, S, hs), mask bool (B, 1, T, S) or None -> (B, nh, T, hs).
    softcap (gemma 2): scores = cap * tanh(scores / cap) before the mask, which SDPA cannot do."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    s = (q @ k.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)  # (B, nh, T, S)
    s = torch.tanh(s / softcap) * softcap
    if is_causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.float().softmax(dim=-1).to(v.dtype) @ v

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None

def flash_attention(q, k, v, seg, window=0, scale=None, softcap=0.0):
    """q, k, v (B, T, nh, hs) on CUDA in bf16/fp16. seg=None: plain causal. Otherwise the tokens
    of each (row, segment) are gathered into one variable-length sequence. window: the last
    `window` keys only (flash counts the keys left of the query)."""
    kw = dict(causal=True, softmax_scale=scale, window_size=(window - 1, 0) if window else (-1, -1))
    if softcap:  # flash-attn >= 2.6
        kw["softcap"] = softcap
    if seg is None:
        return flash_attn_func(q, k, v, **kw)
    B, T = seg.shape
    flat = seg.reshape(-1)
    idx = torch.nonzero(flat > 0).squeeze(1)
    key = (torch.arange(B, device=seg.device)[:, None] * (T + 1) + seg).reshape(-1)[idx]
    starts = torch.nonzero(torch.cat([key.new_ones(1, dtype=torch.bool), key[1:] != key[:-1]])).squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([idx.numel()])]).to(torch.int32)
    maxlen = int((cu[1:] - cu[:-1]).max())
    pick = lambda t: t.reshape(B * T, *t.shape[2:])[idx]
    out = flash_attn_varlen_func(pick(q), pick(k), pick(v), cu, cu, maxlen, maxlen, **kw)
    full = out.new_zeros(B * T, *out.shape[1:])
    full[idx] = out
    return full.view(B, T, *out.shape[1:])

class KVCache:
    """Keys and values of every layer for batched decoding, preallocated for max_len positions:
    k, v (n_layer, B, n_kv_head, max_len, head_dim); valid (B, max_len) is False at padding."""
    def __init__(self, cfg, batch_size, max_len, device=None, dtype=torch.float32):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = 0          # positions filled so far
        self.padded = False   # any padding among them: decoding steps then need a mask
        self.table = {}       # rope cos, sin of positions 0..max_len-1, (max_len, r) each; per local
        self.fused = [None] * cfg.n_layer  # per layer: {'qkv': (w, b), 'gate_up': (w, b)} from fuse()
        self.static = False   # one-shape decoding steps (CUDA graphs): see freeze()

    def freeze(self):
        """after the prefill: every later step writes its key/value at the position held in the
        device tensor self.cur (the caller advances it) and attends over all max_len keys, those not
        yet written masked. Every step then has the same shapes and no position on the host, so one
        CUDA graph can replay it (generate.py); the same step runs eagerly anywhere (the tests)."""
        self.static = True
        self.cur = torch.tensor(self.pos, device=self.k.device)
        self.arange = torch.arange(self.k.shape[3], device=self.k.device)
        return self

    def window(self, mask, window):
        """a frozen cache's mask (B, 1, 1, max_len) cut to the last `window` keys of the step's query."""
        return mask & (self.arange > self.cur - window)

    def fuse(self, model):
        """decoding then runs q|k|v and gate|up as one matrix product each: fewer kernel launches
        per step (docs/benchmarks_log.md: ~7% faster steps for the demo's model on CPU, no measurable change
        at 7M parameters, where the products' arithmetic dominates). The weights are concatenated
        here, once per cache (a copy of those weights for the cache's life). Layers already fused
        (gpt2, neox, phi3), wrapped ones (LoRA: not a plain nn.Linear) and sharded ones (FSDP2: their
        weights gathered only inside the forward) keep their own path."""
        # a DTensor weight (FSDP2) is a shard outside the forward's gather: those layers keep their own path
        # a 4-bit weight (quant.py) stays 4-bit: concatenating would dequantize a copy
        plain = lambda *ls: all(type(l) is nn.Linear and not hasattr(l.weight, "full_tensor")
                                and not quantized(l.weight) for l in ls)
        cat = lambda *ls: (torch.cat([l.weight for l in ls]),
                           None if ls[0].bias is None else torch.cat([l.bias for l in ls]))
        for i, block in enumerate(model.blocks):
            a, m, f = block.attn, block.mlp, {}
            if not a.cfg.fused_qkv and plain(a.q_proj, a.k_proj, a.v_proj):
                f["qkv"] = cat(a.q_proj, a.k_proj, a.v_proj)  # rows [q | k | v], gpt2's layout
            if m.swiglu and not m.fused and plain(m.gate_proj, m.up_proj):
                f["gate_up"] = cat(m.gate_proj, m.up_proj)  # rows [gate | up], phi3's layout
            self.fused[i] = f or None
        return self

    def rope(self, model, position_ids, dtype, local=False):
        # computed once, then looked up per step: (B, 1, T, r) each
        if local not in self.table:
            pos = torch.arange(self.k.shape[3], device=position_ids.device)[None]
            self.table[local] = [t[0, 0] for t in model.rope(pos, dtype, local)]
        return tuple(t[position_ids][:, None] for t in self.table[local])

    def attn_mask(self, attention_mask, T):
        """records which of the T new positions are padding (attention_mask 0); returns the bool
        mask (B, 1, T, pos + T) of the keys each new query sees, or None when all of them."""
        if self.static:  # one decoding step: all max_len keys, those past the current position masked
            assert T == 1 and attention_mask is None, "a frozen cache decodes one token per row and step"
            return (self.valid & (self.arange <= self.cur))[:, None, None]
        t0 = self.pos
        if attention_mask is not None:
            self.valid[:, t0:t0 + T] = attention_mask > 0
            self.padded = self.padded or not bool(self.valid[:, :t0 + T].all())  # host sync, at prefill
        if T == 1:
            return self.valid[:, None, None, :t0 + 1] if self.padded else None
        causal = torch.ones(T, t0 + T, dtype=torch.bool, device=self.valid.device).tril(diagonal=t0)
        own = torch.eye(T, t0 + T, dtype=torch.bool, device=self.valid.device).roll(t0, dims=1)
        # a padding query still sees its own key, so no row is empty (no NaN)
        return ((causal & self.valid[:, None, :t0 + T]) | own)[:, None]

class Attention(nn.Module):
    def __init__(self, cfg, layer=0):
        super().__init__()
        self.cfg = cfg
        sliding = cfg.sliding_window and cfg.layer_types and cfg.layer_types[layer] == "sliding_attention"
        self.window = cfg.sliding_window if sliding else 0
        self.scale, self.softcap = cfg.attn_scale or None, cfg.attn_softcap
        H, K, hd, C = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd
        if cfg.fused_qkv:
            self.qkv_proj = nn.Linear(C, (H + 2 * K) * hd, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(C, H * hd, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(C, K * hd, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(C, K * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * hd, C, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = make_norm(cfg, hd), make_norm(cfg, hd)

    def forward(self, x, rope, mask, seg, cache=None):
        cfg = self.cfg
        B, T, _ = x.shape
        H, K, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        fused = cache[3] if cache is not None and cache[3] is not None else {}
        if cfg.fused_qkv == "neox":  # per head: [q_h, k_h, v_h]
            q, k, v = dense(self.qkv_proj, x).view(B, T, H, 3 * hd).split(hd, dim=-1)
        elif cfg.fused_qkv == "gpt2" or "qkv" in fused:  # [q | k | v]; decoding: KVCache.fuse's copy
            qkv = linear(x, *fused["qkv"]) if "qkv" in fused else dense(self.qkv_proj, x)
            q, k, v = qkv.split((H * hd, K * hd, K * hd), dim=-1)
            q, k, v = q.view(B, T, H, hd), k.view(B, T, K, hd), v.view(B, T, K, hd)
        else:
            q = dense(self.q_proj, x).view(B, T, H, hd)
            k = dense(self.k_proj, x).view(B, T, K, hd)
            v = dense(self.v_proj, x).view(B, T, K, hd)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:  # rotated in float32 under autocast, back to the projections' dtype
            q, k = apply_rope(q, *rope).to(v.dtype), apply_rope(k, *rope).to(v.dtype)
        if cache is not None:  # decoding: write the new keys/values, attend over the cache so far
            kc, vc, t0, _ = cache  # (B, nkv, max_len, hs) each
            if torch.is_tensor(t0):  # a frozen cache (KVCache.freeze): write at a device position, attend over all keys
                kc.index_copy_(2, t0.view(1), k)
                vc.index_copy_(2, t0.view(1), v)
            else:
                kc[:, :, t0:t0 + T], vc[:, :, t0:t0 + T] = k, v
                kc, vc = kc[:, :, :t0 + T], vc[:, :, :t0 + T]
            y = attend(q, kc, vc, mask, False, self.scale, self.softcap)
            return dense(self.o_proj, y.transpose(1, 2).reshape(B, T, H * hd))
        if flash_attn_func is not None and v.is_cuda and v.dtype in (torch.float16, torch.bfloat16):
            y = flash_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), seg, self.window, self.scale, self.softcap
            )
            y = y.reshape(B, T, H * hd)
        else:
            y = attend(q, k, v, mask, mask is None, self.scale, self.softcap)
            y = y.transpose(1, 2).reshape(B, T, H * hd)
        return dense(self.o_proj, y)

class MLP(nn.Module):
    def __init__(self, cfg, size=0):
        super().__init__()
        C, I, b = cfg.n_embd, size or cfg.intermediate_size, cfg.mlp_bias
        self.fused = cfg.fused_gate_up
        if self.fused:  # phi3: [gate | up] in one matrix
            self.gate_up_proj = nn.Linear(C, 2 * I, bias=b)
        else:
            if cfg.mlp == "swiglu":
                self.gate_proj = nn.Linear(C, I, bias=b)
            self.up_proj = nn.Linear(C, I, bias=b)
        self.down_proj = nn.Linear(I, C, bias=b)
        self.act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[cfg.act]
        self.swiglu = cfg.mlp == "swiglu"

    def forward(self, x, gate_up=None):
        # gate_up: decoding's (w, b) of [gate | up] concatenated by KVCache.fuse
        if self.fused or gate_up is not None:
            gate, up = (linear(x, *gate_up) if gate_up is not None else dense(self.gate_up_proj, x)).chunk(2, dim=-1)
            return dense(self.down_proj, self.act(gate) * up)
        if self.swiglu:
            return dense(self.down_proj, self.act(dense(self.gate_proj, x)) * dense(self.up_proj, x))
        return dense(self.down_proj, self.act(dense(self.up_proj, x)))

class Router(nn.Module):
    # the (n_expert, C) routing weight, not an nn.Linear: as in transformers, LoRA leaves it alone
    def __init__(self, C, n_expert):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_expert, C).normal_(std=0.02))

class MoE(nn.Module):
    """mixture of experts (mixtral, qwen2/3-moe): the router sends each token to its top k of
    n_expert swiglu MLPs and sums their outputs weighted by its router probabilities; qwen2-moe
    adds a shared expert scaled by sigmoid(shared_expert_gate x)."""
    swiglu = False  # generate's fused decoding leaves it alone

    def __init__(self, cfg):
        super().__init__()
        self.gate = Router(cfg.n_embd, cfg.n_expert)
        self.experts = nn.ModuleList(MLP(cfg, cfg.expert_size) for _ in range(cfg.n_expert))
        if cfg.shared_expert_size:
            self.shared_expert = MLP(cfg, cfg.shared_expert_size)
            self.shared_expert_gate = nn.Linear(cfg.n_embd, 1, bias=False)
        self.k, self.norm_topk, self.n_expert = cfg.n_expert_per_tok, cfg.norm_topk, cfg.n_expert
        self.router_logits = None  # (N, n_expert) of the last forward with grad: router_aux_loss takes them
        self.recording = False     # set by GPT.forward for its own pass only: a checkpoint's recompute records nothing

    def forward(self, x, gate_up=None):
        shape, x = x.shape, x.reshape(-1, x.shape[-1])  # (N, C)
        logits = F.linear(x, self.gate.weight)
        if self.recording:
            self.router_logits = logits
        probs = logits.float().softmax(dim=-1)
        w, idx = probs.topk(self.k, dim=-1)  # (N, k)
        if self.norm_topk:
            w = w / w.sum(dim=-1, keepdim=True)
        w = w.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):  # every expert runs, on no tokens if none: DDP sees all grads
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)

def router_aux_loss(model, real=None):
    """the router load-balancing loss (Switch Transformer's) of model's last forward with grad, as
    transformers' load_balancing_loss_func computes it: n_expert * sum_e f_e * P_e, where f_e is the
    number of top-k choices of expert e per token and P_e its mean router probability, both over the
    tokens of every MoE layer pooled. real (B, T) bool: the tokens that count (False = padding; None
    = all). Takes the forward's router logits (the next call finds none); None for a dense model."""
    moes = [m for m in model.modules() if isinstance(m, MoE) and m.router_logits is not None]
    if not moes:
        return None
    E, k = moes[0].n_expert, moes[0].k
    chosen = probs = n = 0.0
    for m in moes:
        logits, m.router_logits = m.router_logits, None
        p = logits.float().softmax(dim=-1)  # (N, E)
        w = torch.ones_like(p[:, :1]) if real is None else real.reshape(-1, 1).to(p)  # (N, 1)
        top = F.one_hot(p.topk(k, dim=-1).indices, E).sum(1).to(p)  # (N, E): 1 where e is among the token's k
        chosen, probs, n = chosen + (top * w).sum(0), probs + (p * w).sum(0), n + w.sum()
    return E * ((chosen / n) * (probs / n)).sum()

class Block(nn.Module):
    def __init__(self, cfg, layer=0):
        super().__init__()
        self.ln_1, self.ln_2 = make_norm(cfg, cfg.n_embd), make_norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg, layer)
        self.mlp = MoE(cfg) if cfg.moe_layers and cfg.moe_layers[layer] else MLP(cfg)
        self.parallel = cfg.parallel_residual
        self.post_norms = cfg.post_norms
        if cfg.post_norms:
            self.post_attn_norm, self.post_mlp_norm = make_norm(cfg, cfg.n_embd), make_norm(cfg, cfg.n_embd)

    def forward(self, x, rope, mask, seg, cache=None):
        a = self.attn(self.ln_1(x), rope, mask, seg, cache)
        gu = cache[3].get("gate_up") if cache is not None and cache[3] is not None else None
        if self.post_norms:
            x = x + self.post_attn_norm(a)
            return x + self.post_mlp_norm(self.mlp(self.ln_2(x), gu))
        if self.parallel:
            return x + a + self.mlp(self.ln_2(x), gu)
        x = x + a
        return x + self.mlp(self.ln_2(x), gu)

class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.n_positions:
            self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask=None, position_ids=None, head_fn=None, kv_cache=None):
        """input_ids (B, T). attention_mask (B, T) of segment ids: 0 = padding, 1 = token (and
        1, 2, 3, ... = documents packed into one row). position_ids (B, T), restarting per
        document when packed. Returns logits (B, T, V), or head_fn(hidden (B, T, C), lm_head
        weight (V, C)) so a loss can apply the head in token chunks inside this forward (under
        FSDP2 the weight is only gathered while the module's forward runs); a model with a final
        logit soft-cap calls head_fn(hidden, weight, softcap=cap), so a head_fn that cannot apply
        it fails instead of computing uncapped logits.
        kv_cache (a KVCache): the T tokens continue the cached ones; attention_mask is then 0/1 for
        the new tokens only (None = no padding) and position_ids should be given per row."""
        B, T = input_ids.shape
        t0 = kv_cache.pos if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(t0, t0 + T, device=input_ids.device).expand(B, T)
        cfg = self.config
        x = self.wte(input_ids)
        if cfg.scale_embeddings:  # gemma: sqrt(C) rounded to the activations' dtype, as transformers does
            x = x * torch.tensor(cfg.n_embd ** 0.5, dtype=x.dtype)
        if cfg.n_positions:
            x = x + self.wpe(position_ids)
        rope = rope_local = None
        if cfg.rotary_dim:
            rope = self.rope(position_ids, x.dtype) if kv_cache is None else kv_cache.rope(self, position_ids, x.dtype)
            rope_local = rope
            if cfg.rope_local_theta:  # gemma 3: the sliding layers' own base
                rope_local = (self.rope(position_ids, x.dtype, True) if kv_cache is None
                              else kv_cache.rope(self, position_ids, x.dtype, True))
        if kv_cache is not None:
            seg, mask = None, kv_cache.attn_mask(attention_mask, T)
        else:
            seg = attention_mask if attention_mask is not None and needs_mask(attention_mask) else None
            mask = segment_mask(seg) if seg is not None else None
        # sliding layers (mistral, qwen2, phi3, gemma 2/3): the same mask cut to the last W keys
        static = kv_cache is not None and kv_cache.static
        local = mask
        if cfg.sliding_window:
            local = (
                kv_cache.window(mask, cfg.sliding_window)
                if static
                else window_mask(mask, cfg.sliding_window, t0, T, x.device)
            )
        # a forward with grad keeps each MoE layer's router logits for the load-balancing loss (router_aux_loss);
        # no-grad ones (references, evaluation, generation) and backward's recomputes leave them alone
        moes = (
            [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]
            if torch.is_grad_enabled() and kv_cache is None
            else []
        )
        for moe in moes:
            moe.recording = True
        for i, block in enumerate(self.blocks):
            r, m = (rope_local, local) if block.attn.window else (rope, mask)
            if kv_cache is not None:
                x = block(
                    x, r, m, None, (kv_cache.k[i], kv_cache.v[i], kv_cache.cur if static else t0, kv_cache.fused[i])
                )
            elif self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, r, m, seg, use_reentrant=False)
            else:
                x = block(x, r, m, seg)
        for moe in moes:
            moe.recording = False
        if kv_cache is not None and not static:
            kv_cache.pos = t0 + T
        x = self.ln_f(x)
        if head_fn is not None:  # a soft-capped model (gemma 2) tells head_fn its cap, which it must apply
            w = self.lm_head.weight
            # a 4-bit head (quant.py): the losses multiply plain weights
            w = w.get_original_weight() if quantized(w) else w
            return head_fn(x, w, softcap=cfg.final_softcap) if cfg.final_softcap else head_fn(x, w)
        return softcap(self.lm_head(x), cfg.final_softcap)

    def rope(self, position_ids, dtype, local=False):
        dev, name = position_ids.device, "_inv_freq_local" if local else "_inv_freq"
        if getattr(self, name, None) is None or getattr(self, name).device != dev:
            # once, not a host-to-device copy per forward
            setattr(self, name, rope_inv_freq(self.config, local).to(dev))
        inv = getattr(self, name)
        ang = position_ids[..., None].float() * inv  # (B, T, r/2)
        ang = torch.cat((ang, ang), dim=-1)[:, None]  # (B, 1, T, r)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def compile_blocks(self):
        """torch.compile each block (fused norms, rope, SwiGLU: fewer kernel launches). Every block
        has the same code, so one graph serves all layers; dynamic lengths, since rows are padded
        to each batch's longest. The output head stays eager: the chunked losses run through it."""
        for block in self.blocks:
            block.compile(dynamic=True)

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, name_or_dir, dtype=None, device=None):
        """A local HF checkpoint dir (config.json + model.safetensors, or shards with an index),
        or a hub id resolved through huggingface_hub (online only)."""
        from safetensors import safe_open
        path = resolve_checkpoint(name_or_dir)
        with open(os.path.join(path, "config.json")) as f:
            cfg = Config.from_hf(json.load(f))
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device or "cpu")
        model.tie_weights()
        params = dict(model.named_parameters())
        names, loaded = hf_names(cfg), set()
        for file in checkpoint_files(path):
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    ours = names.get(key)
                    if ours is None:
                        if key.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
                            continue  # buffers some checkpoints carry
                        if key == "lm_head.weight" and cfg.tie_word_embeddings:
                            continue
                        raise ValueError(f"{file}: unexpected tensor {key!r} for model_type {cfg.model_type}")
                    t = f.get_tensor(key)
                    if needs_transpose(cfg, key):
                        t = t.t()
                    p = params[ours]
                    if p.shape != t.shape:
                        raise ValueError(f"{file}: {key} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                    with torch.no_grad():
                        p.copy_(t)
                    loaded.add(ours)
        missing = set(params) - loaded
        if cfg.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {sorted(missing)[:5]} ({len(missing)} tensors)")
        if dtype is not None:
            model.to(dtype=dtype)
        return model

    def save_pretrained(self, out_dir, max_shard_bytes=5 * 2**30):
        """Writes config.json and model.safetensors (or shards + index) in HF layout."""
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        cfg = self.config
        to_hf = {v: k for k, v in hf_names(cfg).items()}
        tensors = {}
        for name, p in self.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if quantized(p):
                raise ValueError(f"save_pretrained: {name} is 4-bit; write the full-precision base "
                                 f"(quant.restore_base) or the dequantized weights (quant.dequantize) first")
            key = to_hf[name]
            t = p.detach()
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            if needs_transpose(cfg, key):
                t = t.t()
            tensors[key] = t.contiguous().cpu()
        hf = dict(cfg.to_hf())
        hf["torch_dtype"] = str(next(iter(tensors.values())).dtype).replace("torch.", "")
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        shards, cur, size = [], {}, 0
        for k, t in tensors.items():
            n = t.numel() * t.element_size()
            if cur and size + n > max_shard_bytes:
                shards.append(cur); cur, size = {}, 0
            cur[k] = t; size += n
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

def resolve_checkpoint(name_or_dir):
    if os.path.isdir(name_or_dir):
        return name_or_dir
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(
            name_or_dir, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        )
    except Exception as e:
        raise ValueError(f"{name_or_dir!r} is not a local directory and could not be fetched from the hub: {e}") from e

def checkpoint_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise ValueError(
            f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are read)"
        )
    return [single]

def needs_transpose(cfg, hf_key):
    # gpt2's Conv1D stores (in, out)
    return cfg.model_type == "gpt2" and hf_key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))

def hf_names(cfg):
    """{HF tensor name: our parameter name} for this config."""
    if cfg.model_type == "gpt2":
        top = {"transformer.wte.weight": "wte.weight", "transformer.wpe.weight": "wpe.weight",
               "transformer.ln_f.weight": "ln_f.weight", "transformer.ln_f.bias": "ln_f.bias"}
        pre, layer = "transformer.h.{}.", {"ln_1": "ln_1", "ln_2": "ln_2", "attn.c_attn": "attn.qkv_proj",
                                            "attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up_proj",
                                            "mlp.c_proj": "mlp.down_proj"}
    elif cfg.model_type == "gpt_neox":
        top = {"gpt_neox.embed_in.weight": "wte.weight", "gpt_neox.final_layer_norm.weight": "ln_f.weight",
               "gpt_neox.final_layer_norm.bias": "ln_f.bias", "embed_out.weight": "lm_head.weight"}
        pre, layer = "gpt_neox.layers.{}.", {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2",
                                             "attention.query_key_value": "attn.qkv_proj",
                                             "attention.dense": "attn.o_proj", "mlp.dense_h_to_4h": "mlp.up_proj",
                                             "mlp.dense_4h_to_h": "mlp.down_proj"}
    else:
        top = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "ln_f.weight",
               "lm_head.weight": "lm_head.weight"}
        pre, layer = "model.layers.{}.", {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2",
                                          **{f"self_attn.{p}": f"attn.{p}"
                                             for p in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm",
                                                       "qkv_proj")},
                                          **{f"mlp.{p}": f"mlp.{p}"
                                             for p in ("gate_proj", "up_proj", "down_proj", "gate_up_proj")}}
        mixtral = cfg.model_type == "mixtral"  # block_sparse_moe, w1 = gate, w3 = up, w2 = down
        for e in range(cfg.n_expert):
            layer.update({f"block_sparse_moe.experts.{e}.{w}" if mixtral else f"mlp.experts.{e}.{p}":
                              f"mlp.experts.{e}.{p}"
                          for w, p in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))})
        if cfg.n_expert:
            layer.update({"block_sparse_moe.gate" if mixtral else "mlp.gate": "mlp.gate",
                          "mlp.shared_expert_gate": "mlp.shared_expert_gate",
                          **{f"mlp.shared_expert.{p}": f"mlp.shared_expert.{p}"
                             for p in ("gate_proj", "up_proj", "down_proj")}})
        if cfg.post_norms:  # gemma 2/3: post_attention_layernorm follows attention; pre_feedforward is ln_2
            layer.update({"post_attention_layernorm": "post_attn_norm", "pre_feedforward_layernorm": "ln_2",
                          "post_feedforward_layernorm": "post_mlp_norm"})
    names = dict(top)
    for i in range(cfg.n_layer):
        for hf_mod, our_mod in layer.items():
            for leaf in ("weight", "bias"):
                names[pre.format(i) + f"{hf_mod}.{leaf}"] = f"blocks.{i}.{our_mod}.{leaf}"
    # keep only names that exist in the model (biases and norms depend on flags)
    with torch.device("meta"):
        ours = {n for n, _ in GPT(cfg).named_parameters()}
    return {k: v for k, v in names.items() if v in ours}
