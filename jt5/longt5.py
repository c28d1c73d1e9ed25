"""LongT5's encoder attentions (Guo et al. 2022, §3.1): local and transient-global.

*Local*: every token attends to the tokens within ``local_radius`` of it, with the ordinary
bidirectional T5 bias of the offset. transformers computes it in blocks of ``local_radius + 1``
with 3-block key windows (``modeling_longt5.py``: ``_split_into_blocks``,
``_concatenate_3_blocks``, ``_mask_local_attention_mask`` keeps ``|q - k| < block_len``), which is
exactly the attention contract's ``Mask(local_window=local_radius)`` plus padding — so "local" is
a mask on the ordinary dispatch, and the Pallas kernels skip the key blocks outside the window.

*Transient-global* adds, for every query, one side key per ``global_block_size`` block of the
input: the SUM of the block's (normed) hidden states (``_create_global_aggregates``), normed by the
layer's own ``global_input_layer_norm`` and projected by the layer's k/v. Side keys carry a bias
by block distance from a second per-stack table (``compute_side_bias``,
``global_relative_attention_bias``, built by the first layer and shared like the local one), and
the query attends over local and side keys in ONE softmax: densely for short inputs on the XLA
path (``GlobalPlan`` with the ``[B, N, S, S+G]`` bias and mask), otherwise in memory linear in
the length, the local window and the side keys computed apart and merged through their
log-sum-exps (``global_attention``; under ``attention="pallas"`` the window runs on the flash
kernel).

Checkpoints without LongT5's global parameters (T5, Flan-T5, mT5, LongT5-local) get them
initialised from their own when loaded with ``encoder_attention_type="transient-global"``
(``to_transient_global``): an approximation, measured in benchmarks/long_input.py.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jt5 import attention_ops as ops
from jt5.attention import _Attention
from jt5.config import T5Config
from jt5.layers import RMSNorm
from jt5.pallas_kernels import chunked, reference, spec


def encoder_mask(config: T5Config, mask: ops.Mask) -> ops.Mask:
    """The encoder's mask with the local window of ``config`` (unchanged for "full")."""
    if config.encoder_attention_type == "full":
        return mask
    return mask.replace(local_window=config.local_radius,
                        num_global_tokens=config.num_global_tokens)


@functools.lru_cache(maxsize=64)
def _fixed_block_floor(length: int, block: int) -> np.ndarray:
    """``floor(pos / block)`` as transformers' ``_make_global_fixed_block_ids`` computes it.

    It takes a float32 cumulative sum of ``1/block`` (torch on CPU accumulates it in float64 and
    rounds once) and then ``floor(1 + x - 1)`` in float32; for block sizes that are not powers of
    two that differs from integer division at some long-input positions (e.g. 245 of 16384 for
    block 25). Replicated here bit for bit; it equals ``pos // block`` for block 16 (every
    released checkpoint). Static: depends on the length only.
    """
    x = np.full(length, np.float32(1) / np.float32(block), np.float32)
    before = np.cumsum(x.astype(np.float64)).astype(np.float32) - x
    return np.floor(np.float32(1) + before - np.float32(1)).astype(np.int32)


def global_block_ids(is_token, block: int):
    """``is_token: [B, S]`` bool -> ``(block_ids [B, S], valid [B, G])``, ``G = S // block``.

    Padding gets block -1; tokens of a trailing incomplete block join the last complete one
    ("orphan tokens", ``handle_orphan_tokens``); a global block is valid up to the largest block
    id of the row (``global_segment_ids``).
    """
    B, S = is_token.shape
    pos = jnp.arange(S, dtype=jnp.int32)
    raw = jnp.where(is_token, jnp.asarray(_fixed_block_floor(S, block))[None], -1)
    ends = (pos % block == block - 1)[None] & is_token
    last_full = jnp.sum(ends, axis=1, dtype=jnp.int32)[:, None] - 1
    ids = jnp.where(raw < last_full, raw, last_full)
    G = S // block
    valid = jnp.arange(G, dtype=jnp.int32)[None] <= jnp.max(ids, axis=1, keepdims=True)
    return ids, valid


