"""
Throughput and peak memory of BiPOST training steps, computed as train.py computes them (one
forward of model.GPT with the losses of objectives.py / losses.py applied through head_fn, one
backward, gradient clipping, one AdamW step), set up as train.py sets up (runtime.py: device,
dtype, autocast, AdamW; methods.py: ALRIGHT's draw and MAXRIGHT's pick; step.py: the step):

    python bench.py                              # tiny llama, CPU, float32: the default cases (all but alright3)
    python bench.py --compare=True --rounds=3    # + the DPO and SFT steps in plain transformers, and TRL (DPO, SimPO)
    python bench.py --mode=memory                # loss peak memory: chunked vs full logits, 128k vocab
    python bench.py --mode=generate              # batched greedy generation against transformers
    python bench.py --mode=online --rounds=3     # a GRPO step against TRL's GRPOTrainer (bench_online.py)
    python bench.py --cases=dpo,kd --lora_rank=16 --quantize=nf4   # 4-bit frozen weights (quant.py) against ''
    python bench.py --pretrain=meta-llama/Llama-3.2-1B --dtype=bfloat16 --batch_size=4 --seq_len=2048 \
        --prompt_len=512

Cases (--cases=...): sft; dpo (the frozen initial policy as reference, forwarded every step);
dpo_precomputed (reference log-probs computed once before timing: no reference forward); simpo (the
same pairs, SimPO's loss with beta simpo_beta and objectives.py's gamma: no reference model at all); kd (a
second frozen model of the same shape as teacher); mix (sft and dpo rows in one forward, both
losses, one backward); alright (methods.Alright: sft with probability lambd, else dpo, drawn per
step); alright3 (sft, dpo or kd, each with probability 1/3: K = 3 at the cost of one objective);
maxright (methods.Maxright over sft and dpo: a no-grad evaluation of both every maxright_interval
steps; f_i* stand-ins 0.1 below each objective's loss after the warm-up, so the choice moves
between the two as the losses move).
Data: random token ids, every row seq_len tokens, the first prompt_len of them a masked prompt.
Step time: the median of `iters` timed steps after `warmup_iters` untimed ones, one case after the
other in this process (alright and maxright: per-objective medians, see summarize); with rounds > 1
every case (the peers too) runs again in each round, and each figure and ratio is the median over
the rounds of the per-round values, every ratio taken between cases of the same round; tokens/s
counts the policy's input tokens of a step (reference and teacher forwards not counted). With
--compare=True the peers run in the same process, on the same weights, batches and dtype: the
plain transformers DPO and SFT steps (transformers, transformers_sft), TRL's DPOTrainer (trl, with
the dpo case) and TRL's CPOTrainer with loss_type="simpo" and cpo_alpha=0, SimPO without CPO's NLL
term, at the simpo case's beta and gamma (trl_simpo, with the simpo case).
Peak memory of a case, measured in a fresh process per case over its warm-up and two steps: on
CUDA torch.cuda.max_memory_allocated minus the memory allocated before the first step; on CPU the
peak RSS (VmHWM, reset through /proc/self/clear_refs after the case is built) minus the RSS
before the first step. Both count gradients, AdamW state, activations and logits, not the weights
and data that exist before the first step; the CPU figure also counts allocator overhead. "With
models": the same peak above the memory before the case built its own policy, reference and teacher
(the weights counted: --quantize=nf4 against '' shows what 4-bit frozen weights save; the CPU
baselines are taken after malloc_trim, so freed set-up memory is not in them).
FLOPs per step (printed per case, by part, with TFLOP/s; MFU when peak_flops > 0): matrix products
only. N = the weights a token is multiplied by: every linear layer of the blocks (an expert's
weighted by the share of tokens routed to it) and the output head; the input embedding is a
lookup, not counted. A trained weight costs 2N per token forward and 4N backward (its input's and
its own gradient); a frozen one (LoRA's base, the head under LoRA) 2N + 2N, and each adapter
6 r (in + out). The head runs on the labelled (response) positions only; DPO's head recomputes
its logits in backward (2 N_head more per labelled token; SFT and forward KD take the head's
gradient in the forward). A reference or teacher forward costs 2N. Attention's score and value
products are counted over each row's full T x T (PaLM's convention; causal kernels compute about
half): 4 L H hd T per token forward, 3x that with backward. Gradient checkpointing adds its
recomputed forward of the blocks.
"""
import contextlib
import json as json_lib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from copy import deepcopy
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import losses as L
import methods
import objectives
import quant
import runtime
from lora import inject, lora_parameters
from model import Router
from benchlib import (build_start, default_device, hf_model, loadavg, machine, print_table, trl_config_kwargs,
                      word_tokenizer, write_json)
from step import Step, optimizer_step

# the joint cases: the objectives each one draws from, objective i = the i-th (alright3: each with probability 1/3)
JOINT = {"alright": ("sft", "dpo"), "maxright": ("sft", "dpo"), "alright3": ("sft", "dpo", "kd")}

# -----------------------------------------------------------------------------
# default config values
mode = "steps"            # steps: each case's optimizer steps | memory: loss + backward, chunked vs full logits |
                          # generate | online (bench_online.py)
cases = "sft,dpo,dpo_precomputed,simpo,kd,mix,alright,maxright"
compare = False           # also the dpo step in plain transformers and in TRL's DPOTrainer, the simpo step in TRL's
                          # CPOTrainer (needs trl)
json = ""                 # write the figures to this file as JSON
# model
pretrain = ""             # HF hub id or local dir; '' builds a fresh llama from the model_* keys
model_vocab_size = 8192
model_n_layer = 4
model_n_head = 8
model_n_kv_head = 4
model_n_embd = 256
model_intermediate_size = 688
dtype = "float32"         # float32 | bfloat16 | float16: autocast over float32 weights (runtime.precision, as train.py)
device = ""               # '' = cuda when available, else cpu
gradient_checkpointing = False
compile = False           # torch.compile each block, as train.py --compile=True (the peers stay eager)
lora_rank = 0             # 0 = full fine-tuning
lora_alpha = 16
target_modules = "all-linear"
quantize = ""             # nf4: the frozen weights in 4 bits (quant.py): LoRA's base, the kd teacher, a dpo reference
# data: random token ids
batch_size = 8            # samples per step (pairs for dpo; mix takes batch_size of each)
seq_len = 256             # tokens per row, prompt included
prompt_len = 64           # masked prompt tokens at the start of each row
# the step
learning_rate = 5e-5
adam_betas = (0.9, 0.95)
max_norm = 1.0
dpo_beta = 0.1
simpo_beta = 2.0          # the simpo case's beta (SimPO's recipes: ~2); its gamma is objectives.py's default (0.5)
kd_loss = "forward"       # forward | reverse | jsd
loss_chunk_size = 0       # tokens per chunk of the output head; 0: max(128, 2^22 / V), train.py's default
lambd = 0.5               # mix: weight of sft; alright: probability of sft (dpo is the other objective)
maxright_interval = 10    # maxright evaluates both objectives every k steps
# timing
warmup_iters = 2          # untimed steps per case (of each objective for alright and maxright)
iters = 10                # timed steps per case (the median is reported)
rounds = 1                # run every case (and the peers) this many times, one round after the other; report medians
memory = True             # peak memory per case, each in a fresh process
peak_flops = 0.0          # the device's peak FLOP/s in dtype (e.g. 989e12 for H100 bf16 dense); > 0 reports MFU per
                          # case
