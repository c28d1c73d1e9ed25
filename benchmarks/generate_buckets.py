"""Input-length buckets: what padding a prompt to its bucket costs (jt5 only, t5-small random).

    python benchmarks/generate_buckets.py

Times greedy generation of 32 tokens (min_new_tokens = max_new_tokens) for a 128-token input in
its own bucket, and a 129-token input padded to 256 (the old power-of-two bucket), 160 (the
multiple-of-32 bucket jt5 uses now) and 144. Median of 3 after a compile; ratios vs 128/128.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import jt5  # noqa: E402
from jt5 import generate as gen

model = jt5.init_model(jt5.preset("t5-small", attention="xla"))
rng = np.random.default_rng(0)


def run(S, bucket, B=1, n=32):
    gen.bucket_length = lambda s: bucket
    ids = rng.integers(2, 32000, (B, S)).astype(np.int32)
    kw = dict(max_new_tokens=n, min_new_tokens=n)
    gen.generate(model, ids, None, **kw)  # compile
    ts = []
    for _ in range(3):
        t = time.perf_counter(); gen.generate(model, ids, None, **kw); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


for B in (1, 8):
    base = run(128, 128, B)
    for S, bk in ((129, 256), (129, 160), (129, 144)):
        t = run(S, bk, B)
        print(f"B={B} S={S} bucket={bk}: {t:.3f}s  vs 128/128 {base:.3f}s  ratio {t/base:.2f}", flush=True)
