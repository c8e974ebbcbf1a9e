"""
The objective kinds, one table (docs/algorithms.md §1). Each entry says everything the rest of the
code needs of a kind: how its rows are tokenized and collated, what it needs of a reference /
teacher, its loss from the policy's hidden states, its per-objective config keys with defaults,
how its global batch is counted, how evalgen judges it and which row key holds a prompt for
generate.py. train.py, step.py, evalgen.py, generate.py and bench.py read the table; nothing
else dispatches on a kind's name.

Adding a kind: a loss function in losses.py, one `Kind(...)` in KINDS, and its tests.

An objective (`Objective`) is one numbered objective of a run: its kind, its resolved keys, its
data and loaders, and its reference (a frozen model, the policy with its LoRA adapters off, or
cached log-probs).
"""
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch

import data as D
import losses as L
import rollout as R
from configurator import Key
from errors import ConfigError

# -----------------------------------------------------------------------------
# the keys every objective has: KEY is every objective's default, KEY_i sets objective i's alone

COMMON_KEYS = dict(
    dataset="",                 # hub id, file, folder, or comma-separated blend (dataset_i must be set)
    dataset_probs="",
    train_split="train",
    eval_split="",              # a split name, or a separate file/folder; '' = a held-out slice of eval_frac
    input_key="input",          # sft / kd rows
    output_key="output",
    prompt_key="prompt",        # pairwise rows
    chosen_key="chosen",
    rejected_key="rejected",
    # a numeric column: each training row's loss times its weight, over the weighted count (eval: unweighted)
    weight_key="",
    input_template="User: {}\nAssistant: ",
    apply_chat_template=False,
    max_len=Key(512, ">= 1"),
    max_samples=Key(0, ">= 0; 0 = all"),
    eval_max_samples=Key(1000, ">= 0; 0 = no cap", "cap on the eval rows (the held-out slice or eval_split)"),
    obj_opt=Key(None, "finite; none = estimate it", "f_i* for maxright / constrained and the metrics (None = estimate "
                "it with a short run of objective i alone)"),
    ref_model="",               # reference / teacher ('' = the initial policy; the base model under LoRA)
    quantize="",                # '' | nf4: frozen weights in 4 bits (quant.py): LoRA's base, every reference / teacher;
                                # quantize_i: objective i's own reference / teacher (ref_model_i, or the initial policy)
)

# -----------------------------------------------------------------------------
# the table's record

@dataclass(frozen=True)
class Kind:
    name: str
    doc: str
    keys: dict                  # its per-objective keys: {name: default, or a configurator.Key with its rule}
    tokenize: Callable          # (rows, source, keys, common tokenize kwargs) -> examples
    collate: Callable           # (examples, pad_id, keys, packing) -> batch
    # (micro-batches, step, objective) -> global counts the loss divides by (all ranks, all micro-steps)
    count: Callable
    loss: Callable              # (Part) -> (loss, stats); Part.norm None: per-row losses [B]
    reference: str = "none"     # none | initial (default: the initial policy) | required (a teacher must be named)
    needs: str = ""             # what the step computes of the reference first: "" | "logps" (cacheable) | "hidden"
    per_row: bool = False       # its loss can be given per row (the data selector weighs rows)
    # (keys) -> its backward recomputes the head's logits (no closed form in the forward)
    recomputes_head: Callable = lambda c: True
    stats_per: str = ""         # the count its summed stats are divided by ("pairs"), '' = stats are means already
    prompt_key: str = "input_key"  # the key naming a row's prompt (generate.py --objective)
    # evalgen: (policy, ref, tokenizer, examples, max_new_tokens, keys, rm) -> (metrics, gens)
    evaluate: Optional[Callable] = None
    check: Callable = lambda i, c: None  # its keys' checks, before anything is loaded: raise ConfigError
    # online kinds: (micro-batches, step, objective) -> the step's rows, made by the policy (rollout.py)
    prepare: Optional[Callable] = None
    eval_loss: Optional[Callable] = None  # (step, objective, batches) -> (loss, stats) instead of the loss on eval rows
    # training rows one example gives (grpo: num_generations completions of a prompt)
    rows_per_example: Callable = lambda c: 1
    # (keys) -> this objective needs its reference (grpo with grpo_beta 0: none loaded)
    uses_reference: Callable = lambda c: True
    # the least eval loss it can give (None: unbounded, grpo's minus a reward); obj_opt >= it
    min_loss: Optional[float] = 0.0
    scored: bool = False        # it trains on rewards (reward_fn / reward_model): an online objective's Rewards

