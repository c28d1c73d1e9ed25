"""The backward kernels on Mosaic GPU: dq, dk/dv and the bias-table gradient's near band.

All recompute ``P = exp2(S - lse)`` from the forward's base-2 lse and form
``dS = P * (dP - delta)`` (``delta = rowsum(dO * O) - dlse``: the lse cotangent rides along),
the gradient of the loss in ``sm_scale q.k + bias``. Like the forward they stream the live
blocks of a block-table row through the TMA ring to two compute warpgroups.

- ``dq``: a CTA per 128-row query tile streams K, V (the forward's table). With a bias it also
  sums each row's dS over the blocks beyond ``near`` (left and right): the saturated buckets'
  gradient, one float per row and side.
- ``dkv``: a CTA per 128-key tile streams Q, dO, lse, delta (the transposed table) and works
  on ``S^T`` so both accumulators stay in registers.
- ``band``: a CTA per (head, offset e, batch row) sums dS over the block pairs ``(qb, qb + a +
  e)`` into one 64 x 64 tile; ``mosaic_tables.table_gradient`` maps it to buckets.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jt5.pallas_kernels import mosaic_common as mc
from jt5.pallas_kernels.mosaic_common import BLOCK, COMPUTE_WGS, LOG2E
from jt5.pallas_kernels.mosaic_fwd import add_bias
from jt5.pallas_kernels.spec import visible


def _visible(st: mc.Static, shape, *, q_pos, k_pos, q_ids, k_ids, transposed: bool):
    """``spec.visible`` of a tile (rows = queries, or keys when ``transposed``) from position
    tiles and per-row / per-column segment id vectors (None when absent)."""
    rows, cols = (mc.broadcast_rows, mc.broadcast_cols)
    q_seg = None if q_ids is None else (cols if transposed else rows)(q_ids, shape)
    k_seg = None if k_ids is None else (rows if transposed else cols)(k_ids, shape)
    return visible(q_pos, k_pos, q_seg, k_seg, st.mask)


def _probabilities(s, lse, vis, shape, *, lse_axis: int):
    """``P = exp2(S - lse)`` (0 where not visible); ``lse`` broadcast along rows (axis 1: one
    per row) or columns."""
    b = mc.broadcast_rows if lse_axis == 1 else mc.broadcast_cols
    p = jnp.exp2(s - b(lse, shape))
    return p if vis is None else jnp.where(vis, p, 0.0)


# ---------------------------------------------------------------------------- dq

def _dq_kernel(r, *, st: mc.Static, stages: int, dtype):
    b, h, qt = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_seq")
    bm = b if st.batched_tables else 0
    n_full, n_live = r["counts"][bm, qt, 0], r["counts"][bm, qt, 1]
    q_off, a = r["meta"][0], r["meta"][1]
    bias = st.near is not None
    key_block = lambda t: r["indices"][bm, qt, t]
    offset = lambda kb, w: kb - (qt * COMPUTE_WGS + w) - a

    def k_copies(t, slot):
        kb = key_block(t)
        rows = pl.ds(kb * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(r["k"].at[b, rows, h], r["k_smem"].at[slot],
                                r["k_ready"].at[slot])
        if st.kv_seg:
            plgpu.copy_gmem_to_smem(r["kseg"].at[b, rows], r["kseg_smem"].at[slot],
                                    r["k_ready"].at[slot])
        if bias:
            for w in range(COMPUTE_WGS):
                e = offset(kb, w)

                @pl.when(jnp.abs(e) <= st.near)
                def _tile():
                    i = slot * COMPUTE_WGS + w
                    plgpu.copy_gmem_to_smem(r["tiles"].at[h, e + st.near],
                                            r["bias_smem"].at[i], r["bias_ready"].at[i])

    def v_copies(t, slot):
        plgpu.copy_gmem_to_smem(r["v"].at[b, pl.ds(key_block(t) * BLOCK, BLOCK), h],
                                r["v_smem"].at[slot], r["v_ready"].at[slot])

    mc.memory_warpgroup(lambda: mc.produce(
        [mc.Stream(k_copies, r["k_consumed"]), mc.Stream(v_copies, r["v_consumed"])],
        n_live, stages))

    @mc.compute_warpgroups
    def _compute(w):
        qb = qt * COMPUTE_WGS + w
        q_rows = pl.ds(qb * BLOCK, BLOCK)
        q_smem, do_smem = r["q_smem"].at[w], r["do_smem"].at[w]
        rows_smem = r["rows_smem"].at[w]            # [4, 64]: lse, delta, far left, far right
        ready = r["q_ready"].at[w]
        plgpu.copy_gmem_to_smem(r["q"].at[b, q_rows, h], q_smem, ready)
        plgpu.copy_gmem_to_smem(r["do"].at[b, q_rows, h], do_smem, ready)
        plgpu.copy_gmem_to_smem(r["lse"].at[b, h, q_rows], rows_smem.at[0], ready)
        plgpu.copy_gmem_to_smem(r["delta"].at[b, h, q_rows], rows_smem.at[1], ready)
        if st.q_seg:
            plgpu.copy_gmem_to_smem(r["qseg"].at[b, q_rows], r["qseg_smem"].at[w], ready)
        plgpu.barrier_wait(ready)
        shape = (BLOCK, BLOCK)
        lse = mc.load_vector(rows_smem.at[0], 1, st.opts)
        delta = mc.load_vector(rows_smem.at[1], 1, st.opts)
        q_ids = mc.load_vector(r["qseg_smem"].at[w], 1, st.opts) if st.q_seg else None
        q_pos = mc.iota(shape, 0, st.opts) + (q_off + qb * BLOCK)
        far = (r["far"][h, 0], r["far"][h, 1]) if bias else None

        def step(t, carry, *, masked):
            dq, far_l, far_r = carry
            slot = lax.rem(t, stages)
            kb = key_block(t)
            e = offset(kb, w)
            plgpu.barrier_wait(r["k_ready"].at[slot])
            s = mc.mma_nt(q_smem, r["k_smem"].at[slot], st.opts) * (st.sm_scale * LOG2E)
            if bias:
                i = slot * COMPUTE_WGS + w
                s = add_bias(s, st, e, tile=r["bias_smem"].at[i], ready=r["bias_ready"].at[i],
                             far=far)
            vis = None
            if masked:
                k_ids = (mc.load_vector(r["kseg_smem"].at[slot], 0, st.opts) if st.kv_seg
                         else None)
                vis = _visible(st, shape, q_pos=q_pos, k_pos=mc.iota(shape, 1, st.opts)
                               + kb * BLOCK, q_ids=q_ids, k_ids=k_ids, transposed=False)
            p = _probabilities(s, lse, vis, shape, lse_axis=1)
            plgpu.barrier_wait(r["v_ready"].at[slot])
            dp = mc.mma_nt(do_smem, r["v_smem"].at[slot], st.opts)
            plgpu.barrier_arrive(r["v_consumed"].at[slot])
            ds = p * (dp - mc.broadcast_rows(delta, shape))
            if bias:   # saturated buckets: this row's dS summed over the far blocks per side
                row = ds.sum(axis=1)
                far_l = far_l + jnp.where(e < -st.near, row, 0.0)
                far_r = far_r + jnp.where(e > st.near, row, 0.0)
            dq = mc.mma_acc(dq, ds.astype(dtype), r["k_smem"].at[slot], st.opts)
            plgpu.barrier_arrive(r["k_consumed"].at[slot])
            return dq, far_l, far_r

        carry = (mc.zeros((BLOCK, q_smem.shape[-1]), st.opts), mc.full_rows(0.0, st.opts),
                 mc.full_rows(0.0, st.opts))
        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
        dq, far_l, far_r = lax.fori_loop(n_full, n_live, functools.partial(step, masked=True),
                                         carry)
        q_smem[...] = (dq * st.sm_scale).astype(dtype)
        if bias:
            rows_smem[2] = far_l
            rows_smem[3] = far_r
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, r["out_0"].at[b, q_rows, h])
        if bias:
            plgpu.copy_smem_to_gmem(rows_smem.at[2], r["out_1"].at[b, h, 0, q_rows])
            plgpu.copy_smem_to_gmem(rows_smem.at[3], r["out_1"].at[b, h, 1, q_rows])
        plgpu.wait_smem_to_gmem(0)


def _dq(st: mc.Static, q, k, v, do, lse2, delta, meta, tables, q_seg, kv_seg, tiles):
    B, Tp, N, D = q.shape
    stages = st.opts.stages
    bias = tiles is not None
    ins = dict(q=q, k=k, v=v, do=do, lse=lse2, delta=delta, meta=meta,
               counts=tables.rows.counts, indices=tables.rows.indices, qseg=q_seg,
               kseg=kv_seg, tiles=tiles.tiles if bias else None,
               far=tiles.far if bias else None)
    scratch = dict(
        q_smem=mc.smem_tiles(COMPUTE_WGS, BLOCK, D, q.dtype),
        do_smem=mc.smem_tiles(COMPUTE_WGS, BLOCK, D, q.dtype),
        rows_smem=plgpu.SMEM((COMPUTE_WGS, 4, BLOCK), jnp.float32),
        k_smem=mc.smem_tiles(stages, BLOCK, D, q.dtype),
        v_smem=mc.smem_tiles(stages, BLOCK, D, q.dtype),
        q_ready=mc.barriers(COMPUTE_WGS, 4 + st.q_seg),
        k_ready=mc.barriers(stages, 1 + st.kv_seg),
        v_ready=mc.barriers(stages),
        k_consumed=mc.barriers(stages, COMPUTE_WGS),
        v_consumed=mc.barriers(stages, COMPUTE_WGS))
    _segment_scratch(scratch, st, stages)
    if bias:
        scratch["bias_smem"] = mc.smem_f32_tiles(stages * COMPUTE_WGS)
        scratch["bias_ready"] = mc.barriers(stages * COMPUTE_WGS)
    out_type = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if bias:
        out_type.append(jax.ShapeDtypeStruct((B, N, 2, Tp), jnp.float32))
    outs = mc.launch(functools.partial(_dq_kernel, st=st, stages=stages, dtype=q.dtype), ins,
                     out_type, scratch, grid=(N, Tp // mc.TILE, B),
                     grid_names=("heads", "q_seq", "batch"), opts=st.opts,
                     name="t5_mosaic_bwd_dq")
    return outs[0], (outs[1] if bias else None)


def _segment_scratch(scratch, st: mc.Static, stages: int):
    """Shared memory for the segment ids: the resident side's per warpgroup, the streamed
    side's per ring slot (callers name them qseg_smem / kseg_smem)."""
    if st.q_seg:
        scratch["qseg_smem"] = plgpu.SMEM((max(COMPUTE_WGS, stages), BLOCK), jnp.int32)
    if st.kv_seg:
        scratch["kseg_smem"] = plgpu.SMEM((max(COMPUTE_WGS, stages), BLOCK), jnp.int32)


