"""`jt5 finetune`: fine-tune a model on (input, target) pairs from JSONL / CSV / TSV."""
from __future__ import annotations

import argparse

from jt5.bridge.keymap import HEADS
from jt5.cli.common import (MODEL_DIR, NON_NEGATIVE, POSITIVE, add_run_flags, add_sequence_flags,
                            float_in, preset_names, run_training)

HELP = "fine-tune a model on (input, target) pairs from JSONL / CSV / TSV"

EPILOG = """\
Data: .jsonl (one object per line), .csv or .tsv (a header row) with an input and a target field.
Each step trains on --batch-size rows; --pack (default) lays several pairs per row with segment
ids that keep them apart. Every --eval-every steps the loss over the eval split (--eval-data, or
--eval-fraction of --data held out) joins OUT/metrics.jsonl; --keep-best keeps the parameters of
the lowest eval loss in OUT/best. At the end: OUT/hf (a transformers directory with tokenizer
files), and greedy outputs on the eval split in OUT/eval.jsonl with exact match and chrF.
Re-running the same command resumes; Ctrl-C or SIGTERM saves the step in flight (exit 130/143).

With --head, a task head trains on labelled examples instead (no packing; --targets-length
unused): sequence-classification / encoder-classification read a text and a label (.jsonl,
.csv, .tsv), token-classification a list of words and a list of labels, question-answering a
question, a context and SQuAD answers (.jsonl). Eval metrics: accuracy and macro_f1; accuracy
and f1 (entity F1 for IOB2 tags); exact_match and f1. OUT/hf loads in transformers' head class;
OUT/eval.jsonl holds each eval example's prediction.
"""


def add(p: argparse.ArgumentParser):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, metavar="PRESET_OR_DIR",
                   help=f"the model to fine-tune: {MODEL_DIR}, or a preset "
                        f"({', '.join(preset_names())}) to train from scratch")
    g.add_argument("--data", required=True, help="training pairs: .jsonl, .csv or .tsv")
    g.add_argument("--eval-data", default=None, help="eval pairs (same formats)")
    g.add_argument("--eval-fraction", type=float_in(0.0, 0.99), default=0.0,
                   help="hold this fraction of --data out as the eval split when no --eval-data "
                        "(default 0)")
    g.add_argument("--input-field", default="input", help="(default input)")
    g.add_argument("--target-field", default="target", help="(default target)")
    g.add_argument("--prefix", default="", help="task prefix prepended to every input, e.g. "
                   "'translate English to German: ' (default none)")
    add_sequence_flags(g, unit="pairs")
    g.add_argument("--dropout", type=float_in(0.0, 1.0), default=None,
                   help="dropout rate (default: the model's)")
    g = p.add_argument_group("task heads (instead of text-to-text)")
    g.add_argument("--head", choices=HEADS, default=None,
                   help="train this task head (jt5.heads) on labelled data; the labels' names "
                        "become the model's id2label; metrics and eval.jsonl per head")
    g.add_argument("--label-field", default="label",
                   help="with --head: the label (a name or an integer id); token-classification: "
                        "a list of labels, one per word of --input-field (a list of words); "
                        "question-answering: SQuAD answers {text, answer_start} (default label)")
    g.add_argument("--context-field", default="context",
                   help="--head question-answering: the passage; --input-field is the question "
                        "(default context)")
    g.add_argument("--pooling", choices=("mean", "first"), default=None,
                   help="--head encoder-classification: pool the encoder states by the mean over "
                        "tokens or the first token (default: the model's, else mean)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=POSITIVE, default=300, help="train steps (default 300)")
    g.add_argument("--batch-size", type=POSITIVE, default=16, help="global rows (default 16)")
    g.add_argument("--lr", type=float_in(0.0, open_low=True), default=1e-3,
                   help="peak AdamW learning rate (default 1e-3)")
    g.add_argument("--warmup", type=NON_NEGATIVE, default=30, help="(default 30)")
    g.add_argument("--weight-decay", type=float_in(0.0), default=0.0, help="(default 0)")
    g.add_argument("--seed", type=NON_NEGATIVE, default=0, help="init, data order, dropout")
    g = p.add_argument_group("evaluation, run and devices")
    g.add_argument("--eval-every", type=NON_NEGATIVE, default=0,
                   help="eval loss every N steps; 0: never (default 0)")
    g.add_argument("--keep-best", action="store_true",
                   help="keep the parameters of the lowest eval loss in OUT/best and export them")
    g.add_argument("--eval-generate", type=NON_NEGATIVE, default=1000,
                   help="eval pairs to generate at the end (default 1000; 0: none)")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=None,
                   help="generated length at the end (default --targets-length)")
    add_run_flags(g, out="runs/finetune", save_every=100)


def run(args) -> int:
    from jt5.train import finetune
    return run_training(finetune.run, config(args))


def config(args):
    """The run's ``FinetuneConfig`` from the flags (``jt5 plan finetune`` builds the same)."""
    from jt5.train import finetune
    from jt5.train.step import OptimConfig

    optim = OptimConfig(lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
                        weight_decay=args.weight_decay)
    cfg = finetune.FinetuneConfig(
        model=args.model, out=args.out, steps=args.steps, batch_size=args.batch_size,
        inputs_length=args.inputs_length, targets_length=args.targets_length,
        tokenizer=args.tokenizer, pack=args.pack, seed=args.seed, mesh=args.mesh,
        save_every=args.save_every, keep=args.keep, eval_every=args.eval_every, optim=optim,
        dtype=args.dtype, attention=args.attention, dropout_rate=args.dropout,
        tensorboard=args.tensorboard, export=not args.no_export, progress=not args.no_progress,
        data=args.data, eval_data=args.eval_data, eval_fraction=args.eval_fraction,
        input_field=args.input_field, target_field=args.target_field, prefix=args.prefix,
        keep_best=args.keep_best, max_new_tokens=args.max_new_tokens,
        eval_generate=args.eval_generate, head=args.head, label_field=args.label_field,
        context_field=args.context_field, classifier_pooling=args.pooling)
    return cfg


