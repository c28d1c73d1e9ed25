"""The forward kernel on Mosaic GPU: FA3-style warp specialisation with T5's bias and masks.

One CTA per (head, 128-row query tile, batch row): two compute warpgroups own 64 query rows
each, the memory warpgroup streams the live 64-key blocks of the tile's row of the block table
(K with its segment ids and the near bias tiles, then V) through the TMA ring. Per step a compute
warpgroup runs ``S = Q K^T`` (``wgmma``), adds the bias (a tile within ``near`` blocks of the
diagonal, a per-head scalar beyond), masks partial blocks by ``spec.visible`` (full blocks skip
it), and updates the online softmax in base 2 before ``O += P V``. The two warpgroups alternate
their tensor-core phases through a schedule barrier (FA3's ping-pong). Rows without a visible
key give zeros and the in-kernel lse ``EMPTY_LSE``.
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
from jt5.pallas_kernels.spec import MASK_VALUE, visible

# In-kernel (base-2) lse of a row without any visible key: exp2(s - lse) underflows to 0.
EMPTY_LSE = -MASK_VALUE


def masked_scores(st: mc.Static, s, *, q_pos, k_first, q_seg, kseg_slot):
    """``(scores, visible)`` of a partial block: ``spec.visible`` on the tile's positions and
    segment ids; masked scores are MASK_VALUE."""
    k_pos = mc.iota(s.shape, 1, st.opts) + k_first
    k_seg = None
    if st.kv_seg:
        k_seg = mc.broadcast_cols(mc.load_vector(kseg_slot, 0, st.opts), s.shape)
    vis = visible(q_pos, k_pos, q_seg, k_seg, st.mask)
    if vis is None:
        return s, None
    return jnp.where(vis, s, MASK_VALUE), vis


def add_bias(s, st: mc.Static, e, *, tile, ready, far):
    """``s`` plus the bias of block offset ``e``: the shared-memory ``tile`` (after its TMA
    completes on ``ready``) within ``near`` blocks, else the per-head scalar of that side."""
    def near_tile():
        plgpu.barrier_wait(ready)
        return s + tile[...]

    def far_value():
        return s + jnp.where(e > 0, far[1], far[0])
    return lax.cond(jnp.abs(e) <= st.near, near_tile, far_value)


def _kernel(r, *, st: mc.Static, stages: int, dtype):
    b, h, qt = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_seq")
    bm = b if st.batched_tables else 0
    n_full, n_live = r["counts"][bm, qt, 0], r["counts"][bm, qt, 1]
    q_off, a = r["meta"][0], r["meta"][1]
    bias = st.near is not None

    def key_block(t):
        return r["indices"][bm, qt, t]

    def offset(kb, w):   # bias tile offset of key block kb for warpgroup w's query block
        return kb - (qt * COMPUTE_WGS + w) - a

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
                    plgpu.copy_gmem_to_smem(r["tiles"].at[h, e + st.near],
                                            r["bias_smem"].at[slot * COMPUTE_WGS + w],
                                            r["bias_ready"].at[slot * COMPUTE_WGS + w])

    def v_copies(t, slot):
        rows = pl.ds(key_block(t) * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(r["v"].at[b, rows, h], r["v_smem"].at[slot],
                                r["v_ready"].at[slot])

    mc.memory_warpgroup(lambda: mc.produce(
        [mc.Stream(k_copies, r["k_consumed"]), mc.Stream(v_copies, r["v_consumed"])],
        n_live, stages))

    def schedule():
        plgpu.barrier_arrive(r["schedule"])
        plgpu.barrier_wait(r["schedule"])

    @mc.compute_warpgroups
    def _compute(w):
        qb = qt * COMPUTE_WGS + w
        q_rows = pl.ds(qb * BLOCK, BLOCK)
        q_smem = r["q_smem"].at[w]
        plgpu.copy_gmem_to_smem(r["q"].at[b, q_rows, h], q_smem, r["q_ready"].at[w])
        if st.q_seg:
            plgpu.copy_gmem_to_smem(r["qseg"].at[b, q_rows], r["qseg_smem"].at[w],
                                    r["q_ready"].at[w])
        plgpu.barrier_wait(r["q_ready"].at[w])
        shape = (BLOCK, BLOCK)
        q_pos = mc.iota(shape, 0, st.opts) + (q_off + qb * BLOCK)
        q_seg = None
        if st.q_seg:
            q_seg = mc.broadcast_rows(mc.load_vector(r["qseg_smem"].at[w], 1, st.opts), shape)
        far = (r["far"][h, 0], r["far"][h, 1]) if bias else None
        pl.when(w == 1)(schedule)

        def step(t, carry, *, masked):
            acc, m, l = carry
            slot = lax.rem(t, stages)
            kb = key_block(t)
            plgpu.barrier_wait(r["k_ready"].at[slot])
            s = mc.mma_nt(q_smem, r["k_smem"].at[slot], st.opts, between=schedule)
            s = s * (st.sm_scale * LOG2E)
            if bias:
                i = slot * COMPUTE_WGS + w
                s = add_bias(s, st, offset(kb, w), tile=r["bias_smem"].at[i],
                             ready=r["bias_ready"].at[i], far=far)
            vis = None
            if masked:
                s, vis = masked_scores(st, s, q_pos=q_pos, k_first=kb * BLOCK, q_seg=q_seg,
                                       kseg_slot=r["kseg_smem"].at[slot] if st.kv_seg else None)
            plgpu.barrier_arrive(r["k_consumed"].at[slot])
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - mc.broadcast_rows(m_new, shape))
            if vis is not None:
                p = jnp.where(vis, p, 0.0)     # a row with nothing visible yet keeps l == 0
            l = l * alpha + p.sum(axis=1)
            acc = acc * mc.broadcast_rows(alpha, acc.shape)
            p16 = p.astype(dtype)
            plgpu.barrier_arrive(r["schedule"])            # softmax done
            plgpu.barrier_wait(r["v_ready"].at[slot])
            plgpu.barrier_wait(r["schedule"])              # the other warpgroup's wgmma issued
            acc = mc.mma_acc(acc, p16, r["v_smem"].at[slot], st.opts)
            plgpu.barrier_arrive(r["v_consumed"].at[slot])
            return acc, m_new, l

        carry = (mc.zeros((BLOCK, q_smem.shape[-1]), st.opts), mc.full_rows(-jnp.inf, st.opts),
                 mc.full_rows(0.0, st.opts))
        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
        acc, m, l = lax.fori_loop(n_full, n_live, functools.partial(step, masked=True), carry)
        pl.when(w == 0)(schedule)

        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        q_smem[...] = (acc / mc.broadcast_rows(l_safe, acc.shape)).astype(dtype)
        lse_smem = r["lse_smem"].at[w]
        lse_smem[...] = jnp.where(empty, EMPTY_LSE, m + jnp.log(l_safe) * LOG2E)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, r["out_0"].at[b, q_rows, h])
        plgpu.copy_smem_to_gmem(lse_smem, r["out_1"].at[b, h, q_rows])
        plgpu.wait_smem_to_gmem(0)


def forward(st: mc.Static, q, k, v, meta, tables, q_seg, kv_seg, bias_tiles):
    """``(out [B, Tp, N, D], lse2 [B, N, Tp])`` for padded operands (Tp, Sp multiples of 128,
    D of 64); ``lse2`` in base 2, ``EMPTY_LSE`` for rows without a visible key."""
    B, Tp, N, D = q.shape
    stages = st.opts.stages
    ins = dict(q=q, k=k, v=v, meta=meta, counts=tables.rows.counts,
               indices=tables.rows.indices, qseg=q_seg, kseg=kv_seg,
               tiles=None if bias_tiles is None else bias_tiles.tiles,
               far=None if bias_tiles is None else bias_tiles.far)
    scratch = dict(
        q_smem=mc.smem_tiles(COMPUTE_WGS, BLOCK, D, q.dtype),
        k_smem=mc.smem_tiles(stages, BLOCK, D, q.dtype),
        v_smem=mc.smem_tiles(stages, BLOCK, D, q.dtype),
        lse_smem=plgpu.SMEM((COMPUTE_WGS, BLOCK), jnp.float32),
        q_ready=mc.barriers(COMPUTE_WGS, 1 + st.q_seg),
        k_ready=mc.barriers(stages, 1 + st.kv_seg),
        v_ready=mc.barriers(stages),
        k_consumed=mc.barriers(stages, COMPUTE_WGS),
        v_consumed=mc.barriers(stages, COMPUTE_WGS),
        schedule=plgpu.Barrier(num_arrivals=COMPUTE_WGS))
    if st.q_seg:
        scratch["qseg_smem"] = plgpu.SMEM((COMPUTE_WGS, BLOCK), jnp.int32)
    if st.kv_seg:
        scratch["kseg_smem"] = plgpu.SMEM((stages, BLOCK), jnp.int32)
    if st.near is not None:
        scratch["bias_smem"] = mc.smem_f32_tiles(stages * COMPUTE_WGS)
        scratch["bias_ready"] = mc.barriers(stages * COMPUTE_WGS)
    out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((B, N, Tp), jnp.float32))
    out, lse2 = mc.launch(functools.partial(_kernel, st=st, stages=stages, dtype=q.dtype), ins,
                          out_type, scratch, grid=(N, Tp // mc.TILE, B),
                          grid_names=("heads", "q_seq", "batch"), opts=st.opts,
                          name="t5_mosaic_fwd")
    return out, lse2
