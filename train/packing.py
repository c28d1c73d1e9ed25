"""Two-dimensional best-fit packing of UL2 examples into fixed [rows, inputs] x [rows, targets].

    shapes = Shapes(mixture, inputs_length, targets_length, num_sentinels)
    plan = pack(shapes, candidates, rows, min_chunk=0.5)   # Plan: which candidates go where, how long

Why a second dimension matters. An encoder-decoder row has two budgets, ``inputs_length`` and
``targets_length``, and each UL2 denoiser fills them in its own ratio: at 512/114 an R example
(μ=3, r=0.15) of a full chunk is (510, 114) -- both sides full -- while an X example at r=0.5 is
(115, 114): its targets are full with three quarters of the inputs empty. First-fit on whole
examples therefore places about one example per row (encoder fill 0.59 at 512/114, decoder 0.67
at 512/512). Filling both sides needs the rows' *sums* to have the row's ratio, and the mixture's
examples do not have it on average: the count-weighted ratio of the UL2 mixture's full-length
examples is ~2.3 inputs per target token, the row's is 4.5 at 512/114 (and ~1.3 vs 1.0 at
512/512). So no placement of full-length examples fills both sides; only shorter chunks for the
examples on the heavy side can. ``min_chunk`` says how much shorter the packer may make a chunk
(a fraction of the chunk it would take unpacked; 1.0 keeps every example whole), the trade-off
between fill and how far the denoisers' chunk lengths move from the configured ones -- measured
by ``python -m jt5.train.data --min-chunk ...`` (RESULTS.md).

The algorithm keeps the mixture honest: candidates (denoiser, document, position) are drawn i.i.d.
and placed *in the order drawn*, never picked by size, so no denoiser is preferred. Each goes to
the row, among those that take at least ``min_chunk`` of its (planned) chunk, that scores best:
the row left most even (|free inputs - free targets| in row units), then fullest, with a
penalty of ``shrink_penalty`` per unit of the chunk cut off -- so a whole placement wins
unless a cut one pairs far better (an S example that would leave a row's inputs empty is cut
to share the row with input-heavy R examples instead). A candidate no row takes is dropped. The batch ends after ``patience`` consecutive drops, or when no
row could take even a smallest example. Dropped draws are random draws (sampling is with
replacement), not pieces of the corpus; they are few (``Plan.dropped``) and, since placement
never looks ahead, the realised mixture stays within sampling noise of the configured one.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

from jt5.train.ul2 import Denoiser, fit_raw_length, noise_counts

MIN_INPUTS, MIN_TARGETS = 3, 2  # the smallest example: [mode] token EOS / token EOS
MIN_CHUNK = 1.0  # DataConfig's default; see the module docstring and RESULTS.md for the trade-off


class Shapes:
    """Per-denoiser example lengths as functions of the chunk length, and their inverses.

    For span corruption ``inputs[d][n]`` / ``targets[d][n]`` are the lengths (mode and EOS
    included) of an example made from an n-token chunk, and ``longest_for_inputs[d][f]`` the
    longest chunk whose inputs fit in f slots (0: none); the S denoiser's halves are free, so
    its rows are None.
    """

    def __init__(self, mixture: Sequence[Denoiser], inputs_length: int, targets_length: int,
                 num_sentinels: int):
        self.inputs_length, self.targets_length = inputs_length, targets_length
        self.has_mode = np.array([d.mode is not None for d in mixture], np.int64)
        self.is_s = np.array([d.kind == "S" for d in mixture])
        self.max_chunk = np.array([fit_raw_length(d, inputs_length, targets_length, num_sentinels,
                                                  int(d.mode is not None)) for d in mixture],
                                  np.int64)
        self.inputs, self.targets = [], []
        self.longest_for_inputs, self.longest_for_targets = [], []
        for d, n_max, p in zip(mixture, self.max_chunk, self.has_mode):
            if d.kind == "S":
                for table in (self.inputs, self.targets, self.longest_for_inputs,
                              self.longest_for_targets):
                    table.append(None)
                continue
            n = np.arange(n_max + 1)
            noise, spans = noise_counts(np.maximum(n, 2), d.rate, d.mean_span)
            a = n - noise + spans + 1 + p
            b = noise + spans + 1
            a[:2] = b[:2] = np.iinfo(np.int64).max  # no example from fewer than 2 tokens
            self.inputs.append(a)
            self.targets.append(b)
            # both grow monotonically with n (fit_raw_length relies on it): the inverse is a
            # searchsorted; longest chunk with a(n) <= f
            self.longest_for_inputs.append(
                np.searchsorted(a[2:], np.arange(inputs_length + 1), side="right") + 1)
            self.longest_for_targets.append(
                np.searchsorted(b[2:], np.arange(targets_length + 1), side="right") + 1)

    def lengths(self, d: int, n):
        """(inputs, targets) lengths of span-corruption denoiser d's example of an n-token chunk."""
        return self.inputs[d][n], self.targets[d][n]