seed = 1337
# memory mode: one loss + backward from hidden states, no model
mem_vocab_size = 128256
mem_seq_len = 2048
mem_n_embd = 1024
mem_chunk_size = 0        # 0: auto_chunk_size (128 tokens at this vocabulary)
mem_cases = "sft_full,sft_chunked,kd_full,kd_chunked"
mem_train_head = True     # False: the output head is frozen (LoRA trains no head), so no weight gradient
case = ""                 # set by the benchmark itself: measure this one case's memory in a fresh process
profile = ""              # a case name: torch.profiler over 3 of its steps (top kernels, host vs device time), nothing
# else
# -----------------------------------------------------------------------------
config_keys = [
    k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple))
]

IGNORE_INDEX = L.IGNORE_INDEX

# -----------------------------------------------------------------------------
# data: random token ids with a realistic prompt / response mask

# -----------------------------------------------------------------------------
# the BiPOST step: step.py's Step, the code train.py runs, on one process

def bipost_step(step, optimizer, params, parts, max_norm=1.0):
    """one optimizer step as train.py's train_step + update run it: parts = [(objective, batch,
    weight)], one micro-batch each; returns each part's loss."""
    res = step.train([o for o, _, _ in parts], [[b] for _, b, _ in parts], [wt for _, _, wt in parts])
    optimizer_step(optimizer, params, max_norm)
    return [l for l, _ in res]

def precompute_ref_logps(step, o, batches):
    """reference log-probs of every pair once, keyed by pair id: step.cache_reference's cache
    (Step.ref_logps), kept in memory."""
    cache = {}
    for b in batches:
        rc, rr = step.ref_logps(o, b)
        cache.update({i: (c, r) for i, c, r in zip(b["ids"], rc.tolist(), rr.tolist())})
    o.ref_cache = cache

# -----------------------------------------------------------------------------
# the same DPO step written plainly with transformers: full logits, log_softmax, gather

def hf_sequence_logps(model, b):
    """[2B] sum of response-token log-probs, from full [2B, T, V] logits."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    logps = (
        torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        .gather(-1, b["input_ids"][:, 1:, None])
        .squeeze(-1)
    )
    return (logps * b["completion_mask"][:, 1:]).sum(-1)

def hf_dpo_step(model, ref, optimizer, b, beta=0.1, autocast=contextlib.nullcontext(), max_norm=1.0):
    with autocast:
        pc, pr = hf_sequence_logps(model, b).chunk(2)
        with torch.no_grad():
            rc, rr = hf_sequence_logps(ref, b).chunk(2)
        loss = -F.logsigmoid(beta * ((pc - pr) - (rc - rr))).mean()
    return hf_update(model, optimizer, loss, max_norm)

def hf_update(model, optimizer, loss, max_norm):
    """backward, clip, step: the end of a plain training loop's step; returns the loss."""
    loss.backward()
    value = loss.item()
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value

def hf_sft_step(model, optimizer, b, autocast=contextlib.nullcontext(), max_norm=1.0):
    """the SFT step as a plain transformers loop writes it: full logits, cross-entropy on the
    response tokens (mean over the batch's tokens)."""
    with autocast:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
    return hf_update(model, optimizer, loss, max_norm)

def trl_dpo_step_times(S, n_steps):
    """TRL's DPOTrainer on the dpo case's pairs, weights, lengths and dtype, configured like the
    BiPOST step, a second copy of the initial weights as its reference (under LoRA: the adapter-off
    policy). Returns (the seconds of each optimizer step, the CUDA peak memory or None)."""
    from trl import DPOConfig, DPOTrainer
    length = lambda e: len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
    return trl_step_times(S, n_steps, DPOConfig, DPOTrainer, length, with_ref=True,
                          beta=S.cfg["dpo_beta"], precompute_ref_log_probs=False)

def trl_cpo():
    """TRL's CPOConfig and CPOTrainer: top-level in older TRL, in trl.experimental.cpo in TRL 1.x."""
    try:
        from trl import CPOConfig, CPOTrainer
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the experimental namespace's import warning
            from trl.experimental.cpo import CPOConfig, CPOTrainer
    return CPOConfig, CPOTrainer

def trl_simpo_step_times(S, n_steps):
    """TRL's CPOTrainer with loss_type="simpo" and cpo_alpha=0 (SimPO alone: CPO's NLL term off, no
    reference model) on the simpo case's pairs, weights, lengths and dtype, at its beta and gamma,
    configured like the BiPOST step. Returns (the seconds of each optimizer step, the CUDA peak
    memory or None)."""
    CPOConfig, CPOTrainer = trl_cpo()
    c = objectives.make("simpo", 2, dpo_beta=S.cfg["simpo_beta"]).cfg  # the simpo case's beta, gamma, smoothing
    length = lambda e: max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"]))  # prompt included
    return trl_step_times(S, n_steps, CPOConfig, CPOTrainer, length, with_ref=False, loss_type="simpo", cpo_alpha=0.0,
                          beta=c.dpo_beta, simpo_gamma=c.simpo_gamma, label_smoothing=c.dpo_label_smoothing,
                          # its pair collator needs every column (else it sets this, with a warning)
                          remove_unused_columns=False)

