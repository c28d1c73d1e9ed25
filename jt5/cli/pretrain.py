"""`jt5 pretrain`: UL2-pretrain a T5 (no arguments: a small model on the built-in corpus)."""
from __future__ import annotations

import argparse

from jt5.cli import fields
from jt5.cli.common import run_training

HELP = "UL2-pretrain a T5 (no arguments: a small model on the built-in corpus)"

EPILOG = """\
With no arguments: the tiny preset (0.89M parameters, byte vocabulary) on the built-in corpus
(Python standard-library docstrings): 800 steps of 16 packed rows x (128 input, 32 target)
tokens, AdamW lr 3e-3, 50 warmup steps, cosine decay to 3e-4, float32 on CPU. About 2-3
minutes on a 2-core CPU; the loss falls from ~6.3 (ln 384 = 5.95) through ~3 at step 50 to
~2.6. Writes OUT/metrics.jsonl (one line per step), OUT/checkpoints/,
OUT/hf (a transformers directory with tokenizer files) and OUT/samples.txt. Re-running the same
command resumes from the newest complete checkpoint; Ctrl-C or SIGTERM first finishes the step
in flight and saves it (exit status 130 / 143). Multi-host: run the same command on every
host with --coordinator HOST:PORT --num-processes N --process-id I (SLURM / Open MPI
environments are detected without them).
"""


def add(p: argparse.ArgumentParser):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    fields.add_flags(p, "pretrain")


def run(args) -> int:
    from jt5.train import loop

    loop.init_distributed(args.coordinator, args.num_processes, args.process_id)
    return run_training(loop.run, config(args))


def config(args):
    """The run's ``LoopConfig`` from the flags (``jt5 plan pretrain`` builds the same)."""
    return fields.build(args, "pretrain")
