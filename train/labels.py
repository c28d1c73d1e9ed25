"""Labelled examples for the task heads (``jt5 finetune --head``): files -> token ids and
labels -> padded batches.

    cfg = LabelsConfig(head="sequence-classification", data="train.jsonl", eval_fraction=0.1)
    data = LabelData(cfg, tokenizer)        # id2label from the data (or the model's, if it has one)
    data.batch(step)                        # this host's rows of global batch `step`
    data.eval_rows()                        # the eval split as whole global batches

What each head reads (``--input-field`` / ``--label-field`` / ``--context-field``):

- ``sequence-classification`` / ``encoder-classification``: a text and a label (JSONL, CSV, TSV).
  Labels are names (sorted, stored as the model's ``id2label``) or integer ids (``0..C-1``,
  also as digit strings in CSV/TSV). Input: ``prefix + text`` + EOS.
- ``token-classification``: a list of words and a list of as many labels (JSONL; CoNLL-style,
  as in datasets' ``tokens`` / ``ner_tags``). Each word is tokenized alone (preceded by a space
  unless first) and its label goes to its first token; the other tokens are not scored
  (transformers' run_ner default).
- ``question-answering``: a question, a context and ``answers`` as SQuAD stores them
  (``{"text": [...], "answer_start": [...]}``; JSONL). Input: ``prefix + question`` EOS
  ``context`` EOS, the context cut to fit. The target is the first answer's token span, found in
  the context's tokens (the tokens of ``context[:answer_start]`` end where it starts; else the
  nearest occurrence of the answer's tokens): an answer no whole tokens hold, or one cut off by
  ``inputs_length``, is not trained on (counted in ``stats``); its example is still evaluated.

Bad data is one ``ValueError`` naming ``file:line`` and the field. Rows are single examples,
right-padded to ``inputs_length`` (no packing); batch ``s`` is a pure function of (config, s,
host), so a resumed run continues exactly (``pairs.RowOrder``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple, Optional

import numpy as np

from jt5.bridge.keymap import HEADS
from jt5.tokenizer import Tokenizer
from jt5.train.pairs import RowOrder, read_rows, train_eval_split

_INT = re.compile(r"-?\d+")
_JSONL = ("jsonl",)


@dataclasses.dataclass(frozen=True)
class LabelsConfig:
    """Everything that determines a head's batches (saved with each checkpoint)."""

    head: str
    data: str
    eval_data: Optional[str] = None
    eval_fraction: float = 0.0
    input_field: str = "input"
    label_field: str = "label"
    context_field: str = "context"       # question-answering
    prefix: str = ""
    tokenizer: str = "byte"
    inputs_length: int = 128
    batch_size: int = 16
    seed: int = 0
    id2label: tuple = ()                 # a head checkpoint's labels; () = from the data

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"--head {self.head!r} must be one of {', '.join(HEADS)}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction {self.eval_fraction} must be in [0, 1)")
        if self.inputs_length < 4 or self.batch_size < 1:
            raise ValueError(f"inputs_length={self.inputs_length} (>= 4) and batch_size="
                             f"{self.batch_size} (>= 1) are too small")
        object.__setattr__(self, "id2label", tuple(self.id2label))


class Raw(NamedTuple):
    where: str          # "file:line"
    text: object        # str, or the word list (token classification)
    label: object       # str | int | list of them | (answer texts, answer starts)
    context: str = ""   # question answering


class Encoded(NamedTuple):
    raw: list           # [N] Raw
    ids: list           # [N] int32 with EOS, truncated to inputs_length
    labels: list        # [N] class id | int32 [len(ids)] per token (-1 unscored) | (start, end)
    first: list         # token classification: [N] int32 first-token position of each kept word
    truncated: int      # inputs cut to inputs_length
    unanswerable: int   # question answering: examples without a trainable span


