"""
How each method picks the objective(s) of a step (docs/algorithms.md §2), with the state it keeps
between steps. lambd = (lambd_1, ..., lambd_K) are the weights on the simplex.

    sequential  objective i for round(lambd_i T) steps, in order 1..K
    mix         every objective every step, loss sum_i lambd_i f_i (one backward)
    alright     objective i with probability lambd_i, one uniform draw per step
    maxright    argmax_i lambd_i (f_i - f_i*), ties to the lowest i
    constrained objective i with probability proportional to lambd_i + mu_i, where mu_j >= 0 is the
                multiplier of objective j's forgetting budget f_j - f_j* <= budget_j (primal-dual)
    select      every objective every step: the trusted set and the weighted noisy set (selector.py)

The picks are pure functions; a method object (`make`) holds the state a checkpoint keeps and
calls them. `pick(it, gap)` gets the evaluation as a callable: gap(i) = f_i - f_i* on a fresh
global batch of objective i (train.py's probe loaders). `update(i, gap)` gets the trained
objective's gap from its pre-update training loss. train.py and bench.py run this same code.
"""
import random
from dataclasses import dataclass, field

from errors import ConfigError

def weights(lambd, K):
    """lambd as K weights: a number means (lambd, 1 - lambd) for K = 2 (any number for K = 1, which
    ignores it); a tuple must hold K non-negative weights summing to 1. ConfigError names lambd."""
    if K == 1:
        return (1.0,)
    if isinstance(lambd, (int, float)):
        if K != 2:
            even = ["%.3g" % (1 / K)] * (K - 1)  # the last takes the rounding, so the example sums to 1
            raise ConfigError(f"config key lambd: {K} objectives need {K} weights summing to 1 "
                             f"(e.g. --lambd={','.join(even + ['%.3g' % (1 - float(even[0]) * (K - 1))])}), "
                             f"got the single number {lambd}")
        if not 0.0 <= lambd <= 1.0:
            raise ConfigError(f"config key lambd must lie in [0, 1], got {lambd}")
        return (float(lambd), 1.0 - lambd)
    w = tuple(float(x) for x in lambd)
    if len(w) != K or any(x < 0 for x in w) or abs(sum(w) - 1.0) > 1e-6:
        raise ConfigError(f"config key lambd: expected {K} non-negative weights summing to 1 (one per objective), "
                         f"got {tuple(lambd)} ({len(w)} weights, sum {sum(w):.6g})")
    return w

def sequential_steps(w, T):
    """steps of each objective in a sequential run of T steps: cumulative rounding, so objective i
    gets round(lambd_i T) within one step and the counts sum to exactly T (K = 2: objective 1 gets
    round(lambd_1 T), objective 2 the rest)."""
    ends, c = [], 0.0
    for x in w[:-1]:
        c += x
        ends.append(min(T, round(c * T)))
    ends.append(T)
    return [b - a for a, b in zip([0] + ends[:-1], ends)]

def sequential_pick(it, w, T):
    """the objective of step `it` (0-based) of a sequential run."""
    end = 0
    for i, n in enumerate(sequential_steps(w, T), 1):
        end += n
        if it < end:
            return i
    return len(w)

def alright_pick(r, w):
    """objective i with probability w[i-1], from one r.random(): the first i whose cumulative weight
    exceeds the draw (K = 2: 1 if r.random() < lambd else 2)."""
    u, c = r.random(), 0.0
    for i, x in enumerate(w, 1):
        c += x
        if u < c:
            return i
    return max(i for i, x in enumerate(w, 1) if x > 0)  # u above a sum rounded below 1

def alright_draws(seed, w, n):
    """the first n objectives ALRIGHT trains with this seed (what a run's obj_rng state yields)."""
    r = random.Random(seed)
    return [alright_pick(r, w) for _ in range(n)]

def maxright_pick(s):
    """argmax_i s_i of the weighted gaps s = {i: lambd_i (f_i - f_i*)}, ties to the lowest i."""
    return max(sorted(s), key=lambda i: (s[i], -i))

def dual_update(mu, gaps, budgets, lr):
    """one primal-dual ascent step of the multipliers: mu_j <- max(0, mu_j + lr (gap_j - budget_j)),
    raised while objective j is over its budget, lowered toward 0 while it is under."""
    return {j: max(0.0, mu[j] + lr * (gaps[j] - budgets[j])) for j in mu}

def constrained_probs(w, mu):
    """the draw's probabilities: lambd_i + mu_i, normalized (mu_i = 0 for an unconstrained i)."""
    p = [x + mu.get(i, 0.0) for i, x in enumerate(w, 1)]
    return [x / sum(p) for x in p] if sum(p) > 0 else [1 / len(p)] * len(p)

# -----------------------------------------------------------------------------
# the methods with their state

@dataclass
class Method:
    """one objective (or all of them, mix) every step; nothing to keep."""
    w: tuple                    # lambd, K weights
    total_iters: int = 0
    name = "single"
    joint = False               # trains objectives one after another in one run: eps and pareto_front apply
    needs_opt = False           # which f_i* it needs (estimated when not given): all, or those with a budget

    def needs(self, i):
        return self.needs_opt

    def pick(self, it, gap=None):
        return [1]

    def update(self, i, gap):
        pass

    def logged(self):
        """the train line's fields behind this step's choice."""
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, st):
        pass

class Sequential(Method):
    name = "sequential"

    def pick(self, it, gap=None):
        return [sequential_pick(it, list(self.w), self.total_iters)]

