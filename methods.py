"""
The methods (docs/algorithms.md §2): how each optimizer step picks the objective(s) it trains, with
everything a method owns. lambd = (lambd_1, ..., lambd_K) are the weights on the simplex.

    sequential  objective i for round(lambd_i T) steps, in order 1..K
    mix         every objective every step, loss sum_i lambd_i f_i (one backward)
    alright     objective i with probability lambd_i, one uniform draw per step
    maxright    argmax_i lambd_i (f_i - f_i*), ties to the lowest i
    constrained objective i with probability proportional to lambd_i + mu_i, where mu_j >= 0 is the
                multiplier of objective j's forgetting budget f_j - f_j* <= budget_j (primal-dual)
    select      every objective every step: the trusted set and the weighted noisy set (selector.py)

A method is one class. It declares its config keys (with defaults and rules) and its per-objective
keys, checks a config, says which rows it holds out and how long an epoch is, trains a step, acts
after a step and at the end, adds to the summary, and says what step j of a T-step run computes
(resume's schedule check). train.py calls these hooks and never asks which method runs: adding a
method is one class in METHODS. The picks are pure functions below; `pick(it, gap)` gets the
evaluation as a callable, gap(i) = f_i - f_i* on a fresh global batch of objective i, and
`update(i, gap)` the trained objective's gap from its pre-update training loss.
"""
import random

from configurator import Key
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

# -----------------------------------------------------------------------------
# the picks

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
    """the first n objectives ALRIGHT trains with this seed (what a run's draw state yields)."""
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
# the methods

INTERVAL = Key(10, ">= 1", "maxright / constrained re-evaluate the gaps every k steps")

class Method:
    """a single-objective run (and the hooks every method has): objective 1 every step."""
    name = "single"
    keys = {}                   # its config keys {name: Key}
    objective_keys = {}         # its per-objective keys {name: Key}: KEY_i sets objective i's
    joint = False               # trains objectives one after another in one run: eps and pareto_front apply

    def __init__(self, w, total_iters=0, **config):
        """w: the K weights; config: the run's keys (each its default where absent; seed: the draws')."""
        self.w, self.total_iters, self.seed = tuple(w), total_iters, config.get("seed", 0)
        self.c = {k: config.get(k, key.default) for k, key in self.keys.items()}
        self.per = {k: {i: config.get(f"{k}_{i}", config.get(k, key.default)) for i in range(1, len(self.w) + 1)}
                    for k, key in self.objective_keys.items()}

    @classmethod
    def check(cls, c, kinds, world_size, objective):
        """this method's checks of a config (ConfigError naming the key); objective(i): objective i's keys."""

    def eval_frac(self, i, eval_frac):
        """the share of objective i's rows held out for evaluation."""
        return eval_frac

    def steps_per_epoch(self, objectives):
        """an epoch of a joint run is one pass over the longest dataset."""
        return max(o.loader.steps_per_epoch for o in objectives.values())

    def start(self, run):
        """after set-up, before the loop: run holds the objectives, the step, params, ... (train.py)."""

    def needs(self, i):
        """whether it needs f_i* (estimated before the loop when not given)."""
        return False

    def pick(self, it, gap=None):
        return [1]

    def train(self, chosen, run):
        """one step's forward and backward: ({i: (loss, stats)}, global token count)."""
        return run.train_step(chosen)

    def update(self, i, gap):
        """after a step of objective i alone: its gap from the step's training loss."""

    def after_step(self, it):
        pass

    def logged(self):
        """the train line's fields behind this step's choice."""
        return {}

    def finish(self, run):
        """at the end, after final/ is written."""

    def summary(self, last_eval, opt):
        """what it adds to summary.json and the printed summary."""
        return {}

    def schedule_at(self, j, T):
        """what step j of a T-step run computes that depends on T, besides the learning rate."""
        return None

    def state_dict(self):
        return {}

    def load_state_dict(self, st):
        pass

class Sequential(Method):
    name = "sequential"

    def pick(self, it, gap=None):
        return [sequential_pick(it, list(self.w), self.total_iters)]

    def schedule_at(self, j, T):
        return sequential_pick(j, list(self.w), T)

class Mix(Method):
    name, joint = "mix", True

    def pick(self, it, gap=None):
        return list(range(1, len(self.w) + 1))

class Alright(Method):
    name, joint = "alright", True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.rng = random.Random(self.seed).getstate()  # one draw per step, saved with the run

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

class Maxright(Method):
    name, joint = "maxright", True
    keys = dict(maxright_interval=INTERVAL)

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.s = {}  # {i: lambd_i (f_i - f_i*)}, the weighted gaps behind each choice

    def needs(self, i):
        return True

    def pick(self, it, gap):
        """every maxright_interval steps all gaps are re-evaluated; between, the trained one follows update()."""
        if it % self.c["maxright_interval"] == 0 or len(self.s) < len(self.w):
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

