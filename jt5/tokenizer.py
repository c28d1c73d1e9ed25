"""Tokenizers behind one small interface: ByT5 bytes (no files) or a Hugging Face directory.

    tok = load_tokenizer("byte")               # ByteTokenizer: ByT5's 384-id byte vocabulary
    tok = load_tokenizer("/path/to/t5-dir")    # HFTokenizer: wraps transformers.AutoTokenizer
    ids = tok.encode("héllo", add_eos=True)    # list[int]
    text = tok.decode(ids)                     # specials skipped by default
    batch = tok.encode_batch(["a", "bc"])      # Encoded(input_ids [B,T] int32, attention_mask [B,T] int32)
    tok.extra_id(0)                            # id of <extra_id_0>, the first T5 sentinel

Core jt5 module: imports neither torch nor transformers (HFTokenizer imports transformers lazily).

ByT5 id layout (Xue et al. 2022; seqio ``ByteVocabulary``): pad 0, eos 1, unk 2, byte ``b`` -> ``b + 3``
(3..258), then 125 extra ids 259..383 with ``<extra_id_0>`` the *top* id (383) and ``<extra_id_i>`` =
383 - i, because T5 span corruption numbers sentinels down from ``vocab_size - 1``
(t5.data.preprocessors.noise_span_to_unique_sentinel). Note: transformers 5.x's ``ByT5Tokenizer``
numbers its ``<extra_id_i>`` *strings* upward (259 + i) although its docstring says otherwise; the
set of ids is the same, and the pretrained ByT5 checkpoints were trained with 383 as the first sentinel.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterable, NamedTuple, Optional, Sequence

import numpy as np

BYTE_SPEC = "byte"
# Files whose presence marks a Hugging Face tokenizer directory.
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "tokenizer.model",
                   "sentencepiece.bpe.model", "vocab.json")
# What a tokenizer directory is copied as (convert, export): the marker files + their companions.
COPIED_FILES = TOKENIZER_FILES + ("special_tokens_map.json", "added_tokens.json", "merges.txt")
_EXTRA_ID = re.compile(r"^<extra_id_(\d+)>$")
_SPECIAL_TEXT = re.compile(r"(<extra_id_\d+>|</s>|<pad>|<unk>)")


class Encoded(NamedTuple):
    input_ids: np.ndarray       # [B, T] int32, right-padded with pad_id
    attention_mask: np.ndarray  # [B, T] int32, 1 on tokens, 0 on padding


class Tokenizer:
    """The interface both tokenizers implement; batch helpers are shared."""

    vocab_size: int  # number of ids the tokenizer can emit (a model's embedding may be larger)
    pad_id: int
    eos_id: int
    unk_id: Optional[int]

    @property
    def extra_ids(self) -> np.ndarray:
        """``extra_ids[i]`` is the id of ``<extra_id_i>`` (the T5 sentinels), int64 [num_extra_ids]."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """A string that changes whenever the text -> ids mapping could change (cache keys)."""
        raise NotImplementedError

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids (no EOS) of many texts, int32 arrays; the corpus tokenisation fast path."""
        return [np.asarray(self.encode(t), np.int32) for t in texts]

    @property
    def num_extra_ids(self) -> int:
        return len(self.extra_ids)

    def extra_id(self, i: int) -> int:
        """The id of ``<extra_id_i>``."""
        n = self.num_extra_ids
        if not 0 <= i < n:
            raise IndexError(f"extra id {i} out of range: this tokenizer has {n} extra ids")
        return int(self.extra_ids[i])

    def encode_batch(self, texts: Sequence[str], *, add_eos: bool = True,
                     max_length: Optional[int] = None, pad_to_max_length: bool = False) -> Encoded:
        """Encode prompts with ``encode`` and right-pad. ``max_length`` truncates (keeping the EOS
        last when ``add_eos``)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings, not one string")
        if max_length is not None and max_length < 1 + int(add_eos):
            raise ValueError(f"{max_length=} leaves no room for text")
        rows = []
        for text in texts:  # prompts: the same parsing as encode (special-token strings -> ids)
            ids = self.encode(text)
            if max_length is not None:
                ids = ids[:max_length - int(add_eos)]
            rows.append(ids + [self.eos_id] * int(add_eos))
        width = max((len(r) for r in rows), default=0)
        if pad_to_max_length:
            if max_length is None:
                raise ValueError("pad_to_max_length needs max_length")
            width = max_length
        input_ids = np.full((len(rows), width), self.pad_id, np.int32)
        attention_mask = np.zeros((len(rows), width), np.int32)
        for b, r in enumerate(rows):
            input_ids[b, :len(r)] = r
            attention_mask[b, :len(r)] = 1
        return Encoded(input_ids, attention_mask)

    def decode_batch(self, ids, *, skip_special_tokens: bool = True) -> list[str]:
        """Decode each row of a [B, T] id array (e.g. ``generate`` output)."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in np.asarray(ids)]


