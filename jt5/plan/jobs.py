"""The programs the jobs run, built from shapes alone for a GPU target (nothing allocated).

Each builder returns a :class:`Program`: ``lower()`` traces and lowers *the job's own* jitted
function (``jt5.train.runner.step_program``'s train step with its optimizer update and
shardings; ``jt5.generate.program``'s whole generation loop; the encoder and pooling of
``jt5 embed``) for the target's devices, plus what the table reports beside XLA's figures:
per-device parameter and optimizer bytes, the FLOP count, the settings the advice may change.

Numerics default to what the job picks on a GPU: ``attention="auto"`` is the kernels
(``pallas``), an unset training / embedding ``dtype`` is bfloat16 (generation keeps the
checkpoint's dtype, as ``jt5 generate`` does).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jt5.config import PRESETS, T5Config, preset
from jt5.plan import flops as flops_lib
from jt5.plan.compile import Target

GPU_DEFAULT_DTYPE = "bfloat16"


class Program(NamedTuple):
    job: str                      # pretrain | finetune | generate | embed
    what: str                     # one line: model, shapes, numerics
    mesh: dict                    # axis -> size
    lower: Callable               # () -> jax.stages.Lowered for the target
    param_bytes: int              # per device
    optimizer_bytes: int          # per device
    flops: flops_lib.Flops        # per step / per call, all devices together
    config: T5Config
    knobs: dict                   # what the advice may suggest changing (batch, remat, mesh ...)
    decode_bytes: int = 0         # generate: bytes one decode step reads per device


def gpu_attention(impl: Optional[str]) -> Optional[str]:
    """What ``attention`` resolves to on a GPU: ``auto`` -> the kernels."""
    return "pallas" if impl == "auto" else impl


def shard_bytes(tree) -> int:
    """Bytes one device holds of ``tree``'s ShapeDtypeStructs (their shardings' shard shapes;
    the largest over devices, which is every device's for even shardings)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def with_layers(cfg: T5Config, layers: Optional[int]) -> T5Config:
    """The architecture with ``layers`` encoder and decoder layers (quick plans: full width,
    few layers; per-layer memory extrapolates)."""
    if not layers:
        return cfg
    return cfg.replace(num_layers=layers, num_decoder_layers=layers)


def base_config(model) -> T5Config:
    """``--model``: a preset name, or any directory the jobs take (its config only)."""
    if isinstance(model, T5Config):
        return model
    if model in PRESETS:
        return preset(model)
    from jt5 import formats
    if not os.path.exists(str(model)):
        raise ValueError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor an "
                         "existing model directory")
    try:
        return formats.load_config(model)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"--model {model}: {e}") from e


def _abstract(tree, shardings):
    """``tree`` as ShapeDtypeStructs placed by ``shardings``: one ``Sharding`` for every leaf,
    or a tree of them leaf for leaf (``sharding.param_shardings`` puts them where the
    ``nnx.Variable`` s are, so the two trees match by leaves, not by structure)."""
    leaves, treedef = jax.tree.flatten(tree)
    if isinstance(shardings, jax.sharding.Sharding):
        placed = [shardings] * len(leaves)
    else:
        placed = jax.tree.leaves(shardings)
    if len(placed) != len(leaves):
        raise AssertionError(f"{len(placed)} shardings for {len(leaves)} arrays")
    return jax.tree.unflatten(treedef, [
        jax.ShapeDtypeStruct(np.shape(x), _dtype(x), sharding=s) for x, s in zip(leaves, placed)])


def _dtype(x):
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _mesh_text(mesh) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.shape.items())


