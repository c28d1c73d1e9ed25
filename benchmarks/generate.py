"""Generation speed: jt5's compiled ``generate`` against transformers' PyTorch ``generate``.

    python benchmarks/generate.py                          # t5-small + t5-base, batch 1 and 16,
                                                           # greedy and 4-beam (CPU: slow, ~1 h)
    python benchmarks/generate.py --models t5-small --batch 16 --strategies greedy --json out.json

Both run in the same process on the same random weights (a transformers model of the jt5
preset's shape, saved and loaded into jt5 with ``from_pretrained``) and the same inputs:
``--input-len`` (128) tokens per row, exactly ``--new-tokens`` (64) generated tokens
(``min_new_tokens = max_new_tokens``, so EOS never ends a row early and both do the same work).
Reported: new tokens per second (batch x new tokens / time; beams do more work for the same
tokens), the median of ``--repeats`` timed runs after a warm-up, jt5's compile time separately
(first call minus a steady call), and the ratio jt5 / transformers. ``same`` says whether the
two produced the same tokens (random weights give near-ties, so a few differing rows are
possible and mean nothing).

On a GPU the script also times the flash-decoding kernel alone on the shapes of the last decode
step (self-attention over the full cache, cross-attention over the input) and reports its
bandwidth: bytes of K/V read (``decode_attention.kv_bytes``) / time, against the device's
peak memory bandwidth.
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

# torch's OpenMP workers spin-wait at barriers by default; next to XLA's own thread pool (or any
# other load) on a small CPU that costs torch 10-30x. Passive waiting keeps the peer at its
# standalone speed. Must be set before torch loads libgomp; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jt5  # noqa: E402
from jt5 import generate as gen  # noqa: E402

STRATEGIES = {"greedy": 1, "beam4": 4}
# Peak HBM bandwidth, bytes/s (vendor datasheets, SXM parts), for the kernel's floor only.
PEAK_BANDWIDTH = {"h200": 4.8e12, "h100": 3.35e12, "a100": 2.0e12, "l4": 0.3e12, "a10": 0.6e12}


def peak_bandwidth(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((bw for name, bw in PEAK_BANDWIDTH.items() if name in kind), None)


def hf_config(cfg: jt5.T5Config):
    import transformers
    return transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        feed_forward_proj=cfg.feed_forward_proj, tie_word_embeddings=cfg.tie_word_embeddings,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def build_pair(preset: str, workdir: Path, attention: str, torch_device: str, dtype: str,
               jt5_dtype: str | None = None, weights: str | None = None,
               int8_compute: bool = False):
    """(transformers model, jt5 model) with the same random weights, both in ``dtype``."""
    import torch
    import transformers
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(hf_config(jt5.preset(preset))).eval()
    path = workdir / preset
    hf.save_pretrained(path)
    model = jt5.T5ForConditionalGeneration.from_pretrained(path, dtype=jt5_dtype or dtype,
                                                           attention=attention, weights=weights,
                                                           int8_compute=int8_compute or None)
    return hf.to(device=torch_device, dtype=getattr(torch, dtype)), model


def _times(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _median_time(fn, repeats: int) -> float:
    return statistics.median(_times(fn, repeats))


def _spread(times) -> dict:
    return dict(min=min(times), median=statistics.median(times), max=max(times))


def build_ct2(path: Path, vocab_size: int, compute_types, threads: int) -> dict:
    """CTranslate2 translators (one per compute type) of the transformers model in ``path``.

    Its converter takes the vocabulary from a tokenizer: the byte tokenizer's files give it
    one, and the vocabulary it writes is then replaced by unique names per id (``t<id>``), so
    ids map to tokens and back one to one on these random-weight models."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    from jt5.tokenizer import tokenizer_files
    for name, data in tokenizer_files("byte").items():
        (path / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    out = {}
    for ct in compute_types:
        dst = path.parent / f"{path.name}-ct2-{ct}"
        TransformersConverter(str(path)).convert(str(dst), quantization=ct, force=True)
        vocab = ["<pad>", "</s>", "<unk>"] + [f"t{i}" for i in range(3, vocab_size)]
        (dst / "shared_vocabulary.json").write_text(json.dumps(vocab))
        (dst / "shared_vocabulary.txt").unlink(missing_ok=True)
        out[ct] = (ctranslate2.Translator(str(dst), device="cpu", compute_type=ct,
                                          intra_threads=threads), vocab)
    return out


def bench_ct2(translator, vocab, ids, *, beams, new_tokens, repeats):
    """Same inputs, exactly ``new_tokens`` tokens; returns (times, ids laid out as HF's)."""
    src = [[vocab[i] for i in row] for row in ids]
    index = {t: i for i, t in enumerate(vocab)}

    def run():
        return translator.translate_batch(src, beam_size=beams, max_decoding_length=new_tokens,
                                          min_decoding_length=new_tokens, max_batch_size=0)

    run()  # warm-up
    times = _times(run, repeats)
    res = run()
    out = np.zeros((len(ids), new_tokens + 1), np.int64)  # column 0: the start token (pad)
    for r, hyp in enumerate(res):
        toks = [index[t] for t in hyp.hypotheses[0]][:new_tokens]
        out[r, 1:1 + len(toks)] = toks
    return times, out


def bench_one(hf, model, *, batch, beams, input_len, new_tokens, repeats, torch_device,
              ct2=None):
    import torch
    cfg = model.config
    rng = np.random.default_rng(0)
    ids = rng.integers(2, cfg.vocab_size, (batch, input_len)).astype(np.int64)
    mask = np.ones_like(ids)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams,
              eos_token_id=1, pad_token_id=0)

    t_ids, t_mask = torch.as_tensor(ids, device=torch_device), torch.as_tensor(mask,
                                                                               device=torch_device)

    def run_hf(n=new_tokens):
        with torch.inference_mode():
            return hf.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=False,
                               **{**kw, "max_new_tokens": n, "min_new_tokens": n}).cpu().numpy()

    def run_jt5():
        return jax.block_until_ready(gen.generate_fixed(model, ids, mask, **kw))

    run_hf(2)  # warm-up (allocator, kernels); transformers does not compile
    outs = {}
    hf_times = _times(lambda: outs.update(hf=run_hf()), repeats)
    t_hf = statistics.median(hf_times)
    hf_out = outs["hf"]

    t = time.perf_counter()
    out = run_jt5()
    first = time.perf_counter() - t
    jt5_times = _times(run_jt5, repeats)
    t_jt5 = statistics.median(jt5_times)
    peers = {}
    for ct, (translator, vocab) in (ct2 or {}).items():
        times, ct_out = bench_ct2(translator, vocab, ids, beams=beams, new_tokens=new_tokens,
                                  repeats=repeats)
        rows = (ct_out == hf_out).all(1) if ct_out.shape == hf_out.shape else np.zeros(batch)
        peers[f"ct2_{ct}"] = dict(times=_spread(times), tok_s=batch * new_tokens /
                                  statistics.median(times), rows_same=float(np.mean(rows)))
    width = int(out.length)
    ours = np.asarray(out.sequences[:, :width])
    same = ours.shape == hf_out.shape and bool((ours == hf_out).all())
    rows_same = (float(np.mean((ours == hf_out).all(1))) if ours.shape == hf_out.shape else 0.0)
    tokens = batch * new_tokens
    return dict(batch=batch, beams=beams, input_len=input_len, new_tokens=new_tokens,
                hf_s=t_hf, jt5_s=t_jt5, jt5_compile_s=max(0.0, first - t_jt5),
                hf_times=_spread(hf_times), jt5_times=_spread(jt5_times), peers=peers,
                hf_tok_s=tokens / t_hf, jt5_tok_s=tokens / t_jt5, speedup=t_hf / t_jt5,
                same=same, rows_same=rows_same)


