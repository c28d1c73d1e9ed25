"""`jt5 plan`'s prediction beside what a GPU measured, for the jobs benchmarks/gpu.sh ran.

    python benchmarks/plan_check.py OUT_DIR [--gpu h100] [--encoder-model t5-base ...]

Reads OUT_DIR/train.json (benchmarks/train.py) and OUT_DIR/long_encoder.json
(benchmarks/long_encoder.py --in-process), plans each row's program for the GPU that ran it
(``--gpu``, default: from the device name in train.json, else h100) and writes
OUT_DIR/plan_check.json and plan_check.md: the plan's temporaries and per-device total beside
the temporaries of the program compiled on the GPU and the allocator's peak. The first time a
GPU runs gpu.sh, this is the check of the plan against reality. The encoder rows do not record
their model, so the flags name it as gpu.sh ran it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GiB = 2 ** 30
_KINDS = {"h100": "h100", "h200": "h200", "a100": "a100", "b200": "b200"}


def _gpu_of(device: str) -> str:
    low = device.lower()
    return next((k for k in _KINDS if k in low), "h100")


def _encoder_config(model: str, impl: str, args):
    from jt5.config import preset
    cfg = preset(model)
    if impl == "jt5-local":
        return cfg.replace(encoder_attention_type="local", local_radius=args.local_radius)
    if impl == "jt5-tglobal":  # a T5 checkpoint loaded with transient-global is a LongT5
        return cfg.replace(model_type="longt5", encoder_attention_type="transient-global",
                           local_radius=args.local_radius,
                           global_block_size=args.global_block_size)
    return cfg


def _gib(x) -> str:
    return "" if x is None else f"{x / GiB:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="gpu.sh's output folder")
    p.add_argument("--gpu", default=None, help="h100 | h200 | a100 | b200 (default: detected)")
    p.add_argument("--encoder-model", default="t5-base")
    p.add_argument("--encoder-dtype", default="bfloat16")
    p.add_argument("--encoder-attention", default="pallas")
    p.add_argument("--local-radius", type=int, default=127)
    p.add_argument("--global-block-size", type=int, default=16)
    args = p.parse_args(argv)
    from jt5 import plan
    from jt5.pallas_kernels import gpu_targets
    from jt5.train.loop import LoopConfig
    from jt5.train.step import OptimConfig

    out = Path(args.out)
    if not gpu_targets.has_plugin():
        print(f"plan_check: no GPU compiler here ({gpu_targets.PLUGIN_HINT}); nothing checked")
        return 0
    train = json.loads((out / "train.json").read_text()) if (out / "train.json").exists() else []
    enc = (json.loads((out / "long_encoder.json").read_text())
           if (out / "long_encoder.json").exists() else [])
    gpu = args.gpu or _gpu_of(train[0]["device"] if train else "")
    rows = []

    def write(row):  # after every row: a step timeout keeps the rows so far
        rows.append(row)
        (out / "plan_check.json").write_text(json.dumps({"gpu": gpu, "rows": rows}, indent=1))
        md = [f"jt5 plan for {gpu} beside the GPU's own compile and its allocator peak (GiB; "
              "the peak is the process's so far, so it never falls between rows)", "",
              "| job | shape | plan temp | GPU compile temp | plan total | device peak |",
              "|---|---|---|---|---|---|"]
        md += [f"| {r['job']} | {r['shape']} | {_gib(r['plan_temp'])} | "
               f"{_gib(r['measured_temp'])} | {_gib(r['plan_total'])} | "
               f"{_gib(r['measured_peak'])} |" for r in rows]
        (out / "plan_check.md").write_text("\n".join(md) + "\n")
        print(md[-1], flush=True)

    for r in enc:  # the cheap compiles first
        if "failed" in r:
            continue
        cfg = _encoder_config(args.encoder_model, r["impl"], args)
        result = plan.embed(cfg, plan.target(gpu), batch_size=1, length=r["length"],
                            pooling="first", dtype=args.encoder_dtype,
                            attention=args.encoder_attention)
        mib = {k: None if r.get(k) is None else r[k] * 2**20 for k in ("temp_mb", "device_peak_mb")}
        write(dict(job=f"encoder {args.encoder_model} {r['impl']}", shape=f"1 x {r['length']}",
                   plan_temp=result.temp_bytes, plan_total=result.total_bytes,
                   measured_temp=mib["temp_mb"], measured_peak=mib["device_peak_mb"]))
    for r in train:
        n = r.get("devices", 1)
        cfg = LoopConfig(model=r["preset"], batch_size=r["batch"], inputs_length=r["inputs_length"],
                         targets_length=r["targets_length"], dtype=r["dtype"],
                         attention=r["attention"], remat=r.get("remat", "none"),
                         mesh=",".join(f"{k}={v}" for k, v in r["mesh"].items()),
                         optim=OptimConfig(optimizer=r["optimizer"]))
        result = plan.train(cfg, plan.target(gpu, gpus_per_host=n))
        write(dict(job=f"train {r['preset']} {r['attention']}",
                   shape=f"{r['batch']} x {r['inputs_length']}/{r['targets_length']}",
                   plan_temp=result.temp_bytes, plan_total=result.total_bytes,
                   measured_temp=r.get("temp_bytes"), measured_peak=r.get("peak_bytes")))
    if not rows:
        print("plan_check: no rows in train.json / long_encoder.json")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
