"""BAC's schedule solvers: pure NumPy dynamic programs over a branch's recorded outputs, no torch, no hooks.

``optimal_updates`` is the paper's program (arXiv 2506.13456, maximum summed cosine similarity); the others are
ours: the least squared L2 error of what each reused step returns, under plain reuse or the first-order forecast,
from Gram matrices (``reuse_errors``, ``forecast_errors``, ``least_error_schedules``), the sensitivity metric's
per-step Gram matrices (``sensitivity_gram``), the budget shared among blocks (``share_updates``), and the paper's
Bubbling Union (``bubbling_union``). ``accel.methods.bac.calibration`` feeds them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FFN_KINDS = ("ff", "ff_context")


def update_count(num_steps: int, budget: float) -> int:
    """``M = max(1, round(budget * num_steps))``, at most ``num_steps``."""
    return max(1, min(num_steps, round(budget * num_steps)))


def uniform_updates(num_steps: int, budget: float, final_step: bool = False) -> list[int]:
    """``M`` evenly spaced update steps starting at step 0; with ``final_step`` (and ``M >= 2``) the last of them
    is the final step."""
    count = update_count(num_steps, budget)
    if final_step and count >= 2:
        return sorted({int(step) for step in np.round(np.linspace(0, num_steps - 1, count))})
    return sorted({int(step) for step in np.floor(np.arange(count) * num_steps / count)})


def optimal_updates(similarity: np.ndarray, count: int) -> list[int]:
    """The ``count`` update steps (step 0 among them) that maximise the summed similarity between each update's
    output and the outputs of the steps that reuse it, by dynamic programming in O(count * T^2).

    ``dp[m, j]``: best value with m updates, the last at step j, counting the steps before j;
    ``dp[m, j] = max_i dp[m-1, i] + phi(i, j)`` with ``phi(i, j) = sum_{i<k<j} S[i, k]``; the tail ``phi(j, T)``
    closes the last segment.
    """
    steps = similarity.shape[0]
    count = max(1, min(count, steps))
    prefix = np.cumsum(similarity, axis=1)
    diagonal = prefix[np.arange(steps), np.arange(steps)]

    def segment(j: int) -> np.ndarray:  # phi(i, j) for every i < j
        return prefix[:j, j - 1] - diagonal[:j]

    best = np.full((count + 1, steps), -np.inf)
    parent = np.zeros((count + 1, steps), dtype=int)
    best[1, 0] = 0.0
    for m in range(2, count + 1):
        for j in range(m - 1, steps):
            candidates = best[m - 1, :j] + segment(j)
            parent[m, j] = int(np.argmax(candidates))
            best[m, j] = candidates[parent[m, j]]
    tails = np.array([best[count, j] + (prefix[j, steps - 1] - diagonal[j]) for j in range(steps)])
    last = int(np.argmax(tails))
    chosen = [last]
    for m in range(count, 1, -1):
        chosen.append(int(parent[m, chosen[-1]]))
    return sorted(chosen)


def _inner(gram: np.ndarray, k: np.ndarray):
    """``g(i, j)``: the inner product of steps i and j, under step k's metric when ``gram`` is per step."""
    if gram.ndim == 2:
        return lambda i, j: gram[i, j]
    return lambda i, j: gram[k, i, j]


def reuse_errors(gram: np.ndarray) -> np.ndarray:
    """``E[b, k] = ||y_k - y_b||^2`` for every pair of steps, from the Gram matrix ``gram[i, j] = <y_i, y_j>``, or
    from one Gram matrix per step, ``gram[k, i, j]``, the error at step k measured in step k's metric."""
    b, k = np.meshgrid(*(np.arange(gram.shape[-1]),) * 2, indexing="ij")
    g = _inner(gram, k)
    return g(k, k) + g(b, b) - 2 * g(k, b)


