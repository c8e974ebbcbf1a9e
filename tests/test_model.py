"""model.py against transformers' own implementations: tiny random models of every supported
family are built with transformers, saved, loaded with GPT.from_pretrained, and compared."""
import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from model import GPT, Config, byte_tokenizer, load_tokenizer

V = 97  # odd sizes catch layout bugs

def llama_kw(**kw):
    d = dict(vocab_size=V, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    d.update(kw)
    return d

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**llama_kw()),
    "llama_tied": lambda: transformers.LlamaConfig(**llama_kw(tie_word_embeddings=True)),
    "llama3_rope": lambda: transformers.LlamaConfig(**llama_kw(
        max_position_embeddings=256, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama_linear_rope": lambda: transformers.LlamaConfig(**llama_kw(
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": lambda: transformers.MistralConfig(**llama_kw(head_dim=12)),
    "qwen2": lambda: transformers.Qwen2Config(**llama_kw(tie_word_embeddings=True)),
    "qwen3": lambda: transformers.Qwen3Config(**llama_kw(head_dim=16)),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=V, hidden_size=48, intermediate_size=80,
                                                   num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
                                                   max_position_embeddings=128, use_parallel_residual=True),
    "gpt_neox_sequential": lambda: transformers.GPTNeoXConfig(
        vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, rotary_pct=0.5,
        max_position_embeddings=128, use_parallel_residual=False),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=48, n_layer=2, n_head=4, n_positions=128),
    # windows of 8 keys against sequences of 37: the window decides most positions
    "mistral_window": lambda: transformers.MistralConfig(**llama_kw(head_dim=12, sliding_window=8)),
    "qwen2_window": lambda: transformers.Qwen2Config(**llama_kw(use_sliding_window=True, sliding_window=8,
                                                                max_window_layers=1)),  # layer 0 full, 1 sliding
    "gemma": lambda: transformers.GemmaConfig(**llama_kw(head_dim=16, hidden_act="gelu_pytorch_tanh")),
    "gemma2": lambda: transformers.Gemma2Config(**llama_kw(head_dim=16, sliding_window=8, query_pre_attn_scalar=20,
                                                           attn_logit_softcapping=2.0, final_logit_softcapping=None)),
    "gemma3": lambda: transformers.Gemma3TextConfig(**llama_kw(
        num_hidden_layers=3, head_dim=16, sliding_window=8, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    "phi3": lambda: transformers.Phi3Config(**llama_kw(pad_token_id=0, eos_token_id=None, sliding_window=8)),
    "phi3_partial_rotary": lambda: transformers.Phi3Config(**llama_kw(
        pad_token_id=0, eos_token_id=None, num_key_value_heads=6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})),
}
# mixtures of experts: 4 experts, 2 per token; qwen2-moe with a shared expert and layer 1 dense.
# apart from FAMILIES: transformers' grouped-mm experts refuse float64, which generate's tests use
MOE = {
    "mixtral": lambda: transformers.MixtralConfig(**llama_kw(
        intermediate_size=40, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**llama_kw(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=32,
        mlp_only_layers=[1])),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**llama_kw(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                                moe_intermediate_size=24, norm_topk_prob=True)),
}
# parity of full logits only: generate's head_fn path does not apply a final soft-cap
LOGITS_ONLY = {
    "gemma2_final_softcap": lambda: transformers.Gemma2Config(**llama_kw(head_dim=16, sliding_window=8,
                                                                         final_logit_softcapping=0.5)),
}
WINDOWED = ["mistral_window", "qwen2_window", "gemma2", "gemma3", "phi3"]

def make_hf(name, path):
    torch.manual_seed(0)
    hf = (
        transformers.AutoModelForCausalLM.from_config(
            {**FAMILIES, **LOGITS_ONLY, **MOE}[name](), attn_implementation="eager"
        )
        .float()
        .eval()
    )
    # random norms/biases too, so a missed one shows
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or "ln" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(path)
    return hf

