"""
The training objectives (SFT with DFT / a KL anchor, DPO, SimPO, ORPO, KTO, KD, GRPO) as pure functions of the
final hidden states and the output head.
Vocabularies of 128k+ make [B, T, V] logits the memory bottleneck, so every loss that needs the
vocabulary keeps only the labelled positions, then projects them in chunks of `chunk_size` tokens
(0: auto_chunk_size(V)): [chunk, V] logits exist one chunk at a time, are recomputed in backward,
and the head's gradient is accumulated in place into one buffer (autograd would allocate a fresh
[V, C] per chunk).
Labels are already shifted: labels[b, t] is predicted from position t.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
KD_KINDS = ("forward", "reverse", "jsd")

# -----------------------------------------------------------------------------
# chunked machinery

def _upcast(x):
    # half precision -> float32; float32 and float64 stay as they are
    return x.to(torch.promote_types(x.dtype, torch.float32))

def _scaled(logits, temperature, inplace=False):
    # (n, V) logits in float32 (or float64), divided by the temperature when it is not 1; inplace:
    # float32 / float64 logits are divided in place (a scratch buffer), half precision is upcast first
    z = _upcast(logits)
    if temperature == 1.0:
        return z
    return z.div_(temperature) if inplace else z / temperature

def compute_dtype(x):
    """the dtype the head's GEMMs run in: autocast's when it is on for x's device (bf16 on a GPU,
    over float32 master weights), else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

_out_dtype_ok = {}  # device type -> whether torch.mm(..., out_dtype=float32) runs there

