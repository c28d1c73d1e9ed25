"""Supervised sequence-to-sequence fine-tuning (``jt5 finetune``) on the machinery of
``train/runner.py``: the same mesh, sharding rules, checkpoints, exact resume, NaN stop, signal
save, metrics and export as pretraining; only the data (``train/pairs.py``) and the end differ.

    result = run(FinetuneConfig(model="runs/pretrain", data="train.jsonl", eval_fraction=0.1,
                                out="runs/finetune", steps=500))

Every ``eval_every`` steps the loss over the whole eval split joins the metrics line
(``eval_loss``, ``eval_accuracy``); with ``keep_best`` the parameters of the lowest eval loss so
far are written to ``OUT/best`` (a jt5 checkpoint: ``--model`` and ``jt5.load`` read it) and the
export and generation at the end use them. At the end the model is exported to ``OUT/hf``
(tokenizer files included) and greedy outputs on the eval split go to ``OUT/eval.jsonl`` with
exact match and chrF (Popović 2015: character 1..6-gram F-score, beta 2, whitespace ignored).

With ``head`` (``run_head``; ``jt5 finetune --head``) a task head (``jt5.heads``) trains on
labelled data (``train/labels.py``) instead, on the same runner: the labels' names become the
model's ``id2label`` (a checkpoint with this head keeps its own, and the data must use them; any
other checkpoint gets a fresh head). The eval split's loss and the head's metrics
(``train/head_tasks.py``: accuracy and macro-F1; token accuracy and F1; exact match and F1)
join the metrics line as ``eval_*``; keep-best keeps the lowest eval loss. ``OUT/hf`` is a
directory transformers' head class loads, and the *exported* model's predictions on the eval
split go to ``OUT/eval.jsonl`` with the summary in ``OUT/eval_summary.json``.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np
from flax import nnx

from jt5 import formats
from jt5.model import T5ForConditionalGeneration
from jt5.tokenizer import load_tokenizer, tokenizer_files
from jt5.train import head_tasks
from jt5.train.labels import LabelData, LabelsConfig
from jt5.train.pairs import PairData, PairsConfig
from jt5.train.runner import (RunConfig, Trainer, default_dtype, export_hf, is_model_path,
                              prepare, tokenizer_spec)

log = logging.getLogger(__name__)
BEST = "best"


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(RunConfig):
    """One fine-tuning run; the ``jt5 finetune`` flags map onto these fields."""

    out: str = "runs/finetune"
    steps: int = 300
    data: str = ""
    eval_data: Optional[str] = None
    eval_fraction: float = 0.0
    input_field: str = "input"
    target_field: str = "target"
    prefix: str = ""
    keep_best: bool = False
    max_new_tokens: Optional[int] = None   # None: targets_length
    eval_generate: int = 1000              # eval examples generated at the end (0: none)
    generate_batch_size: int = 32
    # A task head (jt5.heads; keymap.HEADS key) instead of text-to-text: see run_head.
    head: Optional[str] = None
    label_field: str = "label"
    context_field: str = "context"         # question-answering
    classifier_pooling: Optional[str] = None   # encoder-classification: "mean" | "first"


class FinetuneResult(NamedTuple):
    out: Path
    start_step: int
    step: int
    history: list
    eval: Optional[dict]        # exact_match, chrf, examples (None: no eval split / not generated)


def pairs_config(cfg: FinetuneConfig) -> PairsConfig:
    if not cfg.data:
        raise ValueError("--data: give a .jsonl, .csv or .tsv file of (input, target) pairs")
    return PairsConfig(data=cfg.data, eval_data=cfg.eval_data, eval_fraction=cfg.eval_fraction,
                       input_field=cfg.input_field, target_field=cfg.target_field,
                       prefix=cfg.prefix, tokenizer=tokenizer_spec(cfg),
                       inputs_length=cfg.inputs_length, targets_length=cfg.targets_length,
                       batch_size=cfg.batch_size, pack=cfg.pack, seed=cfg.seed)


def _eval_text(cfg: FinetuneConfig) -> str:
    return (f"eval {cfg.eval_data}" if cfg.eval_data else f"eval {cfg.eval_fraction:g} held out"
            if cfg.eval_fraction else "no eval")


def _tokenizer(spec: str, mcfg):
    """The tokenizer ``spec`` names, checked against the model's vocabulary."""
    try:
        tokenizer = load_tokenizer(spec)
    except ValueError as e:
        raise ValueError(f"--tokenizer {spec}: {e}") from e
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(f"the tokenizer uses ids up to {tokenizer.vocab_size - 1} but the "
                         f"model's vocab_size is {mcfg.vocab_size}")
    return tokenizer


