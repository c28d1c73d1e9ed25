"""What the Mosaic GPU kernels read besides q, k, v — computed by XLA outside the kernels from the
contract in ``spec.py``: block-sparse tables, T5's bias as exact tiles, and the bias-table
gradient assembled from the kernels' partial sums.

**Bias tiles.** Mosaic GPU lowers no gather, so the per-logit table lookup of the Triton kernels
is impossible. Inside a 64 x 64 block pair the bias depends only on the head and the block
offset ``e = kb - qb - a`` (``q_offset = 64 a + r``): ``rel = 64 e + (j - i - r)``. Beyond
``|e| > near`` every ``|rel|`` is at least the bucket saturation ``R`` (``spec.bucket_saturation``),
so the bias is one value per head and side (``far``). ``near`` tiles of ``[64, 64]`` float32 per
head are therefore exact for any length; the kernels add a tile near the diagonal and a scalar
elsewhere (most block pairs of a long sequence). Values are pre-scaled by log2(e) (the kernels'
softmax runs in base 2).

**Bias gradient.** ``dtable[k, n] = sum dS[b, n, i, j]`` over the pairs whose bucket is ``k``.
Near pairs: the band kernel sums dS per (head, offset ``e``) into one ``[64, 64]`` tile over
batch and query blocks, mapped to buckets here. Far pairs: the dq kernel sums each row's dS over
its far blocks, one value per row and side, summed here. Nothing ``[T, S]``-sized is built.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jt5.pallas_kernels.block_mask import BlockMask, classify_blocks, tables_from_classes
from jt5.pallas_kernels.mosaic_common import BLOCK, LOG2E, TILE
from jt5.pallas_kernels.spec import Mask, RelativeBias


def near_radius(radius: int, q_offset) -> int:
    """Largest block offset ``|e|`` whose tile is not a single saturated value.

    Every ``e > near`` has ``rel >= 64 (near + 1) - 63 - r >= R`` and every ``e < -near`` has
    ``rel <= -(64 (near + 1) - 63 + r) <= -R``; ``r = q_offset mod 64`` (63 when traced)."""
    r = q_offset % BLOCK if isinstance(q_offset, (int, np.integer)) else BLOCK - 1
    return max(0, math.ceil((radius + BLOCK - 1 + r) / BLOCK) - 1)


def split_offset(q_offset):
    """``(a, r)`` with ``q_offset = 64 a + r``, ``0 <= r < 64`` (int32 scalars)."""
    q_offset = jnp.asarray(q_offset, jnp.int32)
    return q_offset // BLOCK, q_offset % BLOCK


def band_offsets(near: int, q_offset, *, q_len: int, kv_len: int):
    """The block offsets ``(lo, hi)`` within ``[-near, near]`` some block pair can have (all of
    them when ``q_offset`` is traced), or None: the band kernel's grid."""
    lo, hi = -near, near
    if isinstance(q_offset, (int, np.integer)):
        a = int(q_offset) // BLOCK
        lo, hi = max(lo, -(q_len // BLOCK - 1) - a), min(hi, kv_len // BLOCK - 1 - a)
    return (lo, hi) if lo <= hi else None


def _tile_rel(lo: int, hi: int, r):
    """``[hi - lo + 1, 64, 64]`` int32: ``rel = 64 e + j - i - r`` for offsets ``e = lo..hi``."""
    e = jnp.arange(lo, hi + 1, dtype=jnp.int32)[:, None, None]
    i = jnp.arange(BLOCK, dtype=jnp.int32)[None, :, None]
    j = jnp.arange(BLOCK, dtype=jnp.int32)[None, None, :]
    return BLOCK * e + j - i - r


class BiasTiles(NamedTuple):
    """The bias as the kernels read it (log2(e)-scaled float32)."""
    tiles: jax.Array      # [N, 2 near + 1, 64, 64]: tile e + near, rows = queries
    tiles_t: jax.Array    # [N, 2 near + 1, 64, 64]: the same transposed (rows = keys)
    far: jax.Array        # [N, 2]: value beyond -near (0) and beyond +near (1)


def bias_tiles(bias: RelativeBias, near: int, r) -> BiasTiles:
    radius, lut = bias.lut()
    table = bias.table.astype(jnp.float32) * LOG2E                       # [K, N]
    rel = jnp.clip(_tile_rel(-near, near, r), -radius, radius) + radius
    tiles = jnp.moveaxis(table[jnp.asarray(lut)[rel]], -1, 0)            # [N, 2n+1, 64, 64]
    far = jnp.stack([table[int(lut[0])], table[int(lut[2 * radius])]], axis=-1)
    return BiasTiles(tiles, jnp.swapaxes(tiles, -1, -2), far)


def table_gradient(bias: RelativeBias, offsets, r, band, far_rows) -> jax.Array:
    """``[K, N]`` gradient of the bias table from the band kernel's tiles ``band [N, hi - lo +
    1, 64, 64]`` (dS summed per offset ``e`` in ``offsets = (lo, hi)``; None when no offset is
    reachable) and the dq kernel's ``far_rows [B, N, 2, T]`` (dS summed per row over far
    blocks, left and right)."""
    radius, lut = bias.lut()
    K, N = bias.table.shape
    dtable = jnp.zeros((K, N), jnp.float32)
    if offsets is not None:
        buckets = jnp.asarray(lut)[jnp.clip(_tile_rel(*offsets, r), -radius, radius) + radius]
        onehot = jax.nn.one_hot(buckets.reshape(-1), K, dtype=jnp.float32)      # [E*64*64, K]
        dtable = jnp.einsum("NX,XK->KN", band.reshape(N, -1), onehot,
                            precision=jax.lax.Precision.HIGHEST)
    far = far_rows.sum(axis=(0, 3))                                              # [N, 2]
    dtable = dtable.at[int(lut[0])].add(far[:, 0]).at[int(lut[2 * radius])].add(far[:, 1])
    return dtable.astype(bias.table.dtype)


# ---------------------------------------------------------------------------- block tables

class Tables(NamedTuple):
    """Block-sparse tables of one call (``BlockMask``: full blocks first, then partial)."""
    rows: BlockMask            # per 128-row query tile: live 64-key blocks (forward, dq)
    cols: BlockMask            # per 128-key tile: live 64-row query blocks (dk/dv)
    band: Optional[BlockMask]  # per offset e = lo..hi (rows): live 64-row query blocks qb
    #                            with key block qb + a + e (the bias-gradient band kernel)


def make_tables(mask: Mask, *, q_len: int, kv_len: int, q_offset, band,
                backward: bool) -> Tables:
    """The tables for padded lengths (multiples of 128); ``band``: the band kernel's offsets
    ``(lo, hi)`` (None: no band kernel)."""
    rows = _compact(mask, q_len, kv_len, TILE, BLOCK, q_offset, transpose=False)
    if not backward:
        return Tables(rows, None, None)
    cols = _compact(mask, q_len, kv_len, BLOCK, TILE, q_offset, transpose=True)
    if band is None:
        return Tables(rows, cols, None)
    live, full = classify_blocks(mask, q_len=q_len, kv_len=kv_len, block_q=BLOCK,
                                 block_k=BLOCK, q_offset=q_offset)
    a, _ = split_offset(q_offset)
    nq, nk = live.shape[1], live.shape[2]
    kb = (jnp.arange(nq, dtype=jnp.int32)[None, :] + a
          + jnp.arange(band[0], band[1] + 1, dtype=jnp.int32)[:, None])     # [E, nq]
    inside = (kb >= 0) & (kb < nk)
    idx = jnp.broadcast_to(jnp.clip(kb, 0, nk - 1)[None], (live.shape[0], *kb.shape))
    pick = lambda x: jnp.take_along_axis(jnp.swapaxes(x, 1, 2), idx, axis=1) & inside
    band_table = tables_from_classes(pick(live), pick(full))               # rows = e
    return Tables(rows, cols, band_table)


def _compact(mask, q_len, kv_len, block_q, block_k, q_offset, transpose):
    live, full = classify_blocks(mask, q_len=q_len, kv_len=kv_len, block_q=block_q,
                                 block_k=block_k, q_offset=q_offset)
    return tables_from_classes(live, full, transpose=transpose)