class ByteTokenizer(Tokenizer):
    """ByT5's byte vocabulary; see the module docstring for the id layout."""

    pad_id, eos_id, unk_id = 0, 1, 2
    offset = 3  # ids below are specials; byte b is id b + offset
    num_bytes = 256

    def __init__(self, extra_ids: int = 125):
        if extra_ids < 0:
            raise ValueError(f"{extra_ids=} must be >= 0")
        self._num_extra = extra_ids
        self.vocab_size = self.offset + self.num_bytes + extra_ids
        # <extra_id_0> is the top id; <extra_id_i> = vocab_size - 1 - i (seqio / t5 convention).
        self._extra = np.arange(self.vocab_size - 1, self.vocab_size - 1 - extra_ids, -1, dtype=np.int64)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, extra_ids={self._num_extra})"

    @property
    def extra_ids(self) -> np.ndarray:
        return self._extra

    @property
    def fingerprint(self) -> str:
        return f"byte-v1-extra{self._num_extra}"

    def files(self) -> dict[str, bytes]:
        """``tokenizer_config.json`` + ``special_tokens_map.json`` that make transformers'
        ``AutoTokenizer`` (4.40+ and 5.x) load a ``ByT5Tokenizer`` with *these* ids.

        ``ByT5Tokenizer`` alone numbers ``<extra_id_i>`` upward (259 + i); an explicit
        ``added_tokens_decoder`` overrides that in both major versions (``PreTrainedTokenizer``
        updates its decoder from it after the class's defaults), so every special token,
        sentinels included, gets the id jt5 trains with. No stripping around specials: jt5's
        ``encode`` does none.
        """
        def added(content):
            return {"content": content, "lstrip": False, "rstrip": False, "normalized": False,
                    "single_word": False, "special": True}

        decoder = {str(i): added(self._special_name(i))
                   for i in [self.pad_id, self.eos_id, self.unk_id, *sorted(self._extra.tolist())]}
        specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
        cfg = {"tokenizer_class": "ByT5Tokenizer", "extra_ids": self._num_extra,
               "model_max_length": 1_000_000_000, **specials, "added_tokens_decoder": decoder}
        return {"tokenizer_config.json": (json.dumps(cfg, indent=2) + "\n").encode(),
                "special_tokens_map.json": (json.dumps(specials, indent=2) + "\n").encode()}

    def encode_array(self, text: str) -> np.ndarray:
        """UTF-8 bytes + 3 as int32 [n]; every character is text (no special-token parsing)."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        """Token ids of a prompt. Special-token strings in it (``<extra_id_N>``, ``</s>``,
        ``<pad>``, ``<unk>``) become their ids, as transformers' ByT5Tokenizer does; corpus text
        goes through ``encode_array`` / ``encode_many``, where every character is text."""
        ids: list[int] = []
        for i, part in enumerate(_SPECIAL_TEXT.split(text)):
            special = self._special_id(part) if i % 2 else None
            if special is not None:
                ids.append(special)
            elif part:
                ids.extend(self.encode_array(part).tolist())
        return ids + [self.eos_id] if add_eos else ids

    def _special_id(self, name: str) -> Optional[int]:
        fixed = {"<pad>": self.pad_id, "</s>": self.eos_id, "<unk>": self.unk_id}
        if name in fixed:
            return fixed[name]
        n = int(_EXTRA_ID.match(name).group(1))
        return self.extra_id(n) if n < self._num_extra else None  # unknown: plain text

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def _special_name(self, i: int) -> str:
        if i == self.unk_id:
            return "<unk>"
        if i == self.pad_id:
            return "<pad>"
        if i == self.eos_id:
            return "</s>"
        if self.offset + self.num_bytes <= i < self.vocab_size:
            return f"<extra_id_{self.vocab_size - 1 - i}>"
        return "<unk>"  # unk itself, and ids beyond the vocabulary (a padded model vocab)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # Like transformers' ByT5Tokenizer: specials render as their names, the byte string is
        # decoded with errors="ignore" (so a truncated multi-byte character vanishes).
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64).reshape(-1)
        is_byte = (ids >= self.offset) & (ids < self.offset + self.num_bytes)
        if skip_special_tokens or is_byte.all():
            return (ids[is_byte] - self.offset).astype(np.uint8).tobytes().decode("utf-8", "ignore")
        out = bytearray()
        for i, b in zip(ids.tolist(), is_byte.tolist()):
            if b:
                out.append(i - self.offset)
            else:
                out += self._special_name(i).encode()
        return out.decode("utf-8", "ignore")


class HFTokenizer(Tokenizer):
    """A ``transformers.AutoTokenizer`` directory (sentencepiece or tokenizer.json), same interface."""

    def __init__(self, directory: str):
        try:  # lazy: core jt5 must import without transformers
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError(f"loading the tokenizer in {directory!r} needs transformers: "
                              "pip install 'jt5[hf]'") from e
        self.directory = os.path.abspath(directory)
        self._tok = AutoTokenizer.from_pretrained(self.directory)
        self.eos_id = self._tok.eos_token_id
        self.pad_id = self._tok.pad_token_id
        self.unk_id = self._tok.unk_token_id
        if self.eos_id is None:
            raise ValueError(f"the tokenizer in {directory} has no EOS token; T5 needs one")
        if self.pad_id is None:
            raise ValueError(f"the tokenizer in {directory} has no pad token; T5 needs one (id 0)")
        self.vocab_size = len(self._tok)
        found = {}
        for token, i in self._tok.get_vocab().items():
            m = _EXTRA_ID.match(token)
            if m:
                found[int(m.group(1))] = i
        n = 0
        while n in found:  # <extra_id_0>, <extra_id_1>, ... contiguous from 0
            n += 1
        self._extra = np.array([found[i] for i in range(n)], np.int64)

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.directory!r}, vocab_size={self.vocab_size}, "
                f"extra_ids={len(self._extra)})")

    @property
    def extra_ids(self) -> np.ndarray:
        return self._extra

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(type(self._tok).__name__.encode())
        for name in sorted(os.listdir(self.directory)):
            if name in COPIED_FILES:
                h.update(name.encode())
                with open(os.path.join(self.directory, name), "rb") as f:
                    h.update(f.read())
        return "hf-" + h.hexdigest()[:32]

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False, verbose=False)  # no max-length warning
        return ids + [self.eos_id] if add_eos else ids

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        out = self._tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(ids, np.int32) for ids in out]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _byt5_extra_ids(directory: str) -> Optional[int]:
    """If ``directory`` holds a ByT5 tokenizer config, its number of extra ids; else None."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    if cfg.get("tokenizer_class") != "ByT5Tokenizer":
        return None
    return int(cfg.get("extra_ids") or 125)