def mm_into(a, b, out):
    """out = a @ b with a, b in the compute dtype and out float32 (float64): half-precision GEMMs
    with float32 accumulation write float32 logits straight into the scratch tile (CUDA, torch >=
    2.8); elsewhere through a half-precision temporary (CPU has no such kernel)."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    dev = a.device.type
    if _out_dtype_ok.get(dev, True):
        try:
            return torch.mm(a, b, out_dtype=out.dtype, out=out)
        except (TypeError, RuntimeError, NotImplementedError):
            _out_dtype_ok[dev] = False
    return out.copy_(torch.mm(a, b))

def addmm_into(acc, a, b):
    """acc += a @ b in place (the head's weight gradient), a and b in the compute dtype, acc float32."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    dev = a.device.type
    if _out_dtype_ok.get(dev, True):
        try:
            return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        except (TypeError, RuntimeError, NotImplementedError):
            _out_dtype_ok[dev] = False
    return acc.add_(torch.mm(a, b))

class _ChunkedHead(torch.autograd.Function):
    """vals = fn(h @ w.T, *rest) chunk by chunk, for h (N, C) and w (V, C); fn maps (n, V) logits
    (and the rest's chunks) to (n,) values. Backward recomputes each chunk's logits, gets their
    gradient from fn (or from fn.logits_grad, a closed form that is also given the forward's
    values), and adds grad_logits.T @ h into a single buffer for w.
    GEMMs run in the compute dtype (bf16 under autocast on a GPU: tensor cores, float32
    accumulation); logits, softmax statistics and gradients are float32 (float64 for float64).
    Every chunk's logits are written into one scratch [chunk, V] buffer, which fn and logits_grad
    may overwrite: a fresh [chunk, V] tensor per chunk costs more than the softmax itself on CPU
    (fresh pages are faulted in and zeroed), and one buffer is also the smallest peak on GPU."""

    @staticmethod
    def forward(ctx, fn, chunk_size, w, h, *rest):
        cdt = compute_dtype(h)
        ctx.fn, ctx.chunk_size, ctx.cdt = fn, chunk_size, cdt
        wt, hc, N = w.to(cdt).t(), h.to(cdt), h.shape[0]
        buf = h.new_empty(min(chunk_size, N), w.shape[0], dtype=_upcast(hc).dtype)
        vals = [fn(mm_into(hc[i:i + chunk_size], wt, buf[:min(chunk_size, N - i)]),
                   *[r[i:i + chunk_size] for r in rest]) for i in range(0, N, chunk_size)]
        vals = torch.cat(vals) if vals else buf.new_zeros(0)
        ctx.save_for_backward(w, h, vals, *rest)
        return vals

    @staticmethod
    def backward(ctx, grad_vals):
        w, h, vals, *rest = ctx.saved_tensors
        cs, N, cdt = ctx.chunk_size, h.shape[0], ctx.cdt
        wc, hcd = w.to(cdt), h.to(cdt)
        grad_h = torch.empty_like(h, dtype=_upcast(h).dtype) if ctx.needs_input_grad[3] else None
        grad_w = torch.zeros_like(w, dtype=_upcast(w).dtype) if ctx.needs_input_grad[2] else None
        buf = h.new_empty(min(cs, N), w.shape[0], dtype=_upcast(hcd).dtype)
        for i in range(0, N, cs):
            hc, n = hcd[i:i + cs], min(cs, N - i)
            z = mm_into(hc, wc.t(), buf[:n])  # (n, V)
            chunk = [r[i:i + cs] for r in rest]
            if hasattr(ctx.fn, "logits_grad"):  # a closed form: fewer passes over (n, V) than autograd
                gz = ctx.fn.logits_grad(z, grad_vals[i:i + cs], vals[i:i + cs], *chunk)
            else:
                with torch.enable_grad():
                    z = z.detach().requires_grad_()
                    gz, = torch.autograd.grad(ctx.fn(z, *chunk), z, grad_vals[i:i + cs])
            gz = gz.to(cdt)
            if grad_h is not None:
                mm_into(gz, wc, grad_h[i:i + n])
            if grad_w is not None:
                addmm_into(grad_w, gz.t(), hc)  # in place: one (V, C) buffer
        return (None, None, None if grad_w is None else grad_w.to(w.dtype),
                None if grad_h is None else grad_h.to(h.dtype), *[None] * len(rest))

class _ChunkedHeadUniform(torch.autograd.Function):
    """_ChunkedHead for values that the caller reduces with one weight for every token (a sum or a
    token mean: SFT, KD): fn.value_and_grad gives each chunk's values and their logits gradient in
    one pass over the tile, so the gradients for h and w are accumulated in the forward and only
    scaled in backward. That saves backward's recompute of the logits (a quarter of the head's
    GEMMs) and a second softmax pass, at the cost of holding w's (V, C) gradient from forward to
    backward (none with a frozen head, as under LoRA). grad_h is exact for any per-token weights;
    grad_w needs them equal, which backward checks on CPU (the test suite) and trusts on GPU."""

    @staticmethod
    def forward(ctx, fn, chunk_size, w, h, *rest):
        cdt = compute_dtype(h)
        wc, hc, N = w.to(cdt), h.to(cdt), h.shape[0]
        buf = h.new_empty(min(chunk_size, N), w.shape[0], dtype=_upcast(hc).dtype)
        grad_h = torch.empty_like(h, dtype=buf.dtype) if ctx.needs_input_grad[3] else None
        grad_w = torch.zeros_like(w, dtype=_upcast(w).dtype) if ctx.needs_input_grad[2] else None
        vals = []
        for i in range(0, N, chunk_size):
            n = min(chunk_size, N - i)
            v, gz = fn.value_and_grad(mm_into(hc[i:i + n], wc.t(), buf[:n]), *[r[i:i + n] for r in rest])
            vals.append(v)
            gz = gz.to(cdt)
            if grad_h is not None:
                mm_into(gz, wc, grad_h[i:i + n])
            if grad_w is not None:
                addmm_into(grad_w, gz.t(), hc[i:i + n])
        ctx.dtypes = (w.dtype, h.dtype)
        ctx.save_for_backward(grad_w, grad_h)
        return torch.cat(vals) if vals else buf.new_zeros(0)

    @staticmethod
    def backward(ctx, grad_vals):
        # scaled in place: a second (V, C) buffer would double the peak (the graph is not reused)
        grad_w, grad_h = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_vals[:, None].to(grad_h.dtype)).to(ctx.dtypes[1])
        if grad_w is not None and grad_vals.numel():
            if not grad_vals.is_cuda:  # free on CPU; on a GPU it would cost a host sync per loss
                assert bool((grad_vals == grad_vals[0]).all()), "uniform head gradient with unequal token weights"
            grad_w = grad_w.mul_(grad_vals[0].to(grad_w.dtype))
        if grad_w is not None:
            grad_w = grad_w.to(ctx.dtypes[0])
        return None, None, grad_w, grad_h, *[None] * (len(ctx.needs_input_grad) - 4)

