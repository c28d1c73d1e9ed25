"""`jt5 pretrain`: UL2-pretrain a T5 (no arguments: a small model on the built-in corpus)."""
from __future__ import annotations

import argparse

from jt5.cli.common import (MODEL_DIR, NON_NEGATIVE, POSITIVE, add_sequence_flags, float_in,
                            preset_names, run_training)

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
    from jt5.train import OPTIMIZERS, SCHEDULES  # the package alone, not the training stack
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="tiny", metavar="PRESET_OR_DIR",
                   help=f"a preset ({', '.join(preset_names())}) or a model to continue from: "
                        f"{MODEL_DIR} (default: tiny)")
    g.add_argument("--data", nargs="+", default=["builtin"], metavar="SOURCE[:WEIGHT]",
                   help="'builtin' (the embedded corpus), text / .jsonl(.gz/.zst) / .parquet files "
                        "or directories of them, datasets save_to_disk directories, hf:NAME "
                        "(a dataset in the local datasets cache); SOURCE:WEIGHT samples sources "
                        "by weight (default: builtin)")
    g.add_argument("--text-field", default="text",
                   help="the text column / JSON field of .parquet, datasets and .jsonl sources "
                        "(default text)")
    g.add_argument("--min-chunk", type=float_in(0.0, 1.0, open_low=True), default=1.0,
                   help="packing may shorten a UL2 chunk to this fraction so rows fill on both "
                        "sides (1: whole examples only; 0.1 fills ~0.93/0.95 at 512/114, see "
                        "benchmarks/RESULTS.md) (default 1)")
    add_sequence_flags(g, unit="examples")
    g.add_argument("--remat", choices=("none", "full", "dots"), default="none",
                   help="recompute layer activations in the backward pass (default none)")
    g.add_argument("--dropout", type=float_in(0.0, 1.0), default=None,
                   help="dropout rate (default: the model's; 0 for presets)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=POSITIVE, default=800, help="total train steps (default 800)")
    g.add_argument("--batch-size", type=POSITIVE, default=16,
                   help="global batch size in rows, over all hosts (default 16)")
    g.add_argument("--accum", type=POSITIVE, default=1,
                   help="gradient accumulation: micro-batches per step (default 1)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="(default adamw)")
    g.add_argument("--lr", type=float_in(0.0, open_low=True), default=None,
                   help="peak learning rate (default 3e-3 for adamw, 1e-2 for adafactor: tuned "
                        "for small models; use less for base-sized ones)")
    g.add_argument("--warmup", type=NON_NEGATIVE, default=50,
                   help="linear warmup steps (default 50)")
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="decay after warmup: cosine / linear to 0.1 x lr at --steps, rsqrt, or "
                        "constant (default cosine)")
    g.add_argument("--weight-decay", type=float_in(0.0), default=0.0,
                   help="decoupled weight decay on matrices (default 0)")
    g.add_argument("--clip", type=float_in(0.0), default=1.0,
                   help="clip gradients to this global norm; 0 disables (default 1.0)")
    g.add_argument("--z-loss", type=float_in(0.0), default=1e-4,
                   help="z-loss coefficient on logsumexp(logits)^2 (default 1e-4)")
    g.add_argument("--seed", type=NON_NEGATIVE, default=0,
                   help="parameter init, data and dropout (default 0)")
    g = p.add_argument_group("run, checkpoints and devices")
    g.add_argument("--out", default="runs/pretrain",
                   help="run directory: checkpoints, metrics, export (default runs/pretrain)")
    g.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=2,fsdp=2,tensor=2 (any axis may be 1, one may be "
                        "-1; default: all devices on data)")
    g.add_argument("--save-every", type=NON_NEGATIVE, default=200,
                   help="checkpoint every N steps (0: only at the end), at the end, and on "
                        "SIGINT/SIGTERM (default 200)")
    g.add_argument("--keep", type=POSITIVE, default=3, help="checkpoints to keep (default 3)")
    g.add_argument("--eval-every", type=NON_NEGATIVE, default=0,
                   help="held-out loss every N steps; 0 disables (default 0)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard events to OUT/tensorboard (needs tensorboardX)")
    g.add_argument("--samples", type=NON_NEGATIVE, default=1,
                   help="held-out samples to generate per denoiser kind at the end (default 1)")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=64,
                   help="sample length (default 64)")
    g.add_argument("--no-export", action="store_true",
                   help="skip the transformers export and samples at the end")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("multi-host (default: auto-detected, else single host)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0's coordinator")
    g.add_argument("--num-processes", type=POSITIVE, default=None, help="number of processes")
    g.add_argument("--process-id", type=NON_NEGATIVE, default=None, help="this process's index")


def run(args) -> int:
    from jt5.train import loop

    loop.init_distributed(args.coordinator, args.num_processes, args.process_id)
    return run_training(loop.run, config(args))


def config(args):
    """The run's ``LoopConfig`` from the flags (``jt5 plan pretrain`` builds the same)."""
    from jt5.train import loop
    from jt5.train.step import OptimConfig

    optim = OptimConfig(optimizer=args.optimizer, lr=args.lr, warmup_steps=args.warmup,
                        total_steps=args.steps, schedule=args.schedule,
                        weight_decay=args.weight_decay, clip=args.clip, z_loss=args.z_loss,
                        accum_steps=args.accum)
    cfg = loop.LoopConfig(
        model=args.model, out=args.out, steps=args.steps, batch_size=args.batch_size,
        inputs_length=args.inputs_length, targets_length=args.targets_length,
        data=tuple(args.data), text_field=args.text_field, min_chunk=args.min_chunk,
        tokenizer=args.tokenizer, pack=args.pack, seed=args.seed,
        mesh=args.mesh, save_every=args.save_every, keep=args.keep, eval_every=args.eval_every,
        optim=optim, dtype=args.dtype, remat=args.remat, attention=args.attention,
        dropout_rate=args.dropout, tensorboard=args.tensorboard, export=not args.no_export,
        samples_per_kind=args.samples, max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress)
    return cfg


