"""Writes the block-size table (``blocks.py`` reads it): an autotuner that measures candidates
on a GPU, and a pruner that compiles them on a CPU and keeps the spill-free ones.

    python -m jt5.pallas_kernels.tuning --write          # on a GPU: measure and update the table
    python -m jt5.pallas_kernels.tuning --prune          # on a CPU: keep spill-free candidates
    python -m jt5.pallas_kernels.tuning --show           # print the table

Table format and lookup: ``jt5.pallas_kernels.blocks``. ``"measured"`` entries are written by
``autotune`` with the timings it saw; ``--prune`` writes the ``"search_space"`` (the forward and
backward tile choices that compiled spill-free per arch, head dim and dtype; ``candidates``, the
autotuner's search space, keeps only those) and re-marks unmeasured entries ``"compiled"``.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jt5.pallas_kernels import compile_check
from jt5.pallas_kernels.blocks import (TABLE_PATH, BlockSizes, bwd_part, fwd_part,
                                       get_block_sizes, heuristic_block_sizes, load,
                                       load_search_space, load_table, normalize_device_kind,
                                       search_space_key, table_key)
from jt5.pallas_kernels.flash_attention import flash_attention
from jt5.pallas_kernels.spec import Mask, RelativeBias


# ---------------------------------------------------------------------------- autotuning (GPU)

def candidates(H: int, dtype, *, arch: str = "sm_90a", pruned: bool = True,
               path: str = TABLE_PATH) -> list[BlockSizes]:
    """The search space: forward and backward tiles varied jointly with warps and stages;
    ``pruned``: only those whose parts compiled spill-free on ``arch`` (the table's
    ``"search_space"``, see ``prune``), when that arch, head dim and dtype have been pruned."""
    out = []
    fwd = [(128, 64), (128, 32), (64, 64), (64, 32), (128, 128)]
    bwd = [(32, 64, 64, 32), (32, 32, 32, 32), (64, 64, 64, 64), (32, 128, 128, 32)]
    for (bq, bk), (qdkv, kdkv, qdq, kdq), warps, stages in itertools.product(
            fwd, bwd, (4, 8), (2, 3)):
        if H >= 128 and bq * bk > 128 * 64:
            continue
        out.append(BlockSizes(block_q=bq, block_k=bk, num_warps=warps, num_stages=stages,
                              block_q_dkv=qdkv, block_k_dkv=kdkv, block_q_dq=qdq,
                              block_k_dq=kdq, num_warps_bwd=warps, num_stages_bwd=stages))
    space = load_search_space(path).get(search_space_key(arch, H, dtype)) if pruned else None
    if space is not None:
        ok_fwd, ok_bwd = set(map(tuple, space["fwd"])), set(map(tuple, space["bwd"]))
        out = [bs for bs in out if fwd_part(bs) in ok_fwd and bwd_part(bs) in ok_bwd]
    return out


def median_time(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn(*args)`` in seconds, after ``warmup`` calls (compile included)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def autotune(shapes=((4, 2048, 2048, 12, 64),), dtype="bfloat16", causal_options=(False, True),
             *, write: bool = True, path: str = TABLE_PATH, max_candidates: int | None = None,
             time_budget_s: float | None = None, verbose: bool = True) -> dict:
    """Time every candidate for each ``(B, T, S, N, H)`` on the current GPU; keep the fastest
    fwd+bwd config per shape bucket; merge into the table when ``write``. Returns new entries.

    Candidates are the pruned search space (``candidates``), the current choice for the shape
    first, so a run cut short by ``max_candidates`` (per shape) or ``time_budget_s`` (the whole
    run; each shape gets an equal share) still compares against what is in use."""
    if jax.default_backend() != "gpu":
        raise RuntimeError("autotune needs a GPU (the Triton kernels cannot be timed in interpret mode)")
    kind = jax.devices()[0].device_kind
    arch = "sm_90a" if float(getattr(jax.devices()[0], "compute_capability", 9.0)) >= 9 else "sm_80"
    entries = {}
    runs = list(itertools.product(shapes, causal_options))
    share = None if time_budget_s is None else time_budget_s / len(runs)
    for (B, T, S, N, H), causal in runs:
        t_start = time.perf_counter()
        keys = jax.random.split(jax.random.key(0), 4)
        q, k, v = (jax.random.normal(kk, (B, L, N, H), dtype) for kk, L in zip(keys, (T, S, S)))
        table = jax.random.normal(keys[3], (32, N), jnp.float32)
        best, timed = None, 0
        current = get_block_sizes(kind, T, S, H, dtype, causal, path=path)
        space = candidates(H, dtype, arch=arch, path=path)
        for bs in ([current] + [c for c in space if c != current])[:max_candidates]:
            if share is not None and best is not None and time.perf_counter() - t_start > share:
                break
            f = jax.jit(lambda q, k, v, t, _bs=bs, _c=causal: flash_attention(
                q, k, v, Mask(causal=_c), RelativeBias(t, bidirectional=not _c),
                block_sizes=_bs, interpret=False))
            g = jax.jit(jax.grad(lambda *a, _f=f: _f(*a).astype(jnp.float32).sum(),
                                 argnums=(0, 1, 2, 3)))
            try:
                t_fwd = median_time(f, q, k, v, table)
                t_all = median_time(g, q, k, v, table)
            except Exception as e:  # a config that fails to compile (e.g. out of shared memory)
                if verbose:
                    print(f"skip {bs}: {type(e).__name__}: {str(e)[:120]}")
                continue
            timed += 1
            if best is None or t_all < best[2]:
                best = (bs, t_fwd, t_all)
        if best is None:
            continue
        bs, t_fwd, t_all = best
        entries[table_key(kind, T, S, H, dtype, causal)] = {
            "block_sizes": dataclasses.asdict(bs), "source": "measured",
            "fwd_ms": round(t_fwd * 1e3, 4), "fwd_bwd_ms": round(t_all * 1e3, 4),
            "shape": [B, T, S, N, H], "jax": jax.__version__,
            "timed": timed}
        if verbose:
            print(f"{kind} {(B, T, S, N, H)} causal={causal}: {bs} fwd {t_fwd*1e3:.3f} ms, "
                  f"fwd+bwd {t_all*1e3:.3f} ms")
    if write:
        write_entries(entries, path)
    return entries


def write_entries(entries: dict, path: str = TABLE_PATH) -> None:
    """Merge ``entries`` into the table file (one entry per line, sorted by key)."""
    data = load(path) or {"entries": {}}
    _write({**data, "entries": {**data.get("entries", {}), **entries}}, path)


def write_search_space(key: str, space: dict, path: str = TABLE_PATH) -> None:
    """Set one ``search_space`` entry (``prune``'s result without its per-part stats)."""
    data = load(path) or {"entries": {}}
    spaces = {**data.get("search_space", {}),
              key: {k: v for k, v in space.items() if k != "stats"}}
    _write({**data, "search_space": dict(sorted(spaces.items()))}, path)


def _write(data: dict, path: str) -> None:
    entries = data.get("entries", {})
    lines = [f"  {json.dumps(k)}: {json.dumps(entries[k])}" for k in sorted(entries)]
    head = "".join(f"{json.dumps(k)}: {json.dumps(v)},\n " for k, v in data.items()
                   if k != "entries")
    with open(path, "w") as f:
        f.write("{" + head + '"entries": {\n' + ",\n".join(lines) + "\n }\n}\n")


# ---------------------------------------------------------------------------- pruning (CPU)

# Masks a candidate must compile spill-free under: the heavier ones the model launches (no
# mask and cross-attention compile to a subset of the padding kernel's work).
PRUNE_MASKS = ("padding", "packing", "causal_packing", "local_global")
# The arch a device kind's table entries are compiled for.
_KIND_ARCH = {"h100": "sm_90a", "h200": "sm_90a", "h800": "sm_90a", "a100": "sm_80"}


def arch_of(device_kind: str) -> str | None:
    kind = normalize_device_kind(device_kind)
    return next((a for n, a in _KIND_ARCH.items() if n in kind), None)


def _worst(rows: list[dict]) -> dict:
    """The worst figures of one kernel part over the masks it was compiled under."""
    return {"shared": max(r["shared"] or 0 for r in rows),
            "regs": max(r["regs"] or 0 for r in rows),
            "spill_bytes": max((r["spill_stores"] or 0) + (r["spill_loads"] or 0) for r in rows),
            "warnings": sorted({w.split(")")[0].strip("(") for r in rows
                                for w in r["warnings"] or ()})}


def prune(H: int, dtype, *, arch: str = "sm_90a", masks=PRUNE_MASKS, workers: int = 2,
          log=None) -> dict:
    """Compile every forward and backward part of ``candidates(H, dtype)`` under each of
    ``masks`` (``compile_check``); keep the parts that pass everywhere (no compile error,
    shared memory within the arch's limit, no spill). Each distinct part compiles once per
    mask: the candidates' parts are paired round-robin into as few lowerings as possible.
    Returns ``{"fwd": [...], "bwd": [...], "masks", "triton", "jax", "stats": {part: worst}}``."""
    cands = candidates(H, dtype, pruned=False)
    fwds = list(dict.fromkeys(map(fwd_part, cands)))
    bwds = list(dict.fromkeys(map(bwd_part, cands)))
    names = [f.name for f in dataclasses.fields(BlockSizes)]
    paired = [BlockSizes(**dict(zip(names, fwds[i % len(fwds)] + bwds[i % len(bwds)])))
              for i in range(max(len(fwds), len(bwds)))]
    configs = [compile_check.Config("flash", np.dtype(dtype).name, H, m, bs)
               for m in masks for bs in paired]
    rows = compile_check.run_check(configs, arch, workers=workers, log=log)
    by_part: dict[tuple, list[dict]] = {}
    for r in rows:
        bs = BlockSizes(**r["blocks"])
        part = ("fwd", fwd_part(bs)) if r["kernel"].endswith("fwd") else ("bwd", bwd_part(bs))
        by_part.setdefault(part, []).append(r)
    passing = {kind: [list(p) for (k, p), rs in by_part.items()
                      if k == kind and not any(r["problems"] for r in rs)]
               for kind in ("fwd", "bwd")}
    return {**passing, "masks": list(masks), "triton": rows[0].get("triton"),
            "jax": jax.__version__,
            "stats": {_part_name(k, p): _worst(rs) for (k, p), rs in by_part.items()}}


def _part_name(kind: str, part) -> str:
    return f"{kind}:" + ",".join(map(str, part))


def compiled_entries(space: dict, H: int, dtype, arch: str, path: str = TABLE_PATH) -> dict:
    """The table's unmeasured entries for ``arch``'s GPUs re-marked ``"compiled"``: the
    heuristic's tiles, found spill-free in ``space`` (``prune``'s result), with their stats."""
    out = {}
    for key, entry in load_table(path).items():
        kind, h, dt, causal, t, s = key.split("|")
        if (entry.get("source") == "measured" or h != f"H{int(H)}"
                or dt != np.dtype(dtype).name or arch_of(kind) != arch):
            continue
        bs = heuristic_block_sizes(kind, int(t[1:]), int(s[1:]), H, dtype, causal == "causal")
        f, b = list(fwd_part(bs)), list(bwd_part(bs))
        if f not in space["fwd"] or b not in space["bwd"]:
            raise RuntimeError(f"the heuristic's tiles {bs} for {key} do not compile spill-free "
                               f"on {arch}: fix heuristic_block_sizes first")
        out[key] = {"block_sizes": dataclasses.asdict(bs), "source": "compiled", "arch": arch,
                    "compile": {"fwd": space["stats"][_part_name("fwd", f)],
                                "bwd": space["stats"][_part_name("bwd", b)]},
                    "masks": space["masks"], "triton": space["triton"], "jax": space["jax"]}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="autotune on this GPU and update the table")
    ap.add_argument("--prune", action="store_true",
                    help="on a CPU: compile the candidates, keep the spill-free ones in the table "
                         "and mark unmeasured entries 'compiled' (needs triton)")
    ap.add_argument("--show", action="store_true", help="print the table")
    ap.add_argument("--lengths", default="512,2048,8192", help="T=S values to tune")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--arch", default="sm_90a", help="--prune: sm_90a or sm_80")
    ap.add_argument("--masks", default=",".join(PRUNE_MASKS), help="--prune: mask kinds")
    ap.add_argument("--max-candidates", type=int, default=None, help="--write: per shape")
    ap.add_argument("--time-budget-s", type=float, default=None, help="--write: whole run")
    args = ap.parse_args(argv)
    head_dims = [int(h) for h in args.head_dims.split(",")]
    if args.show or not (args.write or args.prune):
        for key, e in load_table().items():
            print(key, e.get("source"), e["block_sizes"])
    if args.prune:
        for H in head_dims:
            space = prune(H, args.dtype, arch=args.arch, masks=tuple(args.masks.split(",")),
                          log=lambda s: print("  " + s, flush=True))
            write_search_space(search_space_key(args.arch, H, args.dtype), space)
            write_entries(compiled_entries(space, H, args.dtype, args.arch))
            print(f"{args.arch} H{H} {args.dtype}: {len(space['fwd'])} forward and "
                  f"{len(space['bwd'])} backward tile choices compile spill-free")
    if args.write:
        shapes = []
        for L, H in itertools.product(map(int, args.lengths.split(",")), head_dims):
            B = max(1, 16384 // L)   # ~16k tokens per batch
            shapes.append((B, L, L, 12 if H == 64 else 16, H))
        try:
            autotune(shapes, args.dtype, write=True, max_candidates=args.max_candidates,
                     time_budget_s=args.time_budget_s)
        except RuntimeError as e:
            raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
