"""
The one training loop: single objective, K objectives at once (K <= 8), and bilevel data selection.

    python train.py config/demo.py                               # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 train.py config/kd_sft.py --lambd=0.3
    python train.py config/demo.py --obj_3=dpo --dataset_3=data/toy_calm.jsonl --lambd=0.4,0.4,0.2

Methods (ALGORITHMS.md §2, methods.py; `lambd` = K weights on the simplex, one number = (lambd, 1 - lambd)):
  sequential  objective i for round(lambd_i * T) steps, in order 1..K               (baseline)
  mix         every step minimizes sum_i lambd_i f_i, one backward                  (baseline, K x cost)
  alright     every step trains objective i with probability lambd_i                (cost of one)
  maxright    every step trains argmax_i lambd_i (f_i - f_i*), the largest weighted gap to its optimum
  select      bilevel data selection: learns one weight per row of dataset_2 so that the trusted
              dataset_1's loss is minimized, then writes the kept rows (selector.py)
Every default below is a config key: override it in a config file or as --key=value.
"""
import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from copy import deepcopy
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# default config values
# I/O
out_dir = "out"
log_interval = 1          # iterations between metrics lines
eval_interval = 50        # iterations between evaluations of both objectives (0 = start and end only)
eval_iters = 0            # eval on the first eval_iters x train_batch_size examples (0 = the whole eval set)
eval_gen_interval = -1    # iterations between behaviour metrics of greedy answers (evalgen.py; 0 = at the end only, -1 = off)
eval_gen_samples = 64     # held-out examples per objective they judge (0 = all)
eval_gen_max_new_tokens = 64
reward_model = ""         # a sequence-classification checkpoint judging DPO answers ('' = the implicit reward)
save_interval = 0         # iterations between checkpoints (0 = only at the end)
keep_last = 2             # checkpoints kept in out_dir/ckpt
resume = False            # True: continue from the latest checkpoint in out_dir
overwrite = False         # True: clear another run's ckpt/, metrics.jsonl, final/, summary.json in out_dir first
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
dtype = ""                # '' = bfloat16 where the GPU supports it, else float32 | float32 | bfloat16 | float64 (exactness tests)
compile = False           # torch.compile each transformer block (the chunked losses stay eager)
gradient_checkpointing = False
device = ""               # '' = cuda:LOCAL_RANK when available, else cpu
# LoRA
lora_rank = 0             # 0 = full fine-tuning
lora_alpha = 16
lora_dropout = 0.0
target_modules = "all-linear"  # or names such as 'q_proj,v_proj' / 'query_key_value'
# objectives
obj_1 = "sft"             # sft | dpo | kd: the kind of objective i; K = the number of obj_i set (at most 8)
obj_2 = obj_3 = obj_4 = obj_5 = obj_6 = obj_7 = obj_8 = ""  # obj_2 = '': single-objective training
method = "alright"        # sequential | mix | alright | maxright | select
lambd = 0.5               # K weights on the simplex, e.g. (0.5, 0.3, 0.2) or --lambd=0.5,0.3,0.2; one number = (lambd, 1 - lambd)
opt_estimate_iters = 0    # steps of the single-objective runs that estimate f* (0 = max(10, T // 10))
maxright_interval = 10    # maxright re-evaluates both objectives every k steps
eps = 0.0                 # early stop when a gap f_i - f_i* <= eps (0 = off)
pareto_front = ""         # JSON file of [[f_1, ..., f_K], ...]: early stop when weakly dominated within eps
precompute_ref = False    # DPO reference log-probs once, cached on disk; the reference model is dropped
loss_chunk_size = 0       # tokens per chunk of the output head ([chunk, V] logits at a time); 0: max(128, 2^22 / V), 2^26 / V on a GPU
# per-objective keys: the value here is every objective's default, and KEY_i sets it for objective i
# alone (dataset_2, max_len_3, dpo_beta_2, ref_model_2, ...); objective_config(i) resolves them
per_objective = dict(
    dataset="",                 # hub id, file, folder, or comma-separated blend (dataset_i must be set)
    dataset_probs="",
    train_split="train",
    eval_split="",              # a split name, or a separate file/folder; '' = a held-out slice of eval_frac
    input_key="input",          # sft / kd rows
    output_key="output",
    prompt_key="prompt",        # dpo rows
    chosen_key="chosen",
    rejected_key="rejected",
    input_template="User: {}\nAssistant: ",
    apply_chat_template=False,
    max_len=512,
    max_samples=0,              # 0 = all
    eval_max_samples=1000,      # cap on the eval rows (the held-out slice or eval_split); 0 = no cap
    obj_opt=-1.0,               # f_i* for maxright and the metrics (-1 = estimate it with a short run)
    ref_model="",               # DPO reference / KD teacher ('' = the initial policy; the base model under LoRA)
    dpo_beta=0.1,
    dpo_ipo=False,
    dpo_label_smoothing=0.0,
    dpo_nll_loss_coef=0.0,
    kd_loss="forward",          # forward | reverse | jsd
    kd_beta=0.5,                # jsd mixing
    kd_top_k=0,                 # 0 = full vocabulary
    kd_temperature=1.0,
)
globals().update(per_objective)
# data
eval_frac = 0.05          # (method=select holds nothing out of dataset_2: every row gets a weight)
packing = False           # sft/kd: concatenate documents up to max_len
streaming = False         # read each dataset as a stream (needs max_samples_i; eval_split_i '' or a file): sets too large for the disk
dataset_num_proc = 0      # processes that tokenize (datasets' map, cached beside the data); 0 = this one
# selector (method = select)
selector_activation = "softmax"  # softmax | sigmoid
selector_learning_rate = 1e-4
selector_algorithm = "memory"    # memory (one forward feeds both updates) | penalty (auxiliary theta-hat)
aux_learning_rate = 1e-3         # penalty: Adam lr of theta-hat, which tracks argmin of the weighted noisy loss
aux_steps = 1                    # penalty: theta-hat steps per selector step
upperlevel_weight = 0.5          # rho = 1 / (1 + gamma)
upperlevel_weight_decay = 0.1    # rho -= decay at the start of every epoch >= 1
select_ratio = 0.8
selector_labels = ""             # optional {"id", "corrupted"} jsonl, for the summary only
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
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple))]
config = {k: globals()[k] for k in config_keys}
if __name__ == "__main__":
    import configurator
    configurator.one_line_errors()  # config and data errors: `error: ...` and exit 2, no traceback
    configurator.apply(sys.argv[1:], config, per_objective=per_objective)
    globals().update((k, config[k]) for k in config_keys)  # the KEY_i set stay in config (objective_config)