def _flags(cfg: LabelsConfig) -> dict:
    out = {cfg.input_field: "--input-field", cfg.label_field: "--label-field"}
    if cfg.head == "question-answering":
        out[cfg.context_field] = "--context-field"
    return out


def _field(row: dict, field: str, flag: str, where: str):
    if field not in row or row[field] is None:
        raise ValueError(f"{where}: no field {field!r} (has {sorted(row)}); set {flag}")
    return row[field]


def _label(value, field: str, where: str):
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: field {field!r} is {type(value).__name__}; a label is a name "
                         "(string) or an integer id")
    return value


def read_examples(path, cfg: LabelsConfig) -> list[Raw]:
    """One file's examples for ``cfg.head``; ValueError naming file:line and the field."""
    flags = _flags(cfg)
    sequence = cfg.head in ("sequence-classification", "encoder-classification")
    rows = read_rows(path, flags, kinds=("jsonl", "csv", "tsv") if sequence else _JSONL)
    out = []
    for n, row in rows:
        where = f"{path}:{n}"
        text = _field(row, cfg.input_field, "--input-field", where)
        label = _field(row, cfg.label_field, "--label-field", where)
        if cfg.head == "token-classification":
            if not (isinstance(text, list) and all(isinstance(w, str) for w in text)):
                raise ValueError(f"{where}: field {cfg.input_field!r} must be a list of words "
                                 f"(strings), got {type(text).__name__}")
            if not isinstance(label, list):
                raise ValueError(f"{where}: field {cfg.label_field!r} must be a list of labels, "
                                 f"one per word, got {type(label).__name__}")
            if len(label) != len(text):
                raise ValueError(f"{where}: field {cfg.label_field!r} has {len(label)} labels for "
                                 f"{len(text)} words in {cfg.input_field!r}")
            out.append(Raw(where, text, [_label(x, cfg.label_field, where) for x in label]))
            continue
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {cfg.input_field!r} is {type(text).__name__}, "
                             "not a string")
        if sequence:
            out.append(Raw(where, text, _label(label, cfg.label_field, where)))
            continue
        context = _field(row, cfg.context_field, "--context-field", where)
        if not isinstance(context, str):
            raise ValueError(f"{where}: field {cfg.context_field!r} is "
                             f"{type(context).__name__}, not a string")
        out.append(Raw(where, text, _answers(label, context, cfg.label_field, where), context))
    return out


def _answers(value, context: str, field: str, where: str):
    """SQuAD's ``{"text": [...], "answer_start": [...]}`` -> (texts, starts), each checked."""
    bad = (f"{where}: field {field!r} must be {{\"text\": [...], \"answer_start\": [...]}} "
           "(SQuAD layout) with as many texts as starts")
    if not isinstance(value, dict) or not {"text", "answer_start"} <= set(value):
        raise ValueError(bad)
    texts, starts = value["text"], value["answer_start"]
    if isinstance(texts, str):
        texts, starts = [texts], [starts]
    if not (isinstance(texts, list) and isinstance(starts, list) and len(texts) == len(starts)
            and texts):
        raise ValueError(bad)
    for t, s in zip(texts, starts):
        if not isinstance(t, str) or isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(bad)
        if context[s:s + len(t)] != t:
            raise ValueError(f"{where}: field {field!r}: answer_start {s} does not point at "
                             f"{t!r} in the context")
    return tuple(texts), tuple(starts)


