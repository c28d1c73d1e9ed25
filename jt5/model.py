"""T5 encoder, decoder and the two public models.

Pre-norm residual blocks (Raffel et al. 2020 §2.1): ``x + f(RMSNorm(x))`` for self-attention,
cross-attention (decoder) and the MLP; a final RMSNorm per stack. Logits are float32.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from jt5 import attention_ops as ops
from jt5 import longt5, weights
from jt5.attention import KV, CrossAttention, DecoderSelfAttention, EncoderSelfAttention
from jt5.cache import Cache, empty_kv
from jt5.config import T5Config
from jt5.generation_config import GenerationConfig
from jt5.layers import MLP, Embed, RMSNorm, dropout, lm_logits, param, residual_dtype
from jt5.relpos import RelativePositionBias
from jt5.sharding import constrain

_ACT = ("batch", "length", "act_embed")


def _remat(config: T5Config, fn):
    """Wrap a layer call so its activations are recomputed in the backward pass."""
    if config.remat == "none":
        return fn
    policy = (jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
              if config.remat == "dots" else None)
    return nnx.remat(fn, policy=policy)


def _run_layers(config: T5Config, layers, fn, x, *args, rngs=None):
    """``x = fn(layer, x, *args, rngs)`` for each layer in order: unrolled, or with
    ``config.scan_layers`` as ONE ``lax.scan`` over the layers' stacked states, so XLA compiles
    the layer body once instead of once per layer (deep models compile in a fraction of the
    time). The parameters stay one module per layer (``layers.0``, ``layers.1``, ...): checkpoint
    layouts, exports and the decoding path are unchanged; the stack is built in the traced
    step and its gradient flows back to each layer's parameters. Dropout draws one key per
    layer from ``rngs`` (other random numbers than the unrolled loop's, same distribution)."""
    if not config.scan_layers or len(layers) < 2:
        call = _remat(config, fn)
        for layer in layers:
            x = call(layer, x, *args, rngs)
        return x
    graphdef = nnx.graphdef(layers[0])
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *(nnx.state(layer) for layer in layers))
    keys = None if rngs is None else jax.random.split(rngs.dropout(), len(layers))

    def body(x, xs):
        state, key = xs
        layer = nnx.merge(graphdef, state)
        return fn(layer, x, *args, None if key is None else nnx.Rngs(dropout=key)), None

    if config.remat != "none":
        policy = (jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
                  if config.remat == "dots" else None)
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (stacked, keys))
    return x


class EncoderLayer(nnx.Module):
    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.rate = config.dropout_rate
        self.self_attn_norm = RMSNorm(config, rngs=rngs)
        attn = (longt5.TransientGlobalSelfAttention
                if config.encoder_attention_type == "transient-global" else EncoderSelfAttention)
        self.self_attn = attn(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, plan, rngs=None, deterministic=True):
        """``plan``: an ``ops.Plan``, or a ``longt5.GlobalPlan`` for transient-global layers."""
        h = self.self_attn(self.self_attn_norm(x), plan)
        x = constrain(x + dropout(h, self.rate, rngs, deterministic), _ACT)
        h = self.mlp(self.mlp_norm(x), rngs=rngs, deterministic=deterministic)
        return constrain(x + dropout(h, self.rate, rngs, deterministic), _ACT)


class DecoderLayer(nnx.Module):
    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.rate = config.dropout_rate
        self.self_attn_norm = RMSNorm(config, rngs=rngs)
        self.self_attn = DecoderSelfAttention(config, rngs=rngs)
        self.cross_attn_norm = RMSNorm(config, rngs=rngs)
        self.cross_attn = CrossAttention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def _tail(self, x, encoded, cross_plan, cross_kv, rngs, deterministic):
        h = self.cross_attn(self.cross_attn_norm(x), encoded, cross_plan, kv=cross_kv)
        x = constrain(x + dropout(h, self.rate, rngs, deterministic), _ACT)
        h = self.mlp(self.mlp_norm(x), rngs=rngs, deterministic=deterministic)
        return constrain(x + dropout(h, self.rate, rngs, deterministic), _ACT)

    def __call__(self, x, encoded, self_plan, cross_plan, rngs=None, deterministic=True):
        h = self.self_attn(self.self_attn_norm(x), self_plan)
        x = constrain(x + dropout(h, self.rate, rngs, deterministic), _ACT)
        return self._tail(x, encoded, cross_plan, None, rngs, deterministic)

    def step(self, x, self_kv: KV, cross_kv: KV, index, self_plan, cross_plan):
        h, self_kv = self.self_attn.step(self.self_attn_norm(x), self_kv, index, self_plan)
        x = x + h
        return self._tail(x, None, cross_plan, cross_kv, None, True), self_kv


