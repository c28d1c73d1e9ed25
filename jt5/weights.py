"""Models from stored tensors and back: where jt5 assembles what the bridge reads.

The bridge (``jt5.bridge``) knows files and names: it yields ``(config, (path, array) pairs)``
from a transformers directory, converts the other way, and reads/writes jt5's orbax checkpoint
layout; it never imports the model. This module builds NNX models from those tensors (shape
checks, dtype casts, placement on a mesh) and gathers a model's parameters for writing. It takes
the model class as an argument, so it does not import ``jt5.model`` either (``jt5.model`` calls
it from ``from_pretrained`` / ``save_pretrained``).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jt5 import quant
from jt5.bridge import hf, keymap, native
from jt5.config import T5Config


def abstract_model(config: T5Config, cls):
    """``cls``'s structure with ShapeDtypeStructs instead of arrays (no memory allocated)."""
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def is_encoder_only(cls) -> bool:
    return getattr(cls, "encoder_only", False)


def head_of(cls):
    """The task head a model class carries (``jt5.bridge.keymap.HEADS`` key), or None."""
    return getattr(cls, "task_head", None)


def config_with(config: T5Config, *, dtype=None, param_dtype=None, attention=None,
                **overrides) -> T5Config:
    """The stored config with what the caller asks instead. ``dtype`` sets the compute dtype and,
    unless ``param_dtype`` is given, the parameter dtype; ``None`` (anywhere) keeps what is
    stored."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("weights") == "float":  # a quantised checkpoint read as float: no groups
        overrides.setdefault("quant_group_size", None)
    if dtype is not None:
        overrides.update(dtype=dtype, param_dtype=param_dtype or dtype)
    elif param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    if attention is not None:
        overrides["attention"] = attention
    return config.replace(**overrides)


def restore_targets(abstract, shardings: Optional[Callable], dtype=None):
    """The model's parameters as a pure dict of ShapeDtypeStructs placed by ``shardings``
    (``abstract_state -> shardings``; default: the first local device), in ``dtype`` if given —
    what orbax restores into."""
    want = nnx.to_pure_dict(abstract)
    if shardings is not None:
        placed = shardings(abstract)
        placed = nnx.to_pure_dict(placed) if isinstance(placed, nnx.State) else placed
    else:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        placed = jax.tree.map(lambda _: one, want)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(
        a.shape, a.dtype if dtype is None else dtype, sharding=s), want, placed)


def fill(graphdef, abstract, restored):
    """Merge ``restored`` arrays (cast to the model's parameter dtypes) into the model."""
    want = nnx.to_pure_dict(abstract)
    nnx.replace_by_pure_dict(abstract, jax.tree.map(lambda a, t: a.astype(t.dtype), restored,
                                                    want))
    return nnx.merge(graphdef, abstract)


def load_hf(path, cls, *, dtype: str | None = None, attention: str | None = None,
            param_dtype: str | None = None, shardings=None, progress: bool = False,
            **config_overrides):
    """Build ``cls`` (a jt5 model class) from a transformers directory.

    ``shardings``: optional ``abstract_state -> shardings`` placing parameters on a mesh as they
    are read. Tensors are read, converted and placed one at a time."""
    raw = hf.read_config(path)
    encoder_only, head = is_encoder_only(cls), head_of(cls)
    config, pairs = hf.iter_hf_to_jt5(hf.StateDict(path), raw, encoder_only=encoder_only,
                                      head=head, source=str(path))
    config = config_with(config, dtype=dtype, param_dtype=param_dtype, attention=attention,
                         **config_overrides)
    graphdef, abstract = nnx.split(abstract_model(config, cls))
    flat = dict(nnx.to_flat_state(abstract))
    placement = None if shardings is None else dict(nnx.to_flat_state(shardings(abstract)))
    # Quantised as they stream in (or dequantised, for a quantised file loaded as float).
    pairs = quant.adapt(pairs, {p: v.get_value() for p, v in flat.items()}, str(path))
    if progress:
        from tqdm import tqdm
        pairs = tqdm(pairs, total=len(keymap.rules(config, encoder_only=encoder_only, head=head)),
                     desc=f"loading {Path(path).name}", unit="tensor")
    filled = set()
    for p, w in pairs:
        var = flat.get(p)
        if var is None:
            raise hf.CheckpointError(f"keymap produced {p}, which the jt5 model does not have")
        arr = np.asarray(w).astype(var.get_value().dtype)  # param_dtype; int8/fp8 + f32 scales
        if arr.shape != tuple(var.shape):  # e.g. a head asked for another num_labels
            raise hf.CheckpointError(f"{path}: {'/'.join(map(str, p))} is {arr.shape} in the "
                                     f"checkpoint but the model asks for {tuple(var.shape)}")
        sharding = placement[p] if placement is not None else None
        var.set_value(jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr))
        filled.add(p)
    unfilled = [p for p in flat if p not in filled]
    if head is not None and unfilled:
        _init_head(cls, config, flat, unfilled, placement, str(path))
        unfilled = []
    if unfilled:
        raise hf.CheckpointError(f"{path}: jt5 parameters left without a source tensor: "
                                 f"{unfilled[:5]}")
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if hasattr(model, "generation_config"):  # the checkpoint's generation defaults
        from jt5.generation_config import read_generation_config
        model.generation_config = read_generation_config(path, raw)
    return model


