"""The router load-balancing loss of a mixture of experts against transformers' own: its value
(aux_loss) with and without padding, its weight (router_aux_loss_coef when the config's
output_router_logits is true), and the training step's gradient against transformers'
loss = CE + coef * aux_loss."""
import json

import pytest
import torch
import transformers

import data as D
from model import GPT, Config, router_aux_loss
from objectives import make
from step import Step

V, COEF = 61, 0.05

def moe_config(name, **kw):
    d = dict(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=COEF)
    d.update(kw)
    if name == "mixtral":
        return transformers.MixtralConfig(**d, num_local_experts=4, num_experts_per_tok=2)
    # a dense middle layer: only the MoE layers' routers count
    return transformers.Qwen2MoeConfig(**d, num_experts=5, num_experts_per_tok=2, moe_intermediate_size=24,
                                       shared_expert_intermediate_size=32, mlp_only_layers=[1])

def make_pair(name, path, seed=0):
    """a random transformers MoE saved under path, and the same weights through GPT.from_pretrained.
    Routers scaled up so tokens do not route near-uniformly (a balance the loss can see)."""
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(moe_config(name), attn_implementation="eager",
                                                       experts_implementation="eager").float()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("gate.weight"):
                p.mul_(40.0)
    hf.save_pretrained(path)
    return hf.eval(), GPT.from_pretrained(str(path)).eval()

def routers(model):
    """the router weights in layer order: transformers' TopKRouter modules, ours MoE.gate."""
    return [m.weight for n, m in model.named_modules() if type(m).__name__.endswith("Router")]

def padded_rows(lengths, T, seed, left=False):
    g = torch.Generator().manual_seed(seed)
    ids, mask = torch.zeros(len(lengths), T, dtype=torch.long), torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        sl = slice(T - n, T) if left else slice(0, n)
        ids[i, sl], mask[i, sl] = torch.randint(1, V, (n,), generator=g), 1
    return ids, mask

@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_router_aux_loss_matches_transformers(name, tmp_path):
    hf, ours = make_pair(name, tmp_path)
    assert ours.config.router_aux_coef == COEF
    # left- and right-padded rows (padding excluded), then full rows (no mask at all)
    ids, mask = padded_rows([19, 6, 13], 19, 1)
    ids2, mask2 = padded_rows([19, 4, 11], 19, 2, left=True)
    ids, mask = torch.cat([ids, ids2]), torch.cat([mask, mask2])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    full = torch.randint(1, V, (3, 17), generator=torch.Generator().manual_seed(3))
    for x, m, p in [(ids, mask, pos), (full, None, None)]:
        ref = hf(x, attention_mask=m, position_ids=p).aux_loss
        assert router_aux_loss(ours) is None  # no forward with grad since the last call: nothing to take
        ours(x, attention_mask=m, position_ids=p)
        got = router_aux_loss(ours, None if m is None else m > 0)
        assert abs(got.item() - ref.item()) <= 1e-5 * ref.item(), (got.item(), ref.item())
        for a, b in zip(torch.autograd.grad(got, routers(ours)), torch.autograd.grad(ref, routers(hf))):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # the mask matters: the padded batch counted whole is another number
    ours(ids, attention_mask=mask, position_ids=pos)
    assert abs(router_aux_loss(ours).item() - hf(ids, attention_mask=mask, position_ids=pos).aux_loss.item()) > 1e-4
    # no-grad forwards (references, generation, eval) record nothing
    with torch.no_grad():
        ours(full)
    assert router_aux_loss(ours) is None

def test_coefficient_follows_output_router_logits(tmp_path):
    """transformers adds coef * aux to the loss only when output_router_logits is true (its MoE
    configs default to false, as Mixtral's and Qwen's published checkpoints ship it)."""
    for kw, coef in [({}, 0.0), ({"output_router_logits": True}, 0.001),
                     ({"output_router_logits": True, "router_aux_loss_coef": 0.02}, 0.02),
                     ({"output_router_logits": False, "router_aux_loss_coef": 0.02}, 0.0)]:
        d = transformers.MixtralConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1).to_dict()
        d.pop("output_router_logits")
        d.pop("router_aux_loss_coef")
        assert Config.from_hf({**d, **kw}).router_aux_coef == coef, kw
    d = transformers.LlamaConfig(output_router_logits=True, router_aux_loss_coef=0.02).to_dict()
    assert Config.from_hf(d).router_aux_coef == 0.0  # dense: no routers

