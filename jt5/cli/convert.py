"""`jt5 convert SRC DST`: move a checkpoint between transformers and jt5 (orbax) formats."""
from __future__ import annotations

import argparse
from pathlib import Path

from jt5.cli.common import DTYPES, MODEL_DIR

HELP = "move a checkpoint between transformers and jt5 (orbax) formats"


def add(p: argparse.ArgumentParser):
    p.add_argument("src", help=MODEL_DIR)
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", choices=("hf", "jt5"), default=None,
                   help="output format (default: the other one than the source's)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="store parameters in this dtype (default: as stored in the source)")
    p.add_argument("--encoder-only", action="store_true",
                   help="keep only the encoder (a T5EncoderModel)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="split transformers safetensors above this size (default 5GB)")


def run(args) -> int:
    from jt5 import formats, weights
    from jt5.bridge import hf
    from jt5.model import T5EncoderModel, T5ForConditionalGeneration
    from jt5.tokenizer import tokenizer_files

    src = formats.locate(args.src)
    if Path(args.dst).resolve() == src.path.resolve():
        raise ValueError(f"convert {args.src} {args.dst}: the output directory is the source")
    try:
        hf._parse_size(args.max_shard_size)
    except ValueError:
        raise ValueError(f"--max-shard-size {args.max_shard_size!r}: expected a size such as "
                         "5GB, 500MB or a number of bytes") from None
    cls = T5EncoderModel if args.encoder_only else T5ForConditionalGeneration
    model = formats.load(src.path, cls, dtype=args.dtype, progress=True)
    # The tokenizer travels with the weights, so the output works with `jt5 generate` and
    # AutoTokenizer as the source did.
    files = tokenizer_files(src.tokenizer) if src.tokenizer else {}
    to = args.to or ("jt5" if src.kind == "hf" else "hf")
    if to == "hf":
        weights.save_hf(model, args.dst, max_shard_size=args.max_shard_size, progress=True,
                        extra_files=files)
    else:
        weights.save_native(model, args.dst, extra_files=files)
    carried = f" with tokenizer files ({', '.join(sorted(files))})" if files else (
        " (no tokenizer files found at the source)")
    print(f"wrote {to} checkpoint of {type(model).__name__} to {args.dst}{carried}")
    return 0


