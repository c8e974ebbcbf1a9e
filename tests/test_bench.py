"""bench.py's two sides of the DPO comparison do the same work: the BiPOST step (model.GPT +
losses.py through head_fn) and the plain transformers step (full logits, log_softmax, gather)
give the same losses on the same weights and batch, before and after one AdamW step. Its joint
cases pick with methods.py's code, and its FLOP count is the hand count of the model's products."""
import math
import os
import sys
from copy import deepcopy

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import benchlib  # noqa: E402
import methods  # noqa: E402
import objectives  # noqa: E402
import runtime  # noqa: E402
from model import GPT, Config  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

def test_bipost_dpo_step_equals_plain_transformers_step():
    torch.manual_seed(0)
    cfg = Config(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8, intermediate_size=64,
                 norm_eps=1e-5)
    policy, ref = GPT(cfg), GPT(cfg)  # a reference unlike the policy: the step-0 loss is not log 2
    hf_policy, hf_ref = benchlib.to_hf(policy), benchlib.to_hf(ref).requires_grad_(False)
    pairs = benchlib.random_pairs(3, 24, 7, cfg.vocab_size, torch.Generator().manual_seed(1))
    pairs[1] = (pairs[1][0], pairs[1][1], pairs[1][1][:5] + pairs[1][2][5:])  # chosen/rejected share a prefix
    b = benchlib.dpo_batch(pairs, range(3))

    o = objectives.make("dpo", ref=deepcopy(ref).eval().requires_grad_(False), dpo_beta=0.5)
    opt, params = runtime.optimizer(policy, 1e-3, (0.9, 0.95))  # bench's AdamW: weight decay 0, not fused on CPU
    step = bench.Step(policy, policy, chunk_size=5)
    ours = [bench.bipost_step(step, opt, params, [(o, b, 1.0)])[0] for _ in range(2)]

    hf_opt = torch.optim.AdamW(hf_policy.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    plain = [bench.hf_dpo_step(hf_policy, hf_ref, hf_opt, b, beta=0.5) for _ in range(2)]

    assert abs(ours[0] - 0.6931) > 0.01  # the reference differs, so the numbers are not trivial
    assert abs(ours[0] - plain[0]) <= 1e-5, (ours, plain)
    assert abs(ours[1] - plain[1]) <= 1e-4, (ours, plain)  # one clipped AdamW step later
    assert ours[1] < ours[0]

def test_bench_step_is_train_py_step(tmp_path):
    """bench.py measures the code train.py runs: train.py's DPO losses on a real command equal
    bench's step (step.py) and the plain transformers step on the same weights and rows, step for
    step, in float64. The step-2 loss (after one clipped AdamW update) is what can differ."""
    import data as D
    from helpers import metrics, run_train
    from model import load_tokenizer
    dpo = ["--obj_1=dpo", "--dataset_1=data/toy_pref.jsonl", "--eval_split_1=data/toy_pref_eval.jsonl",
           "--max_samples_1=8", "--max_len_1=40", "--train_batch_size=8", "--micro_train_batch_size=8",
           "--model_n_layer=2", "--model_n_embd=32", "--model_n_head=4", "--model_n_kv_head=2",
           "--model_intermediate_size=64", "--eval_iters=1", "--eval_interval=0", "--dtype=float64"]
    run_train(tmp_path / "init", *dpo, "--max_iters=1", "--learning_rate=0", base=[])  # final/ = the initial weights
    init = str(tmp_path / "init" / "final")
    run_train(
        tmp_path / "run", *dpo, f"--pretrain={init}", "--max_iters=2", "--learning_rate=3e-3", "--dpo_beta=0.5", base=[]
    )
    theirs = [l["loss"] for l in metrics(tmp_path / "run")]

    tok = load_tokenizer(init)
    rows, _ = D.load_splits("data/toy_pref.jsonl", max_samples=8, seed=42, eval_split="data/toy_pref_eval.jsonl")
    b = D.collate_dpo(D.tokenize_dpo(rows, tok, 40), tok.pad_token_id)  # the whole global batch: order-free sums
    b["completion_mask"] = torch.nn.functional.pad((b["labels"] != -100).long(), (1, 0))[:, :-1]  # the peer's mask
    policy = GPT.from_pretrained(init, dtype=torch.float64)
    ref = GPT.from_pretrained(init, dtype=torch.float64).eval().requires_grad_(False)
    hf_policy, hf_ref = benchlib.to_hf(policy, torch.float64), benchlib.to_hf(ref, torch.float64).requires_grad_(False)
    o = objectives.make("dpo", ref=ref, dpo_beta=0.5)
    opt, params = runtime.optimizer(policy, 3e-3, (0.9, 0.95))
    step = bench.Step(policy, policy, pad_id=tok.pad_token_id)
    ours = [bench.bipost_step(step, opt, params, [(o, b, 1.0)])[0] for _ in range(2)]
    hf_opt = torch.optim.AdamW(hf_policy.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    plain = [bench.hf_dpo_step(hf_policy, hf_ref, hf_opt, b, beta=0.5) for _ in range(2)]
    assert abs(theirs[0] - math.log(2)) < 1e-9 and abs(theirs[1] - theirs[0]) > 1e-3
    for a, c, d in zip(theirs, ours, plain):
        # transformers computes the rotary angles in float32 even for a float64 model: ~1e-8 apart
        assert abs(a - c) <= 1e-12 and abs(a - d) <= 1e-6, (theirs, ours, plain)

def test_alright3_is_weighed_against_the_three_single_objective_steps():
    """alright3's step time: the per-objective medians of its steps weighted 1/3 each, over the
    same weighting of the sft, dpo and kd cases' step times (hand-computed below)."""
    from types import SimpleNamespace
    objs = ["sft", "dpo", "sft", "kd", "dpo", "sft"]
    times = [1.1, 2.0, 1.0, 3.3, 2.2, 1.2]
    R = SimpleNamespace(name="alright3", times=times, evals=[0.0] * 6, objs=objs, tokens=[10, 20, 10, 30, 20, 10])
    singles = {"sft": {"step_s": 1.0}, "dpo": {"step_s": 2.0}, "kd": {"step_s": 3.0}}
    out = bench.summarize(R, singles, lambd=0.5)
    assert out["counts"] == {"sft": 3, "dpo": 2, "kd": 1}
    assert math.isclose(out["step_s"], (1.1 + 2.1 + 3.3) / 3) and math.isclose(out["single_step_s"], 2.0)
    assert math.isclose(out["vs_single"], (1.1 + 2.1 + 3.3) / 3 / 2.0)
    assert math.isclose(out["tokens_per_step"], 20.0)

def tiny_start(**kw):
    """bench's starting state for a tiny llama on the CPU (float32), with kw over its defaults."""
    cfg = {k: getattr(bench, k) for k in bench.config_keys}
    cfg.update(model_n_layer=2, model_n_embd=32, model_n_head=4, model_n_kv_head=2, model_intermediate_size=64,
               model_vocab_size=97, batch_size=2, seq_len=16, prompt_len=4, warmup_iters=1, iters=7, device="cpu", **kw)
    return benchlib.build_start(cfg)

def test_simpo_case_loss_is_simpo_on_full_logits():
    """the simpo case's step loss (step.py, the head applied in chunks through head_fn) is SimPO's,
    computed here from the model's full logits on the same batch: the pairs' mean of
    -log sigmoid(beta (a - b) - gamma), a and b the chosen and rejected answers' mean response-token
    log-probs, beta = simpo_beta, gamma objectives.py's default."""
    S = tiny_start()
    with torch.no_grad():
        S.base.lm_head.weight.mul_(30)  # a sharper head: margins a - b of ~0.35 (~0.003 at the random init's scale)
    R = bench.make_runner("simpo", S)
    R.warm(1)  # one step on batch 0 from the initial weights: R.last_loss is its (pre-update) loss
    b = S.dpo_batches[0]  # B pairs as 2B rows, chosen first
    with torch.no_grad():
        logits = S.base(b["input_ids"]).double()  # (2B, T, V): the initial weights (the case trains a copy)
    labels = b["labels"]  # labels[:, t] = the token predicted at t, -100 on the prompt
    mask = labels != -100
    logps = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    a, r = ((logps * mask).sum(-1) / mask.sum(-1)).chunk(2)
    beta, gamma = S.cfg["simpo_beta"], objectives.make("simpo").cfg.simpo_gamma
    want = -torch.nn.functional.logsigmoid(beta * (a - r) - gamma).mean().item()
    assert beta == 2.0 and gamma == 0.5
    assert abs(want - math.log1p(math.exp(gamma))) > 0.1  # the margins move the loss well off softplus(gamma)
    assert abs(R.last_loss - want) <= 1e-5, (R.last_loss, want)

def test_joint_cases_pick_with_methods_py(monkeypatch):
    """alright / alright3 train the objectives methods.alright_draws gives for the seed and weights;
    maxright's choices are those of a methods.Maxright fed the same gaps (eval loss - stand-in f*)
    and the same updates (the trained objective's loss - f*), its gaps re-evaluated every
    maxright_interval steps."""
    S = tiny_start(lambd=0.5, maxright_interval=2)
    for name, w in (("alright", (0.5, 0.5)), ("alright3", (1 / 3,) * 3)):
        R = bench.make_runner(name, S)
        R.warm(1)
        for _ in range(7):
            R.step()
        assert R.objs == [bench.JOINT[name][i - 1] for i in methods.alright_draws(S.cfg["seed"], w, 7)], R.objs
        assert isinstance(R.method, methods.Alright)
    calls, pick, update = [], methods.Maxright.pick, methods.Maxright.update

    def spy_pick(self, it, gap):
        seen = {}
        out = pick(self, it, lambda i: seen.setdefault(i, gap(i)))
        calls.append(("pick", it, seen, out))
        return out
    monkeypatch.setattr(methods.Maxright, "pick", spy_pick)
    monkeypatch.setattr(
        methods.Maxright, "update", lambda self, i, g: (calls.append(("update", i, g)), update(self, i, g))
    )
    R = bench.make_runner("maxright", S)
    R.warm(1)
    for _ in range(7):
        R.step()
    monkeypatch.undo()
    ref, chosen = methods.Maxright((0.5, 0.5), maxright_interval=2), []
    for c in calls:
        if c[0] == "pick":
            assert ref.pick(c[1], lambda i: c[2][i]) == c[3]
            chosen.append(bench.JOINT["maxright"][c[3][0] - 1])
        else:
            ref.update(c[1], c[2])
    assert R.objs == chosen and len(chosen) == 7 and set(chosen) == {"sft", "dpo"}, chosen
    assert [c[1] for c in calls if c[0] == "pick" and c[2]] == [0, 2, 4, 6]  # both gaps re-evaluated every 2 steps
    assert [e > 0 for e in R.evals] == [k % 2 == 0 for k in range(7)]  # those evaluations are timed with their step

def test_flop_count_is_the_hand_count():
    """matmul_params counts every product's weights (blocks and head, not the input embedding):
    all parameters but the embedding and the norms; LoRA adds r (in + out) per adapted layer. The
    DPO step's FLOPs by part equal the hand count: policy 6N per token (head on labelled positions),
    head recompute 2 V C, reference 2N, attention 12 L H hd T per token."""
    from lora import inject
    S = tiny_start()
    c, m = S.base.config, S.base
    L_, C, H, K, hd, I, V = c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.intermediate_size, c.vocab_size
    M = bench.matmul_params(m)
    assert M["body"] == L_ * (2 * C * H * hd + 2 * C * K * hd + 3 * C * I) and M["head"] == V * C and M["lora"] == 0
    norms = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 1)
    assert M["body"] + M["head"] == m.num_params() - m.wte.weight.numel() - norms
    B, T, P = S.cfg["batch_size"], S.cfg["seq_len"], S.cfg["prompt_len"]
    tok, lab = 2 * B * T, 2 * B * (T - P)  # dpo: B pairs = 2B rows
    R = bench.make_runner("dpo", S)
    want = {"policy body": 6 * M["body"] * tok, "policy head": 6 * V * C * lab, "attention": 12 * L_ * H * hd * T * tok,
            "head recompute": 2 * V * C * lab,
            "reference forward": 2 * M["body"] * tok + 4 * L_ * H * hd * T * tok + 2 * V * C * lab}
    assert R.flops == {"dpo": want}
    lora = deepcopy(m)
    inject(lora, 4, 8, 0.0, "q_proj,v_proj")
    Ml = bench.matmul_params(lora)
    assert Ml["body"] == M["body"] and Ml["lora"] == L_ * 4 * ((C + H * hd) + (C + K * hd))
    f = bench.step_flops([(objectives.make("sft"), S.sft_batches[0], 1.0)], Ml)
    tok, lab = B * T, B * (T - P)
    assert f == {"policy body": 4 * M["body"] * tok, "policy head": 4 * V * C * lab,
                 "attention": 12 * L_ * H * hd * T * tok,
                 "LoRA adapters": 6 * Ml["lora"] * tok}  # frozen weights: forward and the input's gradient only
