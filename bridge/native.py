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


def write_checkpoint(path, config: T5Config, model_class: str, params, *, extra_files=None):
    """Write ``params`` (a pure dict of arrays, ``nnx.to_pure_dict`` of the model's parameters)
    to ``path`` (created; an existing jt5 checkpoint there is replaced).

    ``extra_files``: name -> ``str``/``bytes`` written beside it (the tokenizer files, so the
    checkpoint carries its tokenizer as a transformers directory does)."""
    import orbax.checkpoint as ocp

    from jt5.bridge.hf import default_file_mode

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).unlink(missing_ok=True)  # incomplete until the config is back
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "params", params, force=True)
    ckptr.wait_until_finished()
    mode = default_file_mode()
    for name, content in (extra_files or {}).items():
        tmp = path / f".{name}.tmp"
        tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        os.chmod(tmp, mode)
        os.replace(tmp, path / name)
    meta = {"format": "jt5", "model_class": model_class, "config": config_to_dict(config)}
    tmp = path / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path / CONFIG_NAME)


def read_params(path, targets):
    """The stored parameters restored into ``targets`` (a pure dict of ShapeDtypeStructs with
    shardings: orbax reshards onto them)."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(Path(path).absolute() / "params", targets)


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