class Plan(NamedTuple):
    """Where each placed candidate goes (arrays over placed candidates, in draw order)."""
    index: np.ndarray      # [E] int64: the candidate's position in the draw order
    length: np.ndarray     # [E] int64: chunk length the packer chose (<= the whole chunk)
    split: np.ndarray      # [E] int64: S prefix length (-1 for span corruption)
    row: np.ndarray        # [E] int64
    inputs_offset: np.ndarray   # [E] int64
    targets_offset: np.ndarray  # [E] int64
    segment: np.ndarray    # [E] int64: 1, 2, ... within a row
    dropped: int           # candidates that fit no row
    drawn: int             # candidates looked at (placed + dropped)


class Candidates(NamedTuple):
    """Draws before packing: denoiser, the chunk each would take unpacked (``natural``) and the
    chunk the packer plans for it (``balance_scales`` applied)."""
    which: np.ndarray           # [C] denoiser index
    length: np.ndarray          # [C] planned chunk length
    split: np.ndarray           # [C] planned S prefix length, -1 for span corruption
    natural_length: np.ndarray  # [C] the chunk unpacked (document-limited)
    natural_split: np.ndarray   # [C]


def balance_scales(shapes: Shapes, probs, s_prefix_mean: float, min_chunk: float) -> np.ndarray:
    """Per-denoiser chunk scale in [min_chunk, 1] so that the mixture's expected demand has the
    row's inputs : targets ratio, shrinking as little as possible (Σ p·(1 - scale) least).

    In units of a row, example d demands u_d = inputs/L_in - targets/L_tgt more of the inputs
    than of the targets; rows fill on both sides when Σ p_d·scale_d·u_d = 0. That is a
    fractional knapsack: shrink the heavy side's denoisers, the most lopsided first (each unit
    of shrink buys the most balance there), down to ``min_chunk``.
    """
    L_in, L_tgt = shapes.inputs_length, shapes.targets_length
    u = np.zeros(len(probs))
    for d in range(len(probs)):
        if shapes.is_s[d]:  # prefix uniform in [1, room] + a full target
            a, b = s_prefix_mean + 1 + shapes.has_mode[d], L_tgt
        else:
            a, b = shapes.lengths(d, shapes.max_chunk[d])
        u[d] = a / L_in - b / L_tgt
    scale = np.ones(len(probs))
    excess = float(np.dot(probs, u))
    for d in np.argsort(-np.abs(u)):
        if excess == 0 or np.sign(u[d]) != np.sign(excess):
            continue
        cut = min(1.0 - min_chunk, excess / (probs[d] * u[d]))  # shrink d by this much
        scale[d] -= cut
        excess -= probs[d] * u[d] * cut
    return np.maximum(scale, min_chunk)  # no rounding below the floor


