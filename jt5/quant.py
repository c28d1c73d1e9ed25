"""Weight-only quantisation: int8 and fp8 (e4m3) matmul weights, one float32 scale per output
channel, or per group of ``G`` contraction inputs of each output channel
(``T5Config.quant_group_size``).

    model = jt5.T5EncoderModel.from_pretrained(path, weights="int8")   # quantised as it loads
    model.save_pretrained("out")      # int8 tensors + ``<key>.weight_scale``; reloads quantised

A weight ``w`` whose trailing axes are its outputs (jt5 stores every projection input-first:
``wi [D, F]``, ``wo [F, D]``, ``q/k/v [D, N, H]``, ``o [N, H, D]``) becomes
``qweight = round(w / scale)`` with ``scale = max|w| / qmax`` over the contraction axes, so
``x @ w == (x @ qweight) * scale`` up to the rounding of ``qweight`` alone. The matmul runs in the
compute dtype on the converted ``qweight`` (int8 and e4m3 values are exact in bfloat16) and the
scale multiplies the float32 product (``jt5.layers.matmul``). Which layer kinds are quantised is
``T5Config.quantized`` (``config.QUANT_KINDS``); norms, embeddings and the relative-bias tables
are never quantised.

Group-wise scales (``quant_group_size=G``, as AWQ / GPTQ / bitsandbytes do): the contraction
axes are flattened in order (``o [N, H, D]``: ``k = n * H + h``) and each run of ``G``
consecutive inputs ``k`` of an output channel gets its own absmax scale, so a weight
``[K..., O...]`` has a float32 ``scale [prod(K) / G, O...]`` (``wi [D, F]``: ``[D/G, F]``;
``q [D, N, H]``: ``[D/G, N, H]``; ``o [N, H, D]``: ``[N*H/G, D]``):
``w[k, o] = qweight[k, o] * scale[k // G, o]``. The max over 128 Gaussian inputs is ~2.6 sigma
against ~3.5 sigma over 4096, so the rounding step, and its noise, is ~26% smaller, for 4 / G
bytes of scale per weight (3% at G = 128). ``jt5.layers.matmul`` multiplies the scales into the
weight in float32 and rounds it once to the compute dtype before the product (no post-product
scale). Saved, ``<key>.weight_scale`` is ``[out, in / G]`` in transformers' layout (``weight``
is ``[out, in]``): ``weight[o, i] * weight_scale[o, i // G]``, and ``config.json``'s
``quantization_config`` records ``group_size``. The embedding (kind ``embedding``, also the tied
head) always keeps one scale per row; ``int8_compute`` needs per-channel scales.

This module knows arrays and names only (the bridge imports it): no model code.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import numpy as np

from jt5.config import QUANT_KINDS, T5Config

# format -> (storage dtype name, largest representable magnitude)
FORMATS = {"int8": ("int8", 127.0), "fp8": ("float8_e4m3fn", 448.0)}
QWEIGHT, SCALE = "qweight", "scale"   # the two parameters of a quantised weight (jt5 paths)
HF_SCALE_SUFFIX = "_scale"            # transformers key: "<...>.weight" + "_scale"
QUANT_METHOD = "jt5"                  # config.json quantization_config.quant_method


def storage_dtype(fmt: str):
    import ml_dtypes
    name = FORMATS[fmt][0]
    return np.dtype(name) if name == "int8" else np.dtype(getattr(ml_dtypes, name))


def format_of(dtype) -> Optional[str]:
    """``"int8"`` / ``"fp8"`` for a storage dtype, None for anything else."""
    name = np.dtype(dtype).name
    return next((f for f, (n, _) in FORMATS.items() if n == name), None)


def layer_kind(path: tuple) -> Optional[str]:
    """The ``QUANT_KINDS`` entry of a jt5 parameter path, or None (never quantised)."""
    if tuple(path) == ("shared", "embedding"):
        return "embedding"
    last = path[-1] if path else None
    parent = path[-2] if len(path) > 1 else None
    if parent == "mlp":
        return "mlp_in" if last in ("wi", "wi_0", "wi_1") else "mlp_out" if last == "wo" else None
    if parent in ("self_attn", "cross_attn"):
        return "attn_qkv" if last in ("q", "k", "v") else "attn_out" if last == "o" else None
    return None


def out_ndim(kind: str) -> int:
    """How many trailing axes are output channels (q/k/v: heads and head dim). The embedding
    ``[V, D]`` is the one weight whose channels lead: one scale per vocabulary row, which is
    also the tied head's output channel."""
    assert kind in QUANT_KINDS, kind
    return 2 if kind == "attn_qkv" else 1


