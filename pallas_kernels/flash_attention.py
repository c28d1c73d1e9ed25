"""Flash attention for T5 in Pallas (Triton lowering): in-kernel relative position bias,
block-sparse masks, forward and backward.

Semantics are exactly the contract of ``spec.py`` (its oracle: ``reference.attention_reference``):
the tiles are masked by ``spec.visible``, the block tables come from its block form. Layout
``[B, T, N, H]`` / ``[B, S, N, H]``; the kernels follow jax's ``pallas/ops/gpu/attention.py``
(one program per (query block, batch, head), online softmax in base 2, FlashAttention-2 §3.1) with
three T5 additions:

- Bias: the bucket depends only on ``rel = k_pos - q_pos`` and saturates at ``R =
  bucket_saturation(...)`` (<= max_distance), so a per-head value table ``lut[n, clip(rel, -R,
  R) + R]`` (``[N, 2R+1]``, padded to a power of two) is exact. Near the diagonal the kernel
  gathers from it (a pointer gather, which Triton lowers natively); a block pair entirely beyond
  +-R takes one scalar per head instead (a ``lax.cond``; most pairs of a long sequence).
- Masks: ``block_mask`` tables list, per row block, the live column blocks, full ones first;
  the kernels run one loop over full blocks without any elementwise mask and one over partial
  blocks with it. Dead blocks are never visited. Rows without a visible key give zeros.
- Bias gradient: the dk/dv kernel accumulates per-bucket sums of dS for its key block (a loop
  over the buckets present in the tile, one scalar for far tiles) and writes them out per
  (batch, head, key block); the sum over batch and key blocks happens outside the kernel.
  Deterministic, no atomics.

``return_lse=True`` also returns the natural log-sum-exp of each row's visible scores (what
merging this attention with attention over other keys needs), differentiable: its cotangent
``g`` enters the backward as ``ds = p * (dp - (delta - g))``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jt5.pallas_kernels.block_mask import make_block_mask
from jt5.pallas_kernels.blocks import BlockSizes, get_block_sizes, next_power_of_2, target_device
from jt5.pallas_kernels.spec import (MASK_VALUE, Mask, RelativeBias, bucket_lut, check_args,
                                     visible)

LOG2E = math.log2(math.e)
# In-kernel lse of a row without any visible key: exp2(s - lse) underflows to exactly 0 for
# every s. The public lse of such a row is MASK_VALUE.
_EMPTY_LSE = -MASK_VALUE


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable: a ``custom_vjp`` nondiff argument)."""
    blocks: BlockSizes
    sm_scale: float
    mask: Mask             # patterns only (Mask.patterns); its kv_len masks keys padded here
    bidirectional: bool    # the bias' bucket rule (num_buckets 0: no bias)
    num_buckets: int
    max_distance: int
    radius: int            # bucket saturation R (LUT index = clip(rel, -R, R) + R)
    interpret: bool
    debug: bool
    precision: lax.Precision   # of float32 dots (resolve_precision)


def _dot(a, b, st: _Static, *, trans_a=False, trans_b=False):
    # Only float32 inputs have a choice (tf32 tensor cores or IEEE FMA loops); bf16/f16 dots
    # run on tensor cores either way.
    prec = st.precision if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=prec)


def resolve_precision(precision, *, interpret: bool) -> lax.Precision:
    """Precision of the kernels' float32 dots: an explicit ``precision`` (a ``lax.Precision`` or
    its name), else ``jax.default_matmul_precision`` in effect, else DEFAULT — tf32 tensor cores
    on a GPU, as XLA's f32 dots there. HIGHEST (or "float32") is IEEE. Interpret mode defaults
    to HIGHEST: it is the oracle compiled kernels are checked against."""
    if precision is None:
        precision = jax.config.jax_default_matmul_precision
    if precision is None:
        return lax.Precision.HIGHEST if interpret else lax.Precision.DEFAULT
    try:
        return precision if isinstance(precision, lax.Precision) else lax.Precision(precision)
    except (ValueError, TypeError):
        raise ValueError(f"precision={precision!r} must be a lax.Precision or one of its names "
                         "('default', 'high', 'highest', 'float32', ...)") from None


