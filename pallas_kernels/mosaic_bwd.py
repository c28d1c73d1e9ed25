"""The backward kernels on Mosaic GPU: dq, dk/dv and the bias-table gradient's near band.

All recompute ``P = exp2(S - lse)`` from the forward's base-2 lse and form
``dS = P * (dP - delta)`` (``delta = rowsum(dO * O) - dlse``: the lse cotangent rides along),
the gradient of the loss in ``sm_scale q.k + bias``. Like the forward they stream the live
blocks of a block-table row through the TMA ring to two compute warpgroups.

- ``dq``: a CTA per 128-row query tile streams K, V (the forward's table). With a bias it also
  sums each row's dS over the blocks beyond ``near`` (left and right): the saturated buckets'
  gradient, one float per row and side.
- ``dkv``: a CTA per 128-key tile streams Q, dO, lse, delta (the transposed table) and works
  on ``S^T`` so both accumulators stay in registers. At head dim 128 two 64 x 128 float32
  accumulators per warpgroup spill (the compile gate), so dk and dv run as two kernels then,
  recomputing ``S`` once more.
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
from jt5.pallas_kernels.mosaic_fwd import add_bias, bias_scratch, copy_near_tiles, kv_streams


def _probabilities(s, lse, st: mc.Static, shape, *, lse_axis: int, masked: bool, **tile):
    """``P = exp2(S - lse)``, 0 where not visible (partial blocks: ``mask_tile`` with ``tile``'s
    positions and ids); ``lse`` broadcast along rows (axis 1: one per row) or columns."""
    b = mc.broadcast_rows if lse_axis == 1 else mc.broadcast_cols
    p = jnp.exp2(s - b(lse, shape))
    return mc.mask_tile(p, 0.0, st, shape, **tile)[0] if masked else p


# ---------------------------------------------------------------------------- dq

def _dq_kernel(r, *, st: mc.Static, stages: int, dtype):
    c = mc.cta(r, st, "q_seq")
    b, h, qt, n_full, n_live, q_off = c.b, c.h, c.row, c.n_full, c.n_live, c.q_off
    bias = st.near is not None
    key_block = functools.partial(c.block, r)
    offset = lambda kb, w: kb - (qt * COMPUTE_WGS + w) - c.a   # noqa: E731

    mc.memory_warpgroup(lambda: mc.produce(
        kv_streams(r, st, b=b, h=h, key_block=key_block, offset=offset), n_live, stages))

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
        positions = (mc.iota(shape, 0, st.opts), mc.iota(shape, 1, st.opts))
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
            k_ids = (mc.load_vector(r["kseg_smem"].at[slot], 0, st.opts)
                     if masked and st.kv_seg else None)
            p = _probabilities(s, lse, st, shape, lse_axis=1, masked=masked,
                               q_first=q_off + qb * BLOCK, k_first=kb * BLOCK, q_ids=q_ids,
                               k_ids=k_ids, positions=positions)
            plgpu.barrier_wait(r["v_ready"].at[slot])
            dp = mc.mma_nt(do_smem, r["v_smem"].at[slot], st.opts)
            plgpu.barrier_arrive(r["v_consumed"].at[slot])
            ds = p * (dp - mc.broadcast_rows(delta, shape))
            if bias:   # saturated buckets: this row's dS summed over the far blocks per side
                row = ds.sum(axis=1)   # (a 0/1 factor: Warpgroup lowering has no select of
                far_l = far_l + row * (e < -st.near).astype(jnp.float32)  # arrays by a scalar)
                far_r = far_r + row * (e > st.near).astype(jnp.float32)
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
    ins = mc.backward_inputs(q, k, v, do, lse2, delta, meta, tables.rows, q_seg, kv_seg,
                             tiles=tiles.tiles if bias else None,
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
    bias_scratch(scratch, st, stages)
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

_PARTS = {"dkv": ("dk", "dv"), "dk": ("dk",), "dv": ("dv",)}


def _dkv_kernel(r, *, st: mc.Static, stages: int, dtype, part: str):
    c = mc.cta(r, st, "kv_seq")
    b, h, kt, n_full, n_live, q_off = c.b, c.h, c.row, c.n_full, c.n_live, c.q_off
    bias = st.near is not None
    outs = _PARTS[part]
    query_block = functools.partial(c.block, r)
    offset = lambda qb, w: (kt * COMPUTE_WGS + w) - qb - c.a   # noqa: E731

    def q_copies(t, slot):
        qb = query_block(t)
        rows = pl.ds(qb * BLOCK, BLOCK)
        ready = r["q_ready"].at[slot]
        plgpu.copy_gmem_to_smem(r["q"].at[b, rows, h], r["q_smem"].at[slot], ready)
        plgpu.copy_gmem_to_smem(r["lse"].at[b, h, rows], r["rows_smem"].at[slot, 0], ready)
        if st.q_seg:
            plgpu.copy_gmem_to_smem(r["qseg"].at[b, rows], r["qseg_smem"].at[slot], ready)
        if bias:
            copy_near_tiles(r, st, r["tiles_t"], h, slot,
                            [offset(qb, w) for w in range(COMPUTE_WGS)])

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
        positions = (mc.iota(shape, 1, st.opts), mc.iota(shape, 0, st.opts))
        far = (r["far"][h, 0], r["far"][h, 1]) if bias else None

        def step(t, acc, *, masked):
            acc = dict(acc)
            slot = lax.rem(t, stages)
            qb = query_block(t)
            rows_smem = r["rows_smem"].at[slot]
            plgpu.barrier_wait(r["q_ready"].at[slot])
            s = mc.mma_nt(k_smem, r["q_smem"].at[slot], st.opts) * (st.sm_scale * LOG2E)
            if bias:
                i = slot * COMPUTE_WGS + w
                s = add_bias(s, st, offset(qb, w), tile=r["bias_smem"].at[i],
                             ready=r["bias_ready"].at[i], far=far)
            q_ids = (mc.load_vector(r["qseg_smem"].at[slot], 0, st.opts)
                     if masked and st.q_seg else None)
            p = _probabilities(s, mc.load_vector(rows_smem.at[0], 0, st.opts), st, shape,
                               lse_axis=0, masked=masked, q_first=q_off + qb * BLOCK,
                               k_first=kb * BLOCK, q_ids=q_ids, k_ids=k_ids, transposed=True,
                               positions=positions)
            plgpu.barrier_wait(r["do_ready"].at[slot])
            if "dv" in acc:
                acc["dv"] = mc.mma_acc(acc["dv"], p.astype(dtype), r["do_smem"].at[slot],
                                       st.opts)
            if "dk" in acc:
                dp = mc.mma_nt(v_smem, r["do_smem"].at[slot], st.opts)
                p = p * (dp - mc.broadcast_cols(mc.load_vector(rows_smem.at[1], 0, st.opts),
                                                shape))                       # dS^T
            plgpu.barrier_arrive(r["do_consumed"].at[slot])
            if "dk" in acc:
                acc["dk"] = mc.mma_acc(acc["dk"], p.astype(dtype), r["q_smem"].at[slot], st.opts)
            plgpu.barrier_arrive(r["q_consumed"].at[slot])
            return acc

        acc = {name: mc.zeros((BLOCK, k_smem.shape[-1]), st.opts) for name in outs}
        acc = lax.fori_loop(0, n_full, functools.partial(step, masked=False), acc)
        acc = lax.fori_loop(n_full, n_live, functools.partial(step, masked=True), acc)
        for name in outs:                    # k_smem / v_smem hold the results
            buf = k_smem if name == "dk" else v_smem
            buf[...] = (acc[name] * (st.sm_scale if name == "dk" else 1.0)).astype(dtype)
        plgpu.commit_smem()
        for i, name in enumerate(outs):
            plgpu.copy_smem_to_gmem(k_smem if name == "dk" else v_smem,
                                    r[f"out_{i}"].at[b, k_rows, h])
        plgpu.wait_smem_to_gmem(0)


def _dkv(st: mc.Static, q, k, v, do, lse2, delta, meta, tables, q_seg, kv_seg, tiles, *,
         part: str):
    """``part``: "dkv" (both, one pass) or "dk" / "dv" alone (one accumulator per warpgroup)."""
    B, Sp, N, D = k.shape
    stages = st.opts.stages
    bias = tiles is not None
    ins = mc.backward_inputs(q, k, v, do, lse2, delta, meta, tables.cols, q_seg, kv_seg,
                             tiles_t=tiles.tiles_t if bias else None,
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
    bias_scratch(scratch, st, stages)
    out_type = [jax.ShapeDtypeStruct(k.shape, k.dtype) for _ in _PARTS[part]]
    outs = mc.launch(functools.partial(_dkv_kernel, st=st, stages=stages, dtype=k.dtype,
                                       part=part), ins, out_type, scratch,
                     grid=(N, Sp // mc.TILE, B), grid_names=("heads", "kv_seq", "batch"),
                     opts=st.opts, name=f"t5_mosaic_bwd_{part}")
    return dict(zip(_PARTS[part], outs))


def backward(st: mc.Static, q, k, v, do, lse2, delta, meta, tables, q_seg, kv_seg, tiles):
    """``(dq, dk, dv, band, far_rows)``: the bias terms (None without a bias) are the band
    kernel's ``[N, hi - lo + 1, 64, 64]`` and the dq kernel's ``[B, N, 2, Tp]`` far row sums."""
    args = (st, q, k, v, do, lse2, delta, meta, tables, q_seg, kv_seg, tiles)
    dq, far_rows = _dq(*args)
    grads = {}
    for part in (("dk", "dv") if st.dkv_split else ("dkv",)):
        grads.update(_dkv(*args, part=part))
    dk, dv = grads["dk"], grads["dv"]
    band_sums = None
    if tiles is not None and st.band is not None:
        from jt5.pallas_kernels.mosaic_band import band
        band_sums = band(*args)
    return dq, dk, dv, band_sums, far_rows
