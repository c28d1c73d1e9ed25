"""Encoder embeddings of many texts: length-bucketed batches, sharded over every local device.

    out = jt5.embed("path/to/model", ["first text", "second"], pooling="mean")
    out.embeddings        # [N, D] float32 (pooling "mean" | "first"), or [N, L, D] for "none"
    out.mask              # [N, L] int32: the tokens each row holds (L: the longest input)

Only the encoder runs, so a ``T5EncoderModel`` export (``jt5 convert --encoder-only``) is enough;
``model_or_path`` may also be a loaded ``T5EncoderModel`` / ``T5ForConditionalGeneration`` or any
directory ``jt5.load`` reads. Inputs are sorted by length and cut into batches whose length is
rounded up to a bucket (16, 32, 64, 128, 256, then multiples of 64: one compiled program per
bucket, not per batch); each batch's rows are split over the ``data`` axis of a mesh over all
local devices (``jt5.sharding``), the weights replicated. Results come back in input order.
Mean pooling averages the hidden states of the real tokens only (padding excluded); ``first`` takes
the first token's state. Texts longer than ``max_length`` tokens (EOS included) are truncated,
keeping the EOS, and counted in ``truncated``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from jt5.pooling import POOLINGS, pool


class Embeddings(NamedTuple):
    embeddings: np.ndarray   # float32 [N, D] pooled, or [N, L, D] per token (pooling "none")
    mask: np.ndarray         # int32 [N, L]: 1 where row i has a token (L: longest input)
    truncated: int           # inputs cut to max_length


def bucket_length(n: int) -> int:
    for b in (16, 32, 64, 128, 256):
        if n <= b:
            return b
    return -(-n // 64) * 64


def _load(model_or_path, dtype, attention):
    from jt5 import formats
    from jt5.model import T5EncoderModel
    if isinstance(model_or_path, nnx.Module):
        return model_or_path, None
    src = formats.locate(model_or_path)
    model = formats.load(src.path, T5EncoderModel, dtype=dtype, attention=attention)
    return model, src.tokenizer


def _encode_fn(model):
    """(graphdef, params, f) with ``f(params, ids, mask) -> hidden [B, L, D]`` for either class."""
    graphdef, params = nnx.split(model)

    def f(params, ids, mask):
        m = nnx.merge(graphdef, params)
        return m.encode(ids, mask) if hasattr(m, "encode") else m(ids, mask)
    return params, f


def embed(model_or_path, texts: Sequence[str], *, pooling: str = "mean", tokenizer=None,
          batch_size: int = 32, max_length: int = 512, dtype: Optional[str] = None,
          attention: Optional[str] = None, devices=None, progress: bool = False) -> Embeddings:
    """Embed ``texts`` with the encoder of ``model_or_path``; see the module docstring.

    ``tokenizer``: a ``jt5.tokenizer.Tokenizer`` or spec ("byte", a directory); default: the
    model directory's. ``dtype``: compute dtype (default bfloat16 on a GPU, float32 on CPU);
    outputs are float32 either way. ``devices``: default all local devices; ``batch_size`` is
    rounded up to a multiple of their number.
    """
    from jt5 import sharding
    from jt5.tokenizer import Tokenizer, load_tokenizer

    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} must be one of {POOLINGS}")
    if isinstance(texts, str):
        raise TypeError("texts: a sequence of strings, not one string")
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"batch_size={batch_size} must be >= 1 and max_length={max_length} >= 2")
    if dtype is None and not isinstance(model_or_path, nnx.Module):
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    model, found = _load(model_or_path, dtype, attention)
    if not isinstance(tokenizer, Tokenizer):
        spec = tokenizer or found
        if spec is None:
            raise ValueError(f"{model_or_path}: no tokenizer files; pass tokenizer= ('byte' or a "
                             "tokenizer directory)")
        tokenizer = load_tokenizer(spec)
    ids = tokenizer.encode_many(list(texts))
    truncated = sum(len(x) + 1 > max_length for x in ids)
    eos = np.array([tokenizer.eos_id], np.int32)
    ids = [np.concatenate([x[:max_length - 1], eos]).astype(np.int32) for x in ids]
    N = len(ids)
    lengths = np.array([len(x) for x in ids], np.int64)
    L = int(lengths.max()) if N else 0
    D = model.config.d_model

    devices = list(jax.local_devices() if devices is None else devices)
    mesh = sharding.make_mesh({"data": len(devices)}, devices)
    B = -(-batch_size // len(devices)) * len(devices)
    params, f = _encode_fn(model)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.device_put(params, replicated)
    rows = sharding.batch_sharding(mesh, 2)

    @jax.jit
    def run(params, ids, mask):
        return pool(f(params, ids, mask), mask, pooling)                    # [B, D] | [B, T, D]

    shape = (N, D) if pooling != "none" else (N, L, D)
    out = np.zeros(shape, np.float32)
    mask_out = np.zeros((N, L), np.int32)
    order = np.argsort(lengths, kind="stable")  # similar lengths share a batch (less padding)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=N, desc="embed", unit="text", dynamic_ncols=True)
    with jax.set_mesh(mesh):
        for lo in range(0, N, B):
            idx = order[lo:lo + B]
            T = bucket_length(int(lengths[idx].max()))
            batch = np.full((B, T), tokenizer.pad_id, np.int32)
            mask = np.zeros((B, T), np.int32)
            mask[:, 0] = 1  # filler rows: one token, never an all-masked row
            for r, i in enumerate(idx):
                batch[r, :lengths[i]], mask[r, :lengths[i]] = ids[i], 1
            res = np.asarray(run(params, jax.device_put(batch, rows), jax.device_put(mask, rows)))
            for r, i in enumerate(idx):
                n = int(lengths[i])
                mask_out[i, :n] = 1
                out[i] = res[r] if pooling != "none" else np.pad(
                    res[r, :n], ((0, L - n), (0, 0)))
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    return Embeddings(out, mask_out, truncated)


def save(path, result: Embeddings, pooling: str) -> None:
    """``.npy``: the ``[N, D]`` array (pooled only); ``.safetensors``: ``embeddings`` (+ ``mask``
    for per-token output)."""
    path = str(path)
    if path.endswith(".npy"):
        if pooling == "none":
            raise ValueError(f"--output {path}: per-token output (--pooling none) needs "
                             ".safetensors (it holds the mask too)")
        np.save(path, result.embeddings)
    elif path.endswith(".safetensors"):
        from safetensors.numpy import save_file
        tensors = {"embeddings": np.ascontiguousarray(result.embeddings)}
        if pooling == "none":
            tensors["mask"] = result.mask
        save_file(tensors, path)
    else:
        raise ValueError(f"--output {path}: expected a .npy or .safetensors file name")
