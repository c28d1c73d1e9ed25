"""The ``jt5`` command. Argument parsing only: each subcommand wires library calls and lives in
its own module here (``HELP``, ``add(parser)``, ``run(args) -> exit status``).

    jt5 pretrain   UL2-pretrain a T5 (no arguments: a small model on the built-in corpus)
    jt5 generate   generate text from a model directory
    jt5 convert    move a checkpoint between transformers and jt5 formats
    jt5 bench      run a benchmark script from benchmarks/
    jt5 finetune   fine-tune on (input, target) pairs
    jt5 embed      encoder embeddings of texts
    jt5 plan       compile a job for GPUs (no GPU needed): memory per device, fits, FLOPs
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

from jt5.cli.common import Parser

# Subcommand -> its module in this package (imported when the parser is built; the modules
# import the heavy parts of jt5 inside ``run``).
COMMANDS = ("pretrain", "bench", "generate", "convert", "finetune", "embed", "plan", "tokenizer")


def command(name: str):
    return importlib.import_module(f"jt5.cli.{name}")


class _Format(logging.Formatter):
    """``warning: ...`` for warnings and errors, the bare message for info: no logger names."""

    def format(self, record):
        text = record.getMessage()
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


class _Stderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced after setup)."""

    def emit(self, record):
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def _setup_logging():
    handler = _Stderr()
    handler.setFormatter(_Format())
    for name in ("jt5",):  # the project's loggers: info and up, clean format
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("jt5")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# What a user can cause: bad values, paths and files (CheckpointError is a ValueError), missing
# optional packages, and the project's own RuntimeErrors (NonFiniteLoss). Anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def _is_user_error(e: BaseException) -> bool:
    ours = type(e).__module__.split(".")[0] == "jt5"
    return isinstance(e, USER_ERRORS) or (ours and isinstance(e, RuntimeError))


def main(argv=None) -> int:
    parser = Parser(prog="jt5", description="T5 in JAX: pretrain, generate, convert, benchmark.")
    parser.add_argument("--version", action="version", version=f"jt5 {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: environment JT5_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        mod = command(name)
        mod.add(sub.add_parser(name, help=mod.HELP, description=mod.HELP))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _setup_logging()
    # jax's CUDA plugin (jt5[plan]) on a machine without an NVIDIA GPU: the CPU, quietly.
    from jt5.pallas_kernels.gpu_targets import cpu_unless_gpu
    cpu_unless_gpu()
    debug = args.debug or os.environ.get("JT5_DEBUG", "") not in ("", "0")
    try:
        return command(args.command).run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug or not _is_user_error(e):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
