"""The one place that tells jt5's three on-disk model formats apart, and loads any of them.

    src = locate("runs/pretrain")        # Source(path, kind="run", tokenizer=".../runs/pretrain/hf")
    model = load("runs/pretrain")        # T5ForConditionalGeneration (or T5EncoderModel via cls)
    config = load_config("path/to/hf")   # T5Config, no weights read

Formats (checked in this order):
- ``"hf"``: a transformers model directory (``config.json`` + safetensors / ``pytorch_model.bin``);
- ``"jt5"``: a jt5 checkpoint (``jt5_config.json`` + orbax ``params/``, ``bridge/native.py``);
- ``"run"``: a ``jt5 pretrain`` run directory (``checkpoints/<step>/``); its newest complete
  checkpoint is read.

``jt5 convert``, ``jt5 generate`` and ``jt5 pretrain --model`` all go through here. bridge and
train are imported lazily: this module is light enough for ``jt5/__init__``.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

KINDS = ("hf", "jt5", "run")
_WHAT = ("a transformers model directory (config.json), a jt5 checkpoint (jt5_config.json + "
         "params/) or a pretraining run directory (checkpoints/)")


class Source(NamedTuple):
    path: Path
    kind: str                  # one of KINDS
    tokenizer: Optional[str]   # a directory with tokenizer files, or "byte"; None: none known


def _run_tokenizer(path: Path) -> Optional[str]:
    """A run's tokenizer: its export ``hf/`` if written, else what its checkpoint trained with."""
    from jt5.tokenizer import BYTE_SPEC, has_tokenizer_files
    from jt5.train import checkpoint as ckpt

    if has_tokenizer_files(path / "hf"):
        return str(path / "hf")
    step = ckpt.latest_complete_step(path)
    if step is None:
        return None
    spec = ckpt.read_meta(ckpt.checkpoint_dir(path) / str(step)).get("data_config", {}).get(
        "tokenizer")
    if spec == BYTE_SPEC or (spec and has_tokenizer_files(spec)):
        return spec
    return None


def locate(path) -> Source:
    """Which format ``path`` holds; ``FileNotFoundError`` / ``ValueError`` naming it otherwise."""
    from jt5.bridge import native
    from jt5.tokenizer import has_tokenizer_files

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not p.is_dir():
        raise ValueError(f"{path} is a file; expected {_WHAT}")
    if (p / "config.json").is_file():
        return Source(p, "hf", str(p) if has_tokenizer_files(p) else None)
    if native.is_native_dir(p):
        return Source(p, "jt5", str(p) if has_tokenizer_files(p) else None)
    if (p / "checkpoints").is_dir() or any(c.is_dir() and c.name.isdigit() for c in p.iterdir()):
        from jt5.train import checkpoint as ckpt
        if ckpt.latest_complete_step(p) is None:
            raise FileNotFoundError(f"{path}: a pretraining run directory without a complete "
                                    f"checkpoint (under {ckpt.checkpoint_dir(p)})")
        return Source(p, "run", _run_tokenizer(p))
    raise ValueError(f"{path} is neither {_WHAT}")


def load_config(path):
    """The ``T5Config`` stored at ``path`` (any format), without reading weights."""
    src = locate(path)
    if src.kind == "hf":
        from jt5.bridge import hf, keymap
        return keymap.config_from_hf(hf.read_config(src.path),
                                     has_lm_head="lm_head.weight" in hf.StateDict(src.path),
                                     source=str(src.path))
    if src.kind == "jt5":
        from jt5.bridge import native
        return native.read_meta(src.path)[0]
    from jt5.bridge.native import config_from_dict
    from jt5.train import checkpoint as ckpt
    step_dir = ckpt.checkpoint_dir(src.path) / str(ckpt.latest_complete_step(src.path))
    return config_from_dict(ckpt.read_meta(step_dir)["model_config"], str(step_dir / "data"))


def model_classes() -> dict:
    """Every model class a checkpoint can name (transformers' ``architectures`` or a jt5
    checkpoint's ``model_class``), by jt5 class name."""
    from jt5.heads import HEAD_CLASSES
    from jt5.model import T5EncoderModel, T5ForConditionalGeneration
    return {c.__name__: c for c in (T5ForConditionalGeneration, T5EncoderModel,
                                    *HEAD_CLASSES.values())}


