"""UL2 pretraining data: sources -> tokens (cached) -> UL2 examples -> fixed-shape, host-local batches.

How the training loop uses it (flags ``--data --tokenizer --inputs-length --targets-length
--batch-size --seed``)::

    config = DataConfig(data=args.data, tokenizer=args.tokenizer, inputs_length=args.inputs_length,
                        targets_length=args.targets_length, batch_size=args.batch_size, seed=args.seed)
    data = Pipeline(config, process_index=jax.process_index(), process_count=jax.process_count())
    assert data.vocab_size <= model_config.vocab_size
    for step, batch in data.iterate(start_step):      # or batch = data.batch(step)
        ...                                           # batch: dict of numpy arrays, local rows only
    prompts = data.sample_prompts()                   # held-out examples for sample outputs

``batch(step)`` is a pure function of (config, step, process_index): a resumed run only needs the
step (nothing else to checkpoint), and a fresh Pipeline recomputes any batch exactly.

Batch features (t5x / seqio names), ``[B_local, inputs_length]`` or ``[B_local, targets_length]``::

    encoder_input_tokens, encoder_segment_ids, encoder_positions            int32
    decoder_input_tokens, decoder_target_tokens, decoder_segment_ids,
    decoder_positions                                                       int32
    decoder_loss_weights                                                    float32

Segment ids start at 1 per row (0 = padding); unpacked rows hold one example, segment 1. Positions
restart at 0 in each segment; ``decoder_input_tokens`` are the targets shifted right with the
decoder start id 0 at the start of *each* segment. Attention must use the segment ids (encoder
self-attention, decoder self-attention, and cross-attention between equal ids) so packed examples
never see each other.

Sampling. Each host owns the documents whose corpus index i has i % process_count ==
process_index (held-out documents excluded) and tokenises only those, once, into a memory-mapped
cache (``<cache>/tokens/<key>/``, key = hash of sources + tokenizer + host share, written to a
temporary directory and renamed into place). A step's rows are built from candidates drawn from
``np.random.Generator(PCG64(SeedSequence([seed, step, process_index])))``: a denoiser from the
mixture, a document with probability proportional to its length, and a random window of the
denoiser's raw length inside it (the whole document if shorter). This is sampling with replacement:
tokens within one raw length of a document's ends are seen somewhat less often than the middle.

Packing (``pack=True``): candidates are placed first-fit into the step's rows until one fits in no
row; that one candidate is discarded (a random draw, not a piece of the corpus — sampling is with
replacement), so at most one draw per step is dropped and nothing is silently truncated. Each raw
length is chosen so an example fills its inputs or its targets, so packing mostly fills gaps with
short documents and document tails; ``python -m jt5.train.data`` measures the fill.

Measured (one core of a shared 2-core CPU box, byte tokenizer, builtin corpus, 128 local rows at
inputs 512 / targets 114, UL2 mixture): ~15-19k examples/s packed (~130-150 batches/s, ~10-12M token
slots/s), ~27k examples/s unpacked; fill encoder 0.59, decoder 0.95 (at 512/114 the X denoisers
fill their targets with short inputs, and S prefixes are uniform in length). ``make_examples``
alone: ~90k examples/s on large batches. Per batch the cost is ~5-7 ms: far below a GPU step.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np

from jt5.tokenizer import Tokenizer, load_tokenizer
from jt5.train import corpus
from jt5.train.ul2 import (MODE_NAMES, Denoiser, Examples, SpecialIds, draw_splits, example_lengths,
                           fit_raw_length, make_examples, mixture_probs, prefix_lm_lengths,
                           resolve_mixture)

log = logging.getLogger(__name__)

ENCODER_FEATURES = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions")
DECODER_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
                    "decoder_positions", "decoder_loss_weights")
FEATURES = ENCODER_FEATURES + DECODER_FEATURES
STORE_VERSION = 1
_HELDOUT_TAG = 0x48454C44  # "HELD": seeds the sample-prompt generator apart from the steps'


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything that determines the batches. ``data``: sources for ``corpus.iter_documents``
    ("builtin", files, directories). ``batch_size`` is global (all hosts). ``mixture``: a name in
    ``ul2.MIXTURES`` or a tuple of Denoisers. ``mode_ids``: ids of [R], [S], [X] (default: the
    tokenizer's three lowest extra ids); sentinels count down from ``first_sentinel`` (default: all
    other extra ids, ``<extra_id_0>`` first)."""

    data: Union[str, tuple[str, ...]] = ("builtin",)
    tokenizer: str = "byte"
    inputs_length: int = 512
    targets_length: int = 114
    batch_size: int = 128
    mixture: Union[str, tuple[Denoiser, ...]] = "ul2"
    pack: bool = True
    seed: int = 0
    heldout_documents: int = 8
    max_doc_chars: int = corpus.MAX_CHARS
    cache_dir: Optional[str] = None  # None: $JT5_CACHE, else ~/.cache/jt5
    mode_ids: Optional[tuple[int, ...]] = None
    first_sentinel: Optional[int] = None
    num_sentinels: Optional[int] = None

    def __post_init__(self):
        data = (self.data,) if isinstance(self.data, (str, os.PathLike)) else tuple(self.data)
        object.__setattr__(self, "data", tuple(os.fspath(d) for d in data))
        if not self.data:
            raise ValueError("data: give at least one source ('builtin', a file or a directory)")
        if not isinstance(self.mixture, str):
            object.__setattr__(self, "mixture", resolve_mixture(self.mixture))
        resolve_mixture(self.mixture)
        if self.mode_ids is not None:
            object.__setattr__(self, "mode_ids", tuple(int(i) for i in self.mode_ids))
        for name in ("inputs_length", "targets_length", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.seed < 0 or self.heldout_documents < 0:
            raise ValueError(f"seed={self.seed} and heldout_documents={self.heldout_documents} "
                             "must be >= 0")


def special_ids(tokenizer: Tokenizer, mixture: Sequence[Denoiser], mode_ids=None,
                first_sentinel=None, num_sentinels=None) -> SpecialIds:
    """EOS, sentinel ids and mode-token ids for a tokenizer (see DataConfig for the defaults)."""
    extra = [int(i) for i in tokenizer.extra_ids]
    used_modes = [m for m in MODE_NAMES if any(d.mode == m for d in mixture)]
    unknown = {d.mode for d in mixture if d.mode is not None} - set(MODE_NAMES)
    if unknown:
        raise ValueError(f"unknown mode tokens {sorted(unknown)}; known: {MODE_NAMES}")
    if mode_ids is not None:
        if len(mode_ids) != len(MODE_NAMES):
            raise ValueError(f"mode_ids are the ids of {MODE_NAMES}: need {len(MODE_NAMES)}, "
                             f"got {len(mode_ids)}")
        modes = dict(zip(MODE_NAMES, (int(i) for i in mode_ids)))
    else:
        if used_modes and len(extra) < len(MODE_NAMES) + 1:
            raise ValueError(f"{tokenizer!r} has {len(extra)} extra ids; the mixture needs mode "
                             "tokens and sentinels: set mode_ids / first_sentinel, or use a "
                             "tokenizer with <extra_id_N> tokens")
        modes = dict(zip(MODE_NAMES, sorted(extra)[:len(MODE_NAMES)])) if used_modes else {}
    modes = {m: modes[m] for m in used_modes}
    if first_sentinel is not None:
        count = num_sentinels if num_sentinels is not None else first_sentinel + 1
        sentinels = np.arange(first_sentinel, first_sentinel - count, -1, dtype=np.int64)
    else:
        taken = set(modes.values())
        sentinels = np.array([i for i in extra if i not in taken], np.int64)
        if num_sentinels is not None:
            sentinels = sentinels[:num_sentinels]
    if len(sentinels) == 0:
        raise ValueError(f"{tokenizer!r} has no <extra_id_N> tokens to use as sentinels; "
                         "set first_sentinel")
    clash = set(modes.values()) & set(sentinels.tolist())
    if clash:
        raise ValueError(f"ids {sorted(clash)} are both mode tokens and sentinels")
    if sentinels.min() < 0:
        raise ValueError(f"sentinel ids must be >= 0; got down to {int(sentinels.min())}")
    return SpecialIds(int(tokenizer.eos_id), sentinels, modes)


# --------------------------------------------------------------------------- token store

class TokenStore(NamedTuple):
    tokens: np.ndarray     # [N] uint16/int32 memmap: this host's documents back to back
    offsets: np.ndarray    # [D + 1] int64: document d is tokens[offsets[d]:offsets[d + 1]]
    doc_index: np.ndarray  # [D] int64: each document's corpus index
    path: str


def cache_root(config: DataConfig) -> str:
    return config.cache_dir or os.environ.get("JT5_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "jt5")


def _store_key(config: DataConfig, tokenizer: Tokenizer, process_index: int, process_count: int) -> str:
    spec = [STORE_VERSION, corpus.fingerprint(config.data, config.max_doc_chars), tokenizer.fingerprint,
            config.heldout_documents, process_index, process_count]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:24]


def _load_store(path: str) -> TokenStore:
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    tokens = np.memmap(os.path.join(path, "tokens.bin"), dtype=meta["dtype"], mode="r",
                       shape=(meta["num_tokens"],))
    return TokenStore(tokens, np.load(os.path.join(path, "offsets.npy")),
                      np.load(os.path.join(path, "doc_index.npy")), path)


def build_token_store(config: DataConfig, tokenizer: Tokenizer, process_index: int = 0,
                      process_count: int = 1) -> TokenStore:
    """Tokenise this host's share of the corpus once; later calls memory-map the cached result."""
    key = _store_key(config, tokenizer, process_index, process_count)
    final = os.path.join(cache_root(config), "tokens", key)
    if os.path.isfile(os.path.join(final, "meta.json")):
        return _load_store(final)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=os.path.dirname(final))
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    offsets, doc_index, pending = [0], [], []
    t0 = time.perf_counter()
    try:
        with open(os.path.join(tmp, "tokens.bin"), "wb") as f:
            def flush():
                arrays = tokenizer.encode_many([text for _, text in pending])
                for (index, _), ids in zip(pending, arrays):
                    if len(ids) >= 2:  # an example needs two tokens
                        f.write(np.asarray(ids, dtype).tobytes())
                        offsets.append(offsets[-1] + len(ids))
                        doc_index.append(index)
                pending.clear()

            docs = corpus.iter_documents(config.data, config.max_doc_chars)
            for index, doc, held in corpus.split_heldout(docs, config.heldout_documents):
                if held or index % process_count != process_index:
                    continue
                pending.append((index, doc.read()))
                if len(pending) >= 256:
                    flush()
            flush()
        if not doc_index:
            raise ValueError(f"process {process_index} of {process_count} has no training documents "
                             f"in {list(config.data)} (documents are dealt by index % process_count; "
                             f"{config.heldout_documents} may be held out)")
        np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, np.int64))
        np.save(os.path.join(tmp, "doc_index.npy"), np.asarray(doc_index, np.int64))
        meta = dict(version=STORE_VERSION, dtype=np.dtype(dtype).name, num_tokens=int(offsets[-1]),
                    num_documents=len(doc_index), data=list(config.data), tokenizer=tokenizer.fingerprint,
                    process_index=process_index, process_count=process_count)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not os.path.isfile(os.path.join(final, "meta.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tokenised %d documents, %d tokens in %.1fs -> %s", len(doc_index), offsets[-1],
             time.perf_counter() - t0, final)
    return _load_store(final)


# --------------------------------------------------------------------------- batches

def assemble(ex: Examples, row, inputs_offset, targets_offset, segment, num_rows: int) -> dict:
    """Scatter examples into [num_rows, L] feature arrays at the given rows, offsets, segment ids."""
    batch = {}
    for side, tokens, lengths, offset in (("encoder", ex.inputs, ex.inputs_lengths, inputs_offset),
                                          ("decoder", ex.targets, ex.targets_lengths, targets_offset)):
        L = tokens.shape[1]
        lengths = np.asarray(lengths, np.int64)
        vals = tokens[np.arange(L)[None, :] < lengths[:, None]]      # examples back to back
        start = np.cumsum(lengths) - lengths
        pos = np.arange(len(vals), dtype=np.int32) - np.repeat(start, lengths).astype(np.int32)
        flat = np.repeat(np.asarray(row, np.int64) * L + offset, lengths) + pos   # index into [rows * L]
        out = {}
        for name, values in (("tokens", vals), ("segment_ids", np.repeat(segment, lengths)),
                             ("positions", pos)):
            a = np.zeros(num_rows * L, np.int32)
            a[flat] = values
            out[name] = a.reshape(num_rows, L)
        if side == "encoder":
            batch.update(encoder_input_tokens=out["tokens"], encoder_segment_ids=out["segment_ids"],
                         encoder_positions=out["positions"])
        else:
            shifted = np.roll(vals, 1)
            shifted[pos == 0] = 0  # decoder start id at the start of each segment
            dec_in = np.zeros(num_rows * L, np.int32)
            dec_in[flat] = shifted
            seg = out["segment_ids"]
            batch.update(decoder_input_tokens=dec_in.reshape(num_rows, L),
                         decoder_target_tokens=out["tokens"],
                         decoder_segment_ids=seg, decoder_positions=out["positions"],
                         decoder_loss_weights=(seg > 0).astype(np.float32))
    return {k: batch[k] for k in FEATURES}


def batch_stats(batch: dict) -> dict:
    """Fill of a batch: fraction of encoder / decoder slots holding tokens, examples per row."""
    enc, dec = batch["encoder_segment_ids"], batch["decoder_segment_ids"]
    return dict(encoder_fill=float((enc > 0).mean()), decoder_fill=float((dec > 0).mean()),
                examples_per_row=float(enc.max(axis=1).mean()), examples=int(enc.max(axis=1).sum()))


class Prompt(NamedTuple):
    """A held-out example for sample outputs: generate from ``inputs``, compare with ``targets``."""
    denoiser: Denoiser
    document: str          # corpus key of the held-out document
    inputs: np.ndarray     # [n] int32, mode + corrupted text + EOS (unpadded)
    targets: np.ndarray    # [m] int32, ... + EOS


class Pipeline:
    """Host-local UL2 batches for one DataConfig; see the module docstring."""

    def __init__(self, config: DataConfig, *, process_index: int = 0, process_count: int = 1,
                 tokenizer: Optional[Tokenizer] = None):
        if not 0 <= process_index < process_count:
            raise ValueError(f"{process_index=} must be in [0, {process_count=})")
        if config.batch_size % process_count:
            raise ValueError(f"batch_size={config.batch_size} is not divisible by {process_count=}")
        self.config = config
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = config.batch_size // process_count
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
        self.mixture = resolve_mixture(config.mixture)
        self.probs = mixture_probs(self.mixture)
        self.specials = special_ids(self.tokenizer, self.mixture, config.mode_ids,
                                    config.first_sentinel, config.num_sentinels)
        self.raw_lengths = np.array([
            fit_raw_length(d, config.inputs_length, config.targets_length, len(self.specials.sentinels),
                           int(d.mode is not None)) for d in self.mixture], np.int64)
        self._is_s = np.array([d.kind == "S" for d in self.mixture])
        self._has_mode = np.array([d.mode is not None for d in self.mixture], np.int64)
        self.store = build_token_store(config, self.tokenizer, process_index, process_count)
        self._heldout = None

    @property
    def vocab_size(self) -> int:
        """Ids the batches can contain are < vocab_size (the model's vocab must be at least this)."""
        return max(self.tokenizer.vocab_size, int(self.specials.sentinels.max()) + 1,
                   max(self.specials.modes.values(), default=0) + 1)

    def describe(self) -> str:
        s = self.store
        lines = [f"data: {list(self.config.data)}; host {self.process_index}/{self.process_count}: "
                 f"{len(s.doc_index)} documents, {len(s.tokens):,} tokens; {self.tokenizer!r}",
                 f"shape: {self.local_batch_size} local rows x ({self.config.inputs_length}, "
                 f"{self.config.targets_length}); pack={self.config.pack}; modes={self.specials.modes}; "
                 f"{len(self.specials.sentinels)} sentinels from {int(self.specials.sentinels[0])} down"]
        lines += [f"  {d}  raw length {n}" for d, n in zip(self.mixture, self.raw_lengths)]
        return "\n".join(lines)

    def _rng(self, step: int) -> np.random.Generator:
        if step < 0:
            raise ValueError(f"{step=} must be >= 0")
        return np.random.Generator(np.random.PCG64(
            np.random.SeedSequence([self.config.seed, step, self.process_index])))

    def _draw(self, rng: np.random.Generator, n: int):
        """n candidate draws: (denoiser, window start, window length, S split) — no corruption yet."""
        offsets = self.store.offsets
        which = rng.choice(len(self.mixture), size=n, p=self.probs)
        raw = self.raw_lengths[which]
        s_rows = self._is_s[which]
        if s_rows.any():  # prefix-LM: a random prefix length + a full target
            room = self.config.inputs_length - 1 - self._has_mode[which[s_rows]]
            raw[s_rows] = prefix_lm_lengths(int(s_rows.sum()), room, self.config.targets_length - 1, rng)
        doc = np.searchsorted(offsets, rng.integers(0, offsets[-1], size=n), side="right") - 1
        doc_len = offsets[doc + 1] - offsets[doc]
        length = np.minimum(raw, doc_len)
        start = offsets[doc] + rng.integers(0, doc_len - length + 1)
        split = draw_splits(length, which, self.mixture, self.config.inputs_length,
                            self.config.targets_length, rng)
        return which, start, length, split

    def _examples(self, rng: np.random.Generator, draws) -> Examples:
        which, start, length, split = draws
        idx = np.minimum(start[:, None] + np.arange(int(length.max())), self.store.offsets[-1] - 1)
        chunks = np.asarray(self.store.tokens[idx])
        return make_examples(chunks, length, which, self.mixture, self.specials,
                             self.config.inputs_length, self.config.targets_length, rng, split)

    def batch(self, step: int) -> dict:
        """This host's rows of global batch ``step``: a pure function of (config, step, process_index)."""
        rng = self._rng(step)
        rows = self.local_batch_size
        if not self.config.pack:
            ex = self._examples(rng, self._draw(rng, rows))
            zero = np.zeros(rows, np.int64)
            return assemble(ex, np.arange(rows), zero, zero, np.ones(rows, np.int32), rows)
        # First-fit on the examples' lengths (known before corruption), then corrupt the placed draws.
        L_in, L_tgt = self.config.inputs_length, self.config.targets_length
        free_in = np.full(rows, L_in, np.int64)
        free_tgt = np.full(rows, L_tgt, np.int64)
        nseg = np.zeros(rows, np.int32)
        draws, placement = [], []
        size, done = rows, False
        min_in, min_tgt = 3, 2  # smallest possible example: [mode?] tok EOS / tok EOS
        while not done:
            d = self._draw(rng, size)
            in_len, tgt_len = example_lengths(d[2], d[0], d[3], self.mixture)
            used = 0
            for li, lt in zip(in_len.tolist(), tgt_len.tolist()):
                ok = np.flatnonzero((free_in >= li) & (free_tgt >= lt))
                if not len(ok):
                    done = True  # this draw is discarded (see module docstring)
                    break
                r = ok[0]
                nseg[r] += 1
                placement.append((r, L_in - free_in[r], L_tgt - free_tgt[r], nseg[r]))
                free_in[r] -= li
                free_tgt[r] -= lt
                used += 1
            draws.append(tuple(x[:used] for x in d))
            if not np.any((free_in >= min_in) & (free_tgt >= min_tgt)):
                break
            # Next draw: about as many candidates as the free space can take (>= 1).
            size = int(np.clip(np.ceil(len(placement) * min(
                free_in.sum() / (rows * L_in - free_in.sum()),
                free_tgt.sum() / (rows * L_tgt - free_tgt.sum()))), 1, 4 * rows))
        ex = self._examples(rng, tuple(np.concatenate(x) for x in zip(*draws)))
        r, off_in, off_tgt, seg = (np.asarray(c, np.int64) for c in zip(*placement))
        return assemble(ex, r, off_in, off_tgt, seg, rows)

    def iterate(self, start_step: int = 0, prefetch: int = 2) -> Iterator[tuple[int, dict]]:
        """(step, batch) from ``start_step`` on; ``prefetch`` batches are built ahead in a thread."""
        step = start_step
        if prefetch <= 0:
            while True:
                yield step, self.batch(step)
                step += 1
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jt5-data") as pool:
            queue = collections.deque(pool.submit(self.batch, s) for s in range(step, step + prefetch))
            while True:
                batch = queue.popleft().result()
                queue.append(pool.submit(self.batch, step + prefetch))
                yield step, batch
                step += 1

    # ----------------------------------------------------------------------- held-out split

    def heldout_documents(self) -> list[tuple[str, str]]:
        """(key, text) of the held-out documents (the same on every host; never in any batch)."""
        if self._heldout is None:
            docs = corpus.iter_documents(self.config.data, self.config.max_doc_chars)
            self._heldout = [(d.key, d.read()) for _, d, held in
                             corpus.split_heldout(docs, self.config.heldout_documents) if held]
        return self._heldout

    def sample_prompts(self, per_kind: int = 1) -> list[Prompt]:
        """``per_kind`` held-out examples for each denoiser kind in the mixture (R, S, X order),
        each from the first denoiser of that kind, cycling over held-out documents. Deterministic."""
        docs = [(k, np.asarray(self.tokenizer.encode(t), np.int64)) for k, t in self.heldout_documents()]
        docs = [(k, ids) for k, ids in docs if len(ids) >= 2]
        if not docs:
            return []
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [self.config.seed, _HELDOUT_TAG, 0, 0])))
        out, j = [], 0
        for kind in ("R", "S", "X"):
            index = next((i for i, d in enumerate(self.mixture) if d.kind == kind), None)
            for _ in range(per_kind if index is not None else 0):
                key, ids = docs[j % len(docs)]
                j += 1
                raw = int(self.raw_lengths[index])
                if kind == "S":
                    raw = int(prefix_lm_lengths(1, self.config.inputs_length - 1 - self._has_mode[index],
                                                self.config.targets_length - 1, rng)[0])
                n = min(raw, len(ids))
                start = int(rng.integers(0, len(ids) - n + 1))
                ex = make_examples(ids[None, start:start + n], [n], [index], self.mixture, self.specials,
                                   self.config.inputs_length, self.config.targets_length, rng)
                out.append(Prompt(self.mixture[index], key, ex.inputs[0, :ex.inputs_lengths[0]],
                                  ex.targets[0, :ex.targets_lengths[0]]))
        return out

    def render(self, ids) -> str:
        """Readable text of ids: mode tokens as [R]/[S]/[X], sentinels as <extra_id_i> in span order."""
        names = {v: k for k, v in self.specials.modes.items()}
        names.update({int(s): f"<extra_id_{i}>" for i, s in enumerate(self.specials.sentinels)})
        names.update({self.tokenizer.eos_id: "</s>", self.tokenizer.pad_id: ""})
        out, run = [], []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i in names:
                out += [self.tokenizer.decode(run, skip_special_tokens=True), names[i]]
                run = []
            else:
                run.append(i)
        out.append(self.tokenizer.decode(run, skip_special_tokens=True))
        return "".join(out)


