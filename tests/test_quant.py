"""quant.py: 4-bit (NF4) frozen weights. The references: transformers and PEFT running the
dequantized weights in float64, the NF4 format's own bound (QLoRA's codebook spacing times each
block's absmax, worked out below), hand-written LoRA algebra, and the float32 model for the real
checkpoint."""
import math
import os
import socket

import pytest
import torch
import transformers

pytest.importorskip("torchao")

import losses as L  # noqa: E402
import quant  # noqa: E402
from decoding import generate  # noqa: E402
from errors import ConfigError  # noqa: E402
from lora import LoRALinear, disabled, inject, lora_parameters, merge, save_adapter  # noqa: E402
from model import GPT, quantized  # noqa: E402
from test_real import smollm2  # noqa: E402,F401,F811 (the real checkpoint's fixture)

V = 97
# QLoRA's NF4 codebook (Dettmers et al. 2023, appendix E): the quantiles of N(0, 1) scaled to [-1, 1]
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]

def llama_kw(**kw):
    # widths that are whole groups of 64-weight blocks
    return dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, **kw)

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**llama_kw()),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
                                                   max_position_embeddings=128),
    "mixtral": lambda: transformers.MixtralConfig(**llama_kw(num_local_experts=4, num_experts_per_tok=2)),
}

def make_hf(name, path, scale=1.0):
    """a tiny random transformers model of family name, saved to path, in float64 (norms and biases
    random too); scale multiplies the matrices (peaked logits: greedy decoding without near-ties)."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(FAMILIES[name](), attn_implementation="eager").double().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() >= 2 and "embed" not in n and ".gate." not in n:
                p.mul_(scale)
    hf.save_pretrained(path)
    return hf

def hf_from(path, dtype=torch.float64):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                             experts_implementation="eager", dtype=dtype).eval()

def ids(B=2, T=23, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))

def quantized_and_dequantized(path, dtype=torch.float64, **kw):
    """(the model at path with 4-bit weights, the same model holding their dequantized values,
    the original), in dtype"""
    orig = GPT.from_pretrained(str(path), dtype=dtype).eval()
    q = GPT.from_pretrained(str(path), dtype=dtype).eval()
    names = quant.quantize(q, **kw)
    assert names and all(quantized(p) for n, p in q.named_parameters() if n in names)
    d = quant.copy(q)
    quant.dequantize(d)
    assert not quant.is_quantized(d)
    return q, d, orig

# -----------------------------------------------------------------------------
# the format

@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_error_within_the_format_bound(double_quant):
    """Every weight is stored as a code value times its block's scale, the code value nearest to
    w / absmax(block); so |w - dequantized| <= h absmax + |absmax - scale|, h = half the largest gap
    between neighbouring code values (QLoRA's codebook: (0.6962 - (-1)) ... the gap [-1, -0.6962]
    gives h = 0.1519). Without double quantization the scale is the absmax; with it, the scales
    are stored in int8 per group of 256 around their mean m, a step of 2a / 256 (a = the group's
    largest |scale - m|), rounded (error <= a / 256) and clamped at 127 (one step at +a): error
    <= a / 128."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 256, generator=g) * torch.logspace(-3, 0, 512)[:, None]  # blocks of very different scales
    w[3, 7] = 40.0  # an outlier owns its block's scale
    q = quant.to_nf4(w, double_quant)
    assert q.shape == w.shape and q.dtype == w.dtype
    code = torch.tensor(QLORA_NF4)
    assert (q.nf4 - code).abs().max() < 1e-4  # torchao's codebook: QLoRA's, to 4 decimals
    h = (code[1:] - code[:-1]).max() / 2
    assert abs(h - 0.1519) < 1e-4
    deq = q.get_original_weight()
    blocks, dblocks = w.reshape(-1, 64), deq.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    s = quant.scales(q)[:, None]
    # each weight is a code value times the block's scale, the code nearest to w / absmax
    idx = (dblocks / s)[..., None].sub(q.nf4).abs().argmin(-1)
    assert torch.allclose(dblocks, q.nf4[idx] * s, rtol=0, atol=1e-6 * s.max())
    dist = (blocks / absmax)[..., None].sub(q.nf4).abs()
    assert (dist.gather(-1, idx[..., None]).squeeze(-1) <= dist.min(-1).values + 1e-6).all()
    if double_quant:
        m = absmax.mean()
        a = (absmax - m).reshape(-1, q.scaler_block_size).abs().amax(1, keepdim=True)
        assert ((s - absmax).reshape(-1, q.scaler_block_size).abs() <= a / 128 + 1e-7).all()
        assert (s - absmax).abs().max() > 0  # the scales really are rounded
    else:
        assert torch.equal(s, absmax)
    err = (blocks - dblocks).abs()
    assert (err <= h * absmax + (s - absmax).abs() + 1e-6 * absmax).all()
    assert err.max() / absmax.max() > 0.5 * h / 40  # the bound is near-tight somewhere, not vacuous
    # storage: 4 bits a code, one int8 (or float32) scale per 64, one float32 factor per group
    nbytes = q.quantized_data.nbytes + q.quantized_scalers.nbytes + q.quantization_factor.nbytes
    assert nbytes * 8 / w.numel() == pytest.approx(4 + (8 if double_quant else 32) / 64 + 32 / (64 * 256), abs=1e-9)

def test_blocks_and_groups_of_a_small_weight():
    # a weight that is no whole number of blocks is refused with its name; small ones get smaller groups
    with pytest.raises(ValueError, match="whole number of 64-weight blocks"):
        quant.to_nf4(torch.randn(3, 50))
    assert quant.scaler_block(1024) == 256 and quant.scaler_block(97) == 97 and quant.scaler_block(6 * 97) == 194

