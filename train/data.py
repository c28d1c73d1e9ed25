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

Packing (``pack=True``, ``train/packing.py``): candidates are placed in the order drawn, each in
the row it fits best on both sides (inputs and targets), several per row; the batch ends after a
few consecutive candidates fit no row (those draws are dropped: random draws, not pieces of the
corpus). ``min_chunk`` (default 1.0: whole examples only) lets the packer plan shorter chunks for
the denoisers on the mixture's heavy side and shorten a chunk to fit a gap, down to that fraction
of the chunk it would take unpacked: the UL2 mixture's whole examples have fewer inputs per
target than a 512/114 row (more than a 512/512 one), so only shorter chunks fill both sides.
``python -m jt5.train.data --min-chunk 1 0.25 0.1`` prints the fill table (fill, examples per
row, realised mixture, chunk lengths kept, examples/s); RESULTS.md has it.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import time
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np

from jt5.tokenizer import Tokenizer, load_tokenizer
from jt5.train import corpus, sources, tokenize
from jt5.train.tokenize import STORE_VERSION, TokenStore
from jt5.train.packing import MIN_CHUNK, Candidates, Plan, Shapes, balance_scales, pack
from jt5.train.ul2 import (MODE_NAMES, Denoiser, Examples, SpecialIds, draw_splits,
                           fit_raw_length, make_examples, mixture_probs, prefix_lm_lengths,
                           resolve_mixture)

log = logging.getLogger(__name__)

ENCODER_FEATURES = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions")
DECODER_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
                    "decoder_positions", "decoder_loss_weights")