@struct.dataclass
class GlobalPlan:
    """What every transient-global layer of one encoder pass shares (built once per stack).

    ``impl="dense"``: the ``[B, N, S, S+G]`` bias and mask (short inputs; the tested oracle).
    ``"chunked"`` / ``"pallas"``: nothing ``[S, S]``-sized, block ids and tables only
    (``global_attention``)."""
    block_onehot: Optional[jax.Array] = None  # [B, S, G] float32: token s is in global block g
    bias: Optional[jax.Array] = None  # [1|B, N, S, S+G] float32: local bias, then side bias
    mask: Optional[jax.Array] = None  # [B, 1, S, S+G] bool: local window + padding, then side
    block_ids: Optional[jax.Array] = None   # [B, S] int32 (-1: padding), global_block_ids
    side_valid: Optional[jax.Array] = None  # [B, G] bool
    is_token: Optional[jax.Array] = None    # [1|B, S] bool
    local_bias: Optional[ops.RelativeBias] = None
    global_bias: Optional[ops.RelativeBias] = None
    impl: str = struct.field(pytree_node=False, default="dense")
    local_radius: int = struct.field(pytree_node=False, default=0)


def global_impl(config: T5Config, length: int) -> str:
    """``"dense"`` below the XLA path's switch-over (``ops.CHUNKED_MIN_ELEMENTS`` query x key
    positions, side keys included), ``"chunked"`` above it; ``"pallas"`` / ``"mosaic"`` under
    those kernels (the window on the flash kernel with its lse)."""
    impl = ops.resolve_impl(config.attention)
    if impl in ("pallas", "mosaic"):
        return impl
    keys = length + length // config.global_block_size
    return "chunked" if length * keys >= ops.CHUNKED_MIN_ELEMENTS else "dense"


def make_global_plan(config: T5Config, mask: ops.Mask, length: int, local_bias: ops.RelativeBias,
                     global_bias: ops.RelativeBias) -> GlobalPlan:
    if mask.q_segment_ids is not None:
        raise ValueError("transient-global attention does not support packed rows (segment ids): "
                         "its global block sums would mix the packed examples")
    S, g = length, config.global_block_size
    seg = mask.kv_segment_ids
    is_token = (jnp.ones((1, S), bool) if seg is None else jnp.asarray(seg) != 0)
    ids, valid = global_block_ids(is_token, g)
    impl = global_impl(config, S)
    if impl != "dense":
        return GlobalPlan(block_ids=ids, side_valid=valid, is_token=is_token,
                          local_bias=local_bias.replace(bidirectional=True),
                          global_bias=global_bias.replace(bidirectional=True), impl=impl,
                          local_radius=config.local_radius)
    B, G = ids.shape[0], valid.shape[1]
    # ids == -1 (padding) matches no block: its row of the one-hot is zero.
    onehot = (ids[:, :, None] == jnp.arange(G, dtype=jnp.int32)[None, None]).astype(jnp.float32)
    loc_bias = reference.dense_bias(local_bias.replace(bidirectional=True), q_len=S, kv_len=S)
    side_rel = jnp.arange(G, dtype=jnp.int32)[None, None] - ids[:, :, None]  # [B, S, G]
    buckets = spec.relative_position_bucket(
        side_rel, bidirectional=True, num_buckets=global_bias.table.shape[0],
        max_distance=global_bias.max_distance)
    side_bias = jnp.take(global_bias.table.astype(jnp.float32), buckets, axis=0)  # [B,S,G,N]
    side_bias = side_bias.transpose(0, 3, 1, 2)
    N = loc_bias.shape[1]
    bias = jnp.concatenate([jnp.broadcast_to(loc_bias, (B, N, S, S)), side_bias], axis=-1)
    loc_mask = reference.dense_mask(
        ops.Mask(kv_segment_ids=seg, local_window=config.local_radius), q_len=S, kv_len=S)
    side_mask = (is_token[:, :, None] & valid[:, None, :])[:, None]  # [B, 1, S, G]
    full = jnp.concatenate([jnp.broadcast_to(loc_mask, (B, 1, S, S)), side_mask], axis=-1)
    return GlobalPlan(block_onehot=onehot, bias=bias, mask=full)


