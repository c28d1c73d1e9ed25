"""`jt5 embed`: encoder embeddings of texts to .npy / .safetensors (the modes of
``jt5.embed``: pooled, per token as FLUX / SD3 or Wan feed them, sentence-transformers dirs)."""
from __future__ import annotations

import argparse
import logging

from jt5.cli.common import (DTYPES, MODEL_DIR, POSITIVE, add_text_input, add_weights,
                            int_at_least)

HELP = "encoder embeddings of texts to .npy / .safetensors"
EPILOG = """pipelines:
  FLUX / SD3: --pooling none --max-length 512 --padding max_length --no-attention-mask
  Wan (UMT5): --pooling none --max-length 512 --padding max_length
  a sentence-transformers directory (GTR, sentence-T5) as --model pools as its modules say"""


def add(p: argparse.ArgumentParser):
    from jt5.pooling import POOLINGS
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("input_file", nargs="?", metavar="FILE", help="shorthand for --input FILE")
    add_text_input(p, "texts", "blank lines included: row i is line i")
    p.add_argument("--model", required=True,
                   help=MODEL_DIR + " (an encoder-only export works), or a sentence-transformers "
                        "directory")
    p.add_argument("--output", required=True,
                   help="x.npy ([N, D] pooled, float32/float16 only) or x.safetensors "
                        "(embeddings, + mask for --pooling none)")
    p.add_argument("--pooling", choices=POOLINGS, default=None,
                   help="mean over real tokens, the first / last token, max, ..., or none: "
                        "per-token states (default mean; a sentence-transformers directory: its "
                        "own)")
    p.add_argument("--padding", choices=("longest", "max_length"), default="longest",
                   help="per-token output as wide as the longest text, or --max-length wide "
                        "(default longest)")
    p.add_argument("--no-attention-mask", action="store_true",
                   help="the encoder attends the padding too, as FLUX / SD3 run it (needs "
                        "--padding max_length)")
    p.add_argument("--keep-padding-states", action="store_true",
                   help="per-token output keeps the encoder's states past each text (default: "
                        "zeros, unless --no-attention-mask)")
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer directory "
                   "(default: the --model directory's)")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="(default 32)")
    p.add_argument("--max-length", type=int_at_least(2), default=None,
                   help="truncate inputs to this many tokens, EOS included (default 512, or a "
                        "sentence-transformers directory's max_seq_length)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default bfloat16 on a GPU, float32 on CPU)")
    p.add_argument("--output-dtype", choices=DTYPES, default="float32",
                   help="dtype of the written arrays (default float32)")
    add_weights(p, "the encoder's")
    p.add_argument("--mesh", default=None,
                   help="devices as data=N,fsdp=N,tensor=N: rows over data x fsdp, weights "
                        "split over fsdp / tensor (default: data over all local devices)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import time

    from jt5 import embeddings, sharding
    from jt5.inputs import read_texts

    if args.input is not None and args.input_file is not None:
        raise ValueError(f"give FILE or --input, not both ({args.input_file}, {args.input})")
    spec = args.input if args.input is not None else args.input_file
    if spec is None:
        raise ValueError("nothing to embed: give --input FILE ('-' for stdin)")
    embeddings.check_output(args.output, args.pooling, args.output_dtype)
    texts = read_texts(spec, field=args.field, keep_blank=True)
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    t0 = time.perf_counter()
    try:
        result = embeddings.embed(
            args.model, texts, pooling=args.pooling, tokenizer=args.tokenizer,
            batch_size=args.batch_size, max_length=args.max_length, padding=args.padding,
            use_attention_mask=not args.no_attention_mask,
            zero_padding=False if args.keep_padding_states else None, dtype=args.dtype,
            output_dtype=args.output_dtype, weights=args.weights,
            int8_compute=args.int8_compute, quant_group_size=args.quant_group_size, mesh=mesh,
            progress=not args.no_progress)
    except FileNotFoundError as e:
        raise ValueError(f"--model {e}") from e
    embeddings.save(args.output, result)
    if result.truncated:
        logging.getLogger("jt5.embeddings").warning(
            "truncated %d of %d texts to --max-length %s", result.truncated, len(texts),
            args.max_length or "(default)")
    print(f"embedded {len(texts)} texts -> {args.output} {list(result.embeddings.shape)} "
          f"{result.embeddings.dtype} in {time.perf_counter() - t0:.1f}s")
    return 0
