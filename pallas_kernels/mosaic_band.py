"""The near band of the bias-table gradient on Mosaic GPU: dS summed per block offset.

Within ``near`` blocks of the diagonal the bias of a 64 x 64 block pair is the tile of its offset
``e = kb - qb - a``, so the table's gradient there needs only ``G[n, e] = sum over (b, qb) of
dS[b, n, qb, qb + a + e]`` (``mosaic_tables.table_gradient`` maps each tile element to its
bucket). One CTA per (head, e, batch row) walks the live query blocks of its band (a table row
computed outside), recomputing ``dS`` for the one key block each; the two compute warpgroups
take alternate steps (warpgroup w owns ring slot w) and each keeps a running ``[64, 64]`` sum in
registers. The partial tiles (per batch row and warpgroup) are summed by XLA: no atomics.

The backward does this on top of dq and dk/dv: ``(2 near + 1) / (S / 64)`` of their work (7 of
64 key blocks at S = 4096), where writing every near dS tile out instead would cost memory
linear in T times 7 x 64 floats per row.
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

_STAGES = COMPUTE_WGS     # warpgroup w consumes the steps t = w (mod 2): ring slot w


def _band_kernel(r, *, st: mc.Static):
    c = mc.cta(r, st, "offset")
    b, h, ei, n_full, n_live, q_off = c.b, c.h, c.row, c.n_full, c.n_live, c.q_off
    query_block = functools.partial(c.block, r)
    e = st.band[0] + ei
    key_block = lambda qb: qb + c.a + e   # noqa: E731

    def copies(t, slot):
        qb = query_block(t)
        q_rows, k_rows = pl.ds(qb * BLOCK, BLOCK), pl.ds(key_block(qb) * BLOCK, BLOCK)
        ready = r["ready"].at[slot]
        for src, dst in ((r["q"].at[b, q_rows, h], r["q_smem"].at[slot]),
                         (r["do"].at[b, q_rows, h], r["do_smem"].at[slot]),
                         (r["lse"].at[b, h, q_rows], r["rows_smem"].at[slot, 0]),
                         (r["delta"].at[b, h, q_rows], r["rows_smem"].at[slot, 1]),
                         (r["k"].at[b, k_rows, h], r["k_smem"].at[slot]),
                         (r["v"].at[b, k_rows, h], r["v_smem"].at[slot])):
            plgpu.copy_gmem_to_smem(src, dst, ready)
        if st.q_seg:
            plgpu.copy_gmem_to_smem(r["qseg"].at[b, q_rows], r["qseg_smem"].at[slot], ready)
        if st.kv_seg:
            plgpu.copy_gmem_to_smem(r["kseg"].at[b, k_rows], r["kseg_smem"].at[slot], ready)

    mc.memory_warpgroup(lambda: mc.produce([mc.Stream(copies, r["consumed"])], n_live,
                                           _STAGES))

    @mc.compute_warpgroups
    def _compute(w):
        tile = r["tile_smem"].at[w]
        plgpu.copy_gmem_to_smem(r["tiles"].at[h, e + st.near], tile, r["tile_ready"].at[w])
        plgpu.barrier_wait(r["tile_ready"].at[w])
        shape = (BLOCK, BLOCK)
        slot = w
        rows_smem = r["rows_smem"].at[slot]

        def step(j, g, *, masked):
            qb = query_block(w + COMPUTE_WGS * j)
            plgpu.barrier_wait(r["ready"].at[slot])
            s = mc.mma_nt(r["q_smem"].at[slot], r["k_smem"].at[slot], st.opts)
            s = s * (st.sm_scale * LOG2E) + tile[...]
            p = jnp.exp2(s - mc.broadcast_rows(mc.load_vector(rows_smem.at[0], 1, st.opts),
                                               shape))
            if masked:
                p, _ = mc.mask_tile(
                    p, 0.0, st, shape, q_first=q_off + qb * BLOCK,
                    k_first=key_block(qb) * BLOCK,
                    q_ids=(mc.load_vector(r["qseg_smem"].at[slot], 1, st.opts) if st.q_seg
                           else None),
                    k_ids=(mc.load_vector(r["kseg_smem"].at[slot], 0, st.opts) if st.kv_seg
                           else None))
            dp = mc.mma_nt(r["do_smem"].at[slot], r["v_smem"].at[slot], st.opts)
            delta = mc.load_vector(rows_smem.at[1], 1, st.opts)
            plgpu.barrier_arrive(r["consumed"].at[slot])
            return g + p * (dp - mc.broadcast_rows(delta, shape))

        steps = lambda n: (n + (COMPUTE_WGS - 1) - w) // COMPUTE_WGS   # my steps among 0..n-1
        g = mc.zeros(shape, st.opts)
        g = lax.fori_loop(0, steps(n_full), functools.partial(step, masked=False), g)
        g = lax.fori_loop(steps(n_full), steps(n_live), functools.partial(step, masked=True), g)
        tile[...] = g
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(tile, r["out_0"].at[b, h, ei, w])
        plgpu.wait_smem_to_gmem(0)


def band(st: mc.Static, q, k, v, do, lse2, delta, meta, tables, q_seg, kv_seg, tiles):
    """``[N, hi - lo + 1, 64, 64]`` float32: dS summed per head and block offset ``e`` in
    ``st.band = (lo, hi)``."""
    B, Tp, N, D = q.shape
    n_off = st.band[1] - st.band[0] + 1
    ins = mc.backward_inputs(q, k, v, do, lse2, delta, meta, tables.band, q_seg, kv_seg,
                             tiles=tiles.tiles)
    scratch = dict(
        q_smem=mc.smem_tiles(_STAGES, BLOCK, D, q.dtype),
        do_smem=mc.smem_tiles(_STAGES, BLOCK, D, q.dtype),
        k_smem=mc.smem_tiles(_STAGES, BLOCK, D, q.dtype),
        v_smem=mc.smem_tiles(_STAGES, BLOCK, D, q.dtype),
        rows_smem=plgpu.SMEM((_STAGES, 2, BLOCK), jnp.float32),     # lse, delta
        tile_smem=mc.smem_f32_tiles(COMPUTE_WGS),
        ready=mc.barriers(_STAGES, 6 + st.q_seg + st.kv_seg),
        consumed=mc.barriers(_STAGES, 1),
        tile_ready=mc.barriers(COMPUTE_WGS))
    if st.q_seg:
        scratch["qseg_smem"] = plgpu.SMEM((_STAGES, BLOCK), jnp.int32)
    if st.kv_seg:
        scratch["kseg_smem"] = plgpu.SMEM((_STAGES, BLOCK), jnp.int32)
    out_type = [jax.ShapeDtypeStruct((B, N, n_off, COMPUTE_WGS, BLOCK, BLOCK), jnp.float32)]
    (partial,) = mc.launch(functools.partial(_band_kernel, st=st), ins, out_type,
                           scratch, grid=(N, n_off, B), grid_names=("heads", "offset", "batch"),
                           opts=st.opts, name="t5_mosaic_bwd_band")
    return partial.sum(axis=(0, 3))