def trl_step_times(S, n_steps, config_class, trainer_class, length, with_ref, **objective_kw):
    """a TRL preference trainer on the bench's pairs (the first n_steps batches), weights, lengths and
    dtype, configured like the BiPOST step, objective_kw its loss's own settings; length(example):
    a tokenized row's length, which must come out seq_len. Returns the seconds of each optimizer
    step, on_step_begin to on_step_end (batch loading is outside), and the CUDA peak memory (None on
    the CPU)."""
    import datasets
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    cfg = S.cfg
    peft_config = None
    if cfg["lora_rank"]:  # TRL + PEFT: a LoRA of the same rank and targets; the reference is the adapter-off policy
        from peft import LoraConfig
        targets = "all-linear" if cfg["target_modules"] == "all-linear" else cfg["target_modules"].split(",")
        peft_config = LoraConfig(r=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"], lora_dropout=0.0,
                                 target_modules=targets, task_type="CAUSAL_LM")
    # the frozen LoRA base in the compute dtype, as BiPOST stores it
    model = hf_model(S, S.ptdtype if cfg["lora_rank"] else S.master_dtype).to(S.device)
    trainer_kw = {}
    if with_ref:  # TRL's own default: the reference in the policy's dtype
        trainer_kw["ref_model"] = None if cfg["lora_rank"] else hf_model(S, S.master_dtype).to(S.device)
    V = model.config.vocab_size
    text = lambda ids: " ".join("<eos>" if i == V - 1 else f"t{i}" for i in ids)
    rows = [{"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)}
            for p, c, r in S.pairs[:n_steps * cfg["batch_size"]]]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kw):
            S.sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            S.sync()
            self.times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        kw = dict(output_dir=out, per_device_train_batch_size=cfg["batch_size"], gradient_accumulation_steps=1,
                  max_steps=n_steps, learning_rate=cfg["learning_rate"], adam_beta1=cfg["adam_betas"][0],
                  adam_beta2=cfg["adam_betas"][1], weight_decay=0.0, max_grad_norm=cfg["max_norm"],
                  lr_scheduler_type="constant", warmup_steps=0, **objective_kw,
                  bf16=cfg["dtype"] == "bfloat16", fp16=cfg["dtype"] == "float16",
                  activation_checkpointing=cfg["gradient_checkpointing"],
                  max_length=cfg["seq_len"], eval_strategy="no",
                  save_strategy="no", logging_strategy="no", report_to="none", use_cpu=S.device_type == "cpu",
                  dataloader_num_workers=0, disable_tqdm=True, seed=cfg["seed"])
        args = config_class(**trl_config_kwargs(config_class, kw))
        # TRL's own defaults turn both on: the peer must run the bench's precision and checkpointing
        assert (bool(args.gradient_checkpointing), bool(args.bf16)) == (
            cfg["gradient_checkpointing"],
            cfg["dtype"] == "bfloat16",
        )
        timer = Timer()
        trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=word_tokenizer(V), callbacks=[timer], peft_config=peft_config,
                                **trainer_kw)
        trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line
        lengths = {length(e) for e in trainer.train_dataset}
        assert lengths == {cfg["seq_len"]}, f"TRL tokenized the rows to lengths {lengths}, not {cfg['seq_len']}"
        base = memory_mark(S.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated names used inside transformers/TRL
            trainer.train()
        peak = memory_peak(S.device, base) if S.device_type == "cuda" else None
    return timer.times, peak

# -----------------------------------------------------------------------------
# memory mode: one loss + backward from hidden states, chunked (losses.py) vs full logits

def full_sft_loss(hidden, weight, labels):
    logps = F.log_softmax((hidden @ weight.t()).float(), dim=-1)  # (B, T, V)
    mask = labels != IGNORE_INDEX
    picked = logps.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return -(picked * mask).sum() / mask.sum()

def full_kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels):
    logps = F.log_softmax((hidden @ weight.t()).float(), dim=-1)  # (B, T, V)
    with torch.no_grad():
        teacher_probs = F.softmax((teacher_hidden @ teacher_weight.t()).float(), dim=-1)
    mask = labels != IGNORE_INDEX
    return (-(teacher_probs * logps).sum(-1) * mask).sum() / mask.sum()

def loss_memory_case(name, vocab_size, seq_len, n_embd, chunk_size, device, dtype, train_head=True):
    """peak memory (MiB) of one loss + backward above what its inputs occupy, the loss value, seconds."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, seq_len, n_embd, generator=g, dtype=dtype).to(device).requires_grad_()
    weight = (0.02 * torch.randn(vocab_size, n_embd, generator=g, dtype=dtype)).to(device).requires_grad_(train_head)
    labels = torch.randint(vocab_size, (1, seq_len), generator=g).to(device)
    labels[:, -1] = IGNORE_INDEX  # every position but the last has a next token
    teacher_hidden = teacher_weight = None
    if name.startswith("kd"):
        teacher_hidden = torch.randn(1, seq_len, n_embd, generator=g, dtype=dtype).to(device)
        teacher_weight = (0.02 * torch.randn(vocab_size, n_embd, generator=g, dtype=dtype)).to(device)
    base = memory_mark(device)
    t0 = time.perf_counter()
    if name == "sft_full":
        loss = full_sft_loss(hidden, weight, labels)
    elif name == "sft_chunked":
        loss = L.sft_loss(hidden, weight, labels, chunk_size=chunk_size)
    elif name == "kd_full":
        loss = full_kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels)
    elif name == "kd_chunked":
        loss = L.kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels, chunk_size=chunk_size)
    else:
        raise ValueError(f"unknown memory case {name!r}")
    loss.backward()
    value = loss.item()
    seconds = time.perf_counter() - t0
    return {"case": name, "peak_mib": memory_peak(device, base), "loss": value, "seconds": seconds}

# -----------------------------------------------------------------------------
# measuring

def _proc_status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")

def memory_mark(device, trim=False):
    """starts a peak measurement; returns the baseline in bytes. trim: first the C allocator returns
    the memory it holds free (glibc's malloc_trim), so freed set-up temporaries are not counted in the baseline."""
    if trim and not str(device).startswith("cuda") and sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets this process' peak RSS (VmHWM) to the current RSS
    return _proc_status_kib("VmRSS") * 1024

def memory_peak(device, base):
    """MiB above the baseline at the peak since memory_mark."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return (_proc_status_kib("VmHWM") * 1024 - base) / 2**20

# -----------------------------------------------------------------------------
# FLOPs: what one step multiplies (see the header)

def matmul_params(model):
    """the weights a token of `model` is multiplied by: body (every linear layer and router of the
    blocks; an expert's weighted by n_expert_per_tok / n_expert, the share of tokens it gets), head
    (the output head; the input embedding is a lookup, not a product), lora (the adapters' r (in +
    out), summed) and att (layers x query heads x head_dim: attention's score and value products)."""
    c, body = model.config, 0.0
    for n, m in model.named_modules():
        if n.startswith("blocks.") and isinstance(m, (torch.nn.Linear, Router)):
            body += m.weight.numel() * (c.n_expert_per_tok / c.n_expert if ".experts." in n else 1)
    return dict(body=round(body), head=model.lm_head.weight.numel(), att=c.n_layer * c.n_head * c.head_dim,
                lora=sum(p.numel() for _, p in lora_parameters(model)))

def step_flops(parts, M, checkpointing=False, train=True):
    """FLOPs of one optimizer step over parts = [(objective, batch, weight)] by part (train=False:
    one no-grad forward, an evaluation); M: matmul_params of the policy (its reference and teacher
    have the policy's shape, without adapters)."""
    f = {}
    add = lambda k, v: f.__setitem__(k, f.get(k, 0) + v)
    for o, b, _ in parts:
        tok, lab, T = int(b["attention_mask"].sum()), int((b["labels"] != IGNORE_INDEX).sum()), b["input_ids"].shape[1]
        att = 4 * M["att"] * tok * T  # one forward's score and value products, over each row's full T x T
        fwd = 2 * M["body"] * tok + att + 2 * M["head"] * lab  # a forward without adapters (a reference, a teacher)
        if not train:
            add("policy forward", fwd + 2 * M["lora"] * tok)
        else:
            g = 2 if M["lora"] else 4  # backward: the input's gradient, and the weight's own unless it is frozen
            add("policy body", (2 + g) * M["body"] * tok)
            add("policy head", (2 + g) * M["head"] * lab)
            add("attention", 3 * att)
            if M["lora"]:
                add("LoRA adapters", 6 * M["lora"] * tok)
            if o.kind.recomputes_head(o.cfg):  # no head gradient in the forward (objectives.py)
                add("head recompute", 2 * M["head"] * lab)
            if checkpointing:
                add("checkpoint recompute", 2 * (M["body"] + M["lora"]) * tok + att)
        if o.kind.needs == "logps" and o.ref_cache is None:
            add("reference forward", fwd)
        if o.kind.needs == "hidden" and o.kind.uses_reference(o.cfg):  # reverse KL / JSD recompute the teacher's logits
            add("teacher forward", fwd + 2 * M["head"] * lab * (train and o.cfg.kd_loss != "forward"))
    return f

# -----------------------------------------------------------------------------
# steps mode: every case is a runner whose step() runs and times one optimizer step

def timed(S, fn):
    S.sync()
    t0 = time.perf_counter()
    out = fn()
    S.sync()
    return time.perf_counter() - t0, out

def hf_trainer(name, S):
    """the plain transformers loop on the same weights and batches (transformers: DPO against a
    frozen copy, transformers_sft: SFT): train(kind, k) -> (seconds, tokens) of step k."""
    cfg, ac = S.cfg, S.autocast
    model = hf_model(S, S.master_dtype).to(S.device).train()
    model.config.use_cache = False
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = hf_model(S, S.ptdtype).to(S.device).eval().requires_grad_(False) if name == "transformers" else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], betas=cfg["adam_betas"], eps=1e-8,
                            weight_decay=0.0, **({"fused": True} if S.device_type == "cuda" else {}))

    def train(kind, k):
        if ref is None:
            b = S.sft_batches_dev[k % len(S.sft_batches)]
            dt, _ = timed(S, lambda: hf_sft_step(model, opt, b, ac, cfg["max_norm"]))
        else:
            b = S.dpo_batches_dev[k % len(S.dpo_batches)]
            dt, _ = timed(S, lambda: hf_dpo_step(model, ref, opt, b, cfg["dpo_beta"], ac, cfg["max_norm"]))
        return dt, int(b["attention_mask"].sum())
    return train