# -----------------------------------------------------------------------------
# the model on 4-bit weights

@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_equal_the_dequantized_model_in_transformers(name, tmp_path):
    """llama, gpt-neox (fused qkv, biases, layernorm) and mixtral (every expert 4-bit, the router
    not): the quantized model's logits equal those of the model holding the dequantized weights
    (float64 rounding) and transformers' on them (its norms' float32 rounding), and are far from
    the original's (the quantization is real). The chunked head (head_fn, the losses' path) gives
    the same log-probs as the dequantized model."""
    make_hf(name, tmp_path / "hf")
    q, d, orig = quantized_and_dequantized(tmp_path / "hf")
    assert not quantized(q.wte.weight) and not quantized(q.lm_head.weight) and not quantized(q.ln_f.weight)
    if name == "mixtral":
        moe = q.blocks[0].mlp
        assert quantized(moe.experts[3].down_proj.weight) and not quantized(moe.gate.weight)
    d.save_pretrained(tmp_path / "deq")
    hf = hf_from(tmp_path / "deq")
    x = ids()
    with torch.no_grad():
        got, ref = q(x), hf(x).logits
        assert (got - d(x)).abs().max() < 1e-12
        assert (got - ref).abs().max() < 1e-6  # transformers runs its norms in float32
        assert (got - orig(x)).abs().max() > 1e-3
        labels = torch.roll(x, -1, 1)
        lq = q(x, head_fn=lambda h, w: L.token_logps(h, w, labels, 7))
        ld = d(x, head_fn=lambda h, w: L.token_logps(h, w, labels, 7))
    assert (lq - ld).abs().max() < 1e-10

def test_quantized_head(tmp_path):
    """head=True: the untied output head 4-bit too; logits and the head_fn path (which gets the
    dequantized head) equal the dequantized model's. A head tied to the embedding is refused."""
    make_hf("llama", tmp_path / "hf")
    q, d, _ = quantized_and_dequantized(tmp_path / "hf", head=True)
    assert quantized(q.lm_head.weight) and not quantized(d.lm_head.weight)
    x, labels = ids(), torch.roll(ids(), -1, 1)
    with torch.no_grad():
        assert (q(x) - d(x)).abs().max() < 1e-10
        lq = q(x, head_fn=lambda h, w: L.token_logps(h, w, labels, 7))
        assert (lq - d(x, head_fn=lambda h, w: L.token_logps(h, w, labels, 7))).abs().max() < 1e-10
    tied = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**llama_kw(tie_word_embeddings=True)))
    tied.save_pretrained(tmp_path / "tied")
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        quant.quantize(GPT.from_pretrained(str(tmp_path / "tied")), head=True)

def test_lora_over_the_4bit_base(tmp_path):
    """LoRA injected over 4-bit weights (and quantizing after inject gives the same model):
    one layer's output is base_dequantized(x) + (alpha / r) B A x; the model's logits equal PEFT's
    with the same adapter on transformers' dequantized model; with the adapters off (the DPO
    reference) they equal the dequantized base. Only the adapters get gradients, the 4-bit weights
    none, and the gradients equal those over the dequantized base, also through gradient
    checkpointing; the input gradient runs through the frozen weight: x.grad = g (W + s B A)."""
    import peft
    make_hf("llama", tmp_path / "hf")
    q, d, _ = quantized_and_dequantized(tmp_path / "hf")
    inject(q, 4, 8)
    inject(d, 4, 8)
    after = GPT.from_pretrained(str(tmp_path / "hf"), dtype=torch.float64).eval()
    inject(after, 4, 8)
    quant.quantize(after)
    torch.manual_seed(3)
    with torch.no_grad():
        for (n, p), (_, p2), (_, p3) in zip(lora_parameters(q), lora_parameters(d), lora_parameters(after)):
            p.normal_(std=0.1)
            p2.copy_(p)
            p3.copy_(p)
    assert quant.quantized_names(after) == quant.quantized_names(q)
    # one layer, by hand
    layer = q.blocks[1].mlp.down_proj
    assert isinstance(layer, LoRALinear) and quantized(layer.base.weight)
    xin = torch.randn(5, 128, dtype=torch.float64, requires_grad=True)
    W = layer.base.weight.get_original_weight()
    want = xin @ W.t() + (xin @ layer.lora_A.t() @ layer.lora_B.t()) * layer.scaling
    y = layer(xin)
    assert (y - want).abs().max() < 1e-12
    gy = torch.randn_like(y)
    y.backward(gy)
    assert (xin.grad - gy @ (W + layer.scaling * layer.lora_B @ layer.lora_A)).abs().max() < 1e-12
    assert layer.base.weight.grad is None
    # the model against PEFT on the dequantized transformers model
    save_adapter(q, tmp_path / "adapter")
    d_plain = quant.copy(d)
    for n, m in list(d_plain.named_modules()):
        if isinstance(m, LoRALinear):
            parent, leaf = n.rsplit(".", 1)
            setattr(d_plain.get_submodule(parent), leaf, m.base)
    d_plain.save_pretrained(tmp_path / "deq")
    x = ids()
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(hf_from(tmp_path / "deq"), tmp_path / "adapter").eval()(x).logits
        got = q(x)
        assert (got - ref).abs().max() < 1e-6  # transformers runs its norms in float32
        assert (got - d(x)).abs().max() < 1e-12
        assert (after(x) - got).abs().max() == 0
        with disabled(q):
            assert (q(x) - d_plain(x)).abs().max() < 1e-10
    # gradients: the adapters only, equal to those over the dequantized base, with and without checkpointing
    labels = torch.roll(x, -1, 1)
    grads = {}
    for key, m, ckpt in (("q", q, False), ("q_ckpt", q, True), ("d", d, False)):
        m.train()
        m.gradient_checkpointing = ckpt
        m.zero_grad(set_to_none=True)
        (-m(x, head_fn=lambda h, w: L.token_logps(h, w, labels, 7)).sum()).backward()
        grads[key] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert set(grads["q"]) == {n for n, _ in lora_parameters(q)} == set(grads["d"])
    for n in grads["q"]:
        assert (grads["q"][n] - grads["d"][n]).abs().max() < 1e-10
        assert (grads["q_ckpt"][n] - grads["q"][n]).abs().max() < 1e-12
    assert all(p.grad is None for n, p in q.named_parameters() if quantized(p))