# ---------------------------------------------------------------------------- in-kernel pieces

def _far(q_first, k_first, *, block_q, block_k, radius):
    """Is the tile entirely beyond +-R (one bias value), and that value's LUT index."""
    beyond = k_first - (q_first + block_q - 1) >= radius          # every rel >= R
    before = k_first + (block_k - 1) - q_first <= -radius         # every rel <= -R
    return beyond | before, jnp.where(beyond, 2 * radius, 0)


def _lut_index(q_pos, k_pos, radius):
    return jnp.clip(k_pos[None, :] - q_pos[:, None], -radius, radius) + radius


def _bias_tile(lut_ref, q_pos, k_pos, far, far_idx, radius):
    shape = (q_pos.shape[0], k_pos.shape[0])
    return lax.cond(far, lambda: jnp.full(shape, lut_ref[far_idx], jnp.float32),
                    lambda: lut_ref[_lut_index(q_pos, k_pos, radius)])


def _visible(q_pos, k_pos, q_seg, k_seg, st: _Static):
    """``spec.visible`` of a partial tile (``[bq] x [bk]`` positions and ids), or None."""
    return visible(q_pos[:, None], k_pos[None, :], None if q_seg is None else q_seg[:, None],
                   None if k_seg is None else k_seg[None, :], st.mask)


def _scores(q, k, q_pos, k_pos, q_first, k_first, lut_ref, st: _Static, bq: int, bk: int):
    """Scores in the base-2 domain (``log2(e) * (sm_scale q.k + bias)``) and the far flag."""
    s = _dot(q, k, st, trans_b=True) * (st.sm_scale * LOG2E)
    far = far_idx = None
    if lut_ref is not None:
        far, far_idx = _far(q_first, k_first, block_q=bq, block_k=bk, radius=st.radius)
        s = s + _bias_tile(lut_ref, q_pos, k_pos, far, far_idx, st.radius)
    return s, far, far_idx


def _bucket_sums(acc, ds, blut_ref, q_pos, k_pos, far, far_idx, radius):
    """``acc[b] += sum(ds where bucket == b)`` over the buckets present in this tile."""
    slots = jnp.arange(acc.shape[0], dtype=jnp.int32)

    def far_tile():
        return acc + jnp.where(slots == blut_ref[far_idx], jnp.sum(ds), 0.0)

    def near_tile():
        bucket = blut_ref[_lut_index(q_pos, k_pos, radius)]

        def one(b, a):
            return a + jnp.where(slots == b, jnp.sum(jnp.where(bucket == b, ds, 0.0)), 0.0)
        return lax.fori_loop(jnp.min(bucket), jnp.max(bucket) + 1, one, acc)
    return lax.cond(far, far_tile, near_tile)


# ---------------------------------------------------------------------------- kernels

def _fwd_kernel(qoff_ref, q_ref, k_ref, v_ref, lut_ref, qseg_ref, kseg_ref, cnt_ref, idx_ref,
                o_ref, lse_ref, *, st: _Static):
    bq, bk = st.blocks.block_q, st.blocks.block_k
    q_first = qoff_ref[0] + pl.program_id(0) * bq
    q_pos = q_first + jnp.arange(bq, dtype=jnp.int32)
    q = q_ref[...]
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def step(t, carry, *, masked):
        acc, m, l = carry
        k_first = pl.multiple_of(idx_ref[t] * bk, bk)
        k_pos = k_first + jnp.arange(bk, dtype=jnp.int32)
        ks = pl.ds(k_first, bk)
        s, _, _ = _scores(q, k_ref[ks, :], q_pos, k_pos, q_first, k_first, lut_ref, st, bq, bk)
        vis = None
        if masked:
            k_seg = None if kseg_ref is None else kseg_ref[ks]
            vis = _visible(q_pos, k_pos, q_seg, k_seg, st)
        if vis is not None:
            s = jnp.where(vis, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if vis is not None:
            p = jnp.where(vis, p, 0.0)        # rows with nothing visible keep l == 0
        v = v_ref[ks, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, st)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    n_full, n_live = cnt_ref[0], cnt_ref[1]
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(n_full, n_live, functools.partial(step, masked=True), carry)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, _EMPTY_LSE, m + jnp.log2(l_safe))