# ---------------------------------------------------------------------------- dk, dv

def _dkv_kernel(r, *, st: mc.Static, stages: int, dtype):
    b, h, kt = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("kv_seq")
    bm = b if st.batched_tables else 0
    n_full, n_live = r["counts"][bm, kt, 0], r["counts"][bm, kt, 1]
    q_off, a = r["meta"][0], r["meta"][1]
    bias = st.near is not None
    query_block = lambda t: r["indices"][bm, kt, t]
    offset = lambda qb, w: (kt * COMPUTE_WGS + w) - qb - a

    def q_copies(t, slot):
        qb = query_block(t)
        rows = pl.ds(qb * BLOCK, BLOCK)
        ready = r["q_ready"].at[slot]
        plgpu.copy_gmem_to_smem(r["q"].at[b, rows, h], r["q_smem"].at[slot], ready)
        plgpu.copy_gmem_to_smem(r["lse"].at[b, h, rows], r["rows_smem"].at[slot, 0], ready)
        if st.q_seg:
            plgpu.copy_gmem_to_smem(r["qseg"].at[b, rows], r["qseg_smem"].at[slot], ready)
        if bias:
            for w in range(COMPUTE_WGS):
                e = offset(qb, w)

                @pl.when(jnp.abs(e) <= st.near)
                def _tile():
                    i = slot * COMPUTE_WGS + w
                    plgpu.copy_gmem_to_smem(r["tiles_t"].at[h, e + st.near],
                                            r["bias_smem"].at[i], r["bias_ready"].at[i])

    def do_copies(t, slot):
        rows = pl.ds(query_block(t) * BLOCK, BLOCK)
        ready = r["do_ready"].at[slot]
        plgpu.copy_gmem_to_smem(r["do"].at[b, rows, h], r["do_smem"].at[slot], ready)
        plgpu.copy_gmem_to_smem(r["delta"].at[b, h, rows], r["rows_smem"].at[slot, 1], ready)

    mc.memory_warpgroup(lambda: mc.produce(
        [mc.Stream(q_copies, r["q_consumed"]), mc.Stream(do_copies, r["do_consumed"])],
        n_live, stages))

    @mc.compute_warpgroups
    def _compute(w):
        kb = kt * COMPUTE_WGS + w
        k_rows = pl.ds(kb * BLOCK, BLOCK)
        k_smem, v_smem = r["k_smem"].at[w], r["v_smem"].at[w]
        ready = r["k_ready"].at[w]
        plgpu.copy_gmem_to_smem(r["k"].at[b, k_rows, h], k_smem, ready)
        plgpu.copy_gmem_to_smem(r["v"].at[b, k_rows, h], v_smem, ready)
        if st.kv_seg:
            plgpu.copy_gmem_to_smem(r["kseg"].at[b, k_rows], r["kseg_smem"].at[w], ready)
        plgpu.barrier_wait(ready)
        shape = (BLOCK, BLOCK)                      # rows = keys, columns = queries
        k_ids = mc.load_vector(r["kseg_smem"].at[w], 1, st.opts) if st.kv_seg else None
        k_pos = mc.iota(shape, 0, st.opts) + kb * BLOCK
        far = (r["far"][h, 0], r["far"][h, 1]) if bias else None

        def step(t, carry, *, masked):
            dk, dv = carry
            slot = lax.rem(t, stages)
            qb = query_block(t)
            rows_smem = r["rows_smem"].at[slot]
            plgpu.barrier_wait(r["q_ready"].at[slot])
            s = mc.mma_nt(k_smem, r["q_smem"].at[slot], st.opts) * (st.sm_scale * LOG2E)
            if bias:
                i = slot * COMPUTE_WGS + w
                s = add_bias(s, st, offset(qb, w), tile=r["bias_smem"].at[i],
                             ready=r["bias_ready"].at[i], far=far)
            vis = None
            if masked:
                q_ids = (mc.load_vector(r["qseg_smem"].at[slot], 0, st.opts) if st.q_seg
                         else None)
                q_pos = mc.iota(shape, 1, st.opts) + (q_off + qb * BLOCK)
                vis = _visible(st, shape, q_pos=q_pos, k_pos=k_pos, q_ids=q_ids, k_ids=k_ids,
                               transposed=True)
            p = _probabilities(s, mc.load_vector(rows_smem.at[0], 0, st.opts), vis, shape,
                               lse_axis=0)
            plgpu.barrier_wait(r["do_ready"].at[slot])
            dv = mc.mma_acc(dv, p.astype(dtype), r["do_smem"].at[slot], st.opts)
            dp = mc.mma_nt(v_smem, r["do_smem"].at[slot], st.opts)
            delta = mc.load_vector(rows_smem.at[1], 0, st.opts)
            plgpu.barrier_arrive(r["do_consumed"].at[slot])
            ds = p * (dp - mc.broadcast_cols(delta, shape))
            dk = mc.mma_acc(dk, ds.astype(dtype), r["q_smem"].at[slot], st.opts)
            plgpu.barrier_arrive(r["q_consumed"].at[slot])
            return dk, dv

        z = mc.zeros((BLOCK, k_smem.shape[-1]), st.opts)
        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), (z, z))
        dk, dv = lax.fori_loop(n_full, n_live, functools.partial(step, masked=True), carry)
        k_smem[...] = (dk * st.sm_scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, r["out_0"].at[b, k_rows, h])
        plgpu.copy_smem_to_gmem(v_smem, r["out_1"].at[b, k_rows, h])
        plgpu.wait_smem_to_gmem(0)