def _init_head(cls, config: T5Config, flat: dict, unfilled: list, placement, source: str):
    """A head the checkpoint lacks (a base T5 loaded into a head) starts from its initialiser;
    a warning names the new parameters, as transformers' ``from_pretrained`` does."""
    fresh = cls.init_head(config)  # {path: array}: the head's own parameters only
    if set(unfilled) != set(fresh):
        raise hf.CheckpointError(f"{source}: jt5 parameters left without a source tensor: "
                                 f"{sorted(set(unfilled) - set(fresh))[:5]}")
    names = {r.jt5: r.hf for r in keymap.head_rules(config, head_of(cls))}
    for p in unfilled:
        arr = np.asarray(fresh[p]).astype(jnp.dtype(config.param_dtype))
        sharding = placement[p] if placement is not None else None
        flat[p].set_value(jax.device_put(arr, sharding) if sharding is not None
                          else jnp.asarray(arr))
    warnings.warn(f"Some weights of {cls.__name__} were not initialized from the checkpoint at "
                  f"{source} and are newly initialized: {sorted(names[p] for p in unfilled)}. "
                  "Train the model on a downstream task before using it for predictions.",
                  stacklevel=3)


def as_head(model, cls, *, shardings=None, source: str = "", **config_overrides):
    """``model`` (any jt5 model, e.g. a pretrained T5ForConditionalGeneration) as the task head
    class ``cls``: its shared/encoder/decoder parameters, the head's own freshly initialised
    (with the warning ``load_hf`` gives). ``config_overrides``: the head's fields (labels...)."""
    config = config_with(model.config, **config_overrides)
    graphdef, abstract = nnx.split(abstract_model(config, cls))
    flat = dict(nnx.to_flat_state(abstract))
    placement = None if shardings is None else dict(nnx.to_flat_state(shardings(abstract)))
    have = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    unfilled = []
    for p, var in flat.items():
        if p not in have:
            unfilled.append(p)
            continue
        value = have[p].get_value()
        if tuple(value.shape) != tuple(var.shape):
            raise hf.CheckpointError(f"{source}: {'/'.join(map(str, p))} is {tuple(value.shape)} "
                                     f"in the checkpoint but the model asks for {tuple(var.shape)}")
        var.set_value(value)
    if unfilled:
        _init_head(cls, config, flat, unfilled, placement, source or type(model).__name__)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_params(model, *, progress: bool = False) -> dict:
    """``{jt5 path: np.ndarray}`` of a model's parameters (gathered to this host)."""
    from jax.experimental import multihost_utils

    out = {}
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    if progress:
        from tqdm import tqdm
        flat = tqdm(flat, desc="gathering parameters", unit="tensor")
    for p, v in flat:
        a = v.get_value()
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            a = multihost_utils.process_allgather(a, tiled=True)
        out[p] = np.asarray(jax.device_get(a))
    return out


def save_hf(model, path, *, max_shard_size="5GB", progress: bool = False,
            extra_files: Mapping | None = None):
    """Write a directory transformers' ``from_pretrained`` loads as is. ``extra_files``: as for
    ``jt5.bridge.hf.write_hf_dir`` (e.g. ``jt5.tokenizer.tokenizer_files(...)``)."""
    sd, cfg = hf.jt5_to_hf(model.config, model_params(model, progress=progress),
                           encoder_only=is_encoder_only(type(model)), head=head_of(type(model)))
    extra = dict(extra_files or {})
    if hasattr(model, "generation_config"):  # transformers' save_pretrained writes it too
        from jt5.generation_config import FILE, generation_config_file
        extra.setdefault(FILE, generation_config_file(model.generation_config, model.config))
    hf.write_hf_dir(path, sd, cfg, max_shard_size=max_shard_size, extra_files=extra)


def save_native(model, path, *, extra_files=None):
    """``model`` as a jt5 checkpoint (``jt5.bridge.native``) at ``path``."""
    native.write_checkpoint(path, model.config, type(model).__name__,
                            nnx.to_pure_dict(nnx.state(model, nnx.Param)), extra_files=extra_files)


def load_native(path, cls, *, shardings=None, **config_overrides):
    """Restore a jt5 checkpoint as ``cls`` onto ``shardings`` (default: the first device);
    ``config_overrides`` as for ``config_with``."""
    config, _ = native.read_meta(path)
    want = config_with(config, **config_overrides)
    stored = want.replace(weights=config.weights, quantized=config.quantized,  # what orbax holds
                          quant_group_size=config.quant_group_size)
    graphdef, abstract = nnx.split(abstract_model(stored, cls))
    model = fill(graphdef, abstract, native.read_params(path, restore_targets(abstract, shardings)))
    return requantize(model, weights=want.weights, quantized=want.quantized,
                      quant_group_size=want.quant_group_size, shardings=shardings)


def requantize(model, *, weights: str, quantized: tuple = (), quant_group_size=None,
               shardings=None):
    """``model`` with its matmul weights stored as ``weights`` ("int8" | "fp8" | "float") for
    the layer kinds ``quantized`` (``()``: the format's default; ``jt5/quant.py``), with
    ``quant_group_size`` (None: per-channel scales), a new model built tensor by tensor.
    ``shardings`` as for ``load_hf``."""
    config = model.config.replace(weights=weights, quantized=tuple(quantized),
                                  quant_group_size=None if weights == "float" else quant_group_size)
    if (config.quantized_kinds == model.config.quantized_kinds
            and (not config.quantized_kinds
                 or config.quant_group_size == model.config.quant_group_size)):
        return model
    graphdef, abstract = nnx.split(abstract_model(config, type(model)))
    flat = dict(nnx.to_flat_state(abstract))
    placement = None if shardings is None else dict(nnx.to_flat_state(shardings(abstract)))
    pairs = quant.adapt(model_params(model).items(), {p: v.get_value() for p, v in flat.items()},
                        type(model).__name__)
    for p, arr in pairs:
        arr = np.asarray(arr).astype(flat[p].get_value().dtype)
        sharding = placement[p] if placement is not None else None
        flat[p].set_value(jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr))
    new = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if hasattr(model, "generation_config"):
        new.generation_config = model.generation_config
    return new