@dataclass
class Part:
    """one objective's rows in a step's forward, as its loss sees them."""
    o: "Objective"
    hidden: torch.Tensor        # (rows, T, C) policy hidden states
    weight: torch.Tensor        # (V, C) output head
    labels: torch.Tensor        # (rows, T), shifted, -100 where no loss
    ids: list                   # row / pair ids (None: an eval filler that counts for nothing)
    batch: dict                 # the micro-batch on the device: its "weights" (weight_key), "desirable" (kto), ...
    ref: Any                    # what the reference gave (kind.needs), or None
    norm: Optional[dict]        # global counts (kind.count), or None for per-row losses
    world_size: int
    chunk_size: int
    softcap: float

@dataclass(eq=False)
class Objective:
    """objective i of a run. ref: a frozen reference / teacher model; ref_is_policy: the policy with
    its LoRA adapters off is the reference; ref_cache: {row id: (chosen, rejected)} log-probs that
    replace the reference model (precompute_ref)."""
    i: int
    kind: Kind
    cfg: SimpleNamespace
    train: list = field(default_factory=list)
    eval: list = field(default_factory=list)
    rows: Any = None            # the raw training rows (the selector exports them)
    collate: Optional[Callable] = None
    loader: Any = None
    probe: Any = None           # a second loader over train: the fresh batches that re-evaluate a gap
    ref: Optional[torch.nn.Module] = None
    ref_is_policy: bool = False
    ref_cache: Optional[dict] = None
    opt: float = -1.0
    online: Any = None          # rollout.Online: the sampling counter, tokenizer, rewards of an online objective

    def next_step(self):
        """this rank's micro-batches of the objective's next step."""
        return self.online.next_step(self) if self.online is not None else self.loader.next_step()

    def has_reference(self):
        return self.ref is not None or self.ref_is_policy

# -----------------------------------------------------------------------------
# tokenizing, collating, counting

def _tokenize_pairs(rows, source, c, common):
    return D.tokenize_dpo(rows, prompt_key=c.prompt_key, chosen_key=c.chosen_key, rejected_key=c.rejected_key,
                          source=source, weight_key=c.weight_key, **common)

def _tokenize_sequences(rows, source, c, common):
    return D.tokenize_sft(rows, input_key=c.input_key, output_key=c.output_key, source=source, weight_key=c.weight_key,
                          **common)

def _tokenize_kto(rows, source, c, common):
    return D.tokenize_kto(rows, prompt_key=c.prompt_key, completion_key=c.completion_key, label_key=c.label_key,
                          chosen_key=c.chosen_key, rejected_key=c.rejected_key, source=source, weight_key=c.weight_key,
                          **common)

def _collate_pairs(examples, pad_id, c, packing):
    return D.collate_dpo(examples, pad_id)

def _collate_sequences(examples, pad_id, c, packing):
    return D.collate_sft(examples, pad_id, packing=packing, max_len=c.max_len)

def _collate_kto(examples, pad_id, c, packing):
    return D.collate_kto(examples, pad_id)

def _real(b):
    return torch.tensor([i is not None for i in b["ids"]], dtype=torch.float64)

def _count_tokens(micro_batches, step, o):
    if any("weights" in b for b in micro_batches):  # weighted: each labelled token counts its row's weight
        n = sum(float((b["weights"] * (b["labels"] != L.IGNORE_INDEX)).sum()) if "weights" in b else
                L.count_tokens(b["labels"]).item() for b in micro_batches)
        return {"tokens": max(step.all_sum(n).item(), 1e-12)}
    return {"tokens": max(step.all_sum(sum(L.count_tokens(b["labels"]).item() for b in micro_batches)).item(), 1)}