@pytest.mark.parametrize("name", list(FAMILIES) + list(LOGITS_ONLY) + list(MOE))
def test_logit_parity_and_round_trip(name, tmp_path):
    hf = make_hf(name, tmp_path / "hf")
    ours = GPT.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, V, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert (got - ref).abs().max().item() <= 1e-4
    # our save_pretrained -> transformers gives the same logits
    ours.save_pretrained(tmp_path / "ours")
    back = (
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").float().eval()
    )
    with torch.no_grad():
        assert (back(ids).logits - got).abs().max().item() <= 1e-4

def test_sharded_checkpoint(tmp_path):
    make_hf("llama", tmp_path / "hf")
    m = GPT.from_pretrained(str(tmp_path / "hf"))
    m.save_pretrained(tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    m2 = GPT.from_pretrained(str(tmp_path / "sharded"))
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").float()
    with torch.no_grad():
        assert (hf(ids).logits - m(ids)).abs().max() <= 1e-4

@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox"] + WINDOWED)
def test_padding_and_packing(name, tmp_path):
    make_hf(name, tmp_path)
    m = GPT.from_pretrained(str(tmp_path)).eval()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, V, (11,), generator=g), torch.randint(0, V, (6,), generator=g)
    with torch.no_grad():
        la, lb = m(a[None])[0], m(b[None])[0]
        # right-padded batch
        ids = torch.zeros(2, 11, dtype=torch.long)
        ids[0], ids[1, :6] = a, b
        mask = torch.zeros(2, 11, dtype=torch.long)
        mask[0], mask[1, :6] = 1, 1
        out = m(ids, attention_mask=mask)
        assert (out[0] - la).abs().max() <= 1e-5 and (out[1, :6] - lb).abs().max() <= 1e-5
        # packed: [a b pad pad], segment ids 1,2 and positions restarting per document
        ids = torch.cat([a, b, torch.zeros(2, dtype=torch.long)])[None]
        seg = torch.tensor([[1] * 11 + [2] * 6 + [0] * 2])
        pos = torch.cat([torch.arange(11), torch.arange(6), torch.zeros(2, dtype=torch.long)])[None]
        out = m(ids, attention_mask=seg, position_ids=pos)[0]
        assert (out[:11] - la).abs().max() <= 1e-5 and (out[11:17] - lb).abs().max() <= 1e-5
        assert torch.isfinite(out).all()