def sft_batch(lengths, prompt, seed):
    """SFT rows of the given lengths (labels shifted: labels[t] is the token at t + 1; the prompt's
    -100), right-padded by data.collate_sft with pad id 0."""
    g = torch.Generator().manual_seed(seed)
    ex = []
    for i, n in enumerate(lengths):
        x = torch.randint(1, V, (n,), generator=g).tolist()
        ex.append({"id": seed * 100 + i, "input_ids": x, "labels": [-100] * (prompt - 1) + x[prompt:] + [-100]})
    return D.collate_sft(ex, 0)

@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_step_loss_adds_coef_times_aux(name, tmp_path):
    """Step.train over two padded micro-batches: the gradient of every parameter compared (the
    routers, the embedding) is that of the global token-mean cross-entropy plus coef x the mean
    of the micro-batches' aux_loss, all from transformers (labels, attention_mask); the reported
    SFT loss is the cross-entropy alone. The same under gradient checkpointing, which keeps no
    router logits past the step."""
    hf, _ = make_pair(name, tmp_path)
    mbs = [sft_batch([15, 9, 12], 4, 1), sft_batch([7, 13], 3, 2)]
    n_tok = sum(int((b["labels"] != -100).sum()) for b in mbs)
    ce_sum, aux = 0.0, 0.0
    for b in mbs:
        hf_labels = torch.nn.functional.pad(b["labels"][:, :-1], (1, 0), value=-100)  # transformers shifts them itself
        out = hf(b["input_ids"], attention_mask=b["attention_mask"], labels=hf_labels)
        k = int((b["labels"] != -100).sum())
        ce_sum = ce_sum + (out.loss - COEF * out.aux_loss) * k
        aux = aux + out.aux_loss / len(mbs)
    ref_loss = ce_sum / n_tok + COEF * aux
    ref = torch.autograd.grad(ref_loss, routers(hf) + [hf.model.embed_tokens.weight])
    for ckpt in (False, True):
        ours = GPT.from_pretrained(str(tmp_path)).train()
        ours.gradient_checkpointing = ckpt
        step, o = Step(ours, ours, chunk_size=8), make("sft")
        (loss, _), = step.train([o], [mbs], [1.0])
        assert abs(loss - (ce_sum / n_tok).item()) <= 1e-5
        got = [p.grad for p in routers(ours)] + [ours.wte.weight.grad]
        assert got[0].abs().max() > 0
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        # nothing kept past the step (a checkpoint's recompute in backward records no router logits)
        assert all(getattr(m, "router_logits", None) is None for m in ours.modules())
    # without the term (coef 0) the routers' gradients differ: the comparison above sees it
    ours = GPT.from_pretrained(str(tmp_path)).train()
    ours.config.router_aux_coef = 0.0
    Step(ours, ours, chunk_size=8).train([make("sft")], [mbs], [1.0])
    assert max((p.grad - r).abs().max().item() for p, r in zip(routers(ours), ref)) > 1e-4

def test_router_aux_loss_key_overrides_the_checkpoint(tmp_path):
    """train.py's router_aux_loss: -1 keeps the checkpoint's choice (here output_router_logits false:
    no loss), a value >= 0 sets the weight. The first step's logged loss is the SFT loss either way
    (the term joins no objective's loss); the update differs, so the second step's loss differs."""
    from helpers import metrics, run_train
    from model import byte_tokenizer
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        moe_config("mixtral", vocab_size=258, output_router_logits=False)
    )
    hf.save_pretrained(tmp_path / "moe")
    byte_tokenizer().save_pretrained(tmp_path / "moe")
    args = [f"--pretrain={tmp_path / 'moe'}", "--obj_1=sft", "--obj_2=", "--dataset_1=data/toy_sft.jsonl",
            "--eval_split_1=data/toy_sft_eval.jsonl", "--max_samples_1=16", "--max_len_1=32", "--train_batch_size=4",
            "--micro_train_batch_size=4", "--max_iters=2", "--eval_iters=1", "--learning_rate=1e-2", "--dtype=float32"]
    losses = {}
    for v in ("-1", "0", "0.5"):
        run_train(tmp_path / v, *args, f"--router_aux_loss={v}", base=[])
        losses[v] = [m["loss"] for m in metrics(tmp_path / v)]
    assert losses["-1"] == losses["0"]  # the checkpoint asks for none
    assert losses["0.5"][0] == losses["0"][0] and losses["0.5"][1] != losses["0"][1]