def _dkv_kernel(qoff_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lut_ref, blut_ref,
                qseg_ref, kseg_ref, cnt_ref, idx_ref, dk_ref, dv_ref, *dbias_ref,
                st: _Static):
    dbias_ref = dbias_ref[0] if dbias_ref else None   # only with a bias table
    bq, bk = st.blocks.block_q_dkv, st.blocks.block_k_dkv
    qoff = qoff_ref[0]
    k_first = pl.program_id(0) * bk
    k_pos = k_first + jnp.arange(bk, dtype=jnp.int32)
    k, v = k_ref[...], v_ref[...]
    k_seg = None if kseg_ref is None else kseg_ref[...]

    def step(t, carry, *, masked):
        dk, dv, db = carry
        q_start = pl.multiple_of(idx_ref[t] * bq, bq)
        q_first = qoff + q_start
        q_pos = q_first + jnp.arange(bq, dtype=jnp.int32)
        qs = pl.ds(q_start, bq)
        q, do = q_ref[qs, :], do_ref[qs, :]
        s, far, far_idx = _scores(q, k, q_pos, k_pos, q_first, k_first, lut_ref, st, bq, bk)
        p = jnp.exp2(s - lse_ref[qs][:, None])          # softmax probabilities (natural)
        if masked:
            vis = _visible(q_pos, k_pos, None if qseg_ref is None else qseg_ref[qs], k_seg, st)
            if vis is not None:
                p = jnp.where(vis, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, st, trans_a=True)
        ds = p * (_dot(do, v, st, trans_b=True) - delta_ref[qs][:, None])   # dL/d(score + bias)
        dk = dk + _dot(ds.astype(q.dtype), q, st, trans_a=True)
        if db is not None:
            db = _bucket_sums(db, ds, blut_ref, q_pos, k_pos, far, far_idx, st.radius)
        return dk, dv, db

    z = jnp.zeros(k.shape, jnp.float32)
    db = None if dbias_ref is None else jnp.zeros(dbias_ref.shape, jnp.float32)
    n_full, n_live = cnt_ref[0], cnt_ref[1]
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), (z, z, db))
    dk, dv, db = lax.fori_loop(n_full, n_live, functools.partial(step, masked=True), carry)
    dk_ref[...] = (dk * st.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if dbias_ref is not None:
        dbias_ref[...] = db


def _dq_kernel(qoff_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lut_ref, qseg_ref,
               kseg_ref, cnt_ref, idx_ref, dq_ref, *, st: _Static):
    bq, bk = st.blocks.block_q_dq, st.blocks.block_k_dq
    q_first = qoff_ref[0] + pl.program_id(0) * bq
    q_pos = q_first + jnp.arange(bq, dtype=jnp.int32)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def step(t, dq, *, masked):
        k_first = pl.multiple_of(idx_ref[t] * bk, bk)
        k_pos = k_first + jnp.arange(bk, dtype=jnp.int32)
        ks = pl.ds(k_first, bk)
        k = k_ref[ks, :]
        s, _, _ = _scores(q, k, q_pos, k_pos, q_first, k_first, lut_ref, st, bq, bk)
        p = jnp.exp2(s - lse[:, None])
        if masked:
            vis = _visible(q_pos, k_pos, q_seg, None if kseg_ref is None else kseg_ref[ks], st)
            if vis is not None:
                p = jnp.where(vis, p, 0.0)
        ds = p * (_dot(do, v_ref[ks, :], st, trans_b=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, st)

    n_full, n_live = cnt_ref[0], cnt_ref[1]
    dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False),
                       jnp.zeros(q.shape, jnp.float32))
    dq = lax.fori_loop(n_full, n_live, functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * st.sm_scale).astype(dq_ref.dtype)


# ---------------------------------------------------------------------------- pallas_calls