def bench_kernel(model, *, batch, beams, input_len, new_tokens, repeats=20):
    """GPU only: the decode kernel alone on the last step's shapes; achieved bandwidth."""
    from jt5.pallas_kernels.decode_attention import decode_attention, kv_bytes, live_length
    from jt5.pallas_kernels.spec import Mask, RelativeBias
    cfg = model.config
    rows, N, H = batch * beams, cfg.num_heads, cfg.d_kv
    dt = jnp.dtype(cfg.dtype)
    cache_len = -(-new_tokens // 16) * 16
    res = {}
    for name, S, causal in (("self", cache_len, True), ("cross", input_len, False)):
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (rows, 1, N, H), dt)
        k = jax.random.normal(ks[1], (rows, S, N, H), dt)
        v = jax.random.normal(ks[2], (rows, S, N, H), dt)
        table = jnp.zeros((cfg.relative_attention_num_buckets, N), jnp.float32)
        pos = jnp.int32(new_tokens - 1)
        fn = jax.jit(lambda q, k, v, t, p, causal=causal: decode_attention(
            q, k, v, Mask(causal=causal), RelativeBias(t, False) if causal else None, q_offset=p))
        jax.block_until_ready(fn(q, k, v, table, pos))
        t = _median_time(lambda: jax.block_until_ready(fn(q, k, v, table, pos)), repeats)
        live = live_length(S, causal=causal, q_pos=new_tokens - 1)
        nbytes = kv_bytes(batch=rows, num_heads=N, head_dim=H, live_len=live, dtype=dt)
        res[name] = dict(seconds=t, bytes=nbytes, bandwidth=nbytes / t)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="t5-small,t5-base", help="jt5 presets, comma-separated")
    p.add_argument("--batch", default="1,16", help="batch sizes, comma-separated")
    p.add_argument("--strategies", default="greedy,beam4", help=f"of {sorted(STRATEGIES)}")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (median)")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="both sides' compute and parameter dtype (default float32)")
    p.add_argument("--jt5-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="jt5's compute and parameter dtype if not --dtype")
    p.add_argument("--weights", default=None, choices=("float", "int8", "fp8"),
                   help="jt5's matmul weights: quantised at load (jt5/quant.py)")
    p.add_argument("--int8-compute", action="store_true",
                   help="jt5 with int8 weights: int8 activations too (CTranslate2's scheme)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (jt5: XLA's own)")
    p.add_argument("--ct2", default="float32,int8",
                   help="CTranslate2 compute types to run beside (CPU; needs pip ctranslate2; "
                        "'' to skip; default float32,int8)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0].device_kind
    strategies = [s for s in args.strategies.split(",") if s]
    for s in strategies:
        if s not in STRATEGIES:
            p.error(f"unknown strategy {s!r}; choose from {sorted(STRATEGIES)}")
    print(f"# jax {jax.__version__} on {device} ({jax.default_backend()}), torch "
          f"{torch.__version__} on {torch_device} ({args.threads} threads); "
          f"input {args.input_len}, new tokens {args.new_tokens}, {args.dtype}; jt5 "
          f"{args.jt5_dtype or args.dtype}, {args.weights or 'float'} weights"
          f"{', int8 compute' if args.int8_compute else ''}")
    header = (f"{'model':9} {'strategy':8} {'batch':>5} {'HF tok/s':>9} {'jt5 tok/s':>9} "
              f"{'HF s':>8} {'jt5 s':>8} {'compile s':>9} {'jt5/HF':>7} same")
    print(header)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in [m for m in args.models.split(",") if m]:
            hf, model = build_pair(preset, Path(tmp), args.attention, torch_device,
                                   args.dtype, args.jt5_dtype, args.weights, args.int8_compute)
            ct2 = None
            cts = [c for c in args.ct2.split(",") if c]
            if cts and torch_device == "cpu" and args.dtype == "float32":
                try:
                    ct2 = build_ct2(Path(tmp) / preset, model.config.vocab_size, cts,
                                    args.threads)
                except ImportError:
                    print("# ctranslate2 not installed: pip install ctranslate2 to compare")
            for strategy in strategies:
                for batch in [int(b) for b in args.batch.split(",") if b]:
                    r = bench_one(hf, model, batch=batch, beams=STRATEGIES[strategy],
                                  input_len=args.input_len, new_tokens=args.new_tokens,
                                  repeats=args.repeats, torch_device=torch_device, ct2=ct2)
                    r.update(model=preset, strategy=strategy, device=device)
                    if on_gpu:
                        r["kernel"] = bench_kernel(model, batch=batch, beams=STRATEGIES[strategy],
                                                   input_len=args.input_len,
                                                   new_tokens=args.new_tokens)
                    rows.append(r)
                    same = "yes" if r["same"] else f"{r['rows_same']:.0%} rows"
                    print(f"{preset:9} {strategy:8} {batch:5d} {r['hf_tok_s']:9.1f} "
                          f"{r['jt5_tok_s']:9.1f} {r['hf_s']:8.2f} {r['jt5_s']:8.2f} "
                          f"{r['jt5_compile_s']:9.1f} {r['speedup']:6.2f}x {same}", flush=True)
                    spread = ", ".join(f"{k} {v['min']:.2f}/{v['median']:.2f}/{v['max']:.2f}"
                                       for k, v in (("HF", r["hf_times"]), ("jt5", r["jt5_times"]),
                                                    *((n, pr["times"]) for n, pr in
                                                      r["peers"].items())))
                    print(f"{'':9} seconds min/median/max: {spread}")
                    for n, pr in r["peers"].items():
                        print(f"{'':9} {n}: {pr['tok_s']:.1f} tok/s, jt5/{n} "
                              f"{r['jt5_tok_s'] / pr['tok_s']:.2f}x, same rows as HF "
                              f"{pr['rows_same']:.0%}")
            del hf, model
    if on_gpu:
        peak = peak_bandwidth(device)
        print(f"\n# decode kernel on the last step's shapes (peak {peak and peak / 1e12} TB/s)")
        for r in rows:
            for name, k in r["kernel"].items():
                frac = f"{k['bandwidth'] / peak:.0%} of peak" if peak else "peak unknown"
                print(f"{r['model']:9} {r['strategy']:8} {r['batch']:5d} {name:5} "
                      f"{k['seconds'] * 1e6:8.1f} us {k['bytes'] / 1e6:8.2f} MB "
                      f"{k['bandwidth'] / 1e9:8.1f} GB/s ({frac})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