@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_kv_cache_generation_equals_the_dequantized_model(name, tmp_path):
    """greedy decoding with the KV cache (a left-padded batch) on the 4-bit model, with LoRA on:
    the same tokens as the no-cache forward and as transformers' generate on the dequantized
    weights with PEFT's adapter (mixtral: every expert 4-bit). In float32: transformers' padded
    rows give NaN logits in float64."""
    import peft
    make_hf(name, tmp_path / "hf", scale=3.0)
    q, d, _ = quantized_and_dequantized(tmp_path / "hf", torch.float32)
    d.save_pretrained(tmp_path / "deq")
    inject(q, 4, 8)
    torch.manual_seed(3)
    with torch.no_grad():
        for _, p in lora_parameters(q):
            p.normal_(std=0.3)
    save_adapter(q, tmp_path / "adapter")
    g = torch.Generator().manual_seed(8)
    x, mask = torch.zeros(3, 9, dtype=torch.long), torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate([9, 4, 6]):
        x[i, 9 - n:], mask[i, 9 - n:] = torch.randint(1, V, (n,), generator=g), 1
    cached = generate(q, x, 10, attention_mask=mask)
    assert torch.equal(cached, generate(q, x, 10, attention_mask=mask, use_cache=False))
    base = hf_from(tmp_path / "deq", torch.float32)
    base.generation_config.eos_token_id = base.generation_config.bos_token_id = None
    hf = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ref = hf.generate(input_ids=x, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0)
    assert torch.equal(cached, ref)

def test_merged_export(tmp_path):
    """merge refuses a 4-bit base (copying into it would quantize the merged weight again), and so
    does save_pretrained; restore_base re-reads the original weights, after which the merge equals
    the merge on the full-precision base exactly; the dequantized export's merge is the dequantized
    base plus the same B A, within the quantization error of the full-precision merge."""
    make_hf("gpt_neox", tmp_path / "hf")
    q, _, orig = quantized_and_dequantized(tmp_path / "hf")
    with pytest.raises(ValueError, match="is 4-bit"):
        q.save_pretrained(tmp_path / "nope")
    inject(q, 4, 8)
    inject(orig, 4, 8)
    torch.manual_seed(3)
    with torch.no_grad():
        for (_, p), (_, p2) in zip(lora_parameters(q), lora_parameters(orig)):
            p.normal_(std=0.1)
            p2.copy_(p)
    with pytest.raises(ValueError, match="is 4-bit"):
        merge(quant.copy(q))
    names = quant.quantized_names(q)
    base = quant.read_base(str(tmp_path / "hf"), q.config, names, torch.float64)
    assert set(base) == set(names)
    for n, t in base.items():
        assert torch.equal(t, dict(orig.named_parameters())[n])
    dq = quant.copy(q)
    quant.dequantize(dq)
    restored = quant.copy(q)
    assert sorted(quant.restore_base(restored, str(tmp_path / "hf"))) == sorted(names)
    want = dict(merge(orig).named_parameters())
    got = dict(merge(restored).named_parameters())
    assert all(torch.equal(got[n], want[n]) for n in want)
    q_layers = {n: m for n, m in q.named_modules() if isinstance(m, LoRALinear)}
    merged_dq = dict(merge(dq).named_parameters())
    for n, m in q_layers.items():
        w = merged_dq[f"{n}.weight"]
        W = m.base.weight.get_original_weight()
        assert (w - (W + m.scaling * m.lora_B @ m.lora_A)).abs().max() < 1e-12
        err = (w - want[f"{n}.weight"]).reshape(-1, 64).abs()
        absmax = base[f"{n}.base.weight"].reshape(-1, 64).abs().amax(1, keepdim=True)
        assert (err <= 0.1519 * absmax + (quant.scales(m.base.weight)[:, None] - absmax).abs() + 1e-9).all()

def test_copy_is_exact_and_device_move(tmp_path):
    """quant.copy copies codes and scales as they are (a plain deepcopy would go through torchao's
    clone, which quantizes again); quantize(device=) quantizes each weight there, then moves the rest."""
    make_hf("llama", tmp_path / "hf")
    q, _, _ = quantized_and_dequantized(tmp_path / "hf")
    c = quant.copy(q)
    for (n, a), (_, b) in zip(q.named_parameters(), c.named_parameters()):
        assert a is not b and type(a) is type(b)
        if quantized(a):
            for attr in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean"):
                assert torch.equal(getattr(a, attr), getattr(b, attr))
                assert getattr(a, attr).data_ptr() != getattr(b, attr).data_ptr()
    m = GPT.from_pretrained(str(tmp_path / "hf"), dtype=torch.float64)
    quant.quantize(m, device="cpu")
    assert quant.quantized_names(m) == quant.quantized_names(q)
    full = GPT.from_pretrained(str(tmp_path / "hf"), dtype=torch.float64)
    assert quant.weight_bytes(m) < 0.5 * quant.weight_bytes(full)

