"""Encoder embeddings of many texts: length-bucketed batches, sharded over devices.

    out = jt5.embed("path/to/model", ["first text", "second"], pooling="mean")
    out.embeddings        # [N, D] (pooled) or [N, L, D] (pooling="none"), float32 by default
    out.mask              # [N, L] int32: the tokens each row holds

Three ways pipelines call a T5 encoder, each reproduced exactly:

- **FLUX / SD3** (diffusers' ``_get_t5_prompt_embeds``): every prompt padded to ``max_length``
  (512 or 256) and the encoder run *without* an attention mask, so padding tokens are attended
  and their states returned: ``pooling="none", max_length=512, padding="max_length",
  use_attention_mask=False`` -> ``[N, 512, D]``.
- **Wan / UMT5**: masked attention, states past each prompt set to zero, padded to
  ``max_length``: ``pooling="none", padding="max_length", use_attention_mask=True,
  zero_padding=True`` (zeros are the default whenever the mask is used).
- **Retrieval**: a sentence-transformers directory (GTR, sentence-T5: ``modules.json``) runs its
  own modules (``jt5/sentence.py``: pooling, Dense, Normalize, prompt, max_seq_length), equal to
  ``SentenceTransformer(dir).encode(texts)``.

Only the encoder runs, so a ``T5EncoderModel`` export (``jt5 convert --encoder-only``) is enough;
``model_or_path`` may also be a loaded ``T5EncoderModel`` / ``T5ForConditionalGeneration`` or any
directory ``jt5.load`` reads. Inputs are sorted by length and cut into batches whose length is
rounded up to a bucket (16, 32, 64, 128, 256, then multiples of 64: one compiled program per
bucket); attending padding (``use_attention_mask=False``) computes exactly ``max_length``
positions instead, since there the padding changes every state. Each batch's rows are split
over the ``data`` (and ``fsdp``) axes of ``mesh`` (default: ``data`` over all local devices),
the weights placed by ``jt5.sharding``'s rules (``fsdp`` / ``tensor`` split them: an XXL
encoder over several devices). Results come back in input order. Texts longer than
``max_length`` tokens (EOS included) are truncated, keeping the EOS, and counted in
``truncated``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jt5.pooling import POOLINGS, pool

PADDINGS = ("longest", "max_length")


class Embeddings(NamedTuple):
    embeddings: np.ndarray   # [N, D] pooled, or [N, L, D] per token (pooling "none")
    mask: np.ndarray         # int32 [N, L]: 1 where row i has a token
    truncated: int           # inputs cut to max_length


def bucket_length(n: int) -> int:
    for b in (16, 32, 64, 128, 256):
        if n <= b:
            return b
    return -(-n // 64) * 64


def _load(model_or_path, dtype, attention, weights, int8_compute, quant_group_size=None):
    from jt5 import formats
    from jt5.model import T5EncoderModel
    if isinstance(model_or_path, nnx.Module):
        if int8_compute:
            raise ValueError("int8_compute applies as a model loads: pass a path, or load the "
                             "model with int8_compute=True")
        if weights is not None:
            from jt5.weights import requantize
            model_or_path = requantize(model_or_path, weights=weights,
                                       quant_group_size=quant_group_size)
        return model_or_path, None
    src = formats.locate(model_or_path)
    model = formats.load(src.path, T5EncoderModel, dtype=dtype, attention=attention,
                         weights=weights, int8_compute=int8_compute or None,
                         quant_group_size=quant_group_size)
    return model, src.tokenizer


def _encode_fn(model):
    """(params, f) with ``f(params, ids, mask) -> hidden [B, L, D]`` for either class
    (``mask`` None: every position attends every position)."""
    graphdef, params = nnx.split(model)

    def f(params, ids, mask):
        m = nnx.merge(graphdef, params)
        return m.encode(ids, mask) if hasattr(m, "encode") else m(ids, mask)
    return params, f


def _output_dtype(name: str):
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"output_dtype={name!r} must be float32, bfloat16 or float16")
    return jnp.dtype(name)


def embed(model_or_path, texts: Sequence[str], *, pooling: Optional[str] = None, tokenizer=None,
          batch_size: int = 32, max_length: Optional[int] = None, padding: str = "longest",
          use_attention_mask: bool = True, zero_padding: Optional[bool] = None,
          dtype: Optional[str] = None, output_dtype: str = "float32",
          weights: Optional[str] = None, int8_compute: bool = False,
          quant_group_size: Optional[int] = None, attention: Optional[str] = None, devices=None,
          mesh=None, progress: bool = False) -> Embeddings:
    """Embed ``texts`` with the encoder of ``model_or_path``; see the module docstring.

    ``pooling``: ``jt5.pooling.POOLINGS`` (default ``mean``; a sentence-transformers directory
    pools as its modules say). ``max_length``: tokens per text, EOS included (default 512, or the
    directory's ``max_seq_length``). ``padding``: ``longest`` (per-token output as wide as the
    longest text) or ``max_length`` (every row ``max_length`` wide, as pipelines pad).
    ``use_attention_mask=False`` runs the encoder over the padding too (FLUX / SD3; needs
    ``padding="max_length"``). ``zero_padding``: per-token states past each text are zeros
    (default: when the mask is used) or what the encoder computed there. ``tokenizer``: a
    ``jt5.tokenizer.Tokenizer`` or spec ("byte", a directory); default: the model directory's.
    ``dtype``: compute dtype (default bfloat16 on a GPU, float32 on CPU); ``output_dtype``: the
    returned arrays' (bfloat16 comes straight from a bfloat16 encoder). ``weights``: "int8" /
    "fp8" quantise the encoder's matmul weights as it loads (``jt5/quant.py``; ``int8_compute``:
    int8 activations too; ``quant_group_size``: one scale per that many inputs of each output
    channel instead of one per channel). ``devices``
    (default all local) or ``mesh`` (``jt5.sharding.make_mesh``, e.g. ``"fsdp=4,tensor=2"``);
    ``batch_size`` is rounded up to a multiple of the rows' split.
    """
    from jt5 import sentence, sharding
    from jt5.tokenizer import Tokenizer, load_tokenizer

    if isinstance(texts, str):
        raise TypeError("texts: a sequence of strings, not one string")
    st = None
    if not isinstance(model_or_path, nnx.Module) and sentence.is_sentence_dir(model_or_path):
        st = sentence.read(model_or_path)
        if pooling is not None:
            raise ValueError(f"pooling={pooling!r}: {model_or_path} is a sentence-transformers "
                             "directory, which pools as its modules.json says; pass its "
                             f"Transformer folder ({st.encoder}) for other poolings")
        model_or_path = st.encoder
        max_length = max_length or st.max_length
        texts = [st.prompt + t for t in texts]
        if st.lower_case:
            texts = [t.lower() for t in texts]
    pooling = pooling or "mean"
    max_length = max_length or 512
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} must be one of {POOLINGS}")
    if padding not in PADDINGS:
        raise ValueError(f"padding={padding!r} must be one of {PADDINGS}")
    if not use_attention_mask and padding != "max_length":
        raise ValueError("use_attention_mask=False attends the padding, so every state depends on "
                         "how much there is: pass padding='max_length' (the length a pipeline "
                         "pads to)")
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"batch_size={batch_size} must be >= 1 and max_length={max_length} >= 2")
    zero = use_attention_mask if zero_padding is None else bool(zero_padding)
    out_dt = _output_dtype(output_dtype)
    if devices is not None and mesh is not None:
        raise ValueError("pass devices or mesh, not both")
    if dtype is None and not isinstance(model_or_path, nnx.Module):
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    model, found = _load(model_or_path, dtype, attention, weights, int8_compute,
                         quant_group_size)
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
    fixed = padding == "max_length"
    L = max_length if fixed else (int(lengths.max()) if N else 0)
    # A batch runs at its own bucket length unless states that see or are the padding matter:
    # attended padding changes every state, and kept padding states must all be computed.
    # (Masked real tokens never see the padding, so their states do not depend on its length.)
    keep_pad = pooling == "none" and not zero
    full = L if fixed else bucket_length(L)
    D = st.dim if st is not None else model.config.d_model

    if mesh is None:
        devices = list(jax.local_devices() if devices is None else devices)
        mesh = sharding.make_mesh({"data": len(devices)}, devices)
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    B = -(-batch_size // split) * split
    params, f = _encode_fn(model)
    params = jax.device_put(params, sharding.param_shardings(params, mesh))
    head = None if st is None else st.head_params()
    rows = sharding.batch_sharding(mesh, 2)

    @jax.jit
    def run(params, head, ids, mask):
        h = f(params, ids, mask if use_attention_mask else None)               # [B, T, D]
        if st is not None:
            return st.apply(h, mask, head).astype(out_dt)                        # [B, D']
        if pooling == "none":
            return (pool(h, mask, "none") if zero else h).astype(out_dt)         # [B, T, D]
        return pool(h, mask, pooling).astype(out_dt)                             # [B, D]

    shape = (N, D) if pooling != "none" else (N, L, D)
    out = np.zeros(shape, out_dt)
    mask_out = np.zeros((N, L), np.int32)
    order = np.argsort(lengths, kind="stable")  # similar lengths share a batch (less padding)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=N, desc="embed", unit="text", dynamic_ncols=True)
    with jax.set_mesh(mesh):
        for lo in range(0, N, B):
            idx = order[lo:lo + B]
            T = full if (keep_pad or not use_attention_mask) else bucket_length(
                int(lengths[idx].max()))
            batch = np.full((B, T), tokenizer.pad_id, np.int32)
            mask = np.zeros((B, T), np.int32)
            mask[:, 0] = 1  # filler rows: one token, never an all-masked row
            for r, i in enumerate(idx):
                batch[r, :lengths[i]], mask[r, :lengths[i]] = ids[i], 1
            res = np.asarray(run(params, head, jax.device_put(batch, rows),
                                 jax.device_put(mask, rows)))
            for r, i in enumerate(idx):
                n = int(lengths[i])
                mask_out[i, :n] = 1
                if pooling != "none":
                    out[i] = res[r]
                else:  # zeros past the text unless its padding states were asked for
                    w = L if keep_pad else n
                    out[i, :w] = res[r, :w]
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    return Embeddings(out, mask_out, truncated)


def check_output(path, pooling: Optional[str], output_dtype: str = "float32") -> None:
    """Whether ``save`` can write ``path`` (checked before any work is done)."""
    path = str(path)
    if path.endswith(".npy"):
        if pooling == "none":
            raise ValueError(f"--output {path}: per-token output (--pooling none) needs "
                             ".safetensors (it holds the mask too)")
        if output_dtype == "bfloat16":
            raise ValueError(f"--output {path}: numpy has no bfloat16 (.npy would hold raw "
                             "bytes): use .safetensors or --output-dtype float32")
    elif not path.endswith(".safetensors"):
        raise ValueError(f"--output {path}: expected a .npy or .safetensors file name")


def save(path, result: Embeddings) -> None:
    """``.npy``: the ``[N, D]`` array (pooled only); ``.safetensors``: ``embeddings`` (and
    ``mask`` for per-token output, ``[N, L, D]``)."""
    path = str(path)
    per_token = result.embeddings.ndim == 3
    check_output(path, "none" if per_token else None, str(result.embeddings.dtype))
    if path.endswith(".npy"):
        np.save(path, result.embeddings)
        return
    from safetensors.numpy import save_file
    tensors = {"embeddings": np.ascontiguousarray(result.embeddings)}
    if per_token:
        tensors["mask"] = result.mask
    save_file(tensors, path)