def _count_pairs(micro_batches, step, o):
    if any("weights" in b for b in micro_batches):
        w = lambda b: b["weights"] if "weights" in b else torch.ones(len(b["ids"]), dtype=torch.float64)
        B = sum(float((w(b) * _real(b)).sum()) for b in micro_batches)
        ct = sum(float((w(b) * (b["labels"][: b["labels"].shape[0] // 2] != L.IGNORE_INDEX).sum(-1)).sum())
                 for b in micro_batches)
        c = step.all_sum([B, ct])
        return {"pairs": max(c[0].item(), 1e-12), "chosen_tokens": max(c[1].item(), 1e-12)}
    B = sum(sum(i is not None for i in b["ids"]) for b in micro_batches)
    ct = sum(L.count_tokens(b["labels"][: b["labels"].shape[0] // 2]).item() for b in micro_batches)
    c = step.all_sum([B, ct])
    return {"pairs": c[0].item(), "chosen_tokens": max(c[1].item(), 1)}

def _count_kto(micro_batches, step, o):
    """the global (weighted) row count, and KTO's reference point z0 = max(0, mean r of the
    mismatched rows): their policy log-probs from a no-grad forward, their reference log-probs
    as the rows' (a model, or the cache), all micro-batches of the step and all ranks."""
    rows, r_sum, r_n = 0.0, 0.0, 0.0
    for b in micro_batches:
        real = _real(b)
        rows += float(((b["weights"] if "weights" in b else 1.0) * real).sum())
        kl_policy = step.policy_logps(b["kl"]).double().cpu()
        kl_ref = step.ref_logps(o, b)[1].double().cpu()
        r_sum += float(((kl_policy - kl_ref) * real).sum())
        r_n += float(real.sum())
    c = step.all_sum([rows, r_sum, r_n])
    return {"rows": max(c[0].item(), 1e-12), "z0": L.kto_reference_point(c[1].item(), c[2].item())}

# -----------------------------------------------------------------------------
# losses from hidden states (losses.py does the arithmetic)

def _weights(p, like):
    """the part's row weights on the device in like's dtype ([rows, T] per token for sequences,
    [B] per pair / row), or None without weight_key."""
    w = p.batch.get("weights")
    if w is None:
        return None
    w = w.to(like.device, like.dtype)
    return w[:, : like.shape[1]] if w.dim() == 2 else w

def _token_mean(p, tok):
    """a token-level loss [rows, T]: this rank's share of the global token mean, or per-row means."""
    w = _weights(p, tok)
    if w is not None:
        tok = tok * w
    if p.norm is None:
        return L.per_sample_mean(tok, p.labels), {}
    return tok.sum() / p.norm["tokens"] * p.world_size, {}

def sft_part(p):
    """SFT's token mean of -log p (sft_loss=dft: each term times its detached p), plus kl_anchor x
    the KL to the reference at each target position (p.ref: its hidden states, head, soft-cap); with
    either option on, the stats are the plain NLL and the KL (anchor_kl), means over the same tokens."""
    c = p.o.cfg
    dft, beta = c.sft_loss == "dft", c.kl_anchor
    uniform = p.norm is not None and "weights" not in p.batch  # every token alike: the head's gradient in the forward
    logp = L.token_logps(p.hidden, p.weight, p.labels, p.chunk_size, uniform=uniform and not dft, softcap=p.softcap)
    tok = L.dft_token_losses(logp) if dft else -logp
    if not dft and beta == 0:
        return _token_mean(p, tok)
    stats = {"nll": -logp.detach()}
    if beta > 0:
        rh, rw, rcap = p.ref
        kl = L.kl_anchor_token_losses(p.hidden, p.weight, rh[:, : p.hidden.shape[1]], rw, p.labels, p.chunk_size,
                                      uniform, p.softcap, rcap)
        tok, stats["anchor_kl"] = tok + beta * kl, kl.detach()
    loss, _ = _token_mean(p, tok)
    return loss, ({} if p.norm is None else {k: _token_mean(p, v)[0] for k, v in stats.items()})

def dpo_part(p):
    c, n = p.o.cfg, p.hidden.shape[0]
    tok = L.token_logps(p.hidden, p.weight, p.labels, p.chunk_size, softcap=p.softcap)  # (2B, T)
    pc, pr = tok.sum(-1).chunk(2)
    rc, rr = (t.to(pc.dtype) for t in p.ref)  # the cache is float64, the policy's float32 (or 64)
    losses, cr, rr = L.dpo_loss(pc, pr, rc, rr, c.dpo_beta, c.dpo_label_smoothing, c.dpo_ipo)
    if p.norm is None:  # per pair (the data selector weighs them): the DPO loss (+ the chosen answer's token-mean NLL)
        nll = -L.per_sample_mean(tok[: n // 2], p.labels[: n // 2]) if c.dpo_nll_loss_coef else 0.0
        return _pair_losses(p, losses + c.dpo_nll_loss_coef * nll, [])[0], {}
    loss, st = _pair_losses(p, losses, [(cr > rr).float(), cr, rr])
    if c.dpo_nll_loss_coef:
        loss = loss - c.dpo_nll_loss_coef * _chosen_sum(p, tok) / p.norm["chosen_tokens"] * p.world_size
    return loss, {"acc": st[0], "chosen_reward": st[1], "rejected_reward": st[2]}

def _chosen_sum(p, tok):
    """the chosen answers' token log-probs summed (each pair's times its weight): an NLL term's numerator."""
    w, chosen = _weights(p, tok), tok[: p.hidden.shape[0] // 2]
    return chosen.sum() if w is None else (w[:, None] * chosen).sum()

def _mean_logps(p):
    """(token log-probs (2B, T), the chosen and the rejected answers' mean token log-probs (B,))."""
    tok = L.token_logps(p.hidden, p.weight, p.labels, p.chunk_size, softcap=p.softcap)
    mean = tok.sum(-1) / (p.labels != L.IGNORE_INDEX).sum(-1).clamp(min=1)
    return (tok, *mean.chunk(2))

def _pair_losses(p, losses, stats):
    """per-pair losses -> this rank's share of the global pair mean, eval fillers (id None) masked;
    or the per-pair losses themselves (norm None); stats summed over the real pairs."""
    real = torch.tensor([i is not None for i in p.ids], device=p.hidden.device, dtype=losses.dtype)
    w = _weights(p, losses)
    real = real if w is None else real * w  # weighted: each pair's loss and stats times its weight
    if w is not None or any(i is None for i in p.ids):
        losses, stats = losses * real, [s * real for s in stats]
    if p.norm is None:
        return losses, None
    count = p.norm["pairs"] if "pairs" in p.norm else p.norm["rows"]
    # one host sync, later
    return losses.sum() / count * p.world_size, torch.stack([s.sum() for s in stats]) if stats else None

def simpo_part(p):
    c = p.o.cfg
    _, a, b = _mean_logps(p)
    losses, cr, rr = L.simpo_loss(a, b, c.dpo_beta, c.simpo_gamma, c.dpo_label_smoothing)
    loss, st = _pair_losses(p, losses, [(cr > rr).float(), cr, rr])
    return (loss, {}) if st is None else (loss, {"acc": st[0], "chosen_reward": st[1], "rejected_reward": st[2]})

def orpo_part(p):
    c = p.o.cfg
    tok, a, b = _mean_logps(p)
    ratio_losses, ratio = L.orpo_ratio_loss(a, b)
    if p.norm is None:  # per pair: the chosen answer's token-mean NLL + lambda x the odds-ratio term
        return _pair_losses(p, -a + c.orpo_lambda * ratio_losses, [])[0], {}
    loss, st = _pair_losses(p, c.orpo_lambda * ratio_losses, [(ratio > 0).float(), ratio])
    # the SFT term: a token mean over the chosen answers
    nll = -_chosen_sum(p, tok) / p.norm["chosen_tokens"] * p.world_size
    return nll + loss, {"acc": st[0], "log_odds_ratio": st[1]}

def kto_part(p):
    c = p.o.cfg
    r = L.sequence_logps(p.hidden, p.weight, p.labels, p.chunk_size, p.softcap)
    r = r - p.ref[0].to(r.dtype)  # the reference's log-probs of the rows (a model or the cache)
    desirable = p.batch["desirable"].to(r.device)
    z0 = p.norm["z0"] if p.norm is not None else 0.0
    losses = L.kto_loss(r, desirable, z0, c.dpo_beta, c.kto_desirable_weight, c.kto_undesirable_weight)
    right = ((r > 0) == desirable).to(r.dtype)  # the sign of r agrees with the label
    loss, st = _pair_losses(p, losses, [right, r.detach()])
    if st is None:
        return loss, {}
    n_real = sum(i is not None for i in p.ids) if "weights" not in p.batch else float(_weights(p, r).sum())
    return loss, {"acc": st[0], "reward": st[1], "z0": r.new_tensor(z0 * n_real)}

def kd_part(p):
    c, (th, tw, tcap) = p.o.cfg, p.ref
    T = p.hidden.shape[1]
    weighted = "weights" in p.batch
    stats = {} if c.kd_loss == "forward" and p.norm is not None and not weighted else None
    tok = L.kd_token_losses(p.hidden, p.weight, th[:, :T], tw, p.labels, c.kd_loss, c.kd_beta, c.kd_top_k,
                            c.kd_temperature, p.chunk_size, p.norm is not None and not weighted, stats, p.softcap, tcap)
    if stats is not None:  # the loss is the cross-entropy H(p_T, p_S); kd_kl = it less H(p_T)
        kl = (tok.detach().sum() - stats["teacher_entropy"]) / p.norm["tokens"] * p.world_size
        return tok.sum() / p.norm["tokens"] * p.world_size, {"kd_kl": kl}
    return _token_mean(p, tok)

def grpo_part(p):
    """GRPO's clipped policy-gradient loss over the completion tokens, plus grpo_beta x the k3 KL to the
    reference, aggregated as grpo_loss says: token (a token mean over the global batch, p.norm["tokens"]),
    sequence (each completion's token mean, then a mean over the global batch's completions) or constant
    (the token sum over completions x max_new_tokens); norm None: per-row means. Stats are token means:
    the KL, the clipped shares (low, high, either) and the entropy of the sampled tokens' distributions."""
    c = p.o.cfg
    ent = [] if p.norm is not None else None
    tok = L.token_logps(p.hidden, p.weight, p.labels, p.chunk_size, softcap=p.softcap, entropy=ent)
    mask = p.labels != L.IGNORE_INDEX
    dev = lambda k: p.batch[k].to(tok.device)[:, : tok.shape[1]] if k in p.batch else None
    old = dev("old_logps")
    losses, (kl, low, high) = L.grpo_token_losses(
        tok, tok.detach() if old is None else old, dev("ref_token_logps"), p.batch["advantages"].to(tok.device), mask,
        c.grpo_epsilon, c.grpo_beta, epsilon_high(c), c.importance_sampling)
    if p.norm is None:
        return L.per_sample_mean(losses, p.labels), {}
    scale = p.world_size / p.norm["tokens"]
    if c.grpo_loss == "sequence":
        loss = (losses.sum(-1) / mask.sum(-1).clamp(min=1)).sum() * p.world_size / p.norm["completions"]
    elif c.grpo_loss == "constant":
        loss = losses.sum() * p.world_size / (p.norm["completions"] * c.max_new_tokens)
    else:
        loss = losses.sum() * scale
    share = lambda m: m.sum().to(tok.dtype) * scale
    return loss, {"kl": kl.detach().sum() * scale, "clip_frac": share(low | high), "clip_low_frac": share(low),
                  "clip_high_frac": share(high), "entropy": ent[0].sum() * scale}

def epsilon_high(c):
    """the upper clip bound's epsilon: grpo_epsilon_high, or grpo_epsilon when it is -1."""
    return c.grpo_epsilon if c.grpo_epsilon_high == -1 else c.grpo_epsilon_high

# -----------------------------------------------------------------------------
# per-kind checks of the config keys

def _check(cond, msg):
    if not cond:
        raise ConfigError(msg)

def _check_kd(i, c):
    if c.kd_on_policy:
        _check_online(i, c)
        _check(not c.weight_key, f"config keys kd_on_policy_{i}=True and weight_key_{i}: on-policy rows are the "
               f"student's own samples, which carry no row weights")
    _check(c.kd_top_k == 0 or c.kd_loss == "forward",
           f"config key kd_top_k_{i}={c.kd_top_k} needs kd_loss_{i}=forward, got {c.kd_loss!r}")
    _check(c.kd_loss != "jsd" or 0 < c.kd_beta < 1, f"config key kd_beta_{i} (or kd_beta): jsd needs 0 < kd_beta < 1, "
           f"got {c.kd_beta}")

def _check_online(i, c):
    _check(c.max_new_tokens < c.max_len,
           f"config key max_new_tokens_{i}={c.max_new_tokens} leaves no room for a prompt in max_len_{i}={c.max_len}")

def _check_grpo(i, c):
    _check_online(i, c)
    _check(c.temperature > 0, f"config key temperature_{i} (or temperature) must be > 0 for grpo: greedy completions "
           f"of a prompt are all alike, so every advantage is 0")
    _check(c.advantage == "grpo" or c.scale_rewards != "batch", f"config key scale_rewards_{i}=batch divides grpo's "
           f"advantages by the batch's reward std; advantage_{i}=rloo divides by none (use scale_rewards_{i}=group "
           f"or none)")
    import rewards  # the functions are found now, before anything is loaded
    specs = rewards.names(c.reward_fn)
    _check(bool(specs or c.reward_model), f"objective {i} is grpo: set reward_fn_{i} (a shipped reward: "
           f"{', '.join(rewards.SHIPPED)}; or 'file.py:function'; several comma-separated) or reward_model_{i}"
           + (f" (reward_fn_{i}={c.reward_fn!r} names none)" if c.reward_fn.strip() else ""))
    for spec in specs:
        rewards.load_function(spec, f"reward_fn_{i}")
    rewards.parse_weights(c.reward_weights, len(specs) + bool(c.reward_model), f"reward_weights_{i}")
    _check("overlong" not in specs or c.overlong_buffer <= c.max_new_tokens, f"config key overlong_buffer_{i}="
           f"{c.overlong_buffer} exceeds max_new_tokens_{i}={c.max_new_tokens} (the overlong reward falls from 0 to -1 "
           f"over the last overlong_buffer tokens)")

def _evaluate(name):
    def run(*a, **kw):
        import evalgen  # generation machinery, loaded when a run judges what the model says
        return getattr(evalgen, name)(*a, **kw)
    return run

# -----------------------------------------------------------------------------
# the table

# keys several kinds share (one declaration each)
ONLINE_KEYS = dict(  # sampling of an online objective's completions
    max_new_tokens=Key(64, ">= 1"), temperature=Key(1.0, ">= 0; 0 = greedy"), top_p=Key(1.0, "(0, 1]"),
    top_k=Key(0, ">= 0; 0 = off"))
DPO_BETA = Key(0.1, "> 0", "the preference losses' beta (SimPO's recipes: ~2, DPO's and KTO's: 0.1)")
LABEL_SMOOTHING = Key(0.0, "[0, 0.5)", "the preference label's noise (cDPO)")

KINDS = {k.name: k for k in [
    Kind("sft", "supervised fine-tuning: the mean negative log-likelihood of the response tokens",
         keys=dict(sft_loss=Key("nll", "one of nll, dft", "dft: each token's NLL times its detached probability"),
                   kl_anchor=Key(0.0, ">= 0; 0 = off", "beta x KL(policy || reference) at each target position")),
         tokenize=_tokenize_sequences, collate=_collate_sequences, count=_count_tokens, loss=sft_part,
         reference="initial", needs="hidden", per_row=True,
         recomputes_head=lambda c: bool(c.weight_key) or c.sft_loss == "dft", evaluate=_evaluate("evaluate_sft"),
         uses_reference=lambda c: c.kl_anchor > 0),
    Kind("dpo", "direct preference optimization on (prompt, chosen, rejected) pairs against a frozen reference",
         keys=dict(dpo_beta=DPO_BETA, dpo_ipo=False, dpo_label_smoothing=LABEL_SMOOTHING,
                   dpo_nll_loss_coef=Key(0.0, ">= 0", "x the chosen answers' token-mean NLL, added")),
         tokenize=_tokenize_pairs, collate=_collate_pairs, count=_count_pairs, loss=dpo_part,
         reference="initial", needs="logps", per_row=True, stats_per="pairs", prompt_key="prompt_key",
         evaluate=_evaluate("evaluate_dpo")),
    Kind("simpo", "SimPO: reference-free preference optimization on length-normalized log-probs with a target margin",
         keys=dict(dpo_beta=DPO_BETA, simpo_gamma=Key(0.5, "finite", "the target margin"),
                   dpo_label_smoothing=LABEL_SMOOTHING),
         tokenize=_tokenize_pairs, collate=_collate_pairs, count=_count_pairs, loss=simpo_part, per_row=True,
         stats_per="pairs", prompt_key="prompt_key", evaluate=_evaluate("evaluate_pairs")),
    Kind("orpo", "ORPO: the chosen answer's NLL plus an odds-ratio preference term, no reference model",
         keys=dict(orpo_lambda=Key(0.1, ">= 0", "x the odds-ratio term")),
         tokenize=_tokenize_pairs, collate=_collate_pairs, count=_count_pairs, loss=orpo_part, per_row=True,
         stats_per="pairs", prompt_key="prompt_key", evaluate=_evaluate("evaluate_pairs")),
    Kind("kto", "KTO: unpaired desirable / undesirable completions against a frozen reference "
         "and the reference point z0",
         keys=dict(completion_key="completion", label_key="label", dpo_beta=DPO_BETA,
                   kto_desirable_weight=Key(1.0, ">= 0"), kto_undesirable_weight=Key(1.0, ">= 0")),
         tokenize=_tokenize_kto, collate=_collate_kto, count=_count_kto, loss=kto_part, reference="initial",
         needs="logps", per_row=True, stats_per="rows", prompt_key="prompt_key", evaluate=_evaluate("evaluate_kto")),
    Kind("kd", "knowledge distillation: a divergence from a teacher's next-token distribution on the response tokens",
         keys=dict(kd_loss=Key("forward", "one of " + ", ".join(L.KD_KINDS)),
                   kd_beta=Key(0.5, "[0, 1]", "jsd's mixing"), kd_top_k=Key(0, ">= 0; 0 = the full vocabulary"),
                   kd_temperature=Key(1.0, "> 0"),
                   kd_on_policy=Key(False, "", "distil on the student's own samples of the prompts"), **ONLINE_KEYS),
         tokenize=_tokenize_sequences, collate=_collate_sequences, count=_count_tokens, loss=kd_part,
         reference="required", needs="hidden", per_row=True,
         recomputes_head=lambda c: c.kd_loss != "forward" or bool(c.weight_key), evaluate=_evaluate("evaluate_kd"),
         check=_check_kd, prepare=R.kd_rollout),
    Kind("grpo", "GRPO: completions sampled from the policy, scored by reward functions, a clipped policy gradient "
         "with group-relative advantages (online)",
         keys=dict(num_generations=Key(4, ">= 2", "completions of each prompt"),
                   advantage=Key("grpo", "one of grpo, rloo"), grpo_epsilon=Key(0.2, "> 0", "the clip range"),
                   grpo_inner_steps=Key(1, ">= 1", "updates on each rollout"),
                   grpo_beta=Key(0.0, ">= 0", "x the k3 KL"), reward_fn="", reward_weights="", reward_model="",
                   grpo_loss=Key("token", "one of token, sequence, constant",
                                 "sequence: GRPO's per-completion mean; constant: Dr. GRPO's"),
                   scale_rewards=Key("group", "one of group, batch, none", "the std the advantages divide by"),
                   grpo_epsilon_high=Key(-1.0, "> 0 or -1; -1 = grpo_epsilon", "clip-higher's upper bound 1 + it"),
                   importance_sampling=Key("token", "one of token, sequence",
                                           "sequence: GSPO, one ratio per completion"),
                   dynamic_sampling=Key(False, "",
                                        "DAPO: drop groups whose rewards are all equal, sample more prompts"),
                   max_resample=Key(4, ">= 0", "dynamic_sampling: at most this many extra rollouts per step"),
                   mask_truncated=Key(False, "", "completions cut at max_new_tokens (no eos) get no loss"),
                   overlong_buffer=Key(0, ">= 0; 0 = max_new_tokens // 5", "the overlong reward's buffer"),
                   **ONLINE_KEYS),
         tokenize=lambda rows, source, c, common: R.tokenize_prompts(
             rows, common["tokenizer"], c.max_len, c.prompt_key, c.input_key, c.input_template, c.apply_chat_template,
             c.max_new_tokens, source, common["verbose"]),
         collate=R.collate_prompts, count=R.count_completions, loss=grpo_part, reference="initial",
         recomputes_head=lambda c: True, prompt_key="prompt_key", check=_check_grpo, prepare=R.grpo_rollout,
         eval_loss=R.eval_reward, min_loss=None, scored=True, rows_per_example=lambda c: c.num_generations,
         uses_reference=lambda c: c.grpo_beta > 0),
]}

def declared():
    """every per-objective key as declared: {name: default or Key}, the common ones, then each kind's."""
    keys = dict(COMMON_KEYS)
    for k in KINDS.values():
        keys.update(k.keys)
    return keys

def per_objective_keys():
    """every per-objective key with its default."""
    return {k: v.default if isinstance(v, Key) else v for k, v in declared().items()}

def rules():
    """every per-objective key's rule, where it has one."""
    return {k: v.rule for k, v in declared().items() if isinstance(v, Key) and v.rule}

def kind(name, key="obj"):
    """the Kind named `name`, or a ConfigError naming the key and the known kinds."""
    if name not in KINDS:
        raise ConfigError(f"config key {key}: {name!r} is not one of {', '.join(KINDS)}")
    return KINDS[name]

def make(kind_name, i=1, ref=None, ref_is_policy=False, **keys):
    """an Objective outside a run (tests, bench): kind_name's keys at their defaults but for `keys`."""
    cfg = dict(per_objective_keys())
    unknown = set(keys) - set(cfg)
    if unknown:
        raise TypeError(f"unknown objective keys {sorted(unknown)}")
    cfg.update(keys)
    return Objective(i=i, kind=kind(kind_name), cfg=SimpleNamespace(**cfg), ref=ref, ref_is_policy=ref_is_policy)

def evaluate(kind, policy, ref, tokenizer, examples, max_new_tokens=64, beta=0.1, rm=None, batch_size=32):
    """(metrics, generations) of one objective of kind `kind` (a name of objectives.KINDS) on its
    tokenized eval examples, as its table entry says. ref: the reference policy / teacher (a GPT,
    or 'self': the policy with its LoRA adapters off; unused for sft); rm: (model, tokenizer) of a
    reward model or None; beta: the DPO implicit reward's."""
    spec = KINDS[kind]
    if spec.evaluate is None:
        raise ValueError(f"objective kind {kind!r} has no behaviour metrics")
    return spec.evaluate(
        policy, ref, tokenizer, examples, max_new_tokens, make(kind, dpo_beta=beta).cfg, rm, batch_size
    )
