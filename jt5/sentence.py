"""sentence-transformers model directories (sentence-T5, GTR, any T5-family encoder saved by
``SentenceTransformer.save``): their modules read into jt5, so ``jt5.embed(dir, texts)`` equals
``SentenceTransformer(dir).encode(texts)``.

A directory lists its modules in ``modules.json``, in order; each has a folder (``path``) with its
config. jt5 runs these:

- ``Transformer`` (the T5 / mT5 / UMT5 encoder; ``sentence_bert_config.json``: ``max_seq_length``
  — newer releases keep it as the tokenizer's ``model_max_length`` — and ``do_lower_case``) — it
  must come first;
- ``Pooling`` (``config.json``: ``pooling_mode`` — one name or a list, concatenated in order — or
  the older ``pooling_mode_*_tokens`` flags; ``jt5/pooling.py`` has every mode);
- ``Dense`` (``nn.Linear`` weights + bias in the module folder, an activation from
  ``torch.nn``: Identity, Tanh, ReLU, GELU, Sigmoid, SiLU; ``use_residual``);
- ``Normalize`` (L2, as ``torch.nn.functional.normalize``).

``config_sentence_transformers.json``'s ``default_prompt_name`` prepends that prompt, as
``encode`` does. Any other module, or an option jt5 does not run, is an error naming it: never a
silently different embedding.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jt5.pooling import pool

MODULES = "modules.json"
# sentence-transformers' pooling mode names -> jt5.pooling's
_POOL_MODES = {"cls": "first", "mean": "mean", "max": "max",
               "mean_sqrt_len_tokens": "mean_sqrt_len", "weightedmean": "weighted_mean",
               "lasttoken": "last"}
_LEGACY_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean",
                 "pooling_mode_lasttoken": "lasttoken"}
# torch.nn activation class names -> jax (nn.GELU's default is the exact erf form)
_ACTIVATIONS = {"Identity": lambda x: x, "Tanh": jnp.tanh, "ReLU": jax.nn.relu,
                "GELU": lambda x: jax.nn.gelu(x, approximate=False), "Sigmoid": jax.nn.sigmoid,
                "SiLU": jax.nn.silu}


class Dense(NamedTuple):
    weight: np.ndarray            # float32 [out, in] (torch's nn.Linear layout)
    bias: Optional[np.ndarray]    # float32 [out]
    activation: str               # a key of _ACTIVATIONS
    residual: Optional[np.ndarray]  # use_residual: None (off), [] (identity) or [out, in]


class SentenceModel(NamedTuple):
    """What a sentence-transformers directory asks of jt5 (``read``)."""
    encoder: Path                 # the Transformer module's folder (a transformers directory)
    max_length: Optional[int]     # max_seq_length (tokens, EOS included); None: not set
    lower_case: bool
    prompt: str                   # the default prompt ("" if none)
    poolings: tuple               # jt5.pooling modes, concatenated in this order
    dense: tuple                  # Dense layers, in order
    normalize: bool
    dim: int                      # the output width

    def head_params(self):
        """The Dense weights as a pytree (passed to the compiled function, not baked in)."""
        return [dict(w=d.weight, b=d.bias, r=d.residual) for d in self.dense]

    def apply(self, hidden, mask, params):
        """``hidden [B, T, D]``, ``mask [B, T]`` -> ``[B, dim]`` float32: Pooling, Dense, Normalize."""
        x = jnp.concatenate([pool(hidden, mask, p) for p in self.poolings], axis=-1)
        for d, p in zip(self.dense, params):
            y = jnp.einsum("BI,OI->BO", x, p["w"])
            if p["b"] is not None:
                y = y + p["b"]
            y = _ACTIVATIONS[d.activation](y)
            if p["r"] is not None:
                y = y + (x if p["r"].size == 0 else jnp.einsum("BI,OI->BO", x, p["r"]))
            x = y
        if self.normalize:  # torch's F.normalize: x / max(||x||, 1e-12)
            x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return x


def is_sentence_dir(path) -> bool:
    return (Path(path) / MODULES).is_file()


def _json(f: Path) -> dict:
    try:
        out = json.loads(f.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: invalid JSON ({e})") from e
    if not isinstance(out, dict):
        raise ValueError(f"{f}: expected a JSON object")
    return out


def _pool_modes(cfg: dict, f: Path) -> tuple:
    modes = cfg.get("pooling_mode")
    if modes is None:
        modes = [m for k, m in _LEGACY_FLAGS.items() if cfg.get(k)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    bad = [m for m in modes if m not in _POOL_MODES]
    if bad:
        raise ValueError(f"{f}: pooling mode(s) {bad} not known; jt5 runs {sorted(_POOL_MODES)}")
    if cfg.get("include_prompt", True) is False:
        raise ValueError(f"{f}: include_prompt=false (prompt tokens left out of the pooling) is "
                         "not supported by jt5")
    return tuple(_POOL_MODES[m] for m in modes)


def _dense(folder: Path, width: int) -> Dense:
    from jt5.bridge.hf import StateDict
    f = folder / "config.json"
    cfg = _json(f)
    for key in ("module_input_name", "module_output_name"):
        if cfg.get(key) not in (None, "sentence_embedding"):
            raise ValueError(f"{f}: {key}={cfg[key]!r}; jt5 runs Dense on sentence_embedding only")
    act = str(cfg.get("activation_function", "torch.nn.modules.activation.Tanh")).split(".")[-1]
    if act not in _ACTIVATIONS:
        raise ValueError(f"{f}: activation_function {cfg.get('activation_function')!r} is not "
                         f"one jt5 runs ({sorted(_ACTIVATIONS)})")
    sd = StateDict(folder)
    w = np.asarray(sd["linear.weight"], np.float32)
    if w.shape[1] != width:
        raise ValueError(f"{folder}: linear.weight is {w.shape} but its input is {width} wide")
    b = np.asarray(sd["linear.bias"], np.float32) if "linear.bias" in sd else None
    r = None
    if cfg.get("use_residual"):
        r = (np.asarray(sd["residual.weight"], np.float32) if "residual.weight" in sd
             else np.zeros((0,), np.float32))
    return Dense(w, b, act, r)


def read(path) -> SentenceModel:
    """The modules of the sentence-transformers directory ``path``; ``ValueError`` naming the
    file and the module jt5 cannot run."""
    from jt5 import formats
    root = Path(path)
    f = root / MODULES
    try:
        modules = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: invalid JSON ({e})") from e
    if not isinstance(modules, list) or not modules:
        raise ValueError(f"{f}: expected a non-empty list of modules")
    kinds = [str(m.get("type", "")).split(".")[-1] for m in modules]
    if kinds[0] != "Transformer":
        raise ValueError(f"{f}: the first module is {kinds[0]!r}; jt5 needs a Transformer (a T5 "
                         "encoder) first")
    encoder = root / modules[0].get("path", "")
    st_cfg = _json(encoder / "sentence_bert_config.json")
    width = formats.load_config(encoder).d_model
    poolings, dense, normalize = None, [], False
    for m, kind in zip(modules[1:], kinds[1:]):
        folder = root / m.get("path", "")
        if kind == "Pooling" and poolings is None and not dense:
            poolings = _pool_modes(_json(folder / "config.json"), folder / "config.json")
            width *= len(poolings)
        elif kind == "Dense" and poolings is not None and not normalize:
            dense.append(_dense(folder, width))
            width = dense[-1].weight.shape[0]
        elif kind == "Normalize" and poolings is not None and not normalize:
            normalize = True
        else:
            raise ValueError(f"{f}: module {m.get('type')!r} (at {m.get('path')!r}) is not one "
                             "jt5 runs here; it runs Transformer, Pooling, Dense..., Normalize "
                             "in that order")
    if poolings is None:
        raise ValueError(f"{f}: no Pooling module (per-token output: jt5.embed(..., "
                         "pooling='none') on the Transformer's folder)")
    top = _json(root / "config_sentence_transformers.json")
    name = top.get("default_prompt_name")
    prompt = (top.get("prompts") or {}).get(name, "") if name else ""
    if name and name not in (top.get("prompts") or {}):
        raise ValueError(f"{root / 'config_sentence_transformers.json'}: default_prompt_name "
                         f"{name!r} is not in prompts")
    # Older releases store max_seq_length here; 5.x+ store it as the tokenizer's model_max_length
    # (transformers' "no limit" is a huge number).
    max_len = st_cfg.get("max_seq_length") or _json(encoder / "tokenizer_config.json").get(
        "model_max_length")
    if max_len is not None and int(max_len) > 10**6:
        max_len = None
    return SentenceModel(encoder, None if max_len is None else int(max_len),
                         bool(st_cfg.get("do_lower_case", False)), prompt, poolings,
                         tuple(dense), normalize, width)
