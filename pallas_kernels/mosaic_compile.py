"""The Mosaic GPU kernels compiled to sm_90a on a CPU: every configuration the model can launch
(dtype x head dim x mask kind, forward and backward) through XLA's GPU pipeline and jax's CUDA
plugin (deviceless: ``gpu_targets.topology``), with ptxas' register and spill report.

    python -m jt5.pallas_kernels.mosaic_compile [--semantics lane,warpgroup] [--json out.json]

Mosaic GPU lowers and compiles inside XLA's compile of the jitted program; the plugin's ptxas
prints its ``-v`` report when ``MOSAIC_GPU_DUMP_PTXAS=1`` (read per compile), captured here from
the process' file descriptors. Shared memory is checked by Mosaic GPU's lowering itself (227 KiB
on sm_90a: "exceeds available shared memory"); the bytes each kernel asks for are recorded from
its launch when the jax version exposes them. A kernel fails the gate on a compile error or any
spill. The rows and table are ``compile_check``'s (its Triton gate sits beside this one).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jt5.pallas_kernels.compile_check import (FLASH_MASKS, _flash_mask, format_row, problems,
                                              report)
from jt5.pallas_kernels.spec import RelativeBias
from jt5.pallas_kernels.triton_compile import parse_ptxas_log

KERNELS = ("t5_mosaic_fwd", "t5_mosaic_bwd_dq", "t5_mosaic_bwd_dkv", "t5_mosaic_bwd_dk",
           "t5_mosaic_bwd_dv", "t5_mosaic_bwd_band")
ARCH = "sm_90a"
_ENTRY = re.compile(r"Compiling entry function '(\w+?)_mosaic_gpu_kernel' for '(\w+)'")
_LOCK = threading.Lock()
# Representative shapes (the code generated does not depend on them): 4 x 4 blocks, so every
# bias-band offset and far blocks on both sides occur.
_B, _L, _N = 2, 256, 4


@contextlib.contextmanager
def _captured_output():
    """Everything written to file descriptors 1 and 2 (the plugin's C++ prints) inside."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    buf: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield buf
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            buf.append(tmp.read().decode(errors="replace"))


@contextlib.contextmanager
def _smem_requests():
    """``kernel name -> shared-memory bytes`` of each Mosaic GPU kernel lowered inside (from
    ``mosaic.gpu.core``'s lowering; nothing when the jax version differs)."""
    from jax.experimental.mosaic.gpu import core
    found: dict[str, int] = {}
    lower, launch = getattr(core, "_lower_as_gpu_kernel", None), getattr(core, "_launch", None)
    size = getattr(core, "_smem_tree_size", None)
    if lower is None or launch is None or size is None:
        yield found
        return
    current: list[str] = []

    def lowering(*a, **kw):
        current.append(str(kw.get("kernel_name", a[10] if len(a) > 10 else "?")))
        return lower(*a, **kw)

    @contextlib.contextmanager
    def launching(token, grid, cluster, block, smem_buffers, *a, **kw):
        if current:
            found[current[-1]] = size(smem_buffers)
        with launch(token, grid, cluster, block, smem_buffers, *a, **kw) as out:
            yield out
    core._lower_as_gpu_kernel, core._launch = lowering, launching
    try:
        yield found
    finally:
        core._lower_as_gpu_kernel, core._launch = lower, launch


def split_ptxas_log(log: str) -> dict[str, dict]:
    """``kernel name -> parse_ptxas_log(its section)`` of a log holding several kernels."""
    out = {}
    marks = list(_ENTRY.finditer(log))
    for m, nxt in zip(marks, marks[1:] + [None]):
        section = log[m.start():nxt.start() if nxt else len(log)]
        out[m.group(1)] = dict(parse_ptxas_log(section), arch=m.group(2))
    return out


def _inputs(mask_kind: str, dtype, head_dim: int, sharding):
    T, S = (_L // 2, _L) if mask_kind == "cross" else (_L, _L)
    mask, bidirectional = _flash_mask(mask_kind, _B, T, S)
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    q = sds((_B, T, _N, head_dim), dtype)
    kv = sds((_B, S, _N, head_dim), dtype)
    table = None if bidirectional is None else sds((32, _N), jnp.float32)
    return mask, bidirectional, (q, kv, kv, table)


def kernels(head_dim: int, *, bias: bool) -> list[str]:
    """The kernels a forward + backward launches: dk and dv apart above head dim 64 (one
    accumulator per warpgroup), the bias band only with a bias."""
    split = head_dim > 64
    return [k for k in KERNELS if not (k == "t5_mosaic_bwd_band" and not bias)
            and not (k == "t5_mosaic_bwd_dkv" and split)
            and not (k in ("t5_mosaic_bwd_dk", "t5_mosaic_bwd_dv") and not split)]


def compile_config(mask_kind: str, dtype: str, head_dim: int, *, semantics: str = "lane",
                   stages: int = 2, gpu: str = "h100") -> dict[str, dict]:
    """Compile the forward and backward of one configuration for ``gpu``: ``kernel name ->
    {ok, regs, spill_stores, spill_loads, stack, warnings, shared, error, compile_s}``.

    Remembered per process: the plugin compiles an identical kernel once (a second compile
    runs no ptxas, so there would be no report to read)."""
    return {k: dict(v) for k, v in _compile_config(mask_kind, dtype, head_dim, semantics,
                                                   stages, gpu).items()}


@functools.lru_cache(maxsize=None)
def _compile_config(mask_kind, dtype, head_dim, semantics, stages, gpu):
    from jt5.pallas_kernels import gpu_targets
    from jt5.pallas_kernels.mosaic_attention import mosaic_attention
    topo = gpu_targets.topology(gpu)
    mesh = jax.sharding.Mesh(np.array(topo.devices), ("x",))
    mask, bidirectional, args = _inputs(mask_kind, jnp.dtype(dtype), head_dim,
                                        jax.sharding.NamedSharding(mesh,
                                                                   jax.sharding.PartitionSpec()))

    def loss(q, k, v, table):
        bias = None if table is None else RelativeBias(table, bidirectional=bidirectional)
        out = mosaic_attention(q, k, v, mask, bias, interpret=False, semantics=semantics,
                               stages=stages)
        return jnp.sum(out.astype(jnp.float32))
    argnums = (0, 1, 2) if args[3] is None else (0, 1, 2, 3)
    t0 = time.perf_counter()
    with _LOCK, _captured_output() as log, _smem_requests() as smem:
        os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
        try:
            jax.jit(jax.grad(loss, argnums)).lower(*args).compile()
            error = None
        except Exception as e:  # noqa: BLE001 - a compile failure is the result we report
            error = f"{type(e).__name__}: {' '.join(str(e).split())}"[:1500]
        finally:
            os.environ.pop("MOSAIC_GPU_DUMP_PTXAS", None)
    elapsed = round(time.perf_counter() - t0, 2)
    found = split_ptxas_log(log[0])
    expected = kernels(head_dim, bias=args[3] is not None)
    rows = {}
    for name in expected:
        res = found.get(name)
        if res is None:
            res = {"ok": False, "stage": "compile",
                   "error": error or "no ptxas report for this kernel"}
        else:
            res = dict(res, ok=True, stage=None, error=None)
        res["shared"] = next((v for k, v in smem.items()
                              if k == name or k.startswith(name + "_")), None)
        res["compile_s"] = elapsed
        rows[name] = res
    return rows


def configurations(*, dtypes=("bfloat16", "float16"), head_dims=(64, 128), masks=None,
                   semantics=("lane",)):
    """``(mask kind, dtype, head dim, semantics)`` of every launch the model can make: the
    Triton gate's mask kinds (``compile_check.FLASH_MASKS``), both 16-bit dtypes, T5's head
    dims."""
    masks = FLASH_MASKS if masks is None else masks
    for m in masks:
        if m not in FLASH_MASKS:
            raise ValueError(f"mask {m!r} must be one of {sorted(FLASH_MASKS)}")
    return [(m, d, h, s) for s in semantics for d in dtypes for h in head_dims for m in masks]


def run_check(configs, *, log=None) -> list[dict]:
    """One ``compile_check``-style row per (configuration, kernel)."""
    rows = []
    for mask, dtype, head_dim, semantics in configs:
        for kernel, res in compile_config(mask, dtype, head_dim, semantics=semantics).items():
            row = dict(res, kernel=kernel, family="mosaic", dtype=dtype, head_dim=head_dim,
                       mask=mask, tile="64x64 x2 WG", warps_stages=f"{semantics}/2",
                       key=f"{kernel}|{dtype}|H{head_dim}|{mask}|{semantics}", blocks={},
                       selected_by=[], triton=None)
            row["arch"] = row.get("arch") or ARCH
            row["problems"] = problems(row, ARCH)
            rows.append(row)
            if log:
                log(format_row(row))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--masks", default=",".join(FLASH_MASKS))
    ap.add_argument("--semantics", default="lane", help="lane and/or warpgroup")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    configs = configurations(dtypes=tuple(args.dtypes.split(",")),
                             head_dims=tuple(map(int, args.head_dims.split(","))),
                             masks=tuple(args.masks.split(",")),
                             semantics=tuple(args.semantics.split(",")))
    print(f"{ARCH}: {len(configs)} Mosaic GPU configurations", file=sys.stderr)
    t0 = time.perf_counter()
    rows = run_check(configs, log=lambda s: print("  " + s, file=sys.stderr))
    return report(rows, time.perf_counter() - t0, args.json)


if __name__ == "__main__":
    sys.exit(main())
