"""
The one training loop: single objective, K objectives at once (K <= 8), and bilevel data selection.

    python train.py config/demo.py                               # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 train.py config/kd_sft.py --lambd=0.3
    python train.py config/demo.py --obj_3=dpo --dataset_3=data/toy_calm.jsonl --lambd=0.4,0.4,0.2

Methods (docs/algorithms.md §2, methods.py; `lambd` = K weights on the simplex, one number = (lambd, 1 - lambd)):
  sequential  objective i for round(lambd_i * T) steps, in order 1..K               (baseline)
  mix         every step minimizes sum_i lambd_i f_i, one backward                  (baseline, K x cost)
  alright     every step trains objective i with probability lambd_i                (cost of one)
  maxright    every step trains argmax_i lambd_i (f_i - f_i*), the largest weighted gap to its optimum
  constrained a forgetting budget: minimizes the lambd-weighted objectives subject to f_i - f_i* <= budget_i,
              one objective per step drawn with probability proportional to lambd_i + its multiplier mu_i
  select      bilevel data selection: learns one weight per row of dataset_2 so that the trusted
              dataset_1's loss is minimized, then writes the kept rows (selector.py)
Objective kinds: objectives.py (one table entry each). Every default below is a config key:
override it in a config file or as --key=value.
"""
import json
import math
import os
import signal
import sys
import time
from copy import deepcopy
from types import SimpleNamespace

import torch
import torch.distributed as dist

import checks
import configurator
import methods
import objectives

# -----------------------------------------------------------------------------
# default config values
# I/O
out_dir = "out"
log_interval = 1          # iterations between metrics lines
eval_interval = 50        # iterations between evaluations of both objectives (0 = start and end only)
eval_iters = 0            # eval on the first eval_iters x train_batch_size examples (0 = the whole eval set)
eval_gen_interval = -1    # iterations between behaviour metrics of greedy answers (evalgen.py; 0 = at the end only, -1
                          # = off)
eval_gen_samples = 64     # held-out examples per objective they judge (0 = all)
eval_gen_max_new_tokens = 64
reward_model = ""         # a sequence-classification checkpoint judging DPO answers ('' = the implicit reward);
                          # reward_model_i: a grpo objective's reward
save_interval = 0         # iterations between checkpoints (0 = only at the end)
keep_last = 2             # checkpoints kept in out_dir/ckpt
resume = False            # True: continue from the latest checkpoint in out_dir
overwrite = False         # True: clear a finished or dead run's ckpt/, metrics.jsonl, final/, summary.json first
takeover_lock = False     # True: take out_dir/.lock from a run on another host, whose life cannot be checked here
reschedule = False        # resume: True lets max_iters / max_epochs change the LR schedule and sequential split ahead
wandb_log = False
wandb_project = "bipost"
wandb_run_name = ""
tensorboard = False
# model
pretrain = ""             # HF hub id or local dir; '' builds a fresh llama from the model_* keys
model_n_layer = 2
model_n_head = 4
model_n_kv_head = 2
model_n_embd = 64
model_intermediate_size = 176
model_max_len = 512
dtype = ""                # '' = bfloat16 where the GPU supports it, else float32 | float32 | bfloat16 | float64
                          # (exactness tests)
compile = False           # torch.compile each transformer block (the chunked losses stay eager)
gradient_checkpointing = False
router_aux_loss = -1.0    # MoE router load-balancing loss weight: -1 = the checkpoint's (router_aux_loss_coef if
                          # output_router_logits), 0 = off
device = ""               # '' = cuda:LOCAL_RANK when available, else cpu
quantize_head = False     # quantize (a per-objective key below): the output head in 4 bits too (not a tied embedding)
export_dequantized = False  # quantize under LoRA: final/ merges into the dequantized 4-bit base, not pretrain's weights
# LoRA
lora_rank = 0             # 0 = full fine-tuning
lora_alpha = 16
lora_dropout = 0.0
target_modules = "all-linear"  # or names such as 'q_proj,v_proj' / 'query_key_value'
# objectives
obj_1 = "sft"             # objective i's kind (objectives.KINDS: sft dpo simpo orpo kto kd grpo); K = the obj_i set (at
                          # most 8)