CHUNK_LOGITS = 2**22  # auto chunk: logits per chunk (16 MiB in float32)

CHUNK_LOGITS_CUDA = 2**26  # on a GPU: 256 MiB of float32 logits; fewer, longer kernels (launch-bound otherwise)

def auto_chunk_size(vocab_size, device_type="cpu"):
    """tokens per chunk when chunk_size is 0: at least 128, more for small vocabularies so that a
    chunk holds about CHUNK_LOGITS logits (512 tokens at V = 8192; fewer, larger matmuls), and 16x
    that on CUDA (512 tokens at V = 128k), where every chunk costs a dozen kernel launches."""
    return max(128, (CHUNK_LOGITS_CUDA if device_type == "cuda" else CHUNK_LOGITS) // vocab_size)

def softcap_(z, cap):
    """gemma 2's final logit soft-cap, cap * tanh(z / cap), in place on a scratch tile (0 = off)."""
    return z.div_(cap).tanh_().mul_(cap) if cap else z

def _capped(fn, cap):
    """fn applied to soft-capped logits z' = cap tanh(z / cap). The closed forms get the chain rule's
    factor dz'/dz = 1 - (z' / cap)^2, taken before fn overwrites the tile (a second (n, V) tile, only
    for soft-capped models); the autograd path (backward of an fn without logits_grad) caps out of
    place so the gradient flows through tanh."""
    if not cap:
        return fn

    def capped(z, *rest):
        return fn(torch.tanh(z / cap) * cap if z.requires_grad else softcap_(z, cap), *rest)

    def slope(z):  # z capped in place; returns dz'/dz
        return (softcap_(z, cap) / cap).square_().neg_().add_(1)
    if hasattr(fn, "logits_grad"):
        def logits_grad(z, g, vals, *rest):
            d = slope(z)
            return fn.logits_grad(z, g, vals, *rest).mul_(d)
        capped.logits_grad = logits_grad
    if hasattr(fn, "value_and_grad"):
        def value_and_grad(z, *rest):
            d = slope(z)
            vals, gz = fn.value_and_grad(z, *rest)
            return vals, gz.mul_(d)
        capped.value_and_grad = value_and_grad
    return capped

def _chunked(fn, hidden, weight, labels, chunk_size, rows=(), uniform=False, softcap=0.0):
    """fn(logits (n, V), *row_chunks) -> (n,) per-token values over the labelled positions of
    hidden [B, T, C] with head weight [V, C]; rows: more [B, T, ...] tensors cut the same way
    (labels, teacher hidden). Returns [B, T] in float32 (float64 for float64 inputs), 0.0 where
    labels == -100. uniform: the caller weighs every token alike (see _ChunkedHeadUniform).
    softcap: fn sees cap * tanh(logits / cap) (gemma 2's final soft-cap; 0 = off)."""
    B, T = labels.shape
    fn = _capped(fn, softcap)
    idx = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
    cut = lambda r: r.reshape(B * T, *r.shape[2:])[idx]  # (N, ...) masked tokens dropped first
    chunk_size = chunk_size or auto_chunk_size(weight.shape[0], hidden.device.type)
    head = _ChunkedHeadUniform if uniform and hasattr(fn, "value_and_grad") else _ChunkedHead
    if not torch.is_grad_enabled():  # evaluation: no gradient buffers in the forward (the same values)
        weight, hidden = weight.detach(), hidden.detach()
    vals = head.apply(fn, chunk_size, weight, cut(hidden), *[cut(r) for r in rows])
    out = torch.zeros(B * T, dtype=vals.dtype, device=labels.device)
    return out.index_copy(0, idx, vals).view(B, T)

def count_tokens(labels):
    """Number of response tokens (labels != -100), as a 0-dim long tensor."""
    return (labels != IGNORE_INDEX).sum()

def _normalizer(num_tokens, labels):
    # clamp: a batch without response tokens gives loss 0, not nan
    return torch.as_tensor(count_tokens(labels) if num_tokens is None else num_tokens).clamp(min=1)

# -----------------------------------------------------------------------------
# SFT and sequence log-probs

def token_logps(hidden, weight, labels, chunk_size=0, temperature=1.0, uniform=False, softcap=0.0, entropy=None):
    """log p(labels[b, t]) for hidden [B, T, C], weight [V, C] -> [B, T] float32, 0.0 where masked.
    uniform=True: the caller reduces the result with one weight for every token (a sum, a token
    mean), which lets the head's gradient be computed in the forward (_ChunkedHeadUniform).
    softcap: the model's final logit soft-cap (gemma 2), applied before the temperature.
    entropy: a list that receives the [B, T] entropy -sum_v p_v log p_v of the distribution each
    label is drawn from (0.0 where masked; no gradient), taken from each chunk's tile in the forward."""
    chunks = [] if entropy is not None else None

    def fn(z, y):  # (n, V) logits (overwritten), (n,) targets -> (n,) log p(y) = z_y - logsumexp(z)
        z = _scaled(z, temperature, inplace=True)
        zy = z.gather(1, y[:, None]).squeeze(1)
        m = z.detach().amax(1, keepdim=True)  # the shift that keeps exp() finite; no gradient flows through it
        e = z.sub_(m).exp_()
        s = e.sum(1)
        if chunks is not None:  # H = log s - sum_v (e_v / s) log e_v, with e = exp(z - max z); entr(x) = -x log x
            chunks.append((s.log() + torch.special.entr(e.detach(), out=e.detach()).sum(1) / s).detach())
        return zy - m.squeeze(1) - s.log()

    def logits_grad(z, g, logp, y):  # d(sum g * logp[y]) / dz = g (onehot(y) - softmax(z / tau)) / tau
        dtype = z.dtype
        z = _scaled(z, temperature, inplace=True)
        lse = z.gather(1, y[:, None]).squeeze(1) - logp  # each row's logsumexp, from the forward's log p(y)
        gz = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # in place: -g softmax(z / tau)
        gz[torch.arange(len(y), device=y.device), y] += g
        return (gz if temperature == 1.0 else gz.div_(temperature)).to(dtype)
    def value_and_grad(z, y):  # log p(y) and its logits gradient (onehot(y) - softmax(z / tau)) / tau, in place
        z = _scaled(z, temperature, inplace=True)
        zy = z.gather(1, y[:, None]).squeeze(1)
        m = z.amax(1, keepdim=True)
        s = z.sub_(m).exp_().sum(1, keepdim=True)
        logp = zy - m.squeeze(1) - s.log().squeeze(1)
        gz = z.div_(s).neg_()
        gz[torch.arange(len(y), device=y.device), y] += 1
        return logp, gz if temperature == 1.0 else gz.div_(temperature)
    fn.logits_grad, fn.value_and_grad = logits_grad, value_and_grad
    out = _chunked(fn, hidden, weight, labels, chunk_size, [labels], uniform and chunks is None, softcap)
    if chunks is not None:
        idx = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
        vals = torch.cat(chunks) if chunks else out.new_zeros(0)
        entropy.append(out.new_zeros(labels.numel()).index_copy(0, idx, vals.to(out.dtype)).view(labels.shape))
    return out

def sft_loss(hidden, weight, labels, num_tokens=None, chunk_size=0, softcap=0.0):
    """-sum of response-token log-probs / num_tokens. num_tokens=None uses this batch's count; the
    training loop passes the count of the whole global batch (all micro-batches, all ranks), so
    summing the micro-batch losses gives the per-token mean over the global batch whatever the
    batch x accumulation x world split."""
    return -token_logps(hidden, weight, labels, chunk_size, uniform=True, softcap=softcap).sum() / _normalizer(
        num_tokens, labels
    )

def per_sample_mean(token_values, labels):
    """[B, T] per-token values -> [B] mean over each row's response tokens (0 for rows with none)."""
    mask = labels != IGNORE_INDEX
    return (token_values * mask).sum(-1) / mask.sum(-1).clamp(min=1)

def sequence_logps(hidden, weight, labels, chunk_size=0, softcap=0.0):
    """[B] SUM of response-token log-probs, log pi(y|x) as DPO uses it."""
    return token_logps(hidden, weight, labels, chunk_size, softcap=softcap).sum(-1)

# -----------------------------------------------------------------------------
# DPO

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1, label_smoothing=0.0, ipo=False):
    """Per-pair DPO losses from [B] sequence log-probs; returns (losses, chosen_rewards,
    rejected_rewards), each [B]. With h = beta * ((pc - pr) - (rc - rr)):
    sigmoid (DPO, cDPO with eps = label_smoothing): -(1 - eps) logsigmoid(h) - eps logsigmoid(-h);
    ipo=True: (h / beta - 1 / (2 beta))^2 (label_smoothing unused).
    Rewards are beta * (policy - ref), detached; accuracy = mean(chosen_rewards > rejected_rewards).
    The caller reduces over the global pair count, and adds the optional NLL term (RPO) itself
    as c * sft_loss on the chosen half of the batch."""
    ref_margin = (ref_chosen_logps - ref_rejected_logps).detach()
    h = beta * ((policy_chosen_logps - policy_rejected_logps) - ref_margin)
    if ipo:
        losses = (h / beta - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards

def _smoothed(h, label_smoothing):
    # -(1 - eps) log sigmoid(h) - eps log sigmoid(-h): the conservative (label-smoothed) logistic loss
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)

