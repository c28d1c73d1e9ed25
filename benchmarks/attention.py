"""Attention speed and memory: jt5 flash (in-kernel T5 bias) against its peers, one table.

    python benchmarks/attention.py                      # GPU: T=S in 512, 2k, 8k, 32k, bf16
    python benchmarks/attention.py --cpu-small          # CPU (default without a GPU): tiny
    python benchmarks/attention.py --json out.json --lengths 512,2048 --modes encoder
    python benchmarks/attention.py --encoder t5-base --lengths 512,8192 --markdown enc.md
    python benchmarks/attention.py --mosaic --head-dim 64,128 --json mosaic.json  # Hopper

Peers, each run in the same process on the same inputs:
- ``xla_ref``: ``jt5.pallas_kernels.reference.attention_reference`` (dense [1,N,T,S] bias + mask);
- ``dpa_xla`` / ``dpa_cudnn``: ``jax.nn.dot_product_attention`` with the dense bias
  (implementation None resp. "cudnn"; cuDNN only on a GPU);
- ``pallas_mha``: jax's own Pallas ``mha`` with no bias at all: a ceiling, not a peer.

``--mosaic`` first checks the Mosaic GPU kernels (``jt5_mosaic``) against the float32 reference
at three shapes (output, lse, every gradient; tolerances of ``tests/conftest.py``), with the
other Mosaic lowering semantics if the pinned one fails (jax 0.11 changed the default), then
times them beside ``jt5_flash`` (the Triton kernels), ``mgpu_fa3`` (jax's own FA3-style Mosaic
kernel, no bias, float16: the ceiling) and ``dpa_cudnn`` (cuDNN with the dense bias). Rows are
written as they come (a timeout keeps what was measured).

``--encoder PRESET`` times a whole T5 encoder forward instead (random weights): jt5 with the
Pallas kernels and with XLA attention against transformers' PyTorch T5 with
``attn_implementation="sdpa"`` on the same device and inputs (bf16 by default on a GPU).

FLOPs (docs/design.md): forward ``4*B*N*T*S*H`` (half that causal), backward 2.5x forward. The
"floor" row is those FLOPs at the device's dense bf16 peak. Memory is the compiled program's
temporary buffer size (``memory_analysis``) of the fwd+bwd program; on a GPU the process'
peak is printed too. CPU numbers mean nothing except, at most, ratios: the kernels run in
Pallas interpret mode there.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jt5.pallas_kernels.flash_attention import flash_attention  # noqa: E402
from jt5.pallas_kernels.reference import attention_reference, dense_bias  # noqa: E402
from jt5.pallas_kernels.spec import Mask, RelativeBias  # noqa: E402
from jt5.pallas_kernels.tuning import median_time  # noqa: E402

# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts), for the FLOP floor only.
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12}


def peak_flops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak
    return None


def attention_flops(B, N, T, S, H, causal):
    fwd = 4.0 * B * N * T * S * H * (0.5 if causal else 1.0)
    return fwd, fwd * 3.5     # forward, forward + backward


def make_impls(*, causal: bool, on_gpu: bool, semantics: str = "lane"):
    """name -> (function of (q, k, v, table), has bias)."""
    bidir = not causal
    interpret = not on_gpu

    mask = Mask(causal=causal)

    def jt5(q, k, v, table):
        return flash_attention(q, k, v, mask, RelativeBias(table, bidir), interpret=interpret)

    def xla_ref(q, k, v, table):
        return attention_reference(q, k, v, mask, RelativeBias(table, bidir))

    def dpa(impl, q, k, v, table):
        bias = dense_bias(RelativeBias(table, bidir), q_len=q.shape[1],
                          kv_len=k.shape[1]).astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0, is_causal=causal,
                                            implementation=impl)

    def mha(q, k, v, table):
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention
        del table
        return pallas_attention.mha(q, k, v, None, causal=causal, interpret=interpret)

    def mosaic(q, k, v, table):
        from jt5.pallas_kernels.mosaic_attention import mosaic_attention
        return mosaic_attention(q, k, v, mask, RelativeBias(table, bidir), interpret=interpret,
                                semantics=semantics)

    def mgpu_fa3(q, k, v, table):
        from jax.experimental.pallas.ops.gpu import attention_mgpu as am
        del table       # its shared memory is float16: bf16 inputs are cast (counted in time)
        cfg = am.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal,
                              block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
        f16 = [x.astype(jnp.float16) for x in (q, k, v)]
        return am.attention(*f16, cfg).astype(q.dtype)

    impls = {"jt5_flash": (jt5, True), "xla_ref": (xla_ref, True),
             "dpa_xla": (functools.partial(dpa, None), True)}
    if on_gpu:
        impls["dpa_cudnn"] = (functools.partial(dpa, "cudnn"), True)
        impls["mgpu_fa3"] = (mgpu_fa3, False)
    impls["pallas_mha"] = (mha, False)
    impls["jt5_mosaic"] = (mosaic, True)
    return impls


def _median_time(fn, args, repeats):
    return median_time(fn, *args, repeats=repeats, warmup=2)  # compile + warm up


def _temp_bytes(fn, args):
    try:
        ma = fn.lower(*args).compile().memory_analysis()
        return int(ma.temp_size_in_bytes) if ma is not None else None
    except Exception:  # not every backend reports it
        return None


def bench_one(name, fn, has_bias, args, repeats):
    row = {"impl": name}
    argnums = (0, 1, 2, 3) if has_bias else (0, 1, 2)
    fwd = jax.jit(fn)
    loss = jax.jit(jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=argnums))
    try:
        row["fwd_s"] = _median_time(fwd, args, repeats)
        row["fwd_bwd_s"] = _median_time(loss, args, repeats)
        row["bwd_s"] = max(row["fwd_bwd_s"] - row["fwd_s"], 1e-12)  # the backward alone
        row["temp_bytes"] = _temp_bytes(loss, args)
    except Exception as e:  # OOM, unsupported config (e.g. cuDNN with this bias), ...
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return row


DEFAULT_IMPLS = ("jt5_flash", "xla_ref", "dpa_xla", "dpa_cudnn", "pallas_mha")
MOSAIC_IMPLS = ("jt5_mosaic", "jt5_flash", "mgpu_fa3", "dpa_cudnn")


def run(lengths, modes, *, H, dtype, tokens, heads, repeats, on_gpu, skip_dense_over,
        impls=DEFAULT_IMPLS, semantics="lane", on_row=None):
    device = jax.devices()[0]
    rows = []
    for mode, L, h in ((m, L, h) for m in modes for h in H for L in lengths):
        causal = mode == "decoder"
        B = max(1, tokens // L)
        ks = jax.random.split(jax.random.key(0), 4)
        q, k, v = (jax.random.normal(kk, (B, L, heads, h), dtype) for kk in ks[:3])
        q = q * 0.125
        table = jax.random.normal(ks[3], (32, heads), jnp.float32)
        fwd_flops, all_flops = attention_flops(B, heads, L, L, h, causal)
        dense_bytes = 4 * B * heads * L * L
        chosen = make_impls(causal=causal, on_gpu=on_gpu, semantics=semantics)
        for name, (fn, has_bias) in ((n, chosen[n]) for n in impls if n in chosen):
            if name == "jt5_mosaic" and jnp.dtype(dtype).itemsize != 2:
                row = {"impl": name, "error": "skipped: Mosaic runs bfloat16/float16"}
            elif name in ("xla_ref", "dpa_xla", "dpa_cudnn") and dense_bytes > skip_dense_over:
                row = {"impl": name, "error": f"skipped: dense scores {dense_bytes/2**30:.0f} GiB"}
            else:
                row = bench_one(name, fn, has_bias, (q, k, v, table), repeats)
            row.update(mode=mode, B=B, N=heads, T=L, S=L, H=h, dtype=jnp.dtype(dtype).name,
                       fwd_flops=fwd_flops, fwd_bwd_flops=all_flops,
                       bwd_flops=all_flops - fwd_flops)
            rows.append(row)
            print(f"  {mode} H={h} T={L} {name}: {row.get('error') or 'ok'}", file=sys.stderr)
            if on_row:
                on_row(rows)
    peak = peak_flops(device.device_kind) if on_gpu else None
    return rows, peak


def _fmt_ms(s):
    return f"{s*1e3:9.3f}" if s is not None else "      n/a"


def print_table(rows, peak, on_gpu):
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if not on_gpu:
        print("NOTE: CPU run — kernels in Pallas interpret mode; absolute numbers mean nothing, "
              "ratios at most a little.")
    hdr = (f"{'mode':8} {'H':>4} {'T=S':>6} {'B':>4} {'impl':12} {'fwd ms':>9} {'TF/s':>7} "
           f"{'x jt5':>6}"
           f" {'fwd+bwd ms':>10} {'TF/s':>7} {'x jt5':>6} {'temp MiB':>9}")
    print(hdr)
    print("-" * len(hdr))
    key_of = lambda r: (r["mode"], r["H"], r["T"])  # noqa: E731
    base = {key_of(r): r for r in rows if r["impl"] == "jt5_flash" and "error" not in r}
    for key in dict.fromkeys(key_of(r) for r in rows):
        group = [r for r in rows if key_of(r) == key]
        for r in group:
            lead = f"{r['mode']:8} {r['H']:>4} {r['T']:>6} {r['B']:>4} {r['impl']:12}"
            if "error" in r:
                print(f"{lead} {r['error']}")
                continue
            b = base.get(key)
            cells = []
            for t_key, f_key in (("fwd_s", "fwd_flops"), ("fwd_bwd_s", "fwd_bwd_flops")):
                t = r[t_key]
                ratio = f"{t / b[t_key]:6.2f}" if b else "   n/a"
                cells.append(f"{_fmt_ms(t)} {r[f_key] / t / 1e12:7.2f} {ratio}")
            mem = f"{r['temp_bytes'] / 2**20:9.1f}" if r.get("temp_bytes") is not None else "      n/a"
            print(f"{lead} {cells[0]}  {cells[1]} {mem}")
        r0 = group[0]
        if peak:
            print(f"{r0['mode']:8} {r0['H']:>4} {r0['T']:>6} {r0['B']:>4} {'FLOP floor':12} "
                  f"{_fmt_ms(r0['fwd_flops'] / peak)} {peak/1e12:7.0f} {'':6} "
                  f"{_fmt_ms(r0['fwd_bwd_flops'] / peak):>10} {peak/1e12:7.0f}")
        else:
            print(f"{r0['mode']:8} {r0['H']:>4} {r0['T']:>6} {r0['B']:>4} {'FLOP floor':12} "
                  f"fwd {r0['fwd_flops']/1e9:.3f} GFLOP, fwd+bwd {r0['fwd_bwd_flops']/1e9:.3f} "
                  "GFLOP (no known peak for this device)")
    print("x jt5 = time of the row / time of jt5_flash (> 1: jt5 is faster). pallas_mha and "
          "mgpu_fa3 have no "
          "bias (a ceiling).")
    if on_gpu:
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            print(f"process peak GPU memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")


# ---------------------------------------------------------------------------- Mosaic check

# (B, T, S, N, H, dtype, mask kind of compile_check): padded keys with far bias blocks, packed
# causal rows (f16, H 128), a local window with global tokens.
CHECK_SHAPES = {
    "gpu": [(2, 1000, 1000, 8, 64, "bfloat16", "padding"),
            (1, 2048, 2048, 4, 128, "float16", "causal_packing"),
            (1, 1536, 1536, 4, 64, "bfloat16", "local_global")],
    "cpu": [(1, 100, 128, 1, 64, "bfloat16", "padding"),
            (1, 128, 128, 1, 128, "float16", "causal_packing"),
            (1, 128, 128, 1, 64, "bfloat16", "local_global")],
}


def _check_one(shape, *, semantics, grads, interpret):
    """Max relative errors of mosaic_attention vs the float32 reference (output, lse and, with
    ``grads``, dq/dk/dv/dtable under an lse cotangent); ``ok`` against tests/conftest's table."""
    from jt5.pallas_kernels.compile_check import _flash_mask
    from jt5.pallas_kernels.mosaic_attention import mosaic_attention
    from jt5.pallas_kernels.spec import MASK_VALUE
    from tests.conftest import tol
    B, T, S, N, H, dtype, kind = shape
    mask, bidir = _flash_mask(kind, B, T, S)
    r = np.random.default_rng(0)
    q = jnp.asarray(0.5 * r.standard_normal((B, T, N, H)), dtype)
    k, v = (jnp.asarray(r.standard_normal((B, S, N, H)), dtype) for _ in range(2))
    table = jnp.asarray(r.standard_normal((32, N)), jnp.float32)
    g = jnp.asarray(r.standard_normal((B, T, N, H)), jnp.float32)
    g_lse = jnp.asarray(r.standard_normal((B, N, T)), jnp.float32)

    def loss(fn, q, k, v, table):
        out, lse = fn(q, k, v, mask, RelativeBias(table, bidir), return_lse=True)
        lse = jnp.where(lse == MASK_VALUE, 0.0, lse)
        return jnp.sum(out.astype(jnp.float32) * g) + jnp.sum(lse * g_lse), (out, lse)

    mosaic = functools.partial(mosaic_attention, interpret=interpret, semantics=semantics)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    if grads:
        argnums = (0, 1, 2, 3)
        (_, got), dgot = jax.jit(jax.value_and_grad(
            lambda *a: loss(mosaic, *a), argnums=argnums, has_aux=True))(q, k, v, table)
        (_, want), dwant = jax.value_and_grad(
            lambda *a: loss(attention_reference, *a), argnums=argnums, has_aux=True)(*f32, table)
    else:
        got = jax.jit(lambda *a: loss(mosaic, *a)[1])(q, k, v, table)
        want = loss(attention_reference, *f32, table)[1]
        dgot = dwant = ()
    errors = {}
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dtable"), (*got, *dgot),
                          (*want, *dwant)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        errors[name] = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
    ok = all(e <= tol(dtype, "attention" if n in ("out", "lse") else "attention_grad")
             for n, e in errors.items())
    return {"shape": list(shape), "semantics": semantics, "ok": bool(ok),
            "errors": {n: float(f"{e:.3g}") for n, e in errors.items()}}