def bipost_trainer(name, S, R):
    """case `name` set up as train.py sets up: a fresh policy (LoRA adapters in float32 over the
    frozen base), the frozen reference / teacher in the compute dtype (under LoRA the reference is
    the policy with its adapters off), runtime.optimizer's AdamW (weight decay 0, fused on CUDA),
    objectives.make's objectives (1 sft, 2 dpo, 3 kd) and step.Step. Sets R.eval(kind, k) (the
    no-grad loss on batch k) and R.flops (FLOPs per step of each objective it trains, by part);
    returns train(kind, k) -> (seconds, tokens) of one timed optimizer step."""
    cfg = S.cfg
    model = deepcopy(S.base).to(S.device)
    model.gradient_checkpointing = cfg["gradient_checkpointing"]
    if cfg["compile"]:
        model.compile_blocks()  # train.py's --compile
    if cfg["lora_rank"]:
        inject(model, cfg["lora_rank"], cfg["lora_alpha"], 0.0, cfg["target_modules"])
        for _, p in lora_parameters(model):
            p.data = p.data.to(S.master_dtype)
        quant.quantize(model, cfg["quantize"])  # the frozen base: '' leaves it as it is
    model.train()
    optimizer, params = runtime.optimizer(
        model, cfg["learning_rate"], cfg["adam_betas"], 0.0, fused=S.device_type == "cuda"
    )
    uses = JOINT.get(name) or {"mix": ("sft", "dpo"), "dpo_precomputed": ("dpo",)}.get(name, (name,))
    def frozen(m):  # a reference / teacher: frozen, in the compute dtype, 4-bit weights with quantize
        m = deepcopy(m).to(S.device, S.ptdtype).eval().requires_grad_(False)
        quant.quantize(m, cfg["quantize"])
        return m
    lora = bool(cfg["lora_rank"])
    sft = objectives.make("sft", 1)
    dpo = objectives.make("dpo", 2, ref=frozen(S.base) if "dpo" in uses and not lora else None, ref_is_policy=lora,
                          dpo_beta=cfg["dpo_beta"])
    kd = objectives.make("kd", 3, ref=frozen(S.teacher) if "kd" in uses else None, kd_loss=cfg["kd_loss"])
    simpo = objectives.make("simpo", 2, dpo_beta=cfg["simpo_beta"])  # no reference model
    core = Step(model, model, S.autocast, cfg["loss_chunk_size"], 0, S.device)  # train.py's step computation
    if name == "dpo_precomputed":
        precompute_ref_logps(core, dpo, S.dpo_batches)
        dpo.ref = None  # the cache replaces the reference model
    obj = {"sft": sft, "dpo": dpo, "dpo_precomputed": dpo, "kd": kd, "simpo": simpo}
    batch = lambda o, k: (S.dpo_batches if o.kind.collate is dpo.kind.collate else S.sft_batches)[
        k % len(S.sft_batches)
    ]
    lambd = cfg["lambd"]
    parts = lambda kind, k: ([(sft, batch(sft, k), lambd), (dpo, batch(dpo, k), 1 - lambd)] if kind == "mix" else
                             [(obj[kind], batch(obj[kind], k), 1.0)])

    def train(kind, k):
        ps = parts(kind, k)
        dt, losses = timed(S, lambda: bipost_step(core, optimizer, params, ps, cfg["max_norm"]))
        R.last_loss = losses[0]
        return dt, sum(int(b["attention_mask"].sum()) for _, b, _ in ps)
    R.eval = lambda kind, k: core.evaluate(obj[kind], [batch(obj[kind], k)])[0]
    M = matmul_params(model)
    R.flops = {kind: step_flops(parts(kind, 0), M, cfg["gradient_checkpointing"]) for kind in JOINT.get(name, (name,))}
    if name == "maxright":  # one evaluation of both objectives
        R.flops["evaluation"] = step_flops(parts("sft", 0) + parts("dpo", 0), M, train=False)
    return train

