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
    """``decoupled``: AdamW-style decay ``p -= lr * wd * p`` instead of the original's L2."""

    def __init__(self, shapes, *, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, decoupled=False):
        self.hp = dict(lr=lr, b1=b1, b2=b2, eps=eps, wd=wd)
        self.decoupled = decoupled
        self.m = {k: np.zeros(s) for k, s in shapes.items()}
        self.v = {k: np.zeros(s) for k, s in shapes.items()}
        self.prev = {k: np.zeros(s) for k, s in shapes.items()}
        self.k = 0

    def step(self, params, grads):
        h = self.hp
        self.k += 1
        out = {}
        for name, p in params.items():
            g = grads[name] if self.decoupled else grads[name] + h["wd"] * p
            self.m[name] = h["b1"] * self.m[name] + (1 - h["b1"]) * g
            self.v[name] = h["b2"] * self.v[name] + (1 - h["b2"]) * g * g
            xi = 1.0 / (1.0 + np.exp(-np.abs(self.prev[name] - g)))
            self.prev[name] = g
            scale = math.sqrt(1 - h["b2"] ** self.k) / (1 - h["b1"] ** self.k)
            u = scale * self.m[name] * xi / (np.sqrt(self.v[name]) + h["eps"])
            out[name] = p - h["lr"] * (u + (h["wd"] * p if self.decoupled else 0.0))
        return out


def top_fraction_threshold(tree: dict, c: float):
    """The (floor(c n) + 1)-th largest |x| by sorting every |x| in the leaves' dtype (NaN first),
    0 when that rank is past the end."""
    a = np.sort(np.concatenate([np.abs(v).ravel() for v in tree.values()]))[::-1]
    rank = math.floor(c * a.size) + 1
    return 0.0 if rank > a.size else a[rank - 1]


def clip_top(tree: dict, c: float, scale: float = 1.0) -> dict:
    """Pan & Li's operator by sorting every |x| (float64)."""
    if c == 0:
        return {k: v.copy() for k, v in tree.items()}
    t = top_fraction_threshold(tree, c) * scale
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


def _adam_dir(m, v, d, b1, b2, eps, count):
    m = b1 * m + (1 - b1) * d
    v = b2 * v + (1 - b2) * d * d
    return (m / (1 - b1**count)) / (np.sqrt(v / (1 - b2**count)) + eps), m, v


def _free(rule, r):
    return {"sign_sgd": np.sign(r), "sgd": r, "none": np.zeros_like(r)}[rule]


class Frugal:
    """FRUGAL on a flat dict of float64 arrays, from the spec.

    ``step(params, grads, choose)``: ``choose(name, g)`` returns the subspace of a projectable
    matrix at a refresh: ``("rows"|"cols"|"flat", indices)`` for selections or
    ``("proj_rows", A)`` / ``("proj_cols", B)`` for projectors; ``blocks(refresh_index)`` (block
    mode) returns the set of active block names (``"name"`` or ``"name[l]"`` for a stack)."""

    def __init__(
        self,
        projectable,
        *,
        lr,
        mode,
        T,
        free_rule="sign_sgd",
        free_scale=1.0,
        proj_scale=1.0,
        reset=True,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        wd=0.0,
    ):
        self.projectable, self.mode, self.T = projectable, mode, T
        self.hp = dict(
            lr=lr,
            free_rule=free_rule,
            fs=free_scale,
            ps=proj_scale,
            reset=reset,
            b1=b1,
            b2=b2,
            eps=eps,
            wd=wd,
        )
        self.s = 0
        self.inner = 0
        self.m, self.v, self.sub = {}, {}, {}

    def _adam(self, key, d, count):
        h = self.hp
        m = self.m.get(key, np.zeros_like(d))
        v = self.v.get(key, np.zeros_like(d))
        u, self.m[key], self.v[key] = _adam_dir(m, v, d, h["b1"], h["b2"], h["eps"], count)
        return u

    def step(self, params, grads, choose=None, blocks=None):
        h = self.hp
        refresh = self.s % self.T == 0
        refresh_index = self.s // self.T
        self.s += 1
        if refresh and h["reset"]:
            self.m = {k: v for k, v in self.m.items() if not k.startswith("P:")}
            self.v = {k: v for k, v in self.v.items() if not k.startswith("P:")}
            self.inner = 0
        self.inner = self.inner + 1 if h["reset"] else self.s
        active = blocks(refresh_index) if (self.mode == "block" and refresh) else None
        if active is not None:
            self.active = active
            # inactive blocks hold no state: one that leaves the active set loses its moments
            # (only observable without a reset, which drops every block's moments anyway)
            for moments in (self.m, self.v):
                for key in [k for k in moments if k.startswith("P:") and k[2:] not in active]:
                    del moments[key]
        out = {}
        for name, g in grads.items():
            if not self.projectable[name]:
                u = self._adam("R:" + name, g, self.s)
            elif self.mode == "block":
                mats = g if g.ndim == 3 else g[None]
                pieces = []
                for layer, block in enumerate(mats):
                    bname = f"{name}[{layer}]" if g.ndim == 3 else name
                    if bname in self.active:
                        pieces.append(h["ps"] * self._adam("P:" + bname, block, self.inner))
                    else:
                        pieces.append(h["ps"] * h["fs"] * _free(h["free_rule"], block))
                u = np.stack(pieces) if g.ndim == 3 else pieces[0]
            else:
                mats = g if g.ndim == 3 else g[None]
                pieces = []
                for layer, mat in enumerate(mats):
                    key = f"{name}[{layer}]"
                    if refresh:
                        self.sub[key] = choose(name, layer, mat)
                    kind, sub = self.sub[key]
                    if kind == "rows":
                        low = mat[sub]
                        up = lambda x, sub=sub, mat=mat: _scatter_rows(x, sub, mat.shape)
                    elif kind == "cols":
                        low = mat[:, sub]
                        up = lambda x, sub=sub, mat=mat: _scatter_rows(x.T, sub, mat.T.shape).T
                    elif kind == "flat":
                        low = mat.reshape(-1)[sub]
                        up = lambda x, sub=sub, mat=mat: _scatter_rows(x, sub, (mat.size,)).reshape(
                            mat.shape
                        )
                    elif kind == "proj_rows":
                        low = sub.T @ mat
                        up = lambda x, sub=sub: sub @ x
                    else:  # proj_cols
                        low = mat @ sub.T
                        up = lambda x, sub=sub: x @ sub
                    direction = self._adam("P:" + key, low, self.inner)
                    residual = mat - up(low)
                    pieces.append(
                        h["ps"] * (up(direction) + h["fs"] * _free(h["free_rule"], residual))
                    )
                u = np.stack(pieces) if g.ndim == 3 else pieces[0]
            out[name] = params[name] - h["lr"] * (u + h["wd"] * params[name])
        return out


def _scatter_rows(x, idx, shape):
    full = np.zeros(shape)
    full[idx] = x
    return full
