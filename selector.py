"""
The bilevel data selector (SEAL / BiPOST, docs/algorithms.md §3): one logit per sample of the
dataset to filter, indexed by the sample's stable original row id. This file owns the logits, the
selection step (`Selection`: the step's forward, micro-batch accumulation and optimizer_step, as
every method uses them) and the selection's outputs; train.py's loop calls it like any method.

Problem: min_omega l_up(theta*(omega)) s.t. theta*(omega) in argmin_theta (1/N) sum_i w_i(omega) l_i(theta).
Penalty form: min_{theta,omega} l_up(theta) + gamma [l_ft(theta, omega) - v(omega)], v(omega) = min_theta'
l_ft(theta', omega). Dividing by 1 + gamma gives rho l_up + (1 - rho)(l_ft - v) with rho = 1/(1 + gamma),
the `upperlevel_weight`; rho shrinks every epoch (gamma grows). The memory-efficient algorithm drops
v's gradient (exact for softmax when the l_i(theta*) are equal) and the (1 - rho) factor of omega's
gradient (omega has its own Adam, invariant to the gradient's scale).

Why Adam for omega: with w = N softmax(omega), d/domega_j of (1/b) sum_{i in batch} w_i l_i is
(N s_j / b)(l_j [j in batch] - sum_{i in batch} s_i l_i). Every logit NOT in the batch therefore gets a
tiny negative gradient of the same sign (losses are positive), which Adam normalizes to about +lr per
step: unvisited logits all rise together. A visited logit gets a far larger gradient, positive unless
its loss is below sum_{i in batch} s_i l_i (~ b/N of the batch's mean loss), so Adam lowers it.
The ranking thus reflects per-visit normalized losses, not raw gradient sizes. This is the reference
behaviour (SEAL, BiPOST): keep Adam.
"""
import json
import math
import os

import torch
import torch.distributed as dist

from step import optimizer_step

ACTIVATIONS = ("softmax", "sigmoid")

def _key(i):
    # ids arrive as ints, numpy ints, 0-d tensors or "source:row" strings; ints stay ints
    return i if isinstance(i, str) else int(i)

def _write_lines_atomic(path, lines):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(tmp, path)  # a crash never leaves a half-written file under `path`

