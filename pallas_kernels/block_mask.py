"""Block-sparse tables for the flash-attention kernels, computed outside the kernels.

The kernels only consume these tables (design rule 7; splash attention's ``MaskInfo``,
FlexAttention's ``BlockMask``). For every (batch, row block) a table lists the column blocks
that hold at least one visible (query, key) pair, FULL blocks first (every pair visible: the
kernel skips the elementwise mask), then PARTIAL ones (the kernel applies the mask). Dead
blocks are never listed, so the kernel never visits them.

Rows are query blocks for the forward and dq kernels, key blocks for the dk/dv kernel
(``transpose=True``). Visibility is exactly ``jt5.pallas_kernels.reference.dense_mask``; the
classification here is conservative and jittable (traced segment ids and ``q_offset``), and
never builds a dense ``T x S`` mask:

- segments: a block pair is dead if the ranges ``[min, max]`` of the non-zero segment ids of
  the query block and of the key block do not overlap (a shared id lies in both ranges), or if
  the key block is all padding (id 0); it is full only if both blocks hold one single identical
  non-zero id (without query ids: the key block holds no padding);
- geometry (``q_pos = q_offset + t``, ``k_pos = s``): causal and local-window bounds are linear,
  so the extreme corners of the block pair decide "no pair visible" and "all pairs visible";
  global tokens make a pair visible whenever the key or the query is among the first
  ``num_global_tokens`` positions.

Each condition yields a necessary test for "some pair visible" and a sufficient test for "all
pairs visible"; their conjunctions are again necessary resp. sufficient, hence always correct.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_BIG = np.iinfo(np.int32).max


class BlockMask(NamedTuple):
    """Per (batch, row block) lists of live column blocks.

    ``counts[b, r] = (number of full blocks, number of live blocks)``; ``indices[b, r, :]`` holds
    the full blocks, then the partial ones (each group ascending); entries past the live count
    repeat the last live block (or 0), so a prefetch past the end stays in bounds. The batch
    dimension is 1 when no segment ids are given (the same table serves every batch row).
    """
    counts: jax.Array   # [Bm, rows, 2] int32
    indices: jax.Array  # [Bm, rows, cols] int32


def _segment_stats(ids, block: int):
    """Per block of ``ids [B, L]``: (min, max) over non-zero ids, and whether all are non-zero."""
    B, L = ids.shape
    x = ids.reshape(B, L // block, block)
    nz = x != 0
    lo = jnp.min(jnp.where(nz, x, _BIG), axis=-1)    # no non-zero id: lo > hi, overlaps nothing
    hi = jnp.max(jnp.where(nz, x, -_BIG), axis=-1)
    return lo, hi, jnp.all(nz, axis=-1)


def classify_blocks(*, q_len: int, kv_len: int, block_q: int, block_k: int,
                    q_segment_ids=None, kv_segment_ids=None, q_offset=0, causal: bool = False,
                    local_window: int | None = None, num_global_tokens: int = 0,
                    kv_valid_len: int | None = None):
    """``(live, full)`` booleans ``[Bm, q_len // block_q, kv_len // block_k]``.

    ``q_len``/``kv_len`` are the padded lengths (multiples of the blocks) and the segment ids
    (if given) have those lengths. Keys at ``k_pos >= kv_valid_len`` are padding (invisible).
    ``full`` implies ``live``.
    """
    if q_len % block_q or kv_len % block_k:
        raise ValueError(f"{q_len=} must be a multiple of {block_q=} and {kv_len=} of {block_k=}")
    if q_segment_ids is not None and kv_segment_ids is None:
        raise ValueError("q_segment_ids needs kv_segment_ids (packing compares the two)")
    nq, nk = q_len // block_q, kv_len // block_k
    kv_valid_len = kv_len if kv_valid_len is None else kv_valid_len
    live = jnp.ones((1, nq, nk), bool)
    full = jnp.ones((1, nq, nk), bool)

    kv_ids = None
    if kv_segment_ids is not None:
        kv_ids = jnp.asarray(kv_segment_ids, jnp.int32)
        if kv_valid_len < kv_len:
            kv_ids = jnp.where(jnp.arange(kv_len) < kv_valid_len, kv_ids, 0)
    elif kv_valid_len < kv_len:  # padding keys only: behave like segment ids 1 (real) / 0 (pad)
        kv_ids = (jnp.arange(kv_len) < kv_valid_len).astype(jnp.int32)[None]
    if kv_ids is not None:
        k_lo, k_hi, k_all = _segment_stats(kv_ids, block_k)          # [Bk, nk]
        if q_segment_ids is not None:
            q_lo, q_hi, q_all = _segment_stats(jnp.asarray(q_segment_ids, jnp.int32), block_q)
            q_lo, q_hi, q_all = q_lo[:, :, None], q_hi[:, :, None], q_all[:, :, None]
            k_lo, k_hi, k_all = k_lo[:, None, :], k_hi[:, None, :], k_all[:, None, :]
            live = live & (q_lo <= k_hi) & (k_lo <= q_hi)
            full = full & q_all & k_all & (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
        else:
            live = live & (k_hi >= k_lo)[:, None, :]                  # some non-padding key
            full = full & k_all[:, None, :]

    if causal or local_window is not None:
        q0 = (jnp.asarray(q_offset, jnp.int32) + jnp.arange(nq, dtype=jnp.int32) * block_q)[:, None]
        q1 = q0 + (block_q - 1)
        k0 = (jnp.arange(nk, dtype=jnp.int32) * block_k)[None, :]
        k1 = k0 + (block_k - 1)
        if causal:                                                    # k_pos <= q_pos
            live = live & (k0 <= q1)[None]
            full = full & (k1 <= q0)[None]
        if local_window is not None:                                  # |k_pos - q_pos| <= w
            w = local_window
            near_live = (k0 - q1 <= w) & (q0 - k1 <= w)
            near_full = (k1 - q0 <= w) & (q1 - k0 <= w)
            if num_global_tokens:
                # Global pairs are visible; only the non-global corner [qa, q1] x [ka, k1] of
                # the block pair must be near for "full".
                g = num_global_tokens
                qa, ka = jnp.maximum(q0, g), jnp.maximum(k0, g)
                near_live = near_live | (k0 < g) | (q0 < g)
                near_full = (qa > q1) | (ka > k1) | ((k1 - qa <= w) & (q1 - ka <= w))
            live = live & near_live[None]
            full = full & near_full[None]
    return live, full & live


def tables_from_classes(live, full, *, transpose: bool = False) -> BlockMask:
    """Compact ``(live, full)`` ``[Bm, nq, nk]`` into a ``BlockMask`` (rows = q blocks, or k
    blocks with ``transpose``)."""
    if transpose:
        live, full = jnp.swapaxes(live, 1, 2), jnp.swapaxes(full, 1, 2)
    key = jnp.where(full, 0, jnp.where(live, 1, 2)).astype(jnp.int32)
    order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
    n_full = jnp.sum(full, axis=-1, dtype=jnp.int32)
    n_live = jnp.sum(live, axis=-1, dtype=jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(n_live - 1, 0)[..., None], axis=-1)
    pos = jnp.arange(order.shape[-1], dtype=jnp.int32)
    indices = jnp.where(pos < n_live[..., None], order, jnp.where(n_live[..., None] > 0, last, 0))
    return BlockMask(counts=jnp.stack([n_full, n_live], axis=-1), indices=indices)


def make_block_mask(*, q_len: int, kv_len: int, block_q: int, block_k: int, q_segment_ids=None,
               kv_segment_ids=None, q_offset=0, causal: bool = False,
               local_window: int | None = None, num_global_tokens: int = 0,
               kv_valid_len: int | None = None, transpose: bool = False) -> BlockMask:
    """The kernel tables for one block geometry (see ``classify_blocks`` for the arguments)."""
    live, full = classify_blocks(
        q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, q_offset=q_offset,
        causal=causal, local_window=local_window, num_global_tokens=num_global_tokens,
        kv_valid_len=kv_valid_len)
    return tables_from_classes(live, full, transpose=transpose)