# -- transient-global on checkpoints trained without it (T5, Flan-T5, mT5, LongT5-local) ------
# TurboT5's idea: run a model trained with full attention with LongT5's encoder attention. Only
# two kinds of parameters are missing, and both are initialised from what the model has:
#
# * the global bias table (``global_relpos``): side key ``j`` seen from a query of block ``i``
#   is a sum over block ``j``, whose centre lies ``d * g`` tokens from the query block's centre
#   (``d = j - i``, ``g = global_block_size``). So bucket ``b`` of block distances gets the
#   local table's row for token distance ``rep(b) * g``, ``rep(b)`` the bucket's representative
#   block distance: the distance itself for exact buckets, the rounded geometric mean of the
#   bucket's distances (capped at ``max_distance``) for logarithmic ones (``global_bucket_rows``).
#   "mass" adds ``log(g)`` (a side key standing for the g tokens it sums, at their average
#   score); measured worse than without it ("distance", the default).
# * the global norm's scale (``global_norm``): the side key's input is the RMS-normalised SUM of
#   the block's normed tokens. "ones" leaves it at unit RMS (the default: measured best); "rms"
#   gives it the RMS ``rms(s)`` of the layer's own key inputs ``x / rms(x) * s``; "scale" uses
#   ``s`` itself (weighing the channels by ``s`` twice; measured worst). Measurements:
#   benchmarks/long_input.py, RESULTS.md ("Long inputs").
GLOBAL_NORM_INITS = ("ones", "rms", "scale")
GLOBAL_BIAS_INITS = ("distance", "mass")
_ENCODER_FIELDS = ("encoder_attention_type", "local_radius", "global_block_size")


