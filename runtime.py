"""
Where and how a run computes: the distributed world (torchrun's RANK / WORLD_SIZE / LOCAL_RANK),
the device and dtype (bf16 autocast over float32 master weights where the GPU has bf16, float32
elsewhere), DDP / FSDP2 wrapping, the AdamW optimizer and the learning-rate schedule. train.py and
bench.py set up through these same functions.
"""
import contextlib
import datetime
import math
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist

def init(device="", timeout_s=1800):
    """the distributed world and the device: one process per GPU under torchrun (keyed on RANK),
    else one process; device '' = cuda:LOCAL_RANK when CUDA is there, else cpu."""
    w = SimpleNamespace(ddp=int(os.environ.get("RANK", -1)) != -1, rank=0, world_size=1, local_rank=0)
    if w.ddp:
        w.rank, w.world_size, w.local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    w.master = w.rank == 0
    w.device = device or (f"cuda:{w.local_rank}" if torch.cuda.is_available() else "cpu")
    if w.device == "cuda":  # no index: this rank's GPU
        w.device = f"cuda:{w.local_rank}"
    w.device_type = "cuda" if w.device.startswith("cuda") else "cpu"
    if w.device_type == "cuda":
        torch.cuda.set_device(w.device)
    return w

def precision(dtype, device_type):
    """(dtype name, compute dtype, master dtype of the trained weights, autocast context). dtype ''
    = bfloat16 where the GPU supports it, else float32 (these CPUs run bf16 matmuls far slower)."""
    if not dtype:
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    ptdtype = getattr(torch, dtype)
    master_dtype = torch.float64 if ptdtype == torch.float64 else torch.float32
    half = ptdtype in (torch.bfloat16, torch.float16)
    autocast = torch.autocast(device_type, dtype=ptdtype) if half else contextlib.nullcontext()
    # TF32 for float32 products on the GPU (it also sets torch's process-wide matmul precision)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dtype, ptdtype, master_dtype, autocast

def shard(m, **kw):
    """FSDP2: each block a unit of its own, then the rest of the model."""
    from torch.distributed.fsdp import fully_shard
    for block in m.blocks:
        fully_shard(block, **kw)
    fully_shard(m, **kw)

def wrap(raw_model, w, zero_stage, ptdtype, master_dtype, cpu_offload=False, frozen=()):
    """the model the step runs: raw_model itself (one process), DDP (zero 0-1) or FSDP2 (zero 2
    keeps the gathered weights from forward to backward, zero 3 reshards; the frozen references
    and teachers are sharded too at zero 3). 4-bit weights (quant.py): DDP leaves them out of its
    start-up broadcast (which would quantize them again) and its gradient buckets, as they are
    frozen and equal on every rank; FSDP2 shards them where their groups of scales divide among
    the ranks, else a ConfigError."""
    if not w.ddp:
        return raw_model
    import quant
    if zero_stage <= 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ignored = quant.ddp_ignored(raw_model)
        if ignored:
            DDP._set_params_and_buffers_to_ignore_for_model(raw_model, ignored)
        return DDP(raw_model, device_ids=[w.local_rank] if w.device_type == "cuda" else None)
    for m in [raw_model, *(frozen if zero_stage == 3 else ())]:
        quant.check_shards(m, w.world_size, zero_stage)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy
    kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=master_dtype),
              reshard_after_forward=zero_stage == 3)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    shard(raw_model, **kw)
    if zero_stage == 3:  # no rank holds a whole copy of a frozen model
        for m in frozen:
            shard(m, reshard_after_forward=True)
    return raw_model

def sync_context(model, ddp, fsdp):
    """sync_ctx(last): the gradient all-reduce only on the last micro-step of an optimizer step."""
    def sync_ctx(last):
        if fsdp:
            model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return model.no_sync() if ddp and not last else contextlib.nullcontext()
    return sync_ctx

def optimizer(raw_model, lr, betas, weight_decay=0.0, fused=False, zero1=False):
    """(AdamW over the trainable parameters, those parameters): weight decay on matrices only;
    fused on a GPU; zero1: the optimizer state sharded over ranks."""
    params = [p for p in raw_model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kw = dict(lr=lr, betas=betas, eps=1e-8)
    if fused:
        kw["fused"] = True
    if zero1:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **kw), params
    return torch.optim.AdamW(groups, **kw), params

def lr_at(it, total_iters, lr, warmup_ratio=0.0, scheduler="constant", min_lr_ratio=0.1):
    """the learning rate of step `it`: linear warm-up over round(warmup_ratio T) steps, then constant
    or cosine down to min_lr_ratio x lr at step T."""
    warmup = round(warmup_ratio * total_iters)
    if it < warmup:
        return lr * (it + 1) / warmup
    if scheduler == "constant":
        return lr
    progress = (it - warmup) / max(1, total_iters - warmup)
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))

def peak_memory_mb(device_type):
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux
