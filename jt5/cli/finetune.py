"""`jt5 finetune`: fine-tune a model on (input, target) pairs from JSONL / CSV / TSV."""
from __future__ import annotations

import argparse

from jt5.bridge.keymap import HEADS
from jt5.cli import fields
from jt5.cli.common import run_training

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
    fields.add_flags(p, "finetune")
    # Task heads: flags beside the table; fields.build passes them on by their dest.
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
    g.add_argument("--pooling", dest="classifier_pooling", choices=("mean", "first"), default=None,
                   help="--head encoder-classification: pool the encoder states by the mean over "
                        "tokens or the first token (default: the model's, else mean)")


def run(args) -> int:
    from jt5.train import finetune
    return run_training(finetune.run, config(args))


def config(args):
    """The run's ``FinetuneConfig`` from the flags (``jt5 plan finetune`` builds the same)."""
    return fields.build(args, "finetune")