def _buckets(rel, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bidirectional buckets of static offsets ``rel`` (numpy, also while tracing)."""
    return spec.host_buckets(np.asarray(rel, np.int32), bidirectional=True,
                             num_buckets=num_buckets, max_distance=max_distance)


def global_bucket_rows(*, num_buckets: int, max_distance: int, global_block_size: int):
    """``[K]`` int32: the local table's row that global bucket ``b`` starts from (see above).

    Buckets no block distance reaches keep their own row."""
    d = np.arange(-max_distance, max_distance + 1, dtype=np.int32)
    buckets = _buckets(d, num_buckets, max_distance)
    rep = np.arange(num_buckets, dtype=np.int64)  # placeholder for unreached buckets
    reached = np.zeros(num_buckets, bool)
    for b in range(num_buckets):
        ds = d[buckets == b]
        if not ds.size:
            continue
        lo, hi = int(np.abs(ds).min()), int(np.abs(ds).max())
        sign = 1 if ds[0] > 0 else -1
        rep[b] = sign * (lo if lo == hi else int(round(math.sqrt(lo * hi))))
        reached[b] = True
    rows = _buckets(rep * global_block_size, num_buckets, max_distance)
    return np.where(reached, rows, np.arange(num_buckets)).astype(np.int32)


def global_table_from_local(table, *, max_distance: int, global_block_size: int,
                            init: str = "distance"):
    """``[K, N]`` global bias table from a stack's ``[K, N]`` bidirectional relative table
    (``init``: one of ``GLOBAL_BIAS_INITS``, see above)."""
    if init not in GLOBAL_BIAS_INITS:
        raise ValueError(f"global bias init {init!r} must be one of {GLOBAL_BIAS_INITS}")
    rows = global_bucket_rows(num_buckets=table.shape[0], max_distance=max_distance,
                              global_block_size=global_block_size)
    out = jnp.take(table, jnp.asarray(rows), axis=0)
    if init == "mass":
        out = (out.astype(jnp.float32) + math.log(global_block_size)).astype(table.dtype)
    return out


def global_norm_scale_from(scale, how: str = "ones"):
    """The global norm's ``[D]`` scale from the layer's pre-attention norm scale ``[D]``."""
    if how == "rms":
        rms = jnp.sqrt(jnp.mean(jnp.square(scale.astype(jnp.float32))))
        return jnp.broadcast_to(rms, scale.shape).astype(scale.dtype)
    if how == "scale":
        return scale
    if how == "ones":
        return jnp.ones_like(scale)
    raise ValueError(f"global norm init {how!r} must be one of {GLOBAL_NORM_INITS}")


def to_transient_global(model, *, global_norm_init: str = "ones",
                        global_bias_init: str = "distance",
                        **encoder_fields):
    """``model`` as a LongT5 transient-global model (``encoder_fields``: ``local_radius``,
    ``global_block_size``); parameters it lacks are initialised from its own (see above), all
    others are the same arrays (nothing is copied). ``save_pretrained`` then writes a LongT5
    checkpoint. A transient-global model just takes the new fields."""
    from jt5.weights import abstract_model  # (jt5.model imports this module)

    cfg = model.config
    if cfg.relative_bias_per_layer:
        cfg.replace(encoder_attention_type="transient-global")  # raises, naming the reason
    new = cfg.replace(**{**encoder_fields, "encoder_attention_type": "transient-global",
                         "model_type": "longt5"})
    if new == cfg:
        return model
    old = dict(nnx.to_flat_state(nnx.state(model)))
    graphdef, abstract = nnx.split(abstract_model(new, type(model)))
    flat = dict(nnx.to_flat_state(abstract))

    def derived(path):
        if path == ("encoder", "global_relpos", "table"):
            src = old[("encoder", "relpos", "table")].get_value()
            return global_table_from_local(src, max_distance=new.relative_attention_max_distance,
                                           global_block_size=new.global_block_size,
                                           init=global_bias_init), src
        if path[:2] == ("encoder", "layers") and path[3:] == ("self_attn", "global_norm", "scale"):
            src = old[path[:3] + ("self_attn_norm", "scale")].get_value()
            return global_norm_scale_from(src, global_norm_init), src
        raise ValueError(f"{path}: transient-global has no initialisation for it")

    for path, var in flat.items():
        if path in old:
            var.set_value(old[path].get_value())
        else:
            value, like = derived(path)
            sharding = getattr(like, "sharding", None)
            var.set_value(value if sharding is None else jax.device_put(value, sharding))
    out = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if hasattr(model, "generation_config"):
        out.generation_config = model.generation_config
    return out


def accepts_transient_global(load):
    """Decorate a loader ``load(..., **config_overrides) -> model``: with
    ``encoder_attention_type="transient-global"`` it loads the checkpoint as stored and converts
    it (``to_transient_global``), so checkpoints without LongT5's global parameters load too."""
    @functools.wraps(load)
    def wrapped(*args, **kw):
        if kw.get("encoder_attention_type") != "transient-global":
            return load(*args, **kw)
        fields = {k: kw.pop(k) for k in _ENCODER_FIELDS if k in kw}
        inits = {k: kw.pop(k) for k in ("global_norm_init", "global_bias_init") if k in kw}
        fields = {k: v for k, v in fields.items() if v is not None}
        return to_transient_global(load(*args, **kw), **inits, **fields)
    return wrapped


class TransientGlobalSelfAttention(_Attention):
    """LongT5's transient-global encoder self-attention (one layer)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.global_norm = RMSNorm(config, rngs=rngs)

    def __call__(self, x, plan: GlobalPlan):
        if plan.impl != "dense":
            side = self.project_kv(self.global_norm(block_sums(x, plan)))
            kv = self.project_kv(x)
            return self.project_out(global_attention(self.project_q(x), kv.k, kv.v, side.k,
                                                     side.v, plan))
        # Block sums in float32 (up to global_block_size tokens), then the layer's own norm.
        sums = jnp.einsum("BSD,BSG->BGD", x.astype(jnp.float32), plan.block_onehot)
        side = self.project_kv(self.global_norm(sums))
        kv = self.project_kv(x)
        k = jnp.concatenate([kv.k, side.k], axis=1)
        v = jnp.concatenate([kv.v, side.v], axis=1)
        y = reference.attend_dense(self.project_q(x), k, v, plan.bias, plan.mask)
        return self.project_out(y)


# -- transient-global in linear memory -------------------------------------------------------
# The two key sets of one softmax, computed apart and merged through their log-sum-exps
# (``chunked.merge_lse``): the local window (``chunked.window_attention``; under "pallas" the
# flash kernel, which skips the key blocks outside the window) and the G = S /
# global_block_size side keys (``side_attention``), each over query chunks (``lax.map`` of ``jax.checkpoint``-ed
# chunks): memory O(S (block_q + 2 radius + G)) per chunk step, i.e. linear in S at a fixed
# block size, forward and backward. Equal to the dense plan up to float32 rounding
# (tests/test_longt5.py).
_SIDE_CHUNK_ELEMENTS = 1 << 19  # side part: query chunk x G score elements per head


def block_sums(x, plan: GlobalPlan):
    """``[B, S, D] -> [B, G, D]`` float32: each global block's sum (padding in none)."""
    B, S, D = x.shape
    G = plan.side_valid.shape[1]
    ids = jnp.broadcast_to(plan.block_ids, (B, S))
    rows = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, S))
    return jnp.zeros((B, G, D), jnp.float32).at[rows, jnp.where(ids < 0, G, ids)].add(
        x.astype(jnp.float32), mode="drop")


