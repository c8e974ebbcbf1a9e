"""
The methods (docs/algorithms.md §2): how each optimizer step picks the objective(s) it trains, with
everything a method owns. lambd = (lambd_1, ..., lambd_K) are the weights on the simplex.

    sequential  objective i for round(lambd_i T) steps, in order 1..K
    mix         every objective every step, loss sum_i lambd_i f_i (one backward)
    alright     objective i with probability lambd_i, one uniform draw per step
    maxright    argmax_i lambd_i (f_i - f_i*), ties to the lowest i
    constrained a forgetting budget f_j - f_j* <= budget_j at the end: budgeted j drawn with a probability
                that follows j's gap on held-out rows, the free objectives the rest (lambd-weighted)
    select      every objective every step: the trusted set and the weighted noisy set (selector.py)

A method is one class. It declares its config keys (with defaults and rules) and its per-objective
keys, checks a config, says which rows it holds out and how long an epoch is, trains a step, acts
after a step and at the end, adds to the summary, and says what step j of a T-step run computes
(resume's schedule check). train.py calls these hooks and never asks which method runs: adding a
method is one class in METHODS. The picks are pure functions below; `pick(it, gap)` gets the
evaluation as a callable, gap(i) = f_i - f_i* on a fresh global batch of objective i, and
`update(i, gap)` the trained objective's gap from its pre-update training loss.
"""
import math
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

Q_MIN, Q_MAX = 0.05, 0.85  # a budgeted objective's share of the draws: the free objectives keep >= 15% of the steps

def logit(p):
    return math.log(p / (1 - p))

def budget_step(x, gap, budget, margin, lr):
    """one update of a budgeted objective's draw logit x from its gap measured on held-out rows: up
    by lr per budget of excess over the target (1 - margin) x budget, down while under it; the
    excess clipped to [-1, 2] budgets, so one noisy measurement moves it a bounded amount, and x
    kept within logit(Q_MIN) .. logit(Q_MAX)."""
    excess = min(2.0, max(-1.0, gap / budget - (1 - margin)))
    return min(logit(Q_MAX), max(logit(Q_MIN), x + lr * excess))

def budget_probs(w, q):
    """the draw's probabilities: budgeted objective j with probability q_j (their sum capped at
    Q_MAX while a free objective exists), the free objectives sharing the rest in proportion to
    lambd (equally when their lambd are all 0); all objectives budgeted: the q_j normalized."""
    K, free = len(w), [i for i in range(1, len(w) + 1) if i not in q]
    if not free:
        return [q[i] / sum(q.values()) for i in range(1, K + 1)]
    scale = min(1.0, Q_MAX / sum(q.values())) if q else 1.0
    rest = 1.0 - scale * sum(q.values())
    wf = sum(w[i - 1] for i in free)
    return [scale * q[i] if i in q else rest * (w[i - 1] / wf if wf > 0 else 1 / len(free)) for i in range(1, K + 1)]

# -----------------------------------------------------------------------------
# the methods

INTERVAL = Key(10, ">= 1", "maxright / constrained re-evaluate the gaps every k steps")

