"""Text sources: the built-in corpus (no download) and readers for user files.

    docs = iter_documents(["builtin"])                # or files / directories, mixed freely
    for doc in docs: doc.key, doc.read()             # read() is lazy: hosts parse only their share
    for index, doc, held_out in split_heldout(iter_documents(srcs), 8): ...

Sources (``--data``; several may be given, read in the order given):
- ``"builtin"``: Python standard-library documentation. One document per stdlib module: its
  docstring, then every class / function docstring under a heading with its qualified name and
  signature, extracted with ``ast`` from the ``.py`` sources under ``sysconfig.get_paths()["stdlib"]``
  (nothing is imported; test suites and site-packages are skipped), modules in sorted path order.
  About 2 MB of English + code-flavoured text. It depends on the Python version that runs it.
- ``*.jsonl`` (also ``.jsonl.gz`` / ``.jsonl.zst`` / ``.json.gz`` / ``.json.zst``): one JSON
  object per line with a string ``text`` field (or ``text_field``); blank lines are skipped.
  Errors name the file and line.
- ``*.parquet``, ``datasets`` ``save_to_disk`` directories, ``hf:NAME`` cached datasets, and
  ``SOURCE:WEIGHT`` mixtures: see ``train/sources.py``.
- any other file (``.txt``, ``.md``, ...): the whole file is one document (so long-range context,
  which the S and X denoisers need, is kept), split at line ends into pieces of at most
  ``max_chars`` characters so one huge file still spreads over hosts. Must be UTF-8; errors name
  the file and line.
- a directory: every ``.jsonl`` (compressed too) / ``.parquet`` / ``.txt`` / ``.md`` / ``.rst`` /
  ``.text`` file below it, recursively, in sorted path order (hidden files and directories
  skipped); a ``save_to_disk`` directory is read as its dataset.

Documents are numbered in this order over all sources (the *index*); ``split_heldout`` sets aside a
small deterministic held-out set, which training never sees, for sample outputs.
"""
from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
from typing import Iterable, Iterator, NamedTuple, Sequence

from jt5.train import sources
from jt5.train.sources import Document, utf8

BUILTIN = "builtin"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
FILE_SUFFIXES = TEXT_SUFFIXES + sources.JSONL_SUFFIXES + sources.PARQUET_SUFFIXES
MAX_CHARS = 1 << 20  # text-file pieces: about 1 MiB of characters
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_HELDOUT_BUCKETS = 64  # a document is a held-out candidate when hash(key) % 64 == 0




# --------------------------------------------------------------------------- built-in corpus

def _stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[str]:
    """Relative paths of the stdlib ``.py`` files the built-in corpus reads, sorted."""
    root = _stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(out)


def _signature(node) -> str:
    try:
        return ast.unparse(node.args)
    except Exception:  # pragma: no cover (odd syntax trees)
        return "..."


