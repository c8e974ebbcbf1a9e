"""
Checkpoints and the final export, for plain, DDP, ZeRO-1 and FSDP2-sharded models alike, and the
policy of the out_dir that holds one run (what a new run or a resume finds there, metrics.jsonl).

    out_dir/ckpt/iter_0000500/  model.pt (trainable parameters, full), optimizer.pt (full),
                                state.pt (loop state: data positions, method state, selector),
                                rng_<rank>.pt (each rank's RNG states)
    out_dir/final/              Hugging Face layout (+ adapter/ in PEFT layout under LoRA)

A checkpoint is written into tmp_iter_N and renamed to iter_N when complete, so a crash or
Ctrl-C at any moment leaves the newest iter_ directory loadable. Every file is fsynced before the
rename and the directory after it, so a power loss cannot leave a renamed but empty file. Files
hold tensors and plain containers only and load with weights_only=True: a planted object in a
checkpoint is refused, never run.
"""
import atexit
import errno
import fcntl
import json
import os
import pickle
import random
import shutil
import socket

import torch
import torch.distributed as dist

import errors
from errors import ConfigError

def _rank():
    return dist.get_rank() if dist.is_initialized() else 0

def _barrier():
    if dist.is_initialized():
        dist.barrier()

def full_state_dict(model, fsdp, trainable_only=True):
    """{name: tensor} of the model (its trainable parameters by default), unsharded, on rank 0's CPU
    (a 4-bit weight as its 4-bit tensor, quant.py)."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    if fsdp:  # trainable only: the frozen weights are not gathered at all
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                  ignore_frozen_params=trainable_only))
    else:
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items() if k in keep or not trainable_only}
    return {k: v for k, v in sd.items() if k in keep or not trainable_only}

def _full_optimizer_state(model, optimizer, fsdp):
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    if hasattr(optimizer, "consolidate_state_dict"):  # ZeRO-1: the shards meet on rank 0
        optimizer.consolidate_state_dict(to=0)
        return optimizer.state_dict() if _rank() == 0 else None
    return optimizer.state_dict()

def fsync_dir(path):
    """makes a rename or a new file in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def write_text(path, text):
    """replaces the file's content atomically: a crash leaves the old text or the new, never a mix."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")

def _write(obj, path):
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())

def _no_space(e):
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "unexpected pos" in str(e)

def save(ckpt_root, it, model, optimizer, state, keep_last=2, fsdp=False):
    """Every rank calls this (the gathers are collective); rank 0 writes. A full disk removes the
    partial tmp_iter_ dir and raises an OSError (ENOSPC) naming the path; older checkpoints stay."""
    msd, osd = full_state_dict(model, fsdp), _full_optimizer_state(model, optimizer, fsdp)
    master = _rank() == 0
    tmp = os.path.join(ckpt_root, f"tmp_iter_{it:07d}")
    path = tmp
    try:
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            for name, obj in (("model.pt", msd), ("optimizer.pt", osd), ("state.pt", state)):
                path = os.path.join(tmp, name)
                _write(obj, path)
        _barrier()
        path = os.path.join(tmp, f"rng_{_rank()}.pt")
        _write({"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}, path)
    except (OSError, RuntimeError) as e:
        if not _no_space(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest(ckpt_root)
        kept = f"the previous checkpoint {prev} is kept" if prev else "no earlier checkpoint exists"
        raise OSError(errno.ENOSPC, f"writing {path}: no space left on device ({shutil.disk_usage(ckpt_root).free:,} "
                      f"bytes free); {kept}") from e
    _barrier()
    if master:
        fsync_dir(tmp)
        final = os.path.join(ckpt_root, f"iter_{it:07d}")
        old = os.path.join(ckpt_root, f"old_iter_{it:07d}")
        if os.path.isdir(final):  # the same step saved again (a resumed finished run): set the old one aside first
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)  # atomic: until here the previous iter_ dir (or old_iter_) is the newest complete one
        fsync_dir(ckpt_root)
        shutil.rmtree(old, ignore_errors=True)
        kept = sorted(d for d in os.listdir(ckpt_root) if d.startswith("iter_"))
        for d in kept[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
    _barrier()

def latest(ckpt_root):
    """the newest complete checkpoint dir, or None: iter_ dirs appear only by an atomic rename; an
    old_iter_N (set aside while the same step was saved again) counts when its iter_N is missing."""
    if not os.path.isdir(ckpt_root):
        return None
    found = {}
    for d in sorted(os.listdir(ckpt_root)):  # "iter_..." sorts after "old_iter_...": it wins for the same step
        if d.startswith(("iter_", "old_iter_")):
            found[d.rpartition("iter_")[2]] = d
    return os.path.join(ckpt_root, found[max(found)]) if found else None

def _load(path):
    # weights_only: tensors and plain containers; anything else (code to run) is refused
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{path}: refused to load: it holds more than tensors and plain containers ({first})"
        ) from None

def check_shapes(path, msd, model):
    """a tensor of the checkpoint whose shape is not the model's is an error naming it."""
    own = model.state_dict()
    for k, v in msd.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):  # a DTensor's shape is the full one
            raise ConfigError(f"{path}/model.pt: {k} has shape {tuple(v.shape)}, this model's is "
                              f"{tuple(own[k].shape)}: the checkpoint was written with other model_* / pretrain / "
                              f"lora_rank keys")

