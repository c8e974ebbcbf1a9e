"""The online objectives: GRPO's loss and gradient against the formula written out here on
transformers' own logits (advantages, clipping, the k3 KL, the global token mean), RLOO's
advantages, on-policy distillation against the full-logit reverse KL of the student's own samples,
counter-based sampling (seeded, independent of the batch), reward-function errors, 2 ranks = 1,
resume across a reused rollout, LoRA's adapters-off reference, and that GRPO learns a verifiable
task and that ALRIGHT keeps SFT where sequential training forgets it."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import objectives
import rewards
import rollout as R
from helpers import metrics, refused, resume_after_cut, run_train, tiny_hf, train_defaults
from model import GPT, byte_tokenizer
from step import Step

TEMPLATE = "User: {}\nAssistant: "
GRPO = ["--obj_1=grpo", "--dataset_1=data/toy_whisper.jsonl", "--eval_split_1=data/toy_whisper_eval.jsonl", "--obj_2=",
        "--reward_fn_1=lowercase", "--max_len_1=48", "--max_new_tokens_1=8", "--num_generations_1=4", "--train_batch_size=8",
        "--micro_train_batch_size=4", "--max_samples_1=64", "--eval_max_samples_1=8"]

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    return d, tiny_hf(d / "policy", 0).double(), tiny_hf(d / "ref", 1).double()

def online(o, seed=0, fn="lowercase"):
    o.online = R.Online(byte_tokenizer(), seed, rewards.Rewards(fn, "", "", o.i))
    return o

def hf_token_logps(m, b):
    mask = b["attention_mask"].clamp(max=1)
    lp = F.log_softmax(m(input_ids=b["input_ids"], attention_mask=mask).logits.double(), -1)
    keep = b["labels"] != -100
    return lp.gather(-1, b["labels"].clamp(min=0)[..., None])[..., 0] * keep, keep

# -----------------------------------------------------------------------------
# the arithmetic

def test_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    std = math.sqrt(((1 - 1) ** 2 + 1 + 1 + 2 ** 2) / 3)  # mean 1, unbiased
    want = torch.tensor([[0.0, -1 / (std + 1e-4), -1 / (std + 1e-4), 2 / (std + 1e-4)], [0.0] * 4], dtype=torch.float64)
    assert torch.allclose(R.advantages(r, "grpo"), want, atol=1e-12)
    loo = torch.tensor([[1 - 1.0, 0 - 4 / 3, 0 - 4 / 3, 3 - 1 / 3], [0.0] * 4], dtype=torch.float64)  # r_g - mean of the others
    assert torch.allclose(R.advantages(r, "rloo"), loo, atol=1e-12)

@pytest.mark.parametrize("inner,beta", [(1, 0.0), (2, 0.04)])
def test_loss_and_gradient_against_the_formula(models, inner, beta):
    """fixed completions and rewards: the step's loss (two micro-batches' share of one global token
    mean) and its gradient equal the formula on transformers' logits, with old log-probs moved off
    the current ones (so some ratios are clipped) and a reference of other weights."""
    d, hf, hf_ref = models
    tok = byte_tokenizer()
    policy = GPT.from_pretrained(str(d / "policy"), dtype=torch.float64)
    ref = GPT.from_pretrained(str(d / "ref"), dtype=torch.float64).requires_grad_(False)
    o = online(objectives.make("grpo", ref=ref, grpo_epsilon=0.2, grpo_beta=beta, grpo_inner_steps=inner))
    prompts = [R.D._encode(tok, [TEMPLATE.format(p)], [])[0][0] for p in ("red fox", "sky")]
    comps = [list(b"red fox") + [256], list(b"RED") + [256], list(b"sky is") + [256], list(b"s")]  # the last: cut, no eos
    step = Step(policy, policy, chunk_size=5, pad_id=tok.pad_token_id)
    batches, want_num, n_tok = [], 0.0, 0
    g = torch.Generator().manual_seed(0)
    for j in range(2):  # micro-batch j: prompt j, two completions
        x = R._training_rows([prompts[j]] * 2, comps[2 * j:2 * j + 2], [(j, 0), (j, 1)], tok.pad_token_id)
        x["advantages"] = torch.tensor([1.5, -0.5], dtype=torch.float64) * (1 if j == 0 else -1)
        theirs, keep = hf_token_logps(hf, x)
        old = (theirs.detach() + 0.3 * torch.randn(theirs.shape, generator=g, dtype=torch.float64)) * keep
        if inner > 1:
            x["old_logps"] = old.clone()
        if beta:
            x["ref_token_logps"] = hf_token_logps(hf_ref, x)[0].detach()
        batches.append(x)
        # the formula, token by token
        A = x["advantages"][:, None]
        old_ = old if inner > 1 else theirs.detach()
        ratio = torch.exp(theirs - old_)
        per = -torch.minimum(ratio * A, ratio.clamp(0.8, 1.2) * A)
        if beta:
            dlt = x["ref_token_logps"] - theirs
            per = per + beta * (torch.exp(dlt) - dlt - 1)
        want_num = want_num + (per * keep).sum()
        n_tok += int(keep.sum())
    for x in batches:
        x["rollout"] = {"reward": torch.zeros(2, dtype=torch.float64), "length": torch.ones(2, dtype=torch.float64),
                        "parts": {}, "gen_s": 0.0, "reward_s": 0.0}
    norm = step.normalizers(o, batches)
    assert norm["tokens"] == n_tok
    loss = sum(step.losses([(o, b, norm)])[0][0] for b in batches)
    want = want_num / n_tok
    assert abs(loss.item() - want.item()) < 1e-8, (loss.item(), want.item())
    ours = torch.autograd.grad(loss, [policy.lm_head.weight, policy.blocks[0].attn.q_proj.weight])
    theirs = torch.autograd.grad(want, [hf.lm_head.weight, hf.model.layers[0].self_attn.q_proj.weight])
    for a, r in zip(ours, theirs):
        assert ((a - r).norm() / r.norm()).item() < 1e-6 and r.norm() > 1e-4

def test_sampling_is_seeded_and_independent_of_the_batch(models):
    """a completion depends on its key alone: the same row sampled alone or inside a batch of other
    prompts (other lengths, so other padding) gives the same tokens; another seed gives others."""
    d, _, _ = models
    tok = byte_tokenizer()
    policy = GPT.from_pretrained(str(d / "policy"), dtype=torch.float64)
    o = online(objectives.make("grpo", top_k=50))
    step = Step(policy, policy, pad_id=tok.pad_token_id)
    prompts = [R.D._encode(tok, [TEMPLATE.format(p)], [])[0][0] for p in ("red fox", "a much longer prompt here", "sky")]
    keys = R.row_keys(0, 1, 0, ["a", "b", "c"], [0, 0, 0])
    together = R.sample(step, o, prompts, keys, 1.0, 12)
    alone = [R.sample(step, o, [p], keys[j:j + 1], 1.0, 12)[0] for j, p in enumerate(prompts)]
    assert together == alone
    again = R.sample(step, o, prompts, keys, 1.0, 12)
    assert again == together
    other = R.sample(step, o, prompts, R.row_keys(1, 1, 0, ["a", "b", "c"], [0, 0, 0]), 1.0, 12)
    assert other != together
    # the draws are uniform: the mean of many is 1/2 and no two of 4096 steps repeat a row's draw
    u = R.uniforms(R.row_keys(0, 1, 0, list(range(64)), [0] * 64))
    draws = torch.stack([u(t) for t in range(64)])
    assert abs(draws.mean().item() - 0.5) < 0.01 and draws.min() >= 0 and draws.max() < 1

def test_on_policy_kd_is_the_reverse_kl_of_the_students_own_samples(models):
    """kd_on_policy: the rows become the prompts + the student's samples, and the loss is the
    full-logit reverse KL(student || teacher) on those tokens, from transformers' logits."""
    d, hf, hf_ref = models
    tok = byte_tokenizer()
    policy = GPT.from_pretrained(str(d / "policy"), dtype=torch.float64)
    teacher = GPT.from_pretrained(str(d / "ref"), dtype=torch.float64).requires_grad_(False)
    o = objectives.make("kd", ref=teacher, kd_loss="reverse", kd_on_policy=True, max_new_tokens=6)
    o.online = R.Online(tok, 3)
    ex = R.D.tokenize_sft([{"input": "red fox", "output": "RED FOX"}, {"input": "sky", "output": "SKY"}], tok, 40, template=TEMPLATE)
    b = R.D.collate_sft(ex, tok.pad_token_id)
    step = Step(policy, policy, pad_id=tok.pad_token_id)
    o.kind.prepare([b], step, o)
    prompt_len = [next(t for t, y in enumerate(e["labels"]) if y != -100) + 1 for e in ex]
    for r, n in enumerate(prompt_len):  # the prompt is kept, the response is the student's
        assert b["input_ids"][r, :n].tolist() == list(ex[r]["input_ids"][:n])
    assert b["input_ids"][:, prompt_len[0]:].ne(tok.pad_token_id).any()
    norm = step.normalizers(o, [b])
    (loss, _), = step.losses([(o, b, norm)])
    mask = b["attention_mask"].clamp(max=1)
    ls = F.log_softmax(hf(input_ids=b["input_ids"], attention_mask=mask).logits.double(), -1)
    lt = F.log_softmax(hf_ref(input_ids=b["input_ids"], attention_mask=mask).logits.double(), -1)
    keep = b["labels"] != -100
    kl = (ls.exp() * (ls - lt)).sum(-1)
    want = (kl * keep).sum() / keep.sum()
    assert abs(loss.item() - want.item()) < 1e-8, (loss.item(), want.item())

