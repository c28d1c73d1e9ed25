"""Weight-only int8 / fp8 encoder: accuracy vs float32, weight memory and CPU speed, in one run.

    python benchmarks/encoder_quant.py                      # T5 v1.1 XXL widths, 2 layers, 512 tokens
    python benchmarks/encoder_quant.py --d-model 512 --d-ff 1024 --heads 8 --json out.json

One random-weight transformers ``T5EncoderModel`` (T5 v1.1: gated-GELU; default widths of T5-XXL,
d_model 4096, d_ff 10240, 64 heads of 64, with ``--layers`` layers; layer-norm scales ~1 +- 0.2;
built by ``bf16_accuracy.py``) is the float32 reference. jt5 then loads the same directory as
float32, bfloat16, and with its matmul weights quantised at load (``weights="int8" | "fp8"``):
all four layer kinds (the default), and each kind alone (which kinds can be quantised without
losing accuracy); int8 and fp8 also with group-wise scales (``quant_group_size``, one scale
per ``--group-size`` inputs of each output channel, default 128; 0: no such rows). Printed per
row: quantiles of ``|out - transformers float32|`` over every output element, the bytes of the
encoder's weights (scales included; the embedding table excluded: it is the same in every row),
and the time of one forward (min / median / max of ``--repeats`` after a warm-up; CPU: only
ratios within this run mean anything); transformers' float32 and bfloat16 forwards are timed
beside them.

    python benchmarks/encoder_quant.py --speed --preset t5-v1_1-xxl --batch 1,4,16   # a GPU

``--speed``: the whole encoder of a preset (random init, no checkpoint), ``--dtype`` compute,
float vs int8 vs fp8 weights, ``--length`` tokens, each batch size: forward time min / median /
max, tokens/s and the weight bytes (``benchmarks/gpu.sh`` runs it for T5-XXL).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/generate.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

QUANTILES = (0.5, 0.99, 0.999, 0.9999, 1.0)
KINDS = ("mlp_in", "mlp_out", "attn_qkv", "attn_out")


def _times(fn, repeats):
    fn()  # warm-up (compile)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return dict(min=min(out), median=statistics.median(out), max=max(out))


def jt5_row(model_dir, ids, ref, *, dtype, weights, kinds, repeats, int8_compute=False,
            group=None):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jt5
    from jt5 import quant
    enc = jt5.T5EncoderModel.from_pretrained(model_dir, dtype=dtype, attention="xla",
                                             weights=weights, quantized=kinds,
                                             int8_compute=int8_compute or None,
                                             quant_group_size=group)
    fwd = nnx.jit(lambda m, x: m(x))
    x = jnp.asarray(ids, jnp.int32)
    y = np.asarray(jax.block_until_ready(fwd(enc, x)), np.float64)
    err = np.abs(y - ref)
    layers = quant.weight_bytes(enc) - enc.shared.embedding[...].nbytes
    times = _times(lambda: jax.block_until_ready(fwd(enc, x)), repeats) if repeats else None
    return dict(quantiles=dict(zip(map(str, QUANTILES), np.quantile(err, QUANTILES).tolist())),
                weight_bytes=int(layers), times=times)


def hf_times(model_dir, ids, dtype, repeats):
    import torch
    from transformers import T5EncoderModel
    model = T5EncoderModel.from_pretrained(model_dir).eval().to(getattr(torch, dtype))
    t = torch.as_tensor(ids)
    with torch.inference_mode():
        return _times(lambda: model(input_ids=t).last_hidden_state, repeats)


def speed(args) -> list:
    """Forward time of ``args.preset``'s whole encoder for each weights format and batch size."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jt5
    from jt5 import quant
    print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.preset} encoder, "
          f"{args.dtype}, {args.length} tokens, attention {args.attention}")
    print("| weights | batch | ms min / median / max | tokens/s | weight GB |")
    print("|---|---|---|---|---|")
    rows = []
    for weights in args.weights.split(","):
        cfg = jt5.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype,
                         attention=args.attention, weights=weights)
        enc = jt5.init_model(cfg, jt5.T5EncoderModel)
        fwd = nnx.jit(lambda m, x: m(x))
        for batch in [int(b) for b in args.batch.split(",")]:
            x = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size,
                                                              (batch, args.length)), jnp.int32)
            t = _times(lambda: jax.block_until_ready(fwd(enc, x)), args.repeats)
            row = dict(weights=weights, batch=batch, ms={k: v * 1e3 for k, v in t.items()},
                       tokens_per_s=batch * args.length / t["median"],
                       weight_bytes=quant.weight_bytes(enc))
            rows.append(row)
            print(f"| {weights} | {batch} | {row['ms']['min']:.2f} / {row['ms']['median']:.2f} / "
                  f"{row['ms']['max']:.2f} | {row['tokens_per_s']:.0f} | "
                  f"{row['weight_bytes'] / 1e9:.2f} |", flush=True)
        del enc
    return rows


