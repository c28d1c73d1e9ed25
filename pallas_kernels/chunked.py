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
import numpy as np

from jt5.pallas_kernels import reference
from jt5.pallas_kernels.spec import MASK_VALUE, Mask, RelativeBias, check_args, interval_visible


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
                    s = jnp.where(mask, s, MASK_VALUE)
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

        init = (jnp.full((B, N, bq), MASK_VALUE, jnp.float32),
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


# -- local windows: one tile of offsets per query chunk ----------------------------------------
def heads_major_chunks(x, n: int, size: int):  # [B, n*size, N, H] -> [n, B, N, size, H]
    B, _, N, H = x.shape
    return x.reshape(B, n, size, N, H).transpose(1, 0, 3, 2, 4)


def from_chunks(y, S: int):  # [n, B, N, size, H] -> [B, S, N, H]; [n, B, N, size] -> [B, N, S]
    n, B, N, size = y.shape[:4]
    if y.ndim == 5:
        return y.transpose(1, 0, 3, 2, 4).reshape(B, n * size, N, y.shape[-1])[:, :S]
    return y.transpose(1, 2, 0, 3).reshape(B, N, n * size)[..., :S]


def attend_stats(s, mask, v):
    """Scores ``[B, N, T, K]`` shown where ``mask`` is, values ``[B, N, K, H]`` -> ``(out
    [B, N, T, H] float32, lse [B, N, T])`` (rows with no visible key: 0 and MASK_VALUE)."""
    p, lse = reference.masked_softmax(s, None, mask)
    return jnp.einsum("BNTK,BNKH->BNTH", p.astype(v.dtype), v,
                      preferred_element_type=jnp.float32), lse


def windowed(mask: Mask, q_len: int, kv_len: int, q_offset) -> bool:
    """Does ``window_attention`` implement ``mask`` (a local window over one sequence)?"""
    return (mask.local_window is not None and not mask.causal and not mask.num_global_tokens
            and mask.q_segment_ids is None and mask.kv_len is None and q_len == kv_len
            and isinstance(q_offset, int) and q_offset == 0)


def window_attention(q, k, v, mask: Mask, bias: RelativeBias | None = None, *,
                     block_q: int = 512):
    """Self-attention within ``mask.local_window = R`` of each query (and not on padding keys,
    ``mask.kv_segment_ids == 0``) -> ``(out [B, S, N, H] float32, lse [B, N, S])``.

    Query chunk ``i`` sees the ``block_q + 2R`` keys around it. Their offsets are the same for
    every chunk, so the bias and the window are one ``[N, block_q, block_q + 2R]`` tile, made
    once: no per-chunk bias gathers and no skipped key chunks to test (2-3x faster than
    ``chunked_attention`` with the same window on a CPU; benchmarks/RESULTS.md "Long inputs").
    Memory ``O(S (block_q + 2R))``; each chunk is ``jax.checkpoint``-ed for the backward pass."""
    if not windowed(mask, q.shape[1], k.shape[1], 0):
        raise ValueError(f"window_attention takes a local window over one sequence, not {mask}")
    check_args(q, k, v, mask, bias)
    B, S, N, H = q.shape
    R = min(mask.local_window, S)
    bq = min(block_q, S)
    n = -(-S // bq)
    W = bq + 2 * R
    pad = ((0, 0), (R, n * bq - S + R), (0, 0), (0, 0))
    seg = mask.kv_segment_ids
    ok = jnp.ones((1, S), bool) if seg is None else jnp.asarray(seg) != 0
    okp = jnp.pad(jnp.broadcast_to(ok, (B, S)), ((0, 0), pad[1]))
    idx = jnp.asarray(np.arange(n)[:, None] * bq + np.arange(W)[None])  # [n, W]
    kw = jnp.take(jnp.pad(k, pad), idx, axis=1).transpose(1, 0, 3, 2, 4)  # [n, B, N, W, H]
    vw = jnp.take(jnp.pad(v, pad), idx, axis=1).transpose(1, 0, 3, 2, 4)
    okw = jnp.take(okp, idx, axis=1).transpose(1, 0, 2)  # [n, B, W]
    rel = np.arange(W)[None] - R - np.arange(bq)[:, None]  # k_pos - q_pos, [bq, W]
    tile = 0.0
    if bias is not None:
        buckets = bias.host_buckets(rel)  # numpy: a constant, whatever mesh is active
        tile = jnp.take(bias.table.astype(jnp.float32), jnp.asarray(buckets), axis=0)
        tile = tile.transpose(2, 0, 1)[None]  # [1, N, bq, W]
    near = jnp.asarray(np.abs(rel) <= R)[None, None]
    qs = heads_major_chunks(_pad_to(q, n * bq, 1), n, bq)

    @jax.checkpoint
    def chunk(args):
        qi, ki, vi, oki = args
        s = jnp.einsum("BNTH,BNKH->BNTK", qi, ki, preferred_element_type=jnp.float32) + tile
        return attend_stats(s, near & oki[:, None, None, :], vi)

    out, lse = jax.lax.map(chunk, (qs, kw, vw, okw))
    return from_chunks(out, S), from_chunks(lse, S)


def merge_lse(a, lse_a, b, lse_b):
    """One softmax over two key sets from each set's normalised output ``[B, T, N, H]`` and
    log-sum-exp ``[B, N, T]`` (rows that see neither stay 0)."""
    m = jax.lax.stop_gradient(jnp.maximum(jnp.maximum(lse_a, lse_b), MASK_VALUE))
    wa, wb = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
    den = wa + wb
    den = jnp.where(den == 0.0, 1.0, den)
    wa, wb = (jnp.swapaxes(w / den, 1, 2)[..., None] for w in (wa, wb))  # [B, T, N, 1]
    return wa * a.astype(jnp.float32) + wb * b.astype(jnp.float32)