@pytest.mark.parametrize("name", WINDOWED + ["gemma", "gemma2_final_softcap"] + list(MOE))
def test_padded_batch_parity_with_transformers(name, tmp_path):
    """left- and right-padded rows of different lengths against transformers with the same
    attention mask and positions: every real position's logits agree."""
    hf = make_hf(name, tmp_path)
    m = GPT.from_pretrained(str(tmp_path)).eval()
    g = torch.Generator().manual_seed(5)
    lengths, T = [21, 5, 13], 21
    ids, mask = torch.zeros(6, T, dtype=torch.long), torch.zeros(6, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        r = torch.randint(1, V, (n,), generator=g)
        ids[i, :n], mask[i, :n] = r, 1                 # right padded
        ids[3 + i, T - n:], mask[3 + i, T - n:] = r, 1  # left padded
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = m(ids, attention_mask=mask, position_ids=pos)
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max().item() <= 1e-4
    # the same rows alone: padding changes nothing (left-padded rows window over real tokens only)
    with torch.no_grad():
        for i, n in enumerate(lengths):
            alone = m(ids[i:i + 1, :n])[0]
            assert (got[i, :n] - alone).abs().max() <= 1e-5 and (got[3 + i, T - n:] - alone).abs().max() <= 1e-5

def test_window_keeps_the_causal_fast_path(monkeypatch, tmp_path):
    """a sliding layer attends with is_causal and no mask while T <= W, with a band mask past it;
    the band is exactly the last W keys of each query."""
    import model as M
    calls = []
    real_attend = M.attend
    monkeypatch.setattr(
        M,
        "attend",
        lambda q, k, v, mask, is_causal, *a: calls.append((mask, is_causal))
        or real_attend(q, k, v, mask, is_causal, *a),
    )
    make_hf("mistral_window", tmp_path)
    m = GPT.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        m(torch.randint(0, V, (2, 8)), attention_mask=torch.ones(2, 8, dtype=torch.long))
        assert calls and all(mask is None and causal for mask, causal in calls)
        calls.clear()
        m(torch.randint(0, V, (2, 9)))
    band = calls[0][0]
    i, j = torch.arange(9)[:, None], torch.arange(9)[None]
    assert not calls[0][1] and torch.equal(band.reshape(9, 9), (j <= i) & (i - j < 8))
    assert M.window_mask(None, 8, 0, 8, "cpu") is None  # T == W: nothing to cut
    # decoding step 12 of a cache: keys 5..12 of 13
    assert torch.equal(M.window_mask(None, 8, 12, 1, "cpu")[0], torch.arange(13) >= 5)

def test_mask_only_where_causal_is_not_exact(tmp_path):
    """right padding runs with is_causal and no mask; left padding and packing need the mask."""
    from model import needs_mask
    assert not needs_mask(torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]]))
    assert needs_mask(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left padding
    assert needs_mask(torch.tensor([[1, 1, 2], [1, 1, 1]]))  # packed
    make_hf("llama", tmp_path)
    m = GPT.from_pretrained(str(tmp_path)).eval()
    a = torch.randint(0, V, (6,), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([torch.zeros(3, dtype=torch.long), a])[None]
    mask = torch.tensor([[0] * 3 + [1] * 6])
    pos = torch.tensor([[0] * 3 + list(range(6))])
    with torch.no_grad():
        out = m(ids, attention_mask=mask, position_ids=pos)[0, 3:]
        assert (out - m(a[None])[0]).abs().max() <= 1e-5

def test_flash_varlen_unpadding_matches_sdpa(monkeypatch, tmp_path):
    """The flash-attn path (CUDA only) gathers each (row, segment) into one sequence; here the
    kernel is replaced by a plain per-sequence attention to check that gathering on CPU."""
    import model as M

    def varlen(q, k, v, cu_q, cu_k, mq, mk, causal, softmax_scale=None, window_size=(-1, -1)):
        out = torch.empty_like(q)
        for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qq, kk, vv = (t[s:e].transpose(0, 1) for t in (q, k, v))
            i, j = torch.arange(e - s)[:, None], torch.arange(e - s)[None]
            band = (j <= i) & ((i - j <= window_size[0]) if window_size[0] >= 0 else True)
            out[s:e] = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=band).transpose(0, 1)
        return out
    make_hf("gpt_neox", tmp_path)
    m = GPT.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, V, (2, 10))
    seg = torch.tensor([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3])
    pos = torch.tensor([list(range(4)) + list(range(6)), list(range(10))])
    with torch.no_grad():
        ref = m(ids, attention_mask=seg, position_ids=pos)
        monkeypatch.setattr(M, "flash_attn_varlen_func", varlen)
        q = torch.randn(2, 10, 4, 12)
        y = M.flash_attention(q, q * 0.5, q * 2, seg)
        for b, (s, e) in [(0, (0, 4)), (0, (4, 10)), (1, (0, 7))]:
            want = varlen(q[b, s:e], 0.5 * q[b, s:e], 2 * q[b, s:e], torch.tensor([0, e - s]), None, 0, 0, True)
            assert torch.allclose(y[b, s:e], want, atol=1e-6)
    assert torch.isfinite(ref).all()