class Mix(Method):
    name, joint = "mix", True

    def pick(self, it, gap=None):
        return list(range(1, len(self.w) + 1))

@dataclass
class Alright(Method):
    seed: int = 0
    rng: tuple = field(default=None, repr=False)  # the generator's state: one draw per step, saved with the run
    name, joint = "alright", True

    def __post_init__(self):
        self.rng = self.rng or random.Random(self.seed).getstate()

    def draw(self, w):
        r = random.Random()
        r.setstate(self.rng)
        i = alright_pick(r, w)
        self.rng = r.getstate()
        return i

    def pick(self, it, gap=None):
        return [self.draw(list(self.w))]

    def state_dict(self):
        return {"rng": self.rng}

    def load_state_dict(self, st):
        self.rng = tuple(st["rng"]) if isinstance(st["rng"], list) else st["rng"]

@dataclass
class Maxright(Method):
    interval: int = 10
    s: dict = field(default_factory=dict)  # {i: lambd_i (f_i - f_i*)}, the weighted gaps behind each choice
    name, joint, needs_opt = "maxright", True, True

    def pick(self, it, gap):
        """every `interval` steps all gaps are re-evaluated; between, the trained one follows update()."""
        if it % self.interval == 0 or len(self.s) < len(self.w):
            for i, x in enumerate(self.w, 1):
                self.s[i] = x * gap(i)
        return [maxright_pick(self.s)]

    def update(self, i, gap):
        self.s[i] = self.w[i - 1] * gap

    def logged(self):
        return {f"s_{i}": v for i, v in self.s.items()}

    def state_dict(self):
        return {"s": dict(self.s)}

    def load_state_dict(self, st):
        self.s = {int(i): v for i, v in st["s"].items()}

@dataclass
class Constrained(Alright):
    budgets: dict = field(default_factory=dict)  # {j: budget_j} of the constrained objectives
    interval: int = 10
    dual_lr: float = 0.1
    mu: dict = None             # {j: multiplier}
    g: dict = field(default_factory=dict)  # {j: f_j - f_j*} behind each choice
    name = "constrained"

    def __post_init__(self):
        super().__post_init__()
        self.mu = self.mu if self.mu is not None else {j: 0.0 for j in self.budgets}

    def needs(self, i):
        return i in self.budgets

    def pick(self, it, gap):
        """every `interval` steps the constrained gaps are re-evaluated and the multipliers take a
        step; then one objective is drawn with probability proportional to lambd_i + mu_i."""
        if it % self.interval == 0 or len(self.g) < len(self.budgets):
            self.g = {j: gap(j) for j in self.budgets}
            self.mu = dual_update(self.mu, self.g, self.budgets, self.dual_lr)
        return [self.draw(constrained_probs(self.w, self.mu))]

    def update(self, i, gap):
        if i in self.g:
            self.g[i] = gap

    def logged(self):
        return {**{f"g_{j}": v for j, v in self.g.items()}, **{f"mu_{j}": v for j, v in self.mu.items()}}

    def state_dict(self):
        return {"rng": self.rng, "mu": dict(self.mu), "g": dict(self.g)}

    def load_state_dict(self, st):
        super().load_state_dict(st)
        self.mu, self.g = ({int(j): v for j, v in st[k].items()} for k in ("mu", "g"))

class Select(Mix):
    name, joint = "select", False

METHODS = {m.name: m for m in (Sequential, Mix, Alright, Maxright, Constrained, Select)}

def make(name, w, total_iters=0, seed=0, interval=10, budgets=None, dual_lr=0.1):
    """the method `name` for K = len(w) objectives (K = 1: the single-objective run, whatever name)."""
    if len(w) == 1:
        return Method(w, total_iters)
    cls = METHODS[name]
    kw = {Alright: dict(seed=seed), Maxright: dict(interval=interval),
          Constrained: dict(seed=seed, interval=interval, budgets=budgets or {}, dual_lr=dual_lr)}.get(cls, {})
    return cls(tuple(w), total_iters, **kw)

# -----------------------------------------------------------------------------
# f* and early stopping (docs/algorithms.md §2.6)

def estimate_opt(i, n, train, evaluate, params, optimizer, loaders, before_restore=lambda: None, progress=lambda r: r):
    """f_i*: the eval loss after n steps of objective i alone from the current weights (train(it)
    runs step it), then the weights, the optimizer state (this rank's shard under ZeRO-1), the data
    positions and torch's RNG are put back as they were."""
    import torch
    from copy import deepcopy
    saved = [p.detach().clone() for p in params]
    local = getattr(optimizer, "optim", optimizer)  # zero 1: this rank's shard (its full state_dict needs a consolidation)
    opt_state = deepcopy(local.state_dict())
    positions = [d.state_dict() for d in loaders]
    rng = torch.get_rng_state()
    for it in progress(range(n)):
        train(it)
    value = evaluate()
    before_restore()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    local.load_state_dict(opt_state)
    for d, s in zip(loaders, positions):
        d.load_state_dict(s)
    torch.set_rng_state(rng)
    return value

def early_stop(ev, opt, eps, pareto):
    """why a joint run stops at an evaluation `ev` = {i: f_i}, or '': a gap f_i - f_i* <= eps where
    f_i* is known, or the point within eps of weakly dominating a point of the reference front."""
    if any(i in ev and 0 <= opt[i] and ev[i] - opt[i] <= eps for i in opt):
        return "an objective is within eps of its optimum"
    if any(all(i in ev and ev[i] <= p[i - 1] + eps for i in opt) for p in pareto):
        return "the reference Pareto front is reached"
    return ""