def _data_text(cfg: FinetuneConfig, data: PairData) -> str:
    s, spec, ev = data.stats(), data.config.tokenizer, _eval_text(cfg)
    rows = f"{s['rows']:,} rows, {s['examples_per_row']:.2f}/row" if cfg.pack else "padded"
    return (f"data {cfg.data} ({s['train']:,} pairs, {rows}, {data.epochs(cfg.steps):.1f} epochs; "
            f"{ev}: {s['eval']:,} pairs; truncated {s['truncated_inputs']} inputs / "
            f"{s['truncated_targets']} targets; {spec if spec == 'byte' else 'tokenizer ' + spec})")


def run(cfg: FinetuneConfig, *, on_step: Optional[Callable[[int, dict], None]] = None
        ) -> FinetuneResult:
    """Fine-tune (or resume) to ``cfg.steps``, then export and evaluate by generation (with
    ``cfg.head``: train that task head and evaluate its predictions: ``run_head``)."""
    if cfg.head is not None:
        return run_head(cfg, on_step=on_step)
    mcfg, mesh = prepare(cfg)
    pcfg = pairs_config(cfg)
    tokenizer = _tokenizer(pcfg.tokenizer, mcfg)
    data = PairData(pcfg, tokenizer, process_index=jax.process_index(),
                    process_count=jax.process_count())
    s = data.stats()
    if s["truncated_inputs"] or s["truncated_targets"]:
        log.warning("truncated %d inputs to --inputs-length %d and %d targets to "
                    "--targets-length %d (of %d pairs)", s["truncated_inputs"], cfg.inputs_length,
                    s["truncated_targets"], cfg.targets_length, s["train"] + s["eval"])
    if cfg.eval_every and not s["eval"]:
        log.warning("--eval-every %d without an eval split (--eval-data / --eval-fraction): "
                    "evaluation is off", cfg.eval_every)
    _check_keep_best(cfg, s["eval"])
    trainer = Trainer(cfg, mcfg, mesh, pcfg, kind="finetune", data_text=_data_text(cfg, data))

    def eval_line(metrics):
        return {"eval_loss": _token_mean(metrics, "loss"),
                "eval_accuracy": _token_mean(metrics, "accuracy")}

    def finish(hf_dir):
        if data.eval.inputs and cfg.eval_generate:
            return evaluate_generation(hf_dir, data, trainer.out / "eval.jsonl", cfg)
        return None

    return _train_and_export(cfg, trainer, data, tokenizer, T5ForConditionalGeneration,
                             eval_line, finish, on_step)


def _check_keep_best(cfg: FinetuneConfig, n_eval: int) -> None:
    if cfg.keep_best and not (cfg.eval_every and n_eval):
        raise ValueError("--keep-best needs --eval-every N and an eval split "
                         "(--eval-data or --eval-fraction)")


def _token_mean(metrics: list, key: str) -> float:
    """``key`` over the eval batches' metrics, weighted by their target tokens."""
    w = [float(m["target_tokens"]) for m in metrics]
    return sum(float(m[key]) * wi for m, wi in zip(metrics, w)) / max(sum(w), 1.0)


def _train_and_export(cfg: FinetuneConfig, trainer: Trainer, data, tokenizer, model_cls,
                      eval_line: Callable[[list], dict], finish: Callable[[Path], Optional[dict]],
                      on_step) -> FinetuneResult:
    """What ``run`` and ``run_head`` share after their data: train with an eval line every
    ``eval_every`` steps (``eval_line``: the eval batches' metrics -> ``eval_*``; keep-best on
    ``eval_loss``), export (the best checkpoint with ``keep_best``) and ``finish`` on the export."""
    best_dir = trainer.out / BEST
    eval_batches = [trainer.local_rows(b) for b in data.eval_rows()]

    def evaluate(step, params):
        line = eval_line([trainer.eval_step(params, local) for local in eval_batches])
        if cfg.keep_best:
            keep_if_best(trainer.model(params), tokenizer, best_dir, step, line["eval_loss"])
        return line

    history = trainer.train(data.iterate(trainer.start),
                            evaluate=evaluate if eval_batches else None, on_step=on_step)
    result = None
    if cfg.export:
        model = trainer.model()
        if cfg.keep_best and (best_dir / "best.json").is_file():
            model = formats.load(best_dir, model_cls)
            print(f"using the best checkpoint: {read_best(best_dir)}")
        hf_dir = export_hf(model, tokenizer, trainer.out)
        if hf_dir is not None:
            result = finish(hf_dir)
    return FinetuneResult(trainer.out, trainer.start, max(trainer.start, cfg.steps), history,
                          result)