# -----------------------------------------------------------------------------

from tqdm import tqdm

import checkpoint
import data as D
import methods
from configurator import ConfigError
from lora import inject, lora_parameters
from model import GPT, Config, load_tokenizer
from step import Step, objective, optimizer_step

def check(cond, msg):
    if not cond:
        raise ConfigError(msg)

check(not device.startswith("cuda") or torch.cuda.is_available(),
      f"config key device: {device!r}, but this torch ({torch.__version__}) sees no CUDA device; use --device=cpu or leave device empty")
check(dist_timeout_s > 0, f"config key dist_timeout_s must be > 0, got {dist_timeout_s}")
# distributed set-up: one process per GPU under torchrun, keyed on RANK
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    rank, world_size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo",
                            timeout=datetime.timedelta(seconds=dist_timeout_s))
else:
    rank, world_size, local_rank = 0, 1, 0
master = rank == 0
if not device:
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
device_type = "cuda" if device.startswith("cuda") else "cpu"
if device_type == "cuda":
    torch.cuda.set_device(device)
if not dtype:
    dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
check(dtype in ("float32", "bfloat16", "float64"), f"config key dtype: {dtype!r} is not float32, bfloat16 or float64" + (
      " (float16 gradients underflow without loss scaling, which train.py does not do: use bfloat16, or float32 "
      "where the GPU has no bfloat16)" if dtype == "float16" else ""))
ptdtype = getattr(torch, dtype)
master_dtype = torch.float64 if ptdtype == torch.float64 else torch.float32  # trained weights
half = ptdtype in (torch.bfloat16, torch.float16)
autocast = torch.autocast(device_type, dtype=ptdtype) if half else contextlib.nullcontext()
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

def log(*a):
    if master:
        tqdm.write(" ".join(str(x) for x in a))

def all_sum(x):
    """sum over ranks of a float / tensor (returned as a float tensor on the device)."""
    t = torch.as_tensor(x, dtype=torch.float64, device=device).clone()
    if ddp:
        dist.all_reduce(t)
    return t

# -----------------------------------------------------------------------------
# checks of the config that fail early and name the key

kinds = [obj_1, obj_2, obj_3, obj_4, obj_5, obj_6, obj_7, obj_8]
K = sum(map(bool, kinds))  # the number of objectives
for _i, _v in enumerate(kinds, 1):
    check(_v in ("", "sft", "dpo", "kd"), f"config key obj_{_i}: {_v!r} is not one of sft, dpo, kd")
check(bool(obj_1), "config key obj_1 must be set")
_gap = kinds.index("") + 1 if "" in kinds else None  # the first objective not set
check(all(kinds[:K]), f"config keys obj_1 ... obj_{K}: objectives are numbered 1..K without gaps, obj_{_gap} is not set")
check(method in ("sequential", "mix", "alright", "maxright", "select"),
      f"config key method: {method!r} is not one of sequential, mix, alright, maxright, select")
check(method != "select" or (K == 2 and obj_1 in ("sft", "kd") and obj_2 in ("sft", "kd")),
      "method=select needs obj_1 and obj_2 in (sft, kd) and no obj_3: dataset_1 is the trusted set, dataset_2 the one to filter")
w_obj = dict(enumerate(methods.weights(lambd, K), 1))  # {i: lambd_i}

def objective_config(i):
    """objective i's per-objective keys: KEY_i where set, else KEY (the table per_objective above)."""
    return SimpleNamespace(kind=kinds[i - 1], **{k: config.get(f"{k}_{i}", config[k]) for k in per_objective})

OC = {i: objective_config(i) for i in range(1, K + 1)}
for _i, _c in OC.items():
    check(_c.dataset != "", f"config key dataset_{_i} (or dataset) must be set for objective {_i} ({_c.kind})")
for _k, _v in config.items():  # the configurator lets a float key take a tuple: only lambd may
    check(not isinstance(_v, tuple) or _k in ("lambd", "adam_betas"), f"config key {_k}: one number, got {_v!r} "
          f"(only lambd takes one weight per objective)")
for _k in ("log_interval", "maxright_interval", "micro_train_batch_size", "train_batch_size", "aux_steps"):
    check(globals()[_k] >= 1, f"config key {_k} must be >= 1, got {globals()[_k]}")
for _k in ("eval_interval", "save_interval", "eval_iters", "keep_last", "max_iters", "max_epochs", "opt_estimate_iters"):
    check(globals()[_k] >= 0, f"config key {_k} must be >= 0 (0 = off or automatic), got {globals()[_k]}")
check(max_iters > 0 or max_epochs > 0, "config keys max_iters and max_epochs are both 0: nothing to train")
_per_step = micro_train_batch_size * world_size
check(train_batch_size % _per_step == 0,
      f"config key train_batch_size ({train_batch_size}) must be a multiple of micro_train_batch_size x world size ({_per_step})")