# -----------------------------------------------------------------------------
# config checks

def test_config_checks():
    def refused(c, kinds, refs, *words):
        with pytest.raises(ConfigError) as e:
            quant.check_keys(c, kinds, lambda i: i in refs)
        assert all(w in str(e.value) for w in words), str(e.value)
    refused({"quantize": "nf8", "lora_rank": 8}, ["sft"], [], "quantize", "'nf8'")
    refused({"quantize": "nf4", "quantize_2": "int3", "lora_rank": 8}, ["sft", "dpo"], [2], "quantize_2", "'int3'")
    refused({"quantize": "nf4", "lora_rank": 0}, ["sft", "dpo"], [], "quantize='nf4'", "nothing frozen")
    refused({"quantize": "", "quantize_1": "nf4", "lora_rank": 8}, ["sft", "kd"], [2], "quantize_1",
            "objective 1 (sft)")
    refused({"quantize": "nf4", "quantize_2": "", "lora_rank": 8}, ["sft", "dpo"], [2], "quantize_2", "ref_model_2")
    refused({"quantize": "", "quantize_head": True, "lora_rank": 8}, ["sft"], [], "quantize_head")
    # accepted: LoRA base; full fine-tuning with a teacher; a separate reference kept in full precision
    quant.check_keys({"quantize": "nf4", "lora_rank": 8}, ["sft", "dpo"], lambda i: i == 2)
    quant.check_keys({"quantize": "nf4", "lora_rank": 0}, ["sft", "kd"], lambda i: i == 2)
    quant.check_keys({"quantize": "nf4", "quantize_2": "", "ref_model_2": "x", "lora_rank": 8}, ["sft", "kd"],
                     lambda i: i == 2)
    quant.check_keys({"quantize": "", "quantize_2": "nf4", "lora_rank": 0}, ["sft", "kd"], lambda i: i == 2)

def test_shards_check(tmp_path):
    make_hf("llama", tmp_path / "hf")
    q, _, _ = quantized_and_dequantized(tmp_path / "hf")
    quant.check_shards(q, 2, 1)  # DDP / ZeRO-1: nothing sharded
    with pytest.raises(ConfigError, match="quantize and zero_stage=3.*over 2 ranks"):
        quant.check_shards(q, 2, 3)  # 64 x 64: one group of 64 scales

# -----------------------------------------------------------------------------
# two ranks: DDP (the 4-bit weights left out of its broadcast and buckets) and FSDP2 (NF4Tensor shards)

def _two_ranks(rank, port, out):
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.nn.parallel import DistributedDataParallel as DDP

    import runtime
    from model import Config
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = Config(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=256, head_dim=64, intermediate_size=512)

    def policy():
        torch.manual_seed(0)
        m = GPT(cfg).double()
        quant.quantize(m)
        inject(m, 4, 8)
        with torch.no_grad():
            for _, p in lora_parameters(m):
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
        return m
    x = ids(4, 16)
    loss = lambda m, xb: m(xb).logsumexp(-1).mean()
    one = policy()
    loss(one, x).backward()
    want = {n: p.grad for n, p in one.named_parameters() if p.grad is not None}
    teacher = quant.copy(one).requires_grad_(False)
    with torch.no_grad():
        t_want = teacher(x)
    xb = x[2 * rank:2 * rank + 2]
    res = {}
    m = policy()
    DDP._set_params_and_buffers_to_ignore_for_model(m, quant.ddp_ignored(m))
    ddp = DDP(m)
    loss(ddp, xb).backward()
    res["ddp"] = max((p.grad - want[n.removeprefix("module.")]).abs().max().item()
                     for n, p in ddp.named_parameters() if p.grad is not None)
    for zero in (2, 3):
        m = policy()
        quant.check_shards(m, 2, zero)
        runtime.shard(m, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float64, reduce_dtype=torch.float64),
                      reshard_after_forward=zero == 3)
        loss(m, xb).backward()
        res[f"fsdp{zero}"] = max((p.grad.full_tensor() - want[n]).abs().max().item()
                                 for n, p in m.named_parameters() if p.grad is not None)
        res[f"fsdp{zero}_shard_rows"] = m.blocks[0].attn.q_proj.base.weight.to_local().shape[0]
    t = quant.copy(teacher)
    runtime.shard(t, reshard_after_forward=True)
    with torch.no_grad():
        res["teacher"] = (t(xb) - t_want[2 * rank:2 * rank + 2]).abs().max().item()
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()

