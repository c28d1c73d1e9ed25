"""Building blocks: parameters with logical axes, RMSNorm, T5 MLPs, the embedding.

Every parameter carries logical axis names (``('embed', 'mlp')``); ``jt5/sharding.py`` is the one
place that maps them to mesh axes. Parameters are created mesh-independent
(``eager_sharding=False``); the sharding table places them when a mesh is used.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jt5 import quant
from jt5.config import T5Config
from jt5.sharding import constrain, is_sharded


def param(rngs: nnx.Rngs, shape, axes, *, std: float | None, dtype) -> nnx.Param:
    """A parameter of ``shape`` with logical ``axes``; normal(std) init, or ones if std is None."""
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class QuantizedWeight(nnx.Module):
    """A matmul weight stored as int8 / float8_e4m3fn (``qweight``, the float weight's shape and
    logical axes) with one float32 ``scale`` per output channel (its trailing ``n_out`` axes):
    ``w = qweight * scale`` (``jt5/quant.py``); with ``group_size``, one per ``group_size``
    consecutive (flattened) contraction inputs of each channel, ``scale [K / G, O...]``. The
    group axis takes the logical axis of the weight's first contraction axis: on a mesh it is
    split as the weight's rows are (the same rows per shard), or replicated where the mesh does
    not divide it (``jt5.sharding.logical_to_spec``)."""

    def __init__(self, w, axes, kind: str, fmt: str, int8_compute: bool = False,
                 group_size: int | None = None):
        self.int8_compute = int8_compute  # static: the product's kind, not a parameter
        self.group_size = None if kind == "embedding" else group_size  # static; embedding: rows
        q, s = quant.quantize_as(kind, w, fmt, xp=jnp, group=self.group_size)
        scale_axes = axes[:1] if kind == "embedding" else axes[-quant.out_ndim(kind):]
        if self.group_size is not None:
            scale_axes = (axes[0],) + tuple(scale_axes)
        self.qweight = nnx.Param(q, out_sharding=tuple(axes), eager_sharding=False)
        self.scale = nnx.Param(s, out_sharding=tuple(scale_axes), eager_sharding=False)


def weight(rngs: nnx.Rngs, shape, axes, *, std: float, config: T5Config, kind: str):
    """A projection's weight (``param``), quantised when ``config`` quantises layers of ``kind``
    (``config.QUANT_KINDS``)."""
    p = param(rngs, shape, axes, std=std, dtype=jnp.dtype(config.param_dtype))
    if kind not in config.quantized_kinds:
        return p
    return QuantizedWeight(p[...], axes, kind, config.weights, int8_compute=config.int8_compute,
                           group_size=config.quant_group_size)


def _projection(eq: str):
    """``(n_lead, n_contracted, w_contracted_first)`` when ``eq`` is a projection ``'LC,CO->LO'``
    or ``'LC,OC->LO'`` (``x``'s leading axes kept, its trailing ones contracted with ``w``'s
    leading / trailing ones in the same order), else None."""
    ins, out = eq.split("->")
    xs, ws = ins.split(",")
    lead = "".join(a for a in xs if a not in ws)
    contracted, wout = xs[len(lead):], "".join(a for a in ws if a not in xs)
    if not (lead and contracted and wout) or xs != lead + contracted or out != lead + wout:
        return None
    if ws in (contracted + wout, wout + contracted):
        return len(lead), len(contracted), ws == contracted + wout
    return None


def einsum(eq: str, x, w, *, preferred_element_type=None):
    """``jnp.einsum(eq, x, w)``, as ONE 2-D matmul (a free reshape of each side) when ``eq`` is a
    projection (``_projection``; all of the model's are). Differentiating the N-D einsum,
    XLA:CPU writes the ``[B, T, F]`` cotangent transposed, element by element, for the weight
    gradient (``[8, 128, 1024]``: 28 ms per layer of a 1.5 s t5-v1_1-small train step); the 2-D
    form needs no copy (a gated MLP's forward + backward at t5-small shapes: 70 -> 35 ms on a
    2-core CPU). The products, their accumulation and dtypes are the same."""
    form = _projection(eq)
    if form is None:
        return jnp.einsum(eq, x, w, preferred_element_type=preferred_element_type)
    n_lead, n_contracted, w_first = form
    lead, contracted = x.shape[:n_lead], x.shape[n_lead:]
    k = math.prod(contracted)
    w_out = w.shape[n_contracted:] if w_first else w.shape[:w.ndim - n_contracted]
    w2 = w.reshape(k, -1) if w_first else w.reshape(-1, k)
    y = jax.lax.dot_general(x.reshape(math.prod(lead), k), w2,
                            (((1,), (0 if w_first else 1,)), ((), ())),
                            preferred_element_type=preferred_element_type)
    return y.reshape(lead + w_out)


def matmul(eq: str, x, w, *, dtype, out_dtype=None):
    """``einsum(eq, x, w)`` with matmul inputs in ``dtype``, the result in ``out_dtype`` (default:
    ``dtype``). A ``QuantizedWeight`` enters the product converted to ``dtype`` (exact: int8 and
    e4m3 values fit bf16's mantissa), the float32 product is scaled per output channel (the
    trailing axes of ``eq``'s output are the weight's outputs) and rounded once.

    With ``int8_compute`` (``T5Config.int8_compute``) an int8 weight meets int8 activations
    instead: each row of ``x`` (its leading two axes are batch and length, the rest are
    contracted) is quantised by its own absmax / 127, the product is int8 x int8 -> int32 and
    both scales apply after (CTranslate2's int8 scheme: 2-4x faster dots than float32 on a
    CPU, at the cost of the activations' rounding).

    With group-wise scales (``QuantizedWeight.group_size``) the weight is dequantised first:
    ``qweight [K, O]`` (its contraction axes, which lead, flattened) as ``[K / G, G, O]`` times
    ``scale [K / G, 1, O]`` in float32, rounded once to ``dtype`` (XLA fuses it into the
    weight's conversion), then one product with no scale after."""
    x = x.astype(dtype)
    if isinstance(w, QuantizedWeight) and w.int8_compute:
        xf = x.astype(jnp.float32)
        sx = jnp.max(jnp.abs(xf), axis=tuple(range(2, x.ndim)), keepdims=True) / 127.0
        sx = jnp.where(sx > 0, sx, 1.0)                                   # [B, T, 1...]
        xq = jnp.round(xf / sx).astype(jnp.int8)
        y = einsum(eq, xq, w.qweight[...], preferred_element_type=jnp.int32)
        sx = sx.reshape(sx.shape[:2] + (1,) * (y.ndim - 2))
        return (y.astype(jnp.float32) * sx * w.scale[...]).astype(out_dtype or dtype)
    if isinstance(w, QuantizedWeight) and w.group_size is not None:
        q, s = w.qweight[...], w.scale[...]
        kg, o = s.shape[0], math.prod(s.shape[1:])
        wd = (q.reshape(kg, -1, o).astype(jnp.float32) * s.reshape(kg, 1, o)).reshape(q.shape)
        y = einsum(eq, x, wd.astype(dtype), preferred_element_type=jnp.float32)
        return y.astype(out_dtype or dtype)
    if isinstance(w, QuantizedWeight):
        y = einsum(eq, x, w.qweight[...].astype(dtype), preferred_element_type=jnp.float32)
        return (y * w.scale[...]).astype(out_dtype or dtype)
    # Accumulate in float32 and round once, also when the result is bf16: the same numerics as
    # a bf16-output dot, and XLA:CPU runs bf16 x bf16 -> f32 on its fast (oneDNN / AMX) path but
    # bf16 -> bf16 on a generic loop (4.3x slower for a [512, 4096] x [4096, 4096] product).
    y = einsum(eq, x, w[...].astype(dtype), preferred_element_type=jnp.float32)
    return y.astype(out_dtype or dtype)


def compute_dtype(config: T5Config):
    return jnp.dtype(config.dtype)


def residual_dtype(config: T5Config):
    """The dtype of the residual stream between sublayers (``config.residual_dtype``; default
    float32 whatever the compute dtype).

    float16: T5 checkpoints overflow it (activations in the residual stream exceed 65504 in
    T5 v1.1 / Flan-T5 xl+, cf. transformers issue #20287). bfloat16 has float32's range but 8
    bits of mantissa: each of the 2 x layers residual additions rounds the whole stream again,
    and that, more than the matmuls, is what separates a bf16 run from float32
    (benchmarks/bf16_accuracy.py; nai-t5 keeps its residual in float32 for the same reason).
    The output projections (attention ``o``, MLP ``wo``) produce the residual dtype directly, so
    no intermediate that can be large is stored in low precision; matmul inputs stay low.
    """
    return jnp.dtype(config.residual_dtype or jnp.float32)


def dropout(x, rate: float, rngs: nnx.Rngs | None, deterministic: bool):
    if deterministic or rate == 0.0:
        return x
    if rngs is None:
        raise ValueError("dropout_rate > 0 in training needs rngs (pass rngs=nnx.Rngs(dropout=...))")
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class RMSNorm(nnx.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias (Zhang & Sennrich 2019).

    Computed in float32 whatever the input dtype, the scale included, and cast to the compute
    dtype once (transformers casts before the scale: one more rounding in bf16/fp16).
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.eps = config.layer_norm_epsilon
        self.dtype = compute_dtype(config)
        self.scale = param(rngs, (config.d_model,), ("embed",), std=None,
                           dtype=jnp.dtype(config.param_dtype))

    def __call__(self, x):  # [..., D]
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        return y.astype(self.dtype)


_ACT = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


class MLP(nnx.Module):
    """``wo(act(wi x))`` (T5 v1.0) or ``wo(act(wi_0 x) * wi_1 x)`` (gated, T5 v1.1 §GLU variants)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        D, F = config.d_model, config.d_ff
        f = config.initializer_factor
        self.gated = config.is_gated
        self.act = _ACT[config.activation]
        self.dtype = compute_dtype(config)
        self.out_dtype = residual_dtype(config)
        self.rate = config.dropout_rate
        w_in = dict(std=f * D**-0.5, config=config, kind="mlp_in")
        if self.gated:
            self.wi_0 = weight(rngs, (D, F), ("embed", "mlp"), **w_in)
            self.wi_1 = weight(rngs, (D, F), ("embed", "mlp"), **w_in)
        else:
            self.wi = weight(rngs, (D, F), ("embed", "mlp"), **w_in)
        self.wo = weight(rngs, (F, D), ("mlp", "embed"), std=f * F**-0.5, config=config,
                         kind="mlp_out")

    def __call__(self, x, *, rngs=None, deterministic=True):  # [B,T,D] -> [B,T,D]
        dt = self.dtype

        def up(w):  # the activation and the gate product in float32, one rounding to dt after
            return matmul("BTD,DF->BTF", x, w, dtype=dt, out_dtype=jnp.float32)

        if self.gated:
            h = self.act(up(self.wi_0)) * up(self.wi_1)
        else:
            h = self.act(up(self.wi))
        h = constrain(h.astype(dt), ("batch", "length", "act_mlp"))
        h = dropout(h, self.rate, rngs, deterministic)
        return matmul("BTF,FD->BTD", h, self.wo, dtype=dt, out_dtype=self.out_dtype)


class Embed(nnx.Module):
    """The shared token embedding ``[V, D]``; also the output head when the head is tied.

    Quantised only when asked (layer kind ``embedding``): int8 / fp8 rows with one scale per
    row, which is also the tied head's scale per output (``head``)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.one_hot = config.one_hot_embedding
        self.dtype = compute_dtype(config)
        self.embedding = weight(rngs, (config.vocab_size, config.d_model), ("vocab", "embed"),
                                std=config.initializer_factor * 1.0, config=config,
                                kind="embedding")

    def __call__(self, ids):  # [B,T] -> [B,T,D]
        e = self.embedding
        quantized = isinstance(e, QuantizedWeight)
        table = e.qweight[...] if quantized else e[...]
        if self.one_hot or is_sharded("vocab"):
            # A gather from a vocab-sharded table makes XLA rematerialise the whole table on
            # every device; a one-hot matmul keeps it sharded and runs on the matrix units.
            oh = jax.nn.one_hot(ids, table.shape[0], dtype=self.dtype)
            if quantized:  # each one-hot row carries its table row's scale
                oh = (oh * e.scale[...]).astype(self.dtype)
            return einsum("BTV,VD->BTD", oh, table.astype(self.dtype))
        # Gathered over fsdp first, as every weight is before use: from an embed-split table
        # the gather's gradient (a scatter-add) would need the [B, T, D] cotangent embed-split,
        # and XLA reshards it from batch-split by replication (jt5 plan: an XXL train step).
        table = constrain(table, ("vocab", None))
        rows = jnp.take(table, ids, axis=0)
        if quantized:
            rows = rows.astype(jnp.float32) * jnp.take(e.scale[...], ids, axis=0)[..., None]
        return rows.astype(self.dtype)

    def head(self, x):
        """The tied head: ``x [B,T,D]`` -> float32 logits ``[B,T,V]``."""
        if isinstance(self.embedding, QuantizedWeight):
            return matmul("BTD,VD->BTV", x, self.embedding, dtype=x.dtype, out_dtype=jnp.float32)
        return lm_logits(x, self.embedding[...], transposed=True)


def lm_logits(x, table, *, transposed: bool):
    """Head projection ``[B,T,D] -> [B,T,V]`` in float32 (softmax and the loss need it)."""
    eq = "BTD,VD->BTV" if transposed else "BTD,DV->BTV"
    return einsum(eq, x, table.astype(x.dtype), preferred_element_type=jnp.float32)


def init_std_attention(config: T5Config):
    """transformers' ``T5PreTrainedModel._init_weights`` stds for q, k/v, o (q folds 1/sqrt(d_kv))."""
    f, D, H, N = config.initializer_factor, config.d_model, config.d_kv, config.num_heads
    return f * (D * H) ** -0.5, f * D**-0.5, f * (N * H) ** -0.5