def load(path, model, optimizer, fsdp=False):
    """restores model, optimizer and this rank's RNGs; returns the loop state."""
    msd = _load(os.path.join(path, "model.pt"))
    check_shapes(path, msd, model)
    osd = _load(os.path.join(path, "optimizer.pt"))
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, msd, options=opts)
        set_optimizer_state_dict(model, optimizer, osd, options=opts)
    else:
        missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(msd)
        if missing:
            raise ConfigError(f"{path}/model.pt lacks {sorted(missing)[:3]} ({len(missing)} tensors): "
                             f"was it written by a run with other LoRA settings?")
        model.load_state_dict(msd, strict=False)
        optimizer.load_state_dict(osd)
    rng = _load(os.path.join(path, f"rng_{_rank()}.pt"))
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return _load(os.path.join(path, "state.pt"))

def hf_extras(d, tokenizer, base_model=""):
    """what transformers writes beside the weights: config.json with the one dtype key the installed
    version uses, and generation_config.json (the base checkpoint's where it has one, its sampling
    defaults and chat eos kept; else bos/eos/pad from config.json, then the tokenizer)."""
    import json
    import transformers
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    dtype = cfg.pop("torch_dtype", None) or cfg.pop("dtype", None)  # save_pretrained's: the tensors' dtype
    cfg.pop("dtype", None)
    cfg["dtype" if "dtype" in transformers.PretrainedConfig().to_dict() else "torch_dtype"] = dtype
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    gen = None
    if base_model:
        try:
            gen = transformers.GenerationConfig.from_pretrained(base_model)
        except (OSError, ValueError):  # no generation_config.json there
            gen = None
    if gen is None:
        ids = {k: cfg.get(f"{k}_token_id") if cfg.get(f"{k}_token_id") is not None
                  else getattr(tokenizer, f"{k}_token_id", None)
               for k in ("bos", "eos", "pad")}
        gen = transformers.GenerationConfig(**{f"{k}_token_id": v for k, v in ids.items()})
    gen.save_pretrained(d)

def full_precision(full, config, base_model="", dequantized=False, log=print):
    """{name: full-precision tensor} for the 4-bit weights of the state dict `full` (quant.py):
    re-read from the base checkpoint base_model in their compute dtype, so that final/ merges the
    adapters into the weights an unquantized run would (and final/adapter, on that same base, is
    the same model); or their dequantized values with dequantized=True (export_dequantized), or
    where no checkpoint was loaded (pretrain='': a fresh model), which the log says."""
    import quant
    names = [k for k, v in full.items() if quant.quantized(v)]
    if not names:
        return {}
    if dequantized or not base_model:
        why = "export_dequantized=True" if dequantized else "pretrain='' (no checkpoint to re-read the base from)"
        log(f"{why}: final/ merges the adapters into the dequantized 4-bit weights of {len(names)} layers")
        return {k: quant.dequantized(full[k]) for k in names}
    return quant.read_base(base_model, config, names, full[names[0]].dtype)

