"""Accuracy of local and transient-global encoder attention on a T5 checkpoint, against the full
attention it was trained with (TurboT5's idea: run any T5 with LongT5-style attention at load
time).

    python benchmarks/long_input.py                       # tiny random T5, 512 tokens (~2 min CPU)
    python benchmarks/long_input.py --model DIR --length 1024 --radii 255,127,63

One checkpoint (``--model``: a transformers T5 directory; default: the ``tiny`` preset with
random weights, saved to a temporary directory) is loaded with ``from_pretrained(dir,
encoder_attention_type="local", local_radius=r[, num_global_tokens=g])`` for each radius and
compared with the same checkpoint under full attention on the same ``--batch`` inputs of
``--length`` tokens. Reported per radius: max relative logit error (teacher-forced decoder over
``--dec-len`` random targets), mean KL(full || local) of next-token distributions, agreement of
the teacher-forced argmax, and the fraction of greedy tokens (``--new-tokens``) equal to full
attention's, position by position. Random weights are a pessimistic case: their attention is
spread over the whole input, where a trained T5's mostly is not.

Transient-global rows (``--global-block-size g``, 0: skip) load the same checkpoint with
``encoder_attention_type="transient-global"``: its global bias table and global norms do not
exist in a T5 file and are initialised from the checkpoint (``jt5.longt5.to_transient_global``),
once per ``--global-inits`` choice. The random preset's norm scales are all 1, which makes
those choices identical, so by default every norm scale of the random checkpoint is multiplied
by ``exp(0.5 N(0, 1))`` per norm and ``exp(0.25 N(0, 1))`` per channel (``--norm-spread``; 0: keep).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jt5  # noqa: E402


@nnx.jit
def _logits(model, ids, dec, mask):
    return model(ids, dec, mask)


def _kl(ref, out) -> float:
    lr, lo = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(out, -1)
    return float(jnp.mean(jnp.sum(jnp.exp(lr) * (lr - lo), -1)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="transformers T5 directory (default: random tiny preset)")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dec-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--radii", default="511,255,127,63,31,15,7")
    p.add_argument("--global-tokens", type=int, default=16,
                   help="also run each radius with this many global tokens (0: skip)")
    p.add_argument("--global-block-size", type=int, default=16,
                   help="also run each radius with transient-global attention (0: skip)")
    p.add_argument("--global-inits", default="mass/rms,distance/rms,mass/scale,mass/ones",
                   help="BIAS/NORM initialisations of the global table and norms to compare "
                        "(jt5.longt5.GLOBAL_BIAS_INITS / GLOBAL_NORM_INITS)")
    p.add_argument("--norm-spread", type=float, default=0.5,
                   help="random preset only: spread of its norm scales (see above)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    path = a.model
    if path is None:
        path = tempfile.mkdtemp(prefix="jt5-long-input-")
        model = jt5.init_model(jt5.preset("tiny", attention="xla"), seed=a.seed)
        _spread_norms(model, a.norm_spread, a.seed)
        model.save_pretrained(path)
    full = jt5.T5ForConditionalGeneration.from_pretrained(path, attention="xla")
    V = full.config.vocab_size
    rng = np.random.default_rng(a.seed)
    ids = rng.integers(2, V, (a.batch, a.length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1::2, a.length * 3 // 4:] = 0  # every other row padded to 3/4 of the length
    ids[mask == 0] = 0
    dec = rng.integers(2, V, (a.batch, a.dec_len)).astype(np.int32)
    dec[:, 0] = full.config.decoder_start_token_id
    args = tuple(map(jnp.asarray, (ids, dec, mask)))
    gen_kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens)

    ref = _logits(full, *args)
    ref_tokens = np.asarray(full.generate(ids, mask, **gen_kw))[:, 1:]
    print(f"model: {a.model or 'random tiny preset'} ({full.config.num_layers} encoder layers, "
          f"relative_attention_max_distance={full.config.relative_attention_max_distance}); "
          f"{a.batch} inputs x {a.length} tokens (odd rows padded to {a.length * 3 // 4}), "
          f"{a.dec_len} teacher-forced targets, {a.new_tokens} greedy tokens\n")
    print("| local_radius | attention | max rel. logit error | mean KL | argmax agree | "
          "greedy tokens agree |")
    print("|---:|---|---:|---:|---:|---:|")
    variants = [("local", dict(num_global_tokens=0))]
    if a.global_tokens:
        variants.append((f"local + {a.global_tokens} global tokens",
                         dict(num_global_tokens=a.global_tokens)))
    if a.global_block_size:
        for init in a.global_inits.split(","):
            bias, norm = init.split("/")
            variants.append((f"transient-global g={a.global_block_size}, {bias}/{norm}",
                             dict(encoder_attention_type="transient-global",
                                  global_block_size=a.global_block_size, global_bias_init=bias,
                                  global_norm_init=norm)))
    for r in (int(x) for x in a.radii.split(",")):
        for name, kw in variants:
            kw = {"encoder_attention_type": "local", **kw}
            m = jt5.T5ForConditionalGeneration.from_pretrained(path, attention="xla",
                                                               local_radius=r, **kw)
            out = _logits(m, *args)
            err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
            agree = float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1)))
            tokens = np.asarray(m.generate(ids, mask, **gen_kw))[:, 1:]
            same = float(np.mean(tokens == ref_tokens))
            print(f"| {r} | {name} | {err:.2e} | {_kl(ref, out):.2e} | {agree:.1%} | "
                  f"{same:.1%} |", flush=True)


def _spread_norms(model, spread: float, seed: int):
    """Multiply every RMSNorm scale by exp(spread N(0,1)) per norm, exp(spread/2 N(0,1)) per
    channel (random checkpoints start at 1, where the global-norm choices coincide)."""
    if not spread:
        return
    rng = np.random.default_rng(seed + 1)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "scale":
            s = np.asarray(var.get_value())
            f = np.exp(spread * rng.standard_normal()) * np.exp(
                spread / 2 * rng.standard_normal(s.shape))
            var.set_value(jnp.asarray(s * f, s.dtype))


if __name__ == "__main__":
    main()
