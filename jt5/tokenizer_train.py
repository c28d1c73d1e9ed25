"""Train a T5 tokenizer on your corpus: sentencepiece unigram + T5's special tokens and sentinels.

    train_tokenizer(["corpus/"], "my-tokenizer", vocab_size=32000)   # jt5 tokenizer train ...
    tok = jt5.tokenizer.load_tokenizer("my-tokenizer")                # or AutoTokenizer

The result is a transformers tokenizer directory with T5's id layout (Raffel et al. 2020 §2.2,
the released ``spiece.model``): ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then the
``vocab_size - 3`` learned pieces, then ``extra_ids`` sentinels with ``<extra_id_0>`` the top id
(``vocab_size + extra_ids - 1``), so UL2 / span corruption number sentinels downward exactly as
with T5's own tokenizer. Both ``spiece.model`` (the sentencepiece model) and ``tokenizer.json``
are written. Training reads a sample of the corpus's documents (``--sample``, in corpus order,
split into lines) through the same readers as pretraining (``--data`` accepts the same sources).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

DEFAULT_SAMPLE_CHARS = 200_000_000   # characters of the corpus sentencepiece learns from
MAX_LINE_CHARS = 8192                # sentencepiece skips longer "sentences"


def _sample(entries: Sequence[str], text_field: str, chars: int, out: Path) -> int:
    from jt5.train import corpus  # the corpus readers (train is not imported by core jt5)

    written = 0
    with open(out, "w", encoding="utf-8") as f:
        for doc in corpus.iter_documents(entries, text_field=text_field):
            for line in doc.read().splitlines():
                line = line.strip()
                while line:
                    piece, line = line[:MAX_LINE_CHARS], line[MAX_LINE_CHARS:]
                    f.write(piece + "\n")
                    written += len(piece)
            if written >= chars:
                break
    return written


def train_tokenizer(data: Sequence[str], out, *, vocab_size: int = 32000, extra_ids: int = 100,
                    text_field: str = "text", sample_chars: int = DEFAULT_SAMPLE_CHARS,
                    character_coverage: float = 0.9995, byte_fallback: bool = True,
                    threads: int = 0) -> Path:
    """Train and save (see the module docstring); returns the directory."""
    try:
        import sentencepiece as spm
        from transformers import T5Tokenizer
    except ImportError as e:
        raise ValueError(f"training a tokenizer needs sentencepiece and transformers: "
                         f"pip install 'jt5[hf]' ({e.name} is missing)") from None
    if vocab_size < 260:
        raise ValueError(f"--vocab-size {vocab_size} is too small (byte fallback alone needs 259)")
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "sample.txt"
        if _sample(list(data), text_field, sample_chars, text) == 0:
            raise ValueError(f"--data {' '.join(map(str, data))}: no text to learn from")
        prefix = Path(tmp) / "spiece"
        try:
            _train(spm, text, prefix, vocab_size, character_coverage, byte_fallback, threads)
        except RuntimeError as e:  # e.g. "Vocabulary size too high (32000). Please set ..."
            why = str(e).split("] ")[-1].strip()
            raise ValueError(f"--vocab-size {vocab_size}: sentencepiece: {why}") from None
        out.mkdir(parents=True, exist_ok=True)
        model_file = out / "spiece.model"
        model_file.write_bytes(prefix.with_suffix(".model").read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    # Added in reverse so <extra_id_0> gets the top id, as in T5's spiece.model + 100 extra ids
    # (transformers' extra_ids= numbers them upward).
    sentinels = [f"<extra_id_{i}>" for i in reversed(range(extra_ids))]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0, additional_special_tokens=sentinels)
    tok.save_pretrained(str(out))
    return out


def _train(spm, text, prefix, vocab_size, character_coverage, byte_fallback, threads):
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(prefix), model_type="unigram",
        vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=character_coverage, byte_fallback=byte_fallback,
        num_threads=threads or os.cpu_count() or 1, input_sentence_size=10_000_000,
        shuffle_input_sentence=True, minloglevel=2)