def test_ddp_and_fsdp2_on_two_ranks_equal_one_process(tmp_path):
    """gradients of the adapters over a 4-bit base on 2 ranks (DDP told to leave the 4-bit weights
    alone; FSDP2 at zero_stage 2 and 3, the 4-bit weights sharded by rows) equal one process's on
    the whole batch (float64), and a 4-bit teacher sharded by FSDP2 gives the same logits."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_ranks, args=(port, str(tmp_path)), nprocs=2)
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["ddp"] < 1e-12 and res["fsdp2"] < 1e-12 and res["fsdp3"] < 1e-12 and res["teacher"] < 1e-12, res
        assert res["fsdp2_shard_rows"] == res["fsdp3_shard_rows"] == 128  # of 256: each rank holds half

# -----------------------------------------------------------------------------
# the real checkpoint

HELD_OUT = ("The river had been rising for three days, and by the morning of the fourth the old bridge was under "
            "water. People from the village gathered on the hill to watch, some carrying bread and tea, others "
            "just standing with their hands in their pockets. Nobody remembered a flood like it. The baker said his "
            "grandfather had told stories of the water reaching the church steps, but everyone thought he had "
            "made them up. By noon the rain stopped, the clouds broke apart, and a thin light fell across the "
            "fields, which now looked like a lake with trees growing out of it.")

@pytest.mark.real
def test_smollm2_nf4_held_out_loss(smollm2):
    """SmolLM2-135M-Instruct with every block's Linear weight in NF4 (double quantization): the
    held-out text's mean token loss is within 0.1 nats of the float32 model's (NF4's published
    cost on small models is a few percent of the loss), and the 4-bit blocks hold under 1/6 of
    their float32 bytes."""
    from model import load_tokenizer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores a second thread spin-waits (test_real.py)
    try:
        _smollm2_losses(smollm2, load_tokenizer)
    finally:
        torch.set_num_threads(threads)

def _smollm2_losses(smollm2, load_tokenizer):
    tok = load_tokenizer(smollm2)
    x = torch.tensor([tok(HELD_OUT)["input_ids"]])
    labels = torch.roll(x, -1, 1)
    labels[:, -1] = L.IGNORE_INDEX
    m = GPT.from_pretrained(smollm2).eval()
    nll = lambda: -m(x, head_fn=lambda h, w: L.token_logps(h, w, labels, 256)).sum().item() / (x.shape[1] - 1)
    before_bytes = sum(p.nbytes for n, p in m.named_parameters() if n.startswith("blocks."))
    with torch.no_grad():
        fp32 = nll()
        quant.quantize(m)
        nf4 = nll()
    after_bytes = quant.weight_bytes(m.blocks)
    print(f"SmolLM2-135M held-out loss: float32 {fp32:.4f}, nf4 {nf4:.4f} ({x.shape[1]} tokens); "
          f"blocks {before_bytes / 2**20:.0f} -> {after_bytes / 2**20:.0f} MiB")
    assert 0 < fp32 < 5
    assert abs(nf4 - fp32) < 0.1
    assert nf4 != fp32
    assert after_bytes < before_bytes / 6

# -----------------------------------------------------------------------------
# training through train.py. The reference for a run on a 4-bit base (or teacher, or reference) is
# the same run on a checkpoint holding the dequantized weights, in full precision: the forward of
# a 4-bit weight multiplies exactly those values, so in float32 (the dtype both quantize in) every
# line of metrics.jsonl must agree to the bit, generation and rollouts included.

def dequantized_twin(src, dst):
    """src's checkpoint with every block Linear weight replaced by its NF4-dequantized value (float32,
    quantized as train.py quantizes a float32 base), with src's tokenizer."""
    from model import byte_tokenizer
    m = GPT.from_pretrained(str(src), dtype=torch.float32)
    quant.quantize(m)
    quant.dequantize(m)
    m.save_pretrained(str(dst))
    byte_tokenizer().save_pretrained(str(dst))
    return str(dst)

@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """tiny byte-vocabulary llamas: base (the policy's), teacher (another seed), and their
    dequantized twins."""
    from helpers import tiny_hf
    d = tmp_path_factory.mktemp("bases")
    tiny_hf(d / "base", 0)
    tiny_hf(d / "teacher", 1)
    return dict(base=str(d / "base"), teacher=str(d / "teacher"), base_deq=dequantized_twin(d / "base", d / "base_deq"),
                teacher_deq=dequantized_twin(d / "teacher", d / "teacher_deq"))

def lines(out):
    """every metrics line, the wall-clock fields (elapsed_s, gen_s_7, ...) left out"""
    import re
    from helpers import read_jsonl
    return [{k: v for k, v in l.items() if not re.search(r"_s(_\d+)?$", k)} for l in read_jsonl(out / "metrics.jsonl")]

def tensors(path):
    """the tensors of a safetensors file, or of a checkpoint directory's model.safetensors"""
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors") if os.path.isdir(path) else str(path))

LORA_ALRIGHT = ["--lora_rank=4", "--lora_alpha=8", "--method=alright", "--max_iters=6", "--save_interval=3",
                "--train_batch_size=4", "--micro_train_batch_size=2", "--learning_rate=3e-2", "--dtype=float32",
                "--eval_gen_interval=0", "--eval_gen_samples=4", "--eval_gen_max_new_tokens=8"]

