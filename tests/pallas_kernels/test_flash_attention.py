"""flash_attention (Pallas interpret mode on CPU) against reference.attention_reference.

Interpret mode compiles slowly and runs fast, so every case is one compilation: the gradient
cases check the forward output from the same ``jax.vjp``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jt5.pallas_kernels.blocks import BlockSizes
from jt5.pallas_kernels.flash_attention import flash_attention
from jt5.pallas_kernels import reference
from jt5.pallas_kernels.reference import attention_reference
from jt5.pallas_kernels.spec import MASK_VALUE, Mask, RelativeBias
from tests.conftest import assert_close

N = 2
B32 = BlockSizes(block_q=32, block_k=32, block_q_dkv=32, block_k_dkv=32, block_q_dq=32,
                 block_k_dq=32)
B64 = BlockSizes(block_q=64, block_k=64, block_q_dkv=64, block_k_dkv=64, block_q_dq=64,
                 block_k_dq=64)
MIXED = BlockSizes(block_q=32, block_k=64, block_q_dkv=64, block_k_dkv=32, block_q_dq=32,
                   block_k_dq=64)
WIDE = BlockSizes(block_q=128, block_k=32, block_q_dkv=32, block_k_dkv=128, block_q_dq=128,
                  block_k_dq=32)


def _segments(lengths, total):
    """Packed ids 1, 2, ... for consecutive runs of ``lengths``; the rest padding (0)."""
    ids = np.zeros(total, np.int32)
    pos = 0
    for i, n in enumerate(lengths):
        ids[pos:pos + n] = i + 1
        pos += n
    return ids


def _packing(T, S):
    """Separate q and kv ids, T != S; q segment 4 has no keys (zero rows), q tail is padding."""
    q = np.stack([_segments([40, 30, 10, 6], T), _segments([10, 70], T)])
    kv = np.stack([_segments([60, 50, 30], S), _segments([S // 2, S - S // 2], S)])
    return jnp.asarray(q), jnp.asarray(kv)


def _padding(S):
    """Key padding; batch row 0 is all padding (every query row fully masked -> zeros)."""
    kv = np.ones((2, S), np.int32)
    kv[0] = 0
    kv[1, S - 50:] = 0
    return jnp.asarray(kv)


def _inputs(T, S, H, dtype, seed=0, bias=True, num_buckets=32):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = (0.3 * jax.random.normal(ks[0], (2, T, N, H))).astype(dtype)
    k = jax.random.normal(ks[1], (2, S, N, H)).astype(dtype)
    v = jax.random.normal(ks[2], (2, S, N, H)).astype(dtype)
    table = jax.random.normal(ks[3], (num_buckets, N), jnp.float32) if bias else None
    w = jax.random.normal(ks[4], (2, T, N, H), jnp.float32)
    return q, k, v, table, w


_MASK_FIELDS = ("q_segment_ids", "kv_segment_ids", "causal", "local_window", "num_global_tokens")
_BIAS_FIELDS = ("bidirectional", "max_distance")


def _bind(fn, kw, **opts):
    """``fn(q, k, v, table)`` with the spec objects built from a flat keyword dict: Mask fields,
    RelativeBias fields (table None: no bias), the rest call options (q_offset, sm_scale)."""
    mask = Mask(**{f: kw[f] for f in _MASK_FIELDS if f in kw})
    rule = {f: kw[f] for f in _BIAS_FIELDS if f in kw}
    rest = {f: x for f, x in kw.items() if f not in _MASK_FIELDS + _BIAS_FIELDS}

    def call(q, k, v, table):
        bias = None if table is None else RelativeBias(table, **rule)
        return fn(q, k, v, mask, bias, **rest, **opts)
    return call


def _masks(kind, T, S):
    if kind == "none":
        return {}
    if kind == "padding":
        return dict(kv_segment_ids=_padding(S))
    if kind == "packing":
        q, kv = _packing(T, S)
        return dict(q_segment_ids=q, kv_segment_ids=kv)
    if kind == "causal":
        return dict(causal=True, bidirectional=False)
    if kind == "causal_packing":
        q, kv = _packing(T, S)
        return dict(causal=True, bidirectional=False, q_segment_ids=q, kv_segment_ids=kv)
    if kind == "local":
        return dict(local_window=33)
    if kind == "local_global":
        return dict(local_window=40, num_global_tokens=5)
    raise ValueError(kind)


# Forward-only cases; every mask kind is also in GRADS below, which checks the output too.
# (name, T, S, H, dtype, mask kind, bias, extra kwargs, block sizes)
FORWARD = [
    ("none_bidir_f32", 200, 200, 64, jnp.float32, "none", True, {}, B64),
    ("packing_unidir", 96, 160, 64, jnp.float32, "packing", True, dict(bidirectional=False), B32),
    ("causal_qoffset", 150, 190, 64, jnp.float32, "causal", True, dict(q_offset=40), MIXED),
    ("local_qoffset", 100, 180, 64, jnp.float32, "local", True, dict(q_offset=20), B32),
    ("local_global_wide", 260, 260, 64, jnp.float32, "local_global", True, {}, WIDE),
    ("padding_bf16", 77, 150, 64, jnp.bfloat16, "padding", True, {}, B64),
    ("none_f16_scaled", 120, 90, 64, jnp.float16, "none", True, dict(sm_scale=0.125), B64),
    ("causal_h128_bf16", 130, 130, 128, jnp.bfloat16, "causal", True, {}, MIXED),
    ("h48_padded_head", 50, 70, 48, jnp.float32, "padding", True, {}, B32),
    ("decode_one_query", 1, 75, 64, jnp.float32, "causal", True, dict(q_offset=74), B64),
    ("default_blocks", 140, 100, 64, jnp.float32, "local_global", True, {}, None),
]


@pytest.mark.parametrize("name,T,S,H,dtype,kind,bias,extra,bs", FORWARD,
                         ids=[c[0] for c in FORWARD])
def test_forward_matches_reference(name, T, S, H, dtype, kind, bias, extra, bs):
    q, k, v, table, _ = _inputs(T, S, H, dtype, bias=bias)
    kw = {**_masks(kind, T, S), **extra}
    out = jax.jit(_bind(flash_attention, kw, block_sizes=bs))(q, k, v, table)
    ref = jax.jit(_bind(attention_reference, kw))(q, k, v, table)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, ref, dtype=dtype, check="attention", what=name)


# (name, T, S, H, dtype, mask kind, bias, extra kwargs, block sizes)
GRADS = [
    ("none_bidir", 130, 130, 64, jnp.float32, "none", True, {}, B64),
    ("padding_nobias_cross", 77, 150, 64, jnp.float32, "padding", False, {}, MIXED),
    ("packing_bidir", 96, 160, 64, jnp.float32, "packing", True, {}, B32),
    ("causal_unidir_qoffset", 100, 140, 64, jnp.float32, "causal", True, dict(q_offset=30), B32),
    ("local_global_bf16", 150, 150, 64, jnp.bfloat16, "local_global", True, {}, B32),
    ("causal_packing_bf16", 96, 160, 64, jnp.bfloat16, "causal_packing", True, {}, MIXED),
    ("local_h128_f16", 90, 90, 128, jnp.float16, "local", True, dict(q_offset=-5), B32),
    ("buckets48_md40_f32", 120, 120, 64, jnp.float32, "none", True,
     dict(num_buckets=48, max_distance=40), MIXED),
]


def _value_and_grads(fn, q, k, v, table, w):
    def loss_parts(q, k, v, table):
        return fn(q, k, v, table)
    out, vjp = jax.vjp(loss_parts, q, k, v, table)
    return out, vjp(w.astype(out.dtype))


@pytest.mark.parametrize("name,T,S,H,dtype,kind,bias,extra,bs", GRADS, ids=[c[0] for c in GRADS])
def test_gradients_match_reference(name, T, S, H, dtype, kind, bias, extra, bs):
    kw = {**_masks(kind, T, S), **extra}
    q_offset = kw.pop("q_offset", 0)
    q, k, v, table, w = _inputs(T, S, H, dtype, seed=1, bias=bias,
                                num_buckets=kw.pop("num_buckets", 32))

    @jax.jit
    def kernel(q, k, v, table, w, q_offset):  # q_offset traced: exercises the runtime path
        f = _bind(flash_attention, kw, block_sizes=bs, q_offset=q_offset)
        return _value_and_grads(f, q, k, v, table, w)

    out, grads = kernel(q, k, v, table, w, jnp.int32(q_offset))
    ref_out, ref_grads = jax.jit(lambda *a: _value_and_grads(
        _bind(attention_reference, kw, q_offset=q_offset), *a))(q, k, v, table, w)
    assert_close(out, ref_out, dtype=dtype, check="attention", what=f"{name} out")
    for g_name, g, r in zip(("dq", "dk", "dv", "dtable"), grads, ref_grads):
        if r is None:
            assert g is None
            continue
        assert g.dtype == r.dtype, (g_name, g.dtype, r.dtype)
        assert_close(g, r, dtype=dtype, check="attention_grad", what=f"{name} {g_name}")


def test_fully_masked_rows_are_exact_zeros_with_zero_gradients():
    T, S = 40, 70
    q, k, v, table, w = _inputs(T, S, 64, jnp.float32, seed=2)
    q_ids = np.ones((2, T), np.int32)
    q_ids[0, :10] = 0          # padding queries
    q_ids[1, 20:] = 7          # a segment with no keys
    kv_ids = np.ones((2, S), np.int32)
    kv_ids[:, 50:] = 0
    kw = dict(q_segment_ids=jnp.asarray(q_ids), kv_segment_ids=jnp.asarray(kv_ids))
    f = jax.jit(lambda *a: _value_and_grads(_bind(flash_attention, kw, block_sizes=B32), *a))
    out, (dq, dk, dv, dtable) = f(q, k, v, table, w)
    dead = np.asarray(q_ids == 0) | np.asarray(q_ids == 7)
    for x in (out, dq, dk, dv, dtable):
        assert np.all(np.isfinite(np.asarray(x)))
    assert np.all(np.asarray(out)[dead] == 0.0)
    assert np.all(np.asarray(dq)[dead] == 0.0)
    assert np.all(np.asarray(dk)[:, 50:] == 0.0) and np.all(np.asarray(dv)[:, 50:] == 0.0)
    ref = jax.jit(_bind(attention_reference, kw))(q, k, v, table)
    assert_close(out, ref, dtype=jnp.float32, check="attention", what="masked rows")


# (name, T, S, mask kind, extra kwargs, block sizes): lse cases with rows that see no key
LSE = [
    ("causal_packing_qoffset", 96, 160, "causal_packing", dict(q_offset=7), MIXED),
    ("local_global_padding", 100, 130, "local_global", dict(kv_segment_ids=_padding(130)), B32),
]


@pytest.mark.parametrize("name,T,S,kind,extra,bs", LSE, ids=[c[0] for c in LSE])
def test_lse_and_its_gradient_match_reference(name, T, S, kind, extra, bs):
    """``return_lse``: lse = log-sum-exp of the visible scores (checked against
    ``jax.nn.logsumexp`` of the dense scores), MASK_VALUE where nothing is visible; gradients
    of a loss that uses out AND lse equal the reference's (the lse cotangent in the kernels)."""
    kw = {**_masks(kind, T, S), **extra}
    q_offset = kw.pop("q_offset", 0)
    q, k, v, table, w = _inputs(T, S, 64, jnp.float32, seed=4)
    w_lse = jax.random.normal(jax.random.key(5), (2, N, T), jnp.float32)

    def run(fn, **opts):
        f = _bind(fn, kw, q_offset=q_offset, return_lse=True, **opts)
        (out, lse), vjp = jax.vjp(f, q, k, v, table)
        return out, lse, vjp((w, w_lse))

    out, lse, grads = jax.jit(lambda: run(flash_attention, block_sizes=bs))()
    ref_out, ref_lse, ref_grads = jax.jit(lambda: run(attention_reference))()

    mask = Mask(**{f: kw[f] for f in _MASK_FIELDS if f in kw})
    scores = (jnp.einsum("BTNH,BSNH->BNTS", q, k, precision="highest")
              + reference.dense_bias(RelativeBias(table, **{f: kw[f] for f in _BIAS_FIELDS
                                                             if f in kw}),
                                     q_len=T, kv_len=S, q_offset=q_offset))
    vis = jnp.broadcast_to(reference.dense_mask(mask, q_len=T, kv_len=S, q_offset=q_offset),
                           scores.shape)
    empty = ~np.asarray(vis.any(-1))
    assert empty.any() and not empty.all(), "the case must have rows with and without keys"
    want = np.where(empty, MASK_VALUE, jax.nn.logsumexp(jnp.where(vis, scores, -jnp.inf), -1))
    assert lse.shape == (2, N, T) and lse.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(lse)[empty], np.float32(MASK_VALUE))
    np.testing.assert_array_equal(np.asarray(ref_lse)[empty], np.float32(MASK_VALUE))
    for got in (lse, ref_lse):
        assert_close(np.asarray(got)[~empty], want[~empty], dtype="float32", check="attention",
                     what=f"{name} lse")
    assert_close(out, ref_out, dtype="float32", check="attention", what=f"{name} out")
    assert not np.asarray(out).transpose(0, 2, 1, 3)[empty].any()
    for g_name, g, r in zip(("dq", "dk", "dv", "dtable"), grads, ref_grads):
        assert_close(g, r, dtype="float32", check="attention_grad", what=f"{name} {g_name}")