def make_runner(name, S):
    """a fresh policy (and reference / teacher) for case `name`. Returns a namespace with warm(n)
    (untimed steps of each objective) and step() (one timed optimizer step, appended to .times /
    .objs / .evals). The joint cases pick each step's objective with methods.py's method object,
    as train.py does: pick(it, gap) before the step, update(i, gap) after it."""
    cfg = S.cfg
    R = SimpleNamespace(name=name, times=[], objs=[], tokens=[], evals=[], k=0, flops={})
    train = hf_trainer(name, S) if name.startswith("transformers") else bipost_trainer(name, S, R)
    kinds, single = JOINT.get(name), {"transformers": "dpo", "transformers_sft": "sft"}.get(name, name)
    if kinds:
        w = methods.weights(cfg["lambd"], 2) if len(kinds) == 2 else (1 / len(kinds),) * len(kinds)
        R.method = methods.make("alright" if name == "alright3" else name, w, seed=cfg["seed"],
                                maxright_interval=cfg["maxright_interval"])
    f_star = {}  # maxright's f_i*

    def warm(n):
        for k in range(n):
            for kind in kinds or (single,):
                train(kind, k)
        if name == "maxright":
            # f* stand-ins: 0.1 below each current loss, so both weighted gaps start equal and the
            # choice alternates as the losses move; it only decides which step cost is paid
            f_star.update({i: R.eval(kind, 0) - 0.1 for i, kind in enumerate(kinds, 1)})

    def step():
        k, kind, t_eval = R.k, single, 0.0
        R.k += 1
        if kinds:
            evaluated = []

            def gap(i):  # f_i - f_i* on a fresh batch, no grad (maxright's re-evaluation, timed with the step)
                evaluated.append(i)
                return R.eval(kinds[i - 1], k + 1) - f_star[i]
            t_pick, (i,) = timed(S, lambda: R.method.pick(k, gap))
            kind, t_eval = kinds[i - 1], t_pick if evaluated else 0.0
        dt, n = train(kind, k)
        if f_star:  # the trained objective's gap, from its pre-update loss
            R.method.update(i, R.last_loss - f_star[i])
        R.times.append(dt + t_eval)
        R.evals.append(t_eval)
        R.objs.append(kind)
        R.tokens.append(n)

    R.warm, R.step = warm, step
    return R

def summarize(R, results, lambd):
    """step time (median) and tokens/s of a runner; alright / maxright also against the
    single-objective runners of the same run: per-objective medians of their training steps,
    weighted by lambd (alright) or by the realized counts (maxright, plus its evaluations).
    FLOPs per step (R.flops): the same weighting of each objective's, plus the evaluations'."""
    out = {"case": R.name, "times": R.times, "tokens_per_step": statistics.mean(R.tokens)}
    out["step_s"] = statistics.median(R.times)
    flops = {kind: sum(p.values()) for kind, p in getattr(R, "flops", {}).items()}
    if flops:
        out["flops_parts"], out["flops"] = R.flops, flops.get(R.name)
    if R.name in JOINT:
        kinds = JOINT[R.name]
        by = {i: [t - e for t, e, o in zip(R.times, R.evals, R.objs) if o == i] for i in kinds}
        med = {i: statistics.median(v) for i, v in by.items() if v}
        n = len(R.times)
        out.update(counts={i: len(v) for i, v in by.items()}, median_step_s=med, eval_s=[e for e in R.evals if e],
                   mean_step_s=statistics.mean(R.times))
        # weights: lambd for alright (when both objectives were drawn), else the realized counts
        wt = ({"sft": lambd, "dpo": 1 - lambd} if R.name == "alright" and len(med) == 2 else
              {i: 1 / 3 for i in kinds} if R.name == "alright3" and len(med) == 3 else {i: len(by[i]) / n for i in med})
        out["step_s"] = sum(wt[i] * med[i] for i in med) + sum(R.evals) / n
        out["tokens_per_step"] = sum(
            wt[i] * statistics.mean(t for t, o in zip(R.tokens, R.objs) if o == i) for i in med
        )
        if flops:
            out["flops"] = sum(wt[i] * flops[i] for i in med) + flops.get("evaluation", 0) * len(out["eval_s"]) / n
        if all(i in results for i in kinds):
            out["single_step_s"] = sum(wt[i] * results[i]["step_s"] for i in med)
            out["vs_single"] = out["step_s"] / out["single_step_s"]
    out["tokens_per_s"] = out["tokens_per_step"] / out["step_s"]
    return out

RATIOS = ("vs_single", "vs_dpo", "bipost_speedup")

def ratios(res):
    """the ratios of one round, each between cases of that round: precomputed and simpo vs dpo time,
    and the peers' step time over BiPOST's step of the same objective (= BiPOST tokens/s over theirs)."""
    if "dpo" in res:
        for c in ("dpo_precomputed", "simpo"):  # no reference forward
            if c in res:
                res[c]["vs_dpo"] = res[c]["step_s"] / res["dpo"]["step_s"]
        for c in ("transformers", "trl"):
            if c in res:
                res[c]["bipost_speedup"] = res[c]["step_s"] / res["dpo"]["step_s"]
    if "trl_simpo" in res and "simpo" in res:
        res["trl_simpo"]["bipost_speedup"] = res["trl_simpo"]["step_s"] / res["simpo"]["step_s"]
    if "transformers_sft" in res and "sft" in res:
        res["transformers_sft"]["bipost_speedup"] = res["transformers_sft"]["step_s"] / res["sft"]["step_s"]

def combine(rounds):
    """one result per case over the rounds: the last round's details, with step time, tokens/s and
    every ratio replaced by the median over the rounds (each round's values kept under 'rounds')."""
    out = {}
    for c, r in rounds[-1].items():
        r = dict(r, rounds={k: [rr[c][k] for rr in rounds if k in rr[c]] for k in ("step_s", "tokens_per_s") + RATIOS})
        for k, vals in r["rounds"].items():
            if vals:
                r[k] = statistics.median(vals)
        out[c] = r
    return out

