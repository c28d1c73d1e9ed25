"""The attention contract: which key a query sees (``Mask``, ``visible``) and T5's relative bias
(``RelativeBias``, the bucket rule). Every implementation — the dense reference, the chunked
jnp path, the flash and decode kernels, the block tables — reads its semantics from here.

Positions: ``q_pos = q_offset + t`` for query row ``t``, ``k_pos = s`` for key ``s`` (plus the
key chunk's offset in ``chunked``). A query may see a key (``visible``) when all of these hold:

- ``k_seg != 0`` when kv segment ids are given (0 marks a padding key);
- ``q_seg == k_seg`` when q segment ids are given (packing; a query of segment 0 sees nothing);
- ``k_pos < kv_len`` when ``kv_len`` is set (keys beyond it are padding added by a kernel);
- ``k_pos <= q_pos`` when ``causal``;
- ``|k_pos - q_pos| <= local_window`` when ``local_window`` is set, unless ``k_pos`` or
  ``q_pos`` is below ``num_global_tokens`` (when > 0: the global tokens).

``visible`` is elementwise on broadcasting arrays (usable inside Pallas kernels);
``interval_visible`` is its form over position intervals (a block pair of positions): whether
some pair, and whether every pair, is visible — exact (``tests/pallas_kernels/test_spec.py``
checks it against ``visible`` exhaustively). ``segment_blocks`` is the conservative block form
of the segment conditions from per-block id ranges. A row with no visible key gives zeros.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# Finite "minus infinity": keeps exp() and its gradient NaN-free for fully masked rows; also the
# log-sum-exp of a row without any visible key.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@struct.dataclass
class Mask:
    """Which keys each query sees (module docstring). Segment ids are traced arrays; the
    patterns are static (hashable: kernels specialise on them)."""
    q_segment_ids: Optional[jax.Array] = None   # [B, T]; packing (None: no query-side check)
    kv_segment_ids: Optional[jax.Array] = None  # [B, S]; 0 = padding key
    causal: bool = struct.field(pytree_node=False, default=False)
    local_window: Optional[int] = struct.field(pytree_node=False, default=None)
    num_global_tokens: int = struct.field(pytree_node=False, default=0)
    kv_len: Optional[int] = struct.field(pytree_node=False, default=None)  # keys >= it: padding

    @property
    def patterns(self) -> "Mask":
        """The static part alone (no segment ids): hashable, for kernels' static arguments."""
        return self.replace(q_segment_ids=None, kv_segment_ids=None)

    def check(self, batch: int, q_len: int, kv_len: int) -> None:
        """Shape checks with errors that name the shapes."""
        q, kv = self.q_segment_ids, self.kv_segment_ids
        if q is not None and kv is None:
            raise ValueError("q_segment_ids needs kv_segment_ids (packing compares the two)")
        if q is not None and q.shape != (batch, q_len):
            raise ValueError(f"q_segment_ids.shape={q.shape} must be {(batch, q_len)}")
        if kv is not None and kv.shape != (batch, kv_len):
            raise ValueError(f"kv_segment_ids.shape={kv.shape} must be {(batch, kv_len)}")
        if self.local_window is not None and self.local_window < 0:
            raise ValueError(f"local_window={self.local_window} must be >= 0")


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int,
                             max_distance: int):
    """T5's bucket of ``relative_position = k_pos - q_pos`` (int32, any shape).

    Same arithmetic as mesh-tensorflow / transformers' ``T5Attention._relative_position_bucket``
    in float32, so it agrees bucket for bucket (tests check ±20000 against transformers). Small
    distances get one bucket each, larger ones logarithmic buckets up to ``max_distance``, beyond
    which everything shares the last bucket. Usable inside Pallas kernels (elementwise only).
    """
    return _bucket(jnp, relative_position, bidirectional=bidirectional, num_buckets=num_buckets,
                   max_distance=max_distance)


def host_buckets(relative_position, *, bidirectional: bool, num_buckets: int,
                 max_distance: int) -> np.ndarray:
    """``relative_position_bucket`` of static offsets in numpy (int32): host-side constants
    that a traced function may build while tracing, under any mesh."""
    return _bucket(np, relative_position, bidirectional=bidirectional, num_buckets=num_buckets,
                   max_distance=max_distance)