# -- pretrain / finetune ----------------------------------------------------------------------
def train(cfg, target: Target, *, job: str, layers: Optional[int] = None) -> Program:
    """The train step ``jt5 pretrain`` / ``jt5 finetune`` would run with ``cfg`` (a
    ``LoopConfig`` / ``FinetuneConfig``, as the job's flags build it) on ``target``."""
    from jt5.train import runner

    cfg = dataclasses.replace(cfg, dtype=cfg.dtype or GPU_DEFAULT_DTYPE,
                              attention=gpu_attention(cfg.attention))
    mcfg, mesh = runner.prepare(cfg, target.devices)
    mcfg = with_layers(mcfg, layers)
    prog = runner.step_program(cfg, mcfg, mesh)
    batch = runner.abstract_batch(cfg, prog.batch_sh)

    def lower():
        with jax.set_mesh(mesh):  # as Trainer.train calls the step
            return prog.train_step.lower(prog.abstract_state, batch)

    one_hot = mcfg.one_hot_embedding or mesh.shape["tensor"] > 1  # layers.Embed's rule
    count = flops_lib.train_step(mcfg, cfg.batch_size, cfg.inputs_length, cfg.targets_length,
                                 one_hot=one_hot)
    what = (f"{job} {_model_name(cfg.model)}{_layers_text(layers)}: batch {cfg.batch_size} x "
            f"{cfg.inputs_length}/{cfg.targets_length}, {cfg.optim.optimizer}, {mcfg.dtype}, "
            f"attention {mcfg.attention}, remat {mcfg.remat}"
            + (f", accum {cfg.optim.accum_steps}" if cfg.optim.accum_steps > 1 else ""))
    return Program(job, what, dict(mesh.shape), lower,
                   param_bytes=shard_bytes(prog.abstract_state.params),
                   optimizer_bytes=shard_bytes(prog.abstract_state.opt_state),
                   flops=count, config=mcfg,
                   knobs=dict(batch_size=cfg.batch_size, remat=mcfg.remat,
                              accum=cfg.optim.accum_steps, attention=mcfg.attention,
                              mesh=dict(mesh.shape), devices=target.num_devices))


def _model_name(model) -> str:
    return "custom config" if isinstance(model, T5Config) else str(model)


def _layers_text(layers) -> str:
    return f" ({layers}+{layers} layers)" if layers else ""


# -- generate ---------------------------------------------------------------------------------
def _generation_defaults(model):
    """The checkpoint's generation defaults, as ``jt5 generate`` loads them (transformers
    directories carry them; presets and jt5 checkpoints: transformers' defaults)."""
    from jt5.generation_config import GenerationConfig, read_generation_config
    if isinstance(model, T5Config) or model in PRESETS:
        return GenerationConfig()
    from jt5 import formats
    src = formats.locate(model)
    if src.kind != "hf":
        return GenerationConfig()
    from jt5.bridge import hf
    return read_generation_config(src.path, hf.read_config(src.path))