# -----------------------------------------------------------------------------
# reward functions

def test_shipped_rewards():
    assert rewards.exact_answer(["q"] * 4, ["so #### 42", "\\boxed{7}", "it is 3, then 12.", "none"], ["42", "7", "12", "1"]) == [1, 1, 1, 0]
    assert rewards.answer_format([""] * 2, ["x\n#### 5", "5"]) == [1.0, 0.0]
    assert rewards.lowercase([""] * 3, ["abC", "", "ab"]) == [2 / 3, 0.0, 1.0]
    assert rewards.char_match([""] * 2, ["red fix", "RED FOX"], ["red fox", "red fox"]) == [6 / 7, 1 / 7]

def test_a_bad_reward_function_stops_the_run_naming_it(tmp_path):
    """through train.py: a reward function that raises stops the run in one line naming it."""
    (tmp_path / "f.py").write_text("def f(prompts, completions, **kw):\n    raise KeyError('answer')\n")
    p = run_train(tmp_path / "run", *GRPO, f"--reward_fn_1={tmp_path / 'f.py'}:f", "--max_iters=1", check=False)
    refused(p, "reward_fn_1", "f.py:f", "KeyError")

@pytest.mark.parametrize("body,words", [
    ("def f(prompts, completions, **kw):\n    return [1.0]\n", ["reward_fn_1", "returned 1 values for 2 completions"]),
    ("def f(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n", ["reward_fn_1", "nan", "row"]),
    ("def f(prompts, completions, **kw):\n    return ['x', 1]\n", ["reward_fn_1", "'x'", "not a finite number"]),
])
def test_bad_reward_values_are_named(tmp_path, body, words):
    (tmp_path / "f.py").write_text(body)
    r = rewards.Rewards(f"{tmp_path / 'f.py'}:f", "", "", 1)
    with pytest.raises(rewards.ConfigError) as e:
        r(["p", "p"], ["a", "b"], [{"_id": 7}, {"_id": 7}])
    for w in words:
        assert w in str(e.value), (w, str(e.value))

