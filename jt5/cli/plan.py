"""`jt5 plan`: compile a job for the GPUs it will run on, from any machine (no GPU needed)."""
from __future__ import annotations

import argparse
import json
import sys

from jt5.cli.common import POSITIVE, Parser, attention_impls, float_in

HELP = ("compile a job for GPUs this machine does not need to have: memory per device, whether "
        "it fits, FLOPs and step time")

JOBS = ("pretrain", "finetune", "generate", "embed")

EPILOG = """\
jt5 plan JOB takes JOB's own flags (see jt5 JOB --help) plus the target: --gpu, --hosts,
--gpus-per-host. It compiles the exact program the job would run (the jitted train step with its
optimizer update and shardings; the whole generation loop; the embedding encoder) with XLA's own
GPU compiler for that topology, reading only --model's config (no weights), and prints the bytes
per device (parameters, optimizer state, inputs/outputs, temporaries), whether they fit the
memory jax may use, the FLOPs per step with the step time at 40% and 60% MFU, and how many
Pallas kernels the program holds. Data, output and run-directory flags are accepted and unused.
Needs jax's CUDA plugin: pip install "jt5[plan]". Example:

  jt5 plan pretrain --model t5-v1_1-xxl --batch-size 256 --inputs-length 512 \\
      --targets-length 114 --optimizer adafactor --remat full --mesh data=2,fsdp=8 \\
      --gpu h100 --hosts 2 --gpus-per-host 8
"""


def _job(name: str):
    from jt5.cli import command
    return command(name)


def _relax(p: argparse.ArgumentParser) -> None:
    """The job's required inputs (data files, output paths, texts) mean nothing to a plan."""
    for action in p._actions:
        if action.dest == "model":
            continue
        if action.option_strings:
            action.required = False
        elif action.nargs is None:  # a positional such as embed's INPUT
            action.nargs, action.default = "?", None


def _add_target(p: argparse.ArgumentParser, job: str) -> None:
    from jt5.pallas_kernels.gpu_targets import GPUS
    flags = {s for a in p._actions for s in a.option_strings}
    g = p.add_argument_group("target (jt5 plan)")
    g.add_argument("--gpu", choices=tuple(GPUS), default="h100",
                   help="the GPU to compile for (XLA's published target specs; default h100)")
    g.add_argument("--hosts", type=POSITIVE, default=1, help="hosts (default 1)")
    g.add_argument("--gpus-per-host", type=POSITIVE, default=None,
                   help="GPUs per host (default: what --mesh asks for, else 1)")
    g.add_argument("--json", default=None, metavar="FILE",
                   help="also write the plan as JSON ('-': to stdout)")
    g.add_argument("--layers", type=POSITIVE, default=None,
                   help="encoder and decoder layers instead of the model's: a quick plan at full "
                        "width (per-layer memory extrapolates)")
    g.add_argument("--memory-fraction", type=float_in(0.0, 1.0, open_low=True), default=None,
                   help="share of device memory jax may use (default: "
                        "XLA_PYTHON_CLIENT_MEM_FRACTION, else jax's 0.75)")
    if job in ("generate", "embed"):
        g.add_argument("--length", type=POSITIVE, default=None,
                       help="input tokens per row (default: --max-length for embed, 512 for "
                            "generate)")
    if "--attention" not in flags:
        g.add_argument("--attention", choices=attention_impls(), default=None,
                       help="attention implementation (default: the model's, auto: the kernels)")


def add(p: argparse.ArgumentParser):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    sub = p.add_subparsers(dest="job", metavar="JOB", parser_class=Parser)
    for job in JOBS:
        text = f"plan `jt5 {job}` (takes its flags; see jt5 plan {job} --help)"
        q = sub.add_parser(job, help=text, description=text)
        _job(job).add(q)
        _relax(q)
        _add_target(q, job)


def _devices_per_host(args) -> int:
    if args.gpus_per_host is not None:
        return args.gpus_per_host
    mesh = getattr(args, "mesh", None)
    if mesh:
        from jt5.sharding import parse_mesh
        try:
            sizes = parse_mesh(mesh)
        except ValueError as e:
            raise ValueError(f"--mesh {mesh}: {e}") from e
        if all(n > 0 for n in sizes.values()):
            total = 1
            for n in sizes.values():
                total *= n
            if total % args.hosts:
                raise ValueError(f"--mesh {mesh} has {total} devices, not a multiple of "
                                 f"--hosts {args.hosts}")
            return total // args.hosts
    return 1


def run(args) -> int:
    from jt5 import plan

    if args.job is None:
        raise ValueError("name the job to plan: jt5 plan {pretrain,finetune,generate,embed} ...")
    plan.check_plugin()
    target = plan.target(args.gpu, hosts=args.hosts, gpus_per_host=_devices_per_host(args))
    common = dict(layers=args.layers, fraction=args.memory_fraction)
    if args.job in ("pretrain", "finetune"):
        result = plan.train(_job(args.job).config(args), target, job=args.job, **common)
    elif args.job == "generate":
        from jt5 import batch_generate as bg
        task = bg.TaskParams("", {})
        if args.task:
            task = bg.task_params(args.model, args.task)
        result = plan.generate(args.model, target, batch_size=args.batch_size,
                               length=args.length or 512, mesh=args.mesh, dtype=args.dtype,
                               attention=args.attention, weights=args.weights,
                               int8_compute=args.int8_compute,
                               quant_group_size=args.quant_group_size,
                               **_job("generate").options(args, task), **common)
    else:
        result = plan.embed(args.model, target, batch_size=args.batch_size,
                            length=args.length or args.max_length or 512,
                            pooling=args.pooling or "mean", dtype=args.dtype,
                            attention=args.attention, weights=args.weights,
                            int8_compute=args.int8_compute,
                            quant_group_size=args.quant_group_size, mesh=args.mesh, **common)
    print(plan.format_table(result), flush=True)
    if args.json:
        text = json.dumps(result.to_json(), indent=1) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0