def export_final(out_dir, model, fsdp, tokenizer, lora=None, base_model="", dequantized=False, log=print):
    """out_dir/final: the model in HF layout (LoRA merged) and, with lora = dict(rank, alpha,
    target_modules), the adapter in PEFT layout under final/adapter. Written to final.tmp and
    renamed. Every rank calls this; rank 0 writes. 4-bit weights (quant.py) are exported in full
    precision: base_model's own (re-read), or their dequantized values (full_precision)."""
    from lora import inject, merge, save_adapter
    from model import GPT
    full = full_state_dict(model, fsdp, trainable_only=False)
    if _rank() == 0:
        full.update(full_precision(full, model.config, base_model, dequantized, log))
        final_dir = os.path.join(out_dir, "final")
        tmp_dir = final_dir + ".tmp"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        with torch.device("meta"):
            export = GPT(model.config)
        if lora:
            inject(export, lora["rank"], lora["alpha"], 0.0, lora["target_modules"])
        export.to_empty(device="cpu")
        export.tie_weights()
        export.load_state_dict({k: v.cpu() for k, v in full.items()})
        if lora:
            save_adapter(export, os.path.join(tmp_dir, "adapter"), base_model_name_or_path=base_model)
            export = merge(export)
        try:
            export.save_pretrained(tmp_dir)
            tokenizer.save_pretrained(tmp_dir)
            hf_extras(tmp_dir, tokenizer, base_model)
            for d, _, files in os.walk(tmp_dir):
                for name in files:
                    with open(os.path.join(d, name), "rb+") as f:
                        os.fsync(f.fileno())
                fsync_dir(d)
        except (OSError, RuntimeError) as e:
            if not _no_space(e):
                raise
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise OSError(errno.ENOSPC, f"writing {tmp_dir}: no space left on device; the checkpoints in "
                          f"{out_dir}/ckpt are kept") from e
        shutil.rmtree(final_dir, ignore_errors=True)
        os.rename(tmp_dir, final_dir)
        fsync_dir(out_dir)
    _barrier()

# -----------------------------------------------------------------------------
# out_dir holds one run. A run holds out_dir/.lock while it lives (hold), and no flag takes a live
# run's lock; a new run refuses a finished or dead run's outputs there unless told to overwrite
# them; a resume refuses a config that changes what a step computes, and names the keys.

# keys a resumed run may change: they do not change what a step computes
HARMLESS = {"out_dir", "resume", "overwrite", "eval_interval", "log_interval", "save_interval", "eval_iters",
            "max_iters", "max_epochs", "keep_last", "wandb_log", "wandb_project", "wandb_run_name", "tensorboard",
            "device", "compile", "dist_timeout_s", "gradient_checkpointing", "loss_chunk_size", "selector_labels",
            "eval_gen_interval", "eval_gen_samples", "eval_gen_max_new_tokens", "reward_model",  # evaluation only
            "eps", "pareto_front", "opt_estimate_iters",  # when to stop; f* is estimated at the start only
            "dataset_num_proc", "print_config", "reschedule",  # how the same tokens are made
            "export_dequantized",  # what final/ is merged into
            "takeover_lock"}  # who may hold out_dir
# (max_iters and max_epochs set the run's length T; check_total_iters refuses a T that changes the steps taken)

def previous_run(out_dir):
    """what an earlier run left in out_dir: checkpoints, metrics lines, final model, summary."""
    metrics = os.path.join(out_dir, "metrics.jsonl")
    left = {"ckpt": latest(os.path.join(out_dir, "ckpt")) is not None,
            "final": os.path.isdir(os.path.join(out_dir, "final")),
            "metrics.jsonl": os.path.exists(metrics) and os.path.getsize(metrics) > 0,
            "summary.json": os.path.exists(os.path.join(out_dir, "summary.json"))}
    return [k for k, v in left.items() if v]

def config_changes(saved, config):
    """'key: saved -> now' for the keys that differ from the saved run's and change what a step computes."""
    now = json.loads(json.dumps(config))  # tuples as lists, as in config.json
    for k in set(saved) - set(now):  # a KEY_i set then and not now: KEY's value applies now
        if k.rpartition("_")[0] in now:
            now[k] = now[k.rpartition("_")[0]]
    import objectives
    kinds = [objectives.KINDS.get(v) for k, v in now.items() if k.startswith("obj_") and v]
    rewarded = any(k is not None and k.scored for k in kinds)  # a kind trained on reward_model's scores
    harmless = HARMLESS - {"reward_model"} if rewarded else HARMLESS
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and k not in harmless and saved[k] != now[k]]

