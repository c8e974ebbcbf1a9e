"""
One training step's computation: a forward of the policy over the rows of one or more objectives,
each objective's loss from the hidden states (losses.py, through the model's head_fn), backward
over the micro-steps, clipping and the optimizer update. train.py runs it and bench.py measures
exactly this code. An objective is a namespace (see `objective`); train.py adds its data to it.
"""
import contextlib
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import losses as L
from lora import disabled
from model import needs_mask

def objective(kind, ref=None, **kw):
    """what the step needs of an objective: kind (sft | dpo | kd), the frozen reference / teacher
    (a GPT, 'self' = the policy with its LoRA adapters off, None = from ref_cache), the cached
    reference log-probs {row id: (chosen, rejected)}, and the loss options."""
    o = SimpleNamespace(kind=kind, ref=ref, ref_cache=None, beta=0.1, label_smoothing=0.0, ipo=False, nll_coef=0.0,
                        kd_loss="forward", kd_beta=0.5, kd_top_k=0, kd_temperature=1.0)
    o.__dict__.update(kw)
    return o

def pad_cat(batches, pad_id, device):
    """concatenates micro-batches (of different objectives) into one, rows right-padded to one
    length, and moves it to the device. attention_mask is None when plain causal attention is
    exact (rows right-padded, nothing packed), decided here on the CPU copy: the model would
    otherwise decide on the device, a host sync per forward."""
    T = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "labels": -100, "attention_mask": 0, "position_ids": 0}
    x = {k: torch.cat([F.pad(b[k], (0, T - b[k].shape[1]), value=v) if b[k].shape[1] < T else b[k] for b in batches])
         for k, v in fill.items()}
    if not needs_mask(x["attention_mask"]):
        x["attention_mask"] = None
    return {k: v if v is None else v.to(device, non_blocking=True) for k, v in x.items()}

