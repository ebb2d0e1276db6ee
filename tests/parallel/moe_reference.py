"""Independent NumPy float64 references for the MoE strategies' tests."""

from __future__ import annotations

import math

import numpy as np


def gelu(x: np.ndarray) -> np.ndarray:
    """The tanh approximation of GELU (``jax.nn.gelu``'s default)."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def moe_output(x, experts, gates, wi, wo, keep=None) -> np.ndarray:
    """``sum_j gates[t, j] * gelu(x[t] @ wi[e]) @ wo[e]`` for ``e = experts[t, j]`` in float64;
    ``keep[t, j] = False`` drops that copy. ``x``: ``[T, d]``; canonical expert order."""
    x, wi, wo = (np.asarray(a, np.float64) for a in (x, wi, wo))
    gates = np.asarray(gates, np.float64)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(np.asarray(experts)[t]):
            if keep is None or keep[t, j]:
                out[t] += gates[t, j] * (gelu(x[t] @ wi[e]) @ wo[e])
    return out


def capacity_keep(experts, owner, num_devices: int, capacity: int) -> np.ndarray:
    """Which copies fit in a GShard buffer: per source device (``T / D`` consecutive tokens) and
    destination ``owner[e]``, the first ``capacity`` copies in token-major order."""
    experts = np.asarray(experts)
    tokens, k = experts.shape
    per_device = tokens // num_devices
    keep = np.zeros_like(experts, dtype=bool)
    for src in range(num_devices):
        used = np.zeros(num_devices, int)
        for t in range(src * per_device, (src + 1) * per_device):
            for j in range(k):
                dest = owner[experts[t, j]]
                keep[t, j] = used[dest] < capacity
                used[dest] += 1
    return keep


def greedy_owners(loads, num_devices: int, hot: int) -> np.ndarray:
    """Algorithm 2 as :mod:`parallel.moe.resharding` documents it: the ``hot`` most loaded
    experts dealt to devices in turn, the rest (most loaded first) each to the device with the
    least cold load that has room. Returns the owner device of each expert."""
    loads = np.asarray(loads, np.float64)
    per_device = loads.size // num_devices
    owner = np.zeros(loads.size, int)
    device_load = np.zeros(num_devices)
    free = np.full(num_devices, per_device)
    for i, e in enumerate(np.argsort(-loads, kind="stable")):
        if i < hot:
            d = i % num_devices
        else:
            d = int(np.argmin(np.where(free > 0, device_load, np.inf)))
            device_load[d] += loads[e]
        free[d] -= 1
        owner[e] = d
    return owner