grad_accum = train_batch_size // _per_step
check(zero_stage in (0, 1, 2, 3), f"config key zero_stage must be 0..3, got {zero_stage}")
check(lr_scheduler in ("constant", "cosine"), f"config key lr_scheduler: {lr_scheduler!r} is not constant or cosine")
check(loss_chunk_size >= 0, f"config key loss_chunk_size must be >= 0 (0 = automatic), got {loss_chunk_size}")
check(method != "select" or not packing, "config keys method=select and packing=True: the selector weighs each document's "
      "loss, a packed row holds several documents; set packing=False")
check(method != "select" or lambd == 0.5, f"config key lambd={lambd!r} does nothing under method=select: the upper-level "
      f"weight (the original's --lambd) is config key upperlevel_weight")
check(not cpu_offload or zero_stage >= 2, f"config keys cpu_offload=True and zero_stage={zero_stage}: offloading is FSDP2's, "
      f"set zero_stage=2 or 3")

# -----------------------------------------------------------------------------
# out_dir holds one run. A new run refuses another run's outputs there unless told to overwrite
# them; a resume refuses a config that changes what a step computes, and names the keys.
HARMLESS = {"out_dir", "resume", "overwrite", "eval_interval", "log_interval", "save_interval", "eval_iters",
            "max_iters", "max_epochs", "keep_last", "wandb_log", "wandb_project", "wandb_run_name", "tensorboard",
            "device", "compile", "dist_timeout_s", "gradient_checkpointing", "loss_chunk_size", "selector_labels",
            "eval_gen_interval", "eval_gen_samples", "eval_gen_max_new_tokens", "reward_model",  # evaluation only
            "eps", "pareto_front", "opt_estimate_iters",  # when to stop; f* is estimated at the start only
            "dataset_num_proc"}  # how the same tokens are made
ckpt_root = os.path.join(out_dir, "ckpt")
metrics_path = os.path.join(out_dir, "metrics.jsonl")
config_path = os.path.join(out_dir, "config.json")

def previous_run():
    """what an earlier run left in out_dir: checkpoints, metrics lines, final model, summary."""
    left = {"ckpt": checkpoint.latest(ckpt_root) is not None, "final": os.path.isdir(os.path.join(out_dir, "final")),
            "metrics.jsonl": os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0,
            "summary.json": os.path.exists(os.path.join(out_dir, "summary.json"))}
    return [k for k, v in left.items() if v]

def config_changes(saved):
    """'key: saved -> now' for the keys that differ from the saved run's and change what a step computes."""
    now = json.loads(json.dumps(config))  # tuples as lists, as in config.json
    for k in set(saved) - set(now):  # a KEY_i set then and not now: KEY's value applies now
        if k.rpartition("_")[0] in now:
            now[k] = now[k.rpartition("_")[0]]
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and k not in HARMLESS and saved[k] != now[k]]

check(not (resume and overwrite), "config keys resume and overwrite exclude each other: resume continues the run "
      "in out_dir, overwrite replaces it")
if resume:
    check(checkpoint.latest(ckpt_root) is not None, f"resume=True but {ckpt_root} holds no checkpoint")
    if os.path.exists(config_path):
        with open(config_path) as f:
            _changes = config_changes(json.load(f))
        check(not _changes, f"resume=True, but the config differs from that of the run in {out_dir} in keys that change "
              f"what a step computes: {'; '.join(_changes)} (restore them, or start a new run: another out_dir or --overwrite=True)")
    else:
        log(f"warning: {config_path} is missing: the config cannot be compared with the checkpoint's run")
else:
    _left = previous_run()
    check(overwrite or not _left, f"out_dir {out_dir} holds another run's {', '.join(_left)}: "
          f"pass --resume=True to continue it, or --overwrite=True to replace it")
    if _left and master:
        for _f in _left:
            _p = os.path.join(out_dir, _f)
            shutil.rmtree(_p) if os.path.isdir(_p) else os.remove(_p)
        log(f"overwrite=True: removed the previous run's {', '.join(_left)} from {out_dir}")
    if ddp:
        dist.barrier()

# -----------------------------------------------------------------------------
# model, tokenizer, LoRA
os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed)  # the same initial weights on every rank
tokenizer = load_tokenizer(pretrain)
_plain = [i for i, c in OC.items() if not c.apply_chat_template and c.input_template == per_objective["input_template"]]
if pretrain and tokenizer.chat_template and _plain:  # chat rows ('messages') use the template either way
    log(f"note: {pretrain}'s tokenizer has a chat template; objective(s) {_plain} format prompts with input_template "
        f"{per_objective['input_template']!r}: set apply_chat_template_i=True to use the chat template")
if pretrain:
    raw_model = GPT.from_pretrained(pretrain, dtype=ptdtype if lora_rank else master_dtype, device=device)
else:
    raw_model = GPT(Config(vocab_size=len(tokenizer), n_layer=model_n_layer, n_head=model_n_head,
                           n_kv_head=model_n_kv_head, n_embd=model_n_embd, head_dim=model_n_embd // model_n_head,
                           intermediate_size=model_intermediate_size, max_position_embeddings=model_max_len,
                           norm_eps=1e-5)).to(device=device, dtype=master_dtype)
raw_model.gradient_checkpointing = gradient_checkpointing
if compile:
    raw_model.compile_blocks()  # each block on its own: no graph break at the losses' head_fn
if lora_rank:
    inject(raw_model, lora_rank, lora_alpha, lora_dropout, target_modules)
    for _, p in lora_parameters(raw_model):
        p.data = p.data.to(master_dtype)  # adapters train in float32; the frozen base may be bf16

