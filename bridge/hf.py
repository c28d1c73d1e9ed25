"""Read and write transformers model directories; convert state dicts both ways (numpy only).

Reading: ``config.json`` (raw, v4 and v5 spellings), ``model.safetensors``, a sharded
safetensors index, or ``pytorch_model.bin`` (single or sharded) through torch with
``weights_only=True`` — never an arbitrary pickle. Tensors are read lazily, one at a time.
Writing: ``model.safetensors`` (sharded with an index above ``max_shard_size``) + ``config.json``,
each file written to a temporary name and renamed into place, so a crash never leaves a
half-written file under the real name.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from jt5.bridge import keymap
from jt5.config import T5Config

SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file/key/shape."""


# -- reading ----------------------------------------------------------------------------------
def read_config(path) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a transformers model directory?)")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    return raw


def _torch_to_numpy(t) -> np.ndarray:
    import torch
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# safetensors' numpy reader looks these up on numpy itself, which has no float8 types: such
# tensors (fp8-quantised checkpoints, jt5/quant.py) are read from their bytes.
_RAW_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_raw(f: Path, header_len: int, info: dict) -> np.ndarray:
    import ml_dtypes
    lo, hi = info["data_offsets"]
    data = np.fromfile(f, dtype=np.uint8, count=hi - lo, offset=8 + header_len + lo)
    return data.view(getattr(ml_dtypes, _RAW_DTYPES[info["dtype"]])).reshape(info["shape"])