FEATURES = ENCODER_FEATURES + DECODER_FEATURES
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
    min_chunk: float = MIN_CHUNK
    seed: int = 0
    heldout_documents: int = 8
    max_doc_chars: int = corpus.MAX_CHARS
    text_field: str = "text"
    cache_dir: Optional[str] = None  # None: $JT5_CACHE, else ~/.cache/jt5
    mode_ids: Optional[tuple[int, ...]] = None
    first_sentinel: Optional[int] = None
    num_sentinels: Optional[int] = None

    def __post_init__(self):
        data = (self.data,) if isinstance(self.data, (str, os.PathLike)) else tuple(self.data)
        object.__setattr__(self, "data", tuple(os.fspath(d) for d in data))
        if not self.data:
            raise ValueError("data: give at least one source ('builtin', a file or a directory)")
        sources.parse_sources(self.data)  # weights parse, all or none
        if not isinstance(self.mixture, str):
            object.__setattr__(self, "mixture", resolve_mixture(self.mixture))
        resolve_mixture(self.mixture)
        if self.mode_ids is not None:
            object.__setattr__(self, "mode_ids", tuple(int(i) for i in self.mode_ids))
        for name in ("inputs_length", "targets_length", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if not 0.0 < self.min_chunk <= 1.0:
            raise ValueError(f"min_chunk={self.min_chunk} must be in (0, 1] (1: whole examples only)")
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

def cache_root(config: DataConfig) -> str:
    return config.cache_dir or os.environ.get("JT5_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "jt5")


def store_path(config: DataConfig, tokenizer: Tokenizer, process_index: int,
               process_count: int) -> str:
    """``<cache>/tokens/<key>``: the key hashes what the tokens depend on (not source weights)."""
    spec = [STORE_VERSION, corpus.fingerprint(config.data, config.max_doc_chars), config.text_field,
            tokenizer.fingerprint, config.heldout_documents, process_index, process_count]
    key = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:24]
    return os.path.join(cache_root(config), "tokens", key)


def build_token_store(config: DataConfig, tokenizer: Tokenizer, process_index: int = 0,
                      process_count: int = 1, *, workers: Optional[int] = None,
                      progress: bool = False) -> TokenStore:
    """Tokenise this host's share of the corpus once (``train/tokenize.py``: parallel, resumable);
    later calls memory-map the cached result."""
    final = store_path(config, tokenizer, process_index, process_count)
    docs = corpus.split_heldout(corpus.iter_documents(config.data, config.max_doc_chars,
                                                      config.text_field), config.heldout_documents)
    return tokenize.build_token_store(
        docs, final, tokenizer, process_index=process_index, process_count=process_count,
        num_sources=len(config.data), workers=workers, progress=progress,
        meta=dict(data=list(config.data), text_field=config.text_field))


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


class _Draws(NamedTuple):
    which: np.ndarray      # [C] denoiser index
    doc: np.ndarray        # [C] index into the token store's documents
    position: np.ndarray   # [C] float in [0, 1): where the window lies in the document
    length: np.ndarray     # [C] the whole chunk (document-limited)
    split: np.ndarray      # [C] S prefix length of the whole chunk, -1 for span corruption


class Packed(NamedTuple):
    batch: dict
    plan: Plan
    which: np.ndarray      # [E] denoiser of each placed example (plan order)
    whole: np.ndarray      # [E] the chunk it would have taken unpacked (plan.length <= whole)
    source_tokens: np.ndarray  # [num sources] chunk tokens the batch took from each --data source


class Prompt(NamedTuple):
    """A held-out example for sample outputs: generate from ``inputs``, compare with ``targets``."""
    denoiser: Denoiser
    document: str          # corpus key of the held-out document
    inputs: np.ndarray     # [n] int32, mode + corrupted text + EOS (unpadded)
    targets: np.ndarray    # [m] int32, ... + EOS


class Pipeline:
    """Host-local UL2 batches for one DataConfig; see the module docstring."""

    def __init__(self, config: DataConfig, *, process_index: int = 0, process_count: int = 1,
                 tokenizer: Optional[Tokenizer] = None, workers: Optional[int] = None,
                 progress: bool = False):
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
        self.shapes = Shapes(self.mixture, config.inputs_length, config.targets_length,
                             len(self.specials.sentinels))
        self._is_s = np.array([d.kind == "S" for d in self.mixture])
        # S prefixes are uniform in [1, room]: their mean decides S's inputs : targets balance
        self.scales = balance_scales(self.shapes, self.probs, config.inputs_length / 2,
                                     config.min_chunk if config.pack else 1.0)
        self._has_mode = np.array([d.mode is not None for d in self.mixture], np.int64)
        self.store = build_token_store(config, self.tokenizer, process_index, process_count,
                                       workers=workers, progress=progress)
        self.source_weights = sources.weights(config.data)
        if self.source_weights is not None:
            self._source_tokens = np.array([
                [self.store.offsets[first], self.store.offsets[last]]
                for first, last in map(self.store.source_documents, range(len(config.data)))])
            empty = [config.data[i] for i, (a, b) in enumerate(self._source_tokens) if a == b]
            if empty:
                raise ValueError(f"host {process_index} has no training documents from "
                                 f"{', '.join(empty)}")
        self._heldout = None

    @property
    def vocab_size(self) -> int:
        """Ids the batches can contain are < vocab_size (the model's vocab must be at least this)."""
        return max(self.tokenizer.vocab_size, int(self.specials.sentinels.max()) + 1,
                   max(self.specials.modes.values(), default=0) + 1)

    def source_summary(self) -> str:
        """Per --data source: its weight (if any), documents and tokens on this host."""
        meta, parts = self.store.meta, []
        for i, spec in enumerate(sources.parse_sources(self.config.data)):
            weight = f" x{self.source_weights[i]:.3g}" if self.source_weights else ""
            parts.append(f"{spec.spec}{weight}: {meta['source_documents'][i]:,} documents, "
                         f"{meta['source_tokens'][i]:,} tokens")
        return "; ".join(parts)

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

    def _draw(self, rng: np.random.Generator, n: int) -> _Draws:
        """n candidate draws: denoiser, document, window position and the whole chunk each would
        take (its S split too) -- no corruption yet."""
        offsets = self.store.offsets
        which = rng.choice(len(self.mixture), size=n, p=self.probs)
        raw = self.raw_lengths[which]
        s_rows = self._is_s[which]
        if s_rows.any():  # prefix-LM: a random prefix length + a full target
            room = self.config.inputs_length - 1 - self._has_mode[which[s_rows]]
            raw[s_rows] = prefix_lm_lengths(int(s_rows.sum()), room, self.config.targets_length - 1, rng)
        if self.source_weights is None:  # documents in proportion to their length
            token = rng.integers(0, offsets[-1], size=n)
        else:  # a source by weight, then a document of it in proportion to its length
            lo, hi = self._source_tokens[rng.choice(len(self.source_weights), size=n,
                                                    p=self.source_weights)].T
            token = lo + np.floor(rng.random(n) * (hi - lo)).astype(np.int64)
        doc = np.searchsorted(offsets, token, side="right") - 1
        length = np.minimum(raw, offsets[doc + 1] - offsets[doc])
        position = rng.random(n)  # where in the document the window lies, once its length is known
        split = draw_splits(length, which, self.mixture, self.config.inputs_length,
                            self.config.targets_length, rng)
        return _Draws(which, doc, position, length, split)

    def _candidates(self, d: "_Draws") -> Candidates:
        """The packer's view of draws: natural chunks and the balanced plan for each."""
        scale = self.scales[d.which]
        # ceil: never below the packer's floor, ceil(min_chunk * natural), as scale >= min_chunk
        planned = np.minimum(d.length, np.maximum(2, np.ceil(scale * self.raw_lengths[d.which])))
        split = d.split.copy()
        s_rows = split >= 0
        if s_rows.any():  # S: prefix and continuation scaled alike
            prefix = np.maximum(1, np.ceil(scale[s_rows] * d.split[s_rows])).astype(np.int64)
            target = np.maximum(1, np.ceil(scale[s_rows] * (d.length - d.split)[s_rows]))
            split[s_rows] = prefix
            planned[s_rows] = prefix + target.astype(np.int64)
        return Candidates(d.which, planned.astype(np.int64), split, d.length, d.split)

    def _examples(self, rng: np.random.Generator, draws: "_Draws", length, split) -> Examples:
        offsets = self.store.offsets
        doc_len = offsets[draws.doc + 1] - offsets[draws.doc]
        start = offsets[draws.doc] + np.floor(draws.position * (doc_len - length + 1)).astype(np.int64)
        idx = np.minimum(start[:, None] + np.arange(int(length.max())), offsets[-1] - 1)
        chunks = np.asarray(self.store.tokens[idx])
        return make_examples(chunks, length, draws.which, self.mixture, self.specials,
                             self.config.inputs_length, self.config.targets_length, rng, split)

    def batch(self, step: int) -> dict:
        """This host's rows of global batch ``step``: a pure function of (config, step, process_index)."""
        return self.packed(step).batch

    def packed(self, step: int) -> "Packed":
        """``batch(step)`` with its packing plan, the denoiser and whole chunk of each example."""
        rng = self._rng(step)
        rows = self.local_batch_size
        if not self.config.pack:
            d = self._draw(rng, rows)
            ex = self._examples(rng, d, d.length, d.split)
            zero = np.zeros(rows, np.int64)
            plan = Plan(np.arange(rows), d.length, d.split, np.arange(rows), zero, zero,
                        np.ones(rows, np.int64), 0, rows)
            return Packed(assemble(ex, plan.row, zero, zero, plan.segment, rows), plan, d.which,
                          d.length, self._source_tokens_of(d.doc, d.length))
        blocks = []

        def draw(n):
            blocks.append(self._draw(rng, n))
            return self._candidates(blocks[-1])

        plan = pack(self.shapes, draw, rows, min_chunk=self.config.min_chunk)
        every = _Draws(*(np.concatenate(x) for x in zip(*blocks)))
        placed = _Draws(*(x[plan.index] for x in every))
        ex = self._examples(rng, placed, plan.length, plan.split)
        batch = assemble(ex, plan.row, plan.inputs_offset, plan.targets_offset, plan.segment, rows)
        return Packed(batch, plan, placed.which, placed.length,
                      self._source_tokens_of(placed.doc, plan.length))

    def _packed_pair(self, step: int) -> tuple[dict, np.ndarray]:
        p = self.packed(step)
        return p.batch, p.source_tokens

    def _source_tokens_of(self, doc, length) -> np.ndarray:
        return np.bincount(np.asarray(self.store.doc_source[doc]), weights=length,
                           minlength=len(self.config.data)).astype(np.int64)

    def iterate(self, start_step: int = 0, prefetch: int = 2, workers: int = 0,
                sources: Optional[dict] = None) -> Iterator[tuple[int, dict]]:
        """(step, batch) from ``start_step`` on; ``prefetch`` batches are built ahead in a thread,
        or, with ``workers`` > 0, in that many processes (each opens the same cached token
        store; ``batch(step)`` is a pure function of the step, so the order and the batches
        are the same as in one process: only the throughput grows). ``sources``: a dict that
        gets ``{step: tokens taken from each --data source}`` for each batch yielded."""
        step = start_step
        if prefetch <= 0 and workers <= 0:
            while True:
                p = self.packed(step)
                if sources is not None:
                    sources[step] = p.source_tokens
                yield step, p.batch
                step += 1
        if workers > 0:
            # spawn, not fork: the parent runs jax's threads
            pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_data_worker,
                initargs=(self.config, self.process_index, self.process_count, self.tokenizer))
            make, ahead = _data_worker_batch, max(prefetch, 0) + workers
        else:
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jt5-data")
            make, ahead = self._packed_pair, prefetch
        with pool:
            queue = collections.deque(pool.submit(make, s) for s in range(step, step + ahead))
            try:
                while True:
                    batch, tokens = queue.popleft().result()
                    queue.append(pool.submit(make, step + ahead))
                    if sources is not None:
                        sources[step] = tokens
                    yield step, batch
                    step += 1
            finally:
                for job in queue:
                    job.cancel()

    # ----------------------------------------------------------------------- held-out split

    def heldout_documents(self) -> list[tuple[str, str]]:
        """(key, text) of the held-out documents (the same on every host; never in any batch)."""
        if self._heldout is None:
            docs = corpus.iter_documents(self.config.data, self.config.max_doc_chars,
                                         self.config.text_field)
            self._heldout = []
            want = self.config.heldout_documents
            for _, d, held in corpus.split_heldout(docs, want):
                if len(self._heldout) == want:  # the held-out set is complete: no more reading
                    break
                if held:
                    self._heldout.append((d.key, d.read()))
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