def grpo_config(**over):
    """train.py's checked defaults with a grpo objective 1, in process."""
    return train_defaults(**{"obj_1": "grpo", "obj_2": "", "dataset_1": "data/toy_whisper.jsonl", "reward_fn_1": "lowercase",
                             "max_len_1": 48, "max_new_tokens_1": 8, "num_generations_1": 4, "train_batch_size": 8,
                             "micro_train_batch_size": 4, **over})

@pytest.mark.parametrize("over,words", [
    (dict(reward_fn_1=""), ["reward_fn_1", "reward_model_1"]),
    (dict(reward_fn_1="nope"), ["reward_fn_1", "'nope'"]),
    (dict(reward_fn_1="missing.py:f"), ["reward_fn_1", "not found"]),
    (dict(num_generations_1=1), ["num_generations_1"]),
    (dict(num_generations_1=3), ["micro_train_batch_size", "num_generations_1"]),
    (dict(temperature_1=0.0), ["temperature_1"]),
    (dict(advantage_1="ppo"), ["advantage_1"]),
    (dict(max_new_tokens_1=48), ["max_new_tokens_1", "max_len_1"]),
    (dict(reward_fn_1="lowercase,char_match", reward_weights_1="1"), ["reward_weights_1"]),
])
def test_bad_online_keys_are_refused(over, words):
    import configurator
    c, po = grpo_config()
    configurator.check(dict(c), po)  # the base config passes
    with pytest.raises(configurator.ConfigError) as e:
        configurator.check(dict(c, **over), po)
    for w in words:
        assert w in str(e.value), (w, str(e.value))

# -----------------------------------------------------------------------------
# runs

