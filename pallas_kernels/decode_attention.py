"""Flash-decoding for T5 in Pallas (Triton lowering): one query row per (batch, head), the KV
cache split across programs (split-K), partial ``(o, m, l)`` combined outside the kernel.

Semantics are exactly the contract of ``spec.py`` with a query length of 1 (the key tiles are
masked by ``spec.visible``; ``reference.attention_reference`` is the oracle):

- decoder self-attention: ``Mask(causal=True)`` and ``q_offset`` = the position being decoded (a
  traced int32 scalar), so cache slots after it — written later, or never — are masked; the
  unidirectional T5 bias of ``rel = k_pos - q_pos`` is computed in-kernel from the
  ``[num_buckets, N]`` table (below);
- cross-attention: no bias, ``kv_segment_ids`` (0 = padding key) mask the encoder padding;
- a row with no visible key returns zeros.

Work split (Dao et al. 2023, "Flash-Decoding"): the grid is ``(B, N, splits)``. Only key blocks
that can hold a visible key are *live* (causal: blocks ``0 .. q_pos // block_k``), and the live
blocks are divided evenly over the splits at run time, so every step reads each live K/V byte
exactly once and no program idles on the unwritten tail of the cache. Each program walks its
blocks with an online softmax and writes an unnormalised ``o`` ``[H]`` plus the running max ``m``
and sum ``l``; ``_combine`` rescales and sums the splits. With one query row a tensor-core dot
buys nothing, so scores and the PV product are elementwise multiply-and-reduce in float32.

Bias: the bucket depends only on ``rel`` and saturates beyond ``R = bucket_saturation(...)``, so
the kernel gathers ``bucket = lut[clip(rel, -R, R) + R]`` from a static int32 table (computed
once on the host with ``spec.relative_position_bucket``: no device-dependent ``log``) and
then the head's value ``table[bucket, n]``.

The kernel is bandwidth-bound: per call it reads ``kv_bytes(...)`` of K and V (about
``2 * B * N * live_len * H * itemsize``); the floor on a GPU is that over the memory bandwidth.
Lengths that are not a multiple of 16 or head dims that are not powers of two are padded (a
copy per call); jt5 sizes its caches and input buckets so the fast path applies.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jt5.pallas_kernels import reference
from jt5.pallas_kernels.blocks import DecodeBlockSizes, next_power_of_2, target_device
from jt5.pallas_kernels.spec import MASK_VALUE, Mask, RelativeBias, check_args, visible

_DEFAULT_SMS = 132  # H100 SXM; used when the device does not report its core count


@dataclasses.dataclass(frozen=True)
class _Static:
    block_k: int
    num_splits: int
    mask: Mask             # patterns only; its kv_len masks keys padded here
    has_bias: bool
    radius: int            # bucket saturation R: LUT index = clip(rel, -R, R) + R
    sm_scale: float


def _decode_kernel(qoff_ref, q_ref, k_ref, v_ref, tab_ref, lut_ref, qseg_ref, kseg_ref,
                   o_ref, m_ref, l_ref, *, st: _Static):
    bk = st.block_k
    split = pl.program_id(2)
    q_pos = qoff_ref[0]
    n_blocks = k_ref.shape[0] // bk
    n_live = n_blocks
    if st.mask.causal:  # blocks wholly after the query hold no visible key: never read them
        n_live = jnp.clip(q_pos // bk + 1, 0, n_blocks)
    per_split = (n_live + st.num_splits - 1) // st.num_splits
    lo = split * per_split
    hi = jnp.minimum(lo + per_split, n_live)
    q = q_ref[...].astype(jnp.float32)
    q_seg = None if qseg_ref is None else qseg_ref[0]

    def body(t, carry):
        acc, m, l = carry
        start = pl.multiple_of(t * bk, bk)
        ks = pl.ds(start, bk)
        k_pos = start + jnp.arange(bk, dtype=jnp.int32)
        s = jnp.sum(k_ref[ks, :].astype(jnp.float32) * q[None, :], axis=1)    # [bk]
        if st.sm_scale != 1.0:
            s = s * st.sm_scale
        if st.has_bias:
            idx = jnp.clip(k_pos - q_pos, -st.radius, st.radius) + st.radius
            s = s + tab_ref[lut_ref[idx]]
        vis = visible(q_pos, k_pos, q_seg, None if kseg_ref is None else kseg_ref[ks], st.mask)
        if vis is not None:
            s = jnp.where(vis, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        if vis is not None:
            p = jnp.where(vis, p, 0.0)        # a block without visible keys adds nothing
        pv = jnp.sum(p[:, None] * v_ref[ks, :].astype(jnp.float32), axis=0)   # [H]
        return acc * alpha + pv, m_new, l * alpha + jnp.sum(p)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.float32(MASK_VALUE), jnp.float32(0.0))
    acc, m, l = lax.fori_loop(lo, hi, body, init)
    o_ref[...] = acc   # every program writes its outputs, even with no live block
    m_ref[...] = m
    l_ref[...] = l


def _combine(o, m, l, dtype):
    """Partials ``o [B, N, P, H]``, ``m, l [B, N, P]`` -> ``[B, N, H]`` (zeros if nothing seen)."""
    m_max = jnp.max(m, axis=-1, keepdims=True)
    w = jnp.exp(m - m_max)                      # empty splits: l == 0 and o == 0 contribute 0
    denom = jnp.sum(w * l, axis=-1)
    out = jnp.sum(w[..., None] * o, axis=2) / jnp.where(denom == 0.0, 1.0, denom)[..., None]
    return out.astype(dtype)


def _num_splits(bs: DecodeBlockSizes, batch: int, heads: int, n_blocks: int,
                interpret: bool) -> int:
    if bs.num_splits is not None:
        return max(1, min(bs.num_splits, n_blocks))
    if interpret:
        return min(2, n_blocks)
    sms = getattr(target_device(), "core_count", None) or _DEFAULT_SMS
    return max(1, min(n_blocks, -(-2 * sms // (batch * heads))))


def _fit_block(S: int, block_k: int) -> tuple[int, int]:
    """(block, padded length): the largest power-of-two block <= block_k dividing S (>= 16),
    else block_k (or the rounded length, if shorter) with S padded up to a multiple of it."""
    b = min(block_k, max(16, next_power_of_2(S)))
    while b >= 16:
        if S % b == 0:
            return b, S
        b //= 2
    b = min(block_k, max(16, next_power_of_2(S)))
    return b, -(-S // b) * b


def _forward(q, k, v, bias_table, q_off, q_seg, kv_seg, *, mask, bias_rule, sm_scale,
             block_sizes, interpret, debug):
    B, _, N, H = q.shape
    S = k.shape[1]
    bs = block_sizes
    bk, Sp = _fit_block(S, bs.block_k)
    Hp = max(16, next_power_of_2(H))
    splits = _num_splits(bs, B, N, Sp // bk, interpret)
    radius, lut = 0, None
    if bias_table is not None:
        radius, lut_np = RelativeBias(bias_table, *bias_rule).lut()
        lut = jnp.asarray(lut_np)
    if kv_seg is None and Sp != S:  # padded keys without ids: masked by position
        mask = mask.replace(kv_len=S if mask.kv_len is None else min(S, mask.kv_len))
    st = _Static(block_k=bk, num_splits=splits, mask=mask, has_bias=bias_table is not None,
                 radius=radius, sm_scale=float(sm_scale))

    q3 = q[:, 0]
    if Hp != H:  # zero columns change neither scores nor outputs
        q3 = jnp.pad(q3, ((0, 0), (0, 0), (0, Hp - H)))
    if Hp != H or Sp != S:
        k = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, Hp - H)))
        v = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, Hp - H)))
    if kv_seg is not None and Sp != S:  # padded keys get segment 0 (padding)
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, Sp - S)))
    tab = None
    if bias_table is not None:  # [N, K] rows, K padded to a power of two for the Triton load
        K = bias_table.shape[0]
        tab = jnp.pad(bias_table.astype(jnp.float32).T, ((0, 0), (0, next_power_of_2(K) - K)))

    kv_spec = pl.BlockSpec((None, Sp, None, Hp), lambda b, h, j: (b, 0, h, 0))
    part = pl.BlockSpec((None, None, None), lambda b, h, j: (b, h, j))
    o, m, l = pl.pallas_call(
        functools.partial(_decode_kernel, st=st),
        grid=(B, N, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, j: (0,)),
            pl.BlockSpec((None, None, Hp), lambda b, h, j: (b, h, 0)),
            kv_spec, kv_spec,
            None if tab is None else pl.BlockSpec((None, tab.shape[1]), lambda b, h, j: (h, 0)),
            None if lut is None else pl.BlockSpec(lut.shape, lambda b, h, j: (0,)),
            None if q_seg is None else pl.BlockSpec((None, 1), lambda b, h, j: (b, 0)),
            None if kv_seg is None else pl.BlockSpec((None, Sp), lambda b, h, j: (b, 0)),
        ],
        out_specs=[pl.BlockSpec((None, None, None, Hp), lambda b, h, j: (b, h, j, 0)), part, part],
        out_shape=[jax.ShapeDtypeStruct((B, N, splits, Hp), jnp.float32),
                   jax.ShapeDtypeStruct((B, N, splits), jnp.float32),
                   jax.ShapeDtypeStruct((B, N, splits), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret, debug=debug, name="t5_flash_decode",
    )(q_off.reshape(1), q3, k, v, tab, lut, q_seg, kv_seg)
    return _combine(o, m, l, q.dtype)[:, None, :, :H]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode(kw, q, k, v, bias_table, q_off, q_seg, kv_seg):
    return _forward(q, k, v, bias_table, q_off, q_seg, kv_seg, **dict(kw))


def _decode_fwd(kw, q, k, v, bias_table, q_off, q_seg, kv_seg):
    return _decode(kw, q, k, v, bias_table, q_off, q_seg, kv_seg), (q, k, v, bias_table, q_off,
                                                                     q_seg, kv_seg)


def _decode_bwd(kw, res, do):
    # Decoding is inference; a gradient (rare: a 1-token training input) uses the dense
    # reference, which is cheap for a single query row.
    q, k, v, bias_table, q_off, q_seg, kv_seg = res
    kw = dict(kw)
    mask = kw["mask"].replace(q_segment_ids=q_seg, kv_segment_ids=kv_seg)

    def fn(q, k, v, table):
        bias = None if table is None else RelativeBias(table, *kw["bias_rule"])
        return reference.attention_reference(q, k, v, mask, bias, q_offset=q_off,
                                             sm_scale=kw["sm_scale"])
    _, vjp = jax.vjp(fn, q, k, v, bias_table)
    return (*vjp(do), None, None, None)


_decode.defvjp(_decode_fwd, _decode_bwd)


def decode_attention(q, k, v, mask: Mask | None = None, bias: RelativeBias | None = None, *,
                     q_offset=0, sm_scale: float = 1.0, block_sizes: DecodeBlockSizes | None = None,
                     interpret: bool | None = None, debug: bool = False) -> jax.Array:
    """T5 attention of one query row per head over a KV cache: ``[B, 1, N, H]`` (dtype of q).

    Arguments as ``reference.attention_reference`` with ``q.shape[1] == 1``: ``mask`` (its
    ``kv_segment_ids [B, S]``, 0 = padding key; ``q_segment_ids [B, 1]``, packing; any pattern),
    ``bias`` or None; ``q_offset`` the query's position (int or traced int32 scalar).
    ``interpret=None``: Pallas interpret mode unless the default backend is a GPU.
    """
    mask = Mask() if mask is None else mask
    T = q.shape[1]
    if T != 1:
        raise ValueError(f"decode_attention takes one query row: q_len={T} must be 1 "
                         f"(use flash_attention for longer queries)")
    check_args(q, k, v, mask, bias)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    bs = (block_sizes or DecodeBlockSizes()).validate()
    rule = None if bias is None else (bool(bias.bidirectional), int(bias.max_distance))
    kw = (("mask", mask.patterns), ("bias_rule", rule), ("sm_scale", float(sm_scale)),
          ("block_sizes", bs), ("interpret", bool(interpret)), ("debug", bool(debug)))
    q_seg, kv_seg = (None if x is None else jnp.asarray(x, jnp.int32)
                     for x in (mask.q_segment_ids, mask.kv_segment_ids))
    return _decode(kw, q, k, v, None if bias is None else bias.table,
                   jnp.asarray(q_offset, jnp.int32), q_seg, kv_seg)


def kv_bytes(*, batch: int, num_heads: int, head_dim: int, live_len: int, dtype) -> int:
    """Bytes of K and V one call reads: its memory-bandwidth floor is this / bandwidth."""
    return 2 * batch * num_heads * live_len * head_dim * np.dtype(dtype).itemsize


def live_length(kv_len: int, *, causal: bool, q_pos: int, block_k: int = 128) -> int:
    """Keys the kernel reads for a query at ``q_pos``: whole live blocks (causal) or all."""
    bk, Sp = _fit_block(kv_len, block_k)
    if not causal:
        return Sp
    return min(Sp, (q_pos // bk + 1) * bk)