_WORKER_PIPELINE: Optional[Pipeline] = None


def _init_data_worker(config, process_index, process_count, tokenizer):
    global _WORKER_PIPELINE
    _WORKER_PIPELINE = Pipeline(config, process_index=process_index, process_count=process_count,
                                tokenizer=tokenizer, workers=1)


def _data_worker_batch(step: int) -> tuple[dict, np.ndarray]:
    return _WORKER_PIPELINE._packed_pair(step)


def measure(data: Pipeline, steps: int, workers: int = 0) -> dict:
    """Fill, examples per row, realised mixture and chunk lengths over batches 1..steps, and
    examples/s (in this process; with ``workers``, through ``iterate`` in that many processes)."""
    data.batch(0)  # warm
    t0 = time.perf_counter()
    fills, counts, frac = [], np.zeros(len(data.mixture)), [[] for _ in data.mixture]
    dropped = drawn = 0
    for step in range(1, steps + 1):
        p = data.packed(step)
        s = batch_stats(p.batch)
        fills.append((s["encoder_fill"], s["decoder_fill"], s["examples_per_row"]))
        counts += np.bincount(p.which, minlength=len(data.mixture))
        for d, n, whole in zip(p.which.tolist(), p.plan.length.tolist(), p.whole.tolist()):
            frac[d].append(n / whole)
        dropped, drawn = dropped + p.plan.dropped, drawn + p.plan.drawn
    dt = time.perf_counter() - t0
    if workers:
        batches = data.iterate(1, workers=workers)
        for _ in range(2 * workers):  # started and warm
            next(batches)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(batches)
        dt = time.perf_counter() - t0
        batches.close()
    enc, dec, per_row = np.mean(fills, axis=0)
    realised = counts / counts.sum()
    return dict(encoder_fill=float(enc), decoder_fill=float(dec), examples_per_row=float(per_row),
                examples_per_s=float(counts.sum() / dt), batches_per_s=steps / dt,
                realised=realised, mixture_error=float(np.abs(realised - data.probs).max()),
                chunk_fraction=[float(np.mean(f)) if f else float("nan") for f in frac],
                dropped=dropped / max(drawn, 1))


