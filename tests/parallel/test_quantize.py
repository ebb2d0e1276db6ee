"""The low-bit codecs of the replica exchange against an independent NumPy float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel.quantize import (
    FORMATS,
    Quantized,
    block_multiple,
    check_format,
    dequantize,
    payload_bytes,
    quantize,
)

E3M0_MAGNITUDES = np.array([0.0] + [2.0 ** (e - 7) for e in range(1, 8)])  # times the scale


def _scales(x: np.ndarray, block: int) -> np.ndarray:
    """``max |x|`` per block ``[-1, 1]``, rounded to float32 as it travels, back in float64."""
    blocks = x.reshape(-1, block).astype(np.float64)
    return np.abs(blocks).max(axis=1, keepdims=True).astype(np.float32).astype(np.float64)


def e3m0_reference(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes (0..15) and decoded values (float64) from the spec: enumerate the 8 magnitudes and
    take the nearest in linear scale, ties to the larger; sign bit only on a non-zero code."""
    blocks = x.reshape(-1, block).astype(np.float64)
    scale = _scales(x, block)
    candidates = E3M0_MAGNITUDES * scale[..., None]  # [blocks, 1, 8]
    distance = np.abs(np.abs(blocks)[..., None] - candidates)
    e = E3M0_MAGNITUDES.size - 1 - np.argmin(distance[..., ::-1], axis=-1)  # ties: the last
    codes = e + 8 * ((blocks < 0) & (e > 0))
    values = np.where(blocks < 0, -1.0, 1.0) * E3M0_MAGNITUDES[e] * scale
    return codes.reshape(x.shape), values.reshape(x.shape)