def check_out_dir(config, log=print):
    """before anything is loaded: resume needs a checkpoint and the same step-changing keys; a new
    run needs an out_dir free of another run's outputs (or overwrite=True). Returns what to remove."""
    out_dir = config["out_dir"]
    if config["resume"]:
        ckpt_root, path = os.path.join(out_dir, "ckpt"), os.path.join(out_dir, "config.json")
        if latest(ckpt_root) is None:
            raise ConfigError(f"resume=True but {ckpt_root} holds no checkpoint")
        if not os.path.exists(path):
            log(f"warning: {path} is missing: the config cannot be compared with the checkpoint's run")
            return []
        with open(path) as f:
            changes = config_changes(json.load(f), config)
        if changes:
            raise ConfigError(f"resume=True, but the config differs from that of the run in {out_dir} in keys that "
                              f"change what a step computes: {'; '.join(changes)} (restore them, or start a new run: "
                              f"another out_dir or --overwrite=True)")
        return []
    left = previous_run(out_dir)
    if left and not config["overwrite"]:
        raise ConfigError(f"out_dir {out_dir} holds another run's {', '.join(left)}: "
                          f"pass --resume=True to continue it, or --overwrite=True to replace it")
    return left

def check_total_iters(done, before, now, at, reschedule=False, log=print):
    """a resume whose run length changed from `before` to `now` steps (max_iters, max_epochs). The
    learning rate schedule and the sequential split are laid out over it: at(j, T) is what step j
    computes in a run of T steps (its learning rate, its objective). The resume goes on when the
    `done` steps taken are the ones a run of `now` steps takes (a constant learning rate and another
    method), so it equals that run from the start; otherwise it is refused, unless reschedule=True:
    then the rest follows the new schedule, which the log says."""
    j = next((j for j in range(done) if at(j, before) != at(j, now)), None) if before != now else None
    if j is None:
        return
    def differs(j):
        (lr0, obj0), (lr1, obj1) = at(j, before), at(j, now)
        return f"step {j + 1}: " + ", ".join([f"learning rate {lr0:.4g} -> {lr1:.4g}"] * (lr0 != lr1) +
                                             [f"objective {obj0} -> {obj1}"] * (obj0 != obj1))
    if not reschedule:
        raise ConfigError(f"resume=True, but max_iters / max_epochs change the run's length from {before} to {now} "
                          f"steps, over which the learning rate schedule (lr_scheduler, warmup_ratio) and the "
                          f"sequential split are laid out: the {done} steps taken are not those of a run of {now} "
                          f"steps ({differs(j)}); restore max_iters / max_epochs (a run of {before} steps), or pass "
                          f"--reschedule=True to go on with the schedule of {now} steps from step {done + 1}")
    log(f"reschedule=True: the run's length changes from {before} to {now} steps at step {done + 1}"
        + (f" ({differs(done)})" if at(done, before) != at(done, now) else ""))

def clear(out_dir, left, log=print):
    """removes another run's outputs (overwrite=True), on rank 0: a finished or dead run's, since
    hold() has refused a live one."""
    for f in left:
        p = os.path.join(out_dir, f)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    if left:
        log(f"overwrite=True: removed the previous run's {', '.join(left)} from {out_dir}")

LOCK = ".lock"

def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True

def _holder(raw):
    """(host, pid) that a lock file's bytes name, or None when they are not one "host pid" line
    (a crash tore the write, or the file was never written)."""
    try:
        who, sep, pid = raw.decode("utf-8").strip().partition(" ")
    except UnicodeDecodeError:
        return None
    return (who, int(pid)) if who and sep and pid.isascii() and pid.isdigit() and int(pid) > 0 else None