def _bucket(xp, relative_position, *, bidirectional: bool, num_buckets: int, max_distance: int):
    """The bucket rule in array module ``xp``: ``jnp`` (traced, in kernels) or ``numpy`` (host
    constants: a ``jnp`` constant built while tracing under a mesh asks that mesh's devices for
    their local devices, which a GPU topology compiled for from a CPU machine has not)."""
    rel = xp.asarray(relative_position, xp.int32)
    nb = num_buckets
    ret = xp.zeros_like(rel)
    if bidirectional:
        nb //= 2
        ret = ret + xp.where(rel > 0, nb, 0).astype(xp.int32)
        n = xp.abs(rel)
    else:
        n = xp.maximum(-rel, 0)
    max_exact = nb // 2
    is_small = n < max_exact
    nf = xp.maximum(n, 1).astype(xp.float32)  # log(0) is never selected (is_small), avoid -inf
    scale = xp.float32(math.log(max_distance / max_exact))
    large = max_exact + (xp.log(nf / xp.float32(max_exact)) / scale
                         * xp.float32(nb - max_exact)).astype(xp.int32)
    large = xp.minimum(large, nb - 1)
    return ret + xp.where(is_small, n, large).astype(xp.int32)


def bucket_saturation(*, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """Smallest R such that every ``|k_pos - q_pos| >= R`` falls in a saturated bucket.

    Beyond ``R`` the bucket depends only on the sign of the distance, so a ``[2R+1]`` lookup
    table of ``clip(rel, -R, R)`` is exact. ``R <= max_distance`` always.
    """
    rel = np.arange(-max_distance - 1, max_distance + 2, dtype=np.int32)
    b = host_buckets(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                     max_distance=max_distance)
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
    r = bucket_saturation(bidirectional=bidirectional, num_buckets=num_buckets,
                          max_distance=max_distance)
    b = host_buckets(np.arange(-r, r + 1, dtype=np.int32), bidirectional=bidirectional,
                     num_buckets=num_buckets, max_distance=max_distance)
    padded = 1 << (2 * r).bit_length()  # next power of two >= 2r + 1
    return r, np.pad(b, (0, padded - b.size), mode="edge")


@struct.dataclass
class RelativeBias:
    """T5 relative position bias: a ``[num_buckets, N]`` table (transformers'
    ``relative_attention_bias.weight``) and its bucket rule."""
    table: jax.Array
    bidirectional: bool = struct.field(pytree_node=False, default=True)
    max_distance: int = struct.field(pytree_node=False, default=128)

    @property
    def num_buckets(self) -> int:
        return int(self.table.shape[0])

    def buckets(self, rel):
        """The bucket of ``rel = k_pos - q_pos`` (``relative_position_bucket``)."""
        return relative_position_bucket(rel, bidirectional=self.bidirectional,
                                        num_buckets=self.num_buckets,
                                        max_distance=self.max_distance)

    def host_buckets(self, rel) -> np.ndarray:
        """``buckets`` of static offsets ``rel``, in numpy (``host_buckets``)."""
        return host_buckets(rel, bidirectional=bool(self.bidirectional),
                            num_buckets=self.num_buckets, max_distance=int(self.max_distance))

    def lut(self):
        """``(R, lut)`` of ``bucket_lut`` for this rule: the kernels' per-offset table."""
        return bucket_lut(bidirectional=bool(self.bidirectional), num_buckets=self.num_buckets,
                          max_distance=int(self.max_distance))


def _and(a, b):
    return b if a is None else a & b


def visible(q_pos, k_pos, q_seg, k_seg, mask: Mask):
    """May the query at ``q_pos`` (segment ``q_seg``) see the key at ``k_pos`` (``k_seg``)?

    Broadcasting int32 arrays; ``q_seg``/``k_seg`` are None where the mask has no such ids
    (their presence, not the mask's fields, decides the segment conditions: kernels pass
    tiles). Elementwise ops only, so kernels call it on tiles. None when nothing is masked.
    """
    vis = None
    if k_seg is not None:
        vis = _and(vis, k_seg != 0)
        if q_seg is not None:
            vis = _and(vis, q_seg == k_seg)
    if mask.kv_len is not None:
        vis = _and(vis, k_pos < mask.kv_len)
    if mask.causal:
        vis = _and(vis, k_pos <= q_pos)
    if mask.local_window is not None:
        near = jnp.abs(k_pos - q_pos) <= mask.local_window
        if mask.num_global_tokens:
            g = mask.num_global_tokens
            near = near | (k_pos < g) | (q_pos < g)
        vis = _and(vis, near)
    return vis


def interval_visible(q0, q1, k0, k1, mask: Mask):
    """``(some, every)``: is some / every pair ``q_pos in [q0, q1]``, ``k_pos in [k0, k1]``
    visible by position (``visible`` without segment ids)? Broadcasting int32 arrays.

    Exact for every pattern: the conditions are bounds on ``k_pos - q_pos`` (an interval over a
    block pair) or on one of the positions; ``kv_len`` clips the key interval first, since the
    causal/local witness pair must be a real key.
    """
    some = every = jnp.asarray(True)
    if mask.kv_len is not None:
        every = every & (k1 < mask.kv_len)
        k1 = jnp.minimum(k1, mask.kv_len - 1)
        some = some & (k0 <= k1)
    if mask.causal:                                                   # k_pos <= q_pos
        some = some & (k0 <= q1)
        every = every & (k1 <= q0)
    if mask.local_window is not None:                                 # |k_pos - q_pos| <= w
        w = mask.local_window
        near_some = (k0 - q1 <= w) & (q0 - k1 <= w)
        near_every = (k1 - q0 <= w) & (q1 - k0 <= w)
        if mask.num_global_tokens:
            # Global pairs are visible; only the non-global corner [qa, q1] x [ka, k1] of the
            # block pair must be near for "every".
            g = mask.num_global_tokens
            qa, ka = jnp.maximum(q0, g), jnp.maximum(k0, g)
            near_some = near_some | (k0 < g) | (q0 < g)
            near_every = (qa > q1) | (ka > k1) | ((k1 - qa <= w) & (q1 - ka <= w))
        some = some & near_some
        every = every & near_every
    return some, every & some


def segment_stats(ids, block: int):
    """Per block of ``ids [B, L]``: (min, max) over non-zero ids, and whether all are non-zero."""
    B, L = ids.shape
    x = ids.reshape(B, L // block, block)
    nz = x != 0
    big = np.iinfo(np.int32).max
    lo = jnp.min(jnp.where(nz, x, big), axis=-1)    # no non-zero id: lo > hi, overlaps nothing
    hi = jnp.max(jnp.where(nz, x, -big), axis=-1)
    return lo, hi, jnp.all(nz, axis=-1)


def segment_blocks(q_stats, k_stats):
    """``(some, every)`` of the segment conditions for blocks with ``segment_stats`` (``q_stats``
    None: no query ids), broadcasting. Conservative: ``some`` is necessary (a shared non-zero id
    lies in both ranges), ``every`` sufficient (one single identical non-zero id)."""
    k_lo, k_hi, k_all = k_stats
    if q_stats is None:
        return k_hi >= k_lo, k_all                                    # some non-padding key
    q_lo, q_hi, q_all = q_stats
    some = (q_lo <= k_hi) & (k_lo <= q_hi)
    every = q_all & k_all & (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
    return some, every


def check_args(q, k, v, mask: Mask, bias: Optional[RelativeBias]) -> None:
    """Shape/dtype checks shared by every implementation of the contract; errors name shapes."""
    B, T, N, H = q.shape
    S = k.shape[1]
    if k.shape != (B, S, N, H) or v.shape != k.shape:
        raise ValueError(f"expected k, v of shape {(B, S, N, H)}, got {k.shape=}, {v.shape=}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if bias is not None and (bias.table.ndim != 2 or bias.table.shape[1] != N):
        raise ValueError(f"bias table shape {bias.table.shape} must be [num_buckets, {N}]")
    mask.check(B, T, S)