class Encoder(nnx.Module):
    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.relpos = (None if config.relative_bias_per_layer
                       else RelativePositionBias(config, bidirectional=True, rngs=rngs))
        # LongT5 transient-global: a second shared table, for the side keys' block distances.
        self.global_relpos = (RelativePositionBias(config, bidirectional=True, rngs=rngs)
                              if config.encoder_attention_type == "transient-global" else None)
        self.layers = nnx.List([EncoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config, rngs=rngs)

    def __call__(self, x, mask: ops.Mask, rngs=None, deterministic=True):
        """``x``: embedded tokens ``[B, S, D]`` -> hidden states ``[B, S, D]``."""
        cfg = self.config
        S = x.shape[1]
        bias = None if self.relpos is None else self.relpos()
        if self.global_relpos is not None:
            plan = longt5.make_global_plan(cfg, mask, S, bias, self.global_relpos())
        else:
            plan = ops.make_plan(impl=cfg.attention, q_len=S, kv_len=S,
                                 mask=longt5.encoder_mask(cfg, mask), bias=bias)
        x = dropout(x.astype(residual_dtype(cfg)), cfg.dropout_rate, rngs, deterministic)
        x = _run_layers(cfg, self.layers, lambda layer, x, plan, rngs:
                        layer(x, plan, rngs, deterministic), x, plan, rngs=rngs)
        x = self.final_norm(x)
        return dropout(x, cfg.dropout_rate, rngs, deterministic)


class Decoder(nnx.Module):
    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.relpos = (None if config.relative_bias_per_layer
                       else RelativePositionBias(config, bidirectional=False, rngs=rngs))
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs)
                                for _ in range(config.num_decoder_layers)])
        self.final_norm = RMSNorm(config, rngs=rngs)

    def _bias(self):
        return None if self.relpos is None else self.relpos()

    def __call__(self, x, encoded, self_mask: ops.Mask, cross_mask: ops.Mask, rngs=None,
                 deterministic=True):
        cfg = self.config
        T, S = x.shape[1], encoded.shape[1]
        self_plan = ops.make_plan(impl=cfg.attention, q_len=T, kv_len=T, mask=self_mask,
                                  bias=self._bias())
        cross_plan = ops.make_plan(impl=cfg.attention, q_len=T, kv_len=S, mask=cross_mask)
        x = dropout(x.astype(residual_dtype(cfg)), cfg.dropout_rate, rngs, deterministic)
        x = _run_layers(cfg, self.layers, lambda layer, x, enc, sp, cp, rngs:
                        layer(x, enc, sp, cp, rngs, deterministic),
                        x, encoded, self_plan, cross_plan, rngs=rngs)
        x = self.final_norm(x)
        return dropout(x, cfg.dropout_rate, rngs, deterministic)

    def step(self, x, cache: Cache, index):
        """Decode ``x: [B, T, D]`` at positions ``index..index+T-1``; returns hidden, new cache."""
        cfg = self.config
        T = x.shape[1]
        self_plan = ops.make_plan(impl=cfg.attention, q_len=T, kv_len=cache.max_length,
                                  mask=ops.Mask(causal=True), bias=self._bias(), q_offset=index)
        cross_plan = ops.make_plan(impl=cfg.attention, q_len=T, kv_len=cache.encoder_length,
                                   mask=ops.Mask(kv_segment_ids=cache.encoder_segment_ids))
        x = x.astype(residual_dtype(cfg))
        new_kv = []
        for layer, skv, ckv in zip(self.layers, cache.self_kv, cache.cross_kv):
            x, skv = layer.step(x, skv, ckv, index, self_plan, cross_plan)
            new_kv.append(skv)
        return self.final_norm(x), cache.replace(self_kv=tuple(new_kv))