def int8_reference(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes ``round(x / s * 127)`` in float64 and their decoding ``q s / 127`` evaluated in
    float32 as the codec defines it, ``q * (s * float32(1 / 127))`` (two float32 roundings)."""
    blocks = x.reshape(-1, block).astype(np.float64)
    scale = _scales(x, block)
    codes = np.clip(np.round(blocks / np.where(scale == 0, 1, scale) * 127), -127, 127)
    s32 = scale.astype(np.float32)
    values = codes.astype(np.float32) * (s32 * np.float32(1 / 127))
    return codes.astype(np.int8).reshape(x.shape), values.reshape(x.shape)


def _unpack(payload) -> np.ndarray:
    p = np.asarray(payload)
    return np.stack([p & 15, p >> 4], axis=-1).reshape(*p.shape[:-1], -1)


def _data(kind: str, n: int = 4096, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(size=n).astype(np.float32)
    return (rng.standard_t(df=1.5, size=n) * 1e-3).astype(np.float32)  # heavy tails, small


def _round_trip(x, fmt, block, dtype=jnp.float32) -> np.ndarray:
    q = quantize(jnp.asarray(x), fmt, block_size=block)
    return np.asarray(dequantize(q, fmt, block_size=block, dtype=dtype))


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("block", [2, 64, 256])
def test_e3m0_codes_and_values_equal_the_reference(kind, block):
    x = _data(kind)
    q = quantize(jnp.asarray(x), "e3m0", block_size=block)
    codes, values = e3m0_reference(x, block)
    np.testing.assert_array_equal(_unpack(q.payload), codes)
    np.testing.assert_array_equal(np.asarray(q.scales), _scales(x, block)[:, 0])
    got = np.asarray(dequantize(q, "e3m0", block_size=block))
    np.testing.assert_array_equal(got, values.astype(np.float32))


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_int8_codes_and_values_equal_the_reference(kind):
    x = _data(kind)
    q = quantize(jnp.asarray(x), "int8", block_size=128)
    codes, values = int8_reference(x, 128)
    np.testing.assert_array_equal(np.asarray(q.payload), codes)
    np.testing.assert_array_equal(np.asarray(dequantize(q, "int8", block_size=128)), values)


def test_e3m0_rounds_exactly_at_and_around_every_midpoint():
    # s has its last mantissa bit set, so 0.75 s 2**k is not a float32: a division-based encoder
    # would misround the float32 neighbours of the midpoints.
    for s in (np.float32(4.0), np.nextafter(np.float32(1.5), np.float32(2))):
        mids = [s * 2.0**-7] + [0.75 * s * 2.0 ** (k - 7) for k in range(2, 8)]
        near = []
        for m in mids:
            m32 = np.float32(m)
            near += [np.nextafter(m32, np.float32(0)), m32, np.nextafter(m32, np.float32(9))]
        x = np.array([s, *near, *(-v for v in near)], np.float32)
        x = np.concatenate([x, np.zeros(-x.size % 2, np.float32)])
        q = quantize(jnp.asarray(x), "e3m0", block_size=x.size)
        codes, values = e3m0_reference(x, x.size)
        np.testing.assert_array_equal(_unpack(q.payload), codes)
        got = np.asarray(dequantize(q, "e3m0", block_size=x.size))
        np.testing.assert_array_equal(got, values.astype(np.float32))


def test_e3m0_packing_by_hand():
    s = 4.0
    q = quantize(jnp.array([s, -s / 2, 0.0, s / 64], jnp.float32), "e3m0", block_size=4)
    # codes [7, 8 | 6 = 14, 0, 1]; byte i = code[2i] | code[2i + 1] << 4
    assert q.payload.dtype == jnp.uint8
    assert q.payload.tolist() == [7 | 14 << 4, 0 | 1 << 4]
    assert q.scales.tolist() == [4.0]
    x = jnp.array([0.75 * s, 0.74 * s, s / 128, -s / 129, -s, -0.0, s / 64, -s / 64], jnp.float32)
    q = quantize(x, "e3m0", block_size=8)
    # 0.75 s: a tie, up to s (7); 0.74 s -> s/2 (6); s/128: a tie, up to s/64 (1); -s/129 -> 0
    # (a zero is code 0, never 8); -s -> 15; -0.0 -> 0; s/64 -> 1; -s/64 -> 9
    assert q.payload.tolist() == [7 | 6 << 4, 1 | 0 << 4, 15 | 0 << 4, 1 | 9 << 4]
    assert dequantize(q, "e3m0", block_size=8).tolist() == [4, 2, 1 / 16, 0, -4, 0, 1 / 16, -1 / 16]


def test_int8_by_hand():
    q = quantize(jnp.array([2.0, -1.0, 0.0, 1 / 127], jnp.float32), "int8", block_size=4)
    assert q.payload.dtype == jnp.int8 and q.scales.dtype == jnp.float32
    assert q.payload.tolist() == [127, -64, 0, 0]  # -63.5 rounds to even; 0.5 rounds to 0
    assert q.scales.tolist() == [2.0]


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_round_trip_error_bounds(kind):
    """bf16: relative error <= 2**-8. int8: absolute error <= s/254 per block (plus the float32
    rounding of the decode). e3m0: relative error <= 1/3 where |x| >= s/64, absolute error
    <= s/128 below (exact: the decoded values are exact, the checks are in float64)."""
    x = _data(kind)
    block = 128
    blocks = x.reshape(-1, block).astype(np.float64)
    scale = np.abs(blocks).max(axis=1, keepdims=True)
    err = {fmt: np.abs(_round_trip(x, fmt, block).reshape(-1, block) - blocks) for fmt in FORMATS}
    assert np.all(err["fp32"] == 0)
    assert np.all(err["bf16"] <= 2.0**-8 * np.abs(blocks))
    assert np.all(err["int8"] <= scale / 254 + scale * 2.0**-22)
    big = np.abs(blocks) >= scale / 64
    assert big.any() and (~big).any()
    assert np.all(3 * err["e3m0"][big] <= np.abs(blocks[big]))
    assert np.all(err["e3m0"] <= np.where(big, np.inf, scale / 128))


def test_zero_and_non_finite_blocks():
    finite = np.arange(-4.0, 4.0, dtype=np.float32)
    x = np.concatenate([np.zeros(8, np.float32), finite, finite, finite, finite])
    x[9], x[18], x[27] = np.nan, np.inf, -np.inf
    for fmt in ("int8", "e3m0"):
        q = quantize(jnp.asarray(x), fmt, block_size=8)
        got = np.asarray(dequantize(q, fmt, block_size=8))
        np.testing.assert_array_equal(got[:8], 0.0)  # all-zero block: exact zeros, no NaN
        assert not np.signbit(got[:8]).any()
        assert np.isnan(got[8:32]).all(), (fmt, got[8:32])  # never hidden: the whole block
        assert np.isnan(np.asarray(q.scales)[1:4]).all()
        np.testing.assert_array_equal(got[32:], _round_trip(finite, fmt, 8))  # unaffected
    for fmt in ("fp32", "bf16"):
        np.testing.assert_array_equal(_round_trip(x, fmt, 8), x)  # NaN, +-Inf as they are


@pytest.mark.parametrize("fmt", FORMATS)
def test_leading_axes_jit_and_input_dtypes(fmt):
    x = jnp.asarray(_data("normal", 3 * 4 * 64).reshape(3, 4, 64))
    whole = quantize(x, fmt, block_size=16)
    assert whole.scales.shape == (3, 4, 0 if fmt in ("fp32", "bf16") else 4)
    assert whole.scales.dtype == jnp.float32
    decoded = dequantize(whole, fmt, block_size=16)
    assert decoded.shape == x.shape and decoded.dtype == jnp.float32
    for i in range(3):
        for j in range(4):
            row = quantize(x[i, j], fmt, block_size=16)
            for a, b in zip(row, whole, strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b[i, j]))
    encode = jax.jit(lambda a: quantize(a, fmt, block_size=16))
    decode = jax.jit(lambda q: dequantize(q, fmt, block_size=16))
    jitted = encode(x)
    for a, b in zip(jitted, whole, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(decode(jitted)), np.asarray(decoded))
    low = x.astype(jnp.bfloat16)  # bf16 input: computed in float32, the same as its upcast
    upcast = encode(low.astype(jnp.float32))
    for a, b in zip(quantize(low, fmt, block_size=16), upcast, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    as_bf16 = dequantize(whole, fmt, block_size=16, dtype=jnp.bfloat16)
    assert as_bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(as_bf16), np.asarray(decoded.astype(jnp.bfloat16)))


def test_float64_stays_float64():
    with jax.enable_x64(True):
        x = np.random.default_rng(1).normal(size=256)
        q = quantize(jnp.asarray(x, jnp.float64), "fp32")
        assert q.payload.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(dequantize(q, "fp32", dtype=jnp.float64)), x)
        q = quantize(jnp.asarray(x, jnp.float64), "e3m0", block_size=64)
        assert q.scales.dtype == jnp.float32
        codes, values = e3m0_reference(x, 64)
        np.testing.assert_array_equal(_unpack(q.payload), codes)
        got = dequantize(q, "e3m0", block_size=64, dtype=jnp.float64)
        assert got.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(got), values)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block", [16, 256])
def test_payload_bytes_are_the_encoded_bytes(fmt, block):
    n = 1024
    q = quantize(jnp.zeros(n, jnp.float32), fmt, block_size=block)
    assert payload_bytes(n, fmt, block_size=block) == q.payload.nbytes + q.scales.nbytes
    expected = {"fp32": 4 * n, "bf16": 2 * n, "int8": n + 4 * n // block}
    expected["e3m0"] = n // 2 + 4 * n // block
    assert payload_bytes(n, fmt, block_size=block) == expected[fmt]


def test_block_multiple():
    assert [block_multiple(f, 8) for f in FORMATS] == [1, 1, 8, 8]
    assert block_multiple("int8", 3) == 3


def test_bad_inputs_name_the_argument():
    for call in (
        lambda: check_format("fp8"),
        lambda: block_multiple("fp8", 8),
        lambda: quantize(jnp.zeros(8, jnp.float32), "fp8"),
        lambda: dequantize(Quantized(jnp.zeros(8), jnp.zeros(0)), "fp8"),
        lambda: payload_bytes(8, "fp8"),
    ):
        with pytest.raises(ValueError, match=r"`fmt` must be one of .* got fmt='fp8'"):
            call()
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match=rf"`block_size` must be a positive int.*={bad!r}"):
            quantize(jnp.zeros(8, jnp.float32), "int8", block_size=bad)
    with pytest.raises(ValueError, match="`block_size` must be even for e3m0, got block_size=3"):
        quantize(jnp.zeros(6, jnp.float32), "e3m0", block_size=3)
    with pytest.raises(ValueError, match=r"`n`.*block_size=4.*got n=10"):
        quantize(jnp.zeros((2, 10), jnp.float32), "int8", block_size=4)
    with pytest.raises(ValueError, match=r"`n`.*block_size=8.*got n=12"):
        payload_bytes(12, "e3m0", block_size=8)
    with pytest.raises(ValueError, match="`n` must be a non-negative int, got n=-8"):
        payload_bytes(-8, "int8", block_size=8)
    with pytest.raises(ValueError, match=r"`x` must have at least one axis"):
        quantize(jnp.float32(1.0), "bf16")
    q = quantize(jnp.zeros(32, jnp.float32), "e3m0", block_size=8)
    with pytest.raises(ValueError, match=r"`q.scales` must have shape \(2,\).*block_size=16"):
        dequantize(q, "e3m0", block_size=16)