class Constrained(Alright):
    name = "constrained"
    keys = dict(maxright_interval=INTERVAL,
                dual_lr=Key(0.1, "> 0", "step size of the multipliers mu_i <- max(0, mu_i + dual_lr (gap_i - budget_i))"))
    objective_keys = dict(budget=Key(-1.0, ">= 0 or -1; -1 = none",
                                     "the largest gap f_i - f_i* objective i may end with"))

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.budgets = {j: b for j, b in self.per["budget"].items() if b >= 0}
        self.mu = {j: 0.0 for j in self.budgets}  # {j: multiplier}
        self.g = {}  # {j: f_j - f_j*} behind each choice

    @classmethod
    def check(cls, c, kinds, world_size, objective):
        if len(kinds) > 1 and not any(objective(i).budget >= 0 for i in range(1, len(kinds) + 1)):
            raise ConfigError("method=constrained needs a forgetting budget: set budget_i >= 0 (the largest gap "
                              "f_i - f_i* objective i may end with) for at least one objective, e.g. --budget_1=0.1")

    def needs(self, i):
        return i in self.budgets

    def pick(self, it, gap):
        """every maxright_interval steps the constrained gaps are re-evaluated and the multipliers take a
        step; then one objective is drawn with probability proportional to lambd_i + mu_i."""
        if it % self.c["maxright_interval"] == 0 or len(self.g) < len(self.budgets):
            self.g = {j: gap(j) for j in self.budgets}
            self.mu = dual_update(self.mu, self.g, self.budgets, self.c["dual_lr"])
        return [self.draw(constrained_probs(self.w, self.mu))]

    def update(self, i, gap):
        if i in self.g:
            self.g[i] = gap

    def logged(self):
        return {**{f"g_{j}": v for j, v in self.g.items()}, **{f"mu_{j}": v for j, v in self.mu.items()}}

    def summary(self, last_eval, opt):
        """each budget, its multiplier, and whether every budget held at the end on the eval sets."""
        out = {f"budget_{j}": b for j, b in self.budgets.items()}
        out.update({f"mu_{j}": v for j, v in self.mu.items()})
        out["budgets_held"] = all(last_eval.get(f"eval_loss_{j}", float("inf")) - opt[j] <= b
                                  for j, b in self.budgets.items())
        return out

    def state_dict(self):
        return {"rng": self.rng, "mu": dict(self.mu), "g": dict(self.g)}

    def load_state_dict(self, st):
        super().load_state_dict(st)
        self.mu, self.g = ({int(j): v for j, v in st[k].items()} for k in ("mu", "g"))

class Select(Method):
    """bilevel data selection (selector.py): dataset_1 is the trusted set, dataset_2 the one to
    filter; each step trains on both, with one learned weight per row of dataset_2."""
    name = "select"
    keys = dict(
        selector_activation=Key("softmax", "one of softmax, sigmoid"),
        selector_learning_rate=Key(1e-4, ">= 0; 0 = uniform weights"),
        selector_algorithm=Key("memory", "one of memory, penalty",
                               "memory: one forward feeds both updates; penalty: an auxiliary theta-hat"),
        aux_learning_rate=Key(1e-3, "> 0", "penalty: Adam lr of theta-hat, which tracks argmin of the weighted noisy loss"),
        aux_steps=Key(1, ">= 1", "penalty: theta-hat steps per selector step"),
        upperlevel_weight=Key(0.5, "[0, 1]", "rho = 1 / (1 + gamma)"),
        upperlevel_weight_decay=Key(0.1, ">= 0", "rho -= decay at the start of every epoch >= 1"),
        select_ratio=Key(0.8, "(0, 1]", "the share of dataset_2's rows kept in selected.jsonl"),
        selector_labels=Key("", "", "optional {\"id\", \"corrupted\"} jsonl, for the summary only"),
    )

    @classmethod
    def check(cls, c, kinds, world_size, objective):
        import objectives
        per_row = [k for k, v in objectives.KINDS.items() if v.per_row]
        if len(kinds) != 2 or not all(k in per_row for k in kinds):
            raise ConfigError(f"method=select needs obj_1 and obj_2 of kinds with per-row losses ({', '.join(per_row)}) "
                              f"and no obj_3: dataset_1 is the trusted set, dataset_2 the one to filter")
        if c["packing"]:
            raise ConfigError("config keys method=select and packing=True: the selector weighs each document's loss, "
                              "a packed row holds several documents; set packing=False")
        if c["lambd"] != 0.5:
            raise ConfigError(f"config key lambd={c['lambd']!r} does nothing under method=select: the upper-level "
                              f"weight (the original's --lambd) is config key upperlevel_weight")
        if c["selector_algorithm"] == "penalty" and world_size > 1 and c["zero_stage"] > 1:
            raise ConfigError("selector_algorithm=penalty supports zero_stage 0 and 1")

    def eval_frac(self, i, eval_frac):
        return 0.0 if i == 2 else eval_frac  # every row of the filtered set gets a weight

    def steps_per_epoch(self, objectives):
        return objectives[2].loader.steps_per_epoch

    def start(self, run):
        from selector import Selection
        self.selection = Selection(run.config, run.objectives[1], run.objectives[2], run.step, run.params, run.device,
                                   run.all_sum, run.sync_ctx, run.log, run.master)

    def pick(self, it, gap=None):
        return [1, 2]

    def train(self, chosen, run):
        return self.selection.train()

    def after_step(self, it):
        self.selection.after_step()

    def finish(self, run):
        self.selection.save(final=True)

    def state_dict(self):
        return self.selection.state_dict()

    def load_state_dict(self, st):
        self.selection.load_state_dict(st)

METHODS = {m.name: m for m in (Sequential, Mix, Alright, Maxright, Constrained, Select)}

def config_keys():
    """every method's config keys with their defaults (train.py's globals)."""
    return {k: key.default for m in METHODS.values() for k, key in m.keys.items()}

def per_objective_keys():
    """every method's per-objective keys with their defaults (KEY, and KEY_i for objective i)."""
    return {k: key.default for m in METHODS.values() for k, key in m.objective_keys.items()}

def make(name, w, total_iters=0, **config):
    """the method `name` for K = len(w) objectives (K = 1: the single-objective run, whatever name);
    config: the run's keys (each method reads its own)."""
    return (Method if len(w) == 1 else METHODS[name])(w, total_iters, **config)

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
