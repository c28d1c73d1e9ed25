"""Block-sparse tables for the flash-attention kernels, computed outside the kernels.

The kernels only consume these tables (design rule 7; splash attention's ``MaskInfo``,
FlexAttention's ``BlockMask``). For every (batch, row block) a table lists the column blocks
that hold at least one visible (query, key) pair, FULL blocks first (every pair visible: the
kernel skips the elementwise mask), then PARTIAL ones (the kernel applies the mask). Dead
blocks are never listed, so the kernel never visits them.

Rows are query blocks for the forward and dq kernels, key blocks for the dk/dv kernel
(``transpose=True``). Visibility is ``spec.visible``; the classification is its block form from
``spec`` — ``interval_visible`` for the position patterns (exact) and ``segment_blocks`` for the
segment ids (conservative: id ranges) — jittable (traced segment ids and ``q_offset``), and never
builds a dense ``T x S`` mask. A necessary test for "some pair visible" and a sufficient test for
"all pairs visible" per condition; their conjunctions are again necessary resp. sufficient.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jt5.pallas_kernels.spec import Mask, interval_visible, segment_blocks, segment_stats


class BlockMask(NamedTuple):
    """Per (batch, row block) lists of live column blocks.

    ``counts[b, r] = (number of full blocks, number of live blocks)``; ``indices[b, r, :]`` holds
    the full blocks, then the partial ones (each group ascending); entries past the live count
    repeat the last live block (or 0), so a prefetch past the end stays in bounds. The batch
    dimension is 1 when no segment ids are given (the same table serves every batch row).
    """
    counts: jax.Array   # [Bm, rows, 2] int32
    indices: jax.Array  # [Bm, rows, cols] int32


def classify_blocks(mask: Mask, *, q_len: int, kv_len: int, block_q: int, block_k: int,
                    q_offset=0):
    """``(live, full)`` booleans ``[Bm, q_len // block_q, kv_len // block_k]``.

    ``q_len``/``kv_len`` are the padded lengths (multiples of the blocks) and the mask's segment
    ids (if given) have those lengths. ``full`` implies ``live``; ``Bm`` is 1 without ids.
    """
    if q_len % block_q or kv_len % block_k:
        raise ValueError(f"{q_len=} must be a multiple of {block_q=} and {kv_len=} of {block_k=}")
    if mask.q_segment_ids is not None and mask.kv_segment_ids is None:
        raise ValueError("q_segment_ids needs kv_segment_ids (packing compares the two)")
    nq, nk = q_len // block_q, kv_len // block_k
    q0 = (jnp.asarray(q_offset, jnp.int32) + jnp.arange(nq, dtype=jnp.int32) * block_q)[:, None]
    k0 = (jnp.arange(nk, dtype=jnp.int32) * block_k)[None, :]
    live, full = interval_visible(q0, q0 + (block_q - 1), k0, k0 + (block_k - 1), mask)
    live = jnp.broadcast_to(live, (1, nq, nk))
    full = jnp.broadcast_to(full, (1, nq, nk))
    if mask.kv_segment_ids is not None:
        k_stats = [x[:, None, :] for x in
                   segment_stats(jnp.asarray(mask.kv_segment_ids, jnp.int32), block_k)]
        q_stats = None
        if mask.q_segment_ids is not None:
            q_stats = [x[:, :, None] for x in
                       segment_stats(jnp.asarray(mask.q_segment_ids, jnp.int32), block_q)]
        seg_live, seg_full = segment_blocks(q_stats, k_stats)
        live, full = live & seg_live, full & seg_full
    return live, full & live


def tables_from_classes(live, full, *, transpose: bool = False) -> BlockMask:
    """Compact ``(live, full)`` ``[Bm, nq, nk]`` into a ``BlockMask`` (rows = q blocks, or k
    blocks with ``transpose``)."""
    if transpose:
        live, full = jnp.swapaxes(live, 1, 2), jnp.swapaxes(full, 1, 2)
    # A stable partition (full, then partial, then dead) by prefix counts and one scatter:
    # linear in the table, where a sort of every row was n log n and, on a GPU, past 16k
    # column blocks (1M tokens) became a CUB radix sort that a deviceless compile cannot size.
    partial = live & ~full
    n_full = jnp.sum(full, axis=-1, dtype=jnp.int32)
    n_live = jnp.sum(live, axis=-1, dtype=jnp.int32)
    Bm, rows, cols = live.shape
    dest = jnp.where(full, jnp.cumsum(full, axis=-1, dtype=jnp.int32) - 1,
                     jnp.where(partial, n_full[..., None] - 1
                               + jnp.cumsum(partial, axis=-1, dtype=jnp.int32), cols))
    col = jnp.broadcast_to(jnp.arange(cols, dtype=jnp.int32), live.shape)
    b = jnp.arange(Bm, dtype=jnp.int32)[:, None, None]
    r = jnp.arange(rows, dtype=jnp.int32)[None, :, None]
    order = jnp.zeros(live.shape, jnp.int32).at[b, r, dest].set(col, mode="drop")
    last = jnp.take_along_axis(order, jnp.maximum(n_live - 1, 0)[..., None], axis=-1)
    pos = jnp.arange(cols, dtype=jnp.int32)
    indices = jnp.where(pos < n_live[..., None], order, jnp.where(n_live[..., None] > 0, last, 0))
    return BlockMask(counts=jnp.stack([n_full, n_live], axis=-1), indices=indices)


def make_block_mask(mask: Mask, *, q_len: int, kv_len: int, block_q: int, block_k: int,
                    q_offset=0, transpose: bool = False) -> BlockMask:
    """The kernel tables for one block geometry (see ``classify_blocks`` for the arguments)."""
    live, full = classify_blocks(mask, q_len=q_len, kv_len=kv_len, block_q=block_q,
                                 block_k=block_k, q_offset=q_offset)
    return tables_from_classes(live, full, transpose=transpose)
