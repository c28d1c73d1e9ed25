"""Corpus -> memory-mapped token store: streamed, in parallel processes, resumable, per host.

    store = build_token_store(config, tokenizer, process_index, process_count, workers=8,
                              progress=True)
    store.tokens[store.offsets[d]:store.offsets[d + 1]]     # document d's ids (a memmap)

Each host tokenises only its share (documents whose corpus index i has i % process_count ==
process_index; held-out documents excluded) into ``<cache>/tokens/<key>/``. The parent process
reads documents in corpus order and hands blocks of texts to ``workers`` processes; results are
appended in order to ``tokens.bin`` / ``offsets.bin`` / ``doc_index.bin`` / ``doc_source.bin``
(raw little-endian arrays), so memory holds a few blocks, never the corpus or its offsets.

Resumable: the store is built in ``<key>.partial/``, whose ``progress.json`` (rewritten
atomically after every few blocks) records how far the corpus was read and the file sizes that
go with it. An interrupted build run again truncates the files to those sizes and continues
after the recorded document; the finished directory is renamed into place, so a store either
exists whole or not at all. A lock file keeps two processes from building the same store.

Workers are spawned (not forked: the parent may be running jax's threads), so, as with any
spawned multiprocessing, a script that builds a Pipeline keeps its top level under
``if __name__ == "__main__":``; a corpus of one block is tokenised in-process, without workers.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import logging
import multiprocessing
import os
import time
from typing import NamedTuple, Optional

import numpy as np

log = logging.getLogger(__name__)

STORE_VERSION = 2
BLOCK_DOCS = 256              # documents per block handed to a worker
BLOCK_CHARS = 4 << 20         # ... or this many characters, whichever comes first
SAVE_EVERY_S = 10.0           # progress.json at most this often (and at the end)
_FILES = {"tokens": None, "offsets": np.int64, "doc_index": np.int64, "doc_source": np.int32}


class TokenStore(NamedTuple):
    tokens: np.ndarray       # [N] uint16/int32 memmap: this host's documents back to back
    offsets: np.ndarray      # [D + 1] int64 memmap: document d is tokens[offsets[d]:offsets[d + 1]]
    doc_index: np.ndarray    # [D] int64 memmap: each document's corpus index
    doc_source: np.ndarray   # [D] int32 memmap: the --data entry it came from
    meta: dict               # num_tokens, num_documents, per-source counts, ...
    path: str

    def source_documents(self, source: int) -> tuple[int, int]:
        """[first, last) document of a source (documents are stored in source order)."""
        counts = self.meta["source_documents"]
        first = sum(counts[:source])
        return first, first + counts[source]


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def load_store(path: str) -> TokenStore:
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)

    def mapped(name, dtype, count):
        if count == 0:
            return np.zeros(0, dtype)
        return np.memmap(os.path.join(path, f"{name}.bin"), dtype=dtype, mode="r", shape=(count,))

    D = meta["num_documents"]
    return TokenStore(mapped("tokens", meta["dtype"], meta["num_tokens"]),
                      mapped("offsets", np.int64, D + 1), mapped("doc_index", np.int64, D),
                      mapped("doc_source", np.int32, D), meta, path)


# -- workers --------------------------------------------------------------------------------
_TOKENIZER = None


def _init_worker(tokenizer):
    global _TOKENIZER
    _TOKENIZER = tokenizer
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process = one core


def _encode(texts: list, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(lengths [n], ids back to back) of a block; documents under 2 tokens get length 0."""
    arrays = _TOKENIZER.encode_many(texts)
    lengths = np.array([len(a) if len(a) >= 2 else 0 for a in arrays], np.int64)
    kept = [a for a in arrays if len(a) >= 2]
    ids = np.concatenate(kept).astype(dtype) if kept else np.zeros(0, dtype)
    return lengths, ids


