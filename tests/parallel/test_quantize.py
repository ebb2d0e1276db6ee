"""The low-bit codecs of the replica exchange against an independent NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel.quantize import FORMATS, block_multiple, dequantize, payload_bytes, quantize

E3M0_MAGNITUDES = np.array([0.0] + [2.0 ** (e - 7) for e in range(1, 8)])  # x scale


def e3m0_reference(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes (0..15) and decoded values, float64, by enumerating the 8 magnitudes (nearest,
    ties to the larger); the scale travels as float32."""
    blocks = x.reshape(-1, block).astype(np.float64)
    scale = np.abs(blocks).max(axis=1, keepdims=True).astype(np.float32).astype(np.float64)
    ratio = np.abs(blocks) / np.where(scale == 0, 1, scale)
    distance = np.abs(ratio[..., None] - E3M0_MAGNITUDES)
    # ties up: among equal distances take the largest magnitude (the last index)
    e = E3M0_MAGNITUDES.size - 1 - np.argmin(distance[..., ::-1], axis=-1)
    codes = e + 8 * ((blocks < 0) & (e > 0))
    values = np.sign(blocks) * E3M0_MAGNITUDES[e] * scale
    return codes.reshape(x.shape), values.reshape(x.shape)


def int8_reference(x: np.ndarray, block: int) -> np.ndarray:
    blocks = x.reshape(-1, block).astype(np.float64)
    scale = np.abs(blocks).max(axis=1, keepdims=True)
    q = np.round(blocks / np.where(scale == 0, 1, scale) * 127)
    return (q * scale / 127).reshape(x.shape)


def _data(kind: str, n: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind == "normal":
        return rng.normal(size=n).astype(np.float32)
    return (rng.standard_t(df=2, size=n) * 10).astype(np.float32)  # heavy tails


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_e3m0_codes_and_values_equal_the_reference(kind):
    x = _data(kind)
    q = quantize(jnp.asarray(x), "e3m0", block_size=64)
    codes, values = e3m0_reference(x, 64)
    unpacked = np.stack([np.asarray(q.payload) & 15, np.asarray(q.payload) >> 4], -1).reshape(-1)
    np.testing.assert_array_equal(unpacked, codes)
    got = np.asarray(dequantize(q, "e3m0", block_size=64))
    np.testing.assert_array_equal(got, values.astype(np.float32))


def test_e3m0_packing_by_hand():
    s = 4.0
    x = jnp.array([s, -s / 2, 0.0, s / 64, 0.75 * s, 0.74 * s, s / 128, -s / 129], jnp.float32)
    q = quantize(x, "e3m0", block_size=8)
    # codes: 7, 8|6, 0, 1, 7 (0.75 s: tie, up), 6 (0.74 s), 1 (s/128: tie, up), 0 (below)
    assert q.payload.tolist() == [7 | 14 << 4, 0 | 1 << 4, 7 | 6 << 4, 1 | 0 << 4]
    assert q.scales.tolist() == [4.0]


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_round_trip_error_bounds(kind):
    x = _data(kind)
    block = 128
    scale = np.abs(x.reshape(-1, block)).max(axis=1, keepdims=True)
    blocks = x.reshape(-1, block)
    for fmt in ("bf16", "int8", "e3m0"):
        got = np.asarray(dequantize(quantize(jnp.asarray(x), fmt, block_size=block), fmt,
                                    block_size=block)).reshape(-1, block)  # fmt: skip
        err = np.abs(got - blocks)
        if fmt == "bf16":
            assert np.all(err <= 2.0**-8 * np.abs(blocks))
        elif fmt == "int8":
            assert np.all(err <= scale / 254 * (1 + 1e-6))
            np.testing.assert_allclose(got.reshape(-1), int8_reference(x, block), rtol=1e-6)
        else:
            big = np.abs(blocks) >= scale / 64
            assert np.all(err[big] <= np.abs(blocks[big]) / 3 * (1 + 1e-6))
            assert np.all(err[~big] <= (scale / 128 * (1 + 1e-6) * np.ones_like(blocks))[~big])


def test_zeros_and_non_finite_blocks():
    x = jnp.concatenate(
        [jnp.zeros(8), jnp.array([1.0, jnp.nan, 2, 3, 4, 5, 6, 7]), jnp.arange(8.0)]
    ).astype(jnp.float32)
    x_inf = x.at[9].set(jnp.inf)
    for data in (x, x_inf):
        for fmt in ("int8", "e3m0"):
            got = np.asarray(dequantize(quantize(data, fmt, block_size=8), fmt, block_size=8))
            np.testing.assert_array_equal(got[:8], 0.0)  # all-zero block: zeros, no NaN
            assert np.all(np.isnan(got[8:16])), (fmt, got[8:16])  # never hidden
            assert np.all(np.isfinite(got[16:]))  # other blocks unaffected
            assert got[16:].max() == 7.0
        for fmt in ("fp32", "bf16"):
            got = np.asarray(dequantize(quantize(data, fmt), fmt))
            assert np.isnan(got[9]) or np.isinf(got[9])
            np.testing.assert_array_equal(np.isfinite(got), np.isfinite(np.asarray(data)))


def test_rows_are_independent_jit_equals_eager_and_bf16_inputs():
    x = jnp.asarray(_data("normal", 512).reshape(4, 128))
    for fmt in FORMATS:
        whole = quantize(x, fmt, block_size=32)
        jitted = jax.jit(lambda a, f=fmt: quantize(a, f, block_size=32))(x)
        for a, b in zip(whole, jitted, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for r in range(4):
            row = quantize(x[r], fmt, block_size=32)
            np.testing.assert_array_equal(np.asarray(row.payload), np.asarray(whole.payload[r]))
        low = dequantize(quantize(x.astype(jnp.bfloat16), fmt, block_size=32), fmt, block_size=32)
        assert low.dtype == jnp.float32 and low.shape == x.shape


def test_float64_stays_float64_and_exact_for_fp32():
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(1).normal(size=64), jnp.float64)
        q = quantize(x, "fp32")
        assert q.payload.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(dequantize(q, "fp32", dtype=jnp.float64)), x)
        e = dequantize(quantize(x, "e3m0", block_size=64), "e3m0", block_size=64, dtype=jnp.float64)
        _, want = e3m0_reference(np.asarray(x), 64)
        np.testing.assert_array_equal(np.asarray(e), want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_payload_bytes_are_the_encoded_bytes(fmt):
    n = 1024
    q = quantize(jnp.zeros(n, jnp.float32), fmt, block_size=128)
    assert payload_bytes(n, fmt, block_size=128) == q.payload.nbytes + q.scales.nbytes
    assert {"fp32": 4096, "bf16": 2048, "int8": 1024 + 32, "e3m0": 512 + 32}[fmt] == (
        payload_bytes(n, fmt, block_size=128)
    )


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="`fmt` must be one of .* got fmt='fp8'"):
        quantize(jnp.zeros(8), "fp8")
    with pytest.raises(ValueError, match="`block_size` must be a positive int, got block_size=0"):
        block_multiple("int8", 0)
    with pytest.raises(ValueError, match="`block_size` must be even for e3m0, got block_size=3"):
        quantize(jnp.zeros(6), "e3m0", block_size=3)
    with pytest.raises(ValueError, match=r"n=10.*block_size=4"):
        quantize(jnp.zeros(10), "int8", block_size=4)
    with pytest.raises(ValueError, match="`n` must be a multiple of 8 for e3m0, got n=12"):
        payload_bytes(12, "e3m0", block_size=8)