# -----------------------------------------------------------------------------
# data: one namespace per objective
def build_objective(i, c):
    """objective i from its keys c = objective_config(i): data, loaders, loss options."""
    frac = 0.0 if method == "select" and i == 2 else eval_frac
    common = dict(tokenizer=tokenizer, max_len=c.max_len, template=c.input_template,
                  apply_chat_template=c.apply_chat_template, verbose=master, num_proc=dataset_num_proc)
    if c.kind == "dpo":
        tok = lambda rows, src: D.tokenize_dpo(rows, prompt_key=c.prompt_key, chosen_key=c.chosen_key,
                                               rejected_key=c.rejected_key, source=src, **common)
        collate = lambda b: D.collate_dpo(b, tokenizer.pad_token_id)
    else:
        tok = lambda rows, src: D.tokenize_sft(rows, input_key=c.input_key, output_key=c.output_key,
                                               source=src, **common)
        collate = lambda b: D.collate_sft(b, tokenizer.pad_token_id, packing=packing, max_len=c.max_len)
    # files: rank 0 converts them to Arrow and tokenizes the rows used (datasets' map) into caches,
    # the other ranks then read those; a stream has no cache, so every rank reads its own at once
    with contextlib.nullcontext() if streaming else D.rank0_first():
        if streaming:  # read as a stream: max_samples rows (and the held-out ones), nothing converted on disk
            train_rows, eval_rows = D.load_streaming(c.dataset, c.train_split, c.max_samples, seed,
                                                     0.0 if c.eval_split else frac, c.eval_max_samples)
            if c.eval_split:  # a file of its own
                eval_rows = D.load_rows(c.eval_split)[: c.eval_max_samples or None]
        else:  # Arrow selections, nothing read into python before tokenizing
            train_rows, eval_rows = D.load_splits(c.dataset, c.train_split, c.eval_split, c.max_samples,
                                                  c.dataset_probs, seed, frac, c.eval_max_samples, lazy=True)
        train, evals = tok(train_rows, c.dataset), tok(eval_rows, f"{c.eval_split or c.dataset} (eval)")
    for e in evals:
        e["id"] = ("eval", e["id"])  # a separate eval file numbers its rows from 0 too: keep cache keys apart
    return objective(c.kind, i=i, cfg=c, rows=train_rows, train=train, eval=evals, collate=collate,
                     loader=D.Loader(train, micro_train_batch_size, grad_accum, rank, world_size, seed + i, collate),
                     probe=D.Loader(train, micro_train_batch_size, grad_accum, rank, world_size, seed + 100 + i, collate),
                     opt=c.obj_opt, beta=c.dpo_beta, ipo=c.dpo_ipo, label_smoothing=c.dpo_label_smoothing,
                     nll_coef=c.dpo_nll_loss_coef, kd_loss=c.kd_loss, kd_beta=c.kd_beta, kd_top_k=c.kd_top_k,
                     kd_temperature=c.kd_temperature)

O = {i: build_objective(i, c) for i, c in OC.items()}
def data_digest(o):
    """sha256 of an objective's row ids and token lengths (train and eval)."""
    n = lambda e: [len(e[k]) for k in ("input_ids", "chosen_ids", "rejected_ids") if k in e]
    return hashlib.sha256(json.dumps([[e["id"], n(e)] for e in o.train + o.eval]).encode()).hexdigest()

if ddp:  # a node-local file or path that differs between ranks would train on a mix, or hang
    for o in O.values():
        _digests = [None] * world_size
        dist.all_gather_object(_digests, data_digest(o))
        _bad = [r for r, d in enumerate(_digests) if d != _digests[0]]
        check(not _bad, f"objective {o.i} (dataset_{o.i}): rank(s) {_bad} read other rows than rank 0 "
              f"(ids or token lengths differ); every rank must see the same data")
# an epoch of a joint run is one pass over the longer dataset; of a selection run, over dataset_2
steps_per_epoch = O[2].loader.steps_per_epoch if method == "select" else max(o.loader.steps_per_epoch for o in O.values())
total_iters = max_iters if max_iters > 0 else max_epochs * steps_per_epoch
log("objectives: " + ", ".join(f"{o.i}: {o.kind} ({len(o.train)} train / {len(o.eval)} eval)" for o in O.values())
    + f" | method {method if K > 1 else 'single'} | {total_iters} iterations of {train_batch_size} samples "
    f"({grad_accum} x {micro_train_batch_size} x {world_size} ranks)")

# reference models and teachers: frozen, replicated on every rank, in the compute dtype
_frozen = {}
def frozen_model(path):
    if path not in _frozen:
        m = GPT.from_pretrained(path, dtype=ptdtype, device=device) if path else deepcopy(raw_model).to(ptdtype)
        _frozen[path] = m.eval().requires_grad_(False)
    return _frozen[path]

for o in O.values():
    if o.kind == "sft":
        continue
    path = o.cfg.ref_model
    check(o.kind == "dpo" or path or lora_rank, f"objective {o.i} is kd: set ref_model_{o.i} (or ref_model) to the teacher")
    o.ref = "self" if not path and lora_rank else frozen_model(path)  # 'self': the policy with adapters off
    if o.ref != "self":
        check(o.ref.config.vocab_size == raw_model.config.vocab_size,
              f"objective {o.i}: reference/teacher vocabulary {o.ref.config.vocab_size} != policy's {raw_model.config.vocab_size}")

# -----------------------------------------------------------------------------
# wrap for data parallel / sharding, optimizer
model = raw_model
if ddp and zero_stage <= 1:
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(raw_model, device_ids=[local_rank] if device_type == "cuda" else None)
elif ddp:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=master_dtype)
    kw = dict(mp_policy=mp, reshard_after_forward=zero_stage == 3)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in raw_model.blocks:
        fully_shard(block, **kw)
    fully_shard(raw_model, **kw)
    if zero_stage == 3:  # frozen references / teachers sharded too: no rank holds a whole copy
        for _m in _frozen.values():
            for block in _m.blocks:
                fully_shard(block, reshard_after_forward=True)
            fully_shard(_m, reshard_after_forward=True)
        if _frozen:
            log(f"{len(_frozen)} frozen reference / teacher model(s) sharded across {world_size} ranks")