def hold(out_dir, takeover=False, log=print):
    """rank 0 claims out_dir for the run: out_dir/.lock names "host pid" and holds an flock while the
    process lives. A live holder is never taken over: a lock whose flock is held, or (where the file
    system has no flock) whose pid lives on this host, is refused, naming its host and pid. A lock
    whose holder died is taken over: the kernel drops an flock with its holder; a lock whose bytes
    are not a "host pid" line was torn by its holder's crash. A lock from another host is refused,
    since whether that process lives cannot be told from here, unless takeover=True (the
    takeover_lock key: the user says that run has ended). Returns release(), which removes the lock
    while it is still this run's (the same file, naming this process); it also runs at exit and
    before a one-line error's exit."""
    os.makedirs(out_dir, exist_ok=True)
    path, host, me = os.path.join(out_dir, LOCK), socket.gethostname(), os.getpid()
    while True:
        f = open(path, "a+b")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        except OSError:  # no flock on this file system
            locked = None
        try:
            st, fst = os.stat(path), os.fstat(f.fileno())
            if (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev):
                break
        except FileNotFoundError:
            pass
        f.close()  # its holder removed it meanwhile: claim the next one
    f.seek(0)
    raw = f.read()
    named = _holder(raw)
    who, pid = named or ("", None)
    if locked is False or (named and who == host and locked is None and _alive(pid)):
        f.close()
        if not named:
            holder = "another process (the lock does not name it yet)"
        elif who == host and not _alive(pid):  # a process it started keeps the flock (or one taking it over)
            holder = f"another process (the lock names process {pid} on host {who}, which has ended)"
        else:
            holder = f"process {pid} on host {who}"
        raise ConfigError(f"out_dir {out_dir} is in use by {holder} ({path}): wait for that run to end, "
                          f"or use another out_dir")
    if named and who != host and not takeover:
        f.close()
        raise ConfigError(f"out_dir {out_dir} is in use by process {pid} on host {who} ({path}), whose state cannot "
                          f"be checked from host {host}: wait for that run to end, or use another out_dir; once that "
                          f"run has ended, pass --takeover_lock=True to take its lock")
    if named:
        log(f"out_dir {out_dir}: took over the lock of process {pid} on {who} "
            f"({'takeover_lock=True' if who != host else 'no longer running'})")
    elif raw.strip():
        log(f"out_dir {out_dir}: took over the unreadable lock {path} ({raw[:40]!r}: not a 'host pid' line, "
            f"torn when its run ended)")
    mine = f"{host} {me}\n".encode()
    f.seek(0)
    f.truncate()
    f.write(mine)
    f.flush()

    def release():
        if f.closed or os.getpid() != me:  # not in a forked worker
            return
        try:
            st, fst = os.stat(path), os.fstat(f.fileno())
            f.seek(0)
            if (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev) and f.read() == mine:  # still ours
                os.remove(path)
        except FileNotFoundError:
            pass
        f.close()
    atexit.register(release)
    errors.before_exit.append(release)
    return release

def read_metrics(path, log=print):
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
            if j != last:
                raise ConfigError(
                    f"{path}, line {j}: not a metrics line ({l[:60]!r}); repair or delete that line and resume again"
                )
            log(f"warning: {path}, line {j}: incomplete last line dropped (written when the previous run ended)")
            continue
        lines.append(line)
    return lines

def rewind_metrics(path, it, log=print):
    """a resumed run at iteration `it` drops the lines written after that checkpoint."""
    if os.path.exists(path):
        keep = [l for l in read_metrics(path, log) if l["iter"] < it or (l["kind"] == "train" and l["iter"] == it)]
        write_text(path, "".join(json.dumps(l) + "\n" for l in keep))

class Metrics:
    """metrics.jsonl on rank 0, one JSON object a line, plus optional wandb / tensorboard."""

    def __init__(
        self, out_dir, master, config, wandb_log=False, wandb_project="", wandb_run_name="", tensorboard=False
    ):
        self.path, self.master, self.wandb, self.tb = os.path.join(out_dir, "metrics.jsonl"), master, None, None
        if master and wandb_log:
            import wandb
            wandb.init(project=wandb_project, name=wandb_run_name or None, config=config)
            self.wandb = wandb
        if master and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def write(self, line):
        if not self.master:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        n = line["iter"]
        scalars = {
            f"{line['kind']}/{k}": v
            for k, v in line.items()
            if isinstance(v, (int, float)) and k not in ("iter", "kind")
        }
        if self.wandb:
            self.wandb.log(scalars, step=n)
        for k, v in scalars.items() if self.tb else ():
            self.tb.add_scalar(k, v, n)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
