"""FLOPs of jt5's programs, counted from the model's shapes.

XLA's ``cost_analysis()`` is empty for a deviceless GPU compile on jax 0.10.2, so ``jt5 plan``
counts: every matmul (projections, MLPs, the head, the one-hot embedding where the job uses it)
at 2 FLOPs per multiply-add, and attention as ``4 * H * N`` per *visible* query-key pair
(``Q K^T`` and ``P V``), with the pairs counted per mask kind (full, causal, local window,
LongT5's transient-global side keys). Training is forward + backward = 3 x forward (model
FLOPs, the convention of MFU: recomputation under remat and the flash backward's recomputed
scores are not counted). Elementwise work (norms, softmax, the optimizer) is left out; the test
holds the count to XLA's CPU cost analysis of the same program (``tests/test_plan.py``).

``dense=True`` counts what a dense implementation computes (every pair of the ``[T, S]`` score
matrix, masked or not): XLA's dense path does that; the kernels skip masked blocks.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jt5.config import T5Config


class Flops(NamedTuple):
    matmul: float = 0.0      # projections, MLPs, head, one-hot embedding
    attention: float = 0.0   # scores and weighted values over the visible pairs

    @property
    def total(self) -> float:
        return self.matmul + self.attention

    def __add__(self, other):  # noqa: D105  (tuple + would concatenate)
        return Flops(self.matmul + other.matmul, self.attention + other.attention)

    def scaled(self, k: float) -> "Flops":
        return Flops(self.matmul * k, self.attention * k)


def window_pairs(length: int, window: int, num_global_tokens: int = 0) -> int:
    """Visible (query, key) pairs of ``length`` tokens under ``|k - q| <= window``, where a
    query or key below ``num_global_tokens`` sees / is seen by all (``spec.visible``'s rule)."""
    g = min(num_global_tokens, length)
    i = np.arange(g, length, dtype=np.int64)          # the non-global queries
    lo, hi = np.maximum(0, i - window), np.minimum(length - 1, i + window)
    # their window, plus the global keys left of it (keys below g are never right of it)
    return g * length + int(np.sum(hi - lo + 1) + np.sum(np.minimum(g, lo)))


def causal_pairs(length: int) -> int:
    return length * (length + 1) // 2


def _proj(cfg: T5Config) -> int:
    """FLOPs per token of one q/k/v/o-sized projection: 2 * D * N * H."""
    return 2 * cfg.d_model * cfg.num_heads * cfg.d_kv


def _mlp(cfg: T5Config) -> int:
    return (3 if cfg.is_gated else 2) * 2 * cfg.d_model * cfg.d_ff


def _attn(cfg: T5Config, pairs: float) -> float:
    return 4.0 * cfg.d_kv * cfg.num_heads * pairs


def encoder_forward(cfg: T5Config, batch: int, length: int, *, dense: bool = False) -> Flops:
    """One encoder pass over ``batch`` rows of ``length`` tokens."""
    L, tokens = cfg.num_layers, batch * length
    matmul = L * tokens * (4 * _proj(cfg) + _mlp(cfg))
    kind = cfg.encoder_attention_type
    if dense or kind == "full":
        pairs = length * length
    else:
        pairs = window_pairs(length, cfg.local_radius, cfg.num_global_tokens)
    if kind == "transient-global":
        G = length // cfg.global_block_size
        matmul += L * batch * G * 2 * _proj(cfg)     # k, v of the block sums
        pairs = (length * length if dense else pairs) + length * G
    return Flops(matmul, L * batch * _attn(cfg, pairs))


def decoder_forward(cfg: T5Config, batch: int, targets: int, inputs: int, *,
                    dense: bool = False) -> Flops:
    """Teacher-forced decoder over ``targets`` tokens attending to ``inputs`` encoder states,
    the head included."""
    L = cfg.num_decoder_layers or cfg.num_layers
    matmul = L * batch * (targets * (6 * _proj(cfg) + _mlp(cfg))   # self q,k,v,o; cross q,o
                          + inputs * 2 * _proj(cfg))                 # cross k, v
    matmul += batch * targets * 2 * cfg.d_model * cfg.vocab_size
    self_pairs = targets * targets if dense else causal_pairs(targets)
    attention = L * batch * _attn(cfg, self_pairs + targets * inputs)
    return Flops(matmul, attention)


def embedding(cfg: T5Config, tokens: int, one_hot: bool) -> Flops:
    """The lookup: a gather (no FLOPs) or, vocabulary-sharded / ``one_hot_embedding``, a one-hot
    matmul."""
    return Flops(2.0 * tokens * cfg.vocab_size * cfg.d_model if one_hot else 0.0)


def train_step(cfg: T5Config, batch: int, inputs: int, targets: int, *, one_hot: bool = False,
               dense: bool = False) -> Flops:
    """Forward and backward of one step of ``batch`` rows (3 x the forward)."""
    fwd = (encoder_forward(cfg, batch, inputs, dense=dense)
           + decoder_forward(cfg, batch, targets, inputs, dense=dense)
           + embedding(cfg, batch * (inputs + targets), one_hot))
    return fwd.scaled(3.0)


def generate(cfg: T5Config, batch: int, inputs: int, *, rows_per_input: int, new_tokens: int,
             one_hot: bool = False) -> Flops:
    """Encoder, cross K/V once, then ``new_tokens`` decode steps of ``batch * rows_per_input``
    rows (the loop may stop earlier: an upper bound)."""
    L = cfg.num_decoder_layers or cfg.num_layers
    rows, n = batch * rows_per_input, new_tokens
    out = encoder_forward(cfg, batch, inputs) + embedding(cfg, batch * inputs, one_hot)
    out += Flops(L * batch * inputs * 2 * _proj(cfg))                    # cross k, v once
    per_token = L * (6 * _proj(cfg) + _mlp(cfg)) + 2 * cfg.d_model * cfg.vocab_size
    out += Flops(rows * n * per_token) + embedding(cfg, rows * n, one_hot)
    out += Flops(0.0, L * rows * _attn(cfg, causal_pairs(n) + n * inputs))
    return out