obj_2 = obj_3 = obj_4 = obj_5 = obj_6 = obj_7 = obj_8 = ""  # obj_2 = '': single-objective training
method = "alright"        # a class of methods.METHODS: sequential | mix | alright | maxright | constrained | select
lambd = 0.5               # K weights on the simplex, e.g. (0.5, 0.3, 0.2) or --lambd=0.5,0.3,0.2; one number = (lambd,
                          # 1 - lambd)
opt_estimate_iters = 0    # steps of the single-objective runs that estimate f* (0 = max(10, T // 10))
eps = 0.0                 # early stop when a gap f_i - f_i* <= eps (0 = off)
pareto_front = ""         # JSON file of [[f_1, ..., f_K], ...]: early stop when weakly dominated within eps
precompute_ref = False    # DPO reference log-probs once, cached on disk; the reference model is dropped
loss_chunk_size = 0       # tokens per chunk of the output head ([chunk, V] logits at a time); 0: max(128, 2^22 / V),
                          # 2^26 / V on a GPU
# each method's keys (methods.py, declared in its class: maxright_interval, dual_lr, the selector's keys, ...)
globals().update(methods.config_keys())
# per-objective keys (objectives.py: dataset, max_len, obj_opt, ref_model, dpo_beta, kd_loss, ...; a method's
# such as budget): the value there is every objective's default, and KEY_i sets it for objective i alone
per_objective = {**objectives.per_objective_keys(), **methods.per_objective_keys()}
globals().update(per_objective)
# data
eval_frac = 0.05          # the share of each dataset held out for evaluation (method=select: none of dataset_2)
packing = False           # sft/kd: concatenate documents up to max_len
streaming = False         # read each dataset as a stream (needs max_samples_i; eval_split_i '' or a file): sets too
                          # large for the disk
dataset_num_proc = 0      # processes that tokenize (datasets' map, cached under HF_DATASETS_CACHE); 0 = this one
# optimization
train_batch_size = 8      # global batch in samples (pairs for dpo)
micro_train_batch_size = 2  # per rank
learning_rate = 5e-5
lr_scheduler = "constant"  # constant | cosine
warmup_ratio = 0.0
min_lr_ratio = 0.1        # cosine floor, as a fraction of learning_rate
weight_decay = 0.0
adam_betas = (0.9, 0.95)
max_norm = 1.0
max_epochs = 1
max_iters = 0             # optimizer steps; > 0 overrides max_epochs
seed = 42
# distributed
zero_stage = 0            # 0 DDP | 1 + sharded optimizer state | 2 FSDP2, no reshard after forward | 3 FSDP2 full
cpu_offload = False       # FSDP2 parameters and optimizer on CPU
dist_timeout_s = 1800     # a collective that waits longer (a rank died or hangs) ends the run
print_config = False      # print the checked config as JSON and exit (sweep.py reads it)
# each numeric key's rule above, as its refusal states it (checks.py): "> a", ">= a", "[a, b)" (a tuple:
# each value), "finite"; after "or" one more allowed value; after ";" what a special value means. A method's
# keys and an objective's carry theirs where they are declared (methods.py, objectives.py)
rules = dict(
    log_interval=">= 1", eval_interval=">= 0; 0 = start and end only", eval_iters=">= 0; 0 = the whole eval set",
    eval_gen_interval=">= 0 or -1; 0 = at the end only, -1 = off", eval_gen_samples=">= 0; 0 = all",
    eval_gen_max_new_tokens=">= 1", save_interval=">= 0; 0 = only at the end", keep_last=">= 0; 0 = all",
    model_n_layer=">= 1", model_n_head=">= 1", model_n_kv_head=">= 1", model_n_embd=">= 1",
    model_intermediate_size=">= 1", model_max_len=">= 1", router_aux_loss=">= 0 or -1; -1 = the checkpoint's",
    lora_rank=">= 0; 0 = full fine-tuning", lora_alpha="> 0", lora_dropout="[0, 1)",
    lambd="[0, 1]", opt_estimate_iters=">= 0; 0 = max(10, T // 10)", eps=">= 0; 0 = off",
    loss_chunk_size=">= 0; 0 = automatic", eval_frac="[0, 1)", dataset_num_proc=">= 0; 0 = this process",
    train_batch_size=">= 1", micro_train_batch_size=">= 1", learning_rate=">= 0; 0 = no update",
    warmup_ratio="[0, 1]", min_lr_ratio="[0, 1]", weight_decay=">= 0", adam_betas="[0, 1)",
    max_norm=">= 0; 0 = no clipping", max_epochs=">= 0", max_iters=">= 0; 0 = max_epochs decides", seed=">= 0",
    zero_stage="[0, 3]", dist_timeout_s="> 0", lr_scheduler="one of constant, cosine",
)
# -----------------------------------------------------------------------------
config_keys = [
    k
    for k, v in globals().items()
    if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))
]
config = {k: globals()[k] for k in config_keys}
if __name__ == "__main__":
    configurator.one_line_errors()  # config and data errors: `error: ...` and exit 2, no traceback
    configurator.usage(sys.argv[1:], __doc__)
    configurator.apply(sys.argv[1:], config, per_objective=per_objective)
    globals().update((k, config[k]) for k in config_keys)  # the KEY_i set stay in config (objective_keys)
    # every check of the config, before anything is read or loaded
    kinds = checks.check(config, per_objective, rules, int(os.environ.get("WORLD_SIZE", 1)))
    if print_config:
        print(json.dumps(config))
        sys.exit(0)
