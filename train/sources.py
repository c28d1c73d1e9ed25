"""Corpus readers beyond plain text: Parquet, Arrow (Hugging Face ``datasets``), compressed JSONL,
and weighted mixtures of sources.

    specs = parse_sources(["c4/:0.7", "code.jsonl.zst:0.3"])   # [Source(path, weight), ...]
    for doc in parquet_documents("shard.parquet", "shard.parquet", "text"): doc.read()

Every reader streams: Parquet in record batches of ``BATCH_ROWS`` rows of the one column read,
Arrow IPC files memory-mapped batch by batch, JSONL line by line through gzip / zstandard
decompressors. Memory is independent of the corpus size.

What ``--data`` accepts (``corpus.resolve_files`` expands directories):

- ``*.parquet`` files (a string column: ``text``, or ``--text-field``), e.g. C4 / FineWeb /
  CulturaX shards;
- a directory written by ``datasets``' ``save_to_disk`` (``state.json`` + Arrow files; a
  ``DatasetDict`` directory reads its ``train`` split, or name the split's subdirectory);
- ``hf:NAME`` / ``hf:ORG/NAME/CONFIG@SPLIT`` (``hf:NAME/CONFIG`` for a dataset without an
  organisation): a dataset ``datasets.load_dataset`` has already
  prepared in its cache (``HF_DATASETS_CACHE``), read from the cache's Arrow files: offline,
  without ``datasets`` installed;
- ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst`` (also ``.json.gz`` / ``.json.zst``: C4's own
  files): one JSON object per line with the text field;
- ``SOURCE:WEIGHT``: sample that source with probability ``WEIGHT / sum of weights`` per example
  (every source gets a weight, or none does; without weights documents are drawn in proportion
  to their length, i.e. sources in proportion to their tokens).

pyarrow and zstandard are optional (``pip install 'jt5[data]'``); a missing one is one error
line naming the file that needs it.
"""
from __future__ import annotations

import gzip
import importlib
import io
import json
import math
import os
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

BATCH_ROWS = 1024
HF_PREFIX = "hf:"
PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")
_EXTRA = "pip install 'jt5[data]'"


class Source(NamedTuple):
    spec: str                  # what the user wrote, weight stripped
    weight: Optional[float]    # None: unweighted (documents by length)


class Document(NamedTuple):
    key: str                    # stable name: "data/x.jsonl:17", "c4/part-0.parquet:1023"
    read: Callable[[], str]     # the text; parsing / decoding happens here (errors name the file)
    source: int = 0             # index of the --data source it came from


def _module(name: str, path: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        package = name.split(".")[0]
        raise ValueError(f"{path}: reading it needs {package}: {_EXTRA}") from None


# --------------------------------------------------------------------------- --data entries

def parse_sources(entries: Sequence[str]) -> list[Source]:
    """``SOURCE`` or ``SOURCE:WEIGHT`` entries -> Sources (a path that exists is never split)."""
    out = []
    for entry in entries:
        entry = os.fspath(entry)
        if ":" not in entry or os.path.exists(entry):
            out.append(Source(entry, None))
            continue
        head, _, tail = entry.rpartition(":")
        try:
            weight = float(tail)
        except ValueError:
            if entry.startswith(HF_PREFIX):
                out.append(Source(entry, None))
                continue
            raise ValueError(f"--data {entry}: {tail!r} after the last ':' is not a weight "
                             "(SOURCE:WEIGHT takes a positive number)") from None
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"--data {entry}: weight {tail} must be a positive number")
        out.append(Source(head, weight))
    if any(s.weight is None for s in out) and any(s.weight is not None for s in out):
        bare = [s.spec for s in out if s.weight is None]
        raise ValueError(f"--data: give every source a weight or none ({', '.join(bare)} "
                         "has none)")
    return out


def weights(entries: Sequence[str]) -> Optional[list[float]]:
    """Normalised source weights, or None when the sources are unweighted."""
    sources = parse_sources(entries)
    if sources[0].weight is None:
        return None
    total = sum(s.weight for s in sources)
    return [s.weight / total for s in sources]


# --------------------------------------------------------------------------- readers

