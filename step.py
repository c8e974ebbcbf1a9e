"""
One training step's computation: a forward of the policy over the rows of one or more objectives,
each objective's loss from the hidden states (its kind's entry in objectives.py, through the
model's head_fn), backward over the micro-steps, clipping and the optimizer update. train.py runs
it and bench.py measures exactly this code. Also the reference log-probs computed once and cached
on disk (precompute_ref).
"""
import contextlib
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import losses as L
import quant
from data import pad_cat
from lora import disabled, lora_parameters
from model import router_aux_loss
from objectives import Part

class Step:
    """the step's fixed context: the (wrapped) model, the raw module (for LoRA's adapters-off
    reference), the autocast context, the head's chunk size, and the data-parallel world (its size
    and a sum over ranks) that turns local sums into this rank's share of the global-batch mean."""

    def __init__(
        self, model, raw_model, autocast=None, chunk_size=0, pad_id=0, device="cpu", world_size=1, all_sum=None
    ):
        self.model, self.raw_model, self.chunk_size, self.pad_id = model, raw_model, chunk_size, pad_id
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        self.device, self.world_size = device, world_size
        self.all_sum = all_sum or (lambda x: torch.as_tensor(x, dtype=torch.float64, device=device).clone())

    def reference_hidden(self, o, x):
        """hidden states, head weight and final logit soft-cap (0: none) of o's teacher / reference
        for rows x (no grad)."""
        with torch.no_grad(), self.autocast:
            if o.ref_is_policy:
                with disabled(self.raw_model):
                    return self.model(x["input_ids"], x["attention_mask"], x["position_ids"],
                                      head_fn=lambda h, w, softcap=0.0: (h, w.detach().clone(), softcap))
            # a sharded (FSDP2) model frees its gathered head weight after the forward: keep a copy
            keep = (lambda w: w.detach().clone()) if hasattr(o.ref, "reshard") else (lambda w: w)
            return o.ref(
                x["input_ids"],
                x["attention_mask"],
                x["position_ids"],
                head_fn=lambda h, w, softcap=0.0: (h, keep(w), softcap),
            )

    def ref_logps(self, o, b):
        """reference log pi(chosen), log pi(rejected), each (B,): from the cache or a no-grad forward.
        A batch with mismatched rows b["kl"] (kto) gets (its rows', the mismatched rows'), kept in
        b: the step asks for them twice (z0 first, then the loss)."""
        if "ref_logps" in b:
            return b["ref_logps"]
        if o.ref_cache is not None:
            c = torch.tensor([o.ref_cache[i] if i is not None else (0.0, 0.0) for i in b["ids"]], dtype=torch.float64)
            c = c.to(self.device, non_blocking=True)  # (B, 2)
            res = c[:, 0], c[:, 1]
        else:
            x = pad_cat([b, b["kl"]] if "kl" in b else [b], self.pad_id, self.device)
            h, w, cap = self.reference_hidden(o, x)
            res = L.sequence_logps(h, w, x["labels"], self.chunk_size, cap).chunk(2)
        if "kl" in b:
            b["ref_logps"] = res
        return res

    @torch.no_grad()
    def policy_logps(self, b):
        """log pi(y|x) (B,) of the policy for the rows of b, no grad (kto's mismatched rows)."""
        x = pad_cat([b], self.pad_id, self.device)
        with self.autocast:
            return self.model(x["input_ids"], x["attention_mask"], x["position_ids"],
                              head_fn=lambda h, w, softcap=0.0: L.sequence_logps(h, w, x["labels"], self.chunk_size,
                                                                                 softcap))

    def normalizers(self, o, micro_batches):
        """global (all ranks, all micro-batches) counts of one objective's step (tokens, pairs, ...)."""
        return o.kind.count(micro_batches, self, o)

    def losses(self, parts):
        """One forward of the policy over all parts' rows, parts = [(objective, micro-batch, norm)].
        Each part gives (loss, stats): with norm (global counts) this rank's share of the
        global-batch mean (sum / global count * world, as DDP/FSDP average gradients over ranks);
        with norm=None the per-row losses [B] that the data selector weighs (kinds with per_row)."""
        x = pad_cat([b for _, b, _ in parts], self.pad_id, self.device)
        refs = []
        for o, b, norm in parts:  # everything that needs no grad, before the policy forward
            hidden = o.kind.needs == "hidden" and o.kind.uses_reference(o.cfg)  # sft: only with a kl_anchor
            refs.append(self.reference_hidden(o, pad_cat([b], self.pad_id, self.device)) if hidden
                        else self.ref_logps(o, b) if o.kind.needs == "logps" else None)

        def head(h, w, softcap=0.0):  # h (rows, T, C), w (V, C), the model's final logit soft-cap
            out, r = [], 0
            for (o, b, norm), ref in zip(parts, refs):
                n, T = b["input_ids"].shape
                out.append(o.kind.loss(Part(o, h[r:r + n, :T], w, x["labels"][r:r + n, :T], b["ids"], b, ref, norm,
                                            self.world_size, self.chunk_size, softcap)))
                r += n
            return out

        with self.autocast:
            return self.model(x["input_ids"], x["attention_mask"], x["position_ids"], head_fn=head)

    def router_aux(self, parts):
        """coef x the router load-balancing loss of the policy forward just run over parts' rows (a
        mixture of experts whose config asks for it, as transformers adds it to the training loss),
        over their real tokens (padding excluded); 0.0 otherwise. accumulate adds it per micro-step
        over their count (a mean over the step's forwards, as DDP averages over ranks); it joins no
        objective's reported loss."""
        coef = getattr(self.raw_model.config, "router_aux_coef", 0.0)
        if not coef:
            return 0.0
        T = max(b["input_ids"].shape[1] for _, b, _ in parts)
        real = torch.cat([F.pad(b["attention_mask"], (0, T - b["attention_mask"].shape[1])) for _, b, _ in parts]) > 0
        aux = router_aux_loss(self.raw_model, real.to(self.device, non_blocking=True))
        return 0.0 if aux is None else coef * aux

    def accumulate(self, micro_parts, weights=None, sync_ctx=None, loss_fn=None):
        """the micro-steps of one optimizer step: micro_parts[m] = [(objective, micro-batch, norm)],
        the same objectives in every micro-step. Backward per micro-step of loss_fn(m, outs), by
        default the weighted sum of the objectives' losses (weights one per objective; mix: lambd_i);
        sync_ctx(last) wraps each (no gradient all-reduce before the last). Returns, for the default
        loss, [(summed loss, summed stats)] per objective, tensors on the device (no host sync
        inside the loop); with a loss_fn of its own the caller keeps what it needs."""
        sync_ctx = sync_ctx or (lambda last: contextlib.nullcontext())
        totals = None
        for m, parts in enumerate(micro_parts):
            with sync_ctx(m == len(micro_parts) - 1):
                outs = self.losses(parts)
                loss = loss_fn(m, outs) if loss_fn else sum(wt * l for wt, (l, _) in zip(weights, outs))
                (loss + self.router_aux(parts) / len(micro_parts)).backward()
            if loss_fn:
                continue
            outs = [(l.detach(), st) for l, st in outs]
            totals = outs if totals is None else [
                (tl + l, {k: tst[k] + v for k, v in st.items()}) for (tl, tst), (l, st) in zip(totals, outs)]
        return totals

    def train(self, objectives, micro_batches, weights, sync_ctx=None):
        """forward and backward of one optimizer step: objective j trains on micro_batches[j] (one
        micro-batch per micro-step) with weight weights[j]. Returns [(global mean loss, stats)]. An
        online kind first makes its rows from the policy's own samples (kind.prepare, in place)."""
        for o, mb in zip(objectives, micro_batches):
            if o.kind.prepare is not None:
                o.kind.prepare(mb, self, o)
        norms = [self.normalizers(o, mb) for o, mb in zip(objectives, micro_batches)]
        micro = [
            [(o, mb[m], n) for o, mb, n in zip(objectives, micro_batches, norms)] for m in range(len(micro_batches[0]))
        ]
        t0 = time.time()
        res = self.reduce(objectives, self.accumulate(micro, weights, sync_ctx), norms)  # reduce syncs with the device
        for (_, st), n in zip(res, norms):
            if "log" in n:  # an online step's time split: generating and scoring (its count's), forward and backward
                st["update_s"] = time.time() - t0
        return res

    @torch.no_grad()
    def evaluate(self, o, batches):
        """global mean loss (and stats) of objective o over batches, no grad, the model in eval mode
        (an online kind: its own eval loss, e.g. minus the mean reward of greedy completions)."""
        if o.kind.eval_loss is not None:
            return o.kind.eval_loss(self, o, batches)
        was_training = self.raw_model.training
        self.raw_model.eval()
        norm, totals = self.normalizers(o, batches), None
        for b in batches:
            (l, st), = self.losses([(o, b, norm)])
            totals = (l, st) if totals is None else (totals[0] + l, {k: totals[1][k] + v for k, v in st.items()})
        self.raw_model.train(was_training)
        return self.reduce([o], [totals], [norm])[0]

    def reduce(self, objectives, totals, norms):
        """[(loss, stats)] summed over micro-steps on this rank -> global means as floats:
        the loss mean over ranks, stats per pair where the kind says so. One all-reduce, one host sync."""
        flat = [v for l, st in totals for v in (l, *st.values())]
        v = (self.all_sum(torch.stack([torch.as_tensor(t, dtype=torch.float64, device=self.device) for t in flat]))
             / self.world_size).tolist()
        res, j = [], 0
        for o, (l, st), norm in zip(objectives, totals, norms):
            # dpo: sums over pairs; kd_kl: a mean already
            per = self.world_size / norm[o.kind.stats_per] if o.kind.stats_per else 1.0
            stats = {k: v[j + 1 + q] * per for q, k in enumerate(st)}
            # a kind's count may add global figures (rollout stats)
            res.append((v[j], dict(stats, **norm.get("log", {}))))
            j += 1 + len(st)
        return res