def encoder_mask(input_ids, attention_mask, segment_ids=None) -> ops.Mask:
    """The encoder's self-attention mask from a padding mask or packing segment ids."""
    B, S = input_ids.shape
    if segment_ids is not None:
        return ops.Mask(q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
    return ops.Mask(kv_segment_ids=ops.segment_ids_from_mask(attention_mask, S, B))


def decoder_masks(B: int, T: int, S: int, attention_mask=None, decoder_attention_mask=None, *,
                  encoder_segment_ids=None, decoder_segment_ids=None):
    """(causal self-attention mask, cross-attention mask) of a teacher-forced decoder pass."""
    if decoder_segment_ids is not None:
        if encoder_segment_ids is None:
            raise ValueError("packed decoding (decoder_segment_ids) needs encoder_segment_ids")
        return (ops.Mask(q_segment_ids=decoder_segment_ids, kv_segment_ids=decoder_segment_ids,
                         causal=True),
                ops.Mask(q_segment_ids=decoder_segment_ids, kv_segment_ids=encoder_segment_ids))
    kv = (encoder_segment_ids if encoder_segment_ids is not None
          else ops.segment_ids_from_mask(attention_mask, S, B))
    return (ops.Mask(kv_segment_ids=ops.segment_ids_from_mask(decoder_attention_mask, T, B),
                     causal=True),
            ops.Mask(kv_segment_ids=kv))


class T5EncoderModel(nnx.Module):
    """The encoder alone: ``model(input_ids, attention_mask) -> [B, S, D]`` hidden states."""
    encoder_only = True  # reads and writes the encoder's weights only

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = Embed(config, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, *, segment_ids=None, rngs=None,
                 deterministic=True):
        x = self.shared(input_ids)
        return self.encoder(x, encoder_mask(input_ids, attention_mask, segment_ids), rngs,
                            deterministic)

    @classmethod
    @longt5.accepts_transient_global  # transient-global on any T5 checkpoint too
    def from_pretrained(cls, path, *, dtype: str | None = None, attention: str | None = None,
                        **config_overrides):
        return weights.load_hf(path, cls, dtype=dtype, attention=attention, **config_overrides)

    def save_pretrained(self, path):
        weights.save_hf(self, path)


class T5ForConditionalGeneration(nnx.Module):
    """T5 encoder-decoder with the LM head: ``model(input_ids, decoder_input_ids) -> logits``."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = Embed(config, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        # An untied head starts at std d_model**-0.5 (t5x's fan-in variance scaling) so initial
        # logits are O(1); transformers' std 1.0 starts pretraining at a loss of ~sqrt(d_model).
        self.lm_head = (None if config.tie_word_embeddings else
                        param(rngs, (config.d_model, config.vocab_size), ("embed", "vocab"),
                              std=config.initializer_factor * config.d_model**-0.5,
                              dtype=jnp.dtype(config.param_dtype)))
        # The checkpoint's generation defaults (generation_config.json, else config.json's
        # generation fields), set by the loader; ``generate`` falls back to them.
        self.generation_config = GenerationConfig()

    # -- pieces -------------------------------------------------------------------------------
    def encode(self, input_ids, attention_mask=None, *, segment_ids=None, rngs=None,
               deterministic=True):
        """``[B, S]`` token ids -> encoder hidden states ``[B, S, D]``."""
        return self.encoder(self.shared(input_ids),
                            encoder_mask(input_ids, attention_mask, segment_ids), rngs,
                            deterministic)

    def head(self, hidden):
        """Decoder hidden states ``[B, T, D]`` -> float32 logits ``[B, T, V]``."""
        if self.config.scale_decoder_outputs:
            # Mesh TensorFlow scales the tied head's input by d_model**-0.5 (transformer.py L586).
            hidden = hidden * (self.config.d_model ** -0.5)
        if self.lm_head is None:
            return constrain(self.shared.head(hidden),
                             ("batch", "length", "act_vocab"))
        return constrain(lm_logits(hidden, self.lm_head[...], transposed=False),
                         ("batch", "length", "act_vocab"))

    def decode(self, decoder_input_ids, encoded, attention_mask=None, decoder_attention_mask=None,
               *, encoder_segment_ids=None, decoder_segment_ids=None, rngs=None,
               deterministic=True):
        """Teacher-forced decoder over the whole target: -> logits ``[B, T, V]`` (float32)."""
        B, T = decoder_input_ids.shape
        self_mask, cross_mask = decoder_masks(
            B, T, encoded.shape[1], attention_mask, decoder_attention_mask,
            encoder_segment_ids=encoder_segment_ids, decoder_segment_ids=decoder_segment_ids)
        x = self.shared(decoder_input_ids)
        h = self.decoder(x, encoded, self_mask, cross_mask, rngs, deterministic)
        return self.head(h)

    def __call__(self, input_ids, decoder_input_ids, attention_mask=None,
                 decoder_attention_mask=None, *, encoder_segment_ids=None,
                 decoder_segment_ids=None, rngs=None, deterministic=True):
        encoded = self.encode(input_ids, attention_mask, segment_ids=encoder_segment_ids,
                              rngs=rngs, deterministic=deterministic)
        return self.decode(decoder_input_ids, encoded, attention_mask, decoder_attention_mask,
                           encoder_segment_ids=encoder_segment_ids,
                           decoder_segment_ids=decoder_segment_ids, rngs=rngs,
                           deterministic=deterministic)

    # -- incremental decoding -----------------------------------------------------------------
    def init_cache(self, encoded, attention_mask=None, *, max_length: int,
                   rows_per_input: int = 1) -> Cache:
        """Prefill: cross-attention K/V of every layer from ``encoded`` and an empty self cache.

        ``rows_per_input``: decoder rows per encoder row (beams / samples per input; rows
        ``b*g .. b*g+g-1`` decode input ``b``). Cross K/V are kept once per input.
        """
        cfg = self.config
        B, S, _ = encoded.shape
        dt = jnp.dtype(cfg.dtype)
        layout = ops.kv_layout(cfg.attention)  # the attention implementation's cache layout
        cross = tuple(layer.cross_attn.project_kv(encoded).to(layout).astype(dt)
                      for layer in self.decoder.layers)
        selfkv = tuple(empty_kv(B * rows_per_input, max_length, cfg.num_heads, cfg.d_kv, dt,
                                layout) for _ in self.decoder.layers)
        return Cache(self_kv=selfkv, cross_kv=cross,
                     encoder_segment_ids=ops.segment_ids_from_mask(attention_mask, S, B))

    def decode_step(self, tokens, cache: Cache, index):
        """``tokens: [B, T]`` at positions ``index..index+T-1`` -> (logits ``[B, T, V]``, cache)."""
        h, cache = self.decoder.step(self.shared(tokens), cache, index)
        return self.head(h), cache

    # -- I/O and generation -------------------------------------------------------------------
    @classmethod
    @longt5.accepts_transient_global  # transient-global on any T5 checkpoint too
    def from_pretrained(cls, path, *, dtype: str | None = None, attention: str | None = None,
                        **config_overrides):
        """Load a transformers directory (config.json + safetensors / pytorch_model.bin)."""
        return weights.load_hf(path, cls, dtype=dtype, attention=attention, **config_overrides)

    def save_pretrained(self, path):
        """Write a directory that transformers' ``from_pretrained`` loads as is."""
        weights.save_hf(self, path)

    def generate(self, input_ids, attention_mask=None, generation_config=None, **kwargs):
        """Greedy / sampling / beam search in one compiled loop (see ``jt5.generate``);
        options not given come from ``generation_config``, then ``self.generation_config``."""
        from jt5.generate import generate
        return generate(self, input_ids, attention_mask, generation_config, **kwargs)


def init_model(config: T5Config, cls=T5ForConditionalGeneration, seed: int = 0):
    """A randomly initialised model (transformers' initialisation scheme)."""
    return cls(config, rngs=nnx.Rngs(params=seed))


def abstract_model(config: T5Config, cls=T5ForConditionalGeneration):
    """The model's structure with ShapeDtypeStructs instead of arrays (no memory allocated)."""
    return weights.abstract_model(config, cls)