def read_best(best_dir: Path) -> Optional[dict]:
    f = best_dir / "best.json"
    return json.loads(f.read_text()) if f.is_file() else None


def keep_if_best(model, tokenizer, best_dir: Path, step: int, loss: float) -> None:
    """Save the parameters to OUT/best when ``loss`` beats the record there (ties keep the older:
    a resumed run recomputing the same step finds its own record and writes nothing)."""
    from jt5 import weights
    best = read_best(best_dir)
    if best is not None and best["eval_loss"] <= loss:
        return
    (best_dir / "best.json").unlink(missing_ok=True)  # no record while the weights are replaced
    weights.save_native(model, best_dir, extra_files=tokenizer_files(tokenizer))
    if jax.process_index() == 0:
        tmp = best_dir / ".best.json.tmp"
        tmp.write_text(json.dumps({"step": step, "eval_loss": loss}) + "\n")
        tmp.replace(best_dir / "best.json")


# -- evaluation by generation -----------------------------------------------------------------
def _ngrams(text: str, n: int) -> collections.Counter:
    return collections.Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf_stats(hyp: str, ref: str, order: int = 6) -> np.ndarray:
    """Per n-gram order: [matches, hypothesis n-grams, reference n-grams] (whitespace dropped)."""
    hyp, ref = "".join(hyp.split()), "".join(ref.split())
    out = np.zeros((order, 3))
    for n in range(1, order + 1):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        out[n - 1] = (sum((h & r).values()), sum(h.values()), sum(r.values()))
    return out


def chrf(stats: np.ndarray, beta: float = 2.0) -> float:
    """chrF (0..100) from summed ``chrf_stats``: precision and recall averaged over the orders
    that occur (as sacrebleu does), then F-beta."""
    live = stats[(stats[:, 1] > 0) & (stats[:, 2] > 0)]
    if not len(live):
        return 100.0 if not stats[:, 1:].any() else 0.0
    p = np.mean(live[:, 0] / live[:, 1])
    r = np.mean(live[:, 0] / live[:, 2])
    return 0.0 if p + r == 0 else float(100 * (1 + beta**2) * p * r / (beta**2 * p + r))


def evaluate_generation(hf_dir: Path, data: PairData, path: Path, cfg: FinetuneConfig) -> dict:
    """Greedy outputs of the *exported* model on the eval split -> ``path`` (JSONL) + summary."""
    tok, enc = data.tokenizer, data.eval
    n = min(len(enc.inputs), cfg.eval_generate)
    model = T5ForConditionalGeneration.from_pretrained(hf_dir, dtype=default_dtype(),
                                                       attention=cfg.attention)
    B = cfg.generate_batch_size
    width = max(len(x) for x in enc.inputs[:n])
    new = cfg.max_new_tokens or cfg.targets_length
    outputs = []
    for lo in range(0, n, B):  # fixed [B, width] batches: one compiled program
        ids = np.full((B, width), tok.pad_id, np.int32)
        mask = np.zeros((B, width), np.int32)
        mask[:, 0] = 1  # filler rows of the last batch: one token, never an all-masked row
        for r, x in enumerate(enc.inputs[lo:lo + B]):
            ids[r, :len(x)], mask[r, :len(x)] = x, 1
        gen = np.asarray(model.generate(ids, mask, max_new_tokens=new))
        outputs += [tok.decode(row[1:], skip_special_tokens=True) for row in gen[:min(B, n - lo)]]
    lines, total, exact = [], np.zeros((6, 3)), 0
    with open(path, "w") as f:
        for i, out in enumerate(outputs):
            rec = enc.records[i]
            target = tok.decode(enc.targets[i], skip_special_tokens=True)  # as trained (truncated)
            st = chrf_stats(out.strip(), target.strip())
            total += st
            hit = out.strip() == target.strip()
            exact += hit
            f.write(json.dumps({"where": rec.where, "input": rec.input, "target": target,
                                "output": out, "exact_match": hit, "chrf": chrf(st)}) + "\n")
            if len(lines) < 3:
                lines.append(f"  {rec.input[:60]!r} -> {out[:60]!r} (target {target[:60]!r})")
    summary = {"examples": n, "exact_match": exact / max(n, 1), "chrf": chrf(total)}
    print(f"eval: {n} examples, exact match {summary['exact_match']:.3f}, chrF "
          f"{summary['chrf']:.1f}; {path}")
    print("\n".join(lines))
    (path.parent / "eval_summary.json").write_text(json.dumps(summary) + "\n")
    return summary