def test_invalid_arguments_raise_clear_errors():
    q, k, v, table, _ = _inputs(16, 16, 64, jnp.float32)
    bias = RelativeBias(table)
    with pytest.raises(ValueError, match="block_q=48 must be a power of two"):
        flash_attention(q, k, v, None, bias, block_sizes=BlockSizes(block_q=48))
    with pytest.raises(ValueError, match="q_segment_ids needs kv_segment_ids"):
        flash_attention(q, k, v, Mask(q_segment_ids=jnp.ones((2, 16), jnp.int32)), bias)
    with pytest.raises(ValueError, match="num_buckets"):
        flash_attention(q, k, v, None, RelativeBias(table[:, :1]))
    with pytest.raises(ValueError, match="share a dtype"):
        flash_attention(q, k.astype(jnp.bfloat16), v, None, bias)
    with pytest.raises(ValueError, match="local_window=-1"):
        flash_attention(q, k, v, Mask(local_window=-1), bias)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,dtype", [("none", jnp.float32), ("causal_packing", jnp.bfloat16),
                                        ("local_global", jnp.bfloat16)])
def test_compiled_triton_matches_interpret_and_reference(kind, dtype):
    """On a GPU: the compiled kernels (tuned block sizes) == interpret mode == the reference."""
    T = S = 640
    q, k, v, table, w = _inputs(T, S, 64, dtype, seed=3)
    kw = _masks(kind, T, S)
    # "highest": f32 kernels would otherwise run tf32 dots (jax's GPU default), not the 1e-5 table
    with jax.default_matmul_precision("highest"):
        run = {mode: jax.jit(lambda *a, _i=mode: _value_and_grads(
            _bind(flash_attention, kw, interpret=_i), *a))(q, k, v, table, w)
            for mode in (False, True)}
        ref = jax.jit(lambda *a: _value_and_grads(
            _bind(attention_reference, kw), *a))(q, k, v, table, w)
    for got in run.values():
        assert_close(got[0], ref[0], dtype=dtype, check="attention", what=f"{kind} out")
        for g, r in zip(got[1], ref[1]):
            assert_close(g, r, dtype=dtype, check="attention_grad", what=f"{kind} grad")