def case_memory_subprocess(name, argv):
    """this case's peak memory, measured in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--case={name}", "--compare=False"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    for line in p.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json_lib.loads(line[len("BENCH_RESULT "):])
    raise RuntimeError(
        f"memory subprocess for {name} failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    )

# the TRL peers: name -> (the bench case it runs like, the function that times it)
TRL_PEERS = {"trl": ("dpo", trl_dpo_step_times), "trl_simpo": ("simpo", trl_simpo_step_times)}

def run_round(S, order, trl, rnd):
    """one round: every case, one after the other, each freed before the next, as separate training
    runs would be (every round runs them all again, so slow drift of the machine reaches every case
    alike); then the TRL peers named in trl (TRL_PEERS' keys); then the round's ratios."""
    cfg, res = S.cfg, {}
    W, n, B, T = cfg["warmup_iters"], cfg["iters"], cfg["batch_size"], cfg["seq_len"]
    line = lambda c: print(f"  {c:<16} {res[c]['step_s'] * 1e3:9.1f} ms/step  {res[c]['tokens_per_s']:9.0f} tok/s  "
                           f"(round {rnd + 1}, load {loadavg()})")
    for c in order:
        R = make_runner(c, S)
        R.warm(W)
        for _ in range(n):
            R.step()
        res[c] = summarize(R, res, cfg["lambd"])
        line(c)
        del R
    for peer, version in trl.items():
        times, peak = TRL_PEERS[peer][1](S, W + n)
        times = times[W:]
        res[peer] = {"case": peer, "times": times, "step_s": statistics.median(times), "version": version,
                     "tokens_per_step": 2 * B * T, "tokens_per_s": 2 * B * T / statistics.median(times)}
        if peak is not None:
            res[peer]["peak_mib"] = peak
        line(peer)
    ratios(res)
    return res

def main_steps(cfg, argv):
    S = build_start(cfg)
    names = [c.strip() for c in cfg["cases"].split(",") if c.strip()]
    known = ("sft", "dpo", "dpo_precomputed", "simpo", "kd", "mix", "alright", "maxright", "alright3")
    for c in names:
        assert c in known, f"unknown case {c!r}; cases are {', '.join(known)}"
    if cfg["case"]:  # a memory subprocess: build, then peak memory over warm-up and two steps
        before = memory_mark(S.device, trim=True)  # the case's own models (policy, reference, teacher) come next
        R = make_runner(cfg["case"], S)
        base = memory_mark(S.device, trim=True)
        R.warm(1)
        R.step()
        R.step()
        print("BENCH_RESULT " + json_lib.dumps({"case": cfg["case"], "peak_mib": memory_peak(S.device, base),
                                                "with_models_mib": memory_peak(S.device, before)}))
        return
    if cfg["profile"]:
        return profile_case(cfg["profile"], S)
    cfg, mcfg, M = S.cfg, S.base.config, matmul_params(S.base)
    info = dict(machine(), device=S.device, dtype=cfg["dtype"], load_start=loadavg())
    n_params = sum(p.numel() for n, p in S.base.named_parameters() if not n.startswith("wte."))
    print(f"bench: {info['cpu'] if S.device_type == 'cpu' else info.get('gpu')}, {info['torch_threads']} threads, "
          f"torch {info['torch']}, {S.device} {cfg['dtype']}, N = {(M['body'] + M['head']) / 1e6:.2f}M matmul params "
          f"({M['body'] / 1e6:.2f}M blocks + {M['head'] / 1e6:.2f}M head; {n_params / 1e6:.2f}M params besides "
          f"the input embedding), vocab {mcfg.vocab_size}, {cfg['batch_size']} x {cfg['seq_len']} tokens "
          f"({cfg['prompt_len']} prompt), load {info['load_start']}")
    trl = {}  # the TRL peers to run: name -> TRL's version
    if cfg["compare"] and cfg["lora_rank"]:
        print("compare: LoRA runs compare with TRL + PEFT only (the plain transformers peers train the full model)")
    elif cfg["compare"]:
        names += ["transformers"] * ("dpo" in names) + ["transformers_sft"] * ("sft" in names)
    peers = [p for p, (c, _) in TRL_PEERS.items() if c in names]
    if cfg["compare"] and peers:
        try:
            import trl as trl_module
            trl = {p: trl_module.__version__ for p in peers}
        except ImportError:
            print("compare: trl is not installed, TRL skipped")
        if "trl_simpo" in trl:
            try:
                trl_cpo()
            except ImportError:
                print(f"compare: trl {trl_module.__version__} has no CPOTrainer, the SimPO peer skipped")
                del trl["trl_simpo"]
    order = sorted(names, key=lambda c: (c in JOINT) + 2 * c.startswith("transformers"))  # singles first
    rounds = [run_round(S, order, trl, rnd) for rnd in range(cfg["rounds"])]
    results = combine(rounds)
    info["load_end"] = loadavg()
    if cfg["memory"]:
        for c in names:
            if not c.startswith("transformers"):
                mem = case_memory_subprocess(c, argv)
                results[c]["peak_mib"], results[c]["with_models_mib"] = mem["peak_mib"], mem["with_models_mib"]
    for peer, (c, _) in TRL_PEERS.items():
        if "peak_mib" in results.get(peer, {}) and "peak_mib" in results.get(c, {}):
            results[peer]["memory_ratio"] = results[c]["peak_mib"] / results[peer]["peak_mib"]
    for r in results.values():
        if r.get("flops"):
            r["tflops_per_s"] = r["flops"] / r["step_s"] / 1e12
            if cfg["peak_flops"] > 0:
                r["mfu"] = r["flops"] / r["step_s"] / cfg["peak_flops"]
    report_steps(S, results, info, len(rounds))

def report_steps(S, results, info, n_rounds):
    """the table of step times (with every ratio), then each case's FLOPs per step by part."""
    cfg, B, T = S.cfg, S.cfg["batch_size"], S.cfg["seq_len"]
    rows = []
    for c, r in results.items():
        note = ""
        each = lambda key: (f" (rounds: {', '.join(f'{v:.2f}' for v in r['rounds'][key])})"
                            if len(r["rounds"][key]) > 1 else "")
        if "vs_single" in r:
            note = (f"{r['vs_single']:.3f}x the single-objective steps{each('vs_single')}; "
                    f"{'/'.join(r['counts'])} steps {'/'.join(str(v) for v in r['counts'].values())}")
        if "vs_dpo" in r:
            note = f"{r['vs_dpo']:.3f}x the time of the dpo step{each('vs_dpo')}"
        own = {"transformers_sft": "sft", "transformers": "dpo", **{p: v[0] for p, v in TRL_PEERS.items()}}.get(c)
        if "bipost_speedup" in r:
            note = f"{own}: BiPOST tokens/s = {r['bipost_speedup']:.2f}x this{each('bipost_speedup')}"
        if "memory_ratio" in r:
            note += f"; BiPOST {own} peak memory = {r['memory_ratio']:.2f}x this"
        mem = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
        mem += f" ({r['with_models_mib']:.0f})" if "with_models_mib" in r else ""
        rows.append([c, f"{r['step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:.0f}", mem, note])
    print(f"\n{S.device} {cfg['dtype']}, batch {B} x {T} tokens (dpo: {B} pairs = {2 * B} rows), "
          f"median of {cfg['iters']} steps after {cfg['warmup_iters']} warmup"
          f"{f', median over {n_rounds} rounds' if n_rounds > 1 else ''}, "
          f"load {info['load_start']} -> {info['load_end']}")
    print_table(rows, ["case", "ms/step", "tokens/s", "peak MiB (with models)", "note"])
    mem_note = ("peak memory: max_memory_allocated above the pre-step allocation" if S.device_type == "cuda" else
                "peak memory: peak RSS above the pre-step RSS") + (", a fresh process per case; (with models): the "
                "same peak above the memory before the case built its policy, reference and teacher")
    print(mem_note)
    print("\nFLOPs per step (GFLOP; matrix products only: N excludes the input embedding, the head runs on the "
          "labelled positions, attention over each row's full T x T; see bench.py's header)")
    gf = lambda v: f"{v / 1e9:,.2f}"
    for c, r in results.items():
        if not r.get("flops"):
            continue
        mfu = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        if c in JOINT:
            parts = ", ".join(f"{k} {gf(sum(p.values()))}" for k, p in r["flops_parts"].items())
            parts = f"weighted as its step time: {parts}" + (
                " (per evaluation)" if "evaluation" in r["flops_parts"] else ""
            )
        else:
            parts = " + ".join(f"{k} {gf(v)}" for k, v in r["flops_parts"][c].items())
        print(f"  {c:<16} {gf(r['flops']):>9}  {r['tflops_per_s']:7.2f} TFLOP/s{mfu}  = {parts}")
    if cfg["json"]:
        write_json(cfg["json"], {"machine": info, "config": cfg, "results": results, "memory": mem_note})

def profile_case(name, S, steps=3):
    """torch.profiler over a few steps of one case: the kernels that take the time, and host vs
    device time (a host time well above the device time means the step is launch-bound)."""
    from torch.profiler import ProfilerActivity, profile
    R = make_runner(name, S)
    R.warm(max(1, S.cfg["warmup_iters"]))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if S.device_type == "cuda" else [])
    S.sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            R.step()
        S.sync()
    wall = (time.perf_counter() - t0) / steps
    key = "self_cuda_time_total" if S.device_type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))
    ev = prof.key_averages()
    dev = sum(getattr(e, "self_device_time_total", 0) for e in ev) / 1e3 / steps
    print(f"profile {name}: {wall * 1e3:.1f} ms/step wall, device (kernel) time {dev:.1f} ms/step, "
          f"{S.device} {S.cfg['dtype']}")