# -- task heads (--head) -----------------------------------------------------------------------
def labels_config(cfg: FinetuneConfig, id2label: tuple = ()) -> LabelsConfig:
    if not cfg.data:
        raise ValueError("--data: give a .jsonl (or .csv / .tsv) file of labelled examples")
    return LabelsConfig(head=cfg.head, data=cfg.data, eval_data=cfg.eval_data,
                        eval_fraction=cfg.eval_fraction, input_field=cfg.input_field,
                        label_field=cfg.label_field, context_field=cfg.context_field,
                        prefix=cfg.prefix, tokenizer=tokenizer_spec(cfg),
                        inputs_length=cfg.inputs_length, batch_size=cfg.batch_size, seed=cfg.seed,
                        id2label=id2label)


def _own_labels(cfg: FinetuneConfig, mcfg) -> tuple:
    """The label names of a ``--model`` that already has this head (its data must use them)."""
    if not is_model_path(cfg.model):
        return ()
    cls = formats.saved_class(cfg.model)
    if getattr(cls, "task_head", None) != cfg.head:
        return ()
    return mcfg.id2label or tuple(f"LABEL_{i}" for i in range(mcfg.num_labels))


def _labels_text(cfg: FinetuneConfig, data: LabelData) -> str:
    s, spec, ev = data.stats(), data.config.tokenizer, _eval_text(cfg)
    labels = f"{s['labels']} labels" if data.id2label else "spans"
    return (f"head {cfg.head}; data {cfg.data} ({s['train']:,} examples, {labels}, "
            f"{data.epochs(cfg.steps):.1f} epochs; {ev}: {s['eval']:,}; truncated "
            f"{s['truncated']}; {spec if spec == 'byte' else 'tokenizer ' + spec})")


def run_head(cfg: FinetuneConfig, *, on_step: Optional[Callable[[int, dict], None]] = None
             ) -> FinetuneResult:
    """``run`` with ``cfg.head``: train a task head on labelled data (see the module docstring)."""
    mcfg, mesh = prepare(cfg)
    tokenizer = _tokenizer(tokenizer_spec(cfg), mcfg)
    lcfg = labels_config(cfg, _own_labels(cfg, mcfg))
    data = LabelData(lcfg, tokenizer, process_index=jax.process_index(),
                     process_count=jax.process_count())
    if cfg.classifier_pooling is not None:
        mcfg = mcfg.replace(classifier_pooling=cfg.classifier_pooling)
    names = data.id2label
    if names:
        default = names == tuple(f"LABEL_{i}" for i in range(len(names)))
        mcfg = mcfg.replace(num_labels=len(names), id2label=() if default else names,
                            problem_type="single_label_classification")
    s = data.stats()
    if s["truncated"]:
        log.warning("truncated %d of %d inputs to --inputs-length %d", s["truncated"],
                    s["train"] + s["eval"], cfg.inputs_length)
    if s["unanswerable"]:
        log.warning("%d of %d questions have no answer span the input's tokens hold (cut off by "
                    "--inputs-length, or not whole tokens): not trained on", s["unanswerable"],
                    s["train"] + s["eval"])
    _check_keep_best(cfg, s["eval"])
    task = head_tasks.task(cfg.head)
    trainer = Trainer(cfg, mcfg, mesh, lcfg, kind="finetune", data_text=_labels_text(cfg, data),
                      task=task)

    def eval_line(metrics):
        line = {"eval_loss": _token_mean(metrics, "loss")}
        line.update({f"eval_{k}": v for k, v in head_tasks.score(data, metrics)[0].items()})
        return line

    def finish(hf_dir):
        if data.eval.ids:
            return evaluate_predictions(hf_dir, data, trainer.out / "eval.jsonl", cfg)
        return None

    return _train_and_export(cfg, trainer, data, tokenizer, task.model_cls, eval_line, finish,
                             on_step)


def evaluate_predictions(hf_dir: Path, data: LabelData, path: Path, cfg: FinetuneConfig) -> dict:
    """The *exported* model's predictions on the eval split -> ``path`` (JSONL) + summary."""
    model = formats.load(hf_dir, dtype=default_dtype(), attention=cfg.attention)
    graphdef, params = nnx.split(model)
    predict = head_tasks.task(cfg.head).predict

    @jax.jit
    def step(params, batch):
        return predict(nnx.merge(graphdef, params), batch)

    outputs = [jax.device_get(step(params, b)) for b in data.eval_rows()]
    summary, records = head_tasks.score(data, outputs)
    summary = {"examples": len(records), **summary}
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    (path.parent / "eval_summary.json").write_text(json.dumps(summary) + "\n")
    shown = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in summary.items()
                      if k != "examples")
    print(f"eval: {len(records)} examples, {shown}; {path}")
    return summary