# -----------------------------------------------------------------------------

from tqdm import tqdm

import checkpoint
import data
import rollout
import runtime
import quant
from lora import inject, lora_parameters
from model import GPT, Config, load_tokenizer
from step import Step, cache_reference, optimizer_step, reference_digest

if reward_model and eval_gen_interval >= 0:  # a judge that cannot load fails now, not after training
    import evalgen
    evalgen.check_reward_model(reward_model)
K = len(kinds)
world = runtime.init(device, dist_timeout_s)  # the distributed world: ddp, rank, world_size, master, device
ddp, rank, world_size, master, device = world.ddp, world.rank, world.world_size, world.master, world.device
dtype, ptdtype, master_dtype, autocast = runtime.precision(dtype, world.device_type)
grad_accum = train_batch_size // (micro_train_batch_size * world_size)
w_obj = dict(enumerate(methods.weights(lambd, K), 1))  # {i: lambd_i}
keys_of = {i: configurator.objective_keys(config, i, per_objective) for i in range(1, K + 1)}  # objective i's keys
method = methods.make(method, tuple(w_obj.values()), **config)  # its total_iters is set once known

def log(*a):
    if master:
        tqdm.write(" ".join(str(x) for x in a))

def all_sum(x):
    """sum over ranks of a float / tensor (returned as a float tensor on the device)."""
    t = torch.as_tensor(x, dtype=torch.float64, device=device).clone()
    if ddp:
        dist.all_reduce(t)
    return t

# out_dir holds one run: rank 0 holds out_dir/.lock while it runs (a second run there is refused); a
# resume continues the run, a new run needs out_dir free of another's outputs (or overwrite=True)
held = ""
if master:
    try:
        release_out_dir = checkpoint.hold(out_dir, takeover_lock, log)
    except configurator.ConfigError as e:
        held = str(e)
if all_sum(float(bool(held))).item() > 0:  # every rank stops; rank 0 says why
    raise configurator.ConfigError(held or "out_dir is in use by another run")
left = checkpoint.check_out_dir(config, log)
if master:
    checkpoint.clear(out_dir, left, log)
if ddp:
    dist.barrier()
ckpt_root, metrics_path = os.path.join(out_dir, "ckpt"), os.path.join(out_dir, "metrics.jsonl")

