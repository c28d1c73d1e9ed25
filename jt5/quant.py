"""Weight-only quantisation: int8 and fp8 (e4m3) matmul weights, one float32 scale per output
channel.

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


def scale_shape(kind: str, shape: tuple) -> tuple:
    return tuple(shape[:1]) if kind == "embedding" else tuple(shape[-out_ndim(kind):])


def quantize_as(kind: str, w, fmt: str, xp=np):
    """``quantize`` with ``kind``'s channel axes (rows of the embedding, trailing otherwise)."""
    if kind == "embedding":
        q, s = quantize(xp.asarray(w).T, 1, fmt, xp)
        return q.T, s
    return quantize(w, out_ndim(kind), fmt, xp)


def quantize(w, n_out: int, fmt: str, xp=np):
    """``w`` (any float dtype, output axes last) -> (qweight, float32 scale of ``w.shape[-n_out:]``).

    ``xp``: ``numpy`` (loading) or ``jax.numpy`` (random init, traced). A channel of zeros gets
    scale 1 (its qweight is 0 either way)."""
    dtype, qmax = storage_dtype(fmt), FORMATS[fmt][1]
    w = xp.asarray(w).astype(xp.float32)
    axes = tuple(range(w.ndim - n_out))
    amax = xp.max(xp.abs(w), axis=axes)
    scale = xp.where(amax > 0, amax / qmax, 1.0).astype(xp.float32)
    q = xp.clip(w / scale, -qmax, qmax)
    if fmt == "int8":
        q = xp.round(q)
    return q.astype(dtype), scale


def dequantize(qweight, scale) -> np.ndarray:
    """float32 ``qweight * scale``: the scale over the trailing axes, or the leading one (the
    embedding's rows) when that is what its shape matches."""
    q, s = np.asarray(qweight).astype(np.float32), np.asarray(scale, np.float32)
    if s.shape != q.shape[q.ndim - s.ndim:]:
        s = s.reshape(s.shape + (1,) * (q.ndim - s.ndim))
    return q * s


def adapt(pairs: Iterable, want: dict, source: str) -> Iterator[tuple]:
    """Stored ``(jt5 path, array)`` pairs -> the pairs the model ``want``s
    (``{path: abstract value with .dtype}``): a float weight the model holds quantised is
    quantised here (one tensor at a time), a stored quantised weight the model holds in float is
    dequantised (once its scale has come too). Anything else passes through."""
    pending: dict[tuple, dict] = {}
    for path, arr in pairs:
        if path in want:
            if path[-1] == QWEIGHT:
                have, need = format_of(arr.dtype), format_of(want[path].dtype)
                if have != need:
                    raise ValueError(
                        f"{source}: {'/'.join(map(str, path[:-1]))} is stored as {have}; loading "
                        f"it as {need} would round it twice. Load the float checkpoint instead")
            yield path, arr
            continue
        if path + (QWEIGHT,) in want:
            fmt = format_of(want[path + (QWEIGHT,)].dtype)
            q, s = quantize_as(layer_kind(path), arr, fmt)
            yield path + (QWEIGHT,), q
            yield path + (SCALE,), s
            continue
        if path[-1] in (QWEIGHT, SCALE) and path[:-1] in want:
            got = pending.setdefault(path[:-1], {})
            got[path[-1]] = arr
            if len(got) == 2:
                yield path[:-1], dequantize(got[QWEIGHT], got[SCALE])
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
    return {"quantization_config": {"quant_method": QUANT_METHOD, "weights": config.weights,
                                    "layers": list(config.quantized_kinds)}}


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
    return {"weights": str(q.get("weights")), "quantized": tuple(q.get("layers") or ())}


def weight_bytes(model) -> int:
    """Bytes of a model's parameters as stored (quantised weights and their scales included)."""
    import jax
    from flax import nnx
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
