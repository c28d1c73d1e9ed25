"""A plan's figures, the one table ``jt5 plan`` prints, its JSON, and what to change when a job
does not fit."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

from jt5.plan.compile import Compiled, Target
from jt5.plan.jobs import Program

GiB = 2 ** 30
MFUS = (0.4, 0.6)


class Plan(NamedTuple):
    job: str
    what: str
    gpu: str
    devices: int
    target: str                   # "16 x NVIDIA H100 80GB HBM3 (8 per host x 2 hosts)"
    mesh: dict
    param_bytes: int              # all per device
    optimizer_bytes: int
    io_bytes: int                 # batch / prompts in, results out (not donated buffers)
    temp_bytes: int
    total_bytes: int
    device_memory_bytes: int
    memory_fraction: float        # of device memory jax's allocator may use
    fits: bool
    flops: float                  # per step (per call for generate / embed), all devices
    matmul_flops: float
    attention_flops: float
    step_seconds: dict            # MFU -> seconds at the GPU's dense bf16 peak
    decode_floor_seconds: Optional[float]   # generate: weights + caches read once per token
    kernels: int
    kernel_names: dict            # Pallas calls by kernel name
    cudnn_calls: int
    compile_seconds: float
    compile_cpu_seconds: float
    warnings: tuple
    fallback: Optional[str]       # why attention="auto" fell back to XLA, if it did
    advice: tuple

    @property
    def usable_bytes(self) -> int:
        return int(self.device_memory_bytes * self.memory_fraction)

    def to_json(self) -> dict:
        d = self._asdict()
        d.update(per_device_total_bytes=self.total_bytes, flops_per_step=self.flops,
                 usable_memory_bytes=self.usable_bytes,
                 step_seconds={f"{int(k * 100)}%": v for k, v in self.step_seconds.items()},
                 warnings=list(self.warnings), advice=list(self.advice))
        del d["total_bytes"], d["flops"]
        return d


def build(program: Program, compiled: Compiled, target: Target, *, memory_fraction: float,
          fallback: Optional[str] = None) -> Plan:
    c = compiled
    state = program.param_bytes + program.optimizer_bytes
    io = max(0, c.argument_bytes - state) + max(0, c.output_bytes - c.alias_bytes)
    total = c.total_bytes
    fits = total <= target.gpu.memory_bytes * memory_fraction
    peak = target.gpu.peak_bf16_flops * target.num_devices
    floor = None
    if program.decode_bytes:
        steps = _new_tokens(program)
        floor = steps * program.decode_bytes / target.gpu.memory_bandwidth
    plan = Plan(job=program.job, what=program.what, gpu=target.gpu.name,
                devices=target.num_devices, target=target.describe(), mesh=program.mesh,
                param_bytes=program.param_bytes, optimizer_bytes=program.optimizer_bytes,
                io_bytes=io, temp_bytes=c.temp_bytes + c.code_bytes, total_bytes=total,
                device_memory_bytes=target.gpu.memory_bytes, memory_fraction=memory_fraction,
                fits=fits, flops=program.flops.total, matmul_flops=program.flops.matmul,
                attention_flops=program.flops.attention,
                step_seconds={m: program.flops.total / (peak * m) for m in MFUS},
                decode_floor_seconds=floor, kernels=c.kernels, kernel_names=c.kernel_names,
                cudnn_calls=c.cudnn_calls,
                compile_seconds=c.compile_s, compile_cpu_seconds=c.compile_cpu_s,
                warnings=c.warnings, fallback=fallback, advice=())
    return plan._replace(advice=advise(plan, program))


def _new_tokens(program: Program) -> int:
    return int(program.knobs.get("new_tokens", 0)) or 1


def advise(plan: Plan, program: Program) -> tuple:
    """What to change, most effective first, when the job does not fit (or reshards)."""
    out = []
    k = program.knobs
    if plan.warnings:
        out.append("XLA reshards activations by replication (see the warnings): the sharding "
                   "rules (jt5/sharding.py) or the model's constraints need a fix for this mesh")
    if plan.fits:
        return tuple(out)
    need = plan.total_bytes - plan.usable_bytes
    out.append(f"needs {need / GiB:.1f} GiB more than the {plan.usable_bytes / GiB:.1f} GiB "
               f"usable per device")
    mesh = k.get("mesh") or {}
    state = plan.param_bytes + plan.optimizer_bytes
    if program.job in ("pretrain", "finetune"):
        n = k.get("devices", 1)
        if mesh and mesh.get("fsdp", 1) < n and state > need / 2:
            data = max(1, n // (mesh.get("fsdp", 1) * mesh.get("tensor", 1)))
            fsdp = mesh.get("fsdp", 1) * data
            out.append(f"more fsdp: --mesh data=1,fsdp={fsdp},tensor={mesh.get('tensor', 1)} "
                       f"splits parameters and optimizer state ({state / GiB:.1f} GiB per "
                       f"device now) {fsdp // max(1, mesh.get('fsdp', 1))}x further")
        if k.get("remat") == "none":
            out.append("--remat full: recompute each layer's activations in the backward pass "
                       f"(temporaries are {plan.temp_bytes / GiB:.1f} GiB)")
        elif k.get("remat") == "dots":
            out.append("--remat full instead of dots (saves the matmul outputs too)")
        b, accum = k.get("batch_size", 1), k.get("accum", 1)
        split = (mesh.get("data", 1) * mesh.get("fsdp", 1)) or 1
        if (b // accum) // split >= 2:
            out.append(f"--accum {accum * 2}: the same batch of {b} rows in {accum * 2} "
                       f"micro-batches (about half the activations), or a smaller --batch-size")
        if plan.optimizer_bytes > plan.param_bytes:
            out.append("--optimizer adafactor: factored second moments instead of AdamW's two "
                       "full-size moments")
    else:
        out.append(f"a smaller --batch-size (now {k.get('batch_size')}) or --length")
        if k.get("attention") != "pallas":
            out.append("--attention pallas: the kernels keep attention memory linear in length")
        if program.job == "generate":
            out.append("--mesh with fsdp or tensor over several GPUs splits the weights")
    return tuple(out)


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f}"


def _seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.1f} ms"


def format_table(plan: Plan) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in plan.mesh.items())
    usable = plan.usable_bytes
    share = plan.total_bytes / usable if usable else math.inf
    unit = "step" if plan.job in ("pretrain", "finetune") else "call"
    lines = [
        f"plan     {plan.what}",
        f"target   {plan.target}; mesh {mesh}",
        "per device                 GiB",
        f"  parameters          {_gib(plan.param_bytes)}",
        f"  optimizer state     {_gib(plan.optimizer_bytes)}",
        f"  inputs / outputs    {_gib(plan.io_bytes)}",
        f"  temporaries         {_gib(plan.temp_bytes)}",
        f"  total               {_gib(plan.total_bytes)}   of {plan.device_memory_bytes / GiB:.1f}"
        f" GiB; jax may use {usable / GiB:.1f} (XLA_PYTHON_CLIENT_MEM_FRACTION="
        f"{plan.memory_fraction:g})",
        f"fits     {'yes' if plan.fits else 'NO'} ({share:.0%} of the usable memory)",
        f"FLOPs    {plan.flops:.3e} per {unit} (matmul {plan.matmul_flops:.3e}, attention "
        f"{plan.attention_flops:.3e})",
        f"time     per {unit} at {plan.devices} x {_peak(plan)} TFLOP/s dense bf16: "
        + ", ".join(f"{_seconds(s)} at {m:.0%} MFU" for m, s in plan.step_seconds.items()),
    ]
    if plan.decode_floor_seconds is not None:
        lines.append(f"         memory-bound floor of the decode steps (weights and caches read "
                     f"per token): {_seconds(plan.decode_floor_seconds)}")
    cudnn = f", {plan.cudnn_calls} cuDNN attention calls" if plan.cudnn_calls else ""
    names = ", ".join(f"{k} {v}" for k, v in plan.kernel_names.items())
    lines.append(f"kernels  {plan.kernels} Pallas kernel calls" + (f" ({names})" if names else "")
                 + f"{cudnn}; compiled in {plan.compile_seconds:.1f} s")
    if plan.fallback:
        lines.append(f"fallback attention='auto' -> xla: the kernels did not compile "
                     f"({plan.fallback})")
    lines.append("warnings " + ("none" if not plan.warnings else f"{len(plan.warnings)}"))
    lines += [f"  {w}" for w in plan.warnings]
    if plan.advice:
        lines.append("to fit" if not plan.fits else "advice")
        lines += [f"  - {a}" for a in plan.advice]
    return "\n".join(lines)


def _peak(plan: Plan) -> str:
    from jt5.pallas_kernels.gpu_targets import gpu
    return f"{gpu(plan.gpu).peak_bf16_flops / 1e12:.0f}"