FILL_TABLE = (("ul2", 512, 114), ("ul2", 512, 512), ("t5", 512, 114))


def _main(argv=None):
    """The fill table (``python -m jt5.train.data``): fill, examples per row, realised mixture and
    throughput for UL2 at 512/114 and 512/512 and T5 at 512/114, for each ``--min-chunk``
    (default: 1, whole examples, and 0.1).
    ``--preview`` also prints the pipeline's description and held-out sample prompts."""
    p = argparse.ArgumentParser(description=_main.__doc__)
    p.add_argument("--data", nargs="+", default=["builtin"])
    p.add_argument("--tokenizer", default="byte")
    p.add_argument("--shapes", nargs="+", default=[f"{m}:{i}/{t}" for m, i, t in FILL_TABLE],
                   help="MIXTURE:INPUTS/TARGETS rows of the table")
    p.add_argument("--min-chunk", type=float, nargs="+", default=[MIN_CHUNK, 0.1])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pack", action="store_true")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--preview", action="store_true")
    p.add_argument("--workers", type=int, default=0,
                   help="time examples/s through iterate() with this many data processes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print("| objective, inputs / targets | min_chunk | fill encoder | fill decoder | examples/row "
          "| mixture error | chunk fraction per denoiser | examples/s |\n|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        mixture, _, lengths = shape.partition(":")
        L_in, _, L_tgt = lengths.partition("/")
        for min_chunk in args.min_chunk:
            data = Pipeline(DataConfig(data=tuple(args.data), tokenizer=args.tokenizer,
                                       inputs_length=int(L_in), targets_length=int(L_tgt),
                                       batch_size=args.batch_size, seed=args.seed, mixture=mixture,
                                       pack=not args.no_pack, min_chunk=min_chunk))
            if args.preview:
                print(data.describe())
                for prompt in data.sample_prompts():
                    print(f"{prompt.denoiser} from {prompt.document}\n  inputs : "
                          f"{data.render(prompt.inputs)[:300]!r}\n  targets: "
                          f"{data.render(prompt.targets)[:300]!r}")
            m = measure(data, args.steps, args.workers)
            fracs = " ".join(f"{f:.2f}" for f in m["chunk_fraction"])
            print(f"| {mixture} {L_in} / {L_tgt} | {min_chunk:g} | {m['encoder_fill']:.3f} | "
                  f"{m['decoder_fill']:.3f} | {m['examples_per_row']:.2f} | "
                  f"{100 * m['mixture_error']:.2f}% | {fracs} | {m['examples_per_s']:,.0f} |",
                  flush=True)


if __name__ == "__main__":
    _main()
