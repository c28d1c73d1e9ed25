"""flash_attention (Pallas interpret mode on CPU) against reference.attention_reference.

Interpret mode compiles slowly and runs fast, so every case is one compilation: the gradient
cases check the forward output from the same ``jax.vjp``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jt5.pallas_kernels.flash_attention import BlockSizes, flash_attention
from jt5.pallas_kernels.reference import attention_reference
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
    out = jax.jit(functools.partial(flash_attention, block_sizes=bs, **kw))(q, k, v, table)
    ref = jax.jit(functools.partial(attention_reference, **kw))(q, k, v, table)
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
        f = functools.partial(flash_attention, block_sizes=bs, q_offset=q_offset, **kw)
        return _value_and_grads(f, q, k, v, table, w)

    out, grads = kernel(q, k, v, table, w, jnp.int32(q_offset))
    ref_out, ref_grads = jax.jit(lambda *a: _value_and_grads(
        functools.partial(attention_reference, q_offset=q_offset, **kw), *a))(q, k, v, table, w)
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
    f = jax.jit(lambda *a: _value_and_grads(
        functools.partial(flash_attention, block_sizes=B32, **kw), *a))
    out, (dq, dk, dv, dtable) = f(q, k, v, table, w)
    dead = np.asarray(q_ids == 0) | np.asarray(q_ids == 7)
    for x in (out, dq, dk, dv, dtable):
        assert np.all(np.isfinite(np.asarray(x)))
    assert np.all(np.asarray(out)[dead] == 0.0)
    assert np.all(np.asarray(dq)[dead] == 0.0)
    assert np.all(np.asarray(dk)[:, 50:] == 0.0) and np.all(np.asarray(dv)[:, 50:] == 0.0)
    ref = jax.jit(functools.partial(attention_reference, **kw))(q, k, v, table)
    assert_close(out, ref, dtype=jnp.float32, check="attention", what="masked rows")


def test_invalid_arguments_raise_clear_errors():
    q, k, v, table, _ = _inputs(16, 16, 64, jnp.float32)
    with pytest.raises(ValueError, match="block_q=48 must be a power of two"):
        flash_attention(q, k, v, table, block_sizes=BlockSizes(block_q=48))
    with pytest.raises(ValueError, match="q_segment_ids needs kv_segment_ids"):
        flash_attention(q, k, v, table, q_segment_ids=jnp.ones((2, 16), jnp.int32))
    with pytest.raises(ValueError, match="num_buckets"):
        flash_attention(q, k, v, table[:, :1])
    with pytest.raises(ValueError, match="share a dtype"):
        flash_attention(q, k.astype(jnp.bfloat16), v, table)


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
            functools.partial(flash_attention, interpret=_i, **kw), *a))(q, k, v, table, w)
            for mode in (False, True)}
        ref = jax.jit(lambda *a: _value_and_grads(
            functools.partial(attention_reference, **kw), *a))(q, k, v, table, w)
    for got in run.values():
        assert_close(got[0], ref[0], dtype=dtype, check="attention", what=f"{kind} out")
        for g, r in zip(got[1], ref[1]):
            assert_close(g, r, dtype=dtype, check="attention_grad", what=f"{kind} grad")
