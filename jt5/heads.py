"""Task heads on T5: sequence classification, token classification, extractive question answering
(as transformers defines them, checkpoints interchangeable both ways) and an encoder-only
sequence classifier.

    model = jt5.T5ForSequenceClassification.from_pretrained(hf_dir)   # or a base T5 checkpoint
    logits = model(input_ids, attention_mask)                          # [B, C] float32

- ``T5ForSequenceClassification``: the decoder state at each row's last EOS (decoder input: the
  input shifted right) -> ``[B, C]``;
- ``T5ForTokenClassification``: the encoder states (no decoder) -> ``[B, S, C]``;
- ``T5ForQuestionAnswering``: the decoder states (decoder input: the input shifted right) ->
  ``SpanLogits`` (start, end ``[B, S]``);
- ``T5EncoderForSequenceClassification``: the encoder states pooled by ``jt5.pooling``
  (``classifier_pooling``: mean over real tokens, or the first token) -> ``[B, C]``.

C (classes) is ``config.num_labels``. The first three are transformers' ``T5For*`` /
``MT5For*`` / ``UMT5For*`` (modeling_t5.py): the same tensors (``jt5.bridge.keymap.HEADS``) and
the same computation, including where each reads its hidden state: sequence classification runs
the whole encoder-decoder with ``decoder_input_ids = shift_right(input_ids)`` (no decoder padding
mask, causal only) and takes the decoder output at the last EOS of each row; rows with different
EOS counts are refused as transformers refuses them (checked whenever the ids are concrete; under
``jax.jit`` each row's last EOS is used). ``T5EncoderForSequenceClassification`` is jt5's (after
TurboT5's encoder classifier): it runs no decoder (the sequence classifier runs a whole decoder
over the shifted input, cross-attending to every input token); it keeps transformers'
``T5ClassificationHead`` (dense, tanh, out_proj) and stores its encoder under ``transformer.``
as ``T5ForTokenClassification`` does, so transformers' ``T5EncoderModel`` reads its encoder
from the file.

Heads compute in float32 whatever the model dtype. ``classifier_dropout`` applies where
transformers applies it. Freshly initialised heads (a base checkpoint loaded into a head) draw
matrices from normal(0, initializer_factor / sqrt(d_model)) — transformers' init for the
classification and QA heads; its token classifier starts at std 1.0, which makes initial logits
O(sqrt(d_model)), so jt5 uses the same fan-in scale there too — and biases at zero.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jt5 import weights
from jt5.config import T5Config
from jt5.layers import Embed, dropout
from jt5.model import Decoder, Encoder, decoder_masks, encoder_mask
from jt5.pooling import pool


# The T5Config fields a head adds (transformers' config.json keys, plus classifier_pooling).
CONFIG_FIELDS = ("num_labels", "id2label", "problem_type", "classifier_dropout",
                 "classifier_pooling")


class SpanLogits(NamedTuple):
    start_logits: jax.Array    # [B, S] float32
    end_logits: jax.Array      # [B, S] float32


class Dense(nnx.Module):
    """``nn.Linear`` with a bias, in float32: kernel ``[D, C]`` (the bridge transposes it)."""

    def __init__(self, config: T5Config, d_in: int, d_out: int, axes, *, rngs: nnx.Rngs):
        std = config.initializer_factor * config.d_model ** -0.5
        pd = jnp.dtype(config.param_dtype)
        self.kernel = nnx.Param((std * jax.random.normal(rngs.params(), (d_in, d_out),
                                                         jnp.float32)).astype(pd),
                                out_sharding=tuple(axes), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((d_out,), pd), out_sharding=(axes[1],),
                              eager_sharding=False)

    def __call__(self, x):  # [..., D] -> [..., C]
        y = jnp.einsum("...D,DC->...C", x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
        return y + self.bias[...].astype(jnp.float32)


class ClassificationHead(nnx.Module):
    """transformers' ``T5ClassificationHead``: dropout, dense ``D -> D``, tanh, dropout,
    out_proj ``D -> C``."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.rate = config.classifier_dropout
        self.dense = Dense(config, config.d_model, config.d_model, ("embed", "mlp"), rngs=rngs)
        self.out_proj = Dense(config, config.d_model, config.num_labels, ("embed", None),
                              rngs=rngs)

    def __call__(self, x, rngs=None, deterministic=True):  # [B, D] -> [B, C]
        x = dropout(x.astype(jnp.float32), self.rate, rngs, deterministic)
        x = jnp.tanh(self.dense(x))
        return self.out_proj(dropout(x, self.rate, rngs, deterministic))