def simpo_loss(chosen_mean_logps, rejected_mean_logps, beta=2.0, gamma=0.5, label_smoothing=0.0):
    """Per-pair SimPO losses (Meng et al. 2024) from [B] MEAN response-token log-probs a, b (no
    reference model): -log sigmoid(beta (a - b) - gamma), label-smoothed as DPO's. Returns (losses,
    chosen_rewards = beta a, rejected_rewards = beta b), rewards detached."""
    h = beta * (chosen_mean_logps - rejected_mean_logps) - gamma
    return (_smoothed(h, label_smoothing), beta * chosen_mean_logps.detach(), beta * rejected_mean_logps.detach())

def log_odds(mean_logps):
    """log(p / (1 - p)) of p = exp(a), a = a mean token log-prob < 0: a - log(1 - exp(a)), with
    log(1 - exp(a)) as log(-expm1(a)) near 0 and log1p(-exp(a)) below -ln 2 (no cancellation)."""
    a = mean_logps.clamp(max=-1e-12)  # a = 0 (p = 1) would be infinite odds
    log1m = torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))
    return a - log1m

def orpo_ratio_loss(chosen_mean_logps, rejected_mean_logps):
    """Per-pair odds-ratio term of ORPO (Hong et al. 2024): -log sigmoid(log odds(chosen) - log
    odds(rejected)), odds from the mean token log-probs. Returns (losses, the log odds ratio,
    detached). The caller adds the chosen answer's NLL (a token mean) and weighs this by lambda."""
    ratio = log_odds(chosen_mean_logps) - log_odds(rejected_mean_logps)
    return -F.logsigmoid(ratio), ratio.detach()

