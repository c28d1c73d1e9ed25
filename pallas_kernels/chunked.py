"""Chunked T5 attention in plain jnp: memory linear in the sequence length, on any backend.

The same contract as ``reference.attention_reference`` (masks, bias, ``q_offset``; rows with no
visible key give zeros), computed as flash attention is, but by XLA: queries in chunks of
``block_q`` (``lax.map``), keys in chunks of ``block_k`` (``lax.scan``) with an online softmax
in float32 (running max ``m``, normaliser ``l``, unnormalised output ``acc``). The bias of a
chunk comes from the ``[K, N]`` table and the chunk's positions (``reference.dense_bias``), its
mask from positions and segment ids (``reference.dense_mask``, i.e. ``spec.visible``): nothing
``[T, S]``-sized exists.

Backward stays linear too: each query chunk and each key step are ``jax.checkpoint``-ed, so the
backward pass keeps only the per-step carries of one query chunk (``S / block_k`` x
``[B, N, block_q, H]``) and recomputes scores and probabilities. Key chunks that causal or local
masks leave empty for a whole query chunk are skipped (``lax.cond`` on ``spec.interval_visible``
of their positions).

This is the XLA path's attention above ``CHUNKED_MIN_ELEMENTS`` (``jt5/attention_ops.py``): on
CPU, TPU and as the GPU fallback, long inputs no longer materialise ``[B, N, T, S]`` scores.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jt5.pallas_kernels import reference
from jt5.pallas_kernels.spec import Mask, RelativeBias, check_args, interval_visible


def _pad_to(x, n: int, axis: int, value=0):
    extra = n - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _chunks(x, size: int):  # [B, L, ...] -> [L / size, B, size, ...]
    B, L = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, L // size, size, *x.shape[2:]), 1, 0)


def chunked_attention(q, k, v, mask: Mask | None = None, bias: RelativeBias | None = None, *,
                      q_offset=0, block_q: int = 512, block_k: int = 512):
    """``[B,T,N,H] x [B,S,N,H] x [B,S,N,H] -> [B,T,N,H]``; arguments as ``attention_reference``."""
    mask = Mask() if mask is None else mask
    check_args(q, k, v, mask, bias)
    q_segment_ids, kv_segment_ids = mask.q_segment_ids, mask.kv_segment_ids
    B, T, N, H = q.shape
    S = k.shape[1]
    bq, bk = min(block_q, T), min(block_k, S)
    Tp, Sp = math.ceil(T / bq) * bq, math.ceil(S / bk) * bk
    if Sp != S and kv_segment_ids is None:  # padded keys must be invisible
        kv_segment_ids = jnp.ones((B, S), jnp.int32)

    def heads_major(x, L, b):  # [B, L, N, H] -> [L / b, B, N, b, H]: the matmuls' layout
        return _chunks(_pad_to(x, L, 1), b).transpose(0, 1, 3, 2, 4)

    qs, ks, vs = heads_major(q, Tp, bq), heads_major(k, Sp, bk), heads_major(v, Sp, bk)
    qseg = None if q_segment_ids is None else _chunks(_pad_to(q_segment_ids, Tp, 1), bq)
    kseg = None if kv_segment_ids is None else _chunks(_pad_to(kv_segment_ids, Sp, 1), bk)
    q_offset = jnp.asarray(q_offset, jnp.int32)
    patterns = mask.patterns
    if bias is not None:
        # The bias depends only on rel = k_pos - q_pos and saturates beyond R (the kernels'
        # lookup table): [N, 2R+1] values, gathered per chunk by clip(rel); a chunk whose
        # offsets all lie beyond R on one side takes one value per head. No log per element.
        R, lut = bias.lut()
        by_rel = jnp.take(bias.table.astype(jnp.float32), jnp.asarray(lut[:2 * R + 1]), axis=0).T
        tri = jnp.arange(bk, dtype=jnp.int32)[None, :] - jnp.arange(bq, dtype=jnp.int32)[:, None]

    def chunk_bias(q0, k0):  # [N, bq, bk]
        delta = k0 - q0
        lo, hi = delta - (bq - 1), delta + (bk - 1)  # the chunk's range of rel
        flat = (lo >= R) | (hi <= -R)

        def gathered(_):
            return jnp.take(by_rel, jnp.clip(delta + tri, -R, R) + R, axis=1)

        def saturated(_):
            v = jnp.where(lo >= R, by_rel[:, 2 * R], by_rel[:, 0])
            return jnp.broadcast_to(v[:, None, None], (N, bq, bk))

        return jax.lax.cond(flat, saturated, gathered, None)

    @jax.checkpoint
    def one_query_chunk(i, qi, qseg_i):  # qi: [B, N, bq, H]
        q0 = q_offset + i * bq

        @jax.checkpoint
        def key_step(carry, j):
            m, l, acc = carry
            k0 = j * bk
            kseg_j = None if kseg is None else kseg[j]

            def update(_):
                s = jnp.einsum("BNTH,BNSH->BNTS", qi, ks[j], preferred_element_type=jnp.float32)
                if bias is not None:
                    s = s + chunk_bias(q0, k0)[None]
                mask = reference.dense_mask(
                    patterns.replace(q_segment_ids=qseg_i, kv_segment_ids=kseg_j),
                    q_len=bq, kv_len=bk, q_offset=q0, kv_offset=k0)
                if mask is not None:
                    s = jnp.where(mask, s, reference.MASK_VALUE)
                # The shift only keeps exp() in range; the result does not depend on it.
                m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
                p = jnp.exp(s - m_new[..., None])
                if mask is not None:
                    p = jnp.where(mask, p, 0.0)
                corr = jnp.exp(m - m_new)
                pv = jnp.einsum("BNTS,BNSH->BNTH", p.astype(vs.dtype), vs[j],
                                preferred_element_type=jnp.float32)
                return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

            on = interval_visible(q0, q0 + bq - 1, k0, k0 + bk - 1, patterns)[0]
            return jax.lax.cond(on, update, lambda _: (m, l, acc), None), None

        init = (jnp.full((B, N, bq), reference.MASK_VALUE, jnp.float32),
                jnp.zeros((B, N, bq), jnp.float32), jnp.zeros((B, N, bq, H), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(key_step, init, jnp.arange(Sp // bk))
        out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]
        return out.astype(q.dtype)  # [B, N, bq, H]

    idx = jnp.arange(Tp // bq)
    if qseg is None:
        out = jax.lax.map(lambda a: one_query_chunk(a[0], a[1], None), (idx, qs))
    else:
        out = jax.lax.map(lambda a: one_query_chunk(*a), (idx, qs, qseg))
    # [T / bq, B, N, bq, H] -> [B, T, N, H]
    return out.transpose(1, 0, 3, 2, 4).reshape(B, Tp, N, H)[:, :T]