def shift_right(input_ids, start_id: int):
    """The decoder input transformers' heads build from the input: ``[start, x0, .., x_{S-2}]``."""
    input_ids = jnp.asarray(input_ids)  # numpy int64 ids become jax's int32 here, once
    start = jnp.full(input_ids.shape[:-1] + (1,), start_id, input_ids.dtype)
    return jnp.concatenate([start, input_ids[..., :-1]], axis=-1)


def check_eos_counts(input_ids, eos_id: int) -> None:
    """transformers' rule for sequence classification: every row holds the same number (>= 1) of
    EOS tokens. Checked when the ids are concrete; nothing to check under a trace."""
    try:
        ids = np.asarray(input_ids)
    except jax.errors.TracerArrayConversionError:
        return
    counts = (ids == eos_id).sum(-1)
    if counts.size and counts.min() < 1:
        rows = np.flatnonzero(counts < 1).tolist()
        raise ValueError(f"each row must contain an EOS token (id {eos_id}); rows {rows[:8]} "
                         "have none")
    if counts.size and counts.min() != counts.max():
        raise ValueError(f"all rows must have the same number of EOS tokens (id {eos_id}), as in "
                         f"transformers; counts per row: {counts.tolist()[:16]}")


def last_eos_states(hidden, input_ids, eos_id: int):
    """``hidden [B, S, D]`` at each row's last EOS position -> ``[B, D]``."""
    S = input_ids.shape[1]
    is_eos = input_ids == eos_id
    last = S - 1 - jnp.argmax(is_eos[:, ::-1], axis=1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


class _Head(nnx.Module):
    """What every head class shares: loading, saving, and the head's own initial parameters."""

    task_head: str = ""         # jt5.bridge.keymap.HEADS key
    head_attr: str = ""         # the attribute holding the head's parameters
    encoder_only: bool = False

    @staticmethod
    def _make_head(config: T5Config, rngs: nnx.Rngs) -> nnx.Module:
        raise NotImplementedError

    @classmethod
    def init_head(cls, config: T5Config, seed: int = 0) -> dict:
        """``{jt5 path: array}`` of a freshly initialised head (what ``from_pretrained`` uses
        when the checkpoint has none)."""
        module = cls._make_head(config, nnx.Rngs(params=seed))
        return {(cls.head_attr,) + tuple(p): v.get_value()
                for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}

    @classmethod
    def from_pretrained(cls, path, *, dtype: Optional[str] = None,
                        attention: Optional[str] = None, num_labels: Optional[int] = None,
                        id2label=None, **config_overrides):
        """Load a transformers directory: this head's checkpoint, or any T5-family checkpoint
        (the head then starts fresh, with a warning naming its parameters). ``id2label``: a
        sequence of label names or transformers' ``{id: name}``; sets ``num_labels``."""
        return weights.load_hf(path, cls, dtype=dtype, attention=attention,
                               **config_overrides, **label_fields(num_labels, id2label))

    def save_pretrained(self, path):
        """Write a directory that transformers' head class (``architectures``) loads as is."""
        weights.save_hf(self, path)

    def _encode(self, input_ids, attention_mask, rngs, deterministic):
        return self.encoder(self.shared(input_ids), encoder_mask(input_ids, attention_mask),
                            rngs, deterministic)

    def _decode_shifted(self, input_ids, attention_mask, rngs, deterministic):
        """Encoder, then the decoder over the input shifted right (transformers' heads)."""
        encoded = self._encode(input_ids, attention_mask, rngs, deterministic)
        dec = shift_right(input_ids, self.config.decoder_start_token_id)
        B, S = input_ids.shape
        self_mask, cross_mask = decoder_masks(B, S, S, attention_mask)
        return self.decoder(self.shared(dec), encoded, self_mask, cross_mask, rngs, deterministic)


def label_fields(num_labels: Optional[int], id2label) -> dict:
    """Config overrides for a label set: ``id2label`` (names, or ``{id: name}``) decides
    ``num_labels``; ``num_labels`` alone resets the names to transformers' LABEL_i."""
    if id2label is not None:
        if isinstance(id2label, dict):
            keys = sorted(int(k) for k in id2label)
            if keys != list(range(len(keys))):
                raise ValueError(f"id2label keys must be 0..{len(keys) - 1}, got {keys}")
            id2label = [id2label[k] if k in id2label else id2label[str(k)] for k in keys]
        names = tuple(str(x) for x in id2label)
        if num_labels is not None and num_labels != len(names):
            raise ValueError(f"num_labels={num_labels} but id2label names {len(names)} labels")
        return {"num_labels": len(names), "id2label": names}
    if num_labels is not None:
        return {"num_labels": int(num_labels), "id2label": ()}
    return {}


class T5ForSequenceClassification(_Head):
    """transformers' ``T5ForSequenceClassification``: ``model(input_ids, attention_mask) ->
    [B, C]`` logits from the decoder state at each row's last EOS."""

    task_head, head_attr = "sequence-classification", "classification_head"

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = Embed(config, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.classification_head = self._make_head(config, rngs)

    @staticmethod
    def _make_head(config, rngs):
        return ClassificationHead(config, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, *, rngs=None, deterministic=True):
        check_eos_counts(input_ids, self.config.eos_token_id)
        h = self._decode_shifted(input_ids, attention_mask, rngs, deterministic)
        rep = last_eos_states(h, input_ids, self.config.eos_token_id)            # [B, D]
        return self.classification_head(rep, rngs, deterministic)


class T5ForTokenClassification(_Head):
    """transformers' ``T5ForTokenClassification``: ``model(input_ids, attention_mask) ->
    [B, S, C]`` logits from the encoder states (no decoder)."""

    task_head, head_attr, encoder_only = "token-classification", "classifier", True

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = Embed(config, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.classifier = self._make_head(config, rngs)

    @staticmethod
    def _make_head(config, rngs):
        return Dense(config, config.d_model, config.num_labels, ("embed", None), rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, *, rngs=None, deterministic=True):
        h = self._encode(input_ids, attention_mask, rngs, deterministic)
        h = dropout(h, self.config.classifier_dropout, rngs, deterministic)
        return self.classifier(h)


class T5ForQuestionAnswering(_Head):
    """transformers' ``T5ForQuestionAnswering``: ``model(input_ids, attention_mask) ->
    SpanLogits`` (start / end ``[B, S]``) from the decoder states over the shifted input."""

    task_head, head_attr = "question-answering", "qa_outputs"

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = Embed(config, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.qa_outputs = self._make_head(config, rngs)

    @staticmethod
    def _make_head(config, rngs):
        return Dense(config, config.d_model, 2, ("embed", None), rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, *, rngs=None,
                 deterministic=True) -> SpanLogits:
        h = self._decode_shifted(input_ids, attention_mask, rngs, deterministic)
        logits = self.qa_outputs(h)                                               # [B, S, 2]
        return SpanLogits(logits[..., 0], logits[..., 1])


class T5EncoderForSequenceClassification(_Head):
    """Encoder-only sequence classification: ``model(input_ids, attention_mask) -> [B, C]`` from
    the encoder states pooled by ``config.classifier_pooling`` (``jt5.pooling``)."""

    task_head, head_attr, encoder_only = "encoder-classification", "classification_head", True

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = Embed(config, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.classification_head = self._make_head(config, rngs)

    @staticmethod
    def _make_head(config, rngs):
        return ClassificationHead(config, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, *, rngs=None, deterministic=True):
        h = self._encode(input_ids, attention_mask, rngs, deterministic)
        mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
        return self.classification_head(pool(h, mask, self.config.classifier_pooling), rngs,
                                        deterministic)


HEAD_CLASSES = {c.task_head: c for c in (
    T5ForSequenceClassification, T5ForTokenClassification, T5ForQuestionAnswering,
    T5EncoderForSequenceClassification)}