def test_two_ranks_equal_one_and_resume_across_a_reused_rollout(tmp_path):
    """float64, grpo_inner_steps=2 (each rollout trains two steps, the second clipped against the
    first's log-probs) and grpo_beta > 0: 2 ranks (DDP, and FSDP2 at zero_stage 3, where the ranks
    must take the same number of decoding steps) sample the same completions and give the same
    losses as 1; a run cut between the two steps of a rollout resumes to the same numbers."""
    args = [*GRPO, "--dtype=float64", "--grpo_inner_steps_1=2", "--grpo_beta_1=0.05", "--max_iters=4", "--save_interval=1",
            "--keep_last=4", "--learning_rate=1e-2"]
    one, two, sharded = tmp_path / "one", tmp_path / "two", tmp_path / "zero3"
    run_train(one, *args)
    run_train(two, *args, nproc=2)
    run_train(sharded, *args, "--zero_stage=3", nproc=2)  # FSDP2: each decoding step's forward is collective
    a = metrics(one)
    for b in (metrics(two), metrics(sharded)):
        assert len(b) == len(a) == 4
        for x, y in zip(a, b):
            for k in ("loss", "reward", "kl", "clip_frac", "completion_len", "grad_norm"):
                assert abs(x[k] - y[k]) < 1e-9, (k, x, y)
    assert a[1]["clip_frac"] >= 0 and a[1]["kl"] > 1e-4 and a[0]["kl"] < 1e-12  # step 1: the policy is the reference
    resume_after_cut(one, tmp_path / "cut", args, "iter_0000004")  # resumes after step 3: step 4 reuses step 3's rollout
    c = metrics(tmp_path / "cut")
    assert [l["loss"] for l in c] == [l["loss"] for l in a] and [l["reward"] for l in c] == [l["reward"] for l in a]

def test_lora_reference_is_the_base_model(tmp_path):
    """under LoRA the reference is the policy with its adapters off: at step 1 the k3 KL is exactly 0
    (B = 0), later it is not; and beta 0 loads no reference at all (no copy of the model)."""
    run_train(tmp_path / "a", *GRPO, "--lora_rank=4", "--grpo_beta_1=0.1", "--max_iters=3", "--learning_rate=1e-2")
    m = metrics(tmp_path / "a")
    assert m[0]["kl"] < 1e-12 and m[2]["kl"] > 1e-6

def test_grpo_learns_a_verifiable_task(tmp_path):
    """GRPO alone, from a random tiny model: the held-out mean reward of greedy completions (the share
    of lowercase letters) rises far above its start."""
    run_train(tmp_path / "run", *GRPO, "--max_samples_1=0", "--max_iters=60", "--eval_interval=60", "--learning_rate=3e-3")
    ev = metrics(tmp_path / "run", "eval")
    assert ev[0]["eval_reward_1"] < 0.3 and ev[-1]["eval_reward_1"] > 0.8, ev
    assert ev[-1]["eval_loss_1"] == -ev[-1]["eval_reward_1"]

def test_alright_keeps_sft_where_sequential_forgets(tmp_path):
    """the demo's conflict, shortened: SFT (UPPERCASE answers), then GRPO rewarding lowercase on
    'whisper' prompts, 30% of the steps SFT. Both reach a similar reward; sequential loses the SFT
    objective (eval loss ~14 nats), ALRIGHT keeps most of it (~3)."""
    out = {}
    for m in ("sequential", "alright"):
        run_train(tmp_path / m, "config/demo_grpo.py", f"--method={m}", "--lambd=0.3", "--max_iters=200", "--eval_interval=0",
                  "--model_n_embd=32", "--model_intermediate_size=64", "--learning_rate=3e-3", "--eval_iters=2", base=[])
        out[m] = json.load(open(tmp_path / m / "summary.json"))
    s, a = out["sequential"], out["alright"]
    assert abs(s["eval_reward_2"] - a["eval_reward_2"]) < 0.25 and a["eval_reward_2"] > 0.7, (s, a)
    assert a["eval_loss_1"] < s["eval_loss_1"] - 5.0, (s, a)

def test_reward_model_changes_a_resumed_grpo_run():
    """reward_model judges eval_gen answers (harmless to change on resume) unless a kind trains on
    its scores (grpo): then a changed value is refused like any key that changes a step."""
    import checkpoint
    c, _ = grpo_config(reward_model="rm_a")
    saved = lambda d: json.loads(json.dumps(d))  # as config.json holds it
    assert checkpoint.config_changes(saved(c), dict(c, reward_model="rm_b")) == ["reward_model: 'rm_a' -> 'rm_b'"]
    s = dict(c, obj_1="sft", reward_fn_1="")
    assert checkpoint.config_changes(saved(s), dict(s, reward_model="rm_b")) == []
