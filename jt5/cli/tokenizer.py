"""`jt5 tokenizer train`: a sentencepiece unigram tokenizer with T5's special tokens, on your corpus."""
from __future__ import annotations

import argparse

from jt5.cli.common import POSITIVE

HELP = "train a T5 tokenizer (sentencepiece unigram, T5's ids and sentinels) on a corpus"


def add(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("train", help=HELP, description=HELP)
    t.add_argument("--data", nargs="+", required=True, metavar="SOURCE",
                   help="the sources jt5 pretrain reads (files, directories, .parquet, "
                        "datasets directories, hf:NAME); weights are ignored")
    t.add_argument("--out", required=True, help="directory to write (a transformers tokenizer)")
    t.add_argument("--vocab-size", type=POSITIVE, default=32000,
                   help="learned pieces incl. <pad> </s> <unk> (default 32000, T5's)")
    t.add_argument("--extra-ids", type=POSITIVE, default=100,
                   help="sentinels <extra_id_N> above the pieces (default 100, T5's)")
    t.add_argument("--text-field", default="text", help="text column / JSON field (default text)")
    t.add_argument("--sample", type=POSITIVE, default=200_000_000, metavar="CHARS",
                   help="characters of the corpus to learn from, in corpus order "
                        "(default 200M)")
    t.add_argument("--character-coverage", type=float, default=0.9995,
                   help="sentencepiece's character coverage (default 0.9995; 1.0 for small "
                        "alphabets)")


def run(args) -> int:
    from jt5.train.sources import parse_sources
    from jt5.tokenizer_train import train_tokenizer

    data = [s.spec for s in parse_sources(args.data)]
    out = train_tokenizer(data, args.out, vocab_size=args.vocab_size, extra_ids=args.extra_ids,
                          text_field=args.text_field, sample_chars=args.sample,
                          character_coverage=args.character_coverage)
    print(f"wrote a T5 tokenizer ({args.vocab_size} pieces + {args.extra_ids} sentinels) to {out}")
    return 0
