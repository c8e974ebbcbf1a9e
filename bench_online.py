"""
An online GRPO step (rollout, scoring, update) of BiPOST against TRL's GRPOTrainer, like for like
in one process (bench.py's online mode; bench.py's keys, plus the two below):

    python bench.py --mode=online --rounds=3               # 8 prompts x 4 completions x 64 new tokens, CPU float32
    python bench.py --mode=online --batch_size=2 --num_generations=8 --max_new_tokens=128 --rounds=5
    python bench.py --mode=online --profile=online         # torch.profiler over BiPOST's and TRL's steps, nothing else

Both train the same weights (bench.py's random llama: the GPT, and its transformers copy for TRL)
on the same prompts: `batch_size` prompts per step, each `prompt_len` random token ids written as
text that benchlib.word_tokenizer maps back to the same ids, so TRL's own tokenization gives them.
Each step samples `num_generations` (G) completions of each prompt at temperature 1 (top-k and
top-p off), scores them with even_share below (one cheap function, the same for both), forms
GRPO's group advantages (r - mean) / (std + 1e-4), and takes one clipped AdamW step on the
policy-gradient loss over the completion tokens, a token mean over the batch (TRL's loss_type
"dapo"); beta 0 (no reference model), one update per rollout (so no old log-probs forward), no
gradient checkpointing, the bench's dtype.
Lengths: every completion is max_new_tokens long in both, checked every step. TRL generates with
min_new_tokens = max_new_tokens (its eos masked until then); BiPOST's tokenizer is the same word
vocabulary with its eos one id past the model's vocabulary, which the model cannot sample.
BiPOST: what train.py builds and runs: objectives.make("grpo") checked by its kind, rollout.Online
with rewards.Rewards, step.Step, runtime.optimizer's AdamW, Step.train (the kind's prepare is the
rollout: rollout.grpo_rollout, generate.py's batched KV-cache sampling) then step.optimizer_step.
Timers: BiPOST from Step.train's call to optimizer_step's return (the prompts' micro-batch is
collated before, as a loader gives it); its split comes from the step's stats: gen_s (sampling),
reward_s (decoding the completions and the reward function), update_s (forward and backward), and
the optimizer step (clip, AdamW) timed here; the rest ("rows") is turning the samples into
training rows and advantages. TRL from on_step_begin to on_step_end (a TrainerCallback): its
training_step, in which _prepare_inputs tokenizes the prompts, generates, decodes and scores, then
the loss forward and backward, clipping, AdamW and the scheduler; the dataloader's batch of prompt
rows is fetched before on_step_begin, as BiPOST's micro-batch is collated before its timer. Its
split: gen_s is its _generate (tokenizing the prompts, generate, decoding), reward_s its
_calculate_rewards, the rest the advantages, loss, backward and update.
Figures: completion tokens per second (batch_size x G x max_new_tokens per rollout, every rollout of
the step counted), the median of `iters` steps after `warmup_iters`; `rounds` rounds, each running
both afresh from the initial weights, the order alternating; the ratio BiPOST / TRL is the median
of the rounds' ratios.
DAPO's settings on both sides (--epsilon_high=0.28 --dynamic_sampling=True --reward=even_majority):
the upper clip bound 1 + epsilon_high (TRL's epsilon_high; with one update per rollout the ratio is
1, so it costs nothing), and dynamic sampling: a group whose rewards are all equal is dropped and the
next batch_size prompts (a pool after the steps' own, the same for both) rolled out, at most
max_resample more rollouts, until batch_size groups are kept. BiPOST runs its dynamic_sampling;
TRL 1.16 has none, so the bench wraps its _generate_and_score_completions the same way (the kept
groups' rows of its outputs concatenated, the first batch_size groups trained). even_majority (1 when
at least half a completion's words are even, else 0) makes about one group in eight all equal.
"""
import statistics
import tempfile
import time
import warnings
from copy import deepcopy
from types import SimpleNamespace

import torch

