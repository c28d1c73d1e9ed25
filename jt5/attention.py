"""The three attentions of T5 — encoder self, decoder self (causal, cached), cross — as classes.

Projections are stored as ``q, k, v: [D, N, H]`` and ``o: [N, H, D]`` (einsum-friendly; the
bridge reshapes transformers' ``[N*H, D]`` Linear weights). T5 does not scale scores by
1/sqrt(H): that factor is folded into the initialisation of ``q``.
"""
from __future__ import annotations

from typing import Optional

from flax import nnx

from jt5 import attention_ops as ops
from jt5.cache import KV
from jt5.config import T5Config
from jt5.layers import compute_dtype, init_std_attention, matmul, residual_dtype, weight
from jt5.relpos import RelativePositionBias
from jt5.sharding import constrain

_HEADS = ("batch", "length", "act_heads", "act_kv")


class _Attention(nnx.Module):
    """q/k/v/o projections shared by the three attention classes."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        D, N, H = config.d_model, config.num_heads, config.d_kv
        q_std, kv_std, o_std = init_std_attention(config)
        self.dtype = compute_dtype(config)
        self.out_dtype = residual_dtype(config)
        qkv, axes = dict(config=config, kind="attn_qkv"), ("embed", "heads", "kv")
        self.q = weight(rngs, (D, N, H), axes, std=q_std, **qkv)
        self.k = weight(rngs, (D, N, H), axes, std=kv_std, **qkv)
        self.v = weight(rngs, (D, N, H), axes, std=kv_std, **qkv)
        self.o = weight(rngs, (N, H, D), ("heads", "kv", "embed"), std=o_std, config=config,
                        kind="attn_out")

    def project_q(self, x):  # [B,T,D] -> [B,T,N,H]
        return constrain(matmul("BTD,DNH->BTNH", x, self.q, dtype=self.dtype), _HEADS)

    def project_kv(self, x) -> KV:  # [B,S,D] -> 2 x [B,S,N,H] (layout BSNH)
        x = x.astype(self.dtype)
        k = matmul("BSD,DNH->BSNH", x, self.k, dtype=self.dtype)
        v = matmul("BSD,DNH->BSNH", x, self.v, dtype=self.dtype)
        return KV(constrain(k, _HEADS), constrain(v, _HEADS))

    def project_out(self, y):  # [B,T,N,H] -> [B,T,D] in the residual dtype
        return matmul("BTNH,NHD->BTD", y, self.o, dtype=self.dtype, out_dtype=self.out_dtype)


class EncoderSelfAttention(_Attention):
    """Bidirectional self-attention; owns a bias table only in UMT5 (one per layer)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.relpos = (RelativePositionBias(config, bidirectional=True, rngs=rngs)
                       if config.relative_bias_per_layer else None)

    def __call__(self, x, plan: ops.Plan):
        if self.relpos is not None:
            plan = ops.with_bias(plan, self.relpos())
        return self.project_out(ops.attention(self.project_q(x), self.project_kv(x), plan))


class DecoderSelfAttention(_Attention):
    """Causal self-attention, unidirectional buckets; ``step`` decodes tokens from a cache."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.relpos = (RelativePositionBias(config, bidirectional=False, rngs=rngs)
                       if config.relative_bias_per_layer else None)

    def _plan(self, plan):
        return plan if self.relpos is None else ops.with_bias(plan, self.relpos())

    def __call__(self, x, plan: ops.Plan):
        y = ops.attention(self.project_q(x), self.project_kv(x), self._plan(plan))
        return self.project_out(y)

    def step(self, x, cache: KV, index, plan: ops.Plan):
        """``x: [B, T, D]`` written at positions ``index .. index+T-1`` of the preallocated cache
        (in its own layout). ``plan`` masks cache slots beyond the written ones and carries
        ``q_offset = index``. Returns the output and the updated cache."""
        kv = cache.write(self.project_kv(x), index)
        y = ops.attention(self.project_q(x), kv.astype(self.dtype), self._plan(plan))
        return self.project_out(y), kv


class CrossAttention(_Attention):
    """Decoder-to-encoder attention: no position bias (T5 §2.1), keys masked by encoder padding."""

    def __call__(self, x, encoded, plan: ops.Plan, kv: Optional[KV] = None):
        """``kv``: keys/values of ``encoded`` computed once (decoding); else computed here.

        ``x`` may hold ``g`` consecutive rows per encoder row (beams, or several samples of
        one input): they attend as ``g·T`` query rows of that encoder row, so the cross K/V are
        stored and read once per input rather than once per beam. ``kv`` may be in either
        layout (a decoding cache's).
        """
        if kv is None:
            kv = self.project_kv(encoded)
        q = self.project_q(x)
        R, T, N, H = q.shape
        B = kv.k.shape[0]
        if R % B:
            raise ValueError(f"{R} decoder rows do not group over {B} encoder rows")
        y = ops.attention(q.reshape(B, (R // B) * T, N, H), kv.astype(self.dtype), plan)
        return self.project_out(y.reshape(R, T, N, H))