def label_names(examples: list[Raw], head: str, fixed: tuple) -> tuple[tuple, dict]:
    """(id2label, label -> id). ``fixed``: a head checkpoint's names, which the data must use.
    Otherwise integer labels (or digit strings) are ids 0..max, names are sorted."""
    def labels(r):
        return r.label if head == "token-classification" else [r.label]
    seen = {}  # label -> first place it occurs
    for r in examples:
        for x in labels(r):
            seen.setdefault(x, r.where)
    if fixed:
        ids = {name: i for i, name in enumerate(fixed)}
        for x, where in seen.items():
            if str(x) not in ids and not (_INT.fullmatch(str(x)) and int(x) < len(fixed)):
                raise ValueError(f"{where}: label {x!r} is not one of the model's labels "
                                 f"{list(fixed)} (nor an id below {len(fixed)})")
        return fixed, {x: ids[str(x)] if str(x) in ids else int(x) for x in seen}
    if all(_INT.fullmatch(str(x)) for x in seen):
        for x, where in seen.items():
            if int(x) < 0:
                raise ValueError(f"{where}: label id {x} is negative")
        n = max((int(x) for x in seen), default=1) + 1
        return tuple(f"LABEL_{i}" for i in range(max(n, 2))), {x: int(x) for x in seen}
    names = tuple(sorted({str(x) for x in seen}))
    return names, {x: names.index(str(x)) for x in seen}