import benchlib
import objectives
import rewards
import rollout
import runtime
from step import Step, optimizer_step

# -----------------------------------------------------------------------------
# the online mode's own config keys (joined to bench.py's)
KEYS = dict(
    num_generations=4,        # completions sampled per prompt (G); batch_size is the prompts per step
    max_new_tokens=64,        # tokens per completion (every completion runs to the end)
    reward="even_share",      # even_share | even_majority (a 0/1 reward: some groups all equal)
    epsilon_high=-1.0,        # the upper clip bound's epsilon on both sides (-1 = epsilon, 0.2)
    dynamic_sampling=False,   # DAPO's dynamic sampling on both sides (TRL: the bench's wrapper)
    max_resample=4,           # dynamic_sampling: at most this many extra rollouts per step
)

def config(base, **overrides):
    """base (bench.py's defaults), the online keys', then overrides: the config of one online run."""
    return {**base, **KEYS, **overrides}

# -----------------------------------------------------------------------------
# the prompts and the reward

def make_prompts(S, n):
    """n prompts of prompt_len random token ids below vocab_size - 2, as word_tokenizer text."""
    V, P = S.base.config.vocab_size, S.cfg["prompt_len"]
    ids = torch.randint(V - 2, (n, P), generator=torch.Generator().manual_seed(S.cfg["seed"] + 1))
    return [" ".join(f"t{i}" for i in row) for row in ids.tolist()]

def even_share(prompts, completions, **_):
    """the share of a completion's words t<i> with an even id i: as cheap as a reward gets, the same
    function for both trainers, and varied within a group (so the advantages are not all zero)."""
    out = []
    for c in completions:
        ids = [int(w[1:]) for w in c.split() if w[:1] == "t" and w[1:].isdigit()]
        out.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
    return out

def even_majority(prompts, completions, **_):
    """1.0 when at least half a completion's words have an even id, else 0.0: a 0/1 reward whose groups
    are now and then all equal (dynamic sampling drops them)."""
    return [float(s >= 0.5) for s in even_share(prompts, completions)]

REWARDS = {"even_share": even_share, "even_majority": even_majority}

class PromptPool:
    """the prompts after the steps' own, batch_size at a time: what a step's dynamic sampling rolls
    out when it drops groups (the loader's next prompts in train.py). BiPOST and TRL draw the same."""
    rank = 0

    def __init__(self, prompts, P, collate=None):
        self.prompts, self.P, self.collate, self.pos = prompts, P, collate, 0

    def take(self):
        out = self.prompts[self.pos:self.pos + self.P]
        assert len(out) == self.P, "the prompt pool is used up"
        self.pos += self.P
        return out

    def next_step(self):  # as data.Loader gives a step: one micro-batch
        return [self.collate(self.take())]

def online_tokenizer(vocab_size):
    """word_tokenizer's words t0 ... with its eos at id vocab_size, past the model's vocabulary: no
    sampled completion stops before max_new_tokens (prompt ids below vocab_size - 2 tokenize the same)."""
    return benchlib.word_tokenizer(vocab_size + 1)

# -----------------------------------------------------------------------------
# BiPOST: the objects train.py builds, the step it runs

