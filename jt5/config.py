"""T5Config: one flat frozen dataclass for every T5-family checkpoint, and named presets.

No I/O here: reading ``config.json`` lives in ``bridge/hf.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")
ATTENTION_IMPLS = ("xla", "pallas", "auto", "cudnn", "mosaic")
DTYPES = ("float32", "bfloat16", "float16")
MODEL_TYPES = ("t5", "mt5", "umt5", "longt5")
# "full": T5's dense encoder self-attention. "local" and "transient-global": LongT5's (Guo et al.
# 2022, §3.1); "local" also works as a long-input approximation on any T5 checkpoint.
ENCODER_ATTENTION_TYPES = ("full", "local", "transient-global")
# Weight-only quantisation (jt5/quant.py). Layer kinds: the MLP's input projections (wi, wi_0,
# wi_1), its output projection (wo), attention q/k/v, attention o, and (only when named) the
# shared embedding with one scale per row, which is also the tied head's. The default
# per format is what benchmarks/encoder_quant.py measured to keep the error within bf16's.
WEIGHT_FORMATS = ("float", "int8", "fp8")
QUANT_KINDS = ("mlp_in", "mlp_out", "attn_qkv", "attn_out", "embedding")
QUANT_DEFAULT = {"int8": ("mlp_in", "mlp_out", "attn_qkv", "attn_out"),
                 "fp8": ("mlp_in", "mlp_out", "attn_qkv", "attn_out")}
# transformers' PretrainedConfig.problem_type values (None: decided from the labels).
PROBLEM_TYPES = (None, "single_label_classification", "multi_label_classification", "regression")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture + numerics of a T5 encoder-decoder.

    Field names follow transformers' ``T5Config`` where one exists, so a ``config.json`` maps
    over key for key. ``tie_word_embeddings`` says whether the output head *shares the input
    embedding matrix*; ``scale_decoder_outputs`` whether the decoder output is multiplied by
    ``d_model**-0.5`` before the head (T5 v1.0 does both; v1.1/Flan/mT5/ByT5 neither). The two
    are separate because files written by transformers v5 can have one without the other.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None  # None: same as num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" | "gated-gelu" | "gated-silu" | "gelu" | ...
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    # UMT5 (Chung et al. 2023) learns a bias table in every layer instead of one per stack.
    relative_bias_per_layer: bool = False
    model_type: str = "t5"  # what save_pretrained writes: "t5" | "mt5" | "umt5" | "longt5"
    # Encoder self-attention (decoder attention is always full). "local": each token sees the
    # tokens within ``local_radius`` of it (LongT5's LocalSelfAttention); with
    # ``num_global_tokens`` the first tokens also see and are seen by every token.
    # "transient-global": local + one side key per ``global_block_size`` block (LongT5's
    # TransientGlobalSelfAttention; needs its extra parameters, so LongT5 checkpoints only).
    encoder_attention_type: str = "full"
    local_radius: int = 127
    global_block_size: int = 16
    num_global_tokens: int = 0
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # Task heads (jt5.heads; transformers' config.json keys). ``id2label``: the name of label i
    # (() = transformers' LABEL_i); ``classifier_pooling``: how T5EncoderForSequenceClassification
    # pools the encoder states (jt5.pooling: "mean" over real tokens or the "first" token).
    num_labels: int = 2
    id2label: tuple = ()
    problem_type: Optional[str] = None
    classifier_dropout: float = 0.0
    classifier_pooling: str = "mean"
    # Numerics and execution (not part of a checkpoint).
    dtype: str = "float32"  # activations / matmul inputs
    param_dtype: str = "float32"
    # Weight-only quantisation (jt5/quant.py): "int8" / "fp8" (e4m3) store the matmul weights of
    # the ``quantized`` layer kinds (QUANT_KINDS; () = QUANT_DEFAULT[weights]) with one float32
    # scale per output channel; norms, embeddings and relative biases keep ``param_dtype``. A
    # quantised checkpoint stores both (config.json's quantization_config).
    weights: str = "float"
    quantized: tuple = ()
    # Group-wise scales (jt5/quant.py): one float32 scale per ``quant_group_size`` consecutive
    # contraction inputs of each output channel instead of one per channel (None); stored too.
    # The embedding (kind "embedding", also the tied head) keeps one scale per row.
    quant_group_size: Optional[int] = None
    # Execution (not stored): int8 weights meet int8 activations, quantised per row at run time
    # (jt5.layers.matmul; CTranslate2's int8 scheme: faster on a CPU, less accurate).
    int8_compute: bool = False
    # The residual stream between sublayers; None: float32 (also in bfloat16/float16 mode: it
    # brings bf16 within nai-t5's error of float32, benchmarks/bf16_accuracy.py).
    residual_dtype: Optional[str] = None
    attention: str = "auto"  # ATTENTION_IMPLS; auto: pallas on a GPU that compiles it, else xla
    dropout_rate: float = 0.0
    # Lookup as one_hot @ table (always used when the mesh shards the vocabulary).
    one_hot_embedding: bool = False
    remat: str = "none"  # "none" | "full" | "dots": rematerialise each layer in the backward pass
    # One lax.scan over each stack's layers (one compiled layer body; same parameters/layout).
    scan_layers: bool = False
    initializer_factor: float = 1.0

    def __post_init__(self):
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        act = self.activation  # validates feed_forward_proj
        del act
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r} must be one of {ATTENTION_IMPLS}")
        for name in ("dtype", "param_dtype", "residual_dtype"):
            if name == "residual_dtype" and self.residual_dtype is None:
                continue
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {DTYPES}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} must be one of {MODEL_TYPES}")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat={self.remat!r} must be 'none', 'full' or 'dots'")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        self._check_encoder_attention()
        self._check_head_fields()
        self._check_weights()
        if self.relative_attention_num_buckets < 4:
            raise ValueError("relative_attention_num_buckets must be >= 4 (half exact, half log)")

    def _check_encoder_attention(self):
        t = self.encoder_attention_type
        if t not in ENCODER_ATTENTION_TYPES:
            raise ValueError(f"encoder_attention_type={t!r} must be one of "
                             f"{ENCODER_ATTENTION_TYPES}")
        if self.model_type == "longt5" and t == "full":
            raise ValueError("a longt5 model has 'local' or 'transient-global' encoder attention, "
                             "not 'full'")
        if t == "transient-global" and self.relative_bias_per_layer:
            raise ValueError(
                "encoder_attention_type='transient-global' derives its global bias from the "
                "stack's one shared relative bias table; a model with a table per layer "
                f"({self.model_type}) has none. Use 'local' (optionally with num_global_tokens) "
                "as a long-input approximation instead")
        if t == "transient-global" and self.model_type != "longt5":
            raise ValueError(
                f"encoder_attention_type='transient-global' is LongT5's: use "
                f"model_type='longt5'. A {self.model_type} checkpoint loaded with it "
                f"(from_pretrained, jt5.load) becomes a LongT5 model whose global bias table and "
                f"norms are initialised from its own parameters (jt5.longt5.to_transient_global)")
        if self.local_radius < 0 or self.global_block_size < 1 or self.num_global_tokens < 0:
            raise ValueError(f"need local_radius >= 0, global_block_size >= 1, num_global_tokens "
                             f">= 0; got {self.local_radius}, {self.global_block_size}, "
                             f"{self.num_global_tokens}")
        if self.num_global_tokens and t != "local":
            raise ValueError(f"num_global_tokens={self.num_global_tokens} applies to "
                             f"encoder_attention_type='local' only, not {t!r}")

    def _check_head_fields(self):
        # JSON (jt5_config.json, run metadata) gives a list back: keep the config hashable.
        object.__setattr__(self, "id2label", tuple(str(x) for x in self.id2label))
        if self.num_labels < 1:
            raise ValueError(f"num_labels={self.num_labels} must be >= 1")
        if self.id2label and len(self.id2label) != self.num_labels:
            raise ValueError(f"id2label names {len(self.id2label)} labels but num_labels="
                             f"{self.num_labels}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type={self.problem_type!r} must be one of {PROBLEM_TYPES}")
        if self.classifier_pooling not in ("mean", "first"):
            raise ValueError(f"classifier_pooling={self.classifier_pooling!r} must be 'mean' or "
                             "'first'")
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"classifier_dropout={self.classifier_dropout} must be in [0, 1)")

    def _check_weights(self):
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights={self.weights!r} must be one of {WEIGHT_FORMATS}")
        # JSON gives a list back (jt5_config.json, config.json): keep the config hashable.
        object.__setattr__(self, "quantized", tuple(self.quantized))
        if self.int8_compute and self.weights != "int8":
            raise ValueError(f"int8_compute=True runs int8 weights on int8 activations; the "
                             f"weights are {self.weights!r} (pass weights='int8')")
        bad = [k for k in self.quantized if k not in QUANT_KINDS]
        if bad:
            raise ValueError(f"quantized={self.quantized!r}: unknown layer kinds {bad}; known: "
                             f"{QUANT_KINDS}")
        self._check_group_size()

    def _check_group_size(self):
        g = self.quant_group_size
        if g is None:
            return
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"quant_group_size={g!r} must be a positive integer (or None: one "
                             f"scale per output channel)")
        if self.weights == "float":
            raise ValueError(f"quant_group_size={g} applies to quantised weights only; pass "
                             f"weights='int8' or 'fp8' with it")
        if self.int8_compute:
            raise ValueError(f"int8_compute=True needs one scale per output channel (its int8 x "
                             f"int8 -> int32 product is scaled after the sum); drop "
                             f"quant_group_size={g} or int8_compute")
        D, F, NH = self.d_model, self.d_ff, self.num_heads * self.d_kv
        wi = "wi_0" if self.is_gated else "wi"
        # kind -> (the first such parameter's path, its shape, its contraction size)
        shapes = {"mlp_in": (f"mlp/{wi}", (D, F), D), "mlp_out": ("mlp/wo", (F, D), F),
                  "attn_qkv": ("self_attn/q", (D, self.num_heads, self.d_kv), D),
                  "attn_out": ("self_attn/o", (self.num_heads, self.d_kv, D), NH)}
        for kind in self.quantized_kinds:
            if kind in shapes and shapes[kind][2] % g:
                path, shape, k = shapes[kind]
                raise ValueError(
                    f"quant_group_size={g} does not divide encoder/layers/0/{path} {list(shape)} "
                    f"(and every {kind} weight): its contraction size {k} is not a multiple of "
                    f"{g}; pick a group size that divides it, or leave {kind} out of quantized")

    @property
    def quantized_kinds(self) -> tuple:
        """The layer kinds whose weights are stored quantised (none when weights="float")."""
        if self.weights == "float":
            return ()
        return self.quantized or QUANT_DEFAULT[self.weights]

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def activation(self) -> str:
        """The MLP nonlinearity, spelled as transformers' ``ACT2FN`` keys."""
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r} must be 'ACT' or "
                             f"'gated-ACT' with ACT in {ACTIVATIONS}")
        act = parts[-1]
        # transformers maps "gated-gelu" to the tanh approximation (T5 v1.1 was trained with it).
        if self.feed_forward_proj == "gated-gelu":
            act = "gelu_new"
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r} from feed_forward_proj={self.feed_forward_proj!r}"
                             f" is not supported; use one of {ACTIVATIONS}")
        return act

    def replace(self, **kw) -> "T5Config":
        return dataclasses.replace(self, **kw)


