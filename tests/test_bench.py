"""bench.py's two sides of the DPO comparison do the same work: the BiPOST step (model.GPT +
losses.py through head_fn) and the plain transformers step (full logits, log_softmax, gather)
give the same losses on the same weights and batch, before and after one AdamW step."""
import os
import sys
from copy import deepcopy

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
from model import GPT, Config  # noqa: E402

def test_bipost_dpo_step_equals_plain_transformers_step():
    torch.manual_seed(0)
    cfg = Config(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8, intermediate_size=64,
                 norm_eps=1e-5)
    policy, ref = GPT(cfg), GPT(cfg)  # a reference unlike the policy: the step-0 loss is not log 2
    hf_policy, hf_ref = bench.to_hf(policy), bench.to_hf(ref).requires_grad_(False)
    pairs = bench.random_pairs(3, 24, 7, cfg.vocab_size, torch.Generator().manual_seed(1))
    pairs[1] = (pairs[1][0], pairs[1][1], pairs[1][1][:5] + pairs[1][2][5:])  # chosen/rejected share a prefix
    b = bench.dpo_batch(pairs, range(3))

    o = bench.objective("dpo", ref=deepcopy(ref).eval().requires_grad_(False), beta=0.5)
    opt, params = bench.make_optimizer(policy, lr=1e-3)
    ours = [bench.bipost_step(policy, opt, params, [(o, b, 1.0)], chunk_size=5)[0] for _ in range(2)]

    hf_opt = torch.optim.AdamW(hf_policy.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    plain = [bench.hf_dpo_step(hf_policy, hf_ref, hf_opt, b, beta=0.5) for _ in range(2)]

    assert abs(ours[0] - 0.6931) > 0.01  # the reference differs, so the numbers are not trivial
    assert abs(ours[0] - plain[0]) <= 1e-5, (ours, plain)
    assert abs(ours[1] - plain[1]) <= 1e-4, (ours, plain)  # one clipped AdamW step later
    assert ours[1] < ours[0]