# -----------------------------------------------------------------------------
# model, tokenizer, LoRA
os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed)  # the same initial weights on every rank
tokenizer = load_tokenizer(pretrain)
_plain = [
    i for i, c in keys_of.items() if not c.apply_chat_template and c.input_template == per_objective["input_template"]
]
if pretrain and tokenizer.chat_template and _plain:  # chat rows ('messages') use the template either way
    log(f"note: {pretrain}'s tokenizer has a chat template; objective(s) {_plain} format prompts with input_template "
        f"{per_objective['input_template']!r}: set apply_chat_template_i=True to use the chat template")
if pretrain:  # a 4-bit base is read on the CPU, then quantized onto the device one weight at a time
    raw_model = GPT.from_pretrained(pretrain, dtype=ptdtype if lora_rank else master_dtype,
                                    device="cpu" if lora_rank and quantize else device)
else:
    raw_model = GPT(Config(vocab_size=len(tokenizer), n_layer=model_n_layer, n_head=model_n_head,
                           n_kv_head=model_n_kv_head, n_embd=model_n_embd, head_dim=model_n_embd // model_n_head,
                           intermediate_size=model_intermediate_size, max_position_embeddings=model_max_len,
                           norm_eps=1e-5)).to(device=device, dtype=master_dtype)
raw_model.gradient_checkpointing = gradient_checkpointing
if router_aux_loss >= 0:  # the weight given here instead of the checkpoint's choice (0 for a dense model either way)
    raw_model.config.router_aux_coef = router_aux_loss if any(raw_model.config.moe_layers or []) else 0.0
if compile:
    raw_model.compile_blocks()  # each block on its own: no graph break at the losses' head_fn
if lora_rank:
    quant.frozen(raw_model, quantize, quantize_head, device, "quantize")  # the frozen base ('' leaves it as it is)
    inject(raw_model, lora_rank, lora_alpha, lora_dropout, target_modules)
    for _, p in lora_parameters(raw_model):
        p.data = p.data.to(master_dtype)  # adapters train in float32; the frozen base may be bf16

# -----------------------------------------------------------------------------
# data: each objective's rows, tokenized and collated as its kind says (objectives.py)
def build_objective(i, c):
    kind = objectives.KINDS[kinds[i - 1]]
    common = dict(tokenizer=tokenizer, max_len=c.max_len, template=c.input_template,
                  apply_chat_template=c.apply_chat_template, verbose=master, num_proc=dataset_num_proc)
    collate = lambda b: kind.collate(b, tokenizer.pad_token_id, c, packing)
    # files: rank 0 converts them to Arrow and tokenizes the rows used (datasets' map) into caches,
    # the other ranks then read those; a stream has no cache, so every rank reads its own at once
    with data.rank0_first(not streaming):
        # a stream: max_samples rows and the held-out ones, nothing converted on disk; else Arrow
        # selections, nothing read into python before tokenizing (generate.py --objective reads the same)
        rows, eval_rows = data.objective_splits(c, seed, method.eval_frac(i, eval_frac), streaming, lazy=True)
        train = kind.tokenize(rows, c.dataset, c, common)
        # the eval loss is the plain objective's, whatever the weights
        unweighted = type(c)(**{**vars(c), "weight_key": ""})
        evals = kind.tokenize(eval_rows, f"{c.eval_split or c.dataset} (eval)", unweighted, common)
    for e in evals:
        e["id"] = ("eval", e["id"])  # a separate eval file numbers its rows from 0 too: keep cache keys apart
    per_micro = micro_train_batch_size // kind.rows_per_example(c)  # grpo: prompts, each num_generations rows
    loader = lambda s, ex=train: data.Loader(ex, per_micro, grad_accum, rank, world_size, s, collate)
    # the rows the method's gaps are measured on
    probe = loader(seed + 100 + i, evals if method.held_out and evals else train)
    o = objectives.Objective(i, kind, c, train, evals, rows, collate, loader(seed + i), probe, opt=c.obj_opt)
    if kind.prepare is not None:  # an online kind (rollout.py): the policy samples its rows
        from rewards import Rewards
        scored = kind.scored
        o.online = rollout.Online(
            tokenizer, seed, Rewards(c.reward_fn, c.reward_weights, c.reward_model, i, device) if scored else None
        )
        if scored:
            log(f"objective {i} ({kind.name}) is online: eval_loss_{i} is minus the mean reward of greedy completions "
                f"of its held-out prompts (eval_reward_{i})")
    return o