def test_lora_sft_dpo_on_the_4bit_base_resume_and_export(bases, tmp_path):
    """LoRA SFT + DPO under ALRIGHT over the 4-bit base (the DPO reference: the same 4-bit base with
    the adapters off) gives, line for line and to the bit, the run on the dequantized base: the
    losses, the eval losses, the greedy answers' metrics (KV-cache decoding), and the adapter. A
    run cut after its checkpoint at 3 resumes to the same lines. final/ is the adapter merged into
    the original base re-read from pretrain (W + s B A), not into the dequantized weights, and
    final/adapter on the original base in PEFT gives final/'s logits; export_dequantized=True
    (here on the resume) merges into the dequantized base: the dequantized run's final/ exactly."""
    import peft
    from helpers import resume_after_cut, run_train
    q, deq = tmp_path / "nf4", tmp_path / "deq"
    run_train(q, f"--pretrain={bases['base']}", "--quantize=nf4", *LORA_ALRIGHT)
    run_train(deq, f"--pretrain={bases['base_deq']}", *LORA_ALRIGHT)
    a, b = lines(q), lines(deq)
    assert a == b
    train = [l for l in a if l["kind"] == "train"]
    assert {l["obj"] for l in train} == {1, 2} and train[-1]["loss"] != train[0]["loss"]
    assert abs([l["eval_loss_2"] for l in a if l["kind"] == "eval"][0] - math.log(2)) < 1e-6  # policy = reference
    assert any(l["kind"] == "eval_gen" for l in a)
    adapter = lambda out: tensors(out / "final" / "adapter" / "adapter_model.safetensors")
    ad, scaling = adapter(q), 8 / 4
    assert ad.keys() == adapter(deq).keys() and all(torch.equal(v, adapter(deq)[k]) for k, v in ad.items())
    # final/: the adapters merged into the original base
    base, dq, final = tensors(bases["base"]), tensors(bases["base_deq"]), tensors(q / "final")
    merged = 0
    for k, w in final.items():
        a_key = "base_model.model." + k.replace(".weight", ".lora_A.weight")
        if a_key not in ad:
            assert torch.equal(w, base[k]), k  # norms, embedding, head: the base's own
            continue
        delta = scaling * ad[a_key.replace("lora_A", "lora_B")] @ ad[a_key]
        assert (w - (base[k] + delta)).abs().max() < 1e-6, k
        assert (w - (dq[k] + delta)).abs().max() > 1e-3, k  # not the dequantized base
        merged += 1
    assert merged == 14  # 7 projections x 2 blocks
    import transformers
    x = ids(2, 17)
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(bases["base"], dtype=torch.float32).eval()
        got = peft.PeftModel.from_pretrained(ref, str(q / "final" / "adapter")).eval()(x).logits
        want = transformers.AutoModelForCausalLM.from_pretrained(str(q / "final"), dtype=torch.float32).eval()(x).logits
    assert (got - want).abs().max() < 1e-5
    # resume from iteration 3, exporting the dequantized merge
    p = resume_after_cut(q, tmp_path / "cut", [f"--pretrain={bases['base']}", "--quantize=nf4", *LORA_ALRIGHT,
                                               "--export_dequantized=True"], "iter_0000006")
    assert lines(tmp_path / "cut") == a
    assert "export_dequantized=True: final/ merges the adapters into the dequantized 4-bit weights of 14 layers" \
        in p.stdout
    cut, want = tensors(tmp_path / "cut" / "final"), tensors(deq / "final")
    assert cut.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in cut.items())

EVERY_KIND = ["--method=mix", "--lambd=0.16,0.14,0.14,0.14,0.14,0.14,0.14", "--obj_3=simpo", "--obj_4=orpo",
              "--obj_5=kto", "--obj_6=kd", "--obj_7=grpo", *(f"--{k}_{i}={v}" for i in (3, 4, 5) for k, v in (
                  ("dataset", "data/toy_pref.jsonl"), ("eval_split", "data/toy_pref_eval.jsonl"))),
              "--dataset_6=data/toy_sft.jsonl", "--eval_split_6=data/toy_sft_eval.jsonl",
              "--dataset_7=data/toy_whisper.jsonl", "--eval_split_7=data/toy_whisper_eval.jsonl",
              "--reward_fn_7=lowercase", "--max_new_tokens_7=8", "--num_generations_7=4", "--eval_max_samples_7=4",
              "--max_len_7=48", "--max_samples=32", "--lora_rank=4", "--learning_rate=3e-2", "--train_batch_size=8",
              "--micro_train_batch_size=4", "--max_iters=3",
              "--precompute_ref=True", "--dtype=float32", "--eval_gen_interval=0", "--eval_gen_samples=4",
              "--eval_gen_max_new_tokens=8"]

def test_every_kind_on_the_4bit_base(bases, tmp_path):
    """all seven kinds in one run (mix: every kind in every step) with LoRA over the 4-bit base:
    sft; dpo and kto with their references cached once from the 4-bit base with its adapters off
    (precompute_ref: the digest of the 4-bit weights); simpo, orpo; kd (the teacher: the 4-bit base);
    grpo's rollouts sampled from the 4-bit model with the KV cache and its held-out reward; every
    kind's greedy answers at the end (evalgen): every line equals the run on the dequantized base
    to the bit."""
    from helpers import run_train
    q, deq = tmp_path / "nf4", tmp_path / "deq"
    p = run_train(q, f"--pretrain={bases['base']}", "--quantize=nf4", *EVERY_KIND)
    run_train(deq, f"--pretrain={bases['base_deq']}", *EVERY_KIND)
    a = lines(q)
    assert a == lines(deq)
    train = [l for l in a if l["kind"] == "train"]
    assert all(f"loss_{i}" in l for l in train for i in range(1, 8)) and "reward_7" in train[0], train[0]
    assert "eval_reward_7" in [l for l in a if l["kind"] == "eval"][-1]
    cached = [f[:11] for f in os.listdir(q) if f.startswith("ref_logps_")]
    assert sorted(cached) == ["ref_logps_2", "ref_logps_5"] and "reference log-probs" in p.stdout
    gen = [l for l in a if l["kind"] == "eval_gen"][-1]
    assert {k.rsplit("_", 1)[1] for k in gen if k.startswith("gen_")} == {"1", "2", "3", "4", "5", "6"}, gen