class Method:
    """a single-objective run (and the hooks every method has): objective 1 every step."""
    name = "single"
    keys = {}                   # its config keys {name: Key}
    objective_keys = {}         # its per-objective keys {name: Key}: KEY_i sets objective i's
    joint = False               # trains objectives one after another in one run: eps and pareto_front apply
    held_out = False            # pick's gap(i) is measured on a fresh batch of training rows (True: held-out rows)

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

    def extend(self, it, last_eval, opt):
        """after step it >= T, with the last evaluation: whether to train one more step."""
        return False

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
    """a forgetting budget: the lambd-weighted free objectives as far as they go while each budgeted
    objective j ends with f_j - f_j* <= budget_j on its eval set. One objective per step, drawn at
    random (ALRIGHT's cost, single steps interleaved): budgeted j with probability q_j, which moves
    every maxright_interval steps with j's gap measured on a fresh batch of its held-out rows
    (budget_step: up while over (1 - budget_margin) x budget_j, down while under); the free
    objectives share the rest. After step T, while the last evaluation finds a budget broken, it
    trains the most broken budgeted objective one step at a time, evaluated after each (at most
    max_settle_iters steps): the exported model keeps its budgets, or the summary says by how much not."""
    name = "constrained"
    keys = dict(maxright_interval=INTERVAL,
                dual_lr=Key(1.0, "> 0", "constrained: how fast a budgeted objective's share of the steps moves (its "
                                        "logit per budget of excess)"),
                budget_margin=Key(0.2, "[0, 1)", "constrained: the run aims at (1 - budget_margin) x budget_j"),
                max_settle_iters=Key(-1, ">= 0 or -1; -1 = max(10, T // 10)", "constrained: the most steps after T "
                                     "spent bringing a broken budget back"))
    objective_keys = dict(budget=Key(-1.0, ">= 0 or -1; -1 = none",
                                     "constrained: the largest gap f_i - f_i* objective i may end with"))
    held_out = True             # pick's gap(j) is measured on held-out rows

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.budgets = {j: b for j, b in self.per["budget"].items() if b >= 0}
        self.x = {j: logit(min(Q_MAX, max(Q_MIN, self.w[j - 1]))) for j in self.budgets}  # draw logits, from lambd
        self.g = {}             # {j: f_j - f_j*} on held-out rows, behind each choice
        self.settled, self.settling = 0, None  # steps after T, and the objective of the next one

    @classmethod
    def check(cls, c, kinds, world_size, objective):
        if len(kinds) < 2:
            return
        budgets = [i for i in range(1, len(kinds) + 1) if objective(i).budget >= 0]
        if not budgets:
            raise ConfigError("method=constrained needs a forgetting budget: set budget_i >= 0 (the largest gap "
                              "f_i - f_i* objective i may end with) for at least one objective, e.g. --budget_1=0.1")
        blind = [i for i in budgets if not objective(i).eval_split and c["eval_frac"] == 0]
        if blind:
            raise ConfigError(f"config key budget_{blind[0]} is set, but objective {blind[0]} has no eval set "
                              f"(eval_frac=0 and eval_split_{blind[0]} empty): a budget is measured and kept "
                              f"on held-out rows")
        zero = [i for i in budgets if objective(i).budget == 0]
        if zero:
            raise ConfigError(f"config key budget_{zero[0]}=0: a gap of exactly 0 (objective {zero[0]} at its optimum "
                              f"f*) cannot be kept while another objective trains; give a budget > 0")

    def needs(self, i):
        return i in self.budgets

    def q(self):
        return {j: 1 / (1 + math.exp(-x)) for j, x in self.x.items()}

    def pick(self, it, gap):
        """every maxright_interval steps the budgeted gaps are measured on held-out rows and their
        draw logits take a step; then one objective is drawn. After T: the objective extend() chose."""
        if it >= self.total_iters:
            return [self.settling]
        if it % self.c["maxright_interval"] == 0 or len(self.g) < len(self.budgets):
            self.g = {j: gap(j) for j in self.budgets}
            self.x = {j: budget_step(self.x[j], self.g[j], b, self.c["budget_margin"], self.c["dual_lr"])
                      for j, b in self.budgets.items()}
        return [self.draw(budget_probs(self.w, self.q()))]

    def extend(self, it, last_eval, opt):
        """after T steps: one more step while a budget is broken on the last evaluation (the most
        broken, relative to its budget), at most max_settle_iters (-1: max(10, T // 10)) of them."""
        cap = self.c["max_settle_iters"] if self.c["max_settle_iters"] >= 0 else max(10, self.total_iters // 10)
        over = {j: (last_eval[f"eval_loss_{j}"] - opt[j] - b) / b for j, b in self.budgets.items()
                if f"eval_loss_{j}" in last_eval and last_eval[f"eval_loss_{j}"] - opt[j] > b}
        if not over or self.settled >= cap:
            return False
        self.settling, self.settled = max(sorted(over), key=lambda j: over[j]), self.settled + 1
        return True

    def logged(self):
        return {**{f"g_{j}": v for j, v in self.g.items()}, **{f"q_{j}": v for j, v in self.q().items()}}

    def summary(self, last_eval, opt):
        """each budget, the gap it ended with, whether it held (and by how much not), the steps after T."""
        out, held = {"settle_iters": self.settled}, True
        for j, b in self.budgets.items():
            g = last_eval.get(f"eval_loss_{j}", float("inf")) - opt[j]
            out.update({f"budget_{j}": b, f"final_gap_{j}": g, f"budget_held_{j}": g <= b})
            if g > b:
                out[f"budget_excess_{j}"] = g - b
            held = held and g <= b
        out["budgets_held"] = held
        return out

    def state_dict(self):
        return {
            "rng": self.rng,
            "x": dict(self.x),
            "g": dict(self.g),
            "settled": self.settled,
            "settling": self.settling,
        }

    def load_state_dict(self, st):
        super().load_state_dict(st)
        self.x, self.g = ({int(j): v for j, v in st[k].items()} for k in ("x", "g"))
        self.settled, self.settling = int(st["settled"]), st["settling"]

class Select(Method):
    """bilevel data selection (selector.py): dataset_1 is the trusted set, dataset_2 the one to
    filter; each step trains on both, with one learned weight per row of dataset_2."""
    name = "select"
    keys = dict(
        selector_activation=Key("softmax", "one of softmax, sigmoid"),
        selector_learning_rate=Key(1e-4, ">= 0; 0 = uniform weights"),
        selector_algorithm=Key("memory", "one of memory, penalty",
                               "memory: one forward feeds both updates; penalty: an auxiliary theta-hat"),
        aux_learning_rate=Key(1e-3, "> 0",
                              "penalty: Adam lr of theta-hat, which tracks argmin of the weighted noisy loss"),
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
            raise ConfigError(f"method=select needs obj_1 and obj_2 of kinds with per-row losses "
                              f"({', '.join(per_row)}) and no obj_3: "
                              f"dataset_1 is the trusted set, dataset_2 the one to filter")
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
    # zero 1: this rank's shard (its full state_dict needs a consolidation)
    local = getattr(optimizer, "optim", optimizer)
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
    if any(i in ev and opt[i] is not None and ev[i] - opt[i] <= eps for i in opt):
        return "an objective is within eps of its optimum"
    if any(all(i in ev and ev[i] <= p[i - 1] + eps for i in opt) for p in pareto):
        return "the reference Pareto front is reached"
    return ""