def has_tokenizer_files(directory) -> bool:
    return any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES)


def tokenizer_files(spec) -> dict[str, bytes]:
    """The files (name -> bytes, text and binary) to put next to a model so that it carries
    its tokenizer: for a byte tokenizer (``"byte"``, a ``ByteTokenizer``, or a directory whose
    config names ``ByT5Tokenizer``) the files of ``ByteTokenizer.files``, which pin jt5's
    sentinel ids; for any other tokenizer directory (or ``HFTokenizer``) its files as they are.
    An empty dict when ``spec`` is a directory without tokenizer files."""
    if isinstance(spec, ByteTokenizer):
        return spec.files()
    if isinstance(spec, HFTokenizer):
        spec = spec.directory
    spec = os.fspath(spec)
    if spec.lower() == BYTE_SPEC:
        return ByteTokenizer().files()
    n_extra = _byt5_extra_ids(spec)
    if n_extra is not None:
        return ByteTokenizer(extra_ids=n_extra).files()
    out = {}
    for name in COPIED_FILES:
        path = os.path.join(spec, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


def load_tokenizer(spec) -> Tokenizer:
    """``"byte"`` -> ByteTokenizer; a directory with tokenizer files -> HFTokenizer.

    A directory whose ``tokenizer_config.json`` names ``ByT5Tokenizer`` gives a ByteTokenizer, so
    sentinels keep the ByT5 numbering the checkpoints were trained with (see module docstring).
    A Tokenizer instance is returned as is.
    """
    if isinstance(spec, Tokenizer):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"tokenizer spec must be 'byte' or a directory, got {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec.lower() == BYTE_SPEC:
        return ByteTokenizer()
    if os.path.isdir(spec):
        if not has_tokenizer_files(spec):
            raise ValueError(f"tokenizer directory {spec!r} holds no tokenizer files "
                             f"(looked for {', '.join(TOKENIZER_FILES)})")
        n_extra = _byt5_extra_ids(spec)
        if n_extra is not None:
            return ByteTokenizer(extra_ids=n_extra)
        return HFTokenizer(spec)
    raise ValueError(f"tokenizer spec {spec!r} is neither 'byte' nor an existing directory")