def bipost_online(S, prompts, pool=()):
    """a fresh policy from the initial weights and the GRPO objective as train.py sets them up.
    Returns a namespace: o, step (the Step), examples (the tokenized prompts) and run(k), one timed
    optimizer step on prompts[k P:(k + 1) P] -> its figures, loss, gradient norm and rolled-out rows.
    pool: the prompts dynamic sampling takes more from."""
    cfg = S.cfg
    P, G, N = cfg["batch_size"], cfg["num_generations"], cfg["max_new_tokens"]
    tok = online_tokenizer(S.base.config.vocab_size)
    model = deepcopy(S.base).to(S.device)
    model.gradient_checkpointing = cfg["gradient_checkpointing"]
    if cfg["compile"]:
        model.compile_blocks()
    model.train()
    optimizer, params = runtime.optimizer(
        model, cfg["learning_rate"], cfg["adam_betas"], 0.0, fused=S.device_type == "cuda"
    )
    o = objectives.make("grpo", 1, num_generations=G, max_new_tokens=N, max_len=cfg["prompt_len"] + N, temperature=1.0,
                        top_p=1.0, top_k=0, grpo_beta=0.0, grpo_inner_steps=1, input_template="{}",
                        reward_fn=f"bench_online:{cfg['reward']}", grpo_epsilon_high=cfg["epsilon_high"],
                        dynamic_sampling=cfg["dynamic_sampling"], max_resample=cfg["max_resample"])
    o.kind.check(1, o.cfg)  # train.py's checks of the objective's keys
    o.online = rollout.Online(tok, cfg["seed"], rewards.Rewards(o.cfg.reward_fn, o.cfg.reward_weights, "", 1, S.device))
    def tokenize(ps):
        return o.kind.tokenize([{"prompt": p} for p in ps], "bench prompts", o.cfg, dict(tokenizer=tok, verbose=False))
    examples = tokenize(prompts)
    assert len(examples) == len(prompts) and all(len(e["prompt_ids"]) == cfg["prompt_len"] for e in examples)
    collate = lambda ex: o.kind.collate(ex, tok.pad_token_id, o.cfg, False)
    o.loader = PromptPool(tokenize(pool) if len(pool) else [], P, collate)
    step = Step(model, model, S.autocast, cfg["loss_chunk_size"], tok.pad_token_id, S.device)

    def run(k):
        mb = [o.kind.collate(examples[k * P:(k + 1) * P], tok.pad_token_id, o.cfg, False)]  # as the loader gives it
        S.sync()
        t0 = time.perf_counter()
        (loss, st), = step.train([o], [mb], [1.0])
        t1 = time.perf_counter()
        gnorm = optimizer_step(optimizer, params, cfg["max_norm"])
        S.sync()
        t2 = time.perf_counter()
        lengths = mb[0]["rollout"]["step"]["length"].tolist()
        rollouts = st.get("rollouts", 1)
        assert lengths == [N] * (rollouts * P * G), f"BiPOST completions of {sorted(set(lengths))} tokens, not all {N}"
        rows = (t1 - t0) - st["gen_s"] - st["reward_s"] - st["update_s"]
        return dict(step_s=t2 - t0, gen_s=st["gen_s"], reward_s=st["reward_s"], rows_s=rows, update_s=st["update_s"],
                    opt_s=t2 - t1, loss=loss, gnorm=gnorm, reward=st["reward"], batch=mb[0], rollouts=float(rollouts),
                    tokens=float(rollouts * P * G * N))
    return SimpleNamespace(o=o, step=step, model=model, examples=examples, tokenizer=tok, run=run)

# -----------------------------------------------------------------------------
# TRL: GRPOTrainer on the same weights, prompts, G and lengths

