"""Many prompts through ``generate``: length buckets, batches, outputs back in input order.

    prompts = jt5.inputs.read_texts("prompts.jsonl")   # .txt: a prompt a line; "-": stdin
    task = task_params(model_dir, "summarization")     # config.json task_specific_params
    for i, outputs in generate_texts(model, tok, prompts, batch_size=16, prefix=task.prefix,
                                     **task.generation):
        ...

Prompts are sorted by token length so each batch holds similar lengths (one input-length
bucket, little padding, few compiled programs: at most one per bucket and batch size), and
results are yielded in input order as soon as every earlier prompt is done.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

from jt5.generation_config import FIELDS

class TaskParams(NamedTuple):
    prefix: str
    generation: dict  # GenerationConfig fields


def task_params(model_dir, task: str) -> TaskParams:
    """``config.json`` ``task_specific_params[task]``, as transformers' pipelines applied them
    (4.x ``Pipeline.__init__``: the task's fields update the model's generation config; the
    text2text pipelines prepend ``prefix`` to every input)."""
    f = Path(model_dir) / "config.json"
    raw = json.loads(f.read_text()) if f.is_file() else {}
    tasks = raw.get("task_specific_params") or {}
    if task not in tasks:
        raise ValueError(f"--task {task}: not in {f}'s task_specific_params "
                         f"(known: {', '.join(sorted(tasks)) or 'none'})")
    params = dict(tasks[task])
    prefix = params.pop("prefix", None) or raw.get("prefix") or ""
    return TaskParams(prefix, {k: v for k, v in params.items() if k in FIELDS})


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_texts(model, tok, prompts: Sequence[str], *, batch_size: int = 16,
                   prefix: str = "", progress: bool = False, skip_special_tokens: bool = True,
                   **generation) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(index, outputs)`` in input order; ``outputs`` has ``num_return_sequences``
    decoded texts. ``generation``: ``generate`` keywords."""
    from jt5.generate import generate

    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")
    texts = [prefix + p for p in prompts]
    lengths = [len(tok.encode_batch([t]).input_ids[0]) for t in texts]
    done: dict[int, list[str]] = {}
    nxt = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(texts), desc="generating", unit="prompt", file=sys.stderr)
    try:
        for rows in _batches(lengths, batch_size):
            enc = tok.encode_batch([texts[i] for i in rows], add_eos=True)
            ids = generate(model, enc.input_ids, enc.attention_mask, **generation)
            per = len(ids) // len(rows)
            for j, i in enumerate(rows):
                done[i] = [_decode(tok, r, skip_special_tokens) for r in ids[j * per:(j + 1) * per]]
            if bar is not None:
                bar.update(len(rows))
            while nxt in done:
                yield nxt, done.pop(nxt)
                nxt += 1
    finally:
        if bar is not None:
            bar.close()


def _decode(tok, row, skip_special_tokens: bool) -> str:
    out = row[1:].tolist()
    while out and out[-1] == tok.pad_id:  # finished rows are padded
        out.pop()
    text = tok.decode(out, skip_special_tokens=skip_special_tokens)
    if not text.strip():  # e.g. only sentinels: show them rather than a blank line
        text = tok.decode(out, skip_special_tokens=False)
    return text


def write_jsonl(f, index: int, prompt: str, outputs: list[str]):
    row = {"index": index, "input": prompt,
           "output": outputs[0] if len(outputs) == 1 else outputs}
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()


def open_output(spec: Optional[str]):
    if spec in (None, "-"):
        return None
    p = Path(spec)
    if p.parent and not p.parent.exists():
        raise ValueError(f"--output {spec}: directory {p.parent} does not exist")
    return p.open("w", encoding="utf-8")