def module_document(source: str, module: str) -> str:
    """The documentation text of one module's source: docstrings under qualified-name headings."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few stdlib files are templates / other versions
        return ""
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {module}\n\n{doc}")

    def visit(body, prefix):
        for node in body:
            if isinstance(node, ast.ClassDef):
                name = prefix + node.name
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(f"class {module}.{name}\n\n{doc}")
                visit(node.body, name + ".")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(f"def {module}.{prefix}{node.name}({_signature(node)})\n\n{doc}")

    visit(tree.body, "")
    return "\n\n".join(parts)


def builtin_documents() -> Iterator[Document]:
    """The built-in corpus: one lazy Document per stdlib module (empty text if it has no docstrings)."""
    root = _stdlib_root()
    for rel in stdlib_files():
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")

        def read(rel=rel, module=module):
            with open(os.path.join(root, rel), "rb") as f:
                return module_document(f.read(), module)

        yield Document(rel, read)


# --------------------------------------------------------------------------- user files

def _text_documents(path: str, key: str, max_chars: int, source: int) -> Iterator[Document]:
    """Pieces of at most max_chars bytes (>= characters) ending at a line end, read as a stream."""
    with open(path, "rb") as f:
        carry, line, piece = b"", 1, 0
        while True:
            block = f.read(max(max_chars - len(carry), 1))
            data = carry + block
            if not block and not data and piece > 0:
                break
            end = len(data)
            if block and len(data) >= max_chars:
                cut = data.rfind(b"\n", 0, max_chars)
                end = cut + 1 if cut >= 0 else max_chars
                while end < len(data) and (data[end] & 0xC0) == 0x80:  # not inside a character
                    end += 1
            text, carry = data[:end], data[end:]

            def read(text=text, first=line):
                return utf8(text, path, first)

            yield Document(f"{key}#{piece}", read, source)
            line += text.count(b"\n")
            piece += 1
            if not block and not carry:
                break


def _files_under(directory: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.endswith(FILE_SUFFIXES):
                out.append(os.path.join(dirpath, name))
    return sorted(out)


class File(NamedTuple):
    path: str      # a file, or "builtin"
    key: str       # its name in document keys
    kind: str      # builtin | text | jsonl | parquet | arrow
    source: int    # index of the --data entry it came from


def _kind(path: str) -> str:
    if path.endswith(sources.PARQUET_SUFFIXES):
        return "parquet"
    if path.endswith(sources.JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(".arrow"):
        return "arrow"
    return "text"


def resolve_files(entries: Sequence[str]) -> list[File]:
    """Every file the ``--data`` entries name (weights stripped), in read order."""
    if isinstance(entries, str):
        entries = [entries]
    out = []
    for i, src in enumerate(s.spec for s in sources.parse_sources(entries)):
        if src == BUILTIN:
            out.append(File(BUILTIN, BUILTIN, "builtin", i))
        elif src.startswith(sources.HF_PREFIX):
            out += [File(p, f"{src}/{os.path.basename(p)}", "arrow", i)
                    for p in sources.cached_dataset_files(src)]
        elif os.path.isdir(src):
            base = os.path.basename(os.path.normpath(src))
            if sources.is_saved_dataset(src):
                files = sources.saved_dataset_files(src)
            else:
                files = _files_under(src)
            if not files:
                raise ValueError(f"data directory {src!r} holds no {'/'.join(FILE_SUFFIXES)} "
                                 "files and is not a datasets save_to_disk directory")
            out += [File(p, base + "/" + os.path.relpath(p, src).replace(os.sep, "/"),
                         "arrow" if p.endswith(".arrow") else _kind(p), i) for p in files]
        elif os.path.isfile(src):
            out.append(File(src, os.path.basename(src), _kind(src), i))
        else:
            raise FileNotFoundError(f"data source {src!r} is not 'builtin', hf:NAME, a file or "
                                    "a directory")
    return out


def iter_documents(entries: Sequence[str], max_chars: int = MAX_CHARS,
                   text_field: str = "text") -> Iterator[Document]:
    """Every document of the sources, in the documented deterministic order (texts read lazily)."""
    for f in resolve_files(entries):
        if f.kind == "builtin":
            yield from (d._replace(source=f.source) for d in builtin_documents())
        elif f.kind == "jsonl":
            yield from sources.jsonl_documents(f.path, f.key, text_field, f.source)
        elif f.kind == "parquet":
            yield from sources.parquet_documents(f.path, f.key, text_field, f.source)
        elif f.kind == "arrow":
            yield from sources.arrow_documents(f.path, f.key, text_field, f.source)
        else:
            yield from _text_documents(f.path, f.key, max_chars, f.source)


def fingerprint(entries: Sequence[str], max_chars: int = MAX_CHARS) -> str:
    """Changes when any source file changes (path, size, mtime) or, for builtin, the Python install."""
    h = hashlib.sha256(f"corpus-v1|{max_chars}".encode())
    for path, key, _, _ in resolve_files(entries):
        if path == BUILTIN:
            root = _stdlib_root()
            h.update(f"builtin|{sys.version}|{root}".encode())
            for rel in stdlib_files():
                st = os.stat(os.path.join(root, rel))
                h.update(f"|{rel}|{st.st_size}|{st.st_mtime_ns}".encode())
        else:
            st = os.stat(path)
            h.update(f"|{os.path.abspath(path)}|{key}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- held-out split

def is_heldout_candidate(key: str) -> bool:
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % _HELDOUT_BUCKETS == 0


def split_heldout(documents: Iterable[Document], heldout: int) -> Iterator[tuple[int, Document, bool]]:
    """(index, document, held_out) for each document. The held-out set is the first ``heldout``
    documents (in corpus order) whose key hashes into bucket 0 of 64: deterministic, streaming,
    spread over the corpus, and independent of process count. Small corpora may hold out fewer."""
    taken = 0
    for index, doc in enumerate(documents):
        held = taken < heldout and is_heldout_candidate(doc.key)
        taken += held
        yield index, doc, held