def main_memory(cfg, argv):
    device = default_device(cfg["device"])
    # the tensors' dtype, no autocast
    cfg["dtype"], ptdtype, _, _ = runtime.precision(cfg["dtype"], device.split(":")[0])
    args = (cfg["mem_vocab_size"], cfg["mem_seq_len"], cfg["mem_n_embd"], cfg["mem_chunk_size"], device, ptdtype,
            cfg["mem_train_head"])
    if cfg["case"]:
        print("BENCH_RESULT " + json_lib.dumps(loss_memory_case(cfg["case"], *args)))
        return
    info = dict(machine(), device=device, dtype=cfg["dtype"], load_start=loadavg())
    V, T, C = args[:3]
    print(f"bench memory: loss + backward from hidden (1, {T}, {C}), head ({V}, {C}), {device} {cfg['dtype']}, "
          f"chunk {cfg['mem_chunk_size'] or L.auto_chunk_size(V)} tokens, "
          f"head {'trained' if cfg['mem_train_head'] else 'frozen'}; one fresh process per case")
    results = {}
    for name in [c.strip() for c in cfg["mem_cases"].split(",") if c.strip()]:
        results[name] = case_memory_subprocess(name, argv)
        print(f"  {name:<12} {results[name]['peak_mib']:8.0f} MiB  loss {results[name]['loss']:.6f}  "
              f"{results[name]['seconds']:.1f} s  (load {loadavg()})")
    info["load_end"] = loadavg()
    logits_mib = T * V * ptdtype.itemsize / 2**20
    rows = []
    for kind in ("sft", "kd"):
        if f"{kind}_full" not in results or f"{kind}_chunked" not in results:
            continue
        full, chunked = results[f"{kind}_full"], results[f"{kind}_chunked"]
        ratio = chunked["peak_mib"] / full["peak_mib"]
        results[f"{kind}_ratio"] = ratio
        rows.append([kind, f"{full['peak_mib']:.0f}", f"{chunked['peak_mib']:.0f}", f"{ratio:.3f}",
                     f"{abs(full['loss'] - chunked['loss']):.1e}"])
    print(f"\npeak memory above the inputs (MiB; one [T, V] logits copy = {logits_mib:.0f} MiB), load "
          f"{info['load_start']} -> {info['load_end']}")
    print_table(rows, ["loss", "full logits", "chunked", "chunked/full", "|loss diff|"])
    print("peak memory: " + ("max_memory_allocated above the inputs" if device.startswith("cuda") else
                             "peak RSS above the RSS after the inputs are allocated, a fresh process per case"))
    if cfg["json"]:
        write_json(cfg["json"], {"machine": info, "config": cfg, "results": results})

# -----------------------------------------------------------------------------
# generate mode: batched greedy decoding, generate.py against transformers' generate and no cache

def kernels_only(ours, x, S, dt):
    """the floor of a decoding step, for families with separate q/k/v and gate/up (else None): the
    prefill forward, then per step only the matrix products and attention kernels generate.py
    makes (fused weights through model.linear, the cache's keys and values), none of the norms,
    rope, residuals, cache writes or bookkeeping around them."""
    from decoding import last_logits
    from model import KVCache, dense, linear
    mc, (B, P) = ours.config, x.shape
    H, K, hd, I = mc.n_head, mc.n_kv_head, mc.head_dim, mc.intermediate_size
    if not all(f is not None and "gate_up" in f for f in KVCache(mc, 1, 1).fuse(ours).fused):
        return None

    @torch.inference_mode()  # as generate.py
    def run(n):
        c = KVCache(mc, B, P + n, S.device, dt).fuse(ours)
        ours(x, head_fn=last_logits)  # the prefill, as generate.py runs it
        h = torch.randn(B, mc.n_embd, device=S.device, dtype=dt)
        for t in range(n):
            for i, (f, block) in enumerate(zip(c.fused, ours.blocks)):
                q = linear(h, *f["qkv"])[:, :H * hd].view(B, H, 1, hd)
                y = F.scaled_dot_product_attention(
                    q, c.k[i][:, :, : P + t + 1], c.v[i][:, :, : P + t + 1], enable_gqa=H != K
                )
                h = dense(
                    block.mlp.down_proj, linear(dense(block.attn.o_proj, y.view(B, H * hd)), *f["gate_up"])[:, :I]
                )
            linear(h, ours.lm_head.weight).argmax(dim=-1)
    return run