def _main(argv=None):
    """Preview + throughput: ``python -m jt5.train.data --inputs-length 512 --targets-length 114``."""
    p = argparse.ArgumentParser(description=_main.__doc__)
    p.add_argument("--data", nargs="+", default=["builtin"])
    p.add_argument("--tokenizer", default="byte")
    p.add_argument("--inputs-length", type=int, default=512)
    p.add_argument("--targets-length", type=int, default=114)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixture", default="ul2")
    p.add_argument("--no-pack", action="store_true")
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    data = Pipeline(DataConfig(data=tuple(args.data), tokenizer=args.tokenizer,
                               inputs_length=args.inputs_length, targets_length=args.targets_length,
                               batch_size=args.batch_size, seed=args.seed, mixture=args.mixture,
                               pack=not args.no_pack))
    print(data.describe())
    for prompt in data.sample_prompts():
        print(f"\n{prompt.denoiser} from {prompt.document}\n  inputs : {data.render(prompt.inputs)[:300]!r}"
              f"\n  targets: {data.render(prompt.targets)[:300]!r}")
    data.batch(0)
    t0 = time.perf_counter()
    fills, examples = [], 0
    for step in range(1, args.steps + 1):
        s = batch_stats(data.batch(step))
        fills.append((s["encoder_fill"], s["decoder_fill"]))
        examples += s["examples"]
    dt = time.perf_counter() - t0
    enc, dec = np.mean(fills, axis=0)
    tokens = args.steps * data.local_batch_size * (args.inputs_length + args.targets_length)
    real = tokens * (enc * args.inputs_length + dec * args.targets_length) / (
        args.inputs_length + args.targets_length)
    print(f"\n{args.steps} batches of {data.local_batch_size} rows in {dt:.2f}s: "
          f"{args.steps / dt:.1f} batches/s, {examples / dt:,.0f} examples/s, "
          f"{tokens / dt:,.0f} token slots/s ({real / dt:,.0f} non-padding tokens/s); fill encoder "
          f"{enc:.3f} decoder {dec:.3f}, {examples / args.steps / data.local_batch_size:.2f} examples/row")


if __name__ == "__main__":
    _main()
