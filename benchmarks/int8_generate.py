"""CPU greedy generation with int8 weights: jt5 vs CTranslate2 int8, timed interleaved.

    python benchmarks/int8_generate.py            # t5-small shape, batch 16, 128 -> 64 tokens

The same random t5-small-shaped weights (``generate.build_pair``) run as: jt5 float32, jt5 with
int8 weights (``weights="int8"``: weight-only, float32 compute), jt5 int8 weights on int8
activations (``int8_compute=True``, float32 and bfloat16 compute; and with the embedding, i.e.
the tied head, in int8 too, as CTranslate2 does) and CTranslate2 float32 and
int8 (``generate.build_ct2``), each generating exactly ``--new-tokens`` tokens for the same
``--batch`` x ``--input-len`` ids. One timed run of every system per round, ``--rounds`` rounds:
on a machine shared with other jobs the load moves between rounds, so each round's ratio to
CTranslate2 int8 (same round) is reported beside min / median / max seconds. ``same``: rows
equal to transformers' float32 greedy output.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/generate.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="t5-small", help="jt5 preset")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="CTranslate2 / torch threads")
    args = p.parse_args(argv)

    import jax
    import numpy as np
    import torch

    import jt5
    from generate import build_ct2, build_pair
    from jt5 import generate as gen
    torch.set_num_threads(args.threads)
    variants = {"jt5 float32": dict(),
                "jt5 int8 weights": dict(weights="int8"),
                "jt5 int8 + int8 compute": dict(weights="int8", int8_compute=True),
                "jt5 int8 + int8 compute, bf16": dict(weights="int8", int8_compute=True,
                                                      dtype="bfloat16"),
                # CTranslate2's int8 also quantises the embedding / tied output projection
                "jt5 int8 + int8 compute + int8 embedding": dict(
                    weights="int8", int8_compute=True,
                    quantized=jt5.config.QUANT_DEFAULT["int8"] + ("embedding",))}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf, base = build_pair(args.model, Path(tmp), "auto", "cpu", "float32")
        path = Path(tmp) / args.model
        ids = rng.integers(2, base.config.vocab_size, (args.batch, args.input_len))
        mask = np.ones_like(ids)
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, num_beams=1,
                  eos_token_id=1, pad_token_id=0)
        with torch.inference_mode():
            ref = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                              do_sample=False, **kw).numpy()
        systems, outputs = {}, {}
        for name, opts in variants.items():
            model = base if not opts else jt5.T5ForConditionalGeneration.from_pretrained(
                path, **opts)
            systems[name] = (lambda m=model: jax.block_until_ready(
                gen.generate_fixed(m, ids, mask, **kw)))
            out = systems[name]()  # compile
            outputs[name] = np.asarray(out.sequences[:, :int(out.length)])
        ct2 = build_ct2(path, base.config.vocab_size, ["float32", "int8"], args.threads)
        for ct, (translator, vocab) in ct2.items():
            src = [[vocab[i] for i in row] for row in ids]
            index = {t: i for i, t in enumerate(vocab)}

            def run(tr=translator, src=src):
                return tr.translate_batch(src, beam_size=1, max_decoding_length=args.new_tokens,
                                          min_decoding_length=args.new_tokens, max_batch_size=0)
            res = run()
            toks = np.zeros_like(ref)
            for r, hyp in enumerate(res):
                row = [index[t] for t in hyp.hypotheses[0]][:args.new_tokens]
                toks[r, 1:1 + len(row)] = row
            systems[f"ctranslate2 {ct}"], outputs[f"ctranslate2 {ct}"] = run, toks
        times = {name: [] for name in systems}
        for _ in range(args.rounds):
            for name, fn in systems.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    print(f"# jax {jax.__version__}, CPU, {args.threads} threads; {args.model} random weights, "
          f"batch {args.batch}, {args.input_len} -> {args.new_tokens} tokens, greedy; "
          f"{args.rounds} interleaved rounds")
    print("| system | s min / median / max | tok/s (median) | vs CTranslate2 int8, per round: "
          "median (min-max) | rows = transformers f32 |")
    print("|---|---|---|---|---|")
    base_t = times["ctranslate2 int8"]
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(base_t, ts)]
        same = float(np.mean((outputs[name] == ref).all(1))) if outputs[name].shape == \
            ref.shape else 0.0
        print(f"| {name} | {min(ts):.2f} / {statistics.median(ts):.2f} / {max(ts):.2f} | "
              f"{args.batch * args.new_tokens / statistics.median(ts):.0f} | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
              f"{same:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