KD_ALRIGHT = ["--obj_1=kd", "--dataset_1=data/toy_sft.jsonl", "--eval_split_1=data/toy_sft_eval.jsonl",
              "--obj_2=sft", "--dataset_2=data/toy_sft.jsonl", "--eval_split_2=data/toy_sft_eval.jsonl",
              "--obj_3=dpo", "--dataset_3=data/toy_pref.jsonl", "--eval_split_3=data/toy_pref_eval.jsonl",
              "--max_len_3=40", "--max_samples_3=32", "--method=alright", "--lambd=0.4,0.3,0.3", "--max_iters=8",
              "--train_batch_size=4", "--micro_train_batch_size=2", "--learning_rate=1e-2", "--dtype=float32"]

def test_kd_from_a_4bit_teacher_under_alright(bases, tmp_path):
    """full fine-tuning (the policy trains every weight, in full precision) with quantize=nf4: the
    KD teacher (ref_model_1) is 4-bit, and DPO's reference, a copy of the initial policy, is
    quantized from the initial weights. KD + SFT + DPO under ALRIGHT equal, to the bit, the run
    whose teacher and reference are the dequantized checkpoints; final/ is the same model."""
    from helpers import run_train
    q, deq = tmp_path / "nf4", tmp_path / "deq"
    run_train(q, f"--pretrain={bases['base']}", f"--ref_model_1={bases['teacher']}", "--quantize=nf4", *KD_ALRIGHT)
    run_train(deq, f"--pretrain={bases['base']}", f"--ref_model_1={bases['teacher_deq']}",
              f"--ref_model_3={bases['base_deq']}", *KD_ALRIGHT)
    a = lines(q)
    assert a == lines(deq)
    assert {l["obj"] for l in a if l["kind"] == "train"} == {1, 2, 3}
    dpo0 = [l["eval_loss_3"] for l in a if l["kind"] == "eval"][0]
    assert abs(dpo0 - math.log(2)) > 1e-5  # the policy at iteration 0 is not its 4-bit reference
    final, want, base = tensors(q / "final"), tensors(deq / "final"), tensors(bases["base"])
    assert final.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in final.items())
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(final[q_proj], base[q_proj])  # the policy trained

def wide_hf(path, seed):
    """a byte-vocabulary llama wide enough for FSDP2 to shard its 4-bit weights over 2 ranks (every
    weight at least 2 groups of 256 x 64 weights)"""
    from model import byte_tokenizer
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=258, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)

def test_two_ranks_equal_one_ddp_zero1_fsdp2(tmp_path):
    """LoRA on q_proj, v_proj (the other projections plain 4-bit Linears) for SFT + DPO (reference:
    the 4-bit base, adapters off) + KD from a separate 4-bit teacher under ALRIGHT, float64: 2 ranks
    under DDP (the 4-bit weights left out of its broadcast), ZeRO-1 and FSDP2 full sharding (the
    4-bit base and teacher sharded by rows) give the 1-process lines, the greedy answers' metrics
    at the end included, and the same final/ (the base re-read from pretrain, gathered from the
    shards). Not to the bit: the ranks' gradients are summed in another order (1e-15 relative)."""
    from helpers import run_train
    base, teacher = wide_hf(tmp_path / "base", 0), wide_hf(tmp_path / "teacher", 1)
    args = [f"--pretrain={base}", "--quantize=nf4", "--lora_rank=4", "--target_modules=q_proj,v_proj", "--obj_3=kd",
            f"--ref_model_3={teacher}", "--dataset_3=data/toy_sft.jsonl", "--eval_split_3=data/toy_sft_eval.jsonl",
            "--max_len_3=40", "--max_samples_3=32", "--method=alright", "--lambd=0.4,0.3,0.3", "--max_iters=6",
            "--train_batch_size=4", "--micro_train_batch_size=2", "--learning_rate=3e-2", "--dtype=float64",
            "--eval_gen_interval=0", "--eval_gen_samples=4", "--eval_gen_max_new_tokens=6"]
    run_train(tmp_path / "one", *args)
    one = lines(tmp_path / "one")
    assert {l["obj"] for l in one if l["kind"] == "train"} == {1, 2, 3} and one[-1]["kind"] == "eval_gen"
    for zero in (0, 1, 3):
        p = run_train(tmp_path / f"zero{zero}", *args, f"--zero_stage={zero}", nproc=2)
        two = lines(tmp_path / f"zero{zero}")
        assert [l.keys() for l in two] == [l.keys() for l in one]
        for x, y in zip(one, two):
            for k, v in x.items():
                exact = isinstance(v, (str, int))
                assert v == y[k] if exact else abs(v - y[k]) <= 1e-12 * max(1, abs(v)), (zero, k, v, y[k])
        f1, f2 = tensors(tmp_path / "one" / "final"), tensors(tmp_path / f"zero{zero}" / "final")
        assert max((f1[k] - f2[k]).abs().max().item() for k in f1) <= 1e-6
    assert "1 frozen reference / teacher model(s) sharded across 2 ranks" in p.stdout + p.stderr

