"""The task heads as training tasks: the model class, the loss on a batch, the batch's features
and what the eval step predicts (``jt5.train.step.Task``), and each head's metrics.

Losses are float32 cross-entropy, as transformers computes them: sequence classification over
classes per row, token classification per scored token, question answering the mean of the
start and end cross-entropies per answerable row. No z-loss (a few classes need no normaliser
control). ``label_weights`` says what counts (0 for padding rows, unscored tokens, unanswerable
questions); ``correct`` counts exact predictions (both ends of a span).

Metrics (fractions in 0..1):
- classification: ``accuracy`` and ``macro_f1`` (F1 per class, averaged over the classes that
  occur in the gold labels or the predictions: scikit-learn's ``f1_score(average="macro")``);
- token classification: ``accuracy`` over scored words, and ``f1``: with IOB2 tags (every label
  ``O``, ``B-X`` or ``I-X``) the entity F1 of conlleval (a chunk is right when its type and both
  ends are), otherwise the macro F1 over word labels;
- question answering: SQuAD v1.1's ``exact_match`` and ``f1`` (lower case, no punctuation, no
  articles a/an/the, whitespace collapsed; token-bag F1; the best over the gold answers).
"""
from __future__ import annotations

import collections
import re
import string

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jt5.heads import HEAD_CLASSES
from jt5.train.labels import Encoded, LabelData
from jt5.train.step import LossTerms, Task