class Selector(torch.nn.Module):
    def __init__(self, ids, activation="softmax"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown selector activation {activation!r}; expected one of {ACTIVATIONS}")
        self.ids = [_key(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]
        self.index = {i: n for n, i in enumerate(self.ids)}
        if not self.ids or len(self.index) != len(self.ids):
            raise ValueError(f"selector ids must be non-empty and unique: {len(self.ids)} given, "
                             f"{len(self.index)} distinct")
        self.activation = activation
        # constant init: softmax weights all 1 (average 1), sigmoid weights all 1 in (0, 2)
        self.logits = torch.nn.Parameter(torch.zeros(len(self.ids), dtype=torch.float32))

    def positions(self, ids):
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        try:
            pos = [self.index[_key(i)] for i in ids]
        except KeyError as e:
            raise KeyError(f"id {e.args[0]!r} is not one of the selector's {len(self.ids)} ids") from None
        return torch.tensor(pos, dtype=torch.long, device=self.logits.device)

    def weights(self, ids=None):
        if self.activation == "softmax":
            w = len(self.ids) * torch.softmax(self.logits, dim=0)  # (N,) the full softmax, then indexed
        else:
            w = 2 * torch.sigmoid(self.logits)
        return w if ids is None else w[self.positions(ids)]

    def make_optimizer(self, lr):
        return torch.optim.Adam([self.logits], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    def step(self, optimizer, max_norm=10.0):
        """average the logits' grad over data-parallel ranks, clip, step, zero. Returns the grad norm."""
        if self.logits.grad is None:  # every rank must join the all_reduce, even one without a backward
            self.logits.grad = torch.zeros_like(self.logits)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.logits.grad)
            self.logits.grad.div_(dist.get_world_size())
        norm = torch.nn.utils.clip_grad_norm_([self.logits], max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def save_jsonl(self, path):
        with torch.no_grad():
            logits, weights = self.logits.float().cpu().tolist(), self.weights().float().cpu().tolist()
        _write_lines_atomic(path, (json.dumps({"id": i, "logit": l, "weight": w})
                                   for i, l, w in zip(self.ids, logits, weights)))

    def ranked_ids(self):
        logits = self.logits.detach().cpu().tolist()
        return [self.ids[n] for n in sorted(range(len(logits)), key=lambda n: -logits[n])]  # stable

# -----------------------------------------------------------------------------
# the selection's state: the logits and their Adam, and for the penalty algorithm theta-hat (the
# trainable parameters' auxiliary values) with its own AdamW over the same parameters

def make(ids, activation, lr, algorithm, params, aux_lr, betas, device):
    """(selector, its optimizer, theta-hat or None, theta-hat's optimizer or None)."""
    if algorithm not in ("memory", "penalty"):
        raise ValueError(f"config key selector_algorithm: {algorithm!r} is not memory or penalty")
    selector = Selector(ids, activation).to(device)
    aux = aux_opt = None
    if algorithm == "penalty":
        aux = [p.detach().clone() for p in params]  # theta-hat starts at theta
        aux_opt = torch.optim.AdamW(params, lr=aux_lr, betas=betas, weight_decay=0.0)  # its own moments
    return selector, selector.make_optimizer(lr), aux, aux_opt

def state_dict(selector, selector_opt, aux=None, aux_opt=None):
    """what a checkpoint keeps of the selection."""
    st = {"selector": selector.state_dict(), "selector_opt": selector_opt.state_dict()}
    if aux is not None:
        st.update(aux=[q.detach().cpu() for q in aux], aux_opt=aux_opt.state_dict())
    return st

def load_state_dict(st, selector, selector_opt, aux=None, aux_opt=None):
    selector.load_state_dict(st["selector"])
    selector_opt.load_state_dict(st["selector_opt"])
    if aux is not None:
        aux_opt.load_state_dict(st["aux_opt"])
        with torch.no_grad():
            for q, s in zip(aux, st["aux"]):
                q.copy_(s)

# -----------------------------------------------------------------------------
# the omega/theta losses of one micro-batch; the caller does (L_theta + L_omega).backward()

def memory_efficient_losses(selector, ids, sample_losses, up_loss, rho, num_samples=None):
    """L_theta = rho up_loss + (1 - rho) sum_i w_i.detach() l_i / num_samples (grad to theta only),
    L_omega = sum_i w_i l_i.detach() / num_samples (grad to omega only). sample_losses: (b,) per-sample
    losses of `ids`; up_loss: scalar, already normalized; num_samples: None = len(ids)."""
    n = len(ids) if num_samples is None else num_samples
    w = selector.weights(ids).to(sample_losses.device)  # (b,)
    l = sample_losses.float()
    loss_theta = rho * up_loss + (1 - rho) * (w.detach() * l).sum() / n
    loss_omega = (w * l.detach()).sum() / n
    return loss_theta, loss_omega

def penalty_omega_loss(selector, ids, losses_theta, losses_aux, num_samples=None):
    """full penalty algorithm: omega moves along sum_i grad w_i(omega) [l_i(theta) - l_i(theta_hat)] / n,
    theta_hat being the auxiliary model that tracks theta*(omega). Gradient to omega only."""
    n = len(ids) if num_samples is None else num_samples
    w = selector.weights(ids).to(losses_theta.device)
    return (w * (losses_theta.float() - losses_aux.float()).detach()).sum() / n

def decayed_weight(upperlevel_weight, decay, epoch):
    """rho at `epoch`: the initial value at epoch 0, minus `decay` at the start of every epoch >= 1."""
    return min(1.0, max(0.0, upperlevel_weight - decay * max(0, epoch)))

# -----------------------------------------------------------------------------
# output

def export_selected(rows, selector, ratio, path):
    """write the top round(ratio * N) rows (at least 1) by logit, original fields, original order."""
    if not 0 < ratio <= 1:
        raise ValueError(f"select ratio must be in (0, 1], got {ratio}")
    k = max(1, round(ratio * len(selector.ids)))
    kept = set(selector.ranked_ids()[:k])
    out = [{f: v for f, v in row.items() if f != "_id"} for row in rows if row["_id"] in kept]
    _write_lines_atomic(path, (json.dumps(r, ensure_ascii=False) for r in out))
    return len(out)

def summary(selector, png_path=None, labels=None, bins=10):
    """readable text on the weights (and on clean vs corrupted rows when labels = {id: corrupted})."""
    w = selector.weights().detach().float().cpu()
    lo, hi = w.min().item(), w.max().item()
    lines = [f"selector: {len(w)} samples, {selector.activation} weights",
             f"weight min {lo:.4f} mean {w.mean().item():.4f} max {hi:.4f}"]
    width = (hi - lo) / bins  # 0 at init: every sample lands in the first bin
    counts = torch.bincount(((w - lo) / max(width, 1e-30)).long().clamp(0, bins - 1), minlength=bins).tolist()
    for b, c in enumerate(counts):
        bar = "#" * (max(1, round(40 * c / max(counts))) if c else 0)
        lines.append(f"  {lo + b * width:9.4f} .. {lo + (b + 1) * width:9.4f} {c:8d} {bar}")
    weight = dict(zip(selector.ids, w.tolist()))
    if labels is not None:
        known = [i for i in selector.ranked_ids() if i in labels]  # highest logit first
        clean = [i for i in known if not labels[i]]
        for p in (0.7, 0.8):
            top = known[:max(1, round(p * len(known)))]
            n_clean = sum(not labels[i] for i in top)
            lines.append(f"clean fraction in kept top {round(100 * p)}%: {n_clean / max(1, len(top)):.4f} "
                         f"({n_clean}/{len(top)}; all rows {len(clean) / max(1, len(known)):.4f})")
        mean = {flag: sum(weight[i] for i in xs) / len(xs) if xs else float("nan")
                for flag, xs in ((False, clean), (True, [i for i in known if labels[i]]))}
        lines.append(f"mean weight: clean {mean[False]:.4f}, corrupted {mean[True]:.4f}")
    if png_path:
        try:
            from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
            fig = Figure(figsize=(6, 4))
            ax = fig.add_subplot()
            edges = [lo + b * width for b in range(bins + 1)] if width > 0 else bins
            for name, flag in ({"all": None} if labels is None else {"clean": False, "corrupted": True}).items():
                xs = [weight[i] for i in selector.ids if flag is None or labels.get(i) == flag]
                ax.hist(xs, bins=edges, alpha=0.6, label=name)
            ax.set(xlabel="weight", ylabel="samples")
            ax.legend()
            fig.savefig(png_path)
        except ImportError:
            pass
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# method=select: one step of the selection and what it writes

class Selection:
    """the selection's state and step. up: the trusted objective (dataset_1), ft: the one whose rows
    get weights (dataset_2); step: train.py's Step; params: the trainable parameters; c: the config
    (selector_* keys, aux_*, upperlevel_*, select_ratio, max_norm, out_dir)."""

    def __init__(self, c, up, ft, step, params, device, all_sum, sync_ctx, log=print, master=True):
        self.c, self.up, self.ft, self.step, self.params = c, up, ft, step, params
        self.all_sum, self.sync_ctx, self.log, self.master = all_sum, sync_ctx, log, master
        self.selector, self.opt, self.aux, self.aux_opt = make(
            [e["id"] for e in ft.train], c["selector_activation"], c["selector_learning_rate"], c["selector_algorithm"],
            params, c["aux_learning_rate"], c["adam_betas"], device)
        self.epoch = 0              # epochs of dataset_2 done: selector_epoch{e}.jsonl written

    def state_dict(self):
        return dict(state_dict(self.selector, self.opt, self.aux, self.aux_opt), sel_epoch=self.epoch)

    def load_state_dict(self, st):
        load_state_dict(st, self.selector, self.opt, self.aux, self.aux_opt)
        self.epoch = st.get("sel_epoch", 0)

    def _swap_aux(self):
        """exchanges the trainable parameters' values with theta-hat's (penalty algorithm): the same
        modules then compute l_i(theta-hat); under LoRA theta-hat is a second adapter, cheap in memory."""
        with torch.no_grad():
            for p, q in zip(self.params, self.aux):
                tmp = p.detach().clone()
                p.copy_(q)
                q.copy_(tmp)

    def _aux_steps(self, ft, n_ft):
        """theta-hat <- theta-hat - Adam(grad of the selector-weighted noisy loss), aux_steps times, through
        the step's accumulation and optimizer_step; returns the per-sample losses l_i(theta-hat) of each
        micro-batch from the first of these steps (before its update)."""
        ws, seen = self.step.world_size, None
        self._swap_aux()
        for _ in range(self.c["aux_steps"]):
            losses = []
            def loss_fn(m, outs):
                (l_hat, _), = outs
                losses.append(l_hat.detach())
                w = self.selector.weights(ft[m]["ids"]).detach().to(l_hat.dtype)
                return (w * l_hat).sum() / n_ft * ws
            self.step.accumulate([[(self.ft, b, None)] for b in ft], sync_ctx=self.sync_ctx, loss_fn=loss_fn)
            gnorm = optimizer_step(self.aux_opt, self.params, self.c["max_norm"])
            if not math.isfinite(gnorm):
                raise RuntimeError(f"non-finite gradient norm {gnorm} in theta-hat's step "
                                   f"(selector_algorithm=penalty); its update was skipped")
            seen = seen or losses
        self._swap_aux()
        return seen

    def train(self):
        """one selection step's forward and backward (theta's update is the loop's optimizer_step).
        memory: one forward gives the trusted set's loss and the noisy set's per-sample losses; theta
        and the selector logits both update from it. penalty: theta-hat takes aux_steps on the weighted
        noisy loss first, and the logits follow sum_i grad w_i [l_i(theta) - l_i(theta-hat)] instead.
        Returns ({1: (loss, stats)}, global token count), as Step.train's caller does."""
        ws, sel = self.step.world_size, self.selector
        rho = decayed_weight(self.c["upperlevel_weight"], self.c["upperlevel_weight_decay"], self.ft.loader.epoch)
        up, ft = self.up.loader.next_step(), self.ft.loader.next_step()
        n_up = self.all_sum(sum(len(b["ids"]) for b in up)).item()
        n_ft = self.all_sum(sum(len(b["ids"]) for b in ft)).item()
        hat = self._aux_steps(ft, n_ft) if self.c["selector_algorithm"] == "penalty" else None
        total = 0.0
        def loss_fn(m, outs):
            nonlocal total
            (l_up, _), (l_vec, _) = outs
            up_loss = l_up.sum() / n_up * ws
            loss_theta, loss_omega = memory_efficient_losses(sel, ft[m]["ids"], l_vec, up_loss, rho, n_ft / ws)
            if hat is not None:
                loss_omega = penalty_omega_loss(sel, ft[m]["ids"], l_vec, hat[m], n_ft / ws)
            total += loss_theta.item()
            return loss_theta + loss_omega
        self.step.accumulate([[(self.up, a, None), (self.ft, b, None)] for a, b in zip(up, ft)],
                             sync_ctx=self.sync_ctx, loss_fn=loss_fn)
        tokens = sum(int((a["attention_mask"] > 0).sum() + (b["attention_mask"] > 0).sum()) for a, b in zip(up, ft))
        sel.step(self.opt)
        return {1: (self.all_sum(total).item() / ws, {"rho": rho})}, int(self.all_sum(tokens).item())

    def after_step(self):
        """selector.jsonl (and selector_epoch{e}.jsonl) when an epoch of dataset_2 has ended."""
        if self.ft.loader.epoch != self.epoch:
            self.epoch = self.ft.loader.epoch
            self.save(self.epoch)

    def save(self, epoch=None, final=False):
        """selector.jsonl: the latest weights; selector_epoch{e}.jsonl: those after e epochs of dataset_2;
        final: selected.jsonl, the kept rows, and the summary."""
        if not self.master:
            return
        out_dir = self.c["out_dir"]
        self.selector.save_jsonl(os.path.join(out_dir, "selector.jsonl"))
        if epoch is not None:
            self.selector.save_jsonl(os.path.join(out_dir, f"selector_epoch{epoch}.jsonl"))
        if final:
            rows = self.ft.rows
            n = export_selected(rows, self.selector, self.c["select_ratio"], os.path.join(out_dir, "selected.jsonl"))
            self.log(f"selected {n} of {len(rows)} rows of {self.ft.cfg.dataset} -> {out_dir}/selected.jsonl")
            labels = {}
            if self.c["selector_labels"]:
                with open(self.c["selector_labels"]) as f:
                    labels = {r["id"]: r["corrupted"] for r in map(json.loads, f) if r}
            self.log(summary(self.selector, os.path.join(out_dir, "selector_weights.png"), labels or None))
