"""Compile one Triton module (TTIR text) to PTX and a cubin with pip ``triton``; no GPU needed.

    python pallas_kernels/triton_compile.py FILE.ttir NUM_WARPS NUM_STAGES ARCH

Prints one JSON line (see ``compile_ttir``). Runs as a plain script in its own process, one per
kernel, so that an MLIR abort or a ptxas crash fails that kernel only; it imports nothing but
the standard library and ``triton`` (not jax, not ``pallas_kernels``: a fast start).

Every NVIDIA stage runs, the TTIR passes included: XLA's Triton pipeline runs them for a Pallas
custom call, while ``triton.compile()`` on an IR file would start after them. The GPU compiles
with XLA's bundled Triton, so figures are close to, not identical with, what a GPU would see.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys

# Fused multiply-add on, as XLA's Triton pipeline compiles (and it silences triton 3.9's warning
# that its default will change).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# Architectures we check: name -> CUDA compute capability as triton's GPUTarget wants it.
# Triton turns capability 90 into ``sm_90a`` (wgmma) and uses its bundled CUDA 13 ptxas
# ("ptxas-blackwell") for it; capability 80 uses the bundled CUDA 12 ptxas.
ARCHS = {"sm_90a": 90, "sm_80": 80}

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
# ptxas warnings, and "info" lines that carry a diagnostic code such as
# "(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized ...".
_WARNING = re.compile(r"(?:warning\s*:?\s*|info\s*:\s*(?=\(C\d+\)))(.*)", re.IGNORECASE)


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack/spill bytes and warning lines from a ``ptxas -v`` log."""
    out = {"regs": None, "stack": None, "spill_stores": None, "spill_loads": None,
           "warnings": []}
    m = _REGS.search(log)
    if m:
        out["regs"] = int(m.group(1))
    m = _SPILLS.search(log)
    if m:
        out["stack"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    for line in log.splitlines():
        w = _WARNING.search(line)
        if w:
            out["warnings"].append(w.group(1).strip())
    return out


def compile_ttir(path: str, num_warps: int, num_stages: int, arch: str) -> dict:
    """``{"ok", "stage", "error", "shared", "regs", "spill_stores", "spill_loads", "stack",
    "warnings", "triton"}`` for the module in ``path``; ``stage`` names the failing stage."""
    import triton
    from triton import knobs
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget, Language
    from triton.compiler.compiler import make_backend

    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} must be one of {sorted(ARCHS)}")
    res = {"ok": False, "stage": "parse", "triton": triton.__version__}
    target = GPUTarget("cuda", ARCHS[arch], 32)
    backend = make_backend(target)
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    try:
        module = ir.parse_mlir_module(path, ctx)
        module.context = ctx
        options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
        metadata = {"target": target, **options.__dict__}
        stages: dict = {}
        backend.add_stages(stages, options, Language.TRITON)
        knobs.nvidia.dump_ptxas_log = True   # triton prints the ptxas -v log to stdout
        log = io.StringIO()
        cur = module
        for res["stage"], fn in stages.items():
            with contextlib.redirect_stdout(log):
                cur = fn(cur, metadata)
        res.update(parse_ptxas_log(log.getvalue()))
        res.update(ok=True, stage=None, shared=int(metadata.get("shared") or 0),
                   cubin_bytes=len(cur))
    except Exception as e:  # noqa: BLE001 - any stage's failure is the result we report
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
    return res


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__.split("\n\n")[1])
    file, warps, stages_, arch_ = sys.argv[1:]
    print(json.dumps(compile_ttir(file, int(warps), int(stages_), arch_)))