def kto_loss(rewards, desirable, z0, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """Per-row KTO losses (Ethayarajh et al. 2024) from [B] implicit rewards r = log pi(y|x) -
    log pi_ref(y|x) (sums over the completion), desirable [B] bools and the reference point z0
    (a detached scalar, see kto_reference_point): desirable rows w_d (1 - sigmoid(beta (r - z0))),
    undesirable ones w_u (1 - sigmoid(beta (z0 - r)))."""
    z0 = torch.as_tensor(z0, dtype=rewards.dtype, device=rewards.device).detach()
    good = desirable_weight * (1 - torch.sigmoid(beta * (rewards - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - rewards)))
    return torch.where(desirable, good, bad)

def kto_reference_point(mismatched_rewards_sum, count):
    """z0 = max(0, mean r over the mismatched pairs (x_i, y_{i+1})): the sum and the count already
    summed over micro-batches and ranks."""
    return max(0.0, float(mismatched_rewards_sum) / max(float(count), 1.0))

# -----------------------------------------------------------------------------
# KD

def _log_mixture(lpt, lps, beta):
    # log(beta p_T + (1 - beta) p_S), exactly lps when lpt == lps; expm1 arguments clamped <= 0
    d = lpt - lps
    via_s = lps + torch.log1p(beta * torch.expm1(d.clamp(max=0)))
    via_t = lpt + torch.log1p((1 - beta) * torch.expm1((-d).clamp(max=0)))
    return torch.where(d <= 0, via_s, via_t)

@torch.no_grad()
def _teacher_logps(th, tw, temperature, cap=0.0):
    # (n, V) teacher log-probs; a function of its own so the teacher's logits are freed before the
    # student's backward
    return F.log_softmax(_scaled(softcap_(_upcast(th @ tw.t()), cap), temperature), dim=-1)

def _softmax_(z):
    # row-wise softmax of (n, V) float logits, in place
    z = z.sub_(z.amax(1, keepdim=True)).exp_()
    return z.div_(z.sum(1, keepdim=True))

@torch.no_grad()
def _teacher_probs(th, tw, top_k, temperature, cdt, cap=0.0):
    # (n, V) teacher probabilities computed in place in one (n, V) tile, or (n, k) over its top k
    # with their indices; the GEMM in cdt, the softmax in float32
    t = mm_into(th.to(cdt), tw.to(cdt).t(), th.new_empty(th.shape[0], tw.shape[0], dtype=_upcast(th.to(cdt)).dtype))
    t = _scaled(softcap_(t, cap), temperature, inplace=True)
    top = None
    if top_k > 0:
        t, top = t.topk(top_k, dim=-1)
    return _softmax_(t), top

def _forward_kd_fn(tw, top_k, temperature, cdt, cap=0.0):
    """Forward KD on a chunk with a closed-form gradient, in place on the scratch logits: with
    z = logits / tau, -sum_v p_T log p_S = logsumexp(z) - sum_v p_T z_v (sum_v p_T = 1), and its
    gradient in z is softmax(z) - p_T. Peak: the scratch tile and the teacher's."""
    def dot(pt, z, top):  # sum_v p_T z_v per row, without an (n, V) product
        zt = z if top is None else z.gather(1, top)
        return torch.bmm(pt[:, None, :], zt[:, :, None]).view(-1)

    def entropy(pt):  # adds the chunk's summed teacher entropy -sum_v p_T log p_T to fn.entropy (a stat)
        if fn.entropy is not None:
            for i in range(0, pt.shape[0], 16):  # 16 rows at a time: no second (n, V) tile
                fn.entropy += torch.special.entr(pt[i:i + 16]).sum()

    def fn(z, th):
        z = _scaled(z, temperature, inplace=True)
        pt, top = _teacher_probs(th, tw, top_k, temperature, cdt, cap)
        entropy(pt)
        pz = dot(pt, z, top)
        m = z.detach().amax(1)
        return m + z.sub_(m[:, None]).exp_().sum(1).log() - pz

    def logits_grad(z, g, vals, th):  # g (softmax(z) - p_T) / tau
        dtype = z.dtype
        z = _softmax_(_scaled(z, temperature, inplace=True))
        pt, top = _teacher_probs(th, tw, top_k, temperature, cdt, cap)
        z = z.sub_(pt) if top is None else z.scatter_add_(1, top, -pt)
        return z.mul_((g / temperature)[:, None]).to(dtype)

    def value_and_grad(z, th):  # the loss and its logits gradient (softmax(z) - p_T) / tau, in place
        z = _scaled(z, temperature, inplace=True)
        pt, top = _teacher_probs(th, tw, top_k, temperature, cdt, cap)
        entropy(pt)
        pz = dot(pt, z, top)
        m = z.amax(1, keepdim=True)
        s = z.sub_(m).exp_().sum(1, keepdim=True)
        vals = m.squeeze(1) + s.log().squeeze(1) - pz
        z = z.div_(s)
        z = z.sub_(pt) if top is None else z.scatter_add_(1, top, -pt)
        return vals, z if temperature == 1.0 else z.div_(temperature)
    fn.logits_grad, fn.value_and_grad, fn.entropy = logits_grad, value_and_grad, None
    return fn

def _kd_chunk(z, th, tw, kind, beta, temperature, cap=0.0):
    # reverse KL or JSD through autograd: (n, V) student logits (not modified), (n, C_T) teacher
    # hidden, (V, C_T) teacher head -> (n,) per-token loss
    lps = F.log_softmax(_scaled(z, temperature), dim=-1)  # (n, V) student
    lpt = _teacher_logps(th, tw, temperature, cap)
    if kind == "reverse":
        return (lps.exp() * (lps - lpt)).sum(-1)
    lpm = _log_mixture(lpt, lps, beta)
    return beta * (lpt.exp() * (lpt - lpm)).sum(-1) + (1 - beta) * (lps.exp() * (lps - lpm)).sum(-1)

def kd_token_losses(hidden, weight, teacher_hidden, teacher_weight, labels, kind="forward", beta=0.5,
                    top_k=0, temperature=1.0, chunk_size=0, uniform=False, stats=None, softcap=0.0,
                    teacher_softcap=0.0):
    """Per-token distillation loss [B, T] (0.0 where masked), p_T = softmax(teacher_logits / tau),
    p_S = softmax(student_logits / tau), tau = temperature (no tau^2 factor):
      forward: -sum_v p_T log p_S  (cross-entropy; KL(p_T || p_S) plus the teacher entropy)
      reverse: sum_v p_S (log p_S - log p_T) = KL(p_S || p_T)
      jsd:     beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S, beta in (0, 1);
               divided by beta it tends to KL(p_T || p_S) as beta -> 0, divided by 1 - beta to
               KL(p_S || p_T) as beta -> 1; exactly 0 for identical distributions.
    stats (forward only): a dict that gets "teacher_entropy", the teacher's entropy summed over the
    labelled tokens (no grad), so KL(p_T || p_S) = the loss less it, at no extra GEMM.
    top_k > 0 (forward only): p_T is the softmax over the teacher's k largest logits, and the sum
    runs over those k entries with log p_S taken from the full student softmax.
    softcap, teacher_softcap: the student's and the teacher's final logit soft-caps (gemma 2; 0 = off).
    The teacher gets no gradient (its tensors are detached here too)."""
    if kind not in KD_KINDS:
        raise ValueError(f"kd kind must be one of {KD_KINDS}, got {kind!r}")
    if top_k > 0 and kind != "forward":
        raise ValueError(f"top_k > 0 is supported only with kind='forward', got kind={kind!r}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1 (use kind='forward' or 'reverse' for the ends), got {beta}")
    tw = teacher_weight.detach()
    if kind == "forward":
        # the teacher's GEMMs in the compute dtype of the forward, in backward's recompute too
        fn = _forward_kd_fn(tw, top_k, temperature, compute_dtype(teacher_hidden), teacher_softcap)
        if stats is not None:  # the teacher's entropy summed over the tokens, from the forward's own p_T
            fn.entropy = stats["teacher_entropy"] = torch.zeros((), device=hidden.device, dtype=torch.float64)
    else:
        def fn(z, th):
            return _kd_chunk(z, th, tw, kind, beta, temperature, teacher_softcap)
    return _chunked(fn, hidden, weight, labels, chunk_size, [teacher_hidden.detach()], uniform, softcap)

def kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels, kind="forward", beta=0.5, top_k=0,
            temperature=1.0, num_tokens=None, chunk_size=0, softcap=0.0, teacher_softcap=0.0):
    """Sum of kd_token_losses / num_tokens; num_tokens as in sft_loss (the global batch's count)."""
    losses = kd_token_losses(hidden, weight, teacher_hidden, teacher_weight, labels, kind, beta, top_k,
                             temperature, chunk_size, uniform=True, softcap=softcap, teacher_softcap=teacher_softcap)
    return losses.sum() / _normalizer(num_tokens, labels)

