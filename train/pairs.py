"""Supervised (input, target) pairs for fine-tuning: files -> tokens -> packed or padded batches.

    cfg = PairsConfig(data="train.jsonl", eval_data=None, eval_fraction=0.1, tokenizer="byte",
                      inputs_length=128, targets_length=32, batch_size=16, pack=True)
    data = PairData(cfg, tokenizer)
    data.batch(step)         # this host's rows of global batch `step`: a pure function of step
    data.eval_rows()         # the eval split as whole global batches (padded with empty rows)

Files: ``.jsonl`` (one JSON object per line), ``.csv`` / ``.tsv`` (a header row naming the
columns); the fields are ``input_field`` / ``target_field``. A bad line is a ``ValueError`` naming
``file:line`` and the field.

Each example is ``prefix + input`` + EOS and ``target`` + EOS, truncated to ``inputs_length`` /
``targets_length`` (keeping the EOS) — truncation is counted (``stats``) and reported by the caller,
never silent.

Rows. With ``pack=True`` examples are laid into rows once per run (a seeded shuffle, then first-fit
among the last few open rows), several per row with their own segment ids — the model's
segment-id masks keep packed examples from seeing each other, as for UL2 (``train/data.py``).
Without packing a row is one example. Epoch ``e`` visits every row once in the order
``permutation(SeedSequence([seed, e]))``; global batch ``s`` is rows ``s*B .. s*B+B-1`` of that
endless stream, so a batch depends only on (config, step): resuming needs nothing but the step.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import NamedTuple, Optional

import numpy as np

from jt5.tokenizer import Tokenizer
from jt5.train.data import assemble
from jt5.train.ul2 import Examples

EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
_OPEN_ROWS = 16       # first-fit looks back over this many open rows (fill vs. O(N) time)
_SPLIT_TAG = 0x53504C54  # "SPLT": seeds the --eval-fraction split apart from the epochs'


@dataclasses.dataclass(frozen=True)
class PairsConfig:
    """Everything that determines the fine-tuning batches (saved with each checkpoint)."""

    data: str
    eval_data: Optional[str] = None
    eval_fraction: float = 0.0      # held out of `data` when no eval_data is given
    input_field: str = "input"
    target_field: str = "target"
    prefix: str = ""
    tokenizer: str = "byte"
    inputs_length: int = 128
    targets_length: int = 32
    batch_size: int = 16
    pack: bool = True
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction {self.eval_fraction} must be in [0, 1)")
        for name in ("inputs_length", "targets_length", "batch_size"):
            if getattr(self, name) < (2 if name != "batch_size" else 1):
                raise ValueError(f"{name}={getattr(self, name)} is too small")


class Record(NamedTuple):
    input: str
    target: str
    where: str        # "file:line", for error messages and eval.jsonl


def read_rows(path, flags: dict, kinds=tuple(EXTENSIONS.values())) -> list[tuple[int, dict]]:
    """``(line number, row)`` of every example in a ``.jsonl`` / ``.csv`` / ``.tsv`` file
    (``kinds``: the formats allowed); a CSV header must name every field of ``flags``
    (field -> the flag that sets it). ValueError naming file:line otherwise."""
    path = os.fspath(path)
    kind = EXTENSIONS.get(os.path.splitext(path)[1].lower())
    allowed = [e for e, k in EXTENSIONS.items() if k in kinds]
    if kind not in kinds:
        raise ValueError(f"{path}: unknown extension; expected one of {', '.join(allowed)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        if kind == "jsonl":
            rows = []
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                rows.append((n, obj))
        else:
            reader = csv.DictReader(f, delimiter="," if kind == "csv" else "\t")
            header = reader.fieldnames or []
            for field in flags:
                if header and field not in header:
                    raise ValueError(f"{path}:1: no column {field!r} in the header {header}; "
                                     f"set {flags[field]}")
            rows = [(reader.line_num, row) for row in reader]
    if not rows:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return rows


def read_records(path, input_field: str, target_field: str) -> list[Record]:
    """The (input, target) text pairs of one file; ValueError naming file:line and field."""
    path = os.fspath(path)
    flag = {input_field: "--input-field", target_field: "--target-field"}
    out = []
    for n, row in read_rows(path, flag):
        values = []
        for field in (input_field, target_field):
            value = row.get(field)
            if value is None:
                raise ValueError(f"{path}:{n}: no field {field!r} (has {sorted(row)}); "
                                 f"set {flag[field]}")
            if not isinstance(value, str):
                raise ValueError(f"{path}:{n}: field {field!r} is {type(value).__name__}, "
                                 "not a string")
            values.append(value)
        out.append(Record(values[0], values[1], f"{path}:{n}"))
    return out


class Encoded(NamedTuple):
    records: list             # [N] Record
    inputs: list              # [N] int32 arrays, with EOS, truncated
    targets: list             # [N] int32 arrays, with EOS, truncated
    truncated_inputs: int
    truncated_targets: int


def encode(records, tokenizer: Tokenizer, prefix: str, inputs_length: int,
           targets_length: int) -> Encoded:
    """Token ids + EOS; text is text (no special-token parsing), as in the pretraining corpus."""
    eos = np.array([tokenizer.eos_id], np.int32)
    ins = tokenizer.encode_many([prefix + r.input for r in records])
    tgts = tokenizer.encode_many([r.target for r in records])
    cut_in = sum(len(x) + 1 > inputs_length for x in ins)
    cut_tgt = sum(len(x) + 1 > targets_length for x in tgts)
    ins = [np.concatenate([x[:inputs_length - 1], eos]).astype(np.int32) for x in ins]
    tgts = [np.concatenate([x[:targets_length - 1], eos]).astype(np.int32) for x in tgts]
    return Encoded(list(records), ins, tgts, cut_in, cut_tgt)


def layout_rows(in_len, tgt_len, order, L_in: int, L_tgt: int, pack: bool) -> list[list[int]]:
    """Example indices per row, visiting ``order``; packed: first-fit over recent open rows."""
    if not pack:
        return [[int(i)] for i in order]
    rows, free = [], []           # free: [room_in, room_tgt] of each row still open
    open_rows: list[int] = []
    for i in order:
        li, lt = int(in_len[i]), int(tgt_len[i])
        for r in open_rows:
            if free[r][0] >= li and free[r][1] >= lt:
                break
        else:
            r = len(rows)
            rows.append([])
            free.append([L_in, L_tgt])
            open_rows.append(r)
            if len(open_rows) > _OPEN_ROWS:
                open_rows.pop(0)
        rows[r].append(int(i))
        free[r][0] -= li
        free[r][1] -= lt
    return rows


def train_eval_split(read, data: str, eval_data: Optional[str], eval_fraction: float,
                     seed: int) -> tuple[list, list]:
    """(train, held-out) examples: ``read(eval_data)`` if given, else ``eval_fraction`` of
    ``read(data)`` held out by a seeded split (the same in every run with this seed), else none."""
    train = read(data)
    if eval_data:
        return train, read(eval_data)
    if eval_fraction <= 0:
        return train, []
    if len(train) < 2:
        raise ValueError(f"{data}: one example cannot be split by --eval-fraction")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SPLIT_TAG])))
    perm = rng.permutation(len(train))
    n_eval = min(max(1, round(eval_fraction * len(train))), len(train) - 1)
    return [train[i] for i in sorted(perm[n_eval:])], [train[i] for i in sorted(perm[:n_eval])]


class RowOrder:
    """Which rows global batch ``s`` holds: rows ``s*B .. s*B+B-1`` of the endless stream of
    epochs, epoch ``e`` visiting every row once in ``permutation(SeedSequence([seed, e]))``."""

    def __init__(self, num_rows: int, seed: int, batch_size: int, process_index: int = 0,
                 process_count: int = 1):
        self.num_rows, self.seed = num_rows, seed
        self.local = batch_size // process_count
        self.offset = process_index * self.local
        self.batch_size = batch_size
        self._cached = (None, None)

    def _epoch(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._cached = (epoch, rng.permutation(self.num_rows))
        return self._cached[1]

    def local_rows(self, step: int) -> list[int]:
        """This host's row indices of global batch ``step`` (a pure function of step)."""
        if step < 0:
            raise ValueError(f"{step=} must be >= 0")
        first, R = step * self.batch_size + self.offset, self.num_rows
        return [int(self._epoch(g // R)[g % R]) for g in range(first, first + self.local)]


class PairData:
    """Train and eval rows for one PairsConfig; see the module docstring."""

    def __init__(self, config: PairsConfig, tokenizer: Tokenizer, *, process_index: int = 0,
                 process_count: int = 1):
        if config.batch_size % process_count:
            raise ValueError(f"batch_size={config.batch_size} is not divisible by {process_count=}")
        self.config, self.tokenizer = config, tokenizer
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = config.batch_size // process_count
        c = config
        train, held = train_eval_split(lambda p: read_records(p, c.input_field, c.target_field),
                                       c.data, c.eval_data, c.eval_fraction, c.seed)
        self.train = encode(train, tokenizer, c.prefix, c.inputs_length, c.targets_length)
        self.eval = encode(held, tokenizer, c.prefix, c.inputs_length, c.targets_length)
        order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([c.seed]))).permutation(
            len(train))
        self.rows = layout_rows(*self._lengths(self.train), order, c.inputs_length,
                                c.targets_length, c.pack)
        self._order = RowOrder(len(self.rows), c.seed, c.batch_size, process_index,
                               process_count)

    @staticmethod
    def _lengths(enc: Encoded):
        return (np.array([len(x) for x in enc.inputs], np.int64),
                np.array([len(x) for x in enc.targets], np.int64))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def stats(self) -> dict:
        n = len(self.train.inputs)
        return dict(train=n, eval=len(self.eval.inputs), rows=len(self.rows),
                    examples_per_row=n / max(len(self.rows), 1),
                    truncated_inputs=self.train.truncated_inputs + self.eval.truncated_inputs,
                    truncated_targets=self.train.truncated_targets + self.eval.truncated_targets)

    def _assemble(self, enc: Encoded, rows: list, num_rows: int) -> dict:
        """Rows of example indices (``[]`` = an empty row) -> the t5x features of train/data.py."""
        c = self.config
        flat = [i for r in rows for i in r]
        n = len(flat)
        inputs = np.zeros((max(n, 1), c.inputs_length), np.int32)
        targets = np.zeros((max(n, 1), c.targets_length), np.int32)
        row_of, off_in, off_tgt, seg = (np.zeros(n, np.int64) for _ in range(4))
        k = 0
        for r, members in enumerate(rows):
            a = b = 0
            for s, i in enumerate(members, 1):
                x, y = enc.inputs[i], enc.targets[i]
                inputs[k, :len(x)], targets[k, :len(y)] = x, y
                row_of[k], off_in[k], off_tgt[k], seg[k] = r, a, b, s
                a, b, k = a + len(x), b + len(y), k + 1
        lens = [np.array([len(enc.inputs[i]) for i in flat] or [0], np.int32),
                np.array([len(enc.targets[i]) for i in flat] or [0], np.int32)]
        if not n:  # no examples at all: one zero-length example keeps assemble's shapes
            row_of, off_in, off_tgt, seg = (np.zeros(1, np.int64) for _ in range(4))
        ex = Examples(inputs, lens[0], targets, lens[1], np.zeros(len(lens[0]), np.int32))
        return assemble(ex, row_of, off_in, off_tgt, seg, num_rows)

    def batch(self, step: int) -> dict:
        """This host's rows of global batch ``step``: a pure function of (config, step, host)."""
        picked = [self.rows[i] for i in self._order.local_rows(step)]
        return self._assemble(self.train, picked, self.local_batch_size)

    def iterate(self, start_step: int = 0):
        step = start_step
        while True:
            yield step, self.batch(step)
            step += 1

    def epochs(self, steps: int) -> float:
        return steps * self.config.batch_size / max(len(self.rows), 1)

    def eval_rows(self) -> list[dict]:
        """The eval split as whole global batches (every process gets all rows; padded with
        empty rows, which carry no loss weight). Packed like training when ``pack``."""
        c = self.config
        if not self.eval.inputs:
            return []
        rows = layout_rows(*self._lengths(self.eval), np.arange(len(self.eval.inputs)),
                           c.inputs_length, c.targets_length, c.pack)
        B = c.batch_size
        return [self._assemble(self.eval, rows[i:i + B] + [[]] * max(0, i + B - len(rows)), B)
                for i in range(0, len(rows), B)]
