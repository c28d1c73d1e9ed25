"""Compiling a jitted program for GPUs this machine does not have (XLA deviceless AOT).

``Target`` names the GPUs (kind, hosts x GPUs per host; ``jt5.pallas_kernels.gpu_targets``
holds XLA's published target descriptions); ``compile_lowered`` compiles a lowered program for
them with XLA's own GPU compiler (the CUDA plugin: no CUDA libraries, no device) and returns
what the program needs per device (``memory_analysis``), how many Pallas kernels it holds, how
long the compile took and what XLA warned about. XLA writes its warnings ("Involuntary full
rematerialization", ...) from C++ straight to file descriptor 2, so they are captured there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import time
from typing import NamedTuple, Optional

from jt5.pallas_kernels import gpu_targets

# The Pallas custom calls in compiled GPU HLO: Triton kernels, Mosaic GPU kernels.
_KERNEL_CALLS = ("__gpu$xla.gpu.triton", "mosaic_gpu")
_CUDNN_CALLS = ("__cudnn$fmha",)
# XLA's log lines that mean the program wastes memory or bandwidth (a CI gate fails on them).
RESHARDING_WARNING = "Involuntary full rematerialization"


@dataclasses.dataclass(frozen=True)
class Target:
    """``hosts x gpus_per_host`` GPUs of one kind (``gpu_targets.GPUS``)."""
    gpu: gpu_targets.GPU
    hosts: int = 1
    gpus_per_host: int = 1

    @property
    def num_devices(self) -> int:
        return self.hosts * self.gpus_per_host

    @property
    def devices(self) -> list:
        """The topology's devices: meshes over them compile for the GPUs (nothing runs)."""
        return list(gpu_targets.topology(self.gpu.name, hosts=self.hosts,
                                         gpus_per_host=self.gpus_per_host).devices)

    def describe(self) -> str:
        where = f"{self.gpus_per_host} per host x {self.hosts} hosts" if self.hosts > 1 else ""
        n = self.num_devices
        return (f"{n} x {self.gpu.description}" + (f" ({where})" if where else ""))


def target(gpu: str = "h100", *, hosts: int = 1, gpus_per_host: int = 1) -> Target:
    if hosts < 1 or gpus_per_host < 1:
        raise ValueError(f"--hosts {hosts} and --gpus-per-host {gpus_per_host} must be >= 1")
    return Target(gpu_targets.gpu(gpu), hosts, gpus_per_host)


def check_plugin() -> None:
    """One clear error when the GPU compiler is missing, and no GPU backend in this process."""
    if not gpu_targets.has_plugin():
        raise ImportError(f"jt5 plan compiles with jax's CUDA plugin, which is not installed: "
                          f"{gpu_targets.PLUGIN_HINT}")
    gpu_targets.cpu_unless_gpu()


class Compiled(NamedTuple):
    """What XLA reports of one program compiled for the target, per device."""
    argument_bytes: int
    output_bytes: int
    alias_bytes: int          # outputs that reuse donated arguments' buffers
    temp_bytes: int
    code_bytes: int
    kernels: int              # Pallas custom calls (Triton or Mosaic GPU) in the program
    cudnn_calls: int          # cuDNN fused attention calls (attention="cudnn")
    kernel_names: dict        # Pallas calls by kernel name
    compile_s: float          # lowering + compilation, wall clock
    compile_cpu_s: float      # the same in CPU time of this process (all threads)
    warnings: tuple[str, ...]  # XLA's log lines that name a resharding by replication
    hlo: str                  # the compiled program's text (collectives, fusions ...)

    @property
    def total_bytes(self) -> int:
        """Arguments + outputs that are not donated arguments + temporaries + code."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)


@contextlib.contextmanager
def _captured_fd2():
    """Everything written to file descriptor 2 inside, as a list of lines filled on exit (and
    passed on to the real stderr, so nothing the compiler says is lost)."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            lines.extend(text.splitlines())
            kept = [ln for ln in lines if RESHARDING_WARNING not in ln]
            if kept:  # the other messages still reach the user
                sys.stderr.write("\n".join(kept) + "\n")


