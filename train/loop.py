"""UL2 pretraining (``jt5 pretrain``) on the shared machinery of ``train/runner.py``.

    result = run(LoopConfig(model="tiny", out="runs/pretrain", steps=800))

Re-running the same configuration resumes from the newest complete checkpoint in ``OUT`` and
continues exactly as an uninterrupted run would: batch ``s`` is a pure function of ``s`` (see
``train/data.py``), the dropout key of update ``s`` is ``fold_in(rng, s)``, and ``metrics.jsonl``
is cut back to the restored step before new lines are appended. A non-finite loss stops the run
(:class:`NonFiniteLoss`) before anything computed from it is saved. SIGINT / SIGTERM finish the
step in flight, save it and stop (:class:`jt5.train.signals.Interrupted`). At the end the model is
written as a transformers directory (``OUT/hf``, with tokenizer files) and a few held-out examples
are generated from it into ``OUT/samples.txt``.

Every process of a multi-host job runs this same function (after ``jax.distributed.initialize``);
each feeds its own rows of the global batch; process 0 writes metrics, export and samples.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np

from jt5.model import T5ForConditionalGeneration
from jt5.tokenizer import load_tokenizer
from jt5.train import sources
from jt5.train.data import DataConfig, Pipeline, assemble
from jt5.train.runner import (TIMING_KEYS, MetricsWriter, NonFiniteLoss, RunConfig, Trainer,  # noqa: F401
                              default_dtype, export_hf, init_distributed, prepare, read_metrics,
                              tokenizer_spec)
from jt5.train.signals import Interrupted  # noqa: F401  (raised by Trainer.train)
from jt5.train.ul2 import Examples

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoopConfig(RunConfig):
    """One pretraining run; the CLI flags map onto these fields one to one (see ``jt5 pretrain -h``)."""

    data: tuple = ("builtin",)
    text_field: str = "text"
    min_chunk: float = 1.0
    data_workers: int = 0        # batches built in this many processes (0: a thread)
    samples_per_kind: int = 1
    max_new_tokens: int = 64


class RunResult(NamedTuple):
    out: Path
    start_step: int         # the step this invocation resumed from (0: fresh)
    step: int               # the step reached
    history: list           # the metric lines this invocation produced


def data_config(cfg: LoopConfig) -> DataConfig:
    return DataConfig(data=tuple(cfg.data), tokenizer=tokenizer_spec(cfg),
                      inputs_length=cfg.inputs_length, targets_length=cfg.targets_length,
                      batch_size=cfg.batch_size, pack=cfg.pack, seed=cfg.seed,
                      text_field=cfg.text_field, min_chunk=cfg.min_chunk)


def _data_text(data: Pipeline) -> str:
    store, spec = data.store, data.config.tokenizer
    tok = spec if spec == "byte" else "tokenizer " + str(spec)
    per_source = f"; {data.source_summary()}" if len(data.config.data) > 1 else ""
    return (f"data {', '.join(data.config.data)} ({len(store.doc_index):,} documents, "
            f"{len(store.tokens):,} tokens, {tok}{per_source})")


def _heldout_batch(data: Pipeline, rows: int) -> Optional[dict]:
    """``rows`` held-out examples (the sample-prompt documents, never trained on) as a batch."""
    kinds = len({d.kind for d in data.mixture})
    prompts = data.sample_prompts(per_kind=math.ceil(rows / kinds))[:rows]
    if len(prompts) < rows:
        return None
    L_in, L_tgt = data.config.inputs_length, data.config.targets_length
    inputs = np.zeros((rows, L_in), np.int32)
    targets = np.zeros((rows, L_tgt), np.int32)
    for r, p in enumerate(prompts):
        inputs[r, :len(p.inputs)] = p.inputs[:L_in]
        targets[r, :len(p.targets)] = p.targets[:L_tgt]
    ex = Examples(inputs, np.array([min(len(p.inputs), L_in) for p in prompts], np.int32), targets,
                  np.array([min(len(p.targets), L_tgt) for p in prompts], np.int32),
                  np.zeros(rows, np.int32))
    zero = np.zeros(rows, np.int64)
    return assemble(ex, np.arange(rows), zero, zero, np.ones(rows, np.int32), rows)


# -- the run ----------------------------------------------------------------------------------
def run(cfg: LoopConfig, *, on_step: Optional[Callable[[int, dict], None]] = None) -> RunResult:
    """Train (or resume) to ``cfg.steps``, then export and sample. ``on_step(step, line)`` is
    called after each metrics line (tests use it to simulate a crash)."""
    pid, nproc = jax.process_index(), jax.process_count()
    mcfg, mesh = prepare(cfg)  # cheap checks first, before the corpus is tokenised
    data_cfg = data_config(cfg)
    try:
        tokenizer = load_tokenizer(data_cfg.tokenizer)
    except ValueError as e:
        raise ValueError(f"--tokenizer {data_cfg.tokenizer}: {e}") from e
    try:
        data = Pipeline(data_cfg, process_index=pid, process_count=nproc, tokenizer=tokenizer,
                        progress=cfg.progress)
    except (ValueError, OSError) as e:  # missing, empty, binary or malformed data files
        raise ValueError(f"--data {' '.join(data_cfg.data)}: {e}") from e
    if data.vocab_size > mcfg.vocab_size:
        raise ValueError(f"the tokenizer/data use ids up to {data.vocab_size - 1} but the model's "
                         f"vocab_size is {mcfg.vocab_size}")
    trainer = Trainer(cfg, mcfg, mesh, data_cfg, kind="pretrain", data_text=_data_text(data))

    evaluate = None
    if cfg.eval_every:
        rows = _heldout_batch(data, cfg.batch_size)
        if rows is None:
            log.warning("not enough held-out documents for --eval-every; evaluation is off")
        else:
            local = trainer.local_rows(rows)

            def evaluate(step, params):
                ev = trainer.eval_step(params, local)
                return {"eval_loss": float(ev["loss"]), "eval_accuracy": float(ev["accuracy"])}

    taken: dict = {}  # step -> tokens each --data source gave that step's batch
    names = [os.path.basename(os.path.normpath(s.spec)) or s.spec
             for s in sources.parse_sources(data.config.data)]
    if len(set(names)) < len(names):
        names = [s.spec for s in sources.parse_sources(data.config.data)]

    def per_source(step):  # metrics line `step` is made by batch step - 1
        tokens = taken.pop(step - 1, None)
        if len(names) < 2 or tokens is None:
            return {}
        return {f"source_tokens/{name}": float(n) for name, n in zip(names, tokens)}

    history = trainer.train(data.iterate(trainer.start, workers=cfg.data_workers, sources=taken),
                            evaluate=evaluate, on_step=on_step, batch_metrics=per_source)
    if cfg.export:  # outside the mesh context: loading the export builds an unsharded model
        export_and_sample(trainer.model(), data, trainer.out, cfg)
    return RunResult(trainer.out, trainer.start, max(trainer.start, cfg.steps), history)


# -- export -----------------------------------------------------------------------------------
def export_and_sample(model, data: Pipeline, out: Path, cfg: LoopConfig) -> None:
    """Write OUT/hf (all processes gather, process 0 writes) and OUT/samples.txt (process 0)."""
    hf_dir = export_hf(model, data.tokenizer, out)
    if hf_dir is not None:
        write_samples(hf_dir, data, out / "samples.txt", cfg)


def write_samples(hf_dir: Path, data: Pipeline, path: Path, cfg: LoopConfig) -> None:
    """Greedy outputs of the *exported* model on held-out examples: printed and saved."""
    if cfg.samples_per_kind <= 0:
        return
    prompts = data.sample_prompts(per_kind=cfg.samples_per_kind)
    if not prompts:
        log.warning("no held-out documents: no samples")
        return
    try:
        model = T5ForConditionalGeneration.from_pretrained(hf_dir, dtype=default_dtype(),
                                                           attention=cfg.attention)
        width = max(len(p.inputs) for p in prompts)
        ids = np.zeros((len(prompts), width), np.int32)
        mask = np.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, :len(p.inputs)] = p.inputs
            mask[r, :len(p.inputs)] = 1
        gen = np.asarray(model.generate(ids, mask, max_new_tokens=cfg.max_new_tokens))
    except ImportError as e:  # generation not available in this build
        log.warning("no samples: %s", e)
        return
    lines = []
    for p, row in zip(prompts, gen):
        lines += [f"== {p.denoiser} (held-out {p.document})",
                  f"input    : {data.render(p.inputs)}",
                  f"target   : {data.render(p.targets)}",
                  f"generated: {data.render(row[1:])}", ""]
    text = "\n".join(lines)
    path.write_text(text)
    print(text)