def test_gradient_checkpointing_same_grads(tmp_path):
    make_hf("qwen3", tmp_path)
    grads = []
    for ckpt in (False, True):
        m = GPT.from_pretrained(str(tmp_path)).train()
        m.gradient_checkpointing = ckpt
        ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(3))
        m(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        assert (grads[0][n] - grads[1][n]).abs().max() <= 1e-6, n

def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    with pytest.raises(ValueError, match="unsupported model_type 'bloom'.*llama.*gpt_neox.*gpt2"):
        GPT.from_pretrained(str(tmp_path))

def test_fresh_model_saves_as_llama(tmp_path):
    torch.manual_seed(0)
    m = GPT(
        Config(vocab_size=258, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8, intermediate_size=64)
    ).eval()
    m.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    ids = torch.randint(0, 258, (2, 9))
    with torch.no_grad():
        assert (hf(ids).logits - m(ids)).abs().max() <= 1e-5

def test_byte_tokenizer_round_trip(tmp_path):
    t = byte_tokenizer()
    assert t.encode("hé!", add_special_tokens=False) == list("hé!".encode())
    assert (t.eos_token_id, t.pad_token_id) == (256, 257)
    t.save_pretrained(tmp_path)
    t2 = load_tokenizer(str(tmp_path))
    assert t2.encode("User: x\n", add_special_tokens=False) == list(b"User: x\n")
    assert t2.decode(list(b"abc") + [256]) == "abc<|endoftext|>"

@pytest.mark.parametrize("kind", ["sft", "dpo", "kd"])
def test_final_softcap_in_the_step(kind, tmp_path):
    """gemma 2's final soft-cap reaches the chunked losses: step.py's SFT / DPO / forward-KD loss
    and gradients on a soft-capped model (its teacher / reference soft-capped too) equal the plain
    formulas on the model's full, capped logits (which match transformers: test_logits_match).
    A head_fn that cannot take the cap is refused, not run on uncapped logits."""
    import benchlib
    from objectives import make
    from step import Step
    make_hf("gemma2_final_softcap", tmp_path)
    policy = GPT.from_pretrained(str(tmp_path), dtype=torch.float64)
    other = GPT.from_pretrained(str(tmp_path), dtype=torch.float64).requires_grad_(False)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert policy.config.final_softcap == 0.5
    with pytest.raises(TypeError, match="softcap"):
        policy(torch.randint(0, V, (1, 5)), head_fn=lambda h, w: h @ w.t())
    pairs = benchlib.random_pairs(3, 14, 5, V, torch.Generator().manual_seed(2))
    b = benchlib.dpo_batch(pairs, range(3)) if kind == "dpo" else benchlib.sft_batch(pairs, range(3))
    o = make(kind, ref=other, dpo_beta=0.5)
    step = Step(policy, policy, chunk_size=4)
    (loss, _), = step.losses([(o, b, step.normalizers(o, [b]))])
    y, keep = b["labels"], b["labels"] != -100
    logp = lambda m: torch.log_softmax(m(b["input_ids"]), -1)  # the model's full, capped logits
    if kind == "sft":
        ref = -logp(policy).gather(-1, y.clamp(min=0)[..., None])[..., 0][keep].sum() / keep.sum()
    elif kind == "kd":
        lt = logp(other).detach()
        ref = -(lt.exp() * logp(policy)).sum(-1)[keep].sum() / keep.sum()
    else:
        seq = lambda m: (m.gather(-1, y.clamp(min=0)[..., None])[..., 0] * keep).sum(-1).chunk(2)
        (pc, pr), (rc, rr) = seq(logp(policy)), seq(logp(other).detach())
        ref = -F.logsigmoid(0.5 * ((pc - rc) - (pr - rr))).mean()
    uncapped = GPT.from_pretrained(str(tmp_path), dtype=torch.float64)
    uncapped.config.final_softcap = 0.0
    assert abs(loss.item() - ref.item()) < 1e-10 and abs(ref.item() - step_loss(uncapped, other, o, b, kind)) > 1e-3
    params = [policy.lm_head.weight, policy.blocks[0].attn.q_proj.weight]
    for a, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-8)

def step_loss(model, ref, o, b, kind):
    """the step's loss of model with a reference / teacher of the same family, uncapped both."""
    from step import Step
    ref.config.final_softcap, cap = 0.0, ref.config.final_softcap
    try:
        step = Step(model, model, chunk_size=4)
        (loss, _), = step.losses([(o, b, step.normalizers(o, [b]))])
        return loss.item()
    finally:
        ref.config.final_softcap = cap