objs = {i: build_objective(i, c) for i, c in keys_of.items()}
if ddp:  # a node-local file or path that differs between ranks would train on a mix, or hang
    data.check_same_data(objs.values(), world_size)
total_iters = max_iters if max_iters > 0 else max_epochs * method.steps_per_epoch(objs)
method.total_iters = total_iters
log("objectives: " + ", ".join(f"{o.i}: {o.kind.name} ({len(o.train)} train / {len(o.eval)} eval)"
                               for o in objs.values())
    + f" | method {method.name} | {total_iters} iterations of {train_batch_size} samples "
    f"({grad_accum} x {micro_train_batch_size} x {world_size} ranks)")

# references and teachers: frozen, replicated on every rank (sharded at zero 3), in the compute
# dtype or 4-bit (quantize_i); under LoRA without ref_model the policy with its adapters off
frozen = {}
for o in objs.values():
    path, fmt = o.cfg.ref_model, o.cfg.quantize
    if o.kind.reference == "none" or not o.kind.uses_reference(o.cfg):
        continue
    if not path and lora_rank:
        o.ref_is_policy = True
        continue
    if (path, fmt) not in frozen:  # path '' = a copy of the initial policy
        m = (GPT.from_pretrained(path, dtype=ptdtype, device="cpu" if fmt else device) if path
             else deepcopy(raw_model).to(ptdtype))
        frozen[path, fmt] = m.eval().requires_grad_(False)
        quant.frozen(m, fmt, quantize_head, device, f"quantize_{o.i} (or quantize)")
        if m.config.vocab_size != raw_model.config.vocab_size:
            raise configurator.ConfigError(f"objective {o.i}: reference/teacher vocabulary {m.config.vocab_size} "
                                           f"!= policy's {raw_model.config.vocab_size} (ref_model_{o.i}={path!r})")
    o.ref = frozen[path, fmt]

# -----------------------------------------------------------------------------
# data parallel / sharding, optimizer, the step (step.py: bench.py measures this same code)
model = runtime.wrap(raw_model, world, zero_stage, ptdtype, master_dtype, cpu_offload, frozen.values())
fsdp = ddp and zero_stage >= 2
if fsdp and zero_stage == 3 and frozen:
    log(f"{len(frozen)} frozen reference / teacher model(s) sharded across {world_size} ranks")
optimizer, params = runtime.optimizer(raw_model, learning_rate, adam_betas, weight_decay,
                                      fused=world.device_type == "cuda" and not cpu_offload,
                                      zero1=ddp and zero_stage == 1)
step = Step(model, raw_model, autocast, loss_chunk_size, tokenizer.pad_token_id, device, world_size, all_sum)
sync_ctx = runtime.sync_context(model, ddp, fsdp)

def train_step(chosen):
    """one optimizer step's forward and backward for the objectives in `chosen` (weights lambd_i for
    mix, 1 otherwise). Returns {objective: (global mean loss, stats)} and the global token count."""
    steps = {i: objs[i].next_step() for i in chosen}
    weights = [w_obj[i] if len(chosen) > 1 else 1.0 for i in chosen]
    res = step.train([objs[i] for i in chosen], [steps[i] for i in chosen], weights, sync_ctx)
    tokens = sum(int((b["attention_mask"] > 0).sum()) for i in chosen for b in steps[i])
    return dict(zip(chosen, res)), int(all_sum(tokens).item())

def update(it):
    """clip and step at step it's learning rate; a non-finite norm skips the update (optimizer_step)."""
    lr = runtime.lr_at(it, total_iters, learning_rate, warmup_ratio, lr_scheduler, min_lr_ratio)
    return lr, optimizer_step(optimizer, params, max_norm, lr)

def eval_objective(o, batches=None):
    """global mean loss (and stats) of objective o on its eval set (or on `batches`), as trained."""
    if batches is None:
        examples = o.eval[: eval_iters * train_batch_size] if eval_iters else o.eval
        batches = data.eval_batches(examples, micro_train_batch_size, rank, world_size, o.collate)
    return step.evaluate(o, batches)

