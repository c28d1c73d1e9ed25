"""Compile every kernel the model can launch to machine code on a CPU: shared memory, registers,
spills and ptxas warnings per configuration, and a verdict against the target's limits.

    python -m jt5.pallas_kernels.compile_check                        # sm_90a, bf16 + f16, H 64/128
    python -m jt5.pallas_kernels.compile_check --arch sm_80 --json out.json
    python -m jt5.pallas_kernels.compile_check --dtypes float32 --masks none --kernels flash

For each configuration (tile choice x dtype x head dim x mask kind) the flash forward and
backward (dk/dv, dq) or the decode kernel is lowered for CUDA
(``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))``, no GPU needed); the Triton
module each ``pallas_call`` builds is captured and compiled by ``triton_compile.py`` with pip
``triton`` through every stage (ttir, ttgir, llir, ptx, cubin). Tiles are those
``blocks.get_block_sizes`` selects — table entries and the heuristic — for the target's GPUs.

A kernel fails the check on a compile error, shared memory above the target's limit or any
register spill. Identical kernels (same module text, warps and stages) are compiled once;
nothing is cached between runs. Needs ``triton`` (the test extra pins 3.9.0). The Mosaic GPU
kernels have the same gate through XLA and jax's CUDA plugin: ``mosaic_compile.py``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jt5.pallas_kernels import blocks
from jt5.pallas_kernels.blocks import BlockSizes, DecodeBlockSizes
from jt5.pallas_kernels.decode_attention import decode_attention
from jt5.pallas_kernels.flash_attention import flash_attention
from jt5.pallas_kernels.spec import Mask, RelativeBias

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile.py")
# Usable shared memory per block (CUDA programming guide, compute capabilities table).
SMEM_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}
# Which GPUs' table entries apply to an arch, and the device kind standing for "any other".
ARCH_GPUS = {"sm_90a": (("h100", "h200", "h800", "gh200"), "NVIDIA H100 80GB HBM3"),
             "sm_80": (("a100", "a800", "a30"), "NVIDIA A100-SXM4-80GB")}
FLASH_MASKS = ("none", "padding", "packing", "causal_packing", "cross", "local_global")
DECODE_MASKS = ("causal", "cross")
# Representative lengths: every tile fits, the code generated does not depend on them.
_L, _B, _N = 512, 2, 4
_BUCKETS = tuple(1 << i for i in range(7, 16))          # 128 .. 32768, the table's buckets
_COMPILE_TIMEOUT_S = 600


# ---------------------------------------------------------------------------- capture

@dataclasses.dataclass(frozen=True)
class Kernel:
    """One ``pallas_call`` as lowered: its Triton module text and launch parameters."""
    name: str
    ttir: str
    num_warps: int
    num_stages: int

    @property
    def key(self) -> str:   # identical kernels compile once
        digest = hashlib.sha256(self.ttir.encode()).hexdigest()[:16]
        return f"{digest}-w{self.num_warps}-s{self.num_stages}"


_CAPTURE_LOCK = threading.Lock()


@contextlib.contextmanager
def _capturing():
    """Hook jax's Pallas Triton lowering; yields the list it fills with ``Kernel``s.

    The module text is taken where ``lower_jaxpr_to_triton_module`` returns it; warps and
    stages from the custom call built right after it (jaxlib <= 0.10.2) or from the
    ``triton.compile`` call that replaces it in later jaxlibs. The two hooks pair up in order.
    """
    from jax._src.interpreters import mlir
    from jax._src.pallas.triton import lowering
    from jax._src.pallas.triton import pallas_call_registration as reg

    out: list[Kernel] = []
    pending: list[str] = []
    orig_lower, orig_call = lowering.lower_jaxpr_to_triton_module, mlir.custom_call
    orig_compile = getattr(getattr(reg, "triton", None), "compile", None)

    def lower(*a, **kw):
        res = orig_lower(*a, **kw)
        # No debug locations: the text must parse in pip triton and dedupe across call sites.
        pending.append(res.module.operation.get_asm(enable_debug_info=False))
        return res

    def custom_call(call_target_name, *a, **kw):
        if call_target_name == "__gpu$xla.gpu.triton" and pending:
            bc = kw["backend_config"]
            out.append(Kernel(bc["name"].value, pending.pop(0), _i32(bc["num_warps"]),
                              _i32(bc["num_stages"])))
        return orig_call(call_target_name, *a, **kw)

    def compile_(platform, ir_bytes, arch, *, num_warps, num_stages, **kw):
        if pending:
            out.append(Kernel("kernel", pending.pop(0), num_warps, num_stages))
        return orig_compile(platform, ir_bytes, arch, num_warps=num_warps,
                            num_stages=num_stages, **kw)

    with _CAPTURE_LOCK:
        lowering.lower_jaxpr_to_triton_module = lower
        mlir.custom_call = custom_call
        if orig_compile is not None:
            reg.triton.compile = compile_
        try:
            yield out
        finally:
            lowering.lower_jaxpr_to_triton_module = orig_lower
            mlir.custom_call = orig_call
            if orig_compile is not None:
                reg.triton.compile = orig_compile


def _i32(attr) -> int:
    return int(str(attr).split(":")[0])   # "4 : i32"


def capture(fn, *args) -> list[Kernel]:
    """The Triton kernels of ``fn(*args)`` lowered for CUDA, in lowering order."""
    with _capturing() as kernels:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return list(kernels)


# ---------------------------------------------------------------------------- configurations

@dataclasses.dataclass(frozen=True)
class Config:
    """One launchable choice: kernel family, dtype, head dim, mask kind and tiles."""
    family: str                      # "flash" (fwd + dkv + dq) or "decode"
    dtype: str
    head_dim: int
    mask: str
    blocks: object                   # BlockSizes | DecodeBlockSizes
    selected_by: tuple[str, ...] = ()  # table keys / "heuristic:<kind>" that pick these tiles


def selected_block_sizes(arch: str, head_dim: int, dtype: str, causal: bool,
                         path: str = blocks.TABLE_PATH) -> dict[BlockSizes, list[str]]:
    """Every flash ``BlockSizes`` that ``blocks.get_block_sizes`` returns for this arch's GPUs
    over the table's length buckets, with what selected it."""
    names, default_kind = ARCH_GPUS[arch]
    table = blocks.load_table(path)
    kinds = {default_kind}
    for key in table:
        kind = key.split("|")[0]
        if any(n in kind for n in names):
            kinds.add(kind)
    found: dict[BlockSizes, list[str]] = {}
    for kind, b in ((k, b) for k in sorted(kinds) for b in _BUCKETS):
        key = blocks.table_key(kind, b, b, head_dim, dtype, causal)
        bs = blocks.get_block_sizes(kind, b, b, head_dim, dtype, causal, path=path)
        source = key if key in table else f"heuristic:{blocks.normalize_device_kind(kind)}"
        found.setdefault(bs, []).append(source)
    return found


