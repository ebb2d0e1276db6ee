"""Independent NumPy float64 implementations of the optimizers, written from the specs
(``shared/specs/optimizers.md``), step by step, for the golden tests."""

from __future__ import annotations

import math

import numpy as np


def spam_warmup(s: int, interval: int, warmup: int) -> float:
    if s < interval:
        return 1.0
    j = s % interval
    if j >= warmup:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * j / (warmup + 1))) / 2.0


class Spam:
    """SPAM on a dict of float64 arrays. ``indices[name]``: kept flat indices (sparse) or None."""

    def __init__(
        self,
        shapes,
        *,
        lr,
        b1=0.9,
        b2=0.999,
        eps=1e-6,
        wd=0.0,
        theta=5000.0,
        interval=500,
        warmup=150,
        no_clip=20,
    ):
        self.hp = dict(
            lr=lr,
            b1=b1,
            b2=b2,
            eps=eps,
            wd=wd,
            theta=theta,
            interval=interval,
            warmup=warmup,
            no_clip=no_clip,
        )
        self.m = {k: np.zeros(s) for k, s in shapes.items()}
        self.v = {k: np.zeros(s) for k, s in shapes.items()}
        self.s = 0

    def set_sparse(self, name, indices):
        """Moments for ``name`` on the given flat indices only (fresh zeros, as after a redraw)."""
        self.m[name] = np.zeros(len(indices))
        self.v[name] = np.zeros(len(indices))

    def step(self, params, grads, indices=None):
        """Returns (new params, direction d) with p_new = p - lr*d - lr*wd*(p - lr*d)."""
        h = self.hp
        self.s += 1
        s = self.s
        clip_on = h["theta"] > 0 and s >= h["no_clip"] and s % h["interval"] >= h["no_clip"]
        scale = math.sqrt(1 - h["b2"] ** s) / (1 - h["b1"] ** s)
        scale *= spam_warmup(s, h["interval"], h["warmup"])
        new_params, directions = {}, {}
        for k, p in params.items():
            idx = None if indices is None else indices.get(k)
            g = grads[k].reshape(-1)[idx] if idx is not None else grads[k].copy()
            if s % h["interval"] == 0:
                self.m[k] = np.zeros_like(self.m[k])
                self.v[k] = np.zeros_like(self.v[k])
            if clip_on:
                bound = h["theta"] * self.v[k]
                spike = g * g > bound
                g = np.where(spike, np.sign(g) * np.sqrt(bound), g)
            self.m[k] = h["b1"] * self.m[k] + (1 - h["b1"]) * g
            self.v[k] = h["b2"] * self.v[k] + (1 - h["b2"]) * g * g
            u = scale * self.m[k] / (np.sqrt(self.v[k]) + h["eps"])
            if idx is not None:
                full = np.zeros(p.size)
                full[idx] = u
                u = full.reshape(p.shape)
            directions[k] = u
            stepped = p - h["lr"] * u
            new_params[k] = stepped - h["lr"] * h["wd"] * stepped
        return new_params, directions


class DiffGrad:
    def __init__(self, shapes, *, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
        self.hp = dict(lr=lr, b1=b1, b2=b2, eps=eps, wd=wd)
        self.m = {k: np.zeros(s) for k, s in shapes.items()}
        self.v = {k: np.zeros(s) for k, s in shapes.items()}
        self.prev = {k: np.zeros(s) for k, s in shapes.items()}
        self.k = 0

    def step(self, params, grads):
        h = self.hp
        self.k += 1
        out = {}
        for name, p in params.items():
            g = grads[name] + h["wd"] * p
            self.m[name] = h["b1"] * self.m[name] + (1 - h["b1"]) * g
            self.v[name] = h["b2"] * self.v[name] + (1 - h["b2"]) * g * g
            xi = 1.0 / (1.0 + np.exp(-np.abs(self.prev[name] - g)))
            self.prev[name] = g
            scale = math.sqrt(1 - h["b2"] ** self.k) / (1 - h["b1"] ** self.k)
            out[name] = p - h["lr"] * scale * self.m[name] * xi / (np.sqrt(self.v[name]) + h["eps"])
        return out


def clip_top(tree: dict, c: float, scale: float = 1.0) -> dict:
    """Pan & Li's operator by sorting every |x| (float64)."""
    if c == 0:
        return {k: v.copy() for k, v in tree.items()}
    a = np.sort(np.concatenate([np.abs(v).ravel() for v in tree.values()]))[::-1]
    n = a.size
    rank = math.floor(c * n) + 1
    thr = 0.0 if rank > n else a[rank - 1]
    t = thr * scale
    return {k: np.where(np.abs(v) >= t, np.sign(v) * t, v) for k, v in tree.items()}


class AdamCoordinateClipped:
    def __init__(self, shapes, *, lr, c, b1=0.9, b2=0.999, eps=1e-8, cu=0.0, scale=1.0, wd=0.0):
        self.hp = dict(lr=lr, c=c, b1=b1, b2=b2, eps=eps, cu=cu, scale=scale, wd=wd)
        self.m = {k: np.zeros(s) for k, s in shapes.items()}
        self.v = {k: np.zeros(s) for k, s in shapes.items()}
        self.k = 0

    def step(self, params, grads):
        h = self.hp
        self.k += 1
        clipped = clip_top(grads, h["c"], h["scale"])
        u = {}
        for name in params:
            self.m[name] = h["b1"] * self.m[name] + (1 - h["b1"]) * clipped[name]
            self.v[name] = h["b2"] * self.v[name] + (1 - h["b2"]) * grads[name] ** 2
            m_hat = self.m[name] / (1 - h["b1"] ** self.k)
            v_hat = self.v[name] / (1 - h["b2"] ** self.k)
            u[name] = m_hat / (np.sqrt(v_hat) + h["eps"])
        u = clip_top(u, h["cu"], h["scale"])
        return {k: p - h["lr"] * (u[k] + h["wd"] * p) for k, p in params.items()}