def utf8(data: bytes, path: str, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _text(value, path: str, where: str, field: str) -> str:
    if value is None:
        return ""  # a null row is an empty document (dropped: shorter than 2 tokens)
    if not isinstance(value, str):
        raise ValueError(f"{path}:{where}: {field!r} is {type(value).__name__}, not a string")
    return value


def _string_column(schema, path: str, field: str):
    pa = _module("pyarrow", path)
    if field not in schema.names:
        names = ", ".join(schema.names[:12])
        raise ValueError(f"{path}: no column {field!r} (columns: {names}); choose one with "
                         "--text-field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)):
        raise ValueError(f"{path}: column {field!r} is {kind}, not a string column")


def parquet_documents(path: str, key: str, field: str, source: int = 0) -> Iterator[Document]:
    pq = _module("pyarrow.parquet", path)
    pa = _module("pyarrow", path)
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    _string_column(f.schema_arrow, path, field)
    row = 0
    try:
        for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=[field]):
            for value in batch.column(0).to_pylist():
                yield Document(f"{key}:{row}", lambda v=value, r=row: _text(v, path, r, field),
                               source)
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: unreadable after row {row} ({e})") from None


def arrow_documents(path: str, key: str, field: str, source: int = 0) -> Iterator[Document]:
    """An Arrow IPC file as ``datasets`` writes them (stream format; the file format too)."""
    pa = _module("pyarrow", path)
    try:
        mapped = pa.memory_map(path)
        try:
            reader = pa.ipc.open_stream(mapped)
        except pa.ArrowInvalid:
            mapped.seek(0)
            reader = pa.ipc.open_file(mapped)
            reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
            schema = None
        else:
            schema = reader.schema
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Arrow file ({e})") from None
    row = 0
    try:
        for batch in reader:
            if schema is None:
                schema = batch.schema
            if row == 0:
                _string_column(schema, path, field)
            for value in batch.column(field).to_pylist():
                yield Document(f"{key}:{row}", lambda v=value, r=row: _text(v, path, r, field),
                               source)
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: unreadable after row {row} ({e})") from None


def _open_lines(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        zstd = _module("zstandard", path)
        raw = open(path, "rb")
        return io.BufferedReader(zstd.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def jsonl_documents(path: str, key: str, field: str = "text", source: int = 0
                    ) -> Iterator[Document]:
    lineno = 0
    try:
        with _open_lines(path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue

                def read(raw=raw, lineno=lineno):
                    line = utf8(raw, path, lineno)
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}, column "
                                         f"{e.colno})") from None
                    if not isinstance(obj, dict) or field not in obj:
                        what = (f"keys {sorted(obj)[:8]}" if isinstance(obj, dict)
                                else type(obj).__name__)
                        raise ValueError(f"{path}:{lineno}: no {field!r} field ({what})")
                    if not isinstance(obj[field], str):
                        kind = type(obj[field]).__name__
                        raise ValueError(f"{path}:{lineno}: {field!r} is {kind}, not a string")
                    return obj[field]

                yield Document(f"{key}:{lineno}", read, source)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; zstd errors below
        raise ValueError(f"{path}: unreadable after line {lineno} ({e})") from None
    except Exception as e:
        if type(e).__module__.startswith("zstandard"):
            raise ValueError(f"{path}: unreadable after line {lineno} ({e})") from None
        raise


# --------------------------------------------------------------------------- datasets

def is_saved_dataset(directory: str) -> bool:
    """A ``save_to_disk`` directory: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return (os.path.isfile(os.path.join(directory, "state.json"))
            or os.path.isfile(os.path.join(directory, "dataset_dict.json")))


def saved_dataset_files(directory: str) -> list[str]:
    """The Arrow files of a ``save_to_disk`` directory, in order (``train`` of a DatasetDict)."""
    dict_file = os.path.join(directory, "dataset_dict.json")
    if os.path.isfile(dict_file):
        with open(dict_file) as f:
            splits = json.load(f).get("splits", [])
        if "train" not in splits:
            raise ValueError(f"{directory}: a DatasetDict without a 'train' split (splits: "
                             f"{', '.join(splits)}); give the split's directory instead")
        directory = os.path.join(directory, "train")
    state = os.path.join(directory, "state.json")
    try:
        with open(state) as f:
            files = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{state}: not a datasets save_to_disk state file ({e})") from None
    return [os.path.join(directory, name) for name in files]


def datasets_cache() -> str:
    """Where ``datasets`` keeps prepared datasets (its own environment variables, in its order)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.path.expanduser(os.environ["HF_DATASETS_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    return os.path.join(os.path.expanduser(home), "datasets")


def cached_dataset_files(spec: str, cache: Optional[str] = None) -> list[str]:
    """``hf:NAME[/CONFIG][@SPLIT]`` -> the Arrow files of that split in the local ``datasets``
    cache; nothing is downloaded and ``datasets`` itself is not needed.

    The cache layout is ``datasets``' own (``<cache>/<org>___<name>/<config>-<hash>/<version>/
    [<revision>/]<name>-<split>[-NNNNN-of-NNNNN].arrow`` beside a ``dataset_info.json``); when a
    dataset was prepared more than once, the newest preparation is read."""
    name, _, split = spec[len(HF_PREFIX):].partition("@")
    split = split or "train"
    parts = name.strip("/").split("/")
    config = parts.pop() if len(parts) == 3 else None  # org/name/config
    cache = cache or datasets_cache()
    root = os.path.join(cache, "___".join(parts))
    if len(parts) == 2 and config is None and not os.path.isdir(root):  # name/config, no org
        config = parts.pop()
        root = os.path.join(cache, parts[0])
    if not parts or not os.path.isdir(root):
        raise ValueError(f"--data {spec}: no dataset {'/'.join(parts)!r} in the datasets cache "
                         f"{cache}; download it first with datasets.load_dataset("
                         f"{'/'.join(parts)!r}) (or set HF_DATASETS_CACHE)")
    prepared = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if "dataset_info.json" in filenames:
            config_dir = os.path.relpath(dirpath, root).split(os.sep)[0]
            if config is None or config_dir.rsplit("-", 1)[0] == config or config_dir == config:
                files = sorted(f for f in filenames if f.endswith(".arrow") and
                               (f"-{split}." in f or f"-{split}-" in f))
                if files:
                    prepared.append((os.path.getmtime(os.path.join(dirpath, "dataset_info.json")),
                                     [os.path.join(dirpath, f) for f in files]))
    if not prepared:
        what = f"config {config!r}, " if config else ""
        raise ValueError(f"--data {spec}: {root} holds no prepared {what}split {split!r} "
                         "(Arrow files beside a dataset_info.json)")
    return max(prepared)[1]
