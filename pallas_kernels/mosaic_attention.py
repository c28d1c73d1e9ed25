"""T5 attention on Pallas Mosaic GPU (Hopper: TMA, mbarriers, ``wgmma``, warp specialisation):
``mosaic_attention`` has the signature and semantics of ``flash_attention`` (the contract in
``spec.py``; oracle ``reference.attention_reference``), forward and backward.

- Forward (``mosaic_fwd``): FA3-style, the bias as exact tiles near the diagonal and per-head
  scalars beyond (``mosaic_tables``), block-sparse masks, the lse for ``return_lse``.
- Backward (``mosaic_bwd``): dq (+ per-row far sums of dS for the bias gradient), dk/dv, and a
  band kernel summing dS per near block offset; the bias-table gradient never builds [T, S].
  Deterministic: no atomics, every sum has a fixed order.

Any lengths (padded to 128 internally), head dims up to 128 (padded to a multiple of 64), bf16
and f16, any batch and head count. On a machine without a GPU the kernels run in Mosaic GPU's
interpreter (``interpret=None`` decides by backend), with its race detector.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jt5.pallas_kernels import mosaic_common as mc
from jt5.pallas_kernels import mosaic_tables as mt
from jt5.pallas_kernels.mosaic_fwd import EMPTY_LSE, forward
from jt5.pallas_kernels.spec import MASK_VALUE, Mask, RelativeBias, check_args

MAX_HEAD_DIM = 128
DTYPES = (jnp.bfloat16, jnp.float16)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _public_lse(lse2):
    """Base-2 in-kernel lse -> natural log-sum-exp, MASK_VALUE for rows with no visible key."""
    return jnp.where(lse2 == EMPTY_LSE, MASK_VALUE, lse2 * (1.0 / mc.LOG2E))


def _prepare(st: mc.Static, table, q_off, q_seg, kv_seg, *, q_len, kv_len, backward):
    mask = st.mask.replace(q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    tables = mt.make_tables(mask, q_len=q_len, kv_len=kv_len, q_offset=q_off, band=st.band,
                            backward=backward)
    a, r = mt.split_offset(q_off)
    meta = jnp.stack([q_off, a]).astype(jnp.int32)
    return tables, meta, r


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st, q, k, v, table, q_off, q_seg, kv_seg):
    return _attention_fwd(st, q, k, v, table, q_off, q_seg, kv_seg)[0]


def _attention_fwd(st, q, k, v, table, q_off, q_seg, kv_seg):
    tables, meta, r = _prepare(st, table, q_off, q_seg, kv_seg, q_len=q.shape[1],
                               kv_len=k.shape[1], backward=False)
    tiles = None if table is None else mt.bias_tiles(st.bias(table), st.near, r)
    o, lse2 = forward(st, q, k, v, meta, tables, q_seg, kv_seg, tiles)
    return (o, _public_lse(lse2)), (q, k, v, table, q_off, q_seg, kv_seg, o, lse2)


def _attention_bwd(st, res, cotangents):
    from jt5.pallas_kernels.mosaic_bwd import backward
    do, dlse = cotangents
    q, k, v, table, q_off, q_seg, kv_seg, o, lse2 = res
    tables, meta, r = _prepare(st, table, q_off, q_seg, kv_seg, q_len=q.shape[1],
                               kv_len=k.shape[1], backward=True)
    bias = None if table is None else st.bias(table)
    tiles = None if bias is None else mt.bias_tiles(bias, st.near, r)
    # delta = rowsum(dO * O) (FlashAttention-2); the lse cotangent g adds g * p to
    # dS = p * (dP - delta), so the kernels get delta - g.
    delta = jnp.einsum("BTNH,BTNH->BNT", o.astype(jnp.float32), do.astype(jnp.float32))
    delta = delta - dlse
    dq, dk, dv, band, far_rows = backward(st, q, k, v, do, lse2, delta, meta, tables, q_seg,
                                          kv_seg, tiles)
    dtable = None
    if bias is not None:
        dtable = mt.table_gradient(bias, st.band, r, band, far_rows)
    return dq, dk, dv, dtable, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def mosaic_attention(q, k, v, mask: Mask | None = None, bias: RelativeBias | None = None, *,
                     q_offset=0, sm_scale: float = 1.0, interpret: bool | None = None,
                     detect_races: bool = True, semantics: str = "lane", stages: int = 2,
                     return_lse: bool = False):
    """T5 attention ``[B, T, N, H]`` (bf16 or f16) with the bias computed in-kernel.

    Same semantics and arguments as ``flash_attention``/``reference.attention_reference``:
    ``mask`` and ``bias`` are the ``spec`` objects, ``q_offset`` (int or traced int32) is the
    position of query 0, ``return_lse`` adds the natural log-sum-exp ``[B, N, T]`` (MASK_VALUE
    where no key is visible). Differentiable in q, k, v and the bias table (and the lse).
    ``interpret=None``: Mosaic GPU's interpreter unless the default backend is a GPU;
    ``detect_races``: its race detector. ``semantics``: Mosaic GPU lowering ("lane" or
    "warpgroup"); ``stages``: TMA ring depth.
    """
    mask = Mask() if mask is None else mask
    B, T, N, H = q.shape
    S = k.shape[1]
    check_args(q, k, v, mask, bias)
    if q.dtype not in DTYPES:
        raise ValueError(f"mosaic attention runs bfloat16 or float16 (wgmma's operands), got "
                         f"{q.dtype}: cast q, k, v (a model: dtype='bfloat16')")
    if H > MAX_HEAD_DIM:
        raise ValueError(f"head dim {H} > {MAX_HEAD_DIM}: mosaic attention holds a 64 x H "
                         "float32 accumulator per warpgroup (use attention='pallas')")
    if T == 0 or S == 0:
        out = jnp.zeros_like(q)
        return (out, jnp.full((B, N, T), MASK_VALUE, jnp.float32)) if return_lse else out
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    opts = mc.Options(interpret=bool(interpret), detect_races=bool(detect_races),
                      semantics=semantics, stages=stages)
    if opts.interpret:
        mc.check_interpreter_threads()
    near = None if bias is None else mt.near_radius(bias.lut()[0], q_offset)

    Tp, Sp, Hp = _round_up(T, mc.TILE), _round_up(S, mc.TILE), _round_up(H, mc.BLOCK)
    qp = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, Hp - H)))
    kp = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, Hp - H)))
    vp = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, Hp - H)))
    patterns = mask.patterns
    q_seg = kv_seg = None
    if mask.kv_segment_ids is not None:      # padded keys get segment 0 (padding)
        kv_seg = jnp.pad(jnp.asarray(mask.kv_segment_ids, jnp.int32), ((0, 0), (0, Sp - S)))
    elif Sp > S:                             # else the padded keys are masked by position
        patterns = patterns.replace(kv_len=S if patterns.kv_len is None
                                    else min(S, patterns.kv_len))
    if mask.q_segment_ids is not None:       # padded queries get segment 0 (see nothing)
        q_seg = jnp.pad(jnp.asarray(mask.q_segment_ids, jnp.int32), ((0, 0), (0, Tp - T)))
    band = None if near is None else mt.band_offsets(near, q_offset, q_len=Tp, kv_len=Sp)
    st = mc.Static(sm_scale=float(sm_scale), mask=patterns, near=near, band=band,
                   q_seg=q_seg is not None, kv_seg=kv_seg is not None,
                   batched_tables=kv_seg is not None,
                   bidirectional=True if bias is None else bool(bias.bidirectional),
                   max_distance=128 if bias is None else int(bias.max_distance), opts=opts,
                   # Two 64 x 128 float32 accumulators per warpgroup plus a bias or a mask
                   # spill even at 255 registers (compile gate): dk and dv apart at H > 64.
                   dkv_split=Hp > mc.BLOCK)
    o, lse = _attention(st, qp, kp, vp, None if bias is None else bias.table,
                        jnp.asarray(q_offset, jnp.int32), q_seg, kv_seg)
    out = o[:, :T, :, :H]
    return (out, lse[:, :, :T]) if return_lse else out