if precompute_ref:  # reference log-probs once, cached on disk; the reference models are then dropped
    identity = [pretrain, None, lora_rank, dtype, {k: v for k, v in config.items() if k.startswith("model_")}]
    for o in (o for o in objs.values() if o.kind.needs == "logps"):
        identity[1] = o.cfg.ref_model
        batches = data.eval_batches(o.train + o.eval, micro_train_batch_size, rank, world_size, o.collate)
        path = cache_reference(step, o, out_dir, reference_digest(o, raw_model, identity, world_size), batches, master,
                               lambda b, desc: tqdm(b, disable=not master, desc=desc))
        log(f"objective {o.i}: reference log-probs of {len(o.ref_cache)} pairs cached in {path}")
        o.ref = None
    frozen = {p: m for p, m in frozen.items() if any(o.ref is m for o in objs.values())}

# -----------------------------------------------------------------------------
# the method starts (select: its selector) with what the run holds; the state resume needs besides model and optimizer
run = SimpleNamespace(config=config, objectives=objs, step=step, params=params, device=device, all_sum=all_sum,
                      sync_ctx=sync_ctx, log=log, master=master, train_step=train_step)
method.start(run)
state = {"iter": 0, "tokens": 0, "elapsed": 0.0, "train_s": 0.0, "counts": {i: 0 for i in objs},
         "opt": {i: o.opt for i, o in objs.items()}, "total_iters": total_iters}
metrics = checkpoint.Metrics(out_dir, master, config, wandb_log, wandb_project, wandb_run_name, tensorboard)

if resume:
    path = checkpoint.latest(ckpt_root)
    state = checkpoint.load(path, raw_model, optimizer, fsdp)
    for i, o in objs.items():
        o.loader.load_state_dict(state["loaders"][i])
        o.probe.load_state_dict(state["probes"][i])
        if o.online is not None:  # the sampling counter (and a rollout being reused)
            o.online.load_state_dict(state["online"][i])
    method.load_state_dict(state["method"])
    def schedule_at(j, T):  # what step j of a T-step run computes that depends on T
        return runtime.lr_at(j, T, learning_rate, warmup_ratio, lr_scheduler, min_lr_ratio), method.schedule_at(j, T)
    checkpoint.check_total_iters(
        state["iter"], state.get("total_iters", total_iters), total_iters, schedule_at, reschedule, log
    )
    state["total_iters"] = total_iters
    log(f"resumed from {path} at iteration {state['iter']}")
    if master:
        checkpoint.rewind_metrics(metrics_path, state["iter"], log)
elif master:
    open(metrics_path, "w").close()
if master:  # on resume, the harmless keys that changed
    checkpoint.write_text(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2))