def _v11(**kw):
    base = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                scale_decoder_outputs=False)
    base.update(kw)
    return T5Config(**base)


# Standard sizes (Raffel et al. 2020 Table 14; T5 v1.1 / mT5 / UMT5 / ByT5 model cards).
PRESETS: dict[str, T5Config] = {
    # T5 v1.0: ReLU MLP, tied head with output scaling.
    "t5-small": T5Config(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "t5-base": T5Config(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "t5-large": T5Config(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16),
    "t5-3b": T5Config(d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_heads=32),
    "t5-11b": T5Config(d_model=1024, d_kv=128, d_ff=65536, num_layers=24, num_heads=128),
    # T5 v1.1 (also Flan-T5's architecture).
    "t5-v1_1-small": _v11(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "t5-v1_1-base": _v11(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
    "t5-v1_1-large": _v11(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
    "t5-v1_1-xl": _v11(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),
    "t5-v1_1-xxl": _v11(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    # mT5: v1.1 architecture, 250k vocabulary.
    "mt5-small": _v11(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8,
                      num_heads=6, model_type="mt5"),
    "mt5-base": _v11(vocab_size=250112, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                     num_heads=12, model_type="mt5"),
    # UMT5: a bias table per layer.
    "umt5-small": _v11(vocab_size=256384, d_model=512, d_kv=64, d_ff=1024, num_layers=8,
                       num_heads=6, model_type="umt5", relative_bias_per_layer=True),
    "umt5-base": _v11(vocab_size=256384, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                      num_heads=12, model_type="umt5", relative_bias_per_layer=True),
    # Wan 2.x's text encoder (google/umt5-xxl)
    "umt5-xxl": _v11(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                     num_heads=64, model_type="umt5", relative_bias_per_layer=True),
    # ByT5: bytes (256 + 3 special + 125 extra ids), deep encoder, shallow decoder.
    "byt5-small": _v11(vocab_size=384, d_model=1472, d_kv=64, d_ff=3584, num_layers=12,
                       num_decoder_layers=4, num_heads=6),
    "byt5-base": _v11(vocab_size=384, d_model=1536, d_kv=64, d_ff=3968, num_layers=18,
                      num_decoder_layers=6, num_heads=12),
    # LongT5 (Guo et al. 2022; google/long-t5-* model cards): T5 v1.1 shapes, local radius 127,
    # transient-global blocks of 16.
    "long-t5-local-base": _v11(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                               model_type="longt5", encoder_attention_type="local"),
    "long-t5-local-large": _v11(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16,
                                model_type="longt5", encoder_attention_type="local"),
    "long-t5-tglobal-base": _v11(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                                 model_type="longt5", encoder_attention_type="transient-global"),
    "long-t5-tglobal-large": _v11(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16,
                                  model_type="longt5", encoder_attention_type="transient-global"),
    "long-t5-tglobal-xl": _v11(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
                               model_type="longt5", encoder_attention_type="transient-global"),
    # For tests and the CPU demo: a v1.1-style model that trains in minutes on 2 cores.
    "tiny": _v11(vocab_size=384, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128),
}


def preset(name: str, **overrides) -> T5Config:
    """A named preset, optionally with fields replaced (``preset("t5-base", dtype="bfloat16")``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides)