def trl_online(S, prompts, n_steps, pool=()):
    """TRL's GRPOTrainer over prompts[:n_steps P] in order (n_steps optimizer steps), configured like
    the BiPOST step. Returns one dict per step: step_s (on_step_begin to on_step_end), gen_s (its
    _generate), reward_s (its _calculate_rewards), rollouts and completion tokens generated, and the
    prompts and completion lengths its reward function was given first (checked: every completion
    max_new_tokens long). pool: the prompts dynamic sampling takes more from."""
    import datasets
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    cfg = S.cfg
    P, G, N = cfg["batch_size"], cfg["num_generations"], cfg["max_new_tokens"]
    assert len(prompts) >= n_steps * P
    model = benchlib.hf_model(S, S.master_dtype).to(S.device)
    V = model.config.vocab_size
    seen, split, records = [], {}, []

    def reward(prompts, completions, completion_ids, **kw):  # the same function, its inputs recorded
        seen.append((list(prompts), [len(c) for c in completion_ids]))
        return REWARDS[cfg["reward"]](prompts, completions)
    reward.__name__ = cfg["reward"]

    def timing(fn, key):  # times one of the trainer's own methods, leaves it as it is
        def run(*a, **kw):
            S.sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            S.sync()
            split[key] = split.get(key, 0.0) + time.perf_counter() - t0
            return out
        return run

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            split.clear()
            self.first = len(seen)
            S.sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            S.sync()
            n = len(seen) - self.first
            records.append(dict(step_s=time.perf_counter() - self.t0, gen_s=split.get("gen_s", 0.0),
                                reward_s=split.get("reward_s", 0.0), rollouts=float(n), tokens=float(n * P * G * N),
                                first=self.first))

    with tempfile.TemporaryDirectory() as out:
        kw = dict(output_dir=out, per_device_train_batch_size=P * G, gradient_accumulation_steps=1, num_generations=G,
                  max_completion_length=N, generation_kwargs={"min_new_tokens": N}, temperature=1.0, top_p=1.0, top_k=0,
                  beta=0.0, num_iterations=1, epsilon=0.2, loss_type="dapo", scale_rewards="group",
                  epsilon_high=None if cfg["epsilon_high"] == -1 else cfg["epsilon_high"],
                  use_vllm=False, shuffle_dataset=False, max_steps=n_steps, learning_rate=cfg["learning_rate"],
                  adam_beta1=cfg["adam_betas"][0], adam_beta2=cfg["adam_betas"][1], weight_decay=0.0,
                  max_grad_norm=cfg["max_norm"], lr_scheduler_type="constant", warmup_steps=0,
                  bf16=cfg["dtype"] == "bfloat16", fp16=cfg["dtype"] == "float16",
                  activation_checkpointing=cfg["gradient_checkpointing"], eval_strategy="no", save_strategy="no",
                  logging_strategy="no", log_completions=False, report_to="none", use_cpu=S.device_type == "cpu",
                  dataloader_num_workers=0, disable_tqdm=True, seed=cfg["seed"])
        args = GRPOConfig(**benchlib.trl_config_kwargs(GRPOConfig, kw))
        # TRL's own defaults turn both on: the peer must run the bench's precision and checkpointing
        assert (bool(args.gradient_checkpointing), bool(args.bf16)) == (
            cfg["gradient_checkpointing"],
            cfg["dtype"] == "bfloat16",
        )
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts[:n_steps * P]]),
                              processing_class=benchlib.word_tokenizer(V), callbacks=[Timer()])
        trainer.remove_callback(PrinterCallback)
        trainer._generate = timing(trainer._generate, "gen_s")
        trainer._calculate_rewards = timing(trainer._calculate_rewards, "reward_s")
        if cfg["dynamic_sampling"]:
            trainer._generate_and_score_completions = dynamic_sampling(
                trainer._generate_and_score_completions, PromptPool(list(pool), P), P, G, cfg["max_resample"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecations inside transformers / TRL
            trainer.train()
    assert len(records) == n_steps and len(seen) == sum(r["rollouts"] for r in records), (len(records), len(seen))
    for ps, lengths in seen:
        assert lengths == [N] * (P * G), f"TRL completions of {sorted(set(lengths))} tokens, not all {N}"
    for r in records:
        r["prompts"], r["lengths"] = seen[r.pop("first")]
    return records

def dynamic_sampling(generate_and_score, pool, P, G, max_resample):
    """TRL's _generate_and_score_completions with DAPO's dynamic sampling around it, as BiPOST's: the
    groups whose advantages are all 0 (all rewards equal) are dropped and the pool's next P prompts
    rolled out, at most max_resample more times; the rows of the first P kept groups are trained."""
    def run(inputs):
        outs = [generate_and_score(inputs)]
        kept = lambda k: [(k, q) for q in range(len(outs[k]["advantages"]) // G)
                          if bool((outs[k]["advantages"][q * G:(q + 1) * G] != 0).any())]
        groups = kept(0)
        while len(groups) < P and len(outs) <= max_resample:
            outs.append(generate_and_score([{"prompt": p} for p in pool.take() for _ in range(G)]))
            groups += kept(len(outs) - 1)
        groups = groups[:P] or [(0, q) for q in range(P)]  # none kept: the first rollout (all advantages 0)
        B = len(outs[0]["advantages"])
        out = {}
        for key, v in outs[0].items():
            if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == B:
                out[key] = torch.cat([outs[k][key][q * G:(q + 1) * G] for k, q in groups])
            else:
                out[key] = v
        out["num_items_in_batch"] = out["completion_mask"].sum()
        return out
    return run

# -----------------------------------------------------------------------------
# the benchmark

def median_of(records, key):
    return statistics.median(r[key] for r in records)

def run_round(S, prompts, use_trl, rnd, pool=()):
    """one round: BiPOST and TRL (when installed), each afresh from the initial weights, warmup_iters
    + iters steps, the order alternating between rounds. Returns {name: timed records}."""
    cfg, out = S.cfg, {}
    W, n = cfg["warmup_iters"], cfg["iters"]
    order = ["bipost", "trl"] if rnd % 2 == 0 else ["trl", "bipost"]
    for name in order:
        if name == "bipost":
            R = bipost_online(S, prompts, pool)
            recs = [R.run(k) for k in range(W + n)][W:]
            for r in recs:
                del r["batch"]
            del R
        elif use_trl:
            recs = trl_online(S, prompts, W + n, pool)[W:]
        else:
            continue
        for r in recs:
            r["tokens_per_s"] = r["tokens"] / r["step_s"]
        out[name] = recs
        s = median_of(recs, "step_s")
        print(f"  {name:<7} {s * 1e3:9.1f} ms/step  {median_of(recs, 'tokens_per_s'):8.0f} completion tok/s  "
              f"generation {median_of(recs, 'gen_s') / s:5.1%}  rollouts/step {median_of(recs, 'rollouts'):.1f}  "
              f"(round {rnd + 1}, load {benchlib.loadavg()})")
    return out

def summarize(rounds, tokens):
    """per trainer: medians over the rounds of each round's medians (tokens/s: of each step's completion
    tokens, every rollout's, over its time); the ratio BiPOST / TRL tokens/s, the median of the rounds'."""
    res = {}
    for name in rounds[0]:
        keys = [k for k in rounds[0][name][0] if isinstance(rounds[0][name][0][k], float)]
        per = {k: [median_of(r[name], k) for r in rounds] for k in keys}
        res[name] = {k: statistics.median(v) for k, v in per.items()}
        res[name]["step_s_rounds"] = per["step_s"]
        res[name]["tokens_per_s_rounds"] = per["tokens_per_s"]
        res[name]["gen_share"] = statistics.median(g / s for g, s in zip(per["gen_s"], per["step_s"]))
    if "trl" in res:
        ratios = [b / t for b, t in zip(res["bipost"]["tokens_per_s_rounds"], res["trl"]["tokens_per_s_rounds"])]
        res["ratio_rounds"], res["ratio"] = ratios, statistics.median(ratios)
    return res

def profile(S, prompts, use_trl, steps=2):
    """torch.profiler over `steps` steps of each trainer after one warm-up: the operators that take the time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if S.device_type == "cuda" else [])
    key = "self_cuda_time_total" if S.device_type == "cuda" else "self_cpu_time_total"
    R = bipost_online(S, prompts)
    R.run(0)
    with torch_profile(activities=acts) as prof:
        for k in range(1, steps + 1):
            R.run(k)
    print(f"BiPOST, {steps} steps\n" + prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60))
    if use_trl:
        with torch_profile(activities=acts) as prof:
            trl_online(S, prompts, steps + 1)
        print(f"TRL, {steps + 1} steps (its first included)\n"
              + prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60))

def main(cfg, argv=()):
    assert not cfg["lora_rank"], "the online mode trains the full model (lora_rank=0)"
    S = benchlib.build_start(cfg)
    cfg = S.cfg
    P, G, N = cfg["batch_size"], cfg["num_generations"], cfg["max_new_tokens"]
    W, n = cfg["warmup_iters"], cfg["iters"]
    k = (W + n + (cfg["profile"] != "")) * P
    prompts = make_prompts(S, k + (W + n) * cfg["max_resample"] * P * cfg["dynamic_sampling"])
    prompts, pool = prompts[:k], prompts[k:]
    use_trl = True
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        print("online: trl is not installed, TRL skipped")
        use_trl, trl_version = False, None
    import transformers
    info = dict(benchlib.machine(), device=S.device, dtype=cfg["dtype"], trl=trl_version,
                transformers=transformers.__version__, load_start=benchlib.loadavg())
    mc = S.base.config
    print(f"bench online: {info['cpu'] if S.device_type == 'cpu' else info.get('gpu')}, "
          f"{info['torch_threads']} threads, torch {info['torch']}, transformers {info['transformers']}, "
          f"trl {trl_version}, {S.device} {cfg['dtype']}, "
          f"{S.base.num_params() / 1e6:.2f}M params (hidden {mc.n_embd}, {mc.n_layer} layers, vocab {mc.vocab_size}); "
          f"GRPO: {P} prompts x G {G} completions, prompt {cfg['prompt_len']} + {N} new tokens, reward "
          f"{cfg['reward']}, epsilon_high {cfg['epsilon_high']}, dynamic_sampling {cfg['dynamic_sampling']}, "
          f"load {info['load_start']}")
    if cfg["profile"]:
        return profile(S, prompts, use_trl)
    rounds = [run_round(S, prompts, use_trl, rnd, pool) for rnd in range(cfg["rounds"])]
    tokens = P * G * N
    res = summarize(rounds, tokens)
    info["load_end"] = benchlib.loadavg()
    report(res, cfg, info, tokens)
    if cfg["json"]:
        benchlib.write_json(cfg["json"], {"machine": info, "config": cfg, "results": res,
                                       "rounds": [{k: [{a: b for a, b in r.items() if a != "prompts"} for r in v]
                                                   for k, v in rnd.items()} for rnd in rounds]})
    return res

def report(res, cfg, info, tokens):
    print(f"\n{info['device']} {cfg['dtype']}, {cfg['batch_size']} prompts x {cfg['num_generations']} completions x "
          f"{cfg['max_new_tokens']} tokens = {tokens} completion tokens per step, median of {cfg['iters']} steps after "
          f"{cfg['warmup_iters']} warm-up, median over {cfg['rounds']} round(s), "
          f"load {info['load_start']} -> {info['load_end']}")
    rows = []
    for name, r in res.items():
        if not isinstance(r, dict):
            continue
        rest = r["step_s"] - r["gen_s"] - r["reward_s"]
        split = (f"gen {r['gen_s'] * 1e3:.0f} / reward {r['reward_s'] * 1e3:.1f} / rows {r['rows_s'] * 1e3:.1f} / "
                 f"fwd+bwd {r['update_s'] * 1e3:.0f} / opt {r['opt_s'] * 1e3:.1f}" if name == "bipost" else
                 f"gen {r['gen_s'] * 1e3:.0f} / reward {r['reward_s'] * 1e3:.1f} / "
                 f"rest (loss, update) {rest * 1e3:.0f}")
        rows.append([name, f"{r['step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['rollouts']:.1f}",
                     f"{r['gen_share']:.1%}", split])
    benchlib.print_table(rows, ["trainer", "ms/step", "completion tok/s", "rollouts/step", "generation share",
                             "split (ms)"])
    if "ratio" in res:
        print(
            f"BiPOST / TRL completion tokens/s: {res['ratio']:.2f}x (rounds: "
            f"{', '.join(f'{x:.2f}' for x in res['ratio_rounds'])}); generation alone: "
            f"{res['trl']['gen_s'] / res['bipost']['gen_s']:.2f}x, the rest: "
            f"{(res['trl']['step_s'] - res['trl']['gen_s']) / (res['bipost']['step_s'] - res['bipost']['gen_s']):.2f}x")