def _batch_index(table):
    return (lambda b: b) if table.shape[0] > 1 else (lambda b: 0)


def _table_specs(bm):
    """BlockSpecs of a BlockMask for a grid (row block, batch, head)."""
    bi = _batch_index(bm.counts)
    return [pl.BlockSpec((None, None, 2), lambda r, b, h: (bi(b), r, 0)),
            pl.BlockSpec((None, None, bm.indices.shape[-1]), lambda r, b, h: (bi(b), r, 0))]


def _masks(st: _Static, q_off, q_seg, kv_seg, q_len, kv_len, bq, bk, transpose=False):
    mask = st.mask.replace(q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    return make_block_mask(mask, q_len=q_len, kv_len=kv_len, block_q=bq, block_k=bk,
                           q_offset=q_off, transpose=transpose)


def _buckets(st: _Static) -> np.ndarray:
    return bucket_lut(bidirectional=st.bidirectional, num_buckets=st.num_buckets,
                      max_distance=st.max_distance)[1]


def _value_lut(st: _Static, table):
    """``[N, L]`` float32 bias values (base-2 scaled) for LUT index ``clip(rel,-R,R)+R``."""
    return (table.astype(jnp.float32)[jnp.asarray(_buckets(st))] * LOG2E).T


def _common_specs(q_seg, kv_seg, lut, *, q_block, k_block, q_map, kv_map):
    """(q_offset, lut, q_seg, kv_seg) specs; a q/k "block" is the tile or the full length."""
    return (pl.BlockSpec((1,), lambda r, b, h: (0,)),
            None if lut is None else pl.BlockSpec((None, lut.shape[1]), lambda r, b, h: (h, 0)),
            None if q_seg is None else pl.BlockSpec((None, q_block), q_map),
            None if kv_seg is None else pl.BlockSpec((None, k_block), kv_map))


def _fwd(st: _Static, q, k, v, table, q_off, q_seg, kv_seg):
    B, T, N, H = q.shape
    S = k.shape[1]
    bs = st.blocks
    bq, bk = bs.block_q, bs.block_k
    lut = None if table is None else _value_lut(st, table)
    bm = _masks(st, q_off, q_seg, kv_seg, T, S, bq, bk)
    qoff_s, lut_s, qseg_s, kseg_s = _common_specs(
        q_seg, kv_seg, lut, q_block=bq, k_block=S,
        q_map=lambda i, b, h: (b, i), kv_map=lambda i, b, h: (b, 0))
    kernel = functools.partial(_fwd_kernel, st=st)
    o, lse = pl.pallas_call(
        kernel, grid=(T // bq, B, N),
        in_specs=[qoff_s,
                  pl.BlockSpec((None, bq, None, H), lambda i, b, h: (b, i, h, 0)),
                  pl.BlockSpec((None, S, None, H), lambda i, b, h: (b, 0, h, 0)),
                  pl.BlockSpec((None, S, None, H), lambda i, b, h: (b, 0, h, 0)),
                  lut_s, qseg_s, kseg_s, *_table_specs(bm)],
        out_specs=[pl.BlockSpec((None, bq, None, H), lambda i, b, h: (b, i, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, N, T), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=st.interpret, debug=st.debug, name="t5_flash_fwd",
    )(q_off.reshape(1), q, k, v, lut, q_seg, kv_seg, bm.counts, bm.indices)
    return o, lse


def _bwd(st: _Static, q, k, v, table, q_off, q_seg, kv_seg, o, lse, do, dlse):
    B, T, N, H = q.shape
    S = k.shape[1]
    bs = st.blocks
    lut = None if table is None else _value_lut(st, table)
    blut = None if table is None else jnp.asarray(_buckets(st))
    # delta = rowsum(dO * O) (FlashAttention-2 bwd); elementwise, not a dot: no tf32 on GPU.
    # The lse cotangent g adds g * p to dS = p * (dP - delta): the kernels get delta - g.
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    delta = delta - dlse
    cp = plgpu.CompilerParams(num_warps=bs.num_warps_bwd, num_stages=bs.num_stages_bwd)
    row_full = pl.BlockSpec((None, None, T), lambda r, b, h: (b, h, 0))
    q_full = pl.BlockSpec((None, T, None, H), lambda r, b, h: (b, 0, h, 0))
    kv_full = pl.BlockSpec((None, S, None, H), lambda r, b, h: (b, 0, h, 0))

    # dk, dv (+ per-bucket bias-gradient partials): one program per key block.
    bq, bk = bs.block_q_dkv, bs.block_k_dkv
    nk = S // bk
    bm = _masks(st, q_off, q_seg, kv_seg, T, S, bq, bk, transpose=True)
    kb = next_power_of_2(st.num_buckets)
    qoff_s, lut_s, qseg_s, kseg_s = _common_specs(
        q_seg, kv_seg, lut, q_block=T, k_block=bk,
        q_map=lambda j, b, h: (b, 0), kv_map=lambda j, b, h: (b, j))
    k_blk = pl.BlockSpec((None, bk, None, H), lambda j, b, h: (b, j, h, 0))
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    out_specs = [k_blk, k_blk]
    if table is not None:
        out_shape.append(jax.ShapeDtypeStruct((B, N, nk, kb), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, None, kb), lambda j, b, h: (b, h, j, 0)))
    dk, dv, *dbias = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st), grid=(nk, B, N),
        in_specs=[qoff_s, q_full, k_blk, k_blk, q_full, row_full, row_full, lut_s,
                  None if blut is None else pl.BlockSpec(blut.shape, lambda j, b, h: (0,)),
                  qseg_s, kseg_s, *_table_specs(bm)],
        out_specs=out_specs, out_shape=out_shape, compiler_params=cp,
        interpret=st.interpret, debug=st.debug, name="t5_flash_bwd_dkv",
    )(q_off.reshape(1), q, k, v, do, lse, delta, lut, blut, q_seg, kv_seg, bm.counts, bm.indices)

    # dq: one program per query block.
    bq, bk = bs.block_q_dq, bs.block_k_dq
    bm = _masks(st, q_off, q_seg, kv_seg, T, S, bq, bk)
    qoff_s, lut_s, qseg_s, kseg_s = _common_specs(
        q_seg, kv_seg, lut, q_block=bq, k_block=S,
        q_map=lambda i, b, h: (b, i), kv_map=lambda i, b, h: (b, 0))
    q_blk = pl.BlockSpec((None, bq, None, H), lambda i, b, h: (b, i, h, 0))
    row_blk = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st), grid=(T // bq, B, N),
        in_specs=[qoff_s, q_blk, kv_full, kv_full, q_blk, row_blk, row_blk, lut_s, qseg_s,
                  kseg_s, *_table_specs(bm)],
        out_specs=q_blk, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), compiler_params=cp,
        interpret=st.interpret, debug=st.debug, name="t5_flash_bwd_dq",
    )(q_off.reshape(1), q, k, v, do, lse, delta, lut, q_seg, kv_seg, bm.counts, bm.indices)

    dtable = None
    if table is not None:  # deterministic reduction of the per-(batch, key block) partials
        dtable = jnp.sum(dbias[0], axis=(0, 2))[:, :st.num_buckets].T.astype(table.dtype)
    return dq, dk, dv, dtable