def side_attention(q, side_k, side_v, plan: GlobalPlan, *, block_q: Optional[int] = None):
    """Every query against the G side keys, with the global table's bias of ``side index -
    query block`` and the side mask (real query, valid block) -> ``(out [B, S, N, H] float32,
    lse [B, N, S])``."""
    B, S, N, H = q.shape
    G = side_k.shape[1]
    if block_q is None:
        block_q = max(16, min(512, 1 << int(math.log2(max(_SIDE_CHUNK_ELEMENTS // max(G, 1), 1)))))
    bq = min(block_q, S)
    n = -(-S // bq)
    gb = plan.global_bias
    # Block distances lie in [-G, G] (padding's id -1 included): one row per distance.
    span = np.arange(-G - 1, G + 1, dtype=np.int32)
    by_rel = jnp.take(gb.table.astype(jnp.float32),
                      jnp.asarray(_buckets(span, gb.table.shape[0], gb.max_distance)),
                      axis=0).T  # [N, 2G + 2]
    ids = jnp.pad(jnp.broadcast_to(plan.block_ids, (B, S)), ((0, 0), (0, n * bq - S)),
                  constant_values=-1).reshape(B, n, bq).transpose(1, 0, 2)
    ok = jnp.pad(jnp.broadcast_to(plan.is_token, (B, S)), ((0, 0), (0, n * bq - S)))
    ok = ok.reshape(B, n, bq).transpose(1, 0, 2)
    qs = chunked.heads_major_chunks(jnp.pad(q, ((0, 0), (0, n * bq - S), (0, 0), (0, 0))), n, bq)
    sk, sv = side_k.transpose(0, 2, 1, 3), side_v.transpose(0, 2, 1, 3)  # [B, N, G, H]
    valid = plan.side_valid[:, None, None, :]
    cols = jnp.arange(G, dtype=jnp.int32)

    @jax.checkpoint
    def chunk(args):
        qi, ids_i, ok_i = args
        s = jnp.einsum("BNTH,BNGH->BNTG", qi, sk, preferred_element_type=jnp.float32)
        rel = cols[None, None, :] - ids_i[:, :, None] + G + 1  # [B, bq, G]
        s = s + jnp.take(by_rel, rel, axis=1).transpose(1, 0, 2, 3)
        return chunked.attend_stats(s, valid & ok_i[:, None, :, None], sv)

    out, lse = jax.lax.map(chunk, (qs, ids, ok))
    return chunked.from_chunks(out, S), chunked.from_chunks(lse, S)


def global_attention(q, k, v, side_k, side_v, plan: GlobalPlan):
    """Transient-global attention of ``q, k, v [B, S, N, H]`` and ``side_k, side_v [B, G, N,
    H]`` in one softmax, in memory linear in S (see above) -> ``[B, S, N, H]`` in q's dtype."""
    B, S = q.shape[:2]
    local = ops.Mask(kv_segment_ids=jnp.broadcast_to(plan.is_token, (B, S)).astype(jnp.int32),
                     local_window=plan.local_radius)
    if plan.impl in ("pallas", "mosaic"):  # the kernels skip key blocks outside the window
        if plan.impl == "pallas":  # the kernels import Pallas: lazily
            from jt5.pallas_kernels import flash_attention as kernel
        else:
            from jt5.pallas_kernels.mosaic_attention import mosaic_attention as kernel
        loc, lse_loc = ops.per_shard(kernel, q, k, v, local, plan.local_bias, return_lse=True)
    else:
        loc, lse_loc = chunked.window_attention(q, k, v, local, plan.local_bias)
    side, lse_side = side_attention(q, side_k, side_v, plan)
    return chunked.merge_lse(loc, lse_loc, side, lse_side).astype(q.dtype)