def contraction_size(kind: str, shape: tuple) -> int:
    """The flattened contraction size of a ``kind`` weight of ``shape`` (not the embedding)."""
    return int(np.prod(shape[:len(shape) - out_ndim(kind)]))


def scale_shape(kind: str, shape: tuple, group: Optional[int] = None) -> tuple:
    """The scale of a ``kind`` weight of ``shape``: per output channel, or ``[K / group, O...]``
    (the embedding keeps its per-row scales whatever ``group``)."""
    if kind == "embedding":
        return tuple(shape[:1])
    out = tuple(shape[-out_ndim(kind):])
    if group is None:
        return out
    return (contraction_size(kind, shape) // group,) + out


def group_of(kind: str, shape: tuple, sshape: tuple) -> Optional[int]:
    """The group size that a scale of shape ``sshape`` means for a ``kind`` weight of ``shape``
    (None: per output channel)."""
    if kind is None or tuple(sshape) == scale_shape(kind, shape):
        return None
    k = contraction_size(kind, shape) if kind != "embedding" else 0
    if (kind == "embedding" or len(sshape) != out_ndim(kind) + 1 or not sshape[0]
            or k % sshape[0] or tuple(sshape[1:]) != scale_shape(kind, shape)):
        raise ValueError(f"a scale of shape {list(sshape)} fits no grouping of a {kind} weight "
                         f"of shape {list(shape)}")
    return k // sshape[0]


def quantize_as(kind: str, w, fmt: str, xp=np, group: Optional[int] = None):
    """``quantize`` with ``kind``'s channel axes (rows of the embedding, trailing otherwise);
    ``group``: group-wise scales (ignored for the embedding: per-row)."""
    if kind == "embedding":
        q, s = quantize(xp.asarray(w).T, 1, fmt, xp)
        return q.T, s
    return quantize(w, out_ndim(kind), fmt, xp, group=group)


def quantize(w, n_out: int, fmt: str, xp=np, group: Optional[int] = None):
    """``w`` (any float dtype, output axes last) -> (qweight, float32 scale of ``w.shape[-n_out:]``,
    or ``[K / group] + w.shape[-n_out:]`` with ``group``: the ``K`` leading axes flattened).

    ``xp``: ``numpy`` (loading) or ``jax.numpy`` (random init, traced). A channel (group) of
    zeros gets scale 1 (its qweight is 0 either way)."""
    dtype, qmax = storage_dtype(fmt), FORMATS[fmt][1]
    w = xp.asarray(w).astype(xp.float32)
    shape = w.shape
    if group is not None:
        k = int(np.prod(shape[:w.ndim - n_out]))
        if k % group:
            raise ValueError(f"a weight of shape {list(shape)} contracts {k} inputs, not a "
                             f"multiple of quant_group_size={group}")
        w = w.reshape((k // group, group) + tuple(shape[w.ndim - n_out:]))
        axes = (1,)
    else:
        axes = tuple(range(w.ndim - n_out))
    amax = xp.max(xp.abs(w), axis=axes, keepdims=group is not None)
    scale = xp.where(amax > 0, amax / qmax, 1.0).astype(xp.float32)
    q = xp.clip(w / scale, -qmax, qmax)
    if fmt == "int8":
        q = xp.round(q)
    if group is not None:
        q, scale = q.reshape(shape), scale.reshape(scale.shape[:1] + scale.shape[2:])
    return q.astype(dtype), scale


def dequantize(qweight, scale, kind: Optional[str] = None) -> np.ndarray:
    """float32 ``qweight * scale``: the scale over the trailing axes, or the leading one (the
    embedding's rows) when that is what its shape matches; with ``kind``, a group-wise scale
    (``group_of``) too."""
    q, s = np.asarray(qweight).astype(np.float32), np.asarray(scale, np.float32)
    group = group_of(kind, q.shape, s.shape) if kind is not None else None
    if group is not None:
        return (q.reshape((s.shape[0], group) + s.shape[1:]) * s[:, None]).reshape(q.shape)
    if s.shape != q.shape[q.ndim - s.ndim:]:
        s = s.reshape(s.shape + (1,) * (q.ndim - s.ndim))
    return q * s


def _scales(group) -> str:
    return "per-channel" if group is None else f"quant_group_size={group}"


def adapt(pairs: Iterable, want: dict, source: str) -> Iterator[tuple]:
    """Stored ``(jt5 path, array)`` pairs -> the pairs the model ``want``s
    (``{path: abstract value with .dtype}``): a float weight the model holds quantised is
    quantised here (one tensor at a time), a stored quantised weight the model holds in float is
    dequantised (once its scale has come too). Anything else passes through."""
    pending: dict[tuple, dict] = {}
    for path, arr in pairs:
        if path in want:
            name = '/'.join(map(str, path[:-1]))
            if path[-1] == QWEIGHT:
                have, need = format_of(arr.dtype), format_of(want[path].dtype)
                if have != need:
                    raise ValueError(
                        f"{source}: {name} is stored as {have}; loading "
                        f"it as {need} would round it twice. Load the float checkpoint instead")
            elif path[-1] == SCALE and path[:-1] + (QWEIGHT,) in want:
                kind, wshape = layer_kind(path[:-1]), want[path[:-1] + (QWEIGHT,)].shape
                have = group_of(kind, wshape, np.shape(arr))
                need = group_of(kind, wshape, want[path].shape)
                if have != need:
                    raise ValueError(
                        f"{source}: {name} is stored with {_scales(have)} scales; loading it "
                        f"with {_scales(need)} scales would round it twice. Load it as stored "
                        f"({_scales(have)}), or load the float checkpoint")
            yield path, arr
            continue
        if path + (QWEIGHT,) in want:
            fmt = format_of(want[path + (QWEIGHT,)].dtype)
            kind, wshape = layer_kind(path), want[path + (QWEIGHT,)].shape
            group = group_of(kind, wshape, want[path + (SCALE,)].shape)
            q, s = quantize_as(kind, arr, fmt, group=group)
            yield path + (QWEIGHT,), q
            yield path + (SCALE,), s
            continue
        if path[-1] in (QWEIGHT, SCALE) and path[:-1] in want:
            got = pending.setdefault(path[:-1], {})
            got[path[-1]] = arr
            if len(got) == 2:
                yield path[:-1], dequantize(got[QWEIGHT], got[SCALE], layer_kind(path[:-1]))
                del pending[path[:-1]]
            continue
        yield path, arr  # the caller reports a path the model does not have
    if pending:
        raise ValueError(f"{source}: quantised weights without their scale or values: "
                         f"{sorted('/'.join(map(str, p)) for p in pending)[:5]}")


def quantization_config(config: T5Config) -> dict:
    """What ``config.json`` records of a quantised model ({} for a float one)."""
    if config.weights == "float":
        return {}
    q = {"quant_method": QUANT_METHOD, "weights": config.weights,
         "layers": list(config.quantized_kinds)}
    if config.quant_group_size is not None:
        q["group_size"] = int(config.quant_group_size)
    return {"quantization_config": q}


def fields_from_hf(raw: dict) -> dict:
    """T5Config fields from ``config.json``'s ``quantization_config`` (jt5's own only)."""
    q = raw.get("quantization_config")
    if not q:
        return {}
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise ValueError(f"quantization_config with quant_method {method!r} is not "
                         f"jt5's ({QUANT_METHOD!r}); load the float checkpoint and pass "
                         f"weights='int8' or 'fp8' to quantise it")
    out = {"weights": str(q.get("weights")), "quantized": tuple(q.get("layers") or ())}
    if q.get("group_size") is not None:
        out["quant_group_size"] = q["group_size"]
    return out


def weight_bytes(model) -> int:
    """Bytes of a model's parameters as stored (quantised weights and their scales included)."""
    import jax
    from flax import nnx
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
