"""`jt5 embed`: encoder embeddings of texts to .npy / .safetensors."""
from __future__ import annotations

import argparse
import logging
import os

from jt5.cli.common import DTYPES, MODEL_DIR, POSITIVE, int_at_least

HELP = "encoder embeddings of texts to .npy / .safetensors"


def add(p: argparse.ArgumentParser):
    p.add_argument("input", metavar="INPUT",
                   help="texts: a text file (one per line) or .jsonl (the --field of each line)")
    p.add_argument("--model", required=True, help=MODEL_DIR + " (an encoder-only export works)")
    p.add_argument("--output", required=True,
                   help="x.npy ([N, D], pooled only) or x.safetensors (embeddings, + mask for "
                        "--pooling none)")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default text)")
    p.add_argument("--pooling", choices=("mean", "first", "none"), default="mean",
                   help="mean over real tokens, the first token, or none: per-token states "
                        "(default mean)")
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer directory "
                   "(default: the --model directory's)")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="(default 32)")
    p.add_argument("--max-length", type=int_at_least(2), default=512,
                   help="truncate inputs to this many tokens, counted (default 512)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default bfloat16 on a GPU, float32 on CPU); outputs "
                        "are float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _read_texts(path: str, field: str) -> list[str]:
    import json as _json
    if not os.path.isfile(path):
        raise FileNotFoundError(f"INPUT {path} does not exist")
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not path.endswith(".jsonl"):
                texts.append(line)
                continue
            if not line.strip():
                continue
            try:
                value = _json.loads(line).get(field)
            except (ValueError, AttributeError):
                raise ValueError(f"{path}:{n}: not a JSON object") from None
            if not isinstance(value, str):
                raise ValueError(f"{path}:{n}: no string field {field!r}; set --field")
            texts.append(value)
    if not texts:
        raise ValueError(f"INPUT {path}: no texts (the file is empty)")
    return texts


def run(args) -> int:
    import time

    from jt5 import embeddings

    if not args.output.endswith((".npy", ".safetensors")):
        raise ValueError(f"--output {args.output}: expected a .npy or .safetensors file name")
    if args.output.endswith(".npy") and args.pooling == "none":
        raise ValueError(f"--output {args.output}: --pooling none needs .safetensors (it holds "
                         "the mask too)")
    texts = _read_texts(args.input, args.field)
    t0 = time.perf_counter()
    try:
        result = embeddings.embed(args.model, texts, pooling=args.pooling,
                                  tokenizer=args.tokenizer, batch_size=args.batch_size,
                                  max_length=args.max_length, dtype=args.dtype,
                                  progress=not args.no_progress)
    except FileNotFoundError as e:
        raise ValueError(f"--model {e}") from e
    embeddings.save(args.output, result, args.pooling)
    if result.truncated:
        logging.getLogger("jt5.embeddings").warning(
            "truncated %d of %d texts to --max-length %d", result.truncated, len(texts),
            args.max_length)
    print(f"embedded {len(texts)} texts -> {args.output} {list(result.embeddings.shape)} in "
          f"{time.perf_counter() - t0:.1f}s")
    return 0