class StateDict(Mapping):
    """A lazy, read-only ``{key: np.ndarray}`` over the weight files of a model directory."""

    def __init__(self, path):
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._bins: dict[Path, dict] = {}
        self._headers: dict[Path, tuple] = {}
        p = self.path
        if (p / SAFE).is_file():
            self._add_safetensors(p / SAFE)
        elif (p / SAFE_INDEX).is_file():
            self._add_index(p / SAFE_INDEX, self._add_safetensors)
        elif (p / BIN).is_file():
            self._add_bin(p / BIN)
        elif (p / BIN_INDEX).is_file():
            self._add_index(p / BIN_INDEX, self._add_bin)
        else:
            raise CheckpointError(f"{p}: no weights found (looked for {SAFE}, {SAFE_INDEX}, {BIN}, "
                                  f"{BIN_INDEX})")

    def _add_index(self, index: Path, add):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid weight index ({e!r})") from e
        files = sorted(set(weight_map.values()))
        for name in files:
            shard = index.parent / name
            if not shard.is_file():
                raise CheckpointError(f"{index}: shard {name} is missing")
            add(shard)
        for key, name in weight_map.items():
            if self._where.get(key) != index.parent / name:
                raise CheckpointError(f"{index}: {key} is listed in {name} but not stored there")

    def _add_safetensors(self, f: Path):
        from safetensors import SafetensorError, safe_open
        try:
            h = safe_open(str(f), framework="numpy")
            keys = list(h.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from e
        expected = os.path.getsize(f)
        # safe_open validates the header but not that every tensor's bytes are present.
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
        if 8 + header_len + end > expected:
            raise CheckpointError(f"{f}: truncated ({expected} bytes, header needs "
                                  f"{8 + header_len + end})")
        self._handles[f] = h
        self._headers[f] = (header_len, header)
        for k in keys:
            self._where[k] = f

    def _add_bin(self, f: Path):
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(f"{f}: reading pytorch_model.bin needs torch (pip install "
                                  f"torch==2.13.0), or convert it to safetensors") from e
        try:
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for bad pickles / truncated zips
            raise CheckpointError(f"{f}: cannot read as a weights-only PyTorch checkpoint "
                                  f"({type(e).__name__}: {e})") from e
        if not isinstance(sd, dict):
            raise CheckpointError(f"{f}: expected a state dict, got {type(sd).__name__}")
        self._bins[f] = sd
        for k in sd:
            self._where[k] = f

    def __getitem__(self, key) -> np.ndarray:
        f = self._where[key]
        if f in self._bins:
            return _torch_to_numpy(self._bins[f][key])
        header_len, header = self._headers[f]
        if header[key]["dtype"] in _RAW_DTYPES:
            return _read_raw(f, header_len, header[key])
        try:
            return self._handles[f].get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensor {key} ({e})") from e

    def shape(self, key) -> tuple:
        f = self._where[key]
        if f in self._bins:
            return tuple(self._bins[f][key].shape)
        return tuple(self._handles[f].get_slice(key).get_shape())

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def _shape(state_dict, key) -> tuple:
    return state_dict.shape(key) if isinstance(state_dict, (StateDict, Unprefixed)) else tuple(
        np.shape(state_dict[key]))


class Unprefixed(Mapping):
    """A task head's state dict (base-model keys under ``transformer.``) seen with the base
    model's own names; the head's tensors keep theirs. So one set of rules reads a head
    checkpoint, a base checkpoint into a head, and a head checkpoint into a base model, as
    transformers' prefix handling in ``from_pretrained`` does."""

    def __init__(self, state_dict: Mapping, prefix: str = keymap.BASE_PREFIX):
        self.inner = state_dict
        self._names = {}
        for k in state_dict:
            name = k[len(prefix):] if k.startswith(prefix) else k
            if name in self._names:
                raise CheckpointError(f"both {k} and {self._names[name]} are in the checkpoint")
            self._names[name] = k

    def __getitem__(self, key):
        return self.inner[self._names[key]]

    def shape(self, key) -> tuple:
        return _shape(self.inner, self._names[key])

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def _without_prefix(state_dict: Mapping) -> Mapping:
    if any(k.startswith(keymap.BASE_PREFIX) for k in state_dict):
        return Unprefixed(state_dict)
    return state_dict


def _check_keys(state_dict, config: T5Config, rules, *, encoder_only: bool, source: str,
                head: str | None = None):
    """Every tensor the config needs is there with the right shape; nothing is left over.

    A head's own tensors may be absent all together (a base checkpoint loaded into a head: they
    are initialised fresh, ``jt5.weights`` says which). Returns the tensors left unused and
    announced (``lm_head.weight`` under a head, another head's tensors) as transformers does."""
    head_keys = {r.hf for r in keymap.head_rules(config, head)} if head else set()
    absent = [r.hf for r in rules if r.hf not in state_dict]
    missing = [k for k in absent if k not in head_keys]
    if 0 < len(absent) - len(missing) < len(head_keys):  # part of a head: a broken file
        missing = absent
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} tensor(s) that config.json "
                              f"requires, e.g. {missing[:5]}")
    rules = [r for r in rules if r.hf in state_dict]
    used = {r.hf for r in rules}
    for r in rules:
        got, want = _shape(state_dict, r.hf), keymap.hf_shape(r)
        if got != want:
            raise CheckpointError(
                f"{source}: {r.hf} has shape {got} but config.json implies {want} (d_model="
                f"{config.d_model}, num_heads={config.num_heads}, d_kv={config.d_kv}, d_ff="
                f"{config.d_ff}, vocab_size={config.vocab_size})")

    def ignorable(k):
        return k in _TIED_COPIES or (encoder_only and (k.startswith("decoder.") or
                                                       k == "lm_head.weight"))

    def announced(k):
        return k.startswith(keymap.HEAD_KEY_ROOTS) or (head is not None and k == "lm_head.weight")

    unused = [k for k in state_dict if k not in used and not ignorable(k) and announced(k)]
    unexpected = [k for k in state_dict if k not in used and not ignorable(k) and not announced(k)]
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} unexpected tensor(s) for a {config.model_type} model "
            f"with num_layers={config.num_layers}, num_decoder_layers="
            f"{config.num_decoder_layers}, feed_forward_proj={config.feed_forward_proj!r}: "
            f"{unexpected[:5]}")
    for k in _TIED_COPIES:
        if k in state_dict and not (encoder_only and k.startswith("decoder.")):
            if not np.array_equal(np.asarray(state_dict[k]), np.asarray(state_dict["shared.weight"])):
                raise CheckpointError(f"{source}: {k} differs from shared.weight; T5 ties the "
                                      f"input embeddings of both stacks to shared.weight")
    return rules, unused


def _config_dict(hf_config) -> Mapping:
    """A raw config dict; a transformers ``PretrainedConfig`` object is read via ``to_dict()``."""
    if isinstance(hf_config, Mapping):
        return hf_config
    if callable(getattr(hf_config, "to_dict", None)):
        return hf_config.to_dict()
    raise TypeError(f"hf_config must be a config.json dict or a transformers PretrainedConfig, "
                    f"got {type(hf_config).__name__}")