def check_mosaic(*, on_gpu: bool, order=("lane", "warpgroup")):
    """The Mosaic kernels vs the reference at three shapes, per lowering semantics in ``order``
    until one passes all three: ``{"semantics": the passing one or None, "results": [...]}``.
    On a CPU (interpreter) forward and lse only: a dry run of the same path."""
    results = []
    for semantics in order:
        passed = True
        for shape in CHECK_SHAPES["gpu" if on_gpu else "cpu"]:
            try:
                res = _check_one(shape, semantics=semantics, grads=on_gpu,
                                 interpret=not on_gpu)
            except Exception as e:  # noqa: BLE001 - a lowering/compile failure is a result
                res = {"shape": list(shape), "semantics": semantics, "ok": False,
                       "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            results.append(res)
            print(f"  mosaic check {semantics} {shape}: "
                  f"{'ok' if res['ok'] else 'FAIL'} {res.get('errors') or res.get('error')}",
                  file=sys.stderr)
            passed = passed and res["ok"]
        if passed:
            return {"semantics": semantics, "results": results}
    return {"semantics": None, "results": results}


def check_markdown(check) -> str:
    out = [f"Mosaic check vs the float32 reference: semantics "
           f"{check['semantics'] or 'NONE PASSED'}", "",
           "| semantics | B, T, S, N, H, dtype, mask | ok | max rel errors |", "|---|---|---|---|"]
    for r in check["results"]:
        errs = r.get("error") or ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
        out.append(f"| {r['semantics']} | {', '.join(map(str, r['shape']))} | "
                   f"{'ok' if r['ok'] else 'FAIL'} | {errs} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------- whole encoder

def run_encoder(preset, lengths, *, dtype, tokens, repeats, on_gpu, workdir):
    """T5 encoder forward on ``tokens // T`` rows of T tokens: jt5 (pallas, xla) vs
    transformers' PyTorch SDPA, same random weights. Rows: impl, T, B, seconds, tokens/s, peak."""
    import torch
    import transformers

    import jt5
    from flax import nnx
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generate import hf_config  # one jt5 -> transformers config mapping for the benchmarks

    torch.manual_seed(0)
    cfg = jt5.preset(preset)
    hf = transformers.T5EncoderModel(hf_config(cfg)).eval()
    path = Path(workdir) / f"{preset}-encoder"
    hf.save_pretrained(path)
    dev = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    hf = transformers.T5EncoderModel.from_pretrained(
        path, attn_implementation="sdpa", dtype=getattr(torch, dtype)).to(dev).eval()
    impls = ["pallas", "xla"] if on_gpu else ["xla", "pallas"]
    models = {a: jt5.T5EncoderModel.from_pretrained(path, dtype=dtype, attention=a) for a in impls}
    rows = []
    for L in lengths:
        B = max(1, tokens // L)
        ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (B, L)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[B // 2:, L - L // 8:] = 0     # half the rows padded: the mask path is exercised
        for a, model in models.items():
            graphdef, state = nnx.split(model)
            fwd = jax.jit(lambda st, i, m, _g=graphdef: nnx.merge(_g, st)(i, m))
            row = {"impl": f"jt5_{a}", "T": L, "B": B}
            try:
                row["s"] = median_time(fwd, state, ids, mask, repeats=repeats, warmup=2)
                row["temp_bytes"] = _temp_bytes(fwd, (state, ids, mask))
            except Exception as e:  # OOM (the dense XLA path at long T), ...
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            rows.append(row)
        t_ids = torch.as_tensor(ids, dtype=torch.long, device=dev)
        t_mask = torch.as_tensor(mask, device=dev)
        row = {"impl": "hf_sdpa", "T": L, "B": B}
        try:
            def run_hf():
                with torch.inference_mode():
                    out = hf(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
                if dev == "cuda":
                    torch.cuda.synchronize()
                return out
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            run_hf()
            row["s"] = _wall_median(run_hf, repeats)
            if dev == "cuda":
                row["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        except Exception as e:  # noqa: BLE001 - OOM at long T is a result
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        rows.append(row)
        for r in rows[-len(models) - 1:]:
            r.update(preset=preset, dtype=dtype, tokens=B * L)
            if "s" in r:
                r["tokens_per_s"] = B * L / r["s"]
            print(f"  encoder T={L} {r['impl']}: {r.get('error') or 'ok'}", file=sys.stderr)
    return rows


def _wall_median(fn, repeats):
    import statistics
    import time
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def encoder_markdown(rows) -> str:
    out = ["| preset | T | B | impl | ms | tokens/s | x hf | memory MiB |",
           "|---|---|---|---|---|---|---|---|"]
    hf = {r["T"]: r for r in rows if r["impl"] == "hf_sdpa" and "s" in r}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['preset']} | {r['T']} | {r['B']} | {r['impl']} | {r['error']} "
                       "| | | |")
            continue
        ratio = f"{hf[r['T']]['s'] / r['s']:.2f}" if r["T"] in hf else "n/a"
        mem = r.get("peak_bytes") or r.get("temp_bytes")
        mem = f"{mem / 2**20:.0f}" if mem else "n/a"
        out.append(f"| {r['preset']} | {r['T']} | {r['B']} | {r['impl']} | {r['s'] * 1e3:.2f} | "
                   f"{r['tokens_per_s']:.0f} | {ratio} | {mem} |")
    out.append("\nx hf = transformers SDPA time / this row's time (> 1: faster than transformers). "
               "Memory: jt5 rows the compiled program's temporaries, hf the CUDA allocator's peak.")
    return "\n".join(out)


def attention_markdown(rows, peak) -> str:
    out = ["| mode | H | T=S | B | impl | fwd ms | fwd TF/s | bwd ms | bwd TF/s | temp MiB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lead = f"| {r['mode']} | {r['H']} | {r['T']} | {r['B']} | {r['impl']} |"
        if "error" in r:
            out.append(f"{lead} {r['error']} | | | | |")
            continue
        mem = f"{r['temp_bytes'] / 2**20:.0f}" if r.get("temp_bytes") is not None else "n/a"
        out.append(f"{lead} {r['fwd_s'] * 1e3:.3f} | {r['fwd_flops'] / r['fwd_s'] / 1e12:.1f} | "
                   f"{r['bwd_s'] * 1e3:.3f} | {r['bwd_flops'] / r['bwd_s'] / 1e12:.1f} | {mem} |")
    if peak:
        out.append(f"\nDense bf16 peak of this device: {peak / 1e12:.0f} TFLOP/s. pallas_mha and "
                   "mgpu_fa3 have no bias (ceilings); dpa_* and xla_ref take a dense bias.")
    return "\n".join(out)


def main(argv=None):
    on_gpu = jax.default_backend() == "gpu"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-small", action="store_true", default=not on_gpu,
                    help="tiny shapes, f32 (default when there is no GPU)")
    ap.add_argument("--lengths", default=None, help="comma-separated T=S values")
    ap.add_argument("--modes", default=None,
                    help="encoder (bidirectional bias) and/or decoder (causal); default both "
                         "(--mosaic: encoder)")
    ap.add_argument("--head-dim", default="64", help="comma-separated head dims")
    ap.add_argument("--impls", default=None,
                    help=f"comma-separated (default {','.join(DEFAULT_IMPLS)}; with --mosaic "
                         f"{','.join(MOSAIC_IMPLS)}); also jt5_mosaic, mgpu_fa3")
    ap.add_argument("--mosaic", action="store_true",
                    help="check the Mosaic GPU kernels against the reference at three shapes "
                         "(the other lowering semantics if the first fails), then time them "
                         "beside the Triton kernels, jax's mgpu FA3 (no bias) and cuDNN")
    ap.add_argument("--semantics", default="lane,warpgroup",
                    help="Mosaic lowering semantics to try, in order")
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tokens", type=int, default=None, help="B*T per call (B = tokens // T)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--skip-dense-over-gib", type=float, default=24.0,
                    help="skip dense peers whose f32 score matrix exceeds this")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--markdown", default=None, help="also write a markdown table to this file")
    ap.add_argument("--encoder", default=None, metavar="PRESET",
                    help="time a whole jt5 encoder vs transformers SDPA instead (e.g. t5-base)")
    args = ap.parse_args(argv)
    small = args.cpu_small
    if args.encoder:
        import tempfile
        with tempfile.TemporaryDirectory() as workdir:
            rows = run_encoder(
                args.encoder, [int(x) for x in (args.lengths or ("64" if small else "512,8192")
                                                ).split(",")],
                dtype=args.dtype or ("float32" if small else "bfloat16"),
                tokens=args.tokens or (128 if small else 16384),
                repeats=args.repeats or (1 if small else 10), on_gpu=on_gpu and not small,
                workdir=workdir)
        table = encoder_markdown(rows)
        print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}\n{table}")
        _write_outputs(args, rows, None, table)
        return
    lengths = [int(x) for x in (args.lengths or ("128,256" if small else
                                                 "512,2048,8192,32768")).split(",")]
    impls = tuple((args.impls or ",".join(MOSAIC_IMPLS if args.mosaic else DEFAULT_IMPLS))
                  .split(","))
    order = tuple(args.semantics.split(","))
    gpu = on_gpu and not small
    check, extra = None, {}
    if args.mosaic:
        check = check_mosaic(on_gpu=gpu, order=order)
        extra["mosaic_check"] = check
        print(check_markdown(check))
    semantics = (check or {}).get("semantics") or order[0]
    dtype = jnp.dtype(args.dtype or ("bfloat16" if args.mosaic or not small else "float32"))
    modes = (args.modes or ("encoder" if args.mosaic else "encoder,decoder")).split(",")
    head_dims = [int(x) for x in args.head_dim.split(",")]
    write = lambda rows, peak=None: _write_outputs(  # noqa: E731 - rows as they come
        args, rows, peak, attention_markdown(rows, peak), extra, check)
    rows, peak = run(
        lengths, modes, H=head_dims, dtype=dtype,
        tokens=args.tokens or (256 if small else 65536), heads=args.heads or (2 if small else 16),
        repeats=args.repeats or (3 if small else 20), on_gpu=gpu,
        skip_dense_over=args.skip_dense_over_gib * 2**30, impls=impls, semantics=semantics,
        on_row=write)
    print_table(rows, peak, gpu)
    write(rows, peak)
    if check is not None and check["semantics"] is None:
        sys.exit("the Mosaic kernels differ from the reference under every lowering semantics "
                 "tried (see the check table)")


def _write_outputs(args, rows, peak, table, extra=None, check=None):
    if check is not None:
        table = check_markdown(check) + "\n\n" + table
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                       "jax": jax.__version__, "peak_flops": peak, "rows": rows,
                       **(extra or {})}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