fsdp = ddp and zero_stage >= 2
params = [p for p in raw_model.parameters() if p.requires_grad]
decay = [p for p in params if p.dim() >= 2]
no_decay = [p for p in params if p.dim() < 2]
groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
adam_kw = dict(lr=learning_rate, betas=adam_betas, eps=1e-8)
if device_type == "cuda" and not cpu_offload:
    adam_kw["fused"] = True
if ddp and zero_stage == 1:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **adam_kw)
else:
    optimizer = torch.optim.AdamW(groups, **adam_kw)

def get_lr(it):
    warmup = round(warmup_ratio * total_iters)
    if it < warmup:
        return learning_rate * (it + 1) / warmup
    if lr_scheduler == "constant":
        return learning_rate
    progress = (it - warmup) / max(1, total_iters - warmup)
    min_lr = learning_rate * min_lr_ratio
    return min_lr + 0.5 * (learning_rate - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))

# -----------------------------------------------------------------------------
# the step's computation (step.py): one forward over the chosen objectives' rows, losses from the
# hidden states, backward per micro-step; bench.py measures this same code
step = Step(model, raw_model, autocast, loss_chunk_size, tokenizer.pad_token_id, device, world_size, all_sum)

def sync_ctx(last):
    """gradient all-reduce only on the last micro-step of an optimizer step."""
    if fsdp:
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return model.no_sync() if ddp and not last else contextlib.nullcontext()

def train_step(chosen):
    """one optimizer step's micro-steps for the objectives in `chosen` (weights lambd_i for mix,
    1 otherwise). Returns {objective: (mean loss, stats)} and the global token count."""
    steps = {i: O[i].loader.next_step() for i in chosen}
    weights = [w_obj[i] if len(chosen) > 1 else 1.0 for i in chosen]
    res = step.train([O[i] for i in chosen], [steps[i] for i in chosen], weights, sync_ctx)
    tokens = sum(int((b["attention_mask"] > 0).sum()) for i in chosen for b in steps[i])
    return dict(zip(chosen, res)), int(all_sum(tokens).item())

def eval_objective(o, batches=None):
    """global mean loss of objective o on its eval set (or on `batches`), as trained."""
    if batches is None:
        examples = o.eval[: eval_iters * train_batch_size] if eval_iters else o.eval
        batches = D.eval_batches(examples, micro_train_batch_size, rank, world_size, o.collate)
    return step.evaluate(o, batches)

def clip_and_step(it):
    """a non-finite gradient norm skips the update (step.optimizer_step); the loop then stops."""
    lr = get_lr(it)
    return lr, optimizer_step(optimizer, params, max_norm, lr)

# -----------------------------------------------------------------------------
# DPO reference log-probs computed once (precompute_ref) and cached on disk
def reference_digest(o):
    """sha256 of everything o's cached log-probs depend on: the tokenized pairs (ids, tokens, prompt
    masks), the reference weights (the policy's base under LoRA) and the keys that shape them."""
    h = hashlib.sha256(json.dumps([pretrain, o.cfg.ref_model, lora_rank, dtype,
                                   {k: v for k, v in config.items() if k.startswith("model_")}]).encode())
    for e in o.train + o.eval:
        h.update(repr(e["id"]).encode())
        for k in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"):
            h.update(np.asarray(e[k], dtype=np.int64).tobytes() + b"|")  # a list's or a numpy view's ids alike
    lora_names = {n for n, _ in lora_parameters(raw_model)}
    sd = raw_model.state_dict() if o.ref == "self" else o.ref.state_dict()
    w = hashlib.sha256()
    for k, v in sd.items():
        if k not in lora_names:
            v = v.to_local() if hasattr(v, "to_local") else v  # a shard under FSDP: all ranks' digests below
            w.update(k.encode() + v.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    parts = [w.hexdigest()]
    if ddp:
        parts = [None] * world_size
        dist.all_gather_object(parts, w.hexdigest())
    h.update("".join(parts).encode())
    return h.hexdigest()

def precompute_reference(o):
    path = os.path.join(out_dir, f"ref_logps_{o.i}_{reference_digest(o)[:16]}.pt")
    if os.path.exists(path):
        o.ref_cache = torch.load(path, weights_only=True)
    else:
        cache = {}
        # every rank runs the same number of batches (a sharded policy forward is collective)
        batches = D.eval_batches(o.train + o.eval, micro_train_batch_size, rank, world_size, o.collate)
        for b in tqdm(batches, disable=not master, desc=f"reference log-probs {o.i}"):
            rc, rr = step.ref_logps(o, b)
            cache.update({i: (c, r) for i, c, r in zip(b["ids"], rc.tolist(), rr.tolist()) if i is not None})
        if ddp:
            parts = [None] * world_size
            dist.all_gather_object(parts, cache)
            cache = {k: v for p in parts for k, v in p.items()}
        if master:
            torch.save(cache, path + ".tmp")
            os.replace(path + ".tmp", path)
        o.ref_cache = cache
    log(f"objective {o.i}: reference log-probs of {len(o.ref_cache)} pairs cached in {path}")

if precompute_ref:
    for o in O.values():
        if o.kind == "dpo":
            precompute_reference(o)
    for o in O.values():
        if o.kind == "dpo" and o.ref != "self":
            o.ref = None  # the cache replaces it
    for p in list(_frozen):
        if all(o.ref is not _frozen[p] for o in O.values()):
            del _frozen[p]

# -----------------------------------------------------------------------------
# logging: metrics.jsonl on rank 0, plus optional wandb / tensorboard
def write_metrics(line):
    if not master:
        return
    with open(metrics_path, "a") as f:
        f.write(json.dumps(line) + "\n")
    n = line["iter"]
    scalars = {f"{line['kind']}/{k}": v for k, v in line.items() if isinstance(v, (int, float)) and k not in ("iter", "kind")}
    if wandb_log:
        wandb.log(scalars, step=n)
    if tensorboard:
        for k, v in scalars.items():
            tb.add_scalar(k, v, n)

if master and wandb_log:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name or None, config=config)
if master and tensorboard:
    from torch.utils.tensorboard import SummaryWriter
    tb = SummaryWriter(os.path.join(out_dir, "tb"))