if not resume and K > 1:
    for i in objs:
        if state["opt"][i] is None and method.needs(i):
            n_est = opt_estimate_iters or max(10, total_iters // 10)
            # zero 2 keeps the gathered weights after a forward: drop them so the restored shards are used
            def reshard():
                for m in [*raw_model.blocks, raw_model] if fsdp else []:
                    m.reshard()
            state["opt"][i] = methods.estimate_opt(
                i, n_est, lambda it: (train_step([i]), update(it)), lambda: eval_objective(objs[i])[0], params,
                optimizer, [o.loader for o in objs.values()] + [o.online for o in objs.values() if o.online], reshard,
                lambda r: tqdm(r, disable=not master, desc=f"estimating f_{i}*", leave=False))
            log(f"f_{i}* estimated as {state['opt'][i]:.4f}: eval loss after {n_est} steps of objective {i} alone "
                f"(set obj_opt_{i} to use a known value)")

def gap(i):
    """f_i - f_i* on a fresh global batch of objective i's probe rows (the methods' re-evaluation:
    training rows, or held-out rows for a method that measures there)."""
    return eval_objective(objs[i], objs[i].probe.next_step())[0] - state["opt"][i]

def gaps(ev):
    """optimality gaps and ideal distance, where f* is known."""
    if not (all(state["opt"][i] is not None for i in objs) and len(ev) == len(objs)):
        return {}
    g = {f"gap_{i}": ev[i] - state["opt"][i] for i in objs}
    return dict(g, ideal_distance=math.sqrt(sum(x * x for x in g.values())))

def evaluate_all(it):
    """every objective's eval loss (and stats, gaps) as a metrics line; True when eps or the
    reference Pareto front says stop."""
    ev, extra = {}, {}
    for i, o in objs.items():
        if o.eval:  # the set a selector filters has none
            ev[i], st = eval_objective(o)
            extra.update({f"eval_{k}_{i}": v for k, v in st.items()})
    res = dict({f"eval_loss_{i}": v for i, v in ev.items()}, **gaps(ev), **extra)
    metrics.write(dict(kind="eval", iter=it, **res, elapsed_s=time.time() - t0))
    log(f"iter {it}: " + ", ".join(f"eval_loss_{i} {v:.4f}" for i, v in ev.items()))
    why = methods.early_stop(ev, state["opt"], eps, pareto) if eps > 0 and method.joint else ""  # joint methods only
    if why:
        log(f"early stop at iteration {it}: {why}")
    return res, bool(why)

def save(it):
    state["elapsed"] = time.time() - t0
    st = dict(state, iter=it, method=method.state_dict(), loaders={i: o.loader.state_dict() for i, o in objs.items()},
              probes={i: o.probe.state_dict() for i, o in objs.items()},
              online={i: o.online.state_dict() for i, o in objs.items() if o.online is not None})
    checkpoint.save(ckpt_root, it, raw_model, optimizer, st, keep_last, fsdp)

def failed(what, it, chosen):
    path = checkpoint.latest(ckpt_root)
    return RuntimeError(f"{what} at iteration {it + 1} (objective {', '.join(map(str, chosen))}); " + (
        f"the last good checkpoint is {path}" if path
        else f"no checkpoint was written (save_interval={save_interval})"))

interrupted = False  # Ctrl-C / SIGTERM: finish the step, save a checkpoint, exit (ranks agree through an all-reduce)
def on_signal(signum, frame):
    global interrupted
    interrupted = True
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)

def eval_gen(it):
    import evalgen  # what the model says on held-out prompts; every rank computes it, the master writes
    return evalgen.run(list(objs.values()), raw_model, tokenizer, it, out_dir, eval_gen_samples,
                       eval_gen_max_new_tokens, reward_model, master, autocast)

# -----------------------------------------------------------------------------
# the loop
pareto = checks.pareto_points(pareto_front, K) if pareto_front else []
it = state["iter"]
t0 = time.time() - state["elapsed"]
last_eval = {}
pbar = tqdm(total=total_iters, initial=it, disable=not master, desc=method.name if K > 1 else obj_1, dynamic_ncols=True)
raw_model.train()
while True:
    if it >= total_iters or (eval_interval > 0 and it % eval_interval == 0) or it == 0:
        last_eval, stop = evaluate_all(it)
        if stop:
            break
    if eval_gen_interval > 0 and it % eval_gen_interval == 0 and 0 < it < total_iters:
        metrics.write(dict(kind="eval_gen", iter=it, **eval_gen(it)))
    if it >= total_iters and not method.extend(it, last_eval, state["opt"]):  # constrained: a broken budget
        break

    # one optimizer step: the method picks the objective(s), the step trains them
    t_step = time.time()
    chosen = method.pick(it, gap)
    behind = method.logged()  # e.g. maxright's weighted gaps behind this choice
    res, tokens = method.train(chosen, run)
    loss = sum(w_obj[i] * res[i][0] for i in res) if len(res) > 1 else next(iter(res.values()))[0]
    if not math.isfinite(loss):  # before the update: the weights in memory stay finite too
        raise failed(f"non-finite loss {loss}", it, chosen)
    lr, gnorm = update(it)
    if not math.isfinite(gnorm):  # the update was skipped
        raise failed(f"non-finite gradient norm {gnorm} (loss {loss:.4f}, the update was skipped)", it, chosen)
    it += 1
    state["train_s"] += time.time() - t_step  # steps only, no eval/checkpoint
    state["tokens"] += tokens
    for i in chosen:
        state["counts"][i] += 1
    if len(chosen) == 1 and state["opt"][chosen[0]] is not None:
        method.update(chosen[0], res[chosen[0]][0] - state["opt"][chosen[0]])
    if it % log_interval == 0 or it == total_iters:
        line = dict(kind="train", iter=it, obj=chosen[0] if len(chosen) == 1 else 0, loss=loss, lr=lr,
                    tokens=state["tokens"], elapsed_s=time.time() - t0, grad_norm=gnorm, **behind)
        for i, (l, st) in res.items():
            if len(res) > 1:
                line[f"loss_{i}"] = l
            line.update({f"{k}_{i}" if len(res) > 1 else k: v for k, v in st.items()})
        metrics.write(line)
    pbar.update(1)
    pbar.set_postfix(obj="+".join(map(str, chosen)), loss=f"{loss:.4f}")
    method.after_step(it)
    stop = all_sum(float(interrupted)).item() > 0
    if (save_interval > 0 and it % save_interval == 0) or stop:
        save(it)
    if stop:
        log(f"interrupted: checkpoint saved at iteration {it}; resume with --resume=True")
        sys.exit(130)
