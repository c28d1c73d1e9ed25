"""Pure-jnp T5 attention: the dense oracle of the contract in ``spec.py``.

The test oracle for the Pallas kernels and the chunked path, and the XLA path of the model for
short inputs (memory O(B·N·T·S)). Layout is ``[B, T, N, H]`` for queries and ``[B, S, N, H]``
for keys/values (B batch, T query length, S key length, N heads, H head dim). Which key a query
sees is ``spec.visible`` (``dense_mask``), the bias is ``spec.RelativeBias``'s bucket rule
(``dense_bias``). A query row with no visible key returns zeros (not NaN, not a uniform
average). T5 does not scale scores (``sm_scale=1``: the 1/sqrt(H) is folded into the
initialisation, Raffel et al. 2020 §2.1).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jt5.pallas_kernels.spec import MASK_VALUE, Mask, RelativeBias, check_args, visible


def _positions(q_len: int, kv_len: int, q_offset, kv_offset):
    """``q_pos [T, 1]``, ``k_pos [1, S]`` int32."""
    q_pos = jnp.arange(q_len, dtype=jnp.int32)[:, None] + jnp.asarray(q_offset, jnp.int32)
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, :] + jnp.asarray(kv_offset, jnp.int32)
    return q_pos, k_pos


def dense_bias(bias: RelativeBias, *, q_len: int, kv_len: int, q_offset=0, kv_offset=0):
    """The full ``[1, N, T, S]`` float32 bias from the ``[K, N]`` bucket table.

    ``kv_offset``: position of the first key (a chunk of a longer sequence; see ``chunked``)."""
    q_pos, k_pos = _positions(q_len, kv_len, q_offset, kv_offset)
    buckets = bias.buckets(k_pos - q_pos)
    return jnp.take(bias.table.astype(jnp.float32), buckets, axis=0).transpose(2, 0, 1)[None]


def dense_mask(mask: Mask, *, q_len: int, kv_len: int, q_offset=0, kv_offset=0):
    """Boolean visibility ``spec.visible`` broadcastable to ``[B, 1, T, S]``, or None if all
    keys are visible. ``kv_offset``: position of the first key (a chunk of a longer sequence)."""
    q_ids, kv_ids = mask.q_segment_ids, mask.kv_segment_ids
    if q_ids is not None and kv_ids is None:
        raise ValueError("q_segment_ids needs kv_segment_ids (packing compares the two)")
    q_pos, k_pos = _positions(q_len, kv_len, q_offset, kv_offset)
    return visible(q_pos[None, None], k_pos[None, None],
                   None if q_ids is None else jnp.asarray(q_ids)[:, None, :, None],
                   None if kv_ids is None else jnp.asarray(kv_ids)[:, None, None, :], mask)


def masked_softmax(s, bias=None, mask=None):
    """``(p, lse)``: softmax over the last axis of float32 scores ``s`` plus ``bias``, over the
    keys ``mask`` shows. Rows without a visible key get ``p = 0`` and ``lse = MASK_VALUE``;
    ``lse`` (the scores' log-sum-exp, the last axis dropped) is differentiable."""
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))  # keeps exp() in range only
    p = jnp.exp(s - m)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    l_safe = jnp.where(l == 0.0, 1.0, l)
    lse = jnp.where(l == 0.0, MASK_VALUE, m + jnp.log(l_safe))[..., 0]
    return p / l_safe, lse


def attend_dense(q, k, v, bias=None, mask=None, *, sm_scale: float = 1.0,
                 return_lse: bool = False):
    """Softmax attention plus a float32 ``bias`` ``[1|B, N, T, S]`` under a boolean ``mask``.

    Scores and softmax in float32; the output in ``q.dtype``. Rows without a visible key give 0.
    ``return_lse``: also the float32 ``[B, N, T]`` log-sum-exp of the visible scores
    (``MASK_VALUE`` for rows without a visible key), differentiable.
    """
    s = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32)
    if sm_scale != 1.0:
        s = s * sm_scale
    p, lse = masked_softmax(s, bias, mask)
    o = jnp.einsum("BNTS,BSNH->BTNH", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32).astype(q.dtype)
    return (o, lse) if return_lse else o


def attention_reference(q, k, v, mask: Optional[Mask] = None,
                        bias: Optional[RelativeBias] = None, *, q_offset=0, sm_scale: float = 1.0,
                        return_lse: bool = False):
    """Dense T5 attention ``[B, T, N, H]``: the oracle with the signature of ``flash_attention``.

    ``mask`` None: every key visible; ``bias`` None: no bias (cross-attention); ``q_offset``:
    position of query 0. ``return_lse``: ``(out, lse)`` as ``attend_dense``.
    """
    mask = Mask() if mask is None else mask
    check_args(q, k, v, mask, bias)
    T, S = q.shape[1], k.shape[1]
    dense = None if bias is None else dense_bias(bias, q_len=T, kv_len=S, q_offset=q_offset)
    vis = dense_mask(mask, q_len=T, kv_len=S, q_offset=q_offset)
    return attend_dense(q, k, v, dense, vis, sm_scale=sm_scale, return_lse=return_lse)