def _summarise(line: str) -> str:
    """XLA's resharding warning is one very long line; keep the part that names the op."""
    m = re.search(r"from sharding (\{.*?\}) to (\{.*?\}) .*?HLO operation (%[\w.\-]+ = \S+)",
                  line)
    if m:
        return f"{RESHARDING_WARNING}: {m.group(3)} from {m.group(1)} to {m.group(2)}"
    return line.strip()[:300]


def count_kernels(hlo: str, targets=_KERNEL_CALLS) -> int:
    """Custom calls in compiled HLO whose target starts with one of ``targets``."""
    return sum(len(re.findall(rf'custom_call_target="{re.escape(c)}', hlo)) for c in targets)


def kernel_names(hlo: str) -> dict:
    """Pallas calls by kernel name (each ``pallas_call``'s ``name=``, from the op metadata)."""
    names: dict = {}
    for line in hlo.splitlines():
        if any(f'custom_call_target="{c}' in line for c in _KERNEL_CALLS):
            # ".../t5_flash_fwd/pallas_call", ".../jvp(t5_flash_fwd)/pallas_call", ...
            m = re.search(r'op_name="[^"]*?([\w.]+)\)*/pallas_call', line)
            key = m.group(1) if m else "unnamed"
            names[key] = names.get(key, 0) + 1
    return dict(sorted(names.items()))


@contextlib.contextmanager
def _cudnn_version(target: Target):
    """jax asks the installed cuDNN for its version while tracing its cuDNN attention; a machine
    that only compiles has none, so the target spec's version answers instead."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError:  # another jax layout: nothing to patch
        yield
        return
    original = fa.check_cudnn_version

    def version():
        try:
            return original()
        except RuntimeError:  # "cuDNN not found"
            return gpu_targets.dnn_version(target.gpu.name)

    fa.check_cudnn_version = version
    try:
        yield
    finally:
        fa.check_cudnn_version = original


def compile_lowered(lower, target: Target) -> Compiled:
    """``lower()`` -> a ``jax.stages.Lowered`` for ``target``'s devices; compile it and read
    XLA's per-device figures. The Pallas kernels are lowered for the GPU (not interpreted),
    with the tiles and grid sizes they pick on that GPU."""
    from jt5.attention_ops import pallas_interpret
    from jt5.pallas_kernels.blocks import compile_target

    t0, c0 = time.perf_counter(), time.process_time()
    with _captured_fd2() as log, pallas_interpret(False), \
            compile_target(target.devices[0]), _cudnn_version(target):
        compiled = lower().compile()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    warnings = tuple(_summarise(ln) for ln in log if RESHARDING_WARNING in ln)
    return Compiled(argument_bytes=int(mem.argument_size_in_bytes),
                    output_bytes=int(mem.output_size_in_bytes),
                    alias_bytes=int(mem.alias_size_in_bytes),
                    temp_bytes=int(mem.temp_size_in_bytes),
                    code_bytes=int(mem.generated_code_size_in_bytes),
                    kernels=count_kernels(hlo), cudnn_calls=count_kernels(hlo, _CUDNN_CALLS),
                    kernel_names=kernel_names(hlo),
                    compile_s=seconds, compile_cpu_s=cpu, warnings=warnings, hlo=hlo)


def memory_fraction(default: Optional[float] = None) -> float:
    """The share of device memory jax's allocator may use: ``XLA_PYTHON_CLIENT_MEM_FRACTION``
    (jax preallocates 75% by default; a program larger than the pool fails with out-of-memory,
    whatever the device holds)."""
    if default is not None:
        return default
    env = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    try:
        return float(env) if env else 0.75
    except ValueError:
        raise ValueError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={env!r} is not a number") from None
