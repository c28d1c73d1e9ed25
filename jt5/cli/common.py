"""What the subcommands share: the one-line-error parser, argument types, and running a training
loop to its summary line (`jt5 pretrain` / `jt5 finetune` flags: `jt5/cli/fields.py`)."""
from __future__ import annotations

import argparse
import sys

MODEL_DIR = ("a transformers model directory, a jt5 checkpoint directory, or a jt5 pretraining "
             "run directory (its newest complete checkpoint)")
DTYPES = ("float32", "bfloat16", "float16")


def preset_names() -> tuple[str, ...]:
    from jt5.config import PRESETS  # cheap: the jt5 package is already imported to get here
    return tuple(PRESETS)


def attention_impls() -> tuple[str, ...]:
    from jt5.config import ATTENTION_IMPLS
    return tuple(ATTENTION_IMPLS)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: argument --steps: must be >= 1 (got -5)``."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low} (got {value})")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def float_in(low: float, high: float = float("inf"), *, open_low: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if open_low else low <= value) or value > high:
            lo = f"> {low}" if open_low else f">= {low}"
            rng = f"{lo} and <= {high}" if high != float("inf") else lo
            raise argparse.ArgumentTypeError(f"must be {rng} (got {value})")
        return value
    parse.__name__ = "number"
    return parse


POSITIVE, NON_NEGATIVE = int_at_least(1), int_at_least(0)


def run_training(run, cfg) -> int:
    """Run a training loop; an interrupt (it saved a checkpoint) exits 130/143, else one summary."""
    from jt5.train import loop

    try:
        result = run(cfg)
    except loop.Interrupted as e:
        print(e, file=sys.stderr)
        return e.exit_code
    evaluated = getattr(result, "eval", None) or {}  # fine-tuning: the eval split's metrics
    shown = ", ".join(f"{k} {v:.3f}" for k, v in evaluated.items() if k != "examples")
    shown = f"; eval {shown}" if shown else ""
    if result.history:
        first, last = result.history[0], result.history[-1]
        print(f"steps {result.start_step}->{result.step}: loss {first['loss']:.3f} -> "
              f"{last['loss']:.3f} in {last['elapsed']:.0f}s{shown}; run directory {result.out}")
    else:
        print(f"nothing to train: {result.out} is already at step {result.step}")
    return 0


def add_text_input(p: argparse.ArgumentParser, what: str, blank: str):
    """``--input`` / ``--field``: how ``jt5 generate`` and ``jt5 embed`` read texts
    (``jt5.inputs.read_texts``); ``blank``: what a blank line of a text file is."""
    p.add_argument("--input", default=None, metavar="FILE",
                   help=f"{what}: .jsonl (a JSON string or an object with a 'text' / 'input' / "
                        "'prompt' / 'source' field, or --field, per line), any other file one "
                        f"per line ({blank}); '-' reads stdin")
    p.add_argument("--field", default=None,
                   help="JSONL field holding the text (default: the first of text / input / "
                        "prompt / source)")


def add_weights(p: argparse.ArgumentParser, which: str):
    """``--weights`` / ``--int8-compute`` / ``--quant-group-size``: weight-only quantisation as
    the model loads (``jt5/quant.py``)."""
    from jt5.config import WEIGHT_FORMATS
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default=None,
                   help=f"quantise the matmul weights ({which}) as the model loads: int8 / fp8, "
                        "one scale per output channel, or per --quant-group-size inputs of "
                        "each (default: as stored)")
    p.add_argument("--int8-compute", action="store_true",
                   help="with int8 weights, quantise each row of the activations too and run "
                        "int8 x int8 products (CTranslate2's int8: faster on a CPU, less exact)")
    p.add_argument("--quant-group-size", type=POSITIVE, default=None, metavar="G",
                   help="with --weights int8 / fp8: one scale per G consecutive inputs of each "
                        "output channel (e.g. 128; must divide d_model, d_ff and heads x d_kv; "
                        "less rounding error, 4/G bytes more per weight) instead of one per "
                        "channel; not with --int8-compute (default: as stored)")