class _Partial:
    """The ``.partial`` directory: append-only arrays and the progress record that makes them
    resumable."""

    def __init__(self, path: str, dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        os.makedirs(path, exist_ok=True)
        self.lock = open(os.path.join(path, "lock"), "w")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another process is building the token store {path}") from None
        try:
            with open(os.path.join(path, "progress.json")) as f:
                self.progress = json.load(f)
        except (OSError, ValueError):
            self.progress = dict(next_index=0, num_tokens=0, num_documents=0, source_documents={},
                                 source_tokens={})
        self.files = {}
        sizes = self._sizes()
        for name, size in sizes.items():
            f = open(os.path.join(path, f"{name}.bin"), "ab")
            f.truncate(size)  # drop what was written after the last progress record
            f.seek(size)
            self.files[name] = f
        if sizes["offsets"] == 0:
            self.files["offsets"].write(np.zeros(1, np.int64).tobytes())

    def _sizes(self) -> dict:
        p = self.progress
        D = p["num_documents"]
        return {"tokens": p["num_tokens"] * self.dtype.itemsize,
                "offsets": (D + 1) * 8 if D or p["next_index"] else 0,
                "doc_index": D * 8, "doc_source": D * 4}

    def append(self, lengths, ids, index, source):
        keep = lengths > 0
        p = self.progress
        ends = p["num_tokens"] + np.cumsum(lengths[keep])
        self.files["tokens"].write(ids.tobytes())
        self.files["offsets"].write(ends.astype(np.int64).tobytes())
        self.files["doc_index"].write(np.asarray(index, np.int64)[keep].tobytes())
        self.files["doc_source"].write(np.asarray(source, np.int32)[keep].tobytes())
        p["num_tokens"] += int(lengths.sum())
        p["num_documents"] += int(keep.sum())
        for s, n in zip(np.asarray(source)[keep].tolist(), lengths[keep].tolist()):
            k = str(s)
            p["source_documents"][k] = p["source_documents"].get(k, 0) + 1
            p["source_tokens"][k] = p["source_tokens"].get(k, 0) + n

    def save(self, next_index: int):
        """Record that every document before corpus index ``next_index`` is done."""
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        self.progress["next_index"] = next_index
        tmp = os.path.join(self.path, "progress.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.progress, f)
        os.replace(tmp, os.path.join(self.path, "progress.json"))

    def close(self):
        for f in self.files.values():
            f.close()
        self.lock.close()


def build_token_store(documents, final: str, tokenizer, *, process_index: int = 0,
                      process_count: int = 1, num_sources: int = 1, workers: Optional[int] = None,
                      progress: bool = False, meta: Optional[dict] = None) -> TokenStore:
    """Tokenise this host's share of ``documents`` (``(index, Document, held_out)`` in corpus
    order, as ``corpus.split_heldout`` yields them) into the store at ``final`` (see the module
    docstring); an existing store is memory-mapped as is. ``workers``: tokeniser processes
    (default: the CPUs this process may use, at most 16; 1 tokenises in this process)."""
    if os.path.isfile(os.path.join(final, "meta.json")):
        return load_store(final)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    partial = _Partial(final + ".partial", dtype)
    start = partial.progress["next_index"]
    if start:
        log.info("resuming the tokenisation of %s after document %d", final, start)
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1, 16)
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc=f"tokenising (host {process_index})", unit="doc", initial=start,
                   dynamic_ncols=True, disable=None)  # None: only on a terminal
    pool = None  # started with the second block: a small corpus is tokenised in this process
    _init_worker(tokenizer)
    pending, last_save = [], time.perf_counter()

    def submit(block):
        nonlocal pool
        texts = [t for _, _, t in block]
        if pool is None and workers > 1 and pending:
            # spawn, not fork: the parent may be running jax's threads
            pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(tokenizer,))
        job = pool.submit(_encode, texts, dtype) if pool else _Done(_encode(texts, dtype))
        pending.append((job, [i for i, _, _ in block], [s for _, s, _ in block],
                        block[-1][0] + 1))

    def drain(keep: int):
        nonlocal last_save
        while len(pending) > keep:
            job, index, source, next_index = pending.pop(0)
            lengths, ids = job.result()
            partial.append(lengths, ids, index, source)
            if bar is not None:
                bar.update(next_index - bar.n)
                bar.set_postfix(tokens=f"{partial.progress['num_tokens']:,}", refresh=False)
            if time.perf_counter() - last_save > SAVE_EVERY_S:
                partial.save(next_index)
                last_save = time.perf_counter()

    try:
        block, chars, seen = [], 0, start
        for index, doc, held in documents:
            if index < start:
                continue
            seen = index + 1
            if held or index % process_count != process_index:
                continue
            text = doc.read()
            block.append((index, doc.source, text))
            chars += len(text)
            if len(block) >= BLOCK_DOCS or chars >= BLOCK_CHARS:
                submit(block)
                block, chars = [], 0
                drain(2 * workers)
        if block:
            submit(block)
        drain(0)
        partial.save(seen)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
        partial.close()
    p = partial.progress
    if not p["num_documents"]:
        raise ValueError(f"process {process_index} of {process_count} has no training documents "
                         "(documents are dealt by index % process_count; held-out documents "
                         "are excluded)")
    info = dict(meta or {}, version=STORE_VERSION, dtype=np.dtype(dtype).name,
                num_tokens=p["num_tokens"], num_documents=p["num_documents"],
                source_documents=[p["source_documents"].get(str(s), 0) for s in range(num_sources)],
                source_tokens=[p["source_tokens"].get(str(s), 0) for s in range(num_sources)],
                tokenizer=tokenizer.fingerprint, process_index=process_index,
                process_count=process_count)
    with open(os.path.join(partial.path, "meta.json"), "w") as f:
        json.dump(info, f, indent=1)
    for name in ("progress.json", "lock"):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(partial.path, name))
    try:
        os.rename(partial.path, final)  # atomic; fails if another process got there first
    except OSError:
        if not os.path.isfile(os.path.join(final, "meta.json")):
            raise
    dt = time.perf_counter() - t0
    log.info("tokenised %d documents, %d tokens in %.1fs (%.0f tokens/s) -> %s",
             p["num_documents"], p["num_tokens"], dt, p["num_tokens"] / max(dt, 1e-9), final)
    return load_store(final)


class _Done:
    """A finished job (the in-process path) with the Future interface ``drain`` uses."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value