# -----------------------------------------------------------------------------
# anti-forgetting SFT (docs/algorithms.md §1.8): DFT's token weights, a KL anchor to a reference

def dft_token_losses(token_logps):
    """DFT (Wu et al. 2025): each target token's NLL times its own probability, detached:
    -sg(p_t) log p_t from [B, T] token log-probs (0.0 where masked stays 0.0). The gradient is
    SFT's scaled per token by p_t, so the head needs the recompute path (unequal token weights)."""
    return -token_logps.detach().exp() * token_logps

def _kl_anchor_fn(rw, cdt, cap=0.0):
    """KL(p || q) per token on a chunk, p = softmax(z) the policy's, q = softmax(z_R) the
    reference's from its hidden states (n, C_R) and head rw (V, C_R), full vocabulary, with the
    closed-form logits gradient dKL/dz = p (log p - log q - KL). Peak: the scratch tile and q's."""
    def ref_logps(rh):  # (n, V) reference log-probs in a tile of their own, no grad
        with torch.no_grad():
            rh = rh.to(cdt)
            q = mm_into(rh, rw.to(cdt).t(), rh.new_empty(rh.shape[0], rw.shape[0], dtype=_upcast(rh).dtype))
            q = softcap_(q, cap)
            return q.sub_(torch.logsumexp(q, 1, keepdim=True))

    def dot(a, b):  # row-wise sum_v a_v b_v without an (n, V) product
        return torch.bmm(a[:, None, :], b[:, :, None]).view(-1)

    def fn(z, rh):
        d = ref_logps(rh).neg_().add_(z.sub_(torch.logsumexp(z, 1, keepdim=True)))  # log p - log q
        return dot(z.exp_(), d)

    def value_and_grad(z, rh):  # KL and its logits gradient, in place: z becomes p, q's tile the gradient
        d = ref_logps(rh).neg_().add_(z.sub_(torch.logsumexp(z, 1, keepdim=True)))
        p = z.exp_()
        kl = dot(p, d)
        return kl, d.sub_(kl[:, None]).mul_(p)

    def logits_grad(z, g, vals, rh):
        return value_and_grad(z, rh)[1].mul_(g[:, None].to(z.dtype))
    fn.value_and_grad, fn.logits_grad = value_and_grad, logits_grad
    return fn