def _dkv(st: mc.Static, q, k, v, do, lse2, delta, meta, tables, q_seg, kv_seg, tiles):
    B, Sp, N, D = k.shape
    stages = st.opts.stages
    bias = tiles is not None
    ins = dict(q=q, k=k, v=v, do=do, lse=lse2, delta=delta, meta=meta,
               counts=tables.cols.counts, indices=tables.cols.indices, qseg=q_seg,
               kseg=kv_seg, tiles_t=tiles.tiles_t if bias else None,
               far=tiles.far if bias else None)
    scratch = dict(
        k_smem=mc.smem_tiles(COMPUTE_WGS, BLOCK, D, k.dtype),
        v_smem=mc.smem_tiles(COMPUTE_WGS, BLOCK, D, k.dtype),
        q_smem=mc.smem_tiles(stages, BLOCK, D, k.dtype),
        do_smem=mc.smem_tiles(stages, BLOCK, D, k.dtype),
        rows_smem=plgpu.SMEM((stages, 2, BLOCK), jnp.float32),     # lse, delta
        k_ready=mc.barriers(COMPUTE_WGS, 2 + st.kv_seg),
        q_ready=mc.barriers(stages, 2 + st.q_seg),
        do_ready=mc.barriers(stages, 2),
        q_consumed=mc.barriers(stages, COMPUTE_WGS),
        do_consumed=mc.barriers(stages, COMPUTE_WGS))
    _segment_scratch(scratch, st, stages)
    if bias:
        scratch["bias_smem"] = mc.smem_f32_tiles(stages * COMPUTE_WGS)
        scratch["bias_ready"] = mc.barriers(stages * COMPUTE_WGS)
    out_type = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
    dk, dv = mc.launch(functools.partial(_dkv_kernel, st=st, stages=stages, dtype=k.dtype), ins,
                       out_type, scratch, grid=(N, Sp // mc.TILE, B),
                       grid_names=("heads", "kv_seq", "batch"), opts=st.opts,
                       name="t5_mosaic_bwd_dkv")
    return dk, dv


def backward(st: mc.Static, q, k, v, do, lse2, delta, meta, tables, q_seg, kv_seg, tiles):
    """``(dq, dk, dv, band, far_rows)``: the bias terms (None without a bias) are the band
    kernel's ``[N, hi - lo + 1, 64, 64]`` and the dq kernel's ``[B, N, 2, Tp]`` far row sums."""
    args = (st, q, k, v, do, lse2, delta, meta, tables, q_seg, kv_seg, tiles)
    dq, far_rows = _dq(*args)
    dk, dv = _dkv(*args)
    band_sums = None
    if tiles is not None and st.band is not None:
        from jt5.pallas_kernels.mosaic_band import band
        band_sums = band(*args)
    return dq, dk, dv, band_sums, far_rows