def bench_generate(cfg):
    """tokens/s of batched greedy generation: batch_size random prompts of prompt_len tokens, seq_len
    new tokens per row (no eos), on the same weights and batch: generate.py (KV cache, q|k|v and
    gate|up fused), the same unfused (fuse=False), transformers' generate (its default dynamic cache),
    generate.py with use_cache=False (the full forward every step), and the floor (kernels_only);
    transformers' time over the floor's bounds what any generator of these kernels can reach. All
    but the no-cache loop alternate for `rounds` runs after one warm-up each (medians); the no-cache
    loop runs once. tokens/s counts new tokens."""
    import transformers
    from decoding import generate
    S = build_start(cfg)
    dt = S.ptdtype  # generation runs in the compute dtype itself (no autocast)
    hf = hf_model(S, dt).to(S.device).eval()
    ours = S.base.to(device=S.device, dtype=dt).eval()
    hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None  # no early stop
    B, P, N, V = cfg["batch_size"], cfg["prompt_len"], cfg["seq_len"], ours.config.vocab_size
    x = torch.randint(0, V, (B, P), generator=torch.Generator().manual_seed(cfg["seed"])).to(S.device)
    mask = torch.ones_like(x)
    runs = {
        "generate.py": lambda n: generate(ours, x, n),
        "unfused": lambda n: generate(ours, x, n, fuse=False),
        "transformers": lambda n: hf.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                              min_new_tokens=n, pad_token_id=0),
        "no_cache": lambda n: generate(ours, x, n, use_cache=False),
    }
    if S.device_type == "cuda":  # generate.py replays a CUDA graph per step there; this is its eager step
        runs["no_graph"] = lambda n: generate(ours, x, n, cuda_graph=False)
    if (floor := kernels_only(ours, x, S, dt)) is not None:
        runs["kernels_only"] = floor
    info = dict(machine(), device=S.device, dtype=S.cfg["dtype"], load_start=loadavg())
    print(f"bench generate: {info['cpu'] if S.device_type == 'cpu' else info.get('gpu')}, "
          f"{info['torch_threads']} threads, torch {info['torch']}, transformers {transformers.__version__}, "
          f"{S.device} {S.cfg['dtype']}, {ours.num_params() / 1e6:.2f}M params, vocab {V}, batch {B}, prompt {P}, "
          f"{N} new tokens")
    times, outs = {k: [] for k in runs}, {}
    with torch.no_grad():
        for k in runs:
            runs[k](8)  # warm-up
        for rnd in range(cfg["rounds"]):
            for k in ("generate.py", "transformers", "unfused", "no_graph", "kernels_only", "no_cache"):
                if k not in runs or k == "no_cache" and rnd > 0:
                    continue
                dt_s, outs[k] = timed(S, lambda: runs[k](N))
                times[k].append(dt_s)
                print(f"  {k:<14} {dt_s:8.2f} s  {B * N / dt_s:9.0f} tok/s  (round {rnd + 1}, load {loadavg()})")
    res = {k: {"seconds": statistics.median(v), "tokens_per_s": B * N / statistics.median(v), "runs_s": v}
           for k, v in times.items()}
    # each ratio to transformers: the median of each round's ratio (the two ran back to back)
    per_round = lambda k: [b / a for a, b in zip(times[k], times["transformers"])]
    res["vs_transformers_rounds"] = per_round("generate.py")
    res["vs_transformers"] = statistics.median(res["vs_transformers_rounds"])
    res["vs_no_cache"] = res["generate.py"]["tokens_per_s"] / res["no_cache"]["tokens_per_s"]
    res["unfused_vs_transformers"] = statistics.median(per_round("unfused"))
    if "kernels_only" in runs:
        # the ceiling of vs_transformers
        res["kernels_only_vs_transformers"] = statistics.median(per_round("kernels_only"))
    # no_graph: the CUDA-graph replay against the eager step
    for k in ("transformers", "no_cache", "unfused", "no_graph"):
        if k in outs:
            res[f"same_tokens_{k}"] = float((outs["generate.py"][:, P:] == outs[k][:, P:]).float().mean())
    info["load_end"] = loadavg()
    report_generate(res, runs, S.cfg, info)
    return res

def report_generate(res, runs, cfg, info):
    print(f"\n{info['device']} {cfg['dtype']}, batch {cfg['batch_size']}, prompt {cfg['prompt_len']}, {cfg['seq_len']} "
          f"new tokens, median of {cfg['rounds']} runs, load {info['load_start']} -> {info['load_end']}")
    print_table([[k, f"{res[k]['seconds']:.2f}", f"{res[k]['tokens_per_s']:.0f}",
                  f"{res['generate.py']['tokens_per_s'] / res[k]['tokens_per_s']:.2f}x"] for k in runs],
                ["generator", "seconds", "new tokens/s", "generate.py is"])
    print(f"generate.py / transformers tokens/s, median of the rounds' ratios: {res['vs_transformers']:.2f}x "
          f"(rounds: {', '.join(f'{r:.2f}' for r in res['vs_transformers_rounds'])}); "
          f"unfused: {res['unfused_vs_transformers']:.2f}x"
          + (f"; kernels only (the ceiling): {res['kernels_only_vs_transformers']:.2f}x"
             if "kernels_only" in runs else ""))
    print(f"same greedy tokens as generate.py: transformers {res['same_tokens_transformers']:.3f}, "
          f"unfused {res['same_tokens_unfused']:.3f}, no cache {res['same_tokens_no_cache']:.3f}"
          + (f", eager step (no graph) {res['same_tokens_no_graph']:.3f}" if "no_graph" in runs else "")
          + f" (random weights in {cfg['dtype']}: near-ties may differ)")
    if cfg["json"]:
        write_json(cfg["json"], {"machine": info, "config": cfg, "results": res})

if __name__ == "__main__":
    import configurator
    if {"-h", "--help"} & set(sys.argv[1:]):  # the header, then every config key with its default and meaning
        src = open(__file__).read()
        print(__doc__ + src[src.index("# default config values"):src.index("# ----", src.index("profile = "))])
        sys.exit()
    import bench_online  # --mode=online: its keys (num_generations, max_new_tokens) join these
    _cfg = {**{k: globals()[k] for k in config_keys}, **bench_online.KEYS}
    configurator.apply(sys.argv[1:], _cfg, verbose=False)
    globals().update(_cfg)
    if mode not in ("steps", "memory", "generate", "online"):
        raise ValueError(f"config key mode: {mode!r} is not steps, memory, generate or online")
    {
        "steps": main_steps,
        "memory": main_memory,
        "generate": lambda c, argv: bench_generate(c),
        "online": bench_online.main,
    }[mode](_cfg, sys.argv[1:])
