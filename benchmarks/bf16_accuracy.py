"""Low-precision encoder accuracy: |output - transformers float32| quantiles, jt5 vs its peers.

    python benchmarks/bf16_accuracy.py                       # T5 v1.1 XXL widths, 2 layers, 512 tokens
    python benchmarks/bf16_accuracy.py --d-model 256 --d-ff 640 --heads 4 --json out.json

One random-weight transformers ``T5EncoderModel`` (T5 v1.1: gated-GELU, untied; default widths
of T5-XXL — d_model 4096, d_ff 10240, 64 heads of 64 — with ``--layers`` layers; layer-norm
scales drawn around 1 so the norms matter) is the float32 reference. The same weights then run
in bfloat16 and float16 (weights cast too: "pure" low precision, as each peer's own precision
test does) in transformers, nai-t5 (pip ``nai-t5``: float32 residual stream and norm; run with
``--python`` pointing at an interpreter that has it) and jt5, all in one run on the same ids.
Printed: the p50 / p99 / p99.99 / max of ``|out - ref|`` over every element of the encoder
output, and each run's time (CPU: only the ratios between rows mean anything).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/generate.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUANTILES = (0.5, 0.99, 0.9999, 1.0)


def _ids(length: int, vocab: int):
    import numpy as np
    return np.random.default_rng(0).integers(2, vocab, (1, length)).astype(np.int64)


def run_peer(impl: str, dtype: str, model_dir: str, length: int, out: str) -> float:
    """Encode the ids with ``impl`` in ``dtype``; save the float32 output; return the seconds."""
    import numpy as np

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    ids = _ids(length, cfg["vocab_size"])
    if impl == "jt5":
        import jax
        import jax.numpy as jnp
        from flax import nnx

        import jt5
        enc = jt5.T5EncoderModel.from_pretrained(model_dir, dtype=dtype, attention="xla")
        fwd = nnx.jit(lambda m, x: m(x))
        x = jnp.asarray(ids, jnp.int32)
        jax.block_until_ready(fwd(enc, x))
        start = time.perf_counter()
        y = np.asarray(jax.block_until_ready(fwd(enc, x)), np.float32)
    else:
        import torch
        tdt = getattr(torch, dtype)
        t = torch.as_tensor(ids)
        if impl == "transformers":
            from transformers import T5EncoderModel
            model = T5EncoderModel.from_pretrained(model_dir).eval().to(tdt)

            def call():
                return model(input_ids=t).last_hidden_state
        else:
            from peers import nai_t5_encoder
            model = nai_t5_encoder(model_dir, length).to(tdt)

            def call():
                return model(t)
        with torch.inference_mode():
            call()
            start = time.perf_counter()
            y = call().float().numpy()
    seconds = time.perf_counter() - start
    np.save(out, y)
    return seconds


def _build(path: Path, args):
    import torch
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=args.vocab, d_model=args.d_model, d_kv=args.d_model // args.heads,
                   d_ff=args.d_ff, num_layers=args.layers, num_heads=args.heads,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
    torch.manual_seed(0)
    model = T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    with torch.inference_mode():
        ref = model(input_ids=torch.as_tensor(_ids(args.length, args.vocab))).last_hidden_state
    return ref.numpy()


def add_model_args(p: argparse.ArgumentParser):
    """The random encoder's shape (``_build``; default T5-XXL widths, 2 layers) and length;
    benchmarks/encoder_quant.py builds the same one."""
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--d-ff", type=int, default=10240)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32128)
    p.add_argument("--length", type=int, default=512)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--impls", nargs="+", default=["transformers", "nai-t5", "jt5"],
                   choices=["transformers", "nai-t5", "jt5"])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"],
                   choices=["bfloat16", "float16"])
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for the peers (one that can import nai_t5 for nai-t5)")
    p.add_argument("--json", default=None)
    p.add_argument("--peer", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peer:
        impl, dtype, model_dir, length, out = args.peer
        print(json.dumps({"seconds": run_peer(impl, dtype, model_dir, int(length), out)}))
        return 0

    import numpy as np
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = _build(Path(tmp) / "model", args)
        print(f"T5 v1.1 encoder, d_model {args.d_model}, d_ff {args.d_ff}, {args.heads} heads, "
              f"{args.layers} layers, {args.length} tokens; |out - transformers float32|; "
              f"reference scale max|ref| = {np.max(np.abs(ref)):.3g}")
        print("| run | p50 | p99 | p99.99 | max | seconds |")
        print("|---|---|---|---|---|---|")
        for dtype in args.dtypes:
            for impl in args.impls:
                out = str(Path(tmp) / f"{impl}-{dtype}.npy")
                py = sys.executable if impl == "jt5" else args.python
                proc = subprocess.run([py, __file__, "--peer", impl, dtype, str(Path(tmp) / "model"),
                                       str(args.length), out], capture_output=True, text=True)
                row = {"impl": impl, "dtype": dtype}
                if proc.returncode:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    row["failed"] = tail[:160]
                    print(f"| {impl} {dtype} | failed: {row['failed']} | | | | |", flush=True)
                else:
                    err = np.abs(np.load(out).astype(np.float64) - ref)
                    row.update(seconds=json.loads(proc.stdout.strip().splitlines()[-1])["seconds"],
                               quantiles=dict(zip(map(str, QUANTILES),
                                                  np.quantile(err, QUANTILES).tolist())))
                    q = " | ".join(f"{v:.3e}" for v in row["quantiles"].values())
                    print(f"| {impl} {dtype} | {q} | {row['seconds']:.2f} |", flush=True)
                rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
