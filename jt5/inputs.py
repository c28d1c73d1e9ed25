"""The one reader of input texts for ``jt5 generate --input`` and ``jt5 embed --input``.

    texts = read_texts("prompts.jsonl")                 # .jsonl: the first of TEXT_KEYS per line
    texts = read_texts("-", keep_blank=True)            # stdin, one text a line
    texts = read_texts("rows.jsonl", field="body")      # --field names the key

Formats, told apart by the file name: ``.jsonl`` holds one JSON value per line — an object whose
text is under ``field`` (default: the first of ``TEXT_KEYS`` it has) or a bare JSON string;
blank lines between records are skipped. Anything else (and ``-``, stdin) holds one text per
line. There, ``keep_blank`` decides whether a blank line is an (empty) input — ``jt5 embed`` keeps
them so row i of its output is line i — or is skipped (``jt5 generate``). A bad line is one
``ValueError`` naming the flag, the file and the line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

TEXT_KEYS = ("text", "input", "prompt", "source")


def read_texts(spec: str, *, field: Optional[str] = None, keep_blank: bool = False,
               flag: str = "--input") -> list[str]:
    """The texts in file ``spec`` (``-``: stdin); see the module docstring."""
    if spec == "-":
        lines, name, jsonl = sys.stdin.read().splitlines(), "<stdin>", False
    else:
        p = Path(spec)
        if not p.is_file():
            raise ValueError(f"{flag} {spec}: no such file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{flag} {spec}: not UTF-8 text ({e.reason} at byte {e.start})") \
                from None
        lines, name, jsonl = text.splitlines(), spec, p.suffix == ".jsonl"
    keys = (field,) if field else TEXT_KEYS
    out = []
    for n, line in enumerate(lines, 1):
        if not jsonl:
            if line.strip() or keep_blank:
                out.append(line)
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag} {name}:{n}: invalid JSON ({e.msg})") from None
        if isinstance(row, str) and not field:
            out.append(row)
            continue
        key = next((k for k in keys if isinstance(row, dict) and k in row), None)
        if key is None or not isinstance(row[key], str):
            want = f"'{field}'" if field else " / ".join(f"'{k}'" for k in TEXT_KEYS)
            raise ValueError(f"{flag} {name}:{n}: expected an object with a string field {want}"
                             f"{'' if field else ' (or name another with --field)'}")
        out.append(row[key])
    if not out:
        raise ValueError(f"{flag} {name}: no texts")
    return out