def iter_hf_to_jt5(state_dict: Mapping, hf_config: Mapping, *, encoder_only: bool = False,
                   head: str | None = None, source: str = "state dict"
                   ) -> tuple[T5Config, Iterator]:
    """Validate, then stream ``(jt5 path, array)`` pairs one tensor at a time.

    ``head``: read for a task head (``keymap.HEADS``); a checkpoint without the head's tensors
    yields none for them. Tensors left unused by design (another head's, ``lm_head`` under a
    head) are announced with a warning naming them."""
    hf_config = _config_dict(hf_config)
    state_dict = _without_prefix(state_dict)
    if head is not None:
        encoder_only = keymap.HEADS[head].encoder_only
    config = keymap.config_from_hf(
        hf_config, has_lm_head=(head is None and not encoder_only
                                and "lm_head.weight" in state_dict), source=source)
    rules = [r._replace(hf=r.hf[len(keymap.BASE_PREFIX):])
             if r.hf.startswith(keymap.BASE_PREFIX) else r
             for r in keymap.rules(config, encoder_only=encoder_only, head=head)]
    rules, unused = _check_keys(state_dict, config, rules, encoder_only=encoder_only,
                                source=source, head=head)
    if unused:
        warnings.warn(f"{source}: {len(unused)} tensor(s) of the checkpoint are not used by this "
                      f"model: {unused[:8]}", stacklevel=3)
    return config, ((r.jt5, keymap.to_jt5(r, np.asarray(state_dict[r.hf]))) for r in rules)


def hf_to_jt5(state_dict: Mapping, hf_config: Mapping, *, encoder_only: bool = False,
              head: str | None = None):
    """transformers state dict (numpy) + raw config dict (or a transformers config object)
    -> ``(T5Config, {jt5 path: array})``."""
    config, pairs = iter_hf_to_jt5(state_dict, hf_config, encoder_only=encoder_only, head=head)
    return config, dict(pairs)


def jt5_to_hf(config: T5Config, params: Mapping, *, encoder_only: bool = False,
              head: str | None = None):
    """``{jt5 path: array}`` -> ``(transformers state dict, config.json dict)`` (numpy).
    ``head``: the parameters are a task head's (``keymap.HEADS``)."""
    rules = keymap.rules(config, encoder_only=encoder_only, head=head)
    missing = [r.jt5 for r in rules if r.jt5 not in params]
    if missing:
        raise CheckpointError(f"jt5 params lack {missing[:5]}")
    sd = {}
    for r in rules:
        w = np.asarray(params[r.jt5])
        if w.shape != r.shape:
            raise CheckpointError(f"jt5 param {'/'.join(map(str, r.jt5))} has shape {w.shape}, "
                                  f"config implies {r.shape}")
        sd[r.hf] = np.ascontiguousarray(keymap.to_hf(r, w))
    written = head is None and not encoder_only and keymap.head_is_written(config)
    if written and "lm_head.weight" not in sd:  # shared head, unscaled: write it as a copy
        sd["lm_head.weight"] = sd["shared.weight"].copy()
    hf_config = keymap.config_to_hf(config, encoder_only=encoder_only, head_written=written,
                                    head=head)
    dtypes = {str(a.dtype) for a in sd.values()}
    if len(dtypes) == 1:
        hf_config["torch_dtype"] = dtypes.pop()
    return sd, hf_config


# -- writing ----------------------------------------------------------------------------------
def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0644 under umask 022).

    Writers that go through temporary files (safetensors' ``save_file``, ``tempfile``) create
    them 0600; files renamed into a model directory get this mode instead, so an export is as
    readable as anything else the user writes."""
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask


def write_hf_dir(path, state_dict: Mapping, hf_config: Mapping, *, max_shard_size="5GB",
                 extra_files: Mapping | None = None):
    """Write safetensors (+ index if sharded) and config.json; each file renamed into place.

    ``extra_files``: name -> ``str`` or ``bytes`` written beside them (tokenizer files)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    shards, cur, size = [], {}, 0
    for k, w in state_dict.items():
        if cur and size + w.nbytes > limit:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = w
        size += w.nbytes
    shards.append(cur)
    tmp = Path(tempfile.mkdtemp(prefix=".jt5-tmp-", dir=path))
    try:
        names = ([SAFE] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, shard in zip(names, shards):
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
        files = list(names)
        if len(shards) > 1:
            index = {"metadata": {"total_size": int(sum(w.nbytes for w in state_dict.values()))},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2))
            files.append(SAFE_INDEX)
        for name, content in (extra_files or {}).items():
            if isinstance(content, str):
                content = content.encode("utf-8")
            (tmp / name).write_bytes(content)
            files.append(name)
        (tmp / "config.json").write_text(json.dumps(dict(hf_config), indent=2) + "\n")
        files.append("config.json")  # last: a directory with a config has complete weights
        stale = {SAFE, SAFE_INDEX, BIN, BIN_INDEX} - set(files)
        for old in stale | {p.name for p in path.glob("model-*-of-*.safetensors")} - set(files):
            (path / old).unlink(missing_ok=True)
        mode = default_file_mode()
        for name in files:
            os.chmod(tmp / name, mode)
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