def test_train_config_refusals(tmp_path):
    """train.py's checks (checks.check, before anything loads) call quant.check_keys on the config as
    train.py resolves it; what only the loaded model tells is refused as it is set up: a head tied to
    the embedding with quantize_head, 4-bit weights FSDP2 cannot split over the ranks (runtime.wrap,
    before any collective). Each a ConfigError naming the keys."""
    from types import SimpleNamespace

    import runtime
    from helpers import check_config, train_defaults

    def check(**over):
        c, per = train_defaults(dataset="data/toy_sft.jsonl", **over)
        return check_config(c, per)

    def refused(words, **over):
        with pytest.raises(ConfigError) as e:
            check(**over)
        assert all(w in str(e.value) for w in words), str(e.value)
    refused(["config key quantize: 'nf8' is not one of '', 'nf4'"], quantize="nf8", lora_rank=8)
    refused(["quantize='nf4'", "nothing frozen", "no objective has a reference"], quantize="nf4")  # full FT sft alone
    refused(["quantize='nf4'", "every reference / teacher has quantize_i=''"], quantize="nf4", obj_2="dpo",
            quantize_2="")
    refused(["quantize_1='nf4'", "objective 1 (sft) has no reference"], quantize_1="nf4", obj_2="dpo")
    refused(["quantize_2=''", "adapters off", "ref_model_2"], quantize="nf4", quantize_2="", obj_2="dpo",
            lora_rank=8)
    refused(["quantize_3 is set, but the run has 2 objective(s)"], quantize="nf4", quantize_3="nf4", obj_2="dpo",
            lora_rank=8)
    refused(["quantize_head=True: set quantize"], quantize_head=True, lora_rank=8)
    refused(["export_dequantized=True", "lora_rank > 0 and quantize set"], export_dequantized=True, quantize="nf4",
            obj_2="dpo")
    assert check(quantize="nf4", obj_2="dpo") == ["sft", "dpo"]  # full FT: dpo's reference, the initial policy
    assert check(quantize="nf4", kl_anchor=0.1) == ["sft"]  # sft's reference for its KL anchor
    assert check(quantize="nf4", quantize_2="", obj_2="kd", ref_model_2="teacher", lora_rank=8) == ["sft", "kd"]
    tied = transformers.LlamaConfig(**llama_kw(tie_word_embeddings=True))
    transformers.AutoModelForCausalLM.from_config(tied).save_pretrained(tmp_path / "tied")
    with pytest.raises(ConfigError, match=r"config keys quantize_2 \(or quantize\)='nf4' and quantize_head=True: "
                                          r"the output head is the input embedding"):
        quant.frozen(GPT.from_pretrained(str(tmp_path / "tied")), "nf4", True, None, "quantize_2 (or quantize)")
    torch.manual_seed(0)
    m = GPT.from_pretrained(str(tmp_path / "tied"))
    quant.frozen(m, "nf4")
    world = SimpleNamespace(ddp=True, rank=0, world_size=2, local_rank=0, device_type="cpu")
    with pytest.raises(ConfigError, match=r"config keys quantize and zero_stage=3: blocks\.0\.attn\.q_proj\.weight "
                                          r"\(64, 64\) has 1 groups .* cannot shard over 2 ranks; use zero_stage 0 "
                                          r"or 1"):
        runtime.wrap(m, world, 3, torch.float32, torch.float32)

@pytest.mark.real
def test_smollm2_nf4_trains_through_train_py(smollm2, tmp_path):
    """train.py on SmolLM2-135M-Instruct with its blocks in NF4 under LoRA: SFT + DPO (mix, chat
    template). Before training, the SFT eval loss is the 4-bit model's (computed here on the same
    rows, against the float32 model's: 4.364 against 3.854 nats on these four rows, which echo a
    word pair in capitals; on natural text the gap is 0.056, test_smollm2_nf4_held_out_loss), and
    DPO's is log 2 (its reference: the 4-bit base with the adapters off); 2 steps lower the SFT
    eval loss by over a nat (measured 4.36 -> 1.91)."""
    import data as D
    from helpers import ROOT, metrics, run_train
    from model import load_tokenizer
    out = tmp_path / "run"
    args = [f"--pretrain={smollm2}", "--quantize=nf4", "--obj_1=sft", "--obj_2=dpo", "--method=mix",
            "--dataset_1=data/toy_sft.jsonl", "--eval_split_1=data/toy_sft_eval.jsonl",
            "--dataset_2=data/toy_pref.jsonl", "--eval_split_2=data/toy_pref_eval.jsonl",
            "--apply_chat_template_1=true", "--apply_chat_template_2=true", "--max_samples_1=8", "--max_samples_2=8",
            "--max_len_1=48", "--max_len_2=48", "--lora_rank=8", "--lora_alpha=16", "--learning_rate=2e-3",
            "--train_batch_size=4", "--micro_train_batch_size=4", "--max_iters=2", "--eval_interval=0",
            "--eval_iters=1", "--dtype=float32", "--seed=0"]
    run_train(out, *args, base=[])
    first, last = metrics(out, "eval")[0], metrics(out, "eval")[-1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = load_tokenizer(smollm2)
        rows = D.load_rows(os.path.join(ROOT, "data/toy_sft_eval.jsonl"))[:4]  # eval_iters x train_batch_size
        b = D.collate_sft(D.tokenize_sft(rows, tok, 48, apply_chat_template=True), tok.pad_token_id)
        m = GPT.from_pretrained(smollm2).eval()
        def sft_loss():
            with torch.no_grad():
                lp = m(b["input_ids"], b["attention_mask"], b["position_ids"],
                       head_fn=lambda h, w: L.token_logps(h, w, b["labels"], 256))
            return -lp.sum().item() / int((b["labels"] != L.IGNORE_INDEX).sum())
        fp32 = sft_loss()
        quant.quantize(m)
        nf4 = sft_loss()
    finally:
        torch.set_num_threads(threads)
    print(f"SmolLM2-135M SFT eval loss before training: float32 {fp32:.4f}, nf4 {nf4:.4f}, train.py nf4 "
          f"{first['eval_loss_1']:.4f}; after 2 steps {last['eval_loss_1']:.4f}")
    assert abs(first["eval_loss_1"] - nf4) < 1e-5 and abs(nf4 - fp32) > 0.01
    assert abs(first["eval_loss_2"] - math.log(2)) < 1e-5
    assert last["eval_loss_1"] < first["eval_loss_1"] - 1.0