def encode(examples: list[Raw], cfg: LabelsConfig, tokenizer: Tokenizer,
           label_ids: dict) -> Encoded:
    """Token ids (+ EOS) and label ids; see the module docstring for each head's layout."""
    eos, L = tokenizer.eos_id, cfg.inputs_length
    ids, labels, first = [], [], []
    truncated = unanswerable = 0
    if cfg.head == "token-classification":
        counts = [len(r.text) for r in examples]
        pieces = tokenizer.encode_many([(" " if i else "") + w for r in examples
                                        for i, w in enumerate(r.text)])
        k = 0
        for r, n in zip(examples, counts):
            words, k = pieces[k:k + n], k + n
            starts = np.cumsum([0] + [len(p) for p in words[:-1]]).astype(np.int32)
            row = np.concatenate(words + [np.array([eos], np.int32)]).astype(np.int32)
            lab = np.full(len(row), -1, np.int32)
            keep = [i for i in range(n) if starts[i] < L - 1 and len(words[i])]
            lab[starts[keep]] = [label_ids[r.label[i]] for i in keep]
            truncated += len(row) > L
            row, lab = np.concatenate([row[:L - 1], [eos]]).astype(np.int32), lab[:L]
            lab[len(row) - 1:] = -1
            ids.append(row)
            labels.append(lab)
            first.append(starts[keep])
        return Encoded(list(examples), ids, labels, first, truncated, 0)
    if cfg.head != "question-answering":
        for r, x in zip(examples, tokenizer.encode_many([cfg.prefix + r.text for r in examples])):
            truncated += len(x) + 1 > L
            ids.append(np.concatenate([x[:L - 1], [eos]]).astype(np.int32))
            labels.append(label_ids[r.label])
        return Encoded(list(examples), ids, labels, [], truncated, 0)
    for r in examples:
        q, ctx = (np.asarray(tokenizer.encode(t), np.int32) for t in (cfg.prefix + r.text,
                                                                       r.context))
        q = q[:max(L // 2, L - 2 - len(ctx))]  # a long question keeps half the input
        room = L - 2 - len(q)
        truncated += len(ctx) > room
        row = np.concatenate([q, [eos], ctx[:room], [eos]]).astype(np.int32)
        span = _answer_span(tokenizer, r.context, ctx, r.label[0][0], r.label[1][0])
        if span is None or span[1] >= room:
            unanswerable += 1
            span = (-1, -1)
        else:
            span = (span[0] + len(q) + 1, span[1] + len(q) + 1)
        ids.append(row)
        labels.append(span)
    return Encoded(list(examples), ids, labels, [], truncated, unanswerable)


def _answer_span(tokenizer: Tokenizer, context: str, ctx: np.ndarray, text: str, start: int):
    """The answer's (first, last) token positions in the context's tokens, or None."""
    ans = np.asarray(tokenizer.encode(text), np.int32)
    if not len(ans):
        return None
    guess = len(tokenizer.encode(context[:start]))
    hits = [p for p in range(len(ctx) - len(ans) + 1) if np.array_equal(ctx[p:p + len(ans)], ans)]
    if not hits:
        return None
    p = min(hits, key=lambda h: abs(h - guess))
    return p, p + len(ans) - 1


class LabelData:
    """Train and eval batches of one LabelsConfig; see the module docstring."""

    def __init__(self, config: LabelsConfig, tokenizer: Tokenizer, *, process_index: int = 0,
                 process_count: int = 1):
        if config.batch_size % process_count:
            raise ValueError(f"batch_size={config.batch_size} is not divisible by {process_count=}")
        c = self.config = config
        self.tokenizer = tokenizer
        train, held = train_eval_split(lambda p: read_examples(p, c), c.data, c.eval_data,
                                       c.eval_fraction, c.seed)
        if c.head == "question-answering":
            self.id2label, ids = (), {}
        else:
            self.id2label, ids = label_names(train + held, c.head, c.id2label)
        self.train = encode(train, c, tokenizer, ids)
        self.eval = encode(held, c, tokenizer, ids)
        self._order = RowOrder(len(train), c.seed, c.batch_size, process_index, process_count)
        self.local_batch_size = c.batch_size // process_count

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def stats(self) -> dict:
        t, e = self.train, self.eval
        return dict(train=len(t.ids), eval=len(e.ids), labels=len(self.id2label),
                    truncated=t.truncated + e.truncated,
                    unanswerable=t.unanswerable + e.unanswerable)

    def epochs(self, steps: int) -> float:
        return steps * self.config.batch_size / max(len(self.train.ids), 1)

    def assemble(self, enc: Encoded, picked: list, num_rows: int) -> dict:
        """Examples ``picked`` (None = an empty row, no weight) -> a padded batch of the head's
        features (``jt5.train.head_tasks``)."""
        L, pad = self.config.inputs_length, self.tokenizer.pad_id
        ids = np.full((num_rows, L), pad, np.int32)
        mask = np.zeros((num_rows, L), np.int32)
        ids[:, 0], mask[:, 0] = self.tokenizer.eos_id, 1  # empty rows: one EOS, never all-masked
        token = self.config.head == "token-classification"
        labels = np.zeros((num_rows, L) if token else (num_rows,), np.int32)
        weights = np.zeros(labels.shape, np.float32)
        starts, ends = np.zeros(num_rows, np.int32), np.zeros(num_rows, np.int32)
        for r, i in enumerate(picked):
            if i is None:
                continue
            x = enc.ids[i]
            ids[r, :len(x)], mask[r, :len(x)] = x, 1
            y = enc.labels[i]
            if token:
                scored = y >= 0
                labels[r, :len(y)], weights[r, :len(y)] = np.where(scored, y, 0), scored
            elif self.config.head == "question-answering":
                starts[r], ends[r] = max(y[0], 0), max(y[1], 0)
                weights[r] = float(y[0] >= 0)
            else:
                labels[r], weights[r] = y, 1.0
        out = {"input_ids": ids, "attention_mask": mask, "label_weights": weights}
        if self.config.head == "question-answering":
            out.update(start_positions=starts, end_positions=ends)
        else:
            out["labels"] = labels
        return out

    def batch(self, step: int) -> dict:
        """This host's rows of global batch ``step``: a pure function of (config, step, host)."""
        return self.assemble(self.train, self._order.local_rows(step), self.local_batch_size)

    def iterate(self, start_step: int = 0):
        step = start_step
        while True:
            yield step, self.batch(step)
            step += 1

    def eval_rows(self) -> list[dict]:
        """The eval split in order as whole global batches (every process gets all rows; the
        last padded with empty rows)."""
        B, n = self.config.batch_size, len(self.eval.ids)
        return [self.assemble(self.eval, [i if i < n else None for i in range(lo, lo + B)], B)
                for lo in range(0, n, B)]