def generate(model: str, target: Target, *, batch_size: int, length: int, mesh: Optional[str],
             dtype: Optional[str], attention: Optional[str], options: dict,
             layers: Optional[int] = None, weights: Optional[str] = None,
             int8_compute: Optional[bool] = None,
             quant_group_size: Optional[int] = None) -> Program:
    """``jt5 generate``'s compiled loop for ``batch_size`` prompts of ``length`` tokens with the
    generation ``options`` (the job's flags; the checkpoint's generation config under them)."""
    from jt5 import generate as gen
    from jt5 import sharding
    from jt5.model import T5ForConditionalGeneration
    from jt5.weights import abstract_model, config_with

    cfg = with_layers(config_with(base_config(model), dtype=dtype,
                                  attention=gpu_attention(attention), weights=weights,
                                  int8_compute=int8_compute or None,
                                  quant_group_size=quant_group_size), layers)
    cfg = cfg.replace(attention=gpu_attention(cfg.attention))
    abstract = abstract_model(cfg, T5ForConditionalGeneration)
    abstract.generation_config = _generation_defaults(model)
    mesh_obj = None
    if mesh:
        try:
            mesh_obj = sharding.make_mesh(mesh, target.devices)
        except ValueError as e:
            raise ValueError(f"--mesh {mesh}: {e}") from e
    elif target.num_devices > 1:
        raise ValueError(f"jt5 generate without --mesh runs on one device, not the target's "
                         f"{target.num_devices}: pass --mesh (e.g. data={target.num_devices})")
    ids = np.zeros((batch_size, length), np.int32)
    mask = np.ones_like(ids)
    call = gen.program(abstract, ids, mask, mesh=mesh_obj, **options)
    graphdef, st, state, ids_b, mask_b, kn = call.args
    if mesh_obj is None:  # one device, as the job without --mesh
        shard = (jax.sharding.SingleDeviceSharding(target.devices[0]),) * 4
    else:  # what the job leaves unplaced (the knobs) is replicated
        rep = jax.sharding.NamedSharding(mesh_obj, jax.sharding.PartitionSpec())
        shard = tuple(rep if s is None else s for s in call.shardings[2:])
    args = (graphdef, st) + tuple(_abstract(a, s) for a, s in zip(call.args[2:], shard))

    def lower():
        if mesh_obj is None:
            return call.fn.lower(*args)
        with jax.set_mesh(mesh_obj):
            return call.fn.lower(*args)

    rows_per_input = st.num_beams if st.beam else st.num_return_sequences
    one_hot = cfg.one_hot_embedding or (mesh_obj is not None and mesh_obj.shape["tensor"] > 1)
    count = flops_lib.generate(cfg, ids_b.shape[0], ids_b.shape[1],
                               rows_per_input=rows_per_input, new_tokens=st.max_new_tokens,
                               one_hot=one_hot)
    params = shard_bytes(args[2])
    kind = (f"beam search ({st.num_beams} beams)" if st.beam else
            "sampling" if st.proc.do_sample else "greedy")
    what = (f"generate {_model_name(model)}{_layers_text(layers)}: {batch_size} prompts x "
            f"{length} tokens (bucket {ids_b.shape[1]}), {kind}, {st.max_new_tokens} new "
            f"tokens, {cfg.dtype}, attention {cfg.attention}")
    dsize = jnp.dtype(cfg.dtype).itemsize
    L = cfg.num_decoder_layers or cfg.num_layers
    split = 1 if mesh_obj is None else mesh_obj.shape["data"] * mesh_obj.shape["fsdp"]
    rows = ids_b.shape[0] * rows_per_input // split
    # one decode step reads every weight, the live half of the self cache and the cross K/V
    cache = (rows * st.cache_length // 2 + ids_b.shape[0] // split * ids_b.shape[1]) * \
        2 * L * cfg.num_heads * cfg.d_kv * dsize
    return Program("generate", what, dict(mesh_obj.shape) if mesh_obj is not None else
                   {"devices": 1}, lower, param_bytes=params, optimizer_bytes=0, flops=count,
                   config=cfg, knobs=dict(batch_size=batch_size, attention=cfg.attention,
                                          devices=target.num_devices,
                                          new_tokens=st.max_new_tokens),
                   decode_bytes=params + cache)


# -- embed ------------------------------------------------------------------------------------
def embed(model: str, target: Target, *, batch_size: int, length: int, pooling: str,
          dtype: Optional[str], attention: Optional[str], layers: Optional[int] = None,
          weights: Optional[str] = None, int8_compute: Optional[bool] = None,
          quant_group_size: Optional[int] = None, mesh: Optional[str] = None) -> Program:
    """``jt5 embed``'s encoder and pooling over ``batch_size`` rows of ``length`` tokens (the
    bucket it pads them to), placed as the job places them: rows over ``data`` x ``fsdp`` of
    ``mesh`` (default: ``data`` over every device), weights by ``jt5.sharding``'s rules."""
    from jt5 import embeddings, sharding
    from jt5.model import T5EncoderModel
    from jt5.pooling import pool
    from jt5.weights import abstract_model, config_with

    cfg = with_layers(config_with(base_config(model), dtype=dtype or GPU_DEFAULT_DTYPE,
                                  attention=gpu_attention(attention), weights=weights,
                                  int8_compute=int8_compute or None,
                                  quant_group_size=quant_group_size), layers)
    cfg = cfg.replace(attention=gpu_attention(cfg.attention))
    devices = target.devices
    try:
        grid = sharding.make_mesh(mesh or {"data": len(devices)}, devices)
    except ValueError as e:
        raise ValueError(f"--mesh {mesh}: {e}") from e
    split = grid.shape["data"] * grid.shape["fsdp"]
    B = -(-batch_size // split) * split
    T = embeddings.bucket_length(length)
    params, f = embeddings._encode_fn(abstract_model(cfg, T5EncoderModel))
    params = _abstract(params, sharding.param_shardings(params, grid))
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sharding.batch_sharding(grid, 2))

    @jax.jit
    def run(params, ids, mask):
        return pool(f(params, ids, mask), mask, pooling)

    def lower():
        with jax.set_mesh(grid):
            return run.lower(params, ids, ids)

    what = (f"embed {_model_name(model)}{_layers_text(layers)}: {B} row{'s' * (B != 1)} x "
            f"{T} tokens, pooling {pooling}, {cfg.dtype}, attention {cfg.attention}, "
            f"encoder {cfg.encoder_attention_type}"
            + (f", {cfg.weights} weights" if cfg.weights != "float" else "")
            + (f" (groups of {cfg.quant_group_size})" if cfg.quant_group_size else ""))
    return Program("embed", what, dict(grid.shape), lower, param_bytes=shard_bytes(params),
                   optimizer_bytes=0, flops=flops_lib.encoder_forward(cfg, B, T), config=cfg,
                   knobs=dict(batch_size=B, attention=cfg.attention, devices=len(devices)))