OLD_STYLE = {  # hub configs written before layer_types / rope_parameters existed
    "gemma3": lambda d: {**{k: v for k, v in d.items() if k not in ("layer_types", "rope_parameters")},
                         "sliding_window_pattern": 2, "rope_theta": 1e6, "rope_local_base_freq": 100.0,
                         "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "gemma2": lambda d: {k: v for k, v in d.items() if k != "layer_types"},
    "gemma": lambda d: {**d, "hidden_act": "gelu"},  # gemma 1's legacy value, meant as the tanh approximation
    "qwen2_window": lambda d: {k: v for k, v in d.items() if k != "layer_types"},
}

@pytest.mark.parametrize("name", list(OLD_STYLE))
def test_old_style_configs(name, tmp_path):
    """config.json without layer_types (gemma 2/3: every 2nd / pattern-th layer is global; qwen2:
    layers from max_window_layers on slide) and gemma 3's rope_local_base_freq: read as
    transformers reads them."""
    make_hf(name, tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(OLD_STYLE[name](json.loads(path.read_text()))))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    assert ours.config.layer_types == list(getattr(hf.config, "layer_types", None) or ["full_attention"] * 2)
    x = torch.linspace(-4, 4, 101)
    if name == "gemma":  # the tanh approximation, as transformers >= 5.2x reads it
        assert torch.equal(ours.blocks[0].mlp.act(x), F.gelu(x, approximate="tanh"))
        if hf.config.hidden_act == "gelu":  # older transformers (5.17) run exact GELU: compare the rest
            for layer in hf.model.layers:
                layer.mlp.act_fn = transformers.activations.ACT2FN["gelu_pytorch_tanh"]
    assert torch.equal(ours.blocks[0].mlp.act(x), hf.model.layers[0].mlp.act_fn(x))
    ids = torch.randint(0, V, (2, 29), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4

@pytest.mark.parametrize("name,targets", [("phi3", "all-linear"), ("gemma3", "all-linear"), ("mixtral", "all-linear"),
                                          ("qwen2_moe", "q_proj,v_proj,shared_expert.up_proj,shared_expert_gate")])
def test_lora_adapter_in_peft(name, targets, tmp_path):
    """fused phi3 projections (qkv_proj, gate_up_proj), gemma's extra norms, mixtral's experts (3D
    tensors in transformers 5: PEFT maps w1/w2/w3 onto them; it does not for qwen2-moe's experts,
    so that one adapts attention and the shared expert): our LoRA adapter, saved in PEFT layout,
    gives the same logits in PEFT on the transformers model."""
    import peft
    from lora import inject, save_adapter
    hf = make_hf(name, tmp_path / "hf")
    ours = GPT.from_pretrained(str(tmp_path / "hf")).eval()
    inject(ours, rank=4, alpha=8, target_modules=targets)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.1)
    save_adapter(ours, tmp_path / "adapter")
    ids = torch.randint(0, V, (2, 19), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        base = hf(ids).logits
        ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(ids).logits
        got = ours(ids)
    assert (ref - base).abs().max() > 1e-2
    assert (got - ref).abs().max().item() <= 1e-4

@pytest.mark.parametrize("name", list(MOE))
def test_moe_kv_cache_generation(name, tmp_path):
    """generate.py's KV-cache decoding of a left-padded batch on a mixture of experts: the same
    tokens as the no-cache forward and as transformers' generate (float32, eager experts)."""
    from decoding import generate
    hf = make_hf(name, tmp_path)
    with torch.no_grad():  # peaked logits: no near-ties in the argmax
        for n, p in hf.named_parameters():
            p.mul_(3.0) if p.dim() == 2 and ".gate." not in n else None
    hf.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager").float().eval()
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    g = torch.Generator().manual_seed(8)
    ids, mask = torch.zeros(3, 9, dtype=torch.long), torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate([9, 4, 6]):
        ids[i, 9 - n:], mask[i, 9 - n:] = torch.randint(1, V, (n,), generator=g), 1
    cached = generate(ours, ids, 10, attention_mask=mask)
    hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None
    ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0)
    assert torch.equal(cached, generate(ours, ids, 10, attention_mask=mask, use_cache=False))
    assert torch.equal(cached, ref)
