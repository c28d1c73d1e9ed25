"""Long inputs: time and peak memory of a T5 encoder forward, jt5 against its peers.

    python benchmarks/long_encoder.py                                    # 4k..32k, every impl
    python benchmarks/long_encoder.py --lengths 4096 8192 --impls jt5 hf-sdpa --json out.json
    python benchmarks/long_encoder.py --impls jt5 jt5-local jt5-tglobal --lengths 4096 16384
    # a GPU (benchmarks/gpu.sh): one process, compiled temporaries and the device's peak
    python benchmarks/long_encoder.py --model t5-base --dtype bfloat16 --attention pallas \
        --impls jt5 jt5-local jt5-tglobal --lengths 16384 65536 131072 --in-process

One random-weight transformers ``T5EncoderModel`` of the ``--model`` preset's shape (default
t5-small: 6 layers, d_model 512, 8 heads) is saved once; every (implementation, length) then
runs in a fresh subprocess that loads it, runs one warm-up and ``--repeats`` timed forwards of
batch 1, float32, and reports the minimum time and its peak resident memory (``VmHWM``: the
whole process, libraries included; ``base`` is the same process before the first forward).

- ``jt5``: the XLA path (``attention="xla"``): above 1M query x key positions it attends in
  chunks (``pallas_kernels/chunked.py``): memory linear in T.
- ``jt5-local`` / ``jt5-tglobal``: the same T5 checkpoint loaded with
  ``encoder_attention_type="local"`` / ``"transient-global"`` (``--local-radius``,
  ``--global-block-size``; LongT5's 127 and 16 by default): an approximation of full attention
  (accuracy: benchmarks/long_input.py), linear in memory on every path.
- ``hf-eager`` / ``hf-sdpa``: transformers' PyTorch T5 (``attn_implementation``); both
  materialise the ``[1, N, T, T]`` position bias and scores.
- ``nai-sdpa``: nai-t5's encoder (pip ``nai-t5``; its SDPA path takes the dense bias too).

Runs whose dense ``[N, T, T]`` float32 score tensors alone (bias + scores + probabilities, 3 x
4·N·T² bytes) would exceed ``--mem-budget-gb`` are not started and are reported as such. Agreement:
the first 64 positions of each output against jt5's (relative max error).

``--in-process`` (for a GPU): every jt5 run in this one process, memory as the compiled
program's temporaries (``memory_analysis``) and the device allocator's peak so far; time the
median of ``--repeats`` (min/median/max printed).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/generate.py
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMPLS = ("jt5", "jt5-local", "jt5-tglobal", "hf-eager", "hf-sdpa", "nai-sdpa")
ENCODER_ATTENTION = {"jt5": "full", "jt5-local": "local", "jt5-tglobal": "transient-global"}


def _rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited from
    the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ids(length: int, vocab: int = 32000):
    import numpy as np
    return np.random.default_rng(0).integers(2, min(vocab, 32000), (1, length)).astype(np.int64)


def _jt5_encoder(impl: str, model_dir: str, opts: dict):
    import jt5
    kw = {}
    if impl != "jt5":
        kw = dict(encoder_attention_type=ENCODER_ATTENTION[impl], local_radius=opts["radius"])
        if impl == "jt5-tglobal":
            kw["global_block_size"] = opts["block"]
    return jt5.T5EncoderModel.from_pretrained(model_dir, attention=opts["attention"],
                                              dtype=opts["dtype"], **kw)


def worker(impl: str, model_dir: str, length: int, repeats: int, sample: str,
           opts: dict) -> dict:
    import numpy as np

    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    ids = _ids(length, vocab)
    if impl.startswith("jt5"):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        enc = _jt5_encoder(impl, model_dir, opts)
        fwd = nnx.jit(lambda m, x: m(x))
        x = jnp.asarray(ids, jnp.int32)

        def run():
            return np.asarray(jax.block_until_ready(fwd(enc, x)).astype(jnp.float32))
    else:
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
        if impl.startswith("hf-"):
            from transformers import T5EncoderModel
            model = T5EncoderModel.from_pretrained(model_dir,
                                                   attn_implementation=impl[3:]).eval()

            def call(t):
                return model(input_ids=t).last_hidden_state
        else:
            from peers import nai_t5_encoder
            model = nai_t5_encoder(model_dir, length)

            def call(t):
                return model(t)
        t = torch.as_tensor(ids)

        def run():
            with torch.inference_mode():
                return call(t).float().numpy()
    base = _rss_mb()
    start = time.perf_counter()
    out = run()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    np.save(sample, out[0, :64])
    return {"time_s": min(times) if times else None, "first_s": first, "times_s": times,
            "peak_rss_mb": _rss_mb(), "base_rss_mb": base}


def in_process(impls, model_dir: str, lengths, repeats: int, opts: dict, done=None) -> list:
    """Every jt5 run in this process (a GPU): compiled temporaries, device peak, median time.
    ``done(row)`` after each row (the caller writes its files: a timeout keeps the rows so far)."""
    import statistics

    import jax
    import jax.numpy as jnp
    from flax import nnx

    rows = []
    for impl in impls:
        enc = _jt5_encoder(impl, model_dir, opts)
        graphdef, state = nnx.split(enc)
        fwd = jax.jit(lambda st, x, _g=graphdef: nnx.merge(_g, st)(x))
        for length in lengths:
            row = {"impl": impl, "length": length}
            try:
                x = jnp.asarray(_ids(length, enc.config.vocab_size), jnp.int32)
                compiled = fwd.lower(state, x).compile()
                row["temp_mb"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
                start = time.perf_counter()
                jax.block_until_ready(compiled(state, x))
                row["first_s"] = time.perf_counter() - start
                times = []
                for _ in range(max(repeats, 1)):
                    start = time.perf_counter()
                    jax.block_until_ready(compiled(state, x))
                    times.append(time.perf_counter() - start)
                row.update(times_s=times, time_s=statistics.median(times))
                stats = jax.devices()[0].memory_stats() or {}
                if "peak_bytes_in_use" in stats:
                    row["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
            except Exception as e:  # noqa: BLE001 - an OOM at long T is a result
                row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            rows.append(row)
            if done is not None:
                done(row)
    return rows


def _save_model(preset: str, path: Path):
    import torch
    from transformers import T5Config, T5EncoderModel

    import jt5
    c = jt5.preset(preset)
    cfg = T5Config(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff,
                   num_layers=c.num_layers, num_heads=c.num_heads,
                   relative_attention_num_buckets=c.relative_attention_num_buckets,
                   relative_attention_max_distance=c.relative_attention_max_distance,
                   feed_forward_proj=c.feed_forward_proj, dropout_rate=0.0)
    torch.manual_seed(0)
    T5EncoderModel(cfg).save_pretrained(path)
    return c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="t5-small", help="jt5 preset for the shape (default t5-small)")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--repeats", type=int, default=2,
                   help="timed forwards after the first (which includes jt5's compile); 0: only "
                        "the first (default 2)")
    p.add_argument("--mem-budget-gb", type=float, default=20.0,
                   help="do not start dense runs whose score tensors exceed this (default 20)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for the peers' runs (e.g. a venv with nai-t5)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--markdown", default=None, help="also write the table here")
    p.add_argument("--dtype", default="float32", help="jt5 runs' dtype (default float32)")
    p.add_argument("--attention", default="xla", help="jt5 runs' attention impl (default xla)")
    p.add_argument("--local-radius", type=int, default=127)
    p.add_argument("--global-block-size", type=int, default=16)
    p.add_argument("--in-process", action="store_true",
                   help="jt5 runs only, all in this process (for a GPU; see above)")
    p.add_argument("--worker", nargs=4, metavar=("IMPL", "DIR", "LENGTH", "SAMPLE"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    opts = dict(dtype=args.dtype, attention=args.attention, radius=args.local_radius,
                block=args.global_block_size)
    if args.worker:
        impl, model_dir, length, sample = args.worker
        print(json.dumps(worker(impl, model_dir, int(length), args.repeats, sample, opts)))
        return 0

    import numpy as np
    rows = []
    lines = []

    def emit(line):
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory() as tmp:
        c = _save_model(args.model, Path(tmp) / "model")
        if args.in_process:
            import jax
            emit(f"{args.model}-shaped encoder, batch 1, {args.dtype}, attention={args.attention}"
                 f", {jax.devices()[0].device_kind}, jax {jax.__version__}; local_radius "
                 f"{args.local_radius}, global_block_size {args.global_block_size}\n")
            emit("| impl | T | time s min / median / max | compiled temp MB | device peak MB |")
            emit("|---|---|---|---|---|")
            impls = [i for i in args.impls if i.startswith("jt5")]

            def done(r):
                t = r.get("times_s")
                t = (f"{min(t):.3f} / {r['time_s']:.3f} / {max(t):.3f}" if t else r["failed"])
                emit(f"| {r['impl']} | {r['length']} | {t} | {r.get('temp_mb', 0):.0f} "
                     f"| {r.get('device_peak_mb', 0):.0f} |")
                rows.append(r)
                _write(args, rows, lines)

            in_process(impls, str(Path(tmp) / "model"), args.lengths, args.repeats, opts, done)
            return 0 if all("failed" not in r for r in rows) else 1
        emit(f"{args.model}-shaped encoder ({c.num_layers} layers, d_model {c.d_model}, "
             f"{c.num_heads} heads), batch 1, {args.dtype}, {os.cpu_count()} CPU threads")
        emit("| impl | T | time s min / median / max | first call s | peak RSS MB | "
             "RSS before MB | max rel err vs jt5 |")
        emit("|---|---|---|---|---|---|---|")
        for length in args.lengths:
            ref = None
            for impl in args.impls:
                dense_gb = 3 * 4 * c.num_heads * length**2 / 1e9
                row = {"impl": impl, "length": length}
                if not impl.startswith("jt5") and dense_gb > args.mem_budget_gb:
                    row["skipped"] = f"dense scores need >= {dense_gb:.0f} GB"
                else:
                    sample = str(Path(tmp) / f"{impl}-{length}.npy")
                    py = sys.executable if impl.startswith("jt5") else args.python
                    proc = subprocess.run(
                        [py, __file__, "--repeats", str(args.repeats), "--dtype", args.dtype,
                         "--attention", args.attention, "--local-radius", str(args.local_radius),
                         "--global-block-size", str(args.global_block_size), "--worker", impl,
                         str(Path(tmp) / "model"), str(length), sample],
                        capture_output=True, text=True)
                    if proc.returncode != 0:
                        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                        row["failed"] = f"exit {proc.returncode}: {tail[:120]}"
                    else:
                        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                        out = np.load(sample)
                        if impl == "jt5":
                            ref = out
                        elif ref is not None:
                            row["rel_err"] = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
                rows.append(row)
                if "first_s" in row:
                    err = f"{row['rel_err']:.1e}" if "rel_err" in row else "-"
                    t = row["times_s"]
                    t = (f"{min(t):.2f} / {sorted(t)[len(t) // 2]:.2f} / {max(t):.2f}" if t
                         else "-")
                    emit(f"| {impl} | {length} | {t} | {row['first_s']:.2f} | "
                         f"{row['peak_rss_mb']:.0f} | {row['base_rss_mb']:.0f} | {err} |")
                else:
                    emit(f"| {impl} | {length} | {row.get('skipped') or row.get('failed')} "
                         f"| | | | |")
    _write(args, rows, lines)
    return 0


def _write(args, rows, lines):
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
