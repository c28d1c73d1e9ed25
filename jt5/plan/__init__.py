"""``jt5 plan``: compile a jt5 job for the GPUs it will run on, from any machine, and say whether
it fits and what a step costs — before renting them.

    from jt5 import plan
    gpus = plan.target("h100", hosts=2, gpus_per_host=8)       # 16 H100s on 2 hosts
    result = plan.train(LoopConfig(model="t5-v1_1-xxl", batch_size=256, mesh="data=2,fsdp=8",
                                   inputs_length=512, targets_length=114, remat="full",
                                   optim=OptimConfig(optimizer="adafactor")), gpus)
    print(plan.format_table(result)); result.fits, result.total_bytes

The program compiled is the job's own (``jobs.py``): the jitted train step with its optimizer
update and shardings, the whole generation loop, the embedding encoder; XLA's GPU compiler
(jax's CUDA plugin, no GPU or CUDA libraries needed: ``pip install "jt5[plan]"``) compiles it
for the target topology and reports its memory per device (``compile.py``); FLOPs are counted
from the shapes (``flops.py``); ``report.py`` prints the table and the advice.
"""
from __future__ import annotations

from typing import Callable, Optional

from jt5.plan import jobs
from jt5.plan.compile import (RESHARDING_WARNING, Compiled, Target, check_plugin,  # noqa: F401
                              compile_lowered, memory_fraction, target)
from jt5.plan.report import Plan, format_table  # noqa: F401

__all__ = ["target", "Target", "Plan", "train", "generate", "embed", "make_plan", "format_table",
           "check_plugin", "compile_lowered", "Compiled", "memory_fraction",
           "RESHARDING_WARNING"]


def make_plan(build: Callable[[Optional[str]], jobs.Program], gpus: Target, *,
              auto: bool, fraction: Optional[float] = None) -> Plan:
    """Build (``build(attention_override)``) and compile a job's program for ``gpus``.

    ``auto``: the job asked for ``attention="auto"``, which on the GPUs takes the kernels
    unless their probe fails to compile there (``jt5.attention_ops.kernel_failure``, the job's
    own safety net): then the plan compiles the XLA path, as the job would run it, and says
    why. Any other compile error is the plan's answer and propagates."""
    from jt5.attention_ops import kernel_failure

    check_plugin()
    program = build(None)
    fallback = None
    if auto and program.config.attention == "pallas":
        fallback = kernel_failure(gpus.devices[0])
        if fallback:
            program = build("xla")
    compiled = compile_lowered(program.lower, gpus)
    from jt5.plan import report
    return report.build(program, compiled, gpus, memory_fraction=memory_fraction(fraction),
                        fallback=fallback)


def train(cfg, gpus: Target, *, job: str = "pretrain", layers: Optional[int] = None,
          fraction: Optional[float] = None) -> Plan:
    """Plan of ``jt5 pretrain`` / ``jt5 finetune`` with ``cfg`` (``LoopConfig`` /
    ``FinetuneConfig``)."""
    import dataclasses

    def build(attention):
        c = cfg if attention is None else dataclasses.replace(cfg, attention=attention)
        return jobs.train(c, gpus, job=job, layers=layers)
    return make_plan(build, gpus, auto=cfg.attention == "auto", fraction=fraction)


def generate(model, gpus: Target, *, batch_size: int = 16, length: int = 512,
             mesh: Optional[str] = None, dtype: Optional[str] = None,
             attention: Optional[str] = None, layers: Optional[int] = None,
             weights: Optional[str] = None, int8_compute: Optional[bool] = None,
             quant_group_size: Optional[int] = None, fraction: Optional[float] = None,
             **options) -> Plan:
    """Plan of ``jt5 generate`` over ``batch_size`` prompts of ``length`` tokens; ``options``:
    generation settings (``num_beams``, ``max_new_tokens``, ... as ``jt5.generate``)."""
    def build(override):
        return jobs.generate(model, gpus, batch_size=batch_size, length=length, mesh=mesh,
                             dtype=dtype, attention=override or attention, options=options,
                             layers=layers, weights=weights, int8_compute=int8_compute,
                             quant_group_size=quant_group_size)
    auto = attention in (None, "auto") and jobs.base_config(model).attention == "auto"
    return make_plan(build, gpus, auto=auto, fraction=fraction)


def embed(model, gpus: Target, *, batch_size: int = 32, length: int = 512,
          pooling: str = "mean", dtype: Optional[str] = None, attention: Optional[str] = None,
          layers: Optional[int] = None, weights: Optional[str] = None,
          int8_compute: Optional[bool] = None, quant_group_size: Optional[int] = None,
          mesh: Optional[str] = None, fraction: Optional[float] = None) -> Plan:
    """Plan of ``jt5 embed``: the encoder and pooling over ``batch_size`` rows of ``length``."""
    def build(override):
        return jobs.embed(model, gpus, batch_size=batch_size, length=length, pooling=pooling,
                          dtype=dtype, attention=override or attention, layers=layers,
                          weights=weights, int8_compute=int8_compute,
                          quant_group_size=quant_group_size, mesh=mesh)
    auto = attention in (None, "auto") and jobs.base_config(model).attention == "auto"
    return make_plan(build, gpus, auto=auto, fraction=fraction)
