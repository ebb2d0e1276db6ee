"""An independent NumPy float64 reference of (Streaming) DiLoCo, written from the papers.

Douillard et al. 2023 (arXiv 2311.08105) and 2025 (arXiv 2501.18512): M replicas take inner Adam
steps; every H/P steps fragment p = (t / (H/P) - 1) mod P sends its outer gradient (global minus
local, averaged over replicas), which is applied tau steps later by Nesterov SGD on the global
copy, and merged into every replica with factor alpha. The fragment of every parameter element
is given as an integer array of the leaf's shape (no code shared with the library).
"""

from __future__ import annotations

import numpy as np


def quadratic_grad(leaf: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """Gradient of 0.5 * sum((s * leaf - t)**2) for batch = (s, t)."""
    s, t = batch
    return s * (s * leaf - t)


def streaming_diloco(
    params: list[np.ndarray],
    fragment_of: list[np.ndarray],
    batches: np.ndarray,  # [steps, M, 2]
    *,
    sync_every: int,
    fragments: int,
    overlap: int,
    alpha: float,
    inner_lr: float,
    outer_lr: float,
    outer_momentum: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
):
    """Returns (replica params [M][leaves], global params, outer momentum traces, skipped)."""
    steps, m = batches.shape[:2]
    period = sync_every // fragments
    local = [[np.array(x, np.float64) for x in params] for _ in range(m)]
    mu = [[np.zeros_like(x) for x in params] for _ in range(m)]
    nu = [[np.zeros_like(x) for x in params] for _ in range(m)]
    glob = [np.array(x, np.float64) for x in params]
    trace = [np.zeros_like(x) for x in params]  # elementwise, touched only when synced
    in_flight = None  # (fragment, outer gradient per leaf, due step)

    def apply(p, delta):
        for i, mask in enumerate(fragment_of):
            sel = mask == p
            trace[i][sel] = delta[i][sel] + outer_momentum * trace[i][sel]
            step = (
                delta[i][sel] + outer_momentum * trace[i][sel] if outer_momentum else delta[i][sel]
            )
            glob[i][sel] = glob[i][sel] - outer_lr * step
            for r in range(m):
                local[r][i][sel] = alpha * local[r][i][sel] + (1 - alpha) * glob[i][sel]

    for t in range(1, steps + 1):
        for r in range(m):
            for i in range(len(params)):
                g = quadratic_grad(local[r][i], batches[t - 1, r])
                mu[r][i] = b1 * mu[r][i] + (1 - b1) * g
                nu[r][i] = b2 * nu[r][i] + (1 - b2) * g * g
                mu_hat = mu[r][i] / (1 - b1**t)
                nu_hat = nu[r][i] / (1 - b2**t)
                local[r][i] = local[r][i] - inner_lr * mu_hat / (np.sqrt(nu_hat) + eps)
        if t % period == 0:
            p = (t // period - 1) % fragments
            delta = [
                np.where(
                    fragment_of[i] == p, np.mean([glob[i] - local[r][i] for r in range(m)], 0), 0
                )
                for i in range(len(params))
            ]
            if overlap == 0:
                apply(p, delta)
            else:
                in_flight = (p, delta, t + overlap)
        if in_flight is not None and in_flight[2] == t:
            apply(in_flight[0], in_flight[1])
            in_flight = None
    return local, glob, trace