class Step:
    """the step's fixed context: the (wrapped) model, the raw module (for LoRA's adapters-off
    reference), the autocast context, the head's chunk size, and the data-parallel world (its size
    and a sum over ranks) that turns local sums into this rank's share of the global-batch mean."""

    def __init__(self, model, raw_model, autocast=None, chunk_size=0, pad_id=0, device="cpu", world_size=1, all_sum=None):
        self.model, self.raw_model, self.chunk_size, self.pad_id = model, raw_model, chunk_size, pad_id
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        self.device, self.world_size = device, world_size
        self.all_sum = all_sum or (lambda x: torch.as_tensor(x, dtype=torch.float64, device=device).clone())

    def reference_hidden(self, o, x):
        """hidden states, head weight and final logit soft-cap (0: none) of o's teacher / reference
        for rows x (no grad)."""
        with torch.no_grad(), self.autocast:
            if o.ref == "self":
                with disabled(self.raw_model):
                    return self.model(x["input_ids"], x["attention_mask"], x["position_ids"],
                                      head_fn=lambda h, w, softcap=0.0: (h, w.detach().clone(), softcap))
            # a sharded (FSDP2) model frees its gathered head weight after the forward: keep a copy
            keep = (lambda w: w.detach().clone()) if hasattr(o.ref, "reshard") else (lambda w: w)
            return o.ref(x["input_ids"], x["attention_mask"], x["position_ids"], head_fn=lambda h, w, softcap=0.0: (h, keep(w), softcap))

    def ref_logps(self, o, b):
        """reference log pi(chosen), log pi(rejected), each (B,): from the cache or a no-grad forward."""
        if o.ref_cache is not None:
            c = torch.tensor([o.ref_cache[i] if i is not None else (0.0, 0.0) for i in b["ids"]], dtype=torch.float64)
            c = c.to(self.device, non_blocking=True)  # (B, 2)
            return c[:, 0], c[:, 1]
        x = pad_cat([b], self.pad_id, self.device)
        h, w, cap = self.reference_hidden(o, x)
        return L.sequence_logps(h, w, x["labels"], self.chunk_size, cap).chunk(2)

    def normalizers(self, o, micro_batches):
        """global (all ranks, all micro-batches) token / pair counts of one objective's step."""
        if o.kind == "dpo":
            B = sum(sum(i is not None for i in b["ids"]) for b in micro_batches)
            ct = sum(L.count_tokens(b["labels"][: b["labels"].shape[0] // 2]).item() for b in micro_batches)
            c = self.all_sum([B, ct])
            return {"pairs": c[0].item(), "chosen_tokens": max(c[1].item(), 1)}
        return {"tokens": max(self.all_sum(sum(L.count_tokens(b["labels"]).item() for b in micro_batches)).item(), 1)}

    def losses(self, parts):
        """One forward of the policy over all parts' rows, parts = [(objective, micro-batch, norm)].
        Each part gives (loss, stats): with norm (global counts) this rank's share of the
        global-batch mean (sum / global count * world, as DDP/FSDP average gradients over ranks);
        with norm=None (sft/kd only) the per-sample mean losses [B] that the data selector weighs."""
        x = pad_cat([b for _, b, _ in parts], self.pad_id, self.device)
        aux = []
        for o, b, norm in parts:  # everything that needs no grad, before the policy forward
            aux.append(self.reference_hidden(o, pad_cat([b], self.pad_id, self.device)) if o.kind == "kd"
                       else self.ref_logps(o, b) if o.kind == "dpo" else None)
        ws, cs = self.world_size, self.chunk_size

        def head(h, w, softcap=0.0):  # h (rows, T, C), w (V, C), the model's final logit soft-cap
            out, r = [], 0
            for (o, b, norm), a in zip(parts, aux):
                n, T = b["input_ids"].shape
                hh, yy = h[r:r + n, :T], x["labels"][r:r + n, :T]
                r += n
                if o.kind == "dpo":
                    tok = L.token_logps(hh, w, yy, cs, softcap=softcap)  # (2B, T)
                    pc, pr = tok.sum(-1).chunk(2)
                    rc, rr = (t.to(pc.dtype) for t in a)  # the cache is float64, the policy's float32 (or 64)
                    losses, cr, rr = L.dpo_loss(pc, pr, rc, rr, o.beta, o.label_smoothing, o.ipo)
                    if any(i is None for i in b["ids"]):  # eval fillers (id None) count for nothing
                        real = torch.tensor([i is not None for i in b["ids"]], device=h.device)
                        losses, cr, rr = losses * real, cr * real, rr * real
                    loss = losses.sum() / norm["pairs"] * ws
                    if o.nll_coef:
                        loss = loss - o.nll_coef * tok[: n // 2].sum() / norm["chosen_tokens"] * ws
                    st = torch.stack([(cr > rr).float().sum(), cr.sum(), rr.sum()])  # one host sync, later
                    out.append((loss, {"acc": st[0], "chosen_reward": st[1], "rejected_reward": st[2]}))
                    continue
                uniform = norm is not None  # a token mean: the head's gradient can be taken in the forward
                if o.kind == "kd":
                    th, tw, tcap = a
                    kd_stats = {} if o.kd_loss == "forward" and norm is not None else None
                    tok = L.kd_token_losses(hh, w, th[:, :T], tw, yy, o.kd_loss, o.kd_beta, o.kd_top_k,
                                            o.kd_temperature, cs, uniform, kd_stats, softcap, tcap)
                    if kd_stats is not None:  # the loss is the cross-entropy H(p_T, p_S); kd_kl = it less H(p_T)
                        kl = (tok.detach().sum() - kd_stats["teacher_entropy"]) / norm["tokens"] * ws
                        out.append((tok.sum() / norm["tokens"] * ws, {"kd_kl": kl}))
                        continue
                else:
                    tok = -L.token_logps(hh, w, yy, cs, uniform=uniform, softcap=softcap)
                out.append((L.per_sample_mean(tok, yy) if norm is None else tok.sum() / norm["tokens"] * ws, {}))
            return out

        with self.autocast:
            return self.model(x["input_ids"], x["attention_mask"], x["position_ids"], head_fn=head)

    def accumulate(self, micro_parts, weights, sync_ctx=None):
        """the micro-steps of one optimizer step: micro_parts[m] = [(objective, micro-batch, norm)],
        the same objectives in every micro-step, weights one per objective (mix: lambd_i).
        Backward of the weighted sum per micro-step; sync_ctx(last) wraps each (no gradient
        all-reduce before the last). Returns [(summed loss, summed stats)] per objective, tensors
        on the device (no host sync inside the loop)."""
        sync_ctx = sync_ctx or (lambda last: contextlib.nullcontext())
        totals = None
        for m, parts in enumerate(micro_parts):
            with sync_ctx(m == len(micro_parts) - 1):
                outs = self.losses(parts)
                sum(wt * l for wt, (l, _) in zip(weights, outs)).backward()
            outs = [(l.detach(), st) for l, st in outs]
            totals = outs if totals is None else [
                (tl + l, {k: tst[k] + v for k, v in st.items()}) for (tl, tst), (l, st) in zip(totals, outs)]
        return totals

    def train(self, objectives, micro_batches, weights, sync_ctx=None):
        """forward and backward of one optimizer step: objective j trains on micro_batches[j] (one
        micro-batch per micro-step) with weight weights[j]. Returns [(global mean loss, stats)]."""
        norms = [self.normalizers(o, mb) for o, mb in zip(objectives, micro_batches)]
        micro = [[(o, mb[m], n) for o, mb, n in zip(objectives, micro_batches, norms)] for m in range(len(micro_batches[0]))]
        return self.reduce(self.accumulate(micro, weights, sync_ctx), norms)

    @torch.no_grad()
    def evaluate(self, o, batches):
        """global mean loss (and stats) of objective o over batches, no grad, the model in eval mode."""
        was_training = self.raw_model.training
        self.raw_model.eval()
        norm, totals = self.normalizers(o, batches), None
        for b in batches:
            (l, st), = self.losses([(o, b, norm)])
            totals = (l, st) if totals is None else (totals[0] + l, {k: totals[1][k] + v for k, v in st.items()})
        self.raw_model.train(was_training)
        return self.reduce([totals], [norm])[0]

    def reduce(self, totals, norms):
        """[(loss, stats)] summed over micro-steps on this rank -> global means as floats:
        the loss mean over ranks, DPO stats per pair. One all-reduce, one host sync."""
        flat = [v for l, st in totals for v in (l, *st.values())]
        v = (self.all_sum(torch.stack([torch.as_tensor(t, dtype=torch.float64, device=self.device) for t in flat]))
             / self.world_size).tolist()
        res, j = [], 0
        for (l, st), norm in zip(totals, norms):
            per = self.world_size / norm["pairs"] if "pairs" in norm else 1.0  # dpo: sums over pairs; kd_kl: a mean already
            stats = {k: v[j + 1 + q] * per for q, k in enumerate(st)}
            res.append((v[j], stats))
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
