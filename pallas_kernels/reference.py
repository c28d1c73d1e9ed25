"""Pure-jnp T5 attention with relative position bias and masks.

This module is the contract every attention path in jt5 follows: the test oracle for the Pallas
kernels and the XLA/CPU path of the model. Layout is ``[B, T, N, H]`` for queries and
``[B, S, N, H]`` for keys/values (B batch, T query length, S key length, N heads, H head dim).

Which key a query may see (``visible``), with ``q_pos = q_offset + t`` and ``k_pos = s``:

- ``kv_segment_ids[b, s] != 0`` (0 marks a padding key) when ``kv_segment_ids`` is given;
- ``q_segment_ids[b, t] == kv_segment_ids[b, s]`` when ``q_segment_ids`` is given (packing;
  a query with segment 0 is padding and sees nothing);
- ``k_pos <= q_pos`` when ``causal``;
- ``|k_pos - q_pos| <= local_window`` when ``local_window`` is set, unless ``k_pos`` or
  ``q_pos`` is one of the first ``num_global_tokens`` positions (global tokens).

A query row with no visible key returns zeros (not NaN, not a uniform average). T5 does not scale
scores (``sm_scale=1``: the 1/sqrt(H) is folded into the initialisation, Raffel et al. 2020 §2.1).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Finite "minus infinity": keeps exp() and its gradient NaN-free for fully masked rows.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int,
                             max_distance: int):
    """T5's bucket of ``relative_position = k_pos - q_pos`` (int32, any shape).

    Same arithmetic as mesh-tensorflow / transformers' ``T5Attention._relative_position_bucket``
    in float32, so it agrees bucket for bucket (tests check ±20000 against transformers). Small
    distances get one bucket each, larger ones logarithmic buckets up to ``max_distance``, beyond
    which everything shares the last bucket. Usable inside Pallas kernels (elementwise only).
    """
    rel = jnp.asarray(relative_position, jnp.int32)
    nb = num_buckets
    ret = jnp.zeros_like(rel)
    if bidirectional:
        nb //= 2
        ret = ret + jnp.where(rel > 0, nb, 0)
        n = jnp.abs(rel)
    else:
        n = jnp.maximum(-rel, 0)
    max_exact = nb // 2
    is_small = n < max_exact
    nf = jnp.maximum(n, 1).astype(jnp.float32)  # log(0) is never selected (is_small), avoid -inf
    large = max_exact + (jnp.log(nf / max_exact) / math.log(max_distance / max_exact)
                         * (nb - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, nb - 1)
    return ret + jnp.where(is_small, n, large)


def bucket_saturation(*, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """Smallest R such that every ``|k_pos - q_pos| >= R`` falls in a saturated bucket.

    Beyond ``R`` the bucket depends only on the sign of the distance, so a ``[2R+1]`` lookup
    table of ``clip(rel, -R, R)`` is exact. ``R <= max_distance`` always.
    """
    rel = np.arange(-max_distance - 1, max_distance + 2, dtype=np.int32)
    b = np.asarray(relative_position_bucket(rel, bidirectional=bidirectional,
                                            num_buckets=num_buckets, max_distance=max_distance))
    lo, hi = b[0], b[-1]
    r = max_distance + 1
    while r > 0 and b[max_distance + 1 - (r - 1)] == lo and b[max_distance + 1 + (r - 1)] == hi:
        r -= 1
    return r


@functools.lru_cache(maxsize=None)
def bucket_lut(*, bidirectional: bool, num_buckets: int, max_distance: int):
    """``(R, lut)``: ``lut[clip(rel, -R, R) + R]`` is the bucket of ``rel`` for every ``rel``.

    ``R = bucket_saturation(...)``; ``lut`` is int32 numpy padded (with its last value) to a
    power of two, so kernels can gather from it with Triton-friendly shapes.
    """
    with jax.ensure_compile_time_eval():  # may first run while tracing: stay concrete
        r = bucket_saturation(bidirectional=bidirectional, num_buckets=num_buckets,
                              max_distance=max_distance)
        b = np.asarray(relative_position_bucket(
            np.arange(-r, r + 1, dtype=np.int32), bidirectional=bidirectional,
            num_buckets=num_buckets, max_distance=max_distance), np.int32)
    padded = 1 << (2 * r).bit_length()  # next power of two >= 2r + 1
    return r, np.pad(b, (0, padded - b.size), mode="edge")


def dense_bias(table, *, q_len: int, kv_len: int, bidirectional: bool, max_distance: int,
               q_offset=0, kv_offset=0):
    """The full ``[1, N, T, S]`` float32 bias from a ``[K, N]`` bucket table.

    ``kv_offset``: position of the first key (a chunk of a longer sequence; see ``chunked``)."""
    q_pos = jnp.arange(q_len, dtype=jnp.int32)[:, None] + jnp.asarray(q_offset, jnp.int32)
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, :] + jnp.asarray(kv_offset, jnp.int32)
    buckets = relative_position_bucket(k_pos - q_pos, bidirectional=bidirectional,
                                       num_buckets=table.shape[0], max_distance=max_distance)
    return jnp.take(table.astype(jnp.float32), buckets, axis=0).transpose(2, 0, 1)[None]


def dense_mask(*, q_len: int, kv_len: int, q_segment_ids=None, kv_segment_ids=None,
               causal: bool = False, local_window: int | None = None, num_global_tokens: int = 0,
               q_offset=0, kv_offset=0):
    """Boolean ``[B or 1, 1, T, S]`` visibility (see the module docstring), or None if all visible.

    ``kv_offset``: position of the first key (a chunk of a longer sequence)."""
    if q_segment_ids is not None and kv_segment_ids is None:
        raise ValueError("q_segment_ids needs kv_segment_ids (packing compares the two)")
    q_pos = jnp.arange(q_len, dtype=jnp.int32)[:, None] + jnp.asarray(q_offset, jnp.int32)
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, :] + jnp.asarray(kv_offset, jnp.int32)
    mask = None

    def _and(a, b):
        return b if a is None else a & b

    if causal:
        mask = _and(mask, (k_pos <= q_pos)[None, None])
    if local_window is not None:
        near = jnp.abs(k_pos - q_pos) <= local_window
        if num_global_tokens:
            near |= (k_pos < num_global_tokens) | (q_pos < num_global_tokens)
        mask = _and(mask, near[None, None])
    if kv_segment_ids is not None:
        kv = jnp.asarray(kv_segment_ids)[:, None, None, :]
        seg = kv != 0
        if q_segment_ids is not None:
            seg &= jnp.asarray(q_segment_ids)[:, None, :, None] == kv
        mask = _and(mask, seg)
    return mask


def check_attention_args(q, k, v, bias_table=None, q_segment_ids=None, kv_segment_ids=None):
    """Shape/dtype checks shared by every implementation of the contract; errors name shapes."""
    B, T, N, H = q.shape
    S = k.shape[1]
    if k.shape != (B, S, N, H) or v.shape != k.shape:
        raise ValueError(f"expected k, v of shape {(B, S, N, H)}, got {k.shape=}, {v.shape=}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if bias_table is not None and (bias_table.ndim != 2 or bias_table.shape[1] != N):
        raise ValueError(f"{bias_table.shape=} must be [num_buckets, {N}]")
    if q_segment_ids is not None and kv_segment_ids is None:
        raise ValueError("q_segment_ids needs kv_segment_ids (packing compares the two)")
    if q_segment_ids is not None and q_segment_ids.shape != (B, T):
        raise ValueError(f"{q_segment_ids.shape=} must be {(B, T)}")
    if kv_segment_ids is not None and kv_segment_ids.shape != (B, S):
        raise ValueError(f"{kv_segment_ids.shape=} must be {(B, S)}")


def attend_dense(q, k, v, bias=None, mask=None, *, sm_scale: float = 1.0,
                 kv_heads_major: bool = False):
    """Softmax attention with an additive float32 ``bias`` ``[1|B, N, T, S]`` and a boolean ``mask``.

    Scores and softmax in float32; the output in ``q.dtype``. Rows without a visible key give 0.
    ``kv_heads_major``: K/V are stored ``[B, N, S, H]`` (a decoding cache): the matmuls then
    read them in place instead of transposing the whole cache at every step.
    """
    if kv_heads_major:
        s = jnp.einsum("BNTH,BNSH->BNTS", q.transpose(0, 2, 1, 3), k,
                       preferred_element_type=jnp.float32)
    else:
        s = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32)
    if sm_scale != 1.0:
        s = s * sm_scale
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jax.lax.stop_gradient(m))
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0.0, 1.0, l)
    if kv_heads_major:
        o = jnp.einsum("BNTS,BNSH->BNTH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o.transpose(0, 2, 1, 3).astype(q.dtype)
    return jnp.einsum("BNTS,BSNH->BTNH", p.astype(v.dtype), v,
                      preferred_element_type=jnp.float32).astype(q.dtype)


def attention_reference(q, k, v, bias_table=None, *, q_segment_ids=None, kv_segment_ids=None,
                        q_offset=0, causal: bool = False, bidirectional: bool = True,
                        max_distance: int = 128, local_window: int | None = None,
                        num_global_tokens: int = 0, sm_scale: float = 1.0):
    """Dense T5 attention: the oracle with the same signature as ``flash_attention``.

    ``bias_table`` is ``[num_buckets, N]`` (transformers' ``relative_attention_bias.weight``) or
    None for no bias (cross-attention). Memory is O(B·N·T·S): for tests and short inputs.
    """
    T, S = q.shape[1], k.shape[1]
    bias = None
    if bias_table is not None:
        bias = dense_bias(bias_table, q_len=T, kv_len=S, bidirectional=bidirectional,
                          max_distance=max_distance, q_offset=q_offset)
    mask = dense_mask(q_len=T, kv_len=S, q_segment_ids=q_segment_ids,
                      kv_segment_ids=kv_segment_ids, causal=causal, local_window=local_window,
                      num_global_tokens=num_global_tokens, q_offset=q_offset)
    return attend_dense(q, k, v, bias, mask, sm_scale=sm_scale)
