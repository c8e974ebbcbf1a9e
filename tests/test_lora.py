"""lora.py against plain references: the base model's own logits (zero B, disabled adapters), the
unmerged model (merge), and PEFT itself (PeftModel.from_pretrained on the transformers model
with our saved adapter, and our load_adapter of an adapter PEFT saved)."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import transformers

from lora import LoRALinear, disabled, inject, load_adapter, lora_parameters, merge, save_adapter
from model import GPT, Config

V = 97

HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64),
    "qwen2": lambda: transformers.Qwen2Config(vocab_size=V, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                              tie_word_embeddings=True),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=V, hidden_size=48, intermediate_size=80,
                                                   num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
                                                   max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=48, n_layer=2, n_head=4, n_positions=64),
}

def ids(T=13, seed=1):
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))

def tiny_gpt():
    torch.manual_seed(0)
    return GPT(
        Config(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8, intermediate_size=64)
    ).eval()

def family_gpt(name):
    # our model for a family's config, random weights (enough for module matching)
    return GPT(Config.from_hf(HF_CONFIGS[name]().to_dict()))

def save_hf(name, path):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name](), attn_implementation="eager").float()
    hf.save_pretrained(path)
    return path

def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))

def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}

# -----------------------------------------------------------------------------

def test_zero_init_merge_and_disable():
    m, x = tiny_gpt(), ids()
    with torch.no_grad():
        base = m(x)
    inject(m, rank=4, alpha=8, target_modules="all-linear")
    with torch.no_grad():
        assert torch.equal(m(x), base)  # B = 0
        for mod in lora_modules(m).values():
            bound = 1 / mod.base.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) on (r, in)
            assert mod.lora_A.abs().max() <= bound and mod.lora_A.std() > bound / 4
        randomize_lora(m)
        adapted = m(x)
        assert (adapted - base).abs().max() > 1e-2
        mods = lora_modules(m)
        next(iter(mods.values())).enabled = False  # a mixed state, restored after the context
        before = [mod.enabled for mod in mods.values()]
        with disabled(m):
            assert not any(mod.enabled for mod in mods.values())
            assert torch.equal(m(x), base)
        assert [mod.enabled for mod in mods.values()] == before
        for mod in mods.values():
            mod.enabled = True
        assert torch.equal(m(x), adapted)
        merged = merge(copy.deepcopy(m))
        assert not lora_modules(merged)
        assert list(merged.state_dict()) == list(tiny_gpt().state_dict())
        assert (merged(x) - adapted).abs().max() <= 1e-5

def test_merge_matches_hand_folded_weight():
    m = tiny_gpt()
    inject(m, rank=3, alpha=5, target_modules="o_proj")
    randomize_lora(m)
    mod = m.blocks[1].attn.o_proj
    want = mod.base.weight.detach() + 5 / 3 * mod.lora_B.detach() @ mod.lora_A.detach()
    merge(m)
    assert type(m.blocks[1].attn.o_proj) is nn.Linear
    assert (m.blocks[1].attn.o_proj.weight - want).abs().max() <= 1e-6

def test_only_lora_trainable_and_grads():
    m = tiny_gpt().train()
    paths = inject(m, rank=2, alpha=4, dropout=0.1, target_modules="q_proj,v_proj")
    randomize_lora(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.lora_{k}" for p in paths for k in "AB"}
    assert trainable == {n for n, _ in lora_parameters(m)}
    m(ids()).logsumexp(-1).mean().backward()
    for n, p in m.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n

@pytest.mark.parametrize("name,targets,expected", [
    ("llama", "q_proj,v_proj", ["attn.q_proj", "attn.v_proj"]),
    ("llama", ["self_attn.o_proj", " down_proj "], ["attn.o_proj", "mlp.down_proj"]),
    ("gpt_neox", "query_key_value", ["attn.qkv_proj"]),
    ("gpt2", "c_attn", ["attn.qkv_proj"]),
    ("gpt2", "qkv_proj", ["attn.qkv_proj"]),
    ("gpt2", "c_proj", ["attn.o_proj", "mlp.down_proj"]),
])
def test_target_modules(name, targets, expected):
    m = family_gpt(name)
    paths = inject(m, rank=2, alpha=2, target_modules=targets)
    assert paths == [f"blocks.{i}.{e}" for i in range(2) for e in expected]
    assert sorted(lora_modules(m)) == sorted(paths)

@pytest.mark.parametrize("name", ["llama", "gpt_neox", "gpt2"])
def test_all_linear(name):
    m = family_gpt(name)
    linears = [n for n, mod in m.named_modules() if n.startswith("blocks.") and isinstance(mod, nn.Linear)]
    paths = inject(m, rank=2, alpha=2)
    assert paths == linears and len(paths) == 2 * (7 if name == "llama" else 4)
    assert isinstance(m.lm_head, nn.Linear) and not m.lm_head.weight.requires_grad

def test_missing_target_is_an_error():
    with pytest.raises(
        ValueError, match=r"\['nope'\].*available: c_attn, c_fc, c_proj, down_proj, o_proj, qkv_proj, up_proj"
    ):
        inject(family_gpt("gpt2"), rank=2, alpha=2, target_modules="c_attn,nope")
    with pytest.raises(ValueError, match="gate_proj.*q_proj"):
        inject(family_gpt("llama"), rank=2, alpha=2, target_modules="query_key_value")

@pytest.mark.parametrize("name,targets,peft_targets", [
    ("llama", "q_proj,v_proj", ["q_proj", "v_proj"]),
    ("gpt_neox", "query_key_value", ["query_key_value"]),
    ("gpt2", "c_attn", ["c_attn"]),
    # 'c_proj' would also hit the mlp
    ("gpt2", "o_proj", ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]),
    ("qwen2", "all-linear", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
])
def test_peft_parity_and_reload(name, targets, peft_targets, tmp_path):
    import peft
    hf_dir = save_hf(name, tmp_path / "hf")
    ours = GPT.from_pretrained(str(hf_dir)).eval()
    paths = inject(ours, rank=4, alpha=12, dropout=0.05, target_modules=targets)  # alpha != r: scaling 3
    assert not any(mod.training for mod in ours.modules())  # eval() model: dropout stays off
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(hf_dir))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["target_modules"], cfg["fan_in_fan_out"],
            cfg["base_model_name_or_path"]) == (4, 12, 0.05, peft_targets, name == "gpt2", str(hf_dir))
    x = ids()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    with torch.no_grad():
        base = hf(x).logits
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        assert len([n for n, _ in pm.named_modules() if n.endswith("lora_A")]) == len(paths)
        ref, got = pm(x).logits, ours(x)
        assert (ref - base).abs().max() > 1e-2
        assert (got - ref).abs().max() <= 1e-4
        fresh = GPT.from_pretrained(str(hf_dir)).eval()
        assert load_adapter(fresh, tmp_path / "adapter") == paths
        assert all(m.dropout.p == 0.05 and m.scaling == 3 for m in lora_modules(fresh).values())
        assert torch.equal(fresh(x), got)

def test_load_adapter_saved_by_peft(tmp_path):
    import peft
    hf_dir = save_hf("llama", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "up_proj"],
                                                 task_type="CAUSAL_LM")).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(tmp_path / "adapter")
        ours = GPT.from_pretrained(str(hf_dir)).eval()
        assert load_adapter(ours, tmp_path / "adapter") == [
            f"blocks.{i}.{p}" for i in range(2) for p in ("attn.k_proj", "mlp.up_proj")
        ]
        assert lora_modules(ours)["blocks.0.attn.k_proj"].scaling == 2.5
        assert (ours(ids()) - pm(ids()).logits).abs().max() <= 1e-4

def test_load_adapter_rejects_unsupported(tmp_path):
    m = tiny_gpt()
    inject(m, rank=2, alpha=2, target_modules="q_proj")
    save_adapter(m, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(tiny_gpt(), tmp_path)
