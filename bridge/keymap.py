"""The declarative jt5 <-> transformers name/layout table, and config translation.

Each :class:`Rule` pairs one jt5 parameter path with one transformers key and a layout kind:

- ``copy``: same layout (norm scales, bias tables ``[K, N]``, the shared embedding ``[V, D]``);
- ``linear``: ``torch.nn.Linear`` stores ``[out, in]``; jt5 stores ``[in, out]`` (transpose);
- ``qkv``: ``[N*H, D]`` <-> ``[D, N, H]``; ``o``: ``[D, N*H]`` <-> ``[N, H, D]``;
- ``scale``: a quantised weight's per-output-channel scales (``<key>.weight_scale``, flat in the
  file; ``jt5/quant.py``), e.g. ``[N*H]`` <-> ``[N, H]``;
- ``group_scale``: its group-wise scales (``T5Config.quant_group_size`` = G): ``[out, in/G]`` in
  the file, as ``weight [out, in]`` (``weight[o, i] * weight_scale[o, i // G]``) <-> jt5's
  ``[in/G, out...]``, e.g. ``o``: ``[D, N*H/G]`` <-> ``[N*H/G, D]``; ``q``: ``[N*H, D/G]`` <->
  ``[D/G, N, H]``.

All are transposes/reshapes, so conversion is exact in both directions.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np

from jt5 import quant
from jt5.config import MODEL_TYPES, T5Config


ARCHITECTURES = {
    ("t5", False): "T5ForConditionalGeneration", ("t5", True): "T5EncoderModel",
    ("mt5", False): "MT5ForConditionalGeneration", ("mt5", True): "MT5EncoderModel",
    ("umt5", False): "UMT5ForConditionalGeneration", ("umt5", True): "UMT5EncoderModel",
    ("longt5", False): "LongT5ForConditionalGeneration", ("longt5", True): "LongT5EncoderModel",
}

# Task heads (jt5.heads) as transformers stores them: the class name after the model-type prefix
# (T5/MT5/UMT5/LongT5), the prefix of the base model's keys ("transformer.": the head wraps a
# T5Model / T5EncoderModel under that name), and whether the decoder is part of the model.
# "encoder-classification" is jt5's (transformers has no class for it): T5ForTokenClassification's
# layout (an encoder under "transformer.") with T5ClassificationHead's tensors, so transformers'
# T5EncoderModel.from_pretrained reads its encoder.
class HeadSpec(NamedTuple):
    suffix: str
    prefix: str
    encoder_only: bool


HEADS = {
    "sequence-classification": HeadSpec("ForSequenceClassification", "transformer.", False),
    "token-classification": HeadSpec("ForTokenClassification", "transformer.", True),
    "question-answering": HeadSpec("ForQuestionAnswering", "", False),
    "encoder-classification": HeadSpec("EncoderForSequenceClassification", "transformer.", True),
}
_CLASS_PREFIX = {"t5": "T5", "mt5": "MT5", "umt5": "UMT5", "longt5": "LongT5"}
BASE_PREFIX = "transformer."  # T5PreTrainedModel.base_model_prefix
# Every head's own tensors start with one of these (so a checkpoint's leftovers are known).
HEAD_KEY_ROOTS = ("classification_head.", "classifier.", "qa_outputs.")


def head_architecture(model_type: str, head: str) -> str:
    return _CLASS_PREFIX[model_type] + HEADS[head].suffix


def architecture_kind(raw: Mapping):
    """What ``config.json``'s ``architectures`` names: a head (``HEADS`` key), ``"encoder"``
    (a *EncoderModel), ``"seq2seq"`` (*ForConditionalGeneration) or None (absent / other)."""
    names = raw.get("architectures") or []
    name = names[0] if isinstance(names, list) and names else None
    prefix = _CLASS_PREFIX.get(raw.get("model_type"))
    if not isinstance(name, str) or prefix is None or not name.startswith(prefix):
        return None
    rest = name[len(prefix):]
    for head, spec in HEADS.items():
        if rest == spec.suffix:
            return head
    return {"EncoderModel": "encoder", "ForConditionalGeneration": "seq2seq"}.get(rest)


def _head_fields(raw: Mapping, source: str) -> dict:
    """num_labels / id2label / problem_type / classifier_* as jt5 keeps them. transformers
    derives num_labels from id2label (keys are strings in JSON); its default names LABEL_i are
    kept as ``()`` so a file with and one without them give the same config."""
    out = {}
    id2label = raw.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        try:
            pairs = sorted((int(k), str(v)) for k, v in id2label.items())
        except ValueError as e:
            raise ValueError(f"{source}: id2label keys must be integers ({e})") from e
        if [k for k, _ in pairs] != list(range(len(pairs))):
            raise ValueError(f"{source}: id2label keys must be 0..{len(pairs) - 1}, got "
                             f"{[k for k, _ in pairs]}")
        names = tuple(v for _, v in pairs)
        out["num_labels"] = len(names)
        out["id2label"] = () if names == tuple(f"LABEL_{i}" for i in range(len(names))) else names
    elif raw.get("num_labels") is not None:
        out["num_labels"] = int(raw["num_labels"])
    for k in ("problem_type", "classifier_pooling"):
        if raw.get(k) is not None:
            out[k] = str(raw[k])
    if raw.get("classifier_dropout") is not None:
        out["classifier_dropout"] = float(raw["classifier_dropout"])
    return out


def _head_config(config: T5Config, head: str) -> dict:
    names = config.id2label or tuple(f"LABEL_{i}" for i in range(config.num_labels))
    out = {"id2label": {str(i): n for i, n in enumerate(names)},
           "label2id": {n: i for i, n in enumerate(names)},
           "problem_type": config.problem_type, "classifier_dropout": config.classifier_dropout}
    if head == "encoder-classification":
        out["classifier_pooling"] = config.classifier_pooling
    return out


# transformers' defaults for keys a config.json may omit (per model_type).
_HF_DEFAULTS = {
    "t5": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
               feed_forward_proj="relu"),
    "mt5": dict(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                feed_forward_proj="gated-gelu"),
    "umt5": dict(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                 feed_forward_proj="gated-gelu"),
    "longt5": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                   feed_forward_proj="relu", encoder_attention_type="local", local_radius=127,
                   global_block_size=16),
}
_COMMON_DEFAULTS = dict(relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0, num_decoder_layers=None)
# transformers v4's tie_word_embeddings default per model type (v4 also decided the scaling by it).
_V4_TIE_DEFAULT = {"t5": True, "mt5": False, "umt5": True, "longt5": True}
# The encoder self-attention module's name in a transformers state dict.
_ENC_ATTN = {"full": "SelfAttention", "local": "LocalSelfAttention",
             "transient-global": "TransientGlobalSelfAttention"}


class Rule(NamedTuple):
    jt5: tuple          # path in the nnx state, e.g. ("encoder", "layers", 0, "self_attn", "q")
    hf: str             # transformers state-dict key
    kind: str           # "copy" | "linear" | "qkv" | "o"
    shape: tuple        # jt5 shape


def _writer_major(raw: Mapping) -> int:
    """Major version of the transformers that wrote ``raw`` (its ``transformers_version``; 4 if
    absent: files from before v5 and hand-written ones)."""
    head = str(raw.get("transformers_version", "4")).split(".")[0]
    return int(head) if head.isdigit() else 4


def _scale_decoder_outputs(raw: Mapping) -> bool:
    """Whether the decoder output is scaled by d_model**-0.5, as the writer of ``raw`` meant it.

    What each writer puts in the file and what it computes from it (checked in the sources of
    4.57, 5.0, 5.23 and 5.24; tests/test_bridge.py has a case per writer):

    - an explicit ``scale_decoder_outputs`` key (5.x T5; 5.24 UMT5; every jt5 export) is read
      back as written by every version that has the key;
    - T5, UMT5 and LongT5 without the key: v4 scales iff ``tie_word_embeddings`` (default true); v5
      computes ``tie_word_embeddings is not False`` from the file and forces the tie, so files it
      writes say ``true``. One rule serves both: scale unless the file says ``false``.
      (5.0-5.23 scaled UMT5 even when the file said false; 5.24 went back to the rule above,
      which is also the original t5x UMT5's. LongT5: 5.0 still reads and writes
      ``tie_word_embeddings`` as v4 does; 5.23/5.24 set ``scale_decoder_outputs`` from it, write
      both keys with the tie forced true, and read an explicit key back.)
    - mT5 without the key: v4 scales iff ``tie_word_embeddings`` (default false); v5 never
      scales mT5 and writes ``tie_word_embeddings: true``. Only here does the writer's version
      (the file's own ``transformers_version``) decide.
    """
    if "scale_decoder_outputs" in raw and raw["scale_decoder_outputs"] is not None:
        return bool(raw["scale_decoder_outputs"])
    mt = raw["model_type"]
    if mt == "mt5" and _writer_major(raw) >= 5:
        return False
    return bool(raw.get("tie_word_embeddings", _V4_TIE_DEFAULT[mt]))


def _longt5_fields(d: Mapping, mt: str) -> dict:
    if mt != "longt5":
        return {}
    return dict(encoder_attention_type=str(d["encoder_attention_type"]),
                local_radius=int(d["local_radius"]), global_block_size=int(d["global_block_size"]))


def config_from_hf(raw: Mapping, *, has_lm_head: bool, source: str = "config.json") -> T5Config:
    """A T5Config from a raw transformers ``config.json`` dict (v4 or v5 spelling)."""
    mt = raw.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"{source}: unsupported model_type {mt!r}; jt5 reads "
                         f"{MODEL_TYPES}")
    d = {**_COMMON_DEFAULTS, **_HF_DEFAULTS[mt]}
    d.update({k: raw[k] for k in d if raw.get(k) is not None})
    eos = d["eos_token_id"]
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    try:
        return T5Config(
            vocab_size=int(d["vocab_size"]), d_model=int(d["d_model"]), d_kv=int(d["d_kv"]),
            d_ff=int(d["d_ff"]), num_layers=int(d["num_layers"]),
            num_decoder_layers=d["num_decoder_layers"], num_heads=int(d["num_heads"]),
            relative_attention_num_buckets=int(d["relative_attention_num_buckets"]),
            relative_attention_max_distance=int(d["relative_attention_max_distance"]),
            layer_norm_epsilon=float(d["layer_norm_epsilon"]),
            feed_forward_proj=str(d["feed_forward_proj"]),
            tie_word_embeddings=not has_lm_head,
            scale_decoder_outputs=_scale_decoder_outputs(raw),
            relative_bias_per_layer=(mt == "umt5"), model_type=mt, **quant.fields_from_hf(raw),
            **_longt5_fields(d, mt), **_head_fields(raw, source),
            pad_token_id=int(d["pad_token_id"]), eos_token_id=int(eos),
            decoder_start_token_id=int(d["decoder_start_token_id"]))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from e


def config_to_hf(config: T5Config, *, encoder_only: bool = False,
                 head_written: bool, head: str | None = None) -> dict:
    """A ``config.json`` dict that transformers v4 and v5 both read as ``config`` means.

    ``tie_word_embeddings`` is what v4 uses for tying and scaling; ``scale_decoder_outputs`` is
    what v5 reads for T5. ``head_written``: whether ``lm_head.weight`` is in the state dict.
    ``head``: a task head (``HEADS``): its architecture and label fields.
    """
    mt = config.model_type
    longt5 = ({} if mt != "longt5" else
              {"encoder_attention_type": config.encoder_attention_type,
               "local_radius": config.local_radius, "global_block_size": config.global_block_size})
    arch = (head_architecture(mt, head) if head is not None
            else ARCHITECTURES[(mt, encoder_only)])
    return {
        **longt5, **({} if head is None else _head_config(config, head)),
        "architectures": [arch],
        "model_type": mt,
        "vocab_size": config.vocab_size, "d_model": config.d_model, "d_kv": config.d_kv,
        "d_ff": config.d_ff, "num_layers": config.num_layers,
        "num_decoder_layers": config.num_decoder_layers, "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "feed_forward_proj": config.feed_forward_proj,
        "dropout_rate": config.dropout_rate,
        "initializer_factor": config.initializer_factor,
        "is_encoder_decoder": True,
        "tie_word_embeddings": not head_written,
        "scale_decoder_outputs": bool(config.scale_decoder_outputs),
        "pad_token_id": config.pad_token_id, "eos_token_id": config.eos_token_id,
        "decoder_start_token_id": config.decoder_start_token_id,
        "use_cache": True,
        **quant.quantization_config(config),
    }


def head_is_written(config: T5Config) -> bool:
    """Whether ``lm_head.weight`` goes into an exported state dict.

    A head shared with the embedding is left out only when transformers v4 would tie it too,
    i.e. when the output is scaled; a shared head without scaling is written as a copy.
    """
    return not (config.tie_word_embeddings and config.scale_decoder_outputs)


def head_rules(config: T5Config, head: str) -> list[Rule]:
    """The head's own tensors (``nn.Linear``: weight ``[out, in]`` and a bias)."""
    D = config.d_model
    if head in ("sequence-classification", "encoder-classification"):
        layers = [("classification_head", "dense", D), ("classification_head", "out_proj",
                                                         config.num_labels)]
    elif head == "token-classification":
        layers = [(None, "classifier", config.num_labels)]
    elif head == "question-answering":
        layers = [(None, "qa_outputs", 2)]  # start and end logits
    else:
        raise ValueError(f"unknown head {head!r}; expected one of {sorted(HEADS)}")
    out = []
    for module, name, n_out in layers:
        path, key = ((module, name), f"{module}.{name}") if module else ((name,), name)
        out.append(Rule(path + ("kernel",), f"{key}.weight", "linear", (D, n_out)))
        out.append(Rule(path + ("bias",), f"{key}.bias", "copy", (n_out,)))
    return out


def rules(config: T5Config, *, encoder_only: bool = False, head: str | None = None
          ) -> list[Rule]:
    """The base model's tensors (``shared``, ``encoder``, ``decoder``, ``lm_head``), or with
    ``head`` a task head's: the base without ``lm_head`` under the head's prefix + its own."""
    if head is not None:
        spec = HEADS[head]
        base = rules(config.replace(tie_word_embeddings=True), encoder_only=spec.encoder_only)
        return [r._replace(hf=spec.prefix + r.hf) for r in base] + head_rules(config, head)
    D, N, H, F, K = (config.d_model, config.num_heads, config.d_kv, config.d_ff,
                     config.relative_attention_num_buckets)
    out = [Rule(("shared", "embedding"), "shared.weight", "copy", (config.vocab_size, D))]
    mlp = (["wi_0", "wi_1"] if config.is_gated else ["wi"])

    # A T5 checkpoint run with local attention keeps T5's names: only LongT5 files rename.
    enc_attn = _ENC_ATTN[config.encoder_attention_type if config.model_type == "longt5" else "full"]
    tglobal = config.encoder_attention_type == "transient-global"

    def stack(name: str, n_layers: int, decoder: bool):
        self_attn = "SelfAttention" if decoder else enc_attn
        first = f"{name}.block.0.layer.0.{self_attn}"
        if not config.relative_bias_per_layer:
            out.append(Rule((name, "relpos", "table"), f"{first}.relative_attention_bias.weight",
                            "copy", (K, N)))
        if tglobal and not decoder:
            out.append(Rule((name, "global_relpos", "table"),
                            f"{first}.global_relative_attention_bias.weight", "copy", (K, N)))
        for i in range(n_layers):
            j, b = (name, "layers", i), f"{name}.block.{i}.layer"
            sub = [("self_attn", f"{b}.0", self_attn)]
            if decoder:
                sub.append(("cross_attn", f"{b}.1", "EncDecAttention"))
            for attn, hf_layer, hf_attn in sub:
                out.append(Rule(j + (f"{attn}_norm", "scale"), f"{hf_layer}.layer_norm.weight",
                                "copy", (D,)))
                for p in "qkv":
                    out.append(Rule(j + (attn, p), f"{hf_layer}.{hf_attn}.{p}.weight", "qkv",
                                    (D, N, H)))
                out.append(Rule(j + (attn, "o"), f"{hf_layer}.{hf_attn}.o.weight", "o", (N, H, D)))
            if tglobal and not decoder:
                out.append(Rule(j + ("self_attn", "global_norm", "scale"),
                                f"{b}.0.{self_attn}.global_input_layer_norm.weight", "copy", (D,)))
            if config.relative_bias_per_layer:
                out.append(Rule(j + ("self_attn", "relpos", "table"),
                                f"{b}.0.SelfAttention.relative_attention_bias.weight", "copy",
                                (K, N)))
            ff = f"{b}.{2 if decoder else 1}"
            out.append(Rule(j + ("mlp_norm", "scale"), f"{ff}.layer_norm.weight", "copy", (D,)))
            for w in mlp:
                out.append(Rule(j + ("mlp", w), f"{ff}.DenseReluDense.{w}.weight", "linear",
                                (D, F)))
            out.append(Rule(j + ("mlp", "wo"), f"{ff}.DenseReluDense.wo.weight", "linear",
                            (F, D)))
        out.append(Rule((name, "final_norm", "scale"), f"{name}.final_layer_norm.weight", "copy",
                        (D,)))

    stack("encoder", config.num_layers, decoder=False)
    if not encoder_only:
        stack("decoder", config.num_decoder_layers, decoder=True)
        if not config.tie_word_embeddings:
            out.append(Rule(("lm_head",), "lm_head.weight", "linear", (D, config.vocab_size)))
    return _quantized(config, out)


def hf_shape(rule: Rule) -> tuple:
    s = rule.shape
    if rule.kind == "copy":
        return s
    if rule.kind == "linear":
        return (s[1], s[0])
    if rule.kind == "qkv":  # [D, N, H] -> [N*H, D]
        return (s[1] * s[2], s[0])
    if rule.kind == "o":    # [N, H, D] -> [D, N*H]
        return (s[2], s[0] * s[1])
    if rule.kind == "scale":  # per output channel: [N, H] or [out] -> [N*H] or [out]
        return (int(np.prod(s)),)
    if rule.kind == "group_scale":  # [in/G, N, H] or [in/G, out] -> [N*H, in/G] or [out, in/G]
        return (int(np.prod(s[1:])), s[0])
    raise ValueError(rule.kind)


def to_jt5(rule: Rule, w: np.ndarray) -> np.ndarray:
    """Every non-copy kind is a transpose of the HF matrix, reshaped to the jt5 layout."""
    return w if rule.kind == "copy" else w.T.reshape(rule.shape)


def to_hf(rule: Rule, w: np.ndarray) -> np.ndarray:
    """The inverse of ``to_jt5``: flatten to the transposed HF matrix, then transpose."""
    return w if rule.kind == "copy" else w.reshape(hf_shape(rule)[::-1]).T


def _quantized(config: T5Config, rules: list[Rule]) -> list[Rule]:
    """A quantised layer's weight is stored as ``<key>.weight`` (int8 / float8_e4m3fn, the float
    weight's layout) and ``<key>.weight_scale`` (float32, one per output channel, or with
    ``quant_group_size`` G ``[out, in / G]``: one per G inputs of each output, ``group_scale``;
    the embedding keeps per-row scales); jt5 holds them as ``.../qweight`` and ``.../scale``
    (``jt5.layers.QuantizedWeight``)."""
    kinds, group = config.quantized_kinds, config.quant_group_size
    out = []
    for r in rules:
        kind = quant.layer_kind(r.jt5)
        if kind not in kinds or kind is None:
            out.append(r)
            continue
        out.append(r._replace(jt5=r.jt5 + (quant.QWEIGHT,)))
        grouped = group is not None and kind != "embedding"
        out.append(Rule(r.jt5 + (quant.SCALE,), r.hf + quant.HF_SCALE_SUFFIX,
                        "group_scale" if grouped else "scale",
                        quant.scale_shape(kind, r.shape, group)))
    return out