# -- losses -----------------------------------------------------------------------------------
def _ce(logits, labels, weights) -> tuple:
    """Weighted sums of cross-entropy and of correct argmaxes over ``[..., C]`` logits."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    w = weights.astype(jnp.float32)
    right = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(w * (lse - target)), w * right


def _call(graphdef, params, batch, rng):
    model = nnx.merge(graphdef, params)
    return model(batch["input_ids"], batch["attention_mask"],
                 rngs=None if rng is None else nnx.Rngs(dropout=rng), deterministic=rng is None)


def _terms(ce, right, weights, batch) -> LossTerms:
    zero = jnp.zeros((), jnp.float32)
    return LossTerms(cross_entropy=ce, z_loss=zero, correct=jnp.sum(right),
                     weight=jnp.sum(weights.astype(jnp.float32)),
                     tokens=jnp.sum(batch["attention_mask"]).astype(jnp.float32))


def label_terms(graphdef, params, batch, *, z_loss: float = 0.0, rng=None) -> LossTerms:
    """Sequence, encoder and token classification: logits ``[B, C]`` or ``[B, S, C]``."""
    del z_loss
    logits = _call(graphdef, params, batch, rng)
    ce, right = _ce(logits, batch["labels"], batch["label_weights"])
    return _terms(ce, right, batch["label_weights"], batch)


def span_terms(graphdef, params, batch, *, z_loss: float = 0.0, rng=None) -> LossTerms:
    """Question answering: start and end logits ``[B, S]`` against the gold positions."""
    del z_loss
    out = _call(graphdef, params, batch, rng)
    w = batch["label_weights"]
    ce_s, right_s = _ce(out.start_logits, batch["start_positions"], w)
    ce_e, right_e = _ce(out.end_logits, batch["end_positions"], w)
    return _terms((ce_s + ce_e) / 2, right_s * right_e, w, batch)


def predict_labels(model, batch) -> dict:
    return {"predictions": jnp.argmax(model(batch["input_ids"], batch["attention_mask"]), -1)}


def predict_spans(model, batch) -> dict:
    out = model(batch["input_ids"], batch["attention_mask"])
    return {"start_logits": out.start_logits, "end_logits": out.end_logits}


def task(head: str) -> Task:
    """The ``Task`` that trains ``head`` (a ``jt5.bridge.keymap.HEADS`` key)."""
    tokens = ("inputs", "int32")
    common = {"input_ids": tokens, "attention_mask": tokens}
    if head == "question-answering":
        features = {**common, "start_positions": (None, "int32"),
                    "end_positions": (None, "int32"), "label_weights": (None, "float32")}
        return Task(HEAD_CLASSES[head], span_terms, features, predict_spans)
    per = "inputs" if head == "token-classification" else None
    features = {**common, "labels": (per, "int32"), "label_weights": (per, "float32")}
    return Task(HEAD_CLASSES[head], label_terms, features, predict_labels)


# -- host-side: spans and metrics ---------------------------------------------------------------
def best_span(start_logits, end_logits, lo: int, hi: int, max_len: int) -> tuple:
    """The (start, end) in ``[lo, hi)`` with start <= end < start + max_len maximising
    start_logit + end_logit (transformers' QA post-processing, on one row)."""
    s = np.asarray(start_logits[lo:hi], np.float64)
    e = np.asarray(end_logits[lo:hi], np.float64)
    n = len(s)
    score = s[:, None] + e[None, :]
    i, j = np.indices((n, n))
    score[(j < i) | (j >= i + max_len)] = -np.inf
    a, b = np.unravel_index(int(np.argmax(score)), score.shape)
    return lo + int(a), lo + int(b)


def macro_f1(gold, pred) -> float:
    """Mean F1 over the classes in ``gold`` or ``pred`` (scikit-learn's macro average)."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    classes = np.union1d(gold, pred)
    if not len(classes):
        return 0.0
    f1 = []
    for c in classes:
        tp = np.sum((gold == c) & (pred == c))
        fp, fn = np.sum((gold != c) & (pred == c)), np.sum((gold == c) & (pred != c))
        f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def is_iob2(names) -> bool:
    return all(n == "O" or (n[:2] in ("B-", "I-") and len(n) > 2) for n in names)


def chunks(tags) -> set:
    """conlleval's chunks of an IOB tag sequence: {(type, first, last)}. A chunk starts at B-X,
    or at I-X after O or another type; it ends before O, B-, or another type."""
    out, start, kind = set(), None, None
    for i, t in enumerate(list(tags) + ["O"]):
        prefix, typ = (t[:1], t[2:]) if t != "O" else ("O", None)
        if kind is not None and (prefix in ("O", "B") or typ != kind):
            out.add((kind, start, i - 1))
            kind = None
        if prefix in ("B", "I") and kind is None:
            start, kind = i, typ
    return out


def entity_f1(gold_rows, pred_rows) -> float:
    """Micro F1 over exact chunks (conlleval)."""
    tp = n_gold = n_pred = 0
    for g, p in zip(gold_rows, pred_rows):
        gc, pc = chunks(g), chunks(p)
        tp, n_gold, n_pred = tp + len(gc & pc), n_gold + len(gc), n_pred + len(pc)
    return 0.0 if tp == 0 else 2 * tp / (n_gold + n_pred)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def squad_normalize(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def squad_scores(prediction: str, answers) -> tuple[float, float]:
    """(exact match, F1) of one prediction against its gold answers (the best of them)."""
    pred = squad_normalize(prediction)
    em = max(float(pred == squad_normalize(a)) for a in answers)

    def f1(a):
        p, g = pred.split(), squad_normalize(a).split()
        same = sum((collections.Counter(p) & collections.Counter(g)).values())
        if not p or not g:
            return float(p == g)
        if same == 0:
            return 0.0
        prec, rec = same / len(p), same / len(g)
        return 2 * prec * rec / (prec + rec)
    return em, max(f1(a) for a in answers)


# -- scoring the eval split --------------------------------------------------------------------
def score(data: LabelData, outputs: list[dict]) -> tuple[dict, list[dict]]:
    """The head's metrics over the eval split and one record per example, from the eval-step
    outputs of ``data.eval_rows()`` in order (``predictions``, or start/end logits)."""
    enc, head, names = data.eval, data.config.head, data.id2label
    n = len(enc.ids)
    rows = {k: np.concatenate([np.asarray(o[k]) for o in outputs])[:n]
            for k in outputs[0] if k in ("predictions", "start_logits", "end_logits")}
    if head == "question-answering":
        return _score_spans(enc, data.tokenizer, rows)
    if head == "token-classification":
        return _score_tokens(enc, names, rows["predictions"])
    gold, pred = np.asarray(enc.labels), rows["predictions"]
    records = [{"where": r.where, "input": r.text, "label": names[g], "prediction": names[p],
                "correct": bool(g == p)} for r, g, p in zip(enc.raw, gold, pred)]
    return ({"accuracy": float(np.mean(gold == pred)),
             "macro_f1": macro_f1(gold, pred)}, records)


def _score_tokens(enc: Encoded, names: tuple, pred) -> tuple[dict, list[dict]]:
    records, gold_rows, pred_rows = [], [], []
    for i, r in enumerate(enc.raw):
        first = enc.first[i]  # the words the input kept (a truncated input drops the rest)
        g = [names[x] for x in enc.labels[i][first]]
        p = [names[x] for x in pred[i][first]]
        gold_rows.append(g)
        pred_rows.append(p)
        records.append({"where": r.where, "words": r.text[:len(first)], "labels": g,
                        "predictions": p, "correct": g == p})
    flat_g, flat_p = sum(gold_rows, []), sum(pred_rows, [])
    acc = float(np.mean([a == b for a, b in zip(flat_g, flat_p)])) if flat_g else 0.0
    if is_iob2(names):
        f1 = entity_f1(gold_rows, pred_rows)
    else:
        f1 = macro_f1(flat_g, flat_p)
    return {"accuracy": acc, "f1": f1}, records


def _score_spans(enc: Encoded, tokenizer, rows: dict) -> tuple[dict, list[dict]]:
    records, ems, f1s = [], [], []
    for i, r in enumerate(enc.raw):
        ids = enc.ids[i]
        lo, hi = int(np.argmax(ids == tokenizer.eos_id)) + 1, len(ids) - 1  # the context
        if hi <= lo:
            text = ""
        else:
            s, e = best_span(rows["start_logits"][i], rows["end_logits"][i], lo, hi,
                                        hi - lo)
            text = tokenizer.decode(ids[s:e + 1], skip_special_tokens=True).strip()
        em, f1 = squad_scores(text, r.label[0])
        ems.append(em)
        f1s.append(f1)
        records.append({"where": r.where, "question": r.text, "answers": list(r.label[0]),
                        "prediction": text, "exact_match": bool(em), "f1": f1})
    return {"exact_match": float(np.mean(ems)), "f1": float(np.mean(f1s))}, records
