"""GPU targets to compile for on any machine, with or without a GPU (XLA deviceless AOT).

jax's CUDA plugin carries XLA's whole GPU compiler. Given a target description (a
``GpuTargetConfigProto``: SM count, shared memory, registers, memory size, compute capability),
``jax.experimental.topologies`` builds devices that programs can be lowered and compiled for
without opening a GPU: whole jitted programs, the Pallas kernels (Triton and Mosaic GPU),
collectives over several devices and hosts, and ``memory_analysis()`` per device.

    topo = gpu_targets.topology("h100", hosts=2, gpus_per_host=8)     # 16 H100s
    mesh = jax.sharding.Mesh(np.array(topo.devices).reshape(...), names)

The descriptions in ``targets/`` are XLA's published specs (``xla/backends/gpu/target_config/
specs``). The peak rates below are the vendors' dense (no sparsity) figures.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import NamedTuple

TARGETS_DIR = Path(__file__).resolve().parent / "targets"


class GPU(NamedTuple):
    name: str                  # as the CLI spells it: h100, h200, a100, b200
    description: str           # the device name XLA reports
    memory_bytes: int          # device memory (the spec's device_memory_size)
    peak_bf16_flops: float     # dense bf16 tensor-core FLOP/s
    memory_bandwidth: float    # bytes/s
    compute_capability: tuple[int, int]


GPUS = {
    # NVIDIA H100 SXM5 datasheet: 989.4 dense bf16 TFLOP/s, 3.35 TB/s.
    "h100": GPU("h100", "NVIDIA H100 80GB HBM3", 84942979072, 989.4e12, 3.35232e12, (9, 0)),
    # H200 SXM: the H100's tensor cores, 141 GB at 4.8 TB/s.
    "h200": GPU("h200", "NVIDIA H200 141GB HBM3e", 151397597184, 989.4e12, 4.8e12, (9, 0)),
    # A100 SXM4 80GB: 312 dense bf16 TFLOP/s, 2.04 TB/s.
    "a100": GPU("a100", "NVIDIA A100-SXM4-80GB", 85100068864, 312e12, 2.03904e12, (8, 0)),
    # B200 (HGX B200 datasheet): 2.25 dense bf16 PFLOP/s (4.5 with sparsity), 7.7 TB/s.
    "b200": GPU("b200", "NVIDIA B200", 191514411008, 2250e12, 7.67232e12, (10, 0)),
}

PLUGIN_HINT = ('pip install "jt5[plan]" (jax\'s CUDA plugin at jax\'s version: '
               'jax-cuda13-plugin and jax-cuda13-pjrt; no CUDA libraries needed to compile)')


def gpu(name: str) -> GPU:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}: expected one of {', '.join(GPUS)}") from None


def target_config(name: str) -> str:
    """The ``GpuTargetConfigProto`` text of ``name`` (h100, h200, a100, b200)."""
    return (TARGETS_DIR / f"{gpu(name).name}.txtpb").read_text()


def _spec_int(name: str, field: str) -> int:
    m = re.search(rf"\b{field}: (\d+)", target_config(name))
    if m is None:
        raise ValueError(f"{TARGETS_DIR / (name + '.txtpb')} has no {field}")
    return int(m.group(1))


def core_count(name: str) -> int:
    """Streaming multiprocessors (the decode kernel's split-K sizes its grid by them)."""
    return _spec_int(name, "core_count")


def dnn_version(name: str) -> int:
    """cuDNN version of the target spec as jax encodes it (9.10.0 -> 91000)."""
    block = re.search(r"dnn_version_info \{([^}]*)\}", target_config(name))
    if block is None:
        raise ValueError(f"{TARGETS_DIR / (name + '.txtpb')} has no dnn_version_info")
    part = {k: int(v) for k, v in re.findall(r"(major|minor|patch): (\d+)", block.group(1))}
    return part.get("major", 0) * 10000 + part.get("minor", 0) * 100 + part.get("patch", 0)


def has_nvidia_device() -> bool:
    return os.path.exists("/dev/nvidiactl")


def cpu_unless_gpu() -> bool:
    """With jax's CUDA plugin installed and no NVIDIA device, point jax at the CPU
    (``JAX_PLATFORMS=cpu``) before it initialises a backend: otherwise the plugin prints a cuDNN
    traceback, then falls back to the CPU anyway. Deviceless compiles need no GPU backend.
    Leaves an explicit ``JAX_PLATFORMS`` alone; returns whether it set it. Call it before the
    first jax computation (later, it changes nothing)."""
    if "JAX_PLATFORMS" in os.environ or has_nvidia_device() or not has_plugin():
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:  # jax may be imported already; its config reads the variable only at import
        import sys
        if "jax" in sys.modules:
            sys.modules["jax"].config.update("jax_platforms", "cpu")
    except Exception:  # a backend is already up: nothing to change
        pass
    return True


def has_plugin() -> bool:
    """Whether jax's CUDA plugin (the GPU compiler) is installed, without importing it."""
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None
               for v in (13, 12))


@functools.lru_cache(maxsize=None)
def topology(name: str = "h100", *, hosts: int = 1, gpus_per_host: int = 1):
    """A jax ``TopologyDescription`` of ``hosts`` x ``gpus_per_host`` GPUs of kind ``name``:
    its ``devices`` build meshes that programs compile for (nothing runs)."""
    if hosts < 1 or gpus_per_host < 1:
        raise ValueError(f"{hosts=} and {gpus_per_host=} must be >= 1")
    if not has_plugin():
        raise ImportError(f"compiling for a GPU needs jax's CUDA plugin: {PLUGIN_HINT}")
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="cuda", target_config=target_config(name),
                                        topology=f"1x{hosts}x{gpus_per_host}")
