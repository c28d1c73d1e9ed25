"""jt5's own model checkpoint: ``jt5_config.json`` + orbax ``params/``.

The native format restores straight onto any mesh (orbax reshards on restore) and keeps
parameters in their dtype without a detour through numpy/safetensors. A directory is complete
once ``jt5_config.json`` exists: orbax commits ``params/`` atomically first, the config is then
renamed into place.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from jt5.config import T5Config

CONFIG_NAME = "jt5_config.json"


def config_to_dict(config: T5Config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(d: dict, source: str = CONFIG_NAME) -> T5Config:
    fields = {f.name for f in dataclasses.fields(T5Config)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"{source}: unknown T5Config fields {sorted(unknown)}")
    return T5Config(**d)


def is_native_dir(path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file() and (Path(path) / "params").is_dir()


def _model_class(name: str):
    from jt5.model import T5EncoderModel, T5ForConditionalGeneration
    classes = {c.__name__: c for c in (T5ForConditionalGeneration, T5EncoderModel)}
    if name not in classes:
        raise ValueError(f"unknown model_class {name!r}; expected one of {sorted(classes)}")
    return classes[name]


def save_model(model, path, *, extra_files=None):
    """Write ``model`` to ``path`` (created; an existing jt5 checkpoint there is replaced).

    ``extra_files``: name -> ``str``/``bytes`` written beside it (the tokenizer files, so the
    checkpoint carries its tokenizer as a transformers directory does)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from jt5.bridge.hf import default_file_mode

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).unlink(missing_ok=True)  # incomplete until the config is back
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "params", nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True)
    ckptr.wait_until_finished()
    mode = default_file_mode()
    for name, content in (extra_files or {}).items():
        tmp = path / f".{name}.tmp"
        tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        os.chmod(tmp, mode)
        os.replace(tmp, path / name)
    meta = {"format": "jt5", "model_class": type(model).__name__,
            "config": config_to_dict(model.config)}
    tmp = path / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path / CONFIG_NAME)


def read_meta(path) -> tuple[T5Config, str]:
    f = Path(path) / CONFIG_NAME
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (not a complete jt5 checkpoint)") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: invalid JSON ({e})") from e
    return config_from_dict(meta["config"], str(f)), meta.get("model_class",
                                                              "T5ForConditionalGeneration")


def load_model(path, cls=None, *, shardings=None, **config_overrides):
    """Restore a jt5 checkpoint. ``shardings``: ``abstract_state -> shardings`` (a mesh layout)."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from jt5.model import abstract_model

    config, class_name = read_meta(path)
    config = config.replace(**config_overrides)
    cls = cls or _model_class(class_name)
    graphdef, abstract = nnx.split(abstract_model(config, cls))
    pure = nnx.to_pure_dict(abstract)  # ShapeDtypeStructs
    if shardings is not None:
        placed = shardings(abstract)
        placed = nnx.to_pure_dict(placed) if isinstance(placed, nnx.State) else placed
        pure = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            pure, placed)
    restored = ocp.StandardCheckpointer().restore(Path(path).absolute() / "params", pure)
    restored = jax.tree.map(lambda a, t: a.astype(t.dtype), restored, pure)
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract)