def pack(shapes: Shapes, draw, rows: int, *, min_chunk: float = 1.0, patience: int = 8,
         block: int = 0, evenness_weight: float = 0.05,
         shrink_penalty: Optional[float] = 0.5) -> Plan:
    """Place candidates from ``draw(n) -> Candidates`` into ``rows`` rows (see module docstring).

    ``draw`` is called for blocks of ``block`` (default ``rows``) candidates as needed; the plan
    refers to candidates by their position in the concatenated draws.
    """
    if not 0.0 < min_chunk <= 1.0:
        raise ValueError(f"{min_chunk=} must be in (0, 1]")
    L_in, L_tgt = shapes.inputs_length, shapes.targets_length
    free_in = np.full(rows, L_in, np.int64)
    free_tgt = np.full(rows, L_tgt, np.int64)
    nseg = np.zeros(rows, np.int64)
    out = {k: [] for k in ("index", "length", "split", "row", "inputs_offset", "targets_offset",
                           "segment")}
    block = block or rows
    drawn = dropped = misses = 0
    scale = np.array([1.0 / L_in, 1.0 / L_tgt])
    while misses < patience:
        if not np.any((free_in >= MIN_INPUTS) & (free_tgt >= MIN_TARGETS)):
            break
        cand = draw(block)
        for d, whole, whole_split, natural, natural_split in zip(
                cand.which.tolist(), cand.length.tolist(), cand.split.tolist(),
                cand.natural_length.tolist(), cand.natural_split.tolist()):
            idx = drawn
            drawn += 1
            if shapes.is_s[d]:
                p = int(shapes.has_mode[d])
                prefix0, target0 = whole_split, whole - whole_split
                # S keeps its split point's share: prefix and continuation shrink apart.
                prefix = np.minimum(prefix0, free_in - 1 - p)
                target = np.minimum(target0, free_tgt - 1)
                lo_p = max(1, min(prefix0, int(np.ceil(min_chunk * natural_split))))
                lo_t = max(1, min(target0, int(np.ceil(min_chunk * (natural - natural_split)))))
                ok = (prefix >= lo_p) & (target >= lo_t)
                a, b = prefix + 1 + p, target + 1
                n, split = prefix + target, prefix
            else:
                n = np.minimum(np.minimum(shapes.longest_for_inputs[d][free_in],
                                          shapes.longest_for_targets[d][free_tgt]), whole)
                ok = n >= max(2, min(whole, int(np.ceil(min_chunk * natural))))
                n = np.where(ok, n, 2)
                a, b = shapes.lengths(d, n)
                split = None
            if not ok.any():
                dropped += 1
                misses += 1
                if misses >= patience:
                    break
                continue
            misses = 0
            full = ok & (n == whole)
            left_in, left_tgt = (free_in - a) * scale[0], (free_tgt - b) * scale[1]
            score = np.abs(left_in - left_tgt) + evenness_weight * (left_in + left_tgt)
            if shrink_penalty is not None:  # every row that takes enough of it competes
                score = score + shrink_penalty * (1.0 - n / whole)
                r = int(np.argmin(np.where(ok, score, np.inf)))
            elif full.any():  # whole somewhere: the row it leaves most even, then fullest
                r = int(np.argmin(np.where(full, score, np.inf)))
            else:           # shortened: where the longest chunk fits
                r = int(np.argmax(np.where(ok, n, -1)))
            nseg[r] += 1
            out["index"].append(idx)
            out["length"].append(int(n[r]))
            out["split"].append(-1 if split is None else int(split[r]))
            out["row"].append(r)
            out["inputs_offset"].append(L_in - int(free_in[r]))
            out["targets_offset"].append(L_tgt - int(free_tgt[r]))
            out["segment"].append(int(nseg[r]))
            free_in[r] -= int(a[r])
            free_tgt[r] -= int(b[r])
    arrays = {k: np.asarray(v, np.int64) for k, v in out.items()}
    return Plan(**arrays, dropped=dropped, drawn=drawn)
