"""The ONE table of `jt5 pretrain` / `jt5 finetune` flags: each row names the config field it
sets (``LoopConfig`` / ``FinetuneConfig``, ``optim.*`` for ``OptimConfig``), its flag, type,
per-job default and help. ``add_flags(parser, job)`` adds a job's flags (``jt5 plan`` reuses
them through ``jt5.cli.pretrain.add`` / ``finetune.add``); ``build(args, job)`` turns parsed
flags into the job's config. Nothing here imports the training stack, so ``--help`` stays fast;
``tests/test_cli_fields.py`` checks the table against the dataclasses (every field has a row or
is Python-only, and defaults agree unless a row says the CLI differs).

A new field: one ``Flag`` row (``jobs`` says where it applies). A job-only flag that sets no
field (multi-host setup) has ``field=""``.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Union

from jt5.cli.common import (DTYPES, MODEL_DIR, NON_NEGATIVE, POSITIVE, attention_impls,
                            float_in, preset_names)

JOBS = ("pretrain", "finetune")
BOTH = JOBS
PerJob = Union[Any, dict]  # a value, or {job: value}


class Flag(NamedTuple):
    field: str                     # config field ("optim.lr": OptimConfig), "" for none
    flag: str                      # "--batch-size"
    help: PerJob                   # "(default ...)" is appended from the default unless given
    default: PerJob = None
    type: Optional[Callable] = None
    kind: str = "value"            # value | true (store_true) | false (--no-X: field False) | bool
    choices: Optional[Callable[[], tuple]] = None
    jobs: tuple = BOTH
    group: str = "model and data"
    nargs: Optional[str] = None
    metavar: Optional[str] = None
    required: PerJob = False
    cli_default: tuple = ()        # jobs whose CLI default differs from the dataclass's


def _per(value: PerJob, job: str):
    return value.get(job) if isinstance(value, dict) else value


def _optimizers():
    from jt5.train import OPTIMIZERS  # the package alone, not the training stack
    return OPTIMIZERS


def _schedules():
    from jt5.train import SCHEDULES
    return SCHEDULES


def _model_help(job):
    if job == "pretrain":
        return (f"a preset ({', '.join(preset_names())}) or a model to continue from: "
                f"{MODEL_DIR} (default: tiny)")
    return (f"the model to fine-tune: {MODEL_DIR}, or a preset ({', '.join(preset_names())}) "
            "to train from scratch")


G_DATA, G_OPT, G_RUN, G_HOSTS = ("model and data", "optimisation", "run, checkpoints and devices",
                                 "multi-host (default: auto-detected, else single host)")
FLAGS: tuple[Flag, ...] = (
    # -- model and data ------------------------------------------------------------------------
    Flag("model", "--model", {"pretrain": lambda: _model_help("pretrain"),
                              "finetune": lambda: _model_help("finetune")},
         default={"pretrain": "tiny"}, metavar="PRESET_OR_DIR", required={"finetune": True}),
    Flag("data", "--data", {
        "pretrain": "'builtin' (the embedded corpus), text / .jsonl(.gz/.zst) / .parquet files or "
                    "directories of them, datasets save_to_disk directories, hf:NAME (a dataset "
                    "in the local datasets cache); SOURCE:WEIGHT samples sources by weight "
                    "(default: builtin)",
        "finetune": "training pairs: .jsonl, .csv or .tsv"},
         default={"pretrain": ("builtin",)}, nargs={"pretrain": "+"},
         metavar={"pretrain": "SOURCE[:WEIGHT]"}, required={"finetune": True}),
    Flag("text_field", "--text-field", "the text column / JSON field of .parquet, datasets and "
         ".jsonl sources", default="text", jobs=("pretrain",)),
    Flag("min_chunk", "--min-chunk", "packing may shorten a UL2 chunk to this fraction so rows "
         "fill on both sides (1: whole examples only; 0.1 fills >= 0.95 on both sides at 512/114 "
         "and 512/512, see benchmarks/RESULTS.md)", default=1.0, type=float_in(0.0, 1.0, open_low=True),
         jobs=("pretrain",)),
    Flag("data_workers", "--data-workers", "build batches in this many processes (0: one "
         "thread; batches are the same either way)", default=0, type=NON_NEGATIVE,
         jobs=("pretrain",)),
    Flag("eval_data", "--eval-data", "eval pairs (same formats)", jobs=("finetune",)),
    Flag("eval_fraction", "--eval-fraction", "hold this fraction of --data out as the eval split "
         "when no --eval-data", default=0.0, type=float_in(0.0, 0.99), jobs=("finetune",)),
    Flag("input_field", "--input-field", "", default="input", jobs=("finetune",)),
    Flag("target_field", "--target-field", "", default="target", jobs=("finetune",)),
    Flag("prefix", "--prefix", "task prefix prepended to every input, e.g. 'translate English "
         "to German: ' (default none)", default="", jobs=("finetune",)),
    Flag("tokenizer", "--tokenizer", "'byte' (ByT5 bytes) or a transformers tokenizer directory "
         "(default: the --model directory's tokenizer if it has one, else byte)"),
    Flag("inputs_length", "--inputs-length", {
        "pretrain": "encoder length (UL2 chunks are cut to fit it)",
        "finetune": "encoder length; longer inputs are truncated"}, default=128, type=POSITIVE),
    Flag("targets_length", "--targets-length", {
        "pretrain": "decoder length (UL2 chunks are cut to fit it)",
        "finetune": "decoder length; longer targets are truncated"}, default=32, type=POSITIVE),
    Flag("pack", "--pack", {"pretrain": "pack several examples per row, segment-separated "
                                        "(default: --pack)",
                            "finetune": "pack several pairs per row, segment-separated "
                                        "(default: --pack)"}, default=True, kind="bool"),
    Flag("dtype", "--dtype", "compute dtype; parameters stay float32 (default: bfloat16 on "
         "GPU/TPU, float32 on CPU)", choices=lambda: DTYPES),
    Flag("attention", "--attention", "attention implementation (default auto: pallas on GPU, "
         "xla elsewhere)", default="auto", choices=attention_impls),
    Flag("remat", "--remat", "recompute layer activations in the backward pass",
         default="none", choices=lambda: ("none", "full", "dots")),
    Flag("scan_layers", "--scan-layers", "run each stack's layers as one scan: one compiled "
         "layer body, so deep models compile much faster (same checkpoints and results)",
         kind="true", default=False),
    Flag("dropout_rate", "--dropout", {"pretrain": "dropout rate (default: the model's; 0 for "
                                                   "presets)",
                                       "finetune": "dropout rate (default: the model's)"},
         type=float_in(0.0, 1.0)),
    # -- optimisation --------------------------------------------------------------------------
    Flag("steps", "--steps", "total train steps", default={"pretrain": 800, "finetune": 300},
         type=POSITIVE, group=G_OPT),
    Flag("batch_size", "--batch-size", "global batch size in rows, over all hosts", default=16,
         type=POSITIVE, group=G_OPT),
    Flag("optim.accum_steps", "--accum", "gradient accumulation: micro-batches per step",
         default=1, type=POSITIVE, group=G_OPT),
    Flag("optim.optimizer", "--optimizer", "", default="adamw", choices=_optimizers, group=G_OPT),
    Flag("optim.lr", "--lr", {"pretrain": "peak learning rate (default 3e-3 for adamw, 1e-2 for "
                                          "adafactor: tuned for small models; use less for "
                                          "base-sized ones)",
                              "finetune": "peak learning rate"},
         default={"finetune": 1e-3}, type=float_in(0.0, open_low=True), group=G_OPT,
         cli_default=("finetune",)),
    Flag("optim.warmup_steps", "--warmup", "linear warmup steps",
         default={"pretrain": 50, "finetune": 30}, type=NON_NEGATIVE, group=G_OPT,
         cli_default=("pretrain", "finetune")),
    Flag("optim.schedule", "--schedule", "decay after warmup: cosine / linear to 0.1 x lr at "
         "--steps, rsqrt, or constant", default="cosine", choices=_schedules, group=G_OPT),
    Flag("optim.weight_decay", "--weight-decay", "decoupled weight decay on matrices",
         default=0.0, type=float_in(0.0), group=G_OPT),
    Flag("optim.clip", "--clip", "clip gradients to this global norm; 0 disables", default=1.0,
         type=float_in(0.0), group=G_OPT),
    Flag("optim.z_loss", "--z-loss", "z-loss coefficient on logsumexp(logits)^2", default=1e-4,
         type=float_in(0.0), group=G_OPT),
    Flag("seed", "--seed", "parameter init, data and dropout", default=0, type=NON_NEGATIVE,
         group=G_OPT),
    # -- run, checkpoints, evaluation ----------------------------------------------------------
    Flag("out", "--out", "run directory: checkpoints, metrics, export",
         default={"pretrain": "runs/pretrain", "finetune": "runs/finetune"}, group=G_RUN),
    Flag("mesh", "--mesh", "device mesh, e.g. data=2,fsdp=2,tensor=2 (any axis may be 1, one may "
         "be -1; default: all devices on data)", group=G_RUN),
    Flag("save_every", "--save-every", "checkpoint every N steps (0: only at the end), at the "
         "end, and on SIGINT/SIGTERM", default={"pretrain": 200, "finetune": 100},
         type=NON_NEGATIVE, group=G_RUN, cli_default=("finetune",)),
    Flag("keep", "--keep", "checkpoints to keep", default=3, type=POSITIVE, group=G_RUN),
    Flag("eval_every", "--eval-every", "held-out loss every N steps; 0 disables", default=0,
         type=NON_NEGATIVE, group=G_RUN),
    Flag("keep_best", "--keep-best", "keep the parameters of the lowest eval loss in OUT/best "
         "and export them", kind="true", default=False, jobs=("finetune",), group=G_RUN),
    Flag("eval_generate", "--eval-generate", "eval pairs to generate at the end (0: none)",
         default=1000, type=NON_NEGATIVE, jobs=("finetune",), group=G_RUN),
    Flag("tensorboard", "--tensorboard", "also write TensorBoard events to OUT/tensorboard "
         "(needs tensorboardX)", kind="true", default=False, group=G_RUN),
    Flag("samples_per_kind", "--samples", "held-out samples to generate per denoiser kind at "
         "the end", default=1, type=NON_NEGATIVE, jobs=("pretrain",), group=G_RUN),
    Flag("max_new_tokens", "--max-new-tokens", {"pretrain": "sample length",
                                                "finetune": "generated length at the end "
                                                            "(default --targets-length)"},
         default={"pretrain": 64}, type=POSITIVE, group=G_RUN),
    Flag("export", "--no-export", "skip the transformers export (and samples / evaluation) at "
         "the end", kind="false", default=True, group=G_RUN),
    Flag("progress", "--no-progress", "no progress bar", kind="false", default=True,
         group=G_RUN),
    # -- multi-host (no config field: jax.distributed is set up before the run) -----------------
    Flag("", "--coordinator", "HOST:PORT of process 0's coordinator", jobs=("pretrain",),
         group=G_HOSTS),
    Flag("", "--num-processes", "number of processes", type=POSITIVE, jobs=("pretrain",),
         group=G_HOSTS),
    Flag("", "--process-id", "this process's index", type=NON_NEGATIVE, jobs=("pretrain",),
         group=G_HOSTS),
)
# Config fields no flag sets (set from Python, or derived: total_steps = --steps).
PYTHON_ONLY = {"pretrain": {"async_checkpoints", "optim"},
               "finetune": {"async_checkpoints", "optim", "generate_batch_size"}}
OPTIM_DERIVED = {"total_steps", "final_lr_fraction", "b1", "b2"}


def dest(row: Flag) -> str:
    return row.flag[2:].replace("-", "_") if row.kind != "false" else row.flag[5:].replace("-", "_")


def rows(job: str) -> list[Flag]:
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; known: {JOBS}")
    return [r for r in FLAGS if job in r.jobs]


def add_flags(p: argparse.ArgumentParser, job: str) -> None:
    """Add ``job``'s flags to ``p``, in the table's groups and order."""
    groups = {}
    for row in rows(job):
        g = groups.get(row.group)
        if g is None:
            g = groups[row.group] = p.add_argument_group(row.group)
        text = _per(row.help, job)
        text = text() if callable(text) else text
        default = _per(row.default, job)
        if isinstance(default, tuple):
            default = list(default)
        kw: dict = {}
        if row.kind == "true":
            kw.update(action="store_true")
        elif row.kind == "false":
            kw.update(action="store_false", dest=dest(row))
        elif row.kind == "bool":
            kw.update(action=argparse.BooleanOptionalAction, default=default)
        else:
            kw.update(default=default)
            if row.type is not None:
                kw["type"] = row.type
            if row.choices is not None:
                kw["choices"] = row.choices()
            for name in ("nargs", "metavar"):
                value = _per(getattr(row, name), job)
                if value is not None:
                    kw[name] = value
            if _per(row.required, job):
                kw["required"] = True
                kw.pop("default")
            elif "(default" not in text and row.kind == "value":
                shown = default if default is not None and default != "" else None
                if shown is not None:
                    text = f"{text} (default {shown})".strip() if text else f"(default {shown})"
        g.add_argument(row.flag, help=text, **kw)


def build(args, job: str):
    """The job's config (``LoopConfig`` / ``FinetuneConfig`` with its ``OptimConfig``) from
    parsed flags."""
    from jt5.train.step import OptimConfig

    run, optim = {}, {}
    for row in rows(job):
        if not row.field:
            continue
        value = getattr(args, dest(row))
        if row.field == "data" and job == "pretrain":
            value = tuple(value)
        if row.field.startswith("optim."):
            optim[row.field[len("optim."):]] = value
        else:
            run[row.field] = value
    optim["total_steps"] = run["steps"]
    cls = config_class(job)
    # A flag a job module adds beside the table (dest == the field's name) is passed on too.
    for f in dataclasses.fields(cls):
        if f.name not in run and f.name not in PYTHON_ONLY[job] and hasattr(args, f.name):
            run[f.name] = getattr(args, f.name)
    return cls(**run, optim=OptimConfig(**optim))


def config_class(job: str):
    if job == "pretrain":
        from jt5.train.loop import LoopConfig
        return LoopConfig
    from jt5.train.finetune import FinetuneConfig
    return FinetuneConfig
