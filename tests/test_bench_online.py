"""bench.py's online mode (bench_online.py) measures the code users run: its BiPOST step's rows are
the prompts and the policy's own samples, their rewards and group advantages are the formula's,
its loss is the objectives / step code's on the same rollout, and its gradient (hence its AdamW
update) is the policy gradient written out on transformers' logits. The TRL peer, where trl is
installed, sees the same prompts, G and completion lengths."""
import importlib.util
import math
import os
import subprocess
import sys
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F

import bench
import benchlib
import bench_online as BO
from step import Step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(model_n_layer=2, model_n_embd=32, model_n_head=4, model_n_kv_head=2, model_intermediate_size=64,
            model_vocab_size=64, batch_size=2, num_generations=3, prompt_len=5, max_new_tokens=4, learning_rate=1e-2,
            seed=3)
P, G, L, N = TINY["batch_size"], TINY["num_generations"], TINY["prompt_len"], TINY["max_new_tokens"]

@pytest.fixture(scope="module")
def start():
    S = benchlib.build_start(BO.config({k: getattr(bench, k) for k in bench.config_keys}, **TINY))
    return S, BO.make_prompts(S, 2 * P)

def test_bipost_online_step_is_the_grpo_step(start):
    S, prompts = start
    init = deepcopy(S.base)
    run = BO.bipost_online(S, prompts)
    first = run.run(0)
    b = first["batch"]
    # the rows: each prompt's own ids (word_tokenizer text) G times, then N sampled tokens
    assert b["input_ids"].shape == (P * G, L + N)
    ids = [[int(w[1:]) for w in p.split()] for p in prompts[:P]]
    assert [r[:L] for r in b["input_ids"].tolist()] == [i for i in ids for _ in range(G)]
    comps = b["input_ids"][:, L:]
    assert (b["labels"][:, L - 1:-1] == comps).all() and (b["labels"][:, :L - 1] == -100).all()
    # rewards: even_share of the decoded completions; advantages: (r - group mean) / (group std + 1e-4)
    words = [" ".join(f"t{i}" for i in c) for c in comps.tolist()]
    r = torch.tensor(BO.even_share(None, words), dtype=torch.float64)
    assert torch.equal(b["rollout"]["reward"], r)
    g = r.view(P, G)
    A = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).view(-1)
    assert torch.allclose(b["advantages"].double(), A, atol=1e-12) and A.abs().max() > 0.1

    # the loss: objectives.py / step.py on the same rollout from the same weights
    policy = deepcopy(init)
    step = Step(policy, policy, pad_id=run.tokenizer.pad_token_id)
    (loss, _), = step.losses([(run.o, b, step.normalizers(run.o, [b]))])
    assert abs(loss.item() - first["loss"]) <= 1e-7

    # its gradient: -sum_i A_i sum_t log p(y_it) / (all completion tokens) on transformers' logits
    hf = benchlib.to_hf(init, torch.float64)
    logp = F.log_softmax(hf(input_ids=b["input_ids"]).logits[:, L - 1:-1], -1).gather(-1, comps[..., None])[..., 0]
    surrogate = -(A[:, None] * logp).sum() / (P * G * N)
    grads = torch.autograd.grad(surrogate, list(hf.parameters()))
    want = math.sqrt(sum(float(x.pow(2).sum()) for x in grads))
    assert want > 1e-3 and abs(first["gnorm"] - want) / want < 1e-4, (first["gnorm"], want)

    # the update: one clipped AdamW step of that gradient, the bench's optimizer settings
    opt = torch.optim.AdamW(
        hf.parameters(), lr=TINY["learning_rate"], betas=bench.adam_betas, eps=1e-8, weight_decay=0.0
    )
    for p, gr in zip(hf.parameters(), grads):
        p.grad = gr
    torch.nn.utils.clip_grad_norm_(hf.parameters(), bench.max_norm)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    opt.step()
    ours = benchlib.to_hf(run.model, torch.float64).state_dict()
    # Adam's first step is ~lr x sign(g): entries whose gradient is near its eps differ in float32,
    # so the updates are compared as a whole (a wrong update is off by ~100%)
    d_ours = torch.cat([(ours[k] - before[k]).flatten() for k in before])
    d_want = torch.cat([(v - before[k]).flatten() for k, v in hf.state_dict().items()])
    assert ((d_ours - d_want).norm() / d_want.norm()).item() < 1e-3 and d_want.norm() > 0

    # the second step: new prompts, the rollout counter moved on, every completion N tokens (checked in run)
    second = run.run(1)
    assert run.o.online.rollouts == 2 and second["batch"]["input_ids"][0, :L].tolist() == [
        int(w[1:]) for w in prompts[P].split()]

def test_trl_peer_runs_the_same_prompts_group_and_lengths(start):
    pytest.importorskip("trl", reason="trl is not in the test extras: the TRL peer is checked where it is installed")
    S, prompts = start
    records = BO.trl_online(S, prompts, 2)
    tok = benchlib.word_tokenizer(S.base.config.vocab_size)
    for k, rec in enumerate(records):
        assert rec["prompts"] == [p for p in prompts[k * P:(k + 1) * P] for _ in range(G)]
        assert rec["lengths"] == [N] * (P * G)
        assert rec["step_s"] > rec["gen_s"] > 0
    # TRL's tokenization of the prompt text gives the ids BiPOST's rows start with
    assert tok(prompts[0])["input_ids"] == [int(w[1:]) for w in prompts[0].split()]

def test_bench_py_runs_the_online_mode():
    args = [f"--{k}={v}" for k, v in TINY.items()] + ["--mode=online", "--warmup_iters=0", "--iters=1", "--rounds=1"]
    p = subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "bench online" in p.stdout and "bipost" in p.stdout
    if importlib.util.find_spec("trl") is not None:
        assert "BiPOST / TRL completion tokens/s" in p.stdout
    else:
        assert "TRL skipped" in p.stdout