def main(argv=None) -> int:
    from bf16_accuracy import add_model_args
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)  # the encoder bf16_accuracy.py builds (its shape flags, --length)
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per timed row")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-per-kind", action="store_true", help="skip the one-kind-at-a-time rows")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' timing rows")
    p.add_argument("--group-size", type=int, default=128,
                   help="the int8 / fp8 rows again with one scale per this many inputs of each "
                        "output channel (quant_group_size; default 128; 0: none)")
    p.add_argument("--rows", default=None,
                   help="only the rows whose label contains one of these, comma-separated")
    p.add_argument("--json", default=None)
    p.add_argument("--speed", action="store_true",
                   help="time a preset's whole encoder per weights format and batch instead")
    p.add_argument("--preset", default="t5-v1_1-xxl", help="(--speed) jt5 preset")
    p.add_argument("--batch", default="1,4,16", help="(--speed) batch sizes")
    p.add_argument("--weights", default="float,int8,fp8", help="(--speed) weight formats")
    p.add_argument("--dtype", default="bfloat16", help="(--speed) compute dtype")
    p.add_argument("--attention", default="auto", help="(--speed) attention implementation")
    args = p.parse_args(argv)
    if args.speed:
        rows = speed(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0

    import jax
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    from bf16_accuracy import _build, _ids

    # (label, compute dtype, weights, kinds, timed, group size)
    g = args.group_size or None
    rows = [("float32", "float32", None, (), True, None),
            ("bfloat16", "bfloat16", None, (), True, None),
            ("int8 (f32 compute)", "float32", "int8", (), True, None),
            ("int8 (bf16 compute)", "bfloat16", "int8", (), True, None),
            ("int8 + int8 activations (int8_compute)", "bfloat16", "int8-act", (), True, None),
            ("fp8 (f32 compute)", "float32", "fp8", (), True, None),
            ("fp8 (bf16 compute)", "bfloat16", "fp8", (), True, None)]
    if g:
        rows += [(f"{fmt} group {g} ({c} compute)", dtype, fmt, (), True, g)
                 for fmt in ("int8", "fp8") for c, dtype in (("f32", "float32"),
                                                             ("bf16", "bfloat16"))]
    if not args.no_per_kind:
        rows += [(f"{fmt} {kind} only (bf16 compute)", "bfloat16", fmt, (kind,), False, None)
                 for fmt in ("int8", "fp8") for kind in KINDS]
        if g:
            rows += [(f"int8 group {g} {kind} only (bf16 compute)", "bfloat16", "int8", (kind,),
                      False, g) for kind in KINDS]
    if args.rows:
        rows = [r for r in rows if any(s in r[0] for s in args.rows.split(","))]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        ref = _build(model_dir, args).astype(np.float64)
        ids = _ids(args.length, args.vocab)
        print(f"# jax {jax.__version__}, torch {torch.__version__} ({args.threads} threads); T5 "
              f"v1.1 encoder d_model {args.d_model}, d_ff {args.d_ff}, {args.heads} heads, "
              f"{args.layers} layers, {args.length} tokens, batch 1; |out - transformers "
              f"float32|, max|ref| = {np.max(np.abs(ref)):.3g}")
        print("| run | p50 | p99 | p99.9 | p99.99 | max | layer weights MB | s min / median / "
              "max |")
        print("|---|---|---|---|---|---|---|---|")
        for label, dtype, weights, kinds, timed, group in rows:
            act = weights == "int8-act"
            weights = "int8" if act else weights
            r = jt5_row(model_dir, ids, ref, dtype=dtype, weights=weights, kinds=kinds,
                        repeats=args.repeats if timed else 0, int8_compute=act, group=group)
            r.update(run=f"jt5 {label}", dtype=dtype, weights=weights or "float",
                     kinds=list(kinds), quant_group_size=group)
            out.append(r)
            q = " | ".join(f"{v:.3e}" for v in r["quantiles"].values())
            t = ("" if r["times"] is None else
                 " / ".join(f"{r['times'][k]:.2f}" for k in ("min", "median", "max")))
            print(f"| jt5 {label} | {q} | {r['weight_bytes'] / 1e6:.0f} | {t} |", flush=True)
        if not args.no_hf:
            for dtype in ("float32", "bfloat16"):
                t = hf_times(model_dir, ids, dtype, args.repeats)
                out.append(dict(run=f"transformers {dtype}", times=t))
                print(f"| transformers {dtype} | | | | | | | "
                      f"{t['min']:.2f} / {t['median']:.2f} / {t['max']:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
