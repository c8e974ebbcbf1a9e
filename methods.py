"""
How each multi-objective method picks the objective(s) of a step (ALGORITHMS.md §2), as pure
functions of the weights lambd = (lambd_1, ..., lambd_K) on the simplex; train.py runs them.

    sequential  objective i for round(lambd_i T) steps, in order 1..K
    mix         every objective every step, loss sum_i lambd_i f_i (train.py: one backward)
    alright     objective i with probability lambd_i, one uniform draw per step
    maxright    argmax_i lambd_i (f_i - f_i*), ties to the lowest i (train.py refreshes the f_i)
"""
import random

from configurator import ConfigError

def weights(lambd, K):
    """lambd as K weights: a number means (lambd, 1 - lambd) for K = 2 (any number for K = 1, which
    ignores it); a tuple must hold K non-negative weights summing to 1. ConfigError names lambd."""
    if K == 1:
        return (1.0,)
    if isinstance(lambd, (int, float)):
        if K != 2:
            raise ConfigError(f"config key lambd: {K} objectives need {K} weights summing to 1 "
                             f"(e.g. --lambd={','.join(['%.3g' % (1 / K)] * K)}), got the single number {lambd}")
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