pbar.close()

# -----------------------------------------------------------------------------
# the end: last checkpoint, final/ export, summary
if not (save_interval > 0 and it % save_interval == 0):
    save(it)
checkpoint.export_final(out_dir, raw_model, fsdp, tokenizer, base_model=pretrain, dequantized=export_dequantized,
                        log=log, lora=(dict(rank=lora_rank, alpha=lora_alpha, target_modules=target_modules)
                                       if lora_rank else None))
gen_failed = None
try:
    last_gen = eval_gen(it) if eval_gen_interval >= 0 else {}
except Exception as e:  # noqa: BLE001 - the model is trained and exported: write the summary, then fail
    gen_failed, last_gen = e, {}
if last_gen:
    metrics.write(dict(kind="eval_gen", iter=it, **last_gen))
method.finish(run)
extra = method.summary(last_eval, state["opt"])  # e.g. constrained: each budget and whether it held
result = dict(method=method.name, objectives=kinds, lambd=list(w_obj.values()), iters=it,
              counts=state["counts"], wall_s=state["elapsed"], train_s=state["train_s"],
              peak_memory_mb=runtime.peak_memory_mb(world.device_type), tokens=state["tokens"], opt=state["opt"],
              **last_eval, **last_gen, **extra)
if gen_failed is not None:
    result["eval_gen_error"] = f"{type(gen_failed).__name__}: {gen_failed}"
if master:
    checkpoint.write_text(os.path.join(out_dir, "summary.json"), json.dumps(result, indent=2))
    rows = [("iterations", f"{it} (" + ", ".join(f"objective {i}: {n}" for i, n in state["counts"].items()) + ")"),
            *((k, v if isinstance(v, (bool, int)) else f"{v:.4f}")
              for k, v in {**last_eval, **last_gen, **extra}.items()),
            *((f"f_{i}*", f"{v:.4f}") for i, v in state["opt"].items() if v is not None),
            ("wall time", f"{state['elapsed']:.1f} s ({result['train_s']:.1f} s in training steps)"),
            ("peak memory", f"{result['peak_memory_mb']:.0f} MiB"), ("tokens", f"{state['tokens']:,}"),
            ("final model", os.path.join(out_dir, "final"))]
    print("\n".join(f"{k:>22}  {v}" for k, v in rows))
metrics.close()
if master:
    release_out_dir()  # everything is written: out_dir is free
if gen_failed is not None:
    raise RuntimeError(f"eval_gen at the end failed; final/ and summary.json are written without its metrics: "
                       f"{result['eval_gen_error']}") from gen_failed
if ddp:
    dist.destroy_process_group()
    # everything is written: leave without the interpreter's teardown, where a process-group thread
    # still joinable now and then aborts a rank ("terminate called without an active exception"),
    # which torchrun would report as a failed run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