def saved_class(path):
    """The jt5 class the model at ``path`` (any format, or a located ``Source``) was saved as:
    a transformers directory's ``architectures`` (a task head, an encoder, else a seq2seq
    model), a jt5 checkpoint's or a run's ``model_class``."""
    src = path if isinstance(path, Source) else locate(path)
    classes = model_classes()
    if src.kind == "hf":
        from jt5.bridge import hf, keymap
        from jt5.heads import HEAD_CLASSES
        kind = keymap.architecture_kind(hf.read_config(src.path))
        return (HEAD_CLASSES[kind] if kind in HEAD_CLASSES else
                classes["T5EncoderModel"] if kind == "encoder" else
                classes["T5ForConditionalGeneration"])
    if src.kind == "jt5":
        from jt5.bridge import native
        name = native.read_meta(src.path)[1]
    else:
        from jt5.train import checkpoint as ckpt
        step = ckpt.latest_complete_step(src.path)
        name = ckpt.read_meta(ckpt.checkpoint_dir(src.path) / str(step)).get(
            "model_class", "T5ForConditionalGeneration")
    if name not in classes:
        raise ValueError(f"{src.path}: unknown model_class {name!r}; expected one of "
                         f"{sorted(classes)}")
    return classes[name]


def load(path, cls=None, *, dtype: Optional[str] = None, param_dtype: Optional[str] = None,
         attention: Optional[str] = None, shardings=None, progress: bool = False,
         **config_overrides):
    """Load the model at ``path`` (any format) as ``cls`` (default: the class the checkpoint
    names — a transformers directory's ``architectures``, a jt5 checkpoint's or a run's model
    class — else ``T5ForConditionalGeneration``; ``T5EncoderModel`` reads the encoder only; a
    task head class (``jt5.heads``) reads a base checkpoint with a fresh head).

    ``dtype`` sets the compute dtype and, unless ``param_dtype`` is given, the parameter dtype
    (as ``from_pretrained`` does); ``None`` keeps what is stored. ``shardings``: optional
    ``abstract_state -> shardings`` placing parameters on a mesh. ``config_overrides``: other
    T5Config fields (``remat``, ``dropout_rate``, ...)."""
    from jt5 import weights

    if config_overrides.get("encoder_attention_type") == "transient-global":
        # A checkpoint without LongT5's global parameters loads as stored, then gets them.
        from jt5 import longt5
        return longt5.accepts_transient_global(load)(
            path, cls, dtype=dtype, param_dtype=param_dtype, attention=attention,
            shardings=shardings, progress=progress, **config_overrides)
    src = locate(path)
    overrides = dict(config_overrides, dtype=dtype, param_dtype=param_dtype, attention=attention)
    if src.kind != "hf" and weights.head_of(cls) and saved_class(src) is not cls:
        # A jt5 checkpoint or run of another class (e.g. a pretrained T5) into a task head: load
        # it as saved, then give it a fresh head (transformers directories do this in load_hf).
        from jt5.heads import CONFIG_FIELDS
        head = {k: overrides.pop(k) for k in CONFIG_FIELDS if k in overrides}
        base = load(path, None, shardings=shardings, **overrides)
        return weights.as_head(base, cls, shardings=shardings, source=str(src.path), **head)
    if src.kind == "hf":
        return weights.load_hf(src.path, cls or saved_class(src), shardings=shardings,
                               progress=progress, **overrides)
    if src.kind == "jt5":
        cls = cls or saved_class(src)
        return weights.load_native(src.path, cls, shardings=shardings, **overrides)
    from jt5.train.checkpoint import load_model_from_run
    q = {k: overrides.pop(k) for k in ("weights", "quantized", "quant_group_size")
         if k in overrides}
    model = load_model_from_run(src.path, cls or saved_class(src),
                                shardings=shardings, **overrides)
    if q.get("weights") is None and q.get("quant_group_size") is None:
        return model
    return weights.requantize(model, weights=q.get("weights") or model.config.weights,
                              quantized=q.get("quantized") or (),
                              quant_group_size=q.get("quant_group_size"),
                              shardings=shardings)