def optimizer_step(optimizer, params, max_norm, lr=None):
    """sets the learning rate, clips (max_norm > 0; the norm is measured either way), steps and
    zeroes the gradients. A non-finite gradient norm skips the update, so the weights stay finite
    (the caller stops the run). Returns the norm before clipping, as a float."""
    if lr is not None:
        for g in optimizer.param_groups:
            g["lr"] = lr
    gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)  # inf: scales by 1
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)  # a DTensor under FSDP2
    if math.isfinite(gnorm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return gnorm

# -----------------------------------------------------------------------------
# reference log-probs computed once (precompute_ref) and cached on disk: the reference model is then dropped

def _gather(obj, world_size):
    if world_size == 1:
        return [obj]
    parts = [None] * world_size
    dist.all_gather_object(parts, obj)
    return parts

def reference_digest(o, raw_model, identity, world_size=1):
    """sha256 of everything o's cached log-probs depend on: the tokenized pairs (ids, tokens, prompt
    masks), the reference weights (the policy's base under LoRA) and `identity` (the keys that shape
    them: pretrain, ref_model, lora_rank, dtype, model_*)."""
    h = hashlib.sha256(json.dumps(identity).encode())
    for e in o.train + o.eval:
        h.update(repr(e["id"]).encode())
        for k in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"):
            h.update(np.asarray(e[k], dtype=np.int64).tobytes() + b"|")  # a list's or a numpy view's ids alike
    lora_names = {n for n, _ in lora_parameters(raw_model)}
    sd = raw_model.state_dict() if o.ref_is_policy else o.ref.state_dict()
    w = hashlib.sha256()
    for k, v in sd.items():
        if k not in lora_names:
            v = v.to_local() if hasattr(v, "to_local") else v  # a shard under FSDP: all ranks' digests below
            v = quant.dequantized(v.detach())  # a 4-bit weight: the values its forward multiplies
            w.update(k.encode() + v.reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    h.update("".join(_gather(w.hexdigest(), world_size)).encode())
    return h.hexdigest()

def cache_reference(step, o, out_dir, digest, batches, master=True, progress=lambda b, desc: b):
    """o.ref_cache = {row id: (log pi_ref(chosen), log pi_ref(rejected))} over `batches` (every
    rank runs the same number: a sharded policy forward is collective), read from or written to
    out_dir/ref_logps_{i}_{digest}.pt. Returns the file's path."""
    path = os.path.join(out_dir, f"ref_logps_{o.i}_{digest[:16]}.pt")
    if os.path.exists(path):
        o.ref_cache = torch.load(path, weights_only=True)
        return path
    cache = {}
    for b in progress(batches, f"reference log-probs {o.i}"):
        rc, rr = step.ref_logps(o, b)
        cache.update({i: (c, r) for i, c, r in zip(b["ids"], rc.tolist(), rr.tolist()) if i is not None})
    cache = {k: v for p in _gather(cache, step.world_size) for k, v in p.items()}
    if master:
        torch.save(cache, path + ".tmp")
        os.replace(path + ".tmp", path)
    o.ref_cache = cache
    return path