def _public_lse(lse2):
    """The kernels' base-2 lse -> natural log-sum-exp, MASK_VALUE for rows with no visible key."""
    return jnp.where(lse2 == _EMPTY_LSE, MASK_VALUE, lse2 * (1.0 / LOG2E))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, table, q_off, q_seg, kv_seg):
    o, lse2 = _fwd(st, q, k, v, table, q_off, q_seg, kv_seg)
    return o, _public_lse(lse2)


def _flash_fwd(st, q, k, v, table, q_off, q_seg, kv_seg):
    o, lse2 = _fwd(st, q, k, v, table, q_off, q_seg, kv_seg)
    return (o, _public_lse(lse2)), (q, k, v, table, q_off, q_seg, kv_seg, o, lse2)


def _flash_bwd(st, res, cotangents):
    do, dlse = cotangents
    q, k, v, table, q_off, q_seg, kv_seg, o, lse2 = res
    dq, dk, dv, dtable = _bwd(st, q, k, v, table, q_off, q_seg, kv_seg, o, lse2, do, dlse)
    return dq, dk, dv, dtable, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------- public function

def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def flash_attention(q, k, v, mask: Mask | None = None, bias: RelativeBias | None = None, *,
                    q_offset=0, sm_scale: float = 1.0, block_sizes: BlockSizes | None = None,
                    interpret: bool | None = None, precision=None, debug: bool = False,
                    return_lse: bool = False):
    """T5 attention ``[B, T, N, H]`` (dtype of q) with the bias computed in-kernel.

    Same semantics and arguments as ``reference.attention_reference``: ``mask`` (None: all
    visible) and ``bias`` (None: no bias) are the ``spec`` objects; ``q_offset`` (int or traced
    int32 scalar) is the position of query 0. Differentiable in q, k, v and the bias table. Any
    lengths and head dims (padded internally). ``interpret=None``: Pallas interpret mode
    unless the default backend is a GPU. ``block_sizes=None``: ``blocks.get_block_sizes``.
    ``precision``: of float32 dots, see ``resolve_precision`` (tf32 on a GPU by default).
    ``return_lse``: ``(out, lse)`` with ``lse [B, N, T]`` float32 the natural log-sum-exp of
    the visible scores (MASK_VALUE where none is visible), differentiable as well.
    """
    mask = Mask() if mask is None else mask
    B, T, N, H = q.shape
    S = k.shape[1]
    check_args(q, k, v, mask, bias)
    if T == 0 or S == 0:  # nothing to attend to: zeros, like the reference's empty rows
        out = jnp.zeros_like(q)
        return (out, jnp.full((B, N, T), MASK_VALUE, jnp.float32)) if return_lse else out
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if block_sizes is None:
        block_sizes = get_block_sizes("interpret" if interpret else target_device().device_kind,
                                      T, S, H, q.dtype, mask.causal)
    bs = block_sizes.validate().fitted(T, S)
    radius = 0 if bias is None else bias.lut()[0]

    # Pad to block multiples (and H to a power of two >= 16; zero columns change nothing).
    Tp = _round_up(T, max(bs.block_q, bs.block_q_dkv, bs.block_q_dq))
    Sp = _round_up(S, max(bs.block_k, bs.block_k_dkv, bs.block_k_dq))
    Hp = max(16, next_power_of_2(H))
    qp = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, Hp - H)))
    kp = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, Hp - H)))
    vp = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, Hp - H)))
    q_seg = kv_seg = None
    patterns = mask.patterns
    if mask.kv_segment_ids is not None:  # padded keys get segment 0 (padding)
        kv_seg = jnp.pad(jnp.asarray(mask.kv_segment_ids, jnp.int32), ((0, 0), (0, Sp - S)))
    elif Sp > S:  # else the padded keys are masked by position
        patterns = patterns.replace(
            kv_len=S if patterns.kv_len is None else min(S, patterns.kv_len))
    if mask.q_segment_ids is not None:   # padded queries get segment 0 (see nothing)
        q_seg = jnp.pad(jnp.asarray(mask.q_segment_ids, jnp.int32), ((0, 0), (0, Tp - T)))
    st = _Static(blocks=bs, sm_scale=float(sm_scale), mask=patterns,
                 bidirectional=True if bias is None else bool(bias.bidirectional),
                 num_buckets=0 if bias is None else bias.num_buckets,
                 max_distance=128 if bias is None else int(bias.max_distance), radius=radius,
                 interpret=bool(interpret), debug=bool(debug),
                 precision=resolve_precision(precision, interpret=bool(interpret)))
    o, lse = _flash(st, qp, kp, vp, None if bias is None else bias.table,
                    jnp.asarray(q_offset, jnp.int32), q_seg, kv_seg)
    out = o[:, :T, :, :H]
    return (out, lse[:, :, :T]) if return_lse else out