def peak_memory_mb():
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux

# -----------------------------------------------------------------------------
# f* (the loss each objective reaches alone), for maxright and the optimality gaps
def estimate_opt(i, n):
    """f_i* from n steps of objective i alone from the current weights, then everything restored."""
    saved = [p.detach().clone() for p in params]
    local = getattr(optimizer, "optim", optimizer)  # zero 1: this rank's shard (its full state_dict needs a consolidation)
    opt_state = deepcopy(local.state_dict())
    loaders = {j: O[j].loader.state_dict() for j in O}
    rng = torch.get_rng_state()
    for it in tqdm(range(n), disable=not master, desc=f"estimating f_{i}*", leave=False):
        train_step([i])
        clip_and_step(it)
    value = eval_objective(O[i])[0]
    if fsdp:  # zero 2 keeps the gathered weights after a forward: drop them so the restored shards are used
        for m in [*raw_model.blocks, raw_model]:
            m.reshard()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    local.load_state_dict(opt_state)
    for j in O:
        O[j].loader.load_state_dict(loaders[j])
    torch.set_rng_state(rng)
    return value

# -----------------------------------------------------------------------------
# state of the run (everything resume needs besides model and optimizer)
joint = K > 1 and method != "select"
state = {"iter": 0, "tokens": 0, "elapsed": 0.0, "train_s": 0.0, "counts": {i: 0 for i in O}, "obj_rng": random.Random(seed).getstate(),
         "s": {}, "opt": {i: o.opt for i, o in O.items()}}
if method == "select":
    import selector as sel
    from selector import decayed_weight, export_selected, memory_efficient_losses, penalty_omega_loss, summary
    check(selector_algorithm in ("memory", "penalty"), f"config key selector_algorithm: {selector_algorithm!r} is not memory or penalty")
    check(selector_algorithm == "memory" or not fsdp, "selector_algorithm=penalty supports zero_stage 0 and 1")
    selector, selector_opt, aux, aux_opt = sel.make([e["id"] for e in O[2].train], selector_activation, selector_learning_rate,
                                                    selector_algorithm, params, aux_learning_rate, adam_betas, device)

def read_metrics(path):
    """the lines of metrics.jsonl. A partial last line (a crash or a full disk during a write) is
    dropped with a warning; a corrupt line before it is an error naming it."""
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    last = max((j for j, l in enumerate(raw, 1) if l.strip()), default=0)
    lines = []
    for j, l in enumerate(raw[:last], 1):
        if not l.strip():
            continue
        try:
            line = json.loads(l)
        except ValueError:  # also bytes that are not UTF-8
            line = None
        if not (isinstance(line, dict) and isinstance(line.get("iter"), int) and "kind" in line):
            check(j == last, f"{path}, line {j}: not a metrics line ({l[:60]!r}); repair or delete that line and resume again")
            log(f"warning: {path}, line {j}: incomplete last line dropped (written when the previous run ended)")
            continue
        lines.append(line)
    return lines

if resume:
    path = checkpoint.latest(ckpt_root)
    state = checkpoint.load(path, raw_model, optimizer, fsdp)
    for i, o in O.items():
        o.loader.load_state_dict(state["loaders"][i])
        o.probe.load_state_dict(state["probes"][i])
    if method == "select":
        sel.load_state_dict(state, selector, selector_opt, aux, aux_opt)
    log(f"resumed from {path} at iteration {state['iter']}")
    if master and os.path.exists(metrics_path):  # drop lines written after that checkpoint
        lines = read_metrics(metrics_path)
        keep = [l for l in lines if l["iter"] < state["iter"] or (l["kind"] == "train" and l["iter"] == state["iter"])]
        checkpoint.write_text(metrics_path, "".join(json.dumps(l) + "\n" for l in keep))
elif master:
    open(metrics_path, "w").close()
if master:  # on resume, the harmless keys that changed
    checkpoint.write_text(config_path, json.dumps(config, indent=2))