def kl_anchor_token_losses(hidden, weight, ref_hidden, ref_weight, labels, chunk_size=0, uniform=False, softcap=0.0,
                           ref_softcap=0.0):
    """Per-token KL(pi || pi_ref) = sum_v p(v) (log p(v) - log q(v)) over the full vocabulary at the
    labelled positions [B, T] (0.0 where masked), p from the policy's hidden [B, T, C] and head
    [V, C], q from the reference's hidden [B, T, C_R] and head [V, C_R] (no gradient reaches the
    reference). Chunked as every loss here, with the closed-form gradient; softcap, ref_softcap:
    each model's final logit soft-cap (0 = off). uniform as in token_logps."""
    fn = _kl_anchor_fn(ref_weight.detach(), compute_dtype(ref_hidden), ref_softcap)
    return _chunked(fn, hidden, weight, labels, chunk_size, [ref_hidden.detach()], uniform, softcap)

# -----------------------------------------------------------------------------
# GRPO (docs/algorithms.md §1.7)

def grpo_token_losses(logps, old_logps, ref_logps, advantages, mask, epsilon=0.2, beta=0.0, epsilon_high=None,
                      level="token"):
    """Per-token GRPO losses [B, T] (0 where mask is False) and (k3 KL [B, T], low-clipped [B, T] bool,
    high-clipped [B, T] bool). logps: the policy's log-probs of the completion tokens (with grad);
    old_logps: the sampling policy's (no grad; logps.detach() when a rollout is used once, so the
    ratio is 1); ref_logps: the reference's, or None (beta 0); advantages [B], one per completion.
    level "token": one ratio per token, rho_t = exp(logps_t - old_logps_t); "sequence" (GSPO): one per
    completion, s = exp(mean_t (logps_t - old_logps_t)) over its masked tokens, given to each of them.
    The loss is -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A) + beta (exp(ref - logps) -
    (ref - logps) - 1); epsilon_high None = epsilon. Low-clipped: rho < 1 - epsilon with A < 0,
    high-clipped: rho > 1 + epsilon_high with A > 0 (where the clip takes the gradient away)."""
    A = advantages[:, None].to(logps.dtype)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    log_ratio = logps - old_logps
    if level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1 - epsilon, 1 + eps_high)
    surrogate = torch.minimum(ratio * A, clipped_ratio * A)
    low = ((ratio < 1 - epsilon) & (A < 0)).expand_as(mask) & mask
    high = ((ratio > 1 + eps_high) & (A > 0)).expand_as(mask) & mask
    loss = (-surrogate).expand_as(logps)
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        d = ref_logps.to(logps.dtype) - logps
        kl = torch.exp(d) - d - 1
        loss = loss + beta * kl
    return loss * mask, (kl * mask, low, high)
