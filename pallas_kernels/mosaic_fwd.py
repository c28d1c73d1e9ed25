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
from jt5.pallas_kernels.spec import MASK_VALUE

# In-kernel (base-2) lse of a row without any visible key: exp2(s - lse) underflows to 0.
EMPTY_LSE = -MASK_VALUE


def add_bias(s, st: mc.Static, e, *, tile, ready, far):
    """``s`` plus the bias of block offset ``e``: the shared-memory ``tile`` (after its TMA
    completes on ``ready``) within ``near`` blocks, else the per-head scalar of that side."""
    def near_tile():
        plgpu.barrier_wait(ready)
        return s + tile[...]

    def far_value():
        return s + jnp.where(e > 0, far[1], far[0])
    return lax.cond(jnp.abs(e) <= st.near, near_tile, far_value)


def copy_near_tiles(r, st: mc.Static, tiles, h, slot, offsets):
    """TMA the bias tile of each compute warpgroup's block offset into its ring slot when the
    offset is within ``near`` (beyond it the kernels add a scalar and wait for nothing)."""
    for w, e in enumerate(offsets):
        @pl.when(jnp.abs(e) <= st.near)
        def _tile():
            i = slot * len(offsets) + w
            plgpu.copy_gmem_to_smem(tiles.at[h, e + st.near], r["bias_smem"].at[i],
                                    r["bias_ready"].at[i])


def kv_streams(r, st: mc.Static, *, b, h, key_block, offset):
    """The memory warpgroup's streams over key blocks ``key_block(t)``: K with its segment ids
    and the near bias tiles (``offset(kb, w)``), then V (forward and dq kernels)."""
    def k_copies(t, slot):
        kb = key_block(t)
        rows = pl.ds(kb * BLOCK, BLOCK)
        ready = r["k_ready"].at[slot]
        plgpu.copy_gmem_to_smem(r["k"].at[b, rows, h], r["k_smem"].at[slot], ready)
        if st.kv_seg:
            plgpu.copy_gmem_to_smem(r["kseg"].at[b, rows], r["kseg_smem"].at[slot], ready)
        if st.near is not None:
            copy_near_tiles(r, st, r["tiles"], h, slot,
                            [offset(kb, w) for w in range(COMPUTE_WGS)])

    def v_copies(t, slot):
        plgpu.copy_gmem_to_smem(r["v"].at[b, pl.ds(key_block(t) * BLOCK, BLOCK), h],
                                r["v_smem"].at[slot], r["v_ready"].at[slot])
    return [mc.Stream(k_copies, r["k_consumed"]), mc.Stream(v_copies, r["v_consumed"])]


def bias_scratch(scratch: dict, st: mc.Static, stages: int) -> dict:
    """Ring slots (one per stage and compute warpgroup) for the near bias tiles."""
    if st.near is not None:
        scratch["bias_smem"] = mc.smem_f32_tiles(stages * COMPUTE_WGS)
        scratch["bias_ready"] = mc.barriers(stages * COMPUTE_WGS)
    return scratch


def _kernel(r, *, st: mc.Static, stages: int, dtype):
    c = mc.cta(r, st, "q_seq")
    b, h, qt, n_full, n_live, q_off = c.b, c.h, c.row, c.n_full, c.n_live, c.q_off
    bias = st.near is not None
    key_block = functools.partial(c.block, r)

    def offset(kb, w):   # bias tile offset of key block kb for warpgroup w's query block
        return kb - (qt * COMPUTE_WGS + w) - c.a

    mc.memory_warpgroup(lambda: mc.produce(
        kv_streams(r, st, b=b, h=h, key_block=key_block, offset=offset), n_live, stages))

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
        q_ids = mc.load_vector(r["qseg_smem"].at[w], 1, st.opts) if st.q_seg else None
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
            applied = False
            if masked:
                k_ids = (mc.load_vector(r["kseg_smem"].at[slot], 0, st.opts) if st.kv_seg
                         else None)
                s, applied = mc.mask_tile(s, MASK_VALUE, st, shape, q_first=q_off + qb * BLOCK,
                                          k_first=kb * BLOCK, q_ids=q_ids, k_ids=k_ids)
            plgpu.barrier_arrive(r["k_consumed"].at[slot])
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - mc.broadcast_rows(m_new, shape))
            if applied:   # a row with nothing visible yet has m_new == MASK_VALUE: keep l == 0
                p = jnp.where(s == MASK_VALUE, 0.0, p)
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
    bias_scratch(scratch, st, stages)
    out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((B, N, Tp), jnp.float32))
    out, lse2 = mc.launch(functools.partial(_kernel, st=st, stages=stages, dtype=q.dtype), ins,
                          out_type, scratch, grid=(N, Tp // mc.TILE, B),
                          grid_names=("heads", "q_seq", "batch"), opts=st.opts,
                          name="t5_mosaic_fwd")
    return out, lse2