if joint and not resume:
    n_est = opt_estimate_iters or max(10, total_iters // 10)
    for i in O:
        if state["opt"][i] < 0 and method == "maxright":
            state["opt"][i] = estimate_opt(i, n_est)
            log(f"f_{i}* estimated as {state['opt'][i]:.4f}: eval loss after {n_est} steps of objective {i} alone "
                f"(set obj_opt_{i} to use a known value)")

def gaps(ev):
    """optimality gaps and ideal distance, where f* is known."""
    out = {}
    if all(state["opt"][i] >= 0 for i in O) and len(ev) == len(O):
        g = [ev[i] - state["opt"][i] for i in O]
        out = {f"gap_{i}": x for i, x in zip(O, g)}
        out["ideal_distance"] = math.sqrt(sum(x * x for x in g))
    return out

# maxright: state["s"] = {i: lambd_i (f_i - f_i*)}, the weighted gaps behind each choice. All are
# re-evaluated every maxright_interval steps on a fresh global batch of each objective; between,
# the trained objective's gap follows its pre-update training loss.
def maxright_pick(it):
    if it % maxright_interval == 0 or len(state["s"]) < K:
        for i in O:
            state["s"][i] = w_obj[i] * (eval_objective(O[i], O[i].probe.next_step())[0] - state["opt"][i])
    return methods.maxright_pick(state["s"])

def maxright_update(i, loss):
    state["s"][i] = w_obj[i] * (loss - state["opt"][i])

def pick_objectives(it):
    """the objective(s) trained at step `it` (same on every rank: nothing here is rank-dependent)."""
    if K == 1:
        return [1]
    if method == "sequential":
        return [methods.sequential_pick(it, list(w_obj.values()), total_iters)]
    if method in ("mix", "select"):
        return list(O)
    if method == "alright":  # one draw per step from the run's own generator (state["obj_rng"], resumed)
        r = random.Random()
        r.setstate(state["obj_rng"])
        i = methods.alright_pick(r, list(w_obj.values()))
        state["obj_rng"] = r.getstate()
        return [i]
    return [maxright_pick(it)]

def swap_aux():
    """exchanges the trainable parameters' values with theta-hat's (penalty algorithm): the same
    modules then compute l_i(theta-hat); under LoRA theta-hat is a second adapter, cheap in memory."""
    with torch.no_grad():
        for p, q in zip(params, aux):
            tmp = p.detach().clone()
            p.copy_(q)
            q.copy_(tmp)

def aux_steps_on(ft, n_ft):
    """theta-hat <- theta-hat - Adam(grad of the selector-weighted noisy loss); returns the per-sample
    losses l_i(theta-hat) of each micro-batch, from the first of these steps (before its update)."""
    swap_aux()
    seen = None
    for _ in range(aux_steps):
        losses = []
        for m in range(grad_accum):
            with sync_ctx(m == grad_accum - 1):
                (l_hat, _), = step.losses([(O[2], ft[m], None)])
                w = selector.weights(ft[m]["ids"]).detach().to(l_hat.dtype)
                ((w * l_hat).sum() / n_ft * world_size).backward()
            losses.append(l_hat.detach())
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        aux_opt.step()
        aux_opt.zero_grad(set_to_none=True)
        seen = seen or losses
    swap_aux()
    return seen

def select_step():
    """bilevel selection step (ALGORITHMS.md §3). memory: one forward gives the trusted set's loss
    and the noisy set's per-sample losses; theta and the selector logits both update from it.
    penalty: theta-hat takes aux_steps on the weighted noisy loss first, and the logits follow
    sum_i grad w_i [l_i(theta) - l_i(theta-hat)] instead."""
    rho = decayed_weight(upperlevel_weight, upperlevel_weight_decay, O[2].loader.epoch)
    up, ft = O[1].loader.next_step(), O[2].loader.next_step()
    n_up = all_sum(sum(len(b["ids"]) for b in up)).item()
    n_ft = all_sum(sum(len(b["ids"]) for b in ft)).item()
    hat = aux_steps_on(ft, n_ft) if selector_algorithm == "penalty" else None
    total, tokens = 0.0, 0
    for m in range(grad_accum):
        with sync_ctx(m == grad_accum - 1):
            (l_up, _), (l_vec, _) = step.losses([(O[1], up[m], None), (O[2], ft[m], None)])
            up_loss = l_up.sum() / n_up * world_size
            loss_theta, loss_omega = memory_efficient_losses(selector, ft[m]["ids"], l_vec, up_loss, rho, n_ft / world_size)
            if hat is not None:
                loss_omega = penalty_omega_loss(selector, ft[m]["ids"], l_vec, hat[m], n_ft / world_size)
            (loss_theta + loss_omega).backward()
        total += loss_theta.item()
        tokens += int((up[m]["attention_mask"] > 0).sum() + (ft[m]["attention_mask"] > 0).sum())
    selector.step(selector_opt)
    return {1: (all_sum(total).item() / world_size, {"rho": rho})}, int(all_sum(tokens).item())

# Ctrl-C / SIGTERM: finish the step, save a checkpoint, exit (ranks agree through an all-reduce)
interrupted = False
def _on_signal(signum, frame):
    global interrupted
    interrupted = True
signal.signal(signal.SIGINT, _on_signal)
signal.signal(signal.SIGTERM, _on_signal)

def last_good():
    path = checkpoint.latest(ckpt_root)
    return f"the last good checkpoint is {path}" if path else f"no checkpoint was written (save_interval={save_interval})"

def checkpoint_state(it):
    st = dict(state, iter=it, loaders={i: o.loader.state_dict() for i, o in O.items()},
              probes={i: o.probe.state_dict() for i, o in O.items()})
    if method == "select":
        st.update(sel.state_dict(selector, selector_opt, aux, aux_opt))
    return st

def save_selection(epoch=None, final=False):
    """selector.jsonl: the latest weights; selector_epoch{e}.jsonl: those after e epochs of dataset_2."""
    if master:
        selector.save_jsonl(os.path.join(out_dir, "selector.jsonl"))
        if epoch is not None:
            selector.save_jsonl(os.path.join(out_dir, f"selector_epoch{epoch}.jsonl"))
        if final:
            n = export_selected(O[2].rows, selector, select_ratio, os.path.join(out_dir, "selected.jsonl"))
            log(f"selected {n} of {len(O[2].rows)} rows of {OC[2].dataset} -> {out_dir}/selected.jsonl")

def eval_gen(it):
    import evalgen  # what the model says on held-out prompts; every rank computes it, the master writes
    return evalgen.run([O[i] for i in O], raw_model, tokenizer, it, out_dir, eval_gen_samples, eval_gen_max_new_tokens,
                       reward_model, master, autocast)

# -----------------------------------------------------------------------------
# the loop
pareto = json.load(open(pareto_front)) if pareto_front else []
it = state["iter"]
t0 = time.time() - state["elapsed"]
last_eval = {}
pbar = tqdm(total=total_iters, initial=it, disable=not master, desc=method if K > 1 else obj_1, dynamic_ncols=True)
raw_model.train()
while True:
    # evaluate every objective (and maybe stop early)
    if it == total_iters or (eval_interval > 0 and it % eval_interval == 0) or it == 0:
        ev, extra = {}, {}
        for i, o in O.items():
            if not o.eval:
                continue  # e.g. the set a selector filters
            ev[i], st = eval_objective(o)
            extra.update({f"eval_{k}_{i}": v for k, v in st.items()})
        last_eval = dict({f"eval_loss_{i}": v for i, v in ev.items()}, **gaps(ev), **extra)
        write_metrics(dict(kind="eval", iter=it, **last_eval, elapsed_s=time.time() - t0))
        log(f"iter {it}: " + ", ".join(f"eval_loss_{i} {v:.4f}" for i, v in ev.items()))
        if eps > 0 and joint and method != "sequential":  # joint methods only (ALGORITHMS.md)
            near = any(i in ev and 0 <= state["opt"][i] and ev[i] - state["opt"][i] <= eps for i in O)  # where f_i* is known
            dominated = any(all(i in ev and ev[i] <= p[i - 1] + eps for i in O) for p in pareto)  # needs no f*
            if near or dominated:
                log(f"early stop at iteration {it}: " + ("an objective is within eps of its optimum" if near else "the reference Pareto front is reached"))
                break
    if eval_gen_interval > 0 and it % eval_gen_interval == 0 and 0 < it < total_iters:
        write_metrics(dict(kind="eval_gen", iter=it, **eval_gen(it)))
    if it >= total_iters:
        break

    # one optimizer step
    t_step = time.time()
    chosen = pick_objectives(it)
    gaps_seen = {f"s_{i}": v for i, v in state["s"].items()}  # maxright's weighted gaps behind this choice
    if method == "select":
        res, tokens = select_step()
    else:
        res, tokens = train_step(chosen)
    loss = sum(w_obj[i] * res[i][0] for i in res) if len(res) > 1 else next(iter(res.values()))[0]
    if not math.isfinite(loss):  # before the update: the weights in memory stay finite too
        raise RuntimeError(f"non-finite loss {loss} at iteration {it + 1} (objective {', '.join(map(str, chosen))}); "
                           f"{last_good()}")
    lr, gnorm = clip_and_step(it)
    if not math.isfinite(gnorm):  # the update was skipped
        raise RuntimeError(f"non-finite gradient norm {gnorm} at iteration {it + 1} (objective "
                           f"{', '.join(map(str, chosen))}, loss {loss:.4f}); the update was skipped; {last_good()}")
    it += 1
    state["train_s"] += time.time() - t_step  # steps only, no eval/checkpoint
    state["tokens"] += tokens
    for i in chosen:
        state["counts"][i] += 1
    if method == "maxright":
        maxright_update(chosen[0], res[chosen[0]][0])
    if it % log_interval == 0 or it == total_iters:
        line = dict(kind="train", iter=it, obj=chosen[0] if len(chosen) == 1 else 0, loss=loss, lr=lr,
                    tokens=state["tokens"], elapsed_s=time.time() - t0, grad_norm=gnorm, **gaps_seen)
        for i, (l, st) in res.items():
            if len(res) > 1:
                line[f"loss_{i}"] = l
            line.update({f"{k}_{i}" if len(res) > 1 else k: v for k, v in st.items()})
        write_metrics(line)
    pbar.update(1)
    pbar.set_postfix(obj="+".join(map(str, chosen)), loss=f"{loss:.4f}")
    if method == "select" and O[2].loader.epoch != state.get("sel_epoch", 0):
        state["sel_epoch"] = O[2].loader.epoch
        save_selection(state["sel_epoch"])

    stop = all_sum(float(interrupted)).item() > 0
    if (save_interval > 0 and it % save_interval == 0) or stop:
        state["elapsed"] = time.time() - t0
        checkpoint.save(ckpt_root, it, raw_model, optimizer, checkpoint_state(it), keep_last, fsdp)
    if stop:
        log(f"interrupted: checkpoint saved at iteration {it}; resume with --resume=True")
        sys.exit(130)
pbar.close()

# -----------------------------------------------------------------------------
# the end: last checkpoint, final/ export, summary
state["elapsed"] = time.time() - t0
if not (save_interval > 0 and it % save_interval == 0):
    checkpoint.save(ckpt_root, it, raw_model, optimizer, checkpoint_state(it), keep_last, fsdp)
checkpoint.export_final(out_dir, raw_model, fsdp, tokenizer, base_model=pretrain,
                        lora=dict(rank=lora_rank, alpha=lora_alpha, target_modules=target_modules) if lora_rank else None)
last_gen = eval_gen(it) if eval_gen_interval >= 0 else {}
if last_gen:
    write_metrics(dict(kind="eval_gen", iter=it, **last_gen))
if method == "select":
    save_selection(final=True)
    if master:
        labels = {}
        if selector_labels:
            with open(selector_labels) as f:
                labels = {r["id"]: r["corrupted"] for r in map(json.loads, f) if r}
        log(summary(selector, os.path.join(out_dir, "selector_weights.png"), labels or None))

result = dict(method=method if K > 1 else "single", objectives=kinds[:K], lambd=list(w_obj.values()), iters=it,
              counts=state["counts"], wall_s=state["elapsed"],
              train_s=state["train_s"],
              peak_memory_mb=peak_memory_mb(), tokens=state["tokens"], opt=state["opt"], **last_eval, **last_gen)
if master:
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(result, f, indent=2)
    rows = [("iterations", f"{it} (" + ", ".join(f"objective {i}: {n}" for i, n in state["counts"].items()) + ")"),
            *((k, f"{v:.4f}") for k, v in {**last_eval, **last_gen}.items()),
            *((f"f_{i}*", f"{v:.4f}") for i, v in state["opt"].items() if v >= 0),
            ("wall time", f"{state['elapsed']:.1f} s ({result['train_s']:.1f} s in training steps)"), ("peak memory", f"{result['peak_memory_mb']:.0f} MiB"),
            ("tokens", f"{state['tokens']:,}"), ("final model", os.path.join(out_dir, "final"))]
    print("\n".join(f"{k:>22}  {v}" for k, v in rows))
if master and tensorboard:
    tb.close()
if master and wandb_log:
    wandb.finish()
if ddp:
    dist.destroy_process_group()
    # everything is written: leave without the interpreter's teardown, where a process-group thread
    # still joinable now and then aborts a rank ("terminate called without an active exception"),
    # which torchrun would report as a failed run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