def forecast_errors(gram: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """``F[a, b, k] = ||y_k - (y_b + r (y_b - y_a))||^2`` with ``r = gain * (k - b) / (b - a)`` for ``a < b < k``,
    else 0: the error of the first-order forecast from updates ``a`` and ``b`` at step ``k``, from the Gram matrix
    (or one per step, as in ``reuse_errors``)."""
    steps = gram.shape[-1]
    a, b, k = np.meshgrid(*(np.arange(steps),) * 3, indexing="ij")
    valid = (a < b) & (b < k)
    ratio = np.where(valid, gain * (k - b) / np.where(valid, b - a, 1), 0.0)
    g = _inner(gram, k)
    errors = (g(k, k) + (1 + ratio) ** 2 * g(b, b) + ratio**2 * g(a, a) - 2 * (1 + ratio) * g(k, b)
              + 2 * ratio * g(k, a) - 2 * ratio * (1 + ratio) * g(a, b))
    return np.where(valid, np.maximum(errors, 0.0), 0.0)


def schedule_error(gram: np.ndarray, updates: list[int], forecast: int = 0, gain: float = 1.0) -> float:
    """The summed squared L2 error of what the non-update steps return under ``updates``, from the Gram matrix (or
    one per step)."""
    total = 0.0
    for step in range(gram.shape[-1]):
        earlier = [update for update in updates if update <= step]
        if earlier[-1] == step:
            continue
        weights = {step: 1.0}
        if forecast and len(earlier) >= 2:
            a, b = earlier[-2:]
            ratio = gain * (step - b) / (b - a)
            weights[b], weights[a] = -(1 + ratio), ratio
        else:
            weights[earlier[-1]] = -1.0
        index, weight = list(weights), np.array(list(weights.values()))
        metric = gram if gram.ndim == 2 else gram[step]
        total += float(weight @ metric[np.ix_(index, index)] @ weight)
    return max(total, 0.0)


def sensitivity_gram(products: np.ndarray) -> np.ndarray:
    """One Gram matrix per step for ``metric="sensitivity"``: ``products[n, k, i] = <g_k, y_i>``, the output at step
    i projected on the gradient at step k of one random projection of one sample's final output, gives
    ``gram[k, i, j] = sum_n products[n, k, i] * products[n, k, j]``. An error ``d`` at step k then costs
    ``sum_n <g_k, d>^2``, an estimate of the squared first-order change it makes to the final sample. Centred on the
    mean over i, which leaves every reuse or forecast error unchanged (their weights sum to zero)."""
    centred = products - products.mean(axis=2, keepdims=True)
    return np.einsum("nki,nkj->kij", centred, centred)


def least_error_updates(gram: np.ndarray, count: int, forecast: int = 0, final_step: bool = False,
                        gain: float = 1.0) -> list[int]:
    """The ``count`` update steps (step 0 among them, and the last step with ``final_step``) that minimise the summed
    squared L2 error of what every other step reuses, under the reuse rule in force: the last update's output
    (``forecast=0``), or the first-order forecast from the last two updates (``forecast=1``; the steps before the
    second update reuse the first; ``gain`` scales the forecast's extrapolation). ``gram[i, j]`` is the inner product
    of the branch's outputs at steps i and j.
    """
    if not forecast:  # one program for this count, not one for every count up to it
        steps, count = gram.shape[-1], max(1, min(count, gram.shape[-1]))
        negated = -reuse_errors(gram)
        if final_step and count >= 2:
            return [*optimal_updates(negated[:-1, :-1], count - 1), steps - 1]
        return optimal_updates(negated, count)
    return least_error_schedules(gram, count, forecast, final_step, gain)[-1]


def least_error_schedules(gram: np.ndarray, max_count: int, forecast: int = 0, final_step: bool = False,
                          gain: float = 1.0) -> list[list[int]]:
    """``least_error_updates`` for every count from 1 to ``max_count``, in that order.

    ``forecast=0`` is ``optimal_updates`` on the negated error. ``forecast=1`` is one dynamic program over the last
    two updates, ``f[m+1][b, c] = min_a f[m][a, b] + sum_{b<k<c} F[a, b, k]``, in O(max_count * T^3) time and
    O(T^3) memory.
    """
    steps = gram.shape[-1]
    max_count = max(1, min(max_count, steps))
    if not forecast:
        return [least_error_updates(gram, count, 0, final_step) for count in range(1, max_count + 1)]
    reuse = reuse_errors(gram)
    # segment[a, b, c]: the forecast error of the steps strictly between updates b and c (c = steps: to the end)
    partial = np.cumsum(forecast_errors(gram, gain), axis=2)
    segment = np.concatenate([np.zeros((steps, steps, 1)), partial], axis=2)  # F is 0 for k <= b: sums b < k < c
    # cost[a, b]: the best total over the steps before b, with a and b the last two updates (a < b)
    cost = np.full((steps, steps), np.inf)
    cost[0, 1:] = [reuse[0, 1:b].sum() for b in range(1, steps)]
    schedules, parents = [[0]], []
    for count in range(2, max_count + 1):
        if count > 2:
            totals = cost[:, :, None] + segment[:, :, :steps]  # [a, b, c]
            totals[:, np.tril_indices(steps)[0], np.tril_indices(steps)[1]] = np.inf  # c must follow b
            parent = np.argmin(totals, axis=0)  # [b, c]
            cost = np.take_along_axis(totals, parent[None], axis=0)[0]
            parents.append(parent)
        if final_step:
            chosen = [int(np.argmin(cost[:, steps - 1])), steps - 1]
        else:
            closing = cost + segment[:, :, steps]
            chosen = [int(i) for i in np.unravel_index(np.argmin(closing), closing.shape)]
        for parent in reversed(parents):
            chosen.insert(0, int(parent[chosen[0], chosen[1]]))
        schedules.append(chosen)
    return schedules


def share_updates(errors: list[list[float]], total: int) -> list[int]:
    """How many updates each group gets, 1 to ``len(errors[g])`` each and ``total`` in all, to minimise the summed
    error; ``errors[g][m - 1]`` is group g's least error with m updates. Exact, by dynamic programming over groups."""
    best = {0: (0.0, [])}  # updates used so far -> (error, counts)
    for table in errors:
        step = {}
        for used, (error, counts) in best.items():
            for count, value in enumerate(table, start=1):
                if used + count <= total and (used + count not in step or error + value < step[used + count][0]):
                    step[used + count] = (error + value, [*counts, count])
        best = step
    if total not in best:
        raise ValueError(f"Cannot share {total} updates among {len(errors)} groups.")
    return best[total][1]


def bubbling_union(updates: dict[str, list[int]], volatility: dict[str, float],
                   branches: dict[str, tuple[str, int, str, Any]], top_k: int) -> list[str]:
    """For each of the ``top_k`` most volatile branches, add the update steps of every FFN branch of the same
    denoiser at the same or a deeper block, so it is fresh whenever a downstream FFN recomputes. In place;
    returns the branches it changed, most volatile first."""
    ranked = sorted(volatility, key=lambda name: -volatility[name])[:top_k]
    for name in ranked:
        denoiser, index, _, _ = branches[name]
        merged = set(updates[name])
        for other, (other_denoiser, other_index, kind, _) in branches.items():
            if other_denoiser == denoiser and kind in FFN_KINDS and other_index >= index:
                merged |= set(updates[other])
        updates[name] = sorted(merged)
    return ranked
