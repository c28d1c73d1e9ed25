"""UL2 pretraining throughput and model FLOPs utilisation (MFU), Pallas kernels vs XLA attention.

    python benchmarks/train.py                                # GPU: t5-v1_1-base, 512/114, bf16
    python benchmarks/train.py --preset tiny --steps 3        # CPU: tiny, xla only (the default)
    python benchmarks/train.py --attention pallas,xla --json out.json
    python benchmarks/train.py --preset t5-v1_1-small --peer transformers --steps 5   # CPU
    python benchmarks/train.py --preset t5-v1_1-xl --compile-only --remat full        # any machine

Each attention implementation runs the same jitted, donated train step of ``train/step.py``
(Adafactor by default, as T5 / UL2 pretraining, gradient clipping, z-loss) on the same real UL2
batches from ``train/data.py`` (packed, built before timing), over a mesh of all devices
(``--mesh``). Timed: ``--steps`` steps after ``--warmup`` untimed ones (the first compiles),
one ``block_until_ready`` at the end.

Model FLOPs per step: ``jt5.plan.flops.train_step`` (what ``jt5 plan`` counts; training = 3 x
forward, recomputation from ``--remat`` or inside the flash-attention backward *not* counted, as
MFU requires; attention over the visible query-key pairs, the decoder's causal half), over
*all* token slots (padding included: the device computes it). Not counted: norms, softmax,
bias, activations, optimizer. MFU = FLOPs/s
per device / ``--peak-tflops`` (default 989: H100 SXM dense bf16). CPU numbers are only a smoke
test: MFU against a GPU peak means nothing there, and the kernels run in interpret mode.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jt5  # noqa: E402
from jt5 import sharding  # noqa: E402
from jt5.plan.flops import train_step as train_step_flops  # noqa: E402
from jt5.train import step as step_lib  # noqa: E402
from jt5.train.data import FEATURES, DataConfig, Pipeline  # noqa: E402


def bench_one(cfg: jt5.T5Config, optim: step_lib.OptimConfig, mesh, batches: list, steps: int,
              warmup: int) -> dict:
    graphdef, abstract = nnx.split(jt5.abstract_model(cfg))
    param_sh = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh))
    tx = step_lib.make_optimizer(optim)

    def init():
        model = jt5.T5ForConditionalGeneration(cfg, rngs=nnx.Rngs(params=0))
        return step_lib.init_state(nnx.to_pure_dict(nnx.state(model)), tx, 0)

    abstract_state = jax.eval_shape(init)
    state_sh = step_lib.state_shardings(abstract_state, param_sh, tx, mesh)
    batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in FEATURES}
    state = jax.jit(init, out_shardings=state_sh)()
    placed = [{k: jax.make_array_from_process_local_data(batch_sh[k], v) for k, v in b.items()}
              for b in batches]
    with jax.set_mesh(mesh):
        train_step = jax.jit(step_lib.make_train_step(graphdef, optim, tx),
                             in_shardings=(state_sh, batch_sh),
                             out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)
        t0 = time.perf_counter()
        compiled = train_step.lower(state, placed[0]).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        for i in range(warmup):
            state, m = compiled(state, placed[i % len(placed)])
        jax.block_until_ready(state)
        order = [(warmup + i) % len(placed) for i in range(steps)]
        real = sum(int((batches[i]["encoder_segment_ids"] > 0).sum() +
                       (batches[i]["decoder_segment_ids"] > 0).sum()) for i in order)
        t0 = time.perf_counter()
        for i in order:
            state, m = compiled(state, placed[i])
        jax.block_until_ready(state)
        dt = (time.perf_counter() - t0) / steps
    loss = float(m["loss"])
    peak_bytes = None
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
        peak_bytes = stats.get("peak_bytes_in_use")
    except Exception:  # CPU backends have none
        pass
    return {"step_s": dt, "compile_s": compile_s, "loss": loss, "real_tokens": real / steps,
            "temp_bytes": getattr(mem, "temp_size_in_bytes", None), "peak_bytes": peak_bytes}


# -- against transformers' PyTorch model (CPU) -------------------------------------------------
def _real_tokens(batch) -> int:
    return int((batch["encoder_segment_ids"] > 0).sum() + (batch["decoder_segment_ids"] > 0).sum())


def _stats(times: list) -> dict:
    t = sorted(times)
    return {"min": t[0], "median": t[len(t) // 2], "max": t[-1]}


def peer_steps(cfg: jt5.T5Config, batches: list, steps: int, warmup: int, lr: float) -> dict:
    """The same train step in transformers' PyTorch T5 (same weights, loss, AdamW, clipping):
    per-step seconds and the first step's loss. Unpacked batches only: transformers' T5 has no
    segment ids, so a packed row would attend across its examples."""
    import tempfile

    import numpy as np
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        jt5.init_model(cfg.replace(dtype="float32", param_dtype="float32")).save_pretrained(tmp)
        model = transformers.T5ForConditionalGeneration.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager")
    model.train()
    for m in model.modules():  # jt5's presets train without dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=0.0)

    def step(b):
        enc, dec = (torch.from_numpy(np.asarray(b[k], np.int64)) for k in
                    ("encoder_input_tokens", "decoder_input_tokens"))
        labels = torch.from_numpy(np.where(b["decoder_loss_weights"] > 0,
                                           b["decoder_target_tokens"], -100).astype(np.int64))
        out = model(input_ids=enc, attention_mask=torch.from_numpy(
                        (b["encoder_segment_ids"] > 0).astype(np.int64)),
                    decoder_input_ids=dec, decoder_attention_mask=torch.from_numpy(
                        (b["decoder_segment_ids"] > 0).astype(np.int64)), labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(out.loss)

    first = step(batches[0])
    for i in range(1, warmup):
        step(batches[i % len(batches)])
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(batches[(warmup + i) % len(batches)])
        times.append(time.perf_counter() - t0)
    return {"times": times, "first_loss": first}


def jt5_steps(cfg: jt5.T5Config, optim: step_lib.OptimConfig, batches: list, steps: int,
              warmup: int) -> dict:
    """jt5's jitted, donated train step on one device: per-step seconds and the first loss."""
    graphdef, state = nnx.split(jt5.init_model(cfg))
    tx = step_lib.make_optimizer(optim)
    st = step_lib.init_state(nnx.to_pure_dict(state), tx, 0)
    train_step = jax.jit(step_lib.make_train_step(graphdef, optim, tx), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = train_step.lower(st, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    st, m = compiled(st, batches[0])
    first = float(m["loss"])
    for i in range(1, warmup):
        st, m = compiled(st, batches[i % len(batches)])
    jax.block_until_ready(st)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        st, m = compiled(st, batches[(warmup + i) % len(batches)])
        jax.block_until_ready(st)
        times.append(time.perf_counter() - t0)
    return {"times": times, "first_loss": first, "compile_s": compile_s}


def versus_transformers(args) -> list:
    """``--peer transformers``: jt5 and transformers on the same unpacked UL2 batches (and jt5 on
    packed ones, ``min_chunk=0.1``), AdamW, float32, one CPU process; tokens/s count
    non-padding tokens only."""
    import torch

    B = args.batch_size or 8
    S, T = args.inputs_length or 128, args.targets_length or 32
    n = max(2, args.steps + args.warmup)
    make = {pack: Pipeline(DataConfig(inputs_length=S, targets_length=T, batch_size=B, pack=pack,
                                      seed=1, min_chunk=0.1 if pack else 1.0))
            for pack in (False, True)}
    batches = {pack: [make[pack].batch(i) for i in range(n)] for pack in make}
    cfg = jt5.preset(args.preset, dtype="float32", param_dtype="float32", attention="xla")
    lr = 1e-3
    optim = step_lib.OptimConfig(optimizer="adamw", lr=lr, warmup_steps=0, schedule="constant",
                                 total_steps=1000, z_loss=0.0, clip=1.0, b1=0.9, b2=0.99)
    runs = [("jt5", False, jt5_steps(cfg, optim, batches[False], args.steps, args.warmup)),
            ("transformers", False, peer_steps(cfg, batches[False], args.steps, args.warmup, lr)),
            ("jt5", True, jt5_steps(cfg, optim, batches[True], args.steps, args.warmup))]
    rows = []
    for name, packed, r in runs:
        order = [batches[packed][(args.warmup + i) % n] for i in range(args.steps)]
        real = sum(_real_tokens(b) for b in order) / args.steps
        st = _stats(r["times"])
        rows.append(dict(impl=name, packed=packed, preset=args.preset, batch=B, inputs_length=S,
                         targets_length=T, real_tokens_per_step=real,
                         step_s=st, real_tokens_per_s={k: real / v for k, v in st.items()},
                         first_loss=r["first_loss"], compile_s=r.get("compile_s")))
    print(f"UL2 train step (forward, backward, AdamW, clip 1.0), {args.preset} float32, B={B} "
          f"S={S} T={T}, 1 CPU process ({torch.get_num_threads()} torch threads); "
          f"{args.steps} timed steps after {args.warmup}; tokens/s count non-padding tokens")
    print(f"{'impl':>13} {'packed':>6} {'real tok/step':>13} {'step s min/med/max':>22} "
          f"{'real tok/s (median)':>19} {'first loss':>10}")
    for r in rows:
        s = r["step_s"]
        print(f"{r['impl']:>13} {str(r['packed']):>6} {r['real_tokens_per_step']:13.0f} "
              f"{s['min']:6.3f}/{s['median']:6.3f}/{s['max']:6.3f} "
              f"{r['real_tokens_per_s']['median']:19.0f} {r['first_loss']:10.4f}")
    base = rows[1]["real_tokens_per_s"]["median"]
    print(f"jt5 / transformers per real token (median): same batch "
          f"{rows[0]['real_tokens_per_s']['median'] / base:.2f}x, jt5 packed "
          f"{rows[2]['real_tokens_per_s']['median'] / base:.2f}x; first-step loss |jt5 - "
          f"transformers| = {abs(rows[0]['first_loss'] - rows[1]['first_loss']):.2e}")
    return rows


# -- compile time with and without the layer scan ---------------------------------------------
def compile_times(args) -> list:
    """``--compile-only``: lower + compile the full-width train step on this machine's first
    device from abstract shapes (nothing allocated: xxl fits), unrolled and scanned."""
    B = args.batch_size or 8
    S, T = args.inputs_length or 512, args.targets_length or 114
    optim = step_lib.OptimConfig(optimizer=args.optimizer, warmup_steps=1, total_steps=1000)
    tx = step_lib.make_optimizer(optim)
    batch = {k: jax.ShapeDtypeStruct((B, S if k.startswith("encoder") else T),
                                     "float32" if k == "decoder_loss_weights" else "int32")
             for k in FEATURES}
    rows = []
    for scan in (False, True):
        cfg = jt5.preset(args.preset, dtype=args.dtype, param_dtype="float32", remat=args.remat,
                         attention="xla", scan_layers=scan)
        graphdef, abstract = nnx.split(jt5.abstract_model(cfg))
        state = jax.eval_shape(lambda p: step_lib.init_state(p, tx, 0), nnx.to_pure_dict(abstract))
        step = jax.jit(step_lib.make_train_step(graphdef, optim, tx), donate_argnums=0)
        t0 = time.perf_counter()
        lowered = step.lower(state, batch)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        rows.append(dict(preset=args.preset, scan_layers=scan, remat=args.remat, batch=B,
                         inputs_length=S, targets_length=T, lower_s=t1 - t0, compile_s=t2 - t1,
                         hlo_chars=len(lowered.as_text())))
        print(f"{args.preset} scan_layers={scan} remat={args.remat}: lower {t1 - t0:.1f} s, "
              f"compile {t2 - t1:.1f} s (StableHLO {rows[-1]['hlo_chars'] / 1e6:.1f} M chars)",
              flush=True)
    print(f"scan / unrolled, lower + compile: "
          f"{(rows[1]['lower_s'] + rows[1]['compile_s']) / (rows[0]['lower_s'] + rows[0]['compile_s']):.2f}x")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="t5-v1_1-base", help="jt5 preset (default t5-v1_1-base)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global rows per step (default: 64 on GPU, 8 on CPU)")
    p.add_argument("--inputs-length", type=int, default=None, help="default 512 (CPU: 128)")
    p.add_argument("--targets-length", type=int, default=None, help="default 114 (CPU: 32)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (params float32)")
    p.add_argument("--attention", default=None,
                   help="comma list (default: pallas,xla on GPU; xla on CPU, where the kernels "
                        "would run in the slow interpret mode)")
    p.add_argument("--optimizer", choices=("adafactor", "adamw"), default="adafactor")
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    p.add_argument("--mesh", default=None, help="e.g. data=4,fsdp=2 (default: all on data)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="per-device peak for MFU (default 989: H100 SXM dense bf16)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON ('-': stdout)")
    p.add_argument("--peer", choices=("transformers",), default=None,
                   help="time transformers' PyTorch model on the same batches and optimizer "
                        "(CPU; defaults then: B=8, 128/32, AdamW, float32)")
    p.add_argument("--compile-only", action="store_true",
                   help="only time lowering + compiling the train step, unrolled and with "
                        "--scan-layers (abstract shapes: any preset fits; default 8 x 512/114)")
    args = p.parse_args(argv)
    if args.compile_only:
        rows = compile_times(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        return rows
    if args.peer:
        rows = versus_transformers(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        return rows

    on_cpu = jax.default_backend() == "cpu"
    B = args.batch_size or (8 if on_cpu else 64)
    S = args.inputs_length or (128 if on_cpu else 512)
    T = args.targets_length or (32 if on_cpu else 114)
    impls = (args.attention or ("xla" if on_cpu else "pallas,xla")).split(",")
    mesh = sharding.make_mesh(args.mesh)
    data = Pipeline(DataConfig(inputs_length=S, targets_length=T, batch_size=B),
                    process_index=jax.process_index(), process_count=jax.process_count())
    batches = [data.batch(i) for i in range(max(2, min(args.steps + args.warmup, 8)))]
    base = jt5.preset(args.preset, dtype=args.dtype, param_dtype="float32", remat=args.remat)
    if base.vocab_size < data.vocab_size:
        base = base.replace(vocab_size=data.vocab_size)
    optim = step_lib.OptimConfig(optimizer=args.optimizer, warmup_steps=1, total_steps=1000)
    flops = train_step_flops(base, B, S, T)
    n_dev = jax.device_count()
    device = jax.devices()[0].device_kind
    rows = []
    for impl in impls:
        r = bench_one(base.replace(attention=impl), optim, mesh, batches, args.steps, args.warmup)
        slots = B * (S + T)
        tflops = flops.total / r["step_s"] / n_dev / 1e12
        rows.append(dict(attention=impl, preset=args.preset, device=device, devices=n_dev,
                         mesh=dict(mesh.shape), batch=B, inputs_length=S, targets_length=T,
                         dtype=args.dtype, optimizer=args.optimizer, remat=args.remat,
                         step_ms=r["step_s"] * 1e3, tokens_per_s=slots / r["step_s"],
                         real_tokens_per_s=r["real_tokens"] / r["step_s"],
                         model_tflops_per_step=flops.total / 1e12,
                         attention_flops_share=flops.attention / flops.total,
                         tflops_per_device=tflops, mfu=tflops / args.peak_tflops,
                         compile_s=r["compile_s"], loss=r["loss"], temp_bytes=r["temp_bytes"],
                         peak_bytes=r["peak_bytes"]))
    print(f"UL2 train step, {args.preset} ({base.dtype} compute, float32 params, {args.optimizer}), "
          f"B={B} S={S} T={T}, {n_dev} x {device}, mesh {dict(mesh.shape)}; "
          f"model FLOPs/step {flops.total / 1e12:.3f} T ({100 * flops.attention / flops.total:.1f}% attention)")
    head = f"{'attention':>9} {'step ms':>9} {'tokens/s':>11} {'real tok/s':>11} {'TFLOP/s/dev':>11} {'MFU':>7} {'compile s':>9} {'loss':>7}"
    print(head)
    for r in rows:
        print(f"{r['attention']:>9} {r['step_ms']:9.1f} {r['tokens_per_s']:11.0f} "
              f"{r['real_tokens_per_s']:11.0f} {r['tflops_per_device']:11.3f} {100 * r['mfu']:6.2f}% "
              f"{r['compile_s']:9.1f} {r['loss']:7.3f}")
    if len(rows) > 1:
        print(f"speed-up {rows[0]['attention']} / {rows[1]['attention']}: "
              f"{rows[1]['step_ms'] / rows[0]['step_ms']:.2f}x")
    if on_cpu:
        print(f"(CPU: a smoke test; MFU against a {args.peak_tflops:g} TFLOP/s GPU peak is meaningless here)")
    if args.json:
        text = json.dumps(rows, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return rows


if __name__ == "__main__":
    main()