def configurations(arch: str, *, dtypes=("bfloat16", "float16"), head_dims=(64, 128),
                   masks=FLASH_MASKS + DECODE_MASKS, kernels=("flash", "decode"),
                   path: str = blocks.TABLE_PATH) -> list[Config]:
    """The configurations the model can launch on ``arch``, as the tuning table selects them."""
    for name, given, known in (("mask", masks, FLASH_MASKS + DECODE_MASKS),
                               ("kernel", kernels, ("flash", "decode")),
                               ("arch", (arch,), tuple(ARCH_GPUS))):
        for x in given:
            if x not in known:
                raise ValueError(f"{name} {x!r} must be one of {sorted(known)}")
    out = []
    for dtype, H in ((d, h) for d in dtypes for h in head_dims):
        if "flash" in kernels:
            for mask in (m for m in FLASH_MASKS if m in masks):
                sel = selected_block_sizes(arch, H, dtype, mask == "causal_packing", path)
                out += [Config("flash", dtype, H, mask, bs, tuple(src)) for bs, src in sel.items()]
        if "decode" in kernels:
            out += [Config("decode", dtype, H, mask, DecodeBlockSizes(), ("default",))
                    for mask in DECODE_MASKS if mask in masks]
    return out


def _segments(B, L, n):
    return jnp.asarray(np.repeat(np.arange(1, n + 1, dtype=np.int32), -(-L // n))[None, :L]
                       .repeat(B, 0))


def _padding(B, L):
    kv = np.ones((B, L), np.int32)
    kv[:, L - L // 4:] = 0
    return jnp.asarray(kv)


def lower_config(cfg: Config) -> list[Kernel]:
    """Lower one configuration for CUDA and capture its Triton kernels."""
    dt = jnp.dtype(cfg.dtype)
    H = cfg.head_dim
    if cfg.family == "decode":
        q = jnp.zeros((_B, 1, _N, H), dt)
        kv = jnp.zeros((_B, _L, _N, H), dt)
        if cfg.mask == "causal":   # decoder self-attention over the cache, in-kernel bias
            mask, table = Mask(causal=True), jnp.zeros((32, _N), jnp.float32)
        elif cfg.mask == "cross":  # encoder padding, no bias
            mask, table = Mask(kv_segment_ids=_padding(_B, _L)), None
        else:
            raise ValueError(f"decode mask {cfg.mask!r} must be one of {DECODE_MASKS}")

        def f(q, kv, t, pos):
            bias = None if t is None else RelativeBias(t, bidirectional=False)
            return decode_attention(q, kv, kv, mask, bias, q_offset=pos, block_sizes=cfg.blocks,
                                    interpret=False)
        return capture(f, q, kv, table, jnp.int32(_L - 7))
    T, S = (_L // 2, _L) if cfg.mask == "cross" else (_L, _L)
    mask, bidirectional = _flash_mask(cfg.mask, _B, T, S)
    q = jnp.zeros((_B, T, _N, H), dt)
    kv = jnp.zeros((_B, S, _N, H), dt)
    table = None if bidirectional is None else jnp.zeros((32, _N), jnp.float32)

    def f(q, k, v, t):
        bias = None if t is None else RelativeBias(t, bidirectional=bidirectional)
        return flash_attention(q, k, v, mask, bias, block_sizes=cfg.blocks, interpret=False)
    argnums = (0, 1, 2) if table is None else (0, 1, 2, 3)
    grad = jax.grad(lambda q, k, v, t: f(q, k, v, t).astype(jnp.float32).sum(), argnums)
    return capture(grad, q, kv, kv, table)


def _flash_mask(mask: str, B: int, T: int, S: int) -> tuple[Mask, bool | None]:
    """The ``Mask`` of a mask kind and its bias' ``bidirectional`` (None: no bias)."""
    if mask == "none":           # encoder, no padding
        return Mask(), True
    if mask == "padding":        # encoder with padding keys
        return Mask(kv_segment_ids=_padding(B, S)), True
    if mask == "packing":        # packed encoder rows
        seg = _segments(B, T, 3)
        return Mask(q_segment_ids=seg, kv_segment_ids=seg), True
    if mask == "causal_packing":  # packed decoder self-attention
        seg = _segments(B, T, 3)
        return Mask(q_segment_ids=seg, kv_segment_ids=seg, causal=True), False
    if mask == "cross":          # decoder queries over padded encoder keys, no bias
        return Mask(kv_segment_ids=_padding(B, S)), None
    if mask == "local_global":   # local window + global tokens (LongT5-style)
        return Mask(local_window=127, num_global_tokens=16), True
    raise ValueError(f"flash mask {mask!r} must be one of {FLASH_MASKS}")


# ---------------------------------------------------------------------------- compile + verdict

def _compile_one(kernel: Kernel, arch: str, workdir: str) -> dict:
    path = os.path.join(workdir, f"{kernel.key}.ttir")
    with open(path, "w") as f:
        f.write(kernel.ttir)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, _WORKER, path, str(kernel.num_warps),
                               str(kernel.num_stages), arch], capture_output=True, text=True,
                              timeout=_COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"ok": False, "stage": "timeout", "error": f"over {_COMPILE_TIMEOUT_S} s"}
    lines = proc.stdout.strip().splitlines()
    try:
        res = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):  # the worker died (an MLIR abort, a signal)
        res = {"ok": False, "stage": "crash",
               "error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    res["compile_s"] = round(time.perf_counter() - t0, 2)
    return res


def problems(res: dict, arch: str) -> list[str]:
    """Why a compiled kernel fails the check (empty: it passes)."""
    if not res.get("ok"):
        return [f"compile error at {res.get('stage')}: {str(res.get('error'))[:300]}"]
    out = []
    if res.get("shared") is not None and res["shared"] > SMEM_LIMIT[arch]:
        out.append(f"shared memory {res['shared']} B > {arch} limit {SMEM_LIMIT[arch]} B")
    spill = (res.get("spill_stores") or 0) + (res.get("spill_loads") or 0)
    if spill:
        out.append(f"spills {res['spill_stores']} B stored / {res['spill_loads']} B loaded")
    return out


def _tile(cfg: Config, kernel_name: str) -> tuple[str, str]:
    b = cfg.blocks
    if cfg.family == "decode":
        return f"1x{b.block_k}", f"{b.num_warps}/{b.num_stages}"
    if kernel_name.endswith("dkv"):
        return f"{b.block_q_dkv}x{b.block_k_dkv}", f"{b.num_warps_bwd}/{b.num_stages_bwd}"
    if kernel_name.endswith("dq"):
        return f"{b.block_q_dq}x{b.block_k_dq}", f"{b.num_warps_bwd}/{b.num_stages_bwd}"
    return f"{b.block_q}x{b.block_k}", f"{b.num_warps}/{b.num_stages}"


def run_check(configs: list[Config], arch: str, *, workers: int = 2,
              log=None) -> list[dict]:
    """Lower every configuration, compile each distinct kernel once (``workers`` at a time,
    started while later configurations still lower), one row per (configuration, kernel)."""
    if arch not in SMEM_LIMIT:
        raise ValueError(f"arch={arch!r} must be one of {sorted(SMEM_LIMIT)}")
    rows, futures = [], {}
    with tempfile.TemporaryDirectory(prefix="jt5_compile_check_") as workdir, \
            concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for cfg in configs:
            for kernel in lower_config(cfg):
                if kernel.key not in futures:
                    futures[kernel.key] = pool.submit(_compile_one, kernel, arch, workdir)
                tile, launch = _tile(cfg, kernel.name)
                rows.append(dict(kernel=kernel.name, family=cfg.family, dtype=cfg.dtype,
                                 head_dim=cfg.head_dim, mask=cfg.mask, tile=tile,
                                 warps_stages=launch, key=kernel.key, arch=arch,
                                 blocks=dataclasses.asdict(cfg.blocks),
                                 selected_by=list(cfg.selected_by)))
        for row in rows:
            res = futures[row["key"]].result()
            row.update({k: res.get(k) for k in ("ok", "shared", "regs", "spill_stores",
                                                "spill_loads", "stack", "warnings", "stage",
                                                "error", "compile_s", "triton")})
            row["problems"] = problems(res, arch)
            if log:
                log(format_row(row))
    return rows


# ---------------------------------------------------------------------------- report

_COLUMNS = ("kernel", "dtype", "H", "mask", "tile", "w/s", "smem KB", "regs", "spill B",
            "warnings", "verdict")


def _short_warnings(ws) -> str:
    """ptxas warning codes (e.g. C7515) once each; the full text is in the JSON."""
    codes = []
    for w in ws or ():
        m = re.search(r"C\d{4}", w)
        code = m.group(0) if m else " ".join(w.split()[:3])
        if code not in codes:
            codes.append(code)
    return " ".join(codes) or "-"


def _cells(row: dict) -> list[str]:
    spill = ("-" if row.get("spill_stores") is None
             else f"{row['spill_stores']}/{row['spill_loads']}")
    smem = "-" if row.get("shared") is None else f"{row['shared'] / 1024:.1f}"
    verdict = "ok" if not row["problems"] else "FAIL: " + "; ".join(row["problems"])
    return [row["kernel"], row["dtype"], str(row["head_dim"]), row["mask"], row["tile"],
            row["warps_stages"], smem, str(row.get("regs") or "-"), spill,
            _short_warnings(row.get("warnings")), verdict]


def format_row(row: dict) -> str:
    return " | ".join(_cells(row))


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--arch", default="sm_90a", help=f"comma-separated, of {sorted(SMEM_LIMIT)}")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--masks", default=",".join(FLASH_MASKS + DECODE_MASKS),
                    help=f"flash: {','.join(FLASH_MASKS)}; decode: {','.join(DECODE_MASKS)}")
    ap.add_argument("--kernels", default="flash,decode", help="flash and/or decode")
    ap.add_argument("--table", default=blocks.TABLE_PATH, help="tuning table to select tiles from")
    ap.add_argument("--workers", type=int, default=2, help="compiles in parallel")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    rows, t0 = [], time.perf_counter()
    for arch in args.arch.split(","):
        configs = configurations(arch, dtypes=tuple(args.dtypes.split(",")),
                                 head_dims=tuple(map(int, args.head_dims.split(","))),
                                 masks=tuple(args.masks.split(",")),
                                 kernels=tuple(args.kernels.split(",")), path=args.table)
        print(f"{arch}: {len(configs)} configurations", file=sys.stderr)
        rows += run_check(configs, arch, workers=args.workers,
                          log=lambda s: print("  " + s, file=sys.stderr))
    return report(rows, time.perf_counter() - t0, args.json,
                  f"{len({(r['arch'], r['key']) for r in rows})} distinct compiles, ",
                  f", triton {rows[0].get('triton') if rows else '?'}")


def report(rows: list[dict], elapsed: float, json_path, compiles: str = "", tail: str = "") -> int:
    """Print the table and its summary line, write ``json_path``; exit status 1 on any problem."""
    failed = [r for r in rows if r["problems"]]
    print(markdown_table(rows))
    print(f"\n{len(rows)} kernel rows, {compiles}{len(failed)} failing, {elapsed:.0f} s; jax "
          f"{jax.__version__}{tail}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"jax": jax.__version__, "elapsed_s": round(elapsed, 1), "rows": rows},
                      f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
