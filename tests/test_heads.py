"""Task heads vs transformers' T5/MT5/UMT5 For{SequenceClassification, TokenClassification,
QuestionAnswering} on tiny random models of each variant (T5 v1.0 tied, v1.1, mT5, UMT5 with a
bias table per layer), both ways; jt5's encoder classifier against transformers' encoder with
its T5ClassificationHead. (transformers has no LongT5 heads and no encoder-only sequence
classifier: those are tested through what exists.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import jt5  # noqa: E402
from jt5 import heads, weights  # noqa: E402
from jt5.bridge import CheckpointError, jt5_to_hf, keymap  # noqa: E402
from tests import hf_models  # noqa: E402
from tests.conftest import assert_close  # noqa: E402

VARIANTS = ["t5-v1_0", "t5-v1_1", "mt5", "umt5"]
HF_HEADS = ["sequence-classification", "token-classification", "question-answering"]
LABELS = {0: "neg", 1: "neutral", 2: "pos"}
_TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def hf_head_class(model_type: str, head: str):
    import transformers
    return getattr(transformers, keymap.head_architecture(model_type, head))


def build_head(variant: str, head: str, path, *, seed: int = 0):
    """transformers' head model of ``variant`` with random weights (norms and biases too),
    saved by transformers to ``path``; returns it loaded back (eval mode)."""
    import torch

    model_type, overrides, untied = hf_models.VARIANTS[variant]
    Config = hf_models.hf_classes(model_type)[0]
    labels = {} if head == "question-answering" else {"id2label": LABELS}
    cfg = Config(**hf_models.SMALL, **overrides, tie_word_embeddings=not untied, **labels)
    Model = hf_head_class(model_type, head)
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    with torch.no_grad():  # init leaves norms at 1 and biases at 0: a wrong use would not show
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(path)
    return Model.from_pretrained(path).eval()


def eos_inputs(vocab: int, eos: int = 1):
    """Padded rows (37, 27, 12 tokens) ending in EOS: one EOS per row, as transformers needs."""
    ids, mask, _ = hf_models.inputs(vocab)
    ids[np.arange(len(ids)), mask.sum(1) - 1] = eos
    return ids, mask


def hf_outputs(model, ids, mask) -> tuple:
    import torch
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    if hasattr(out, "start_logits"):
        return out.start_logits.numpy(), out.end_logits.numpy()
    return (out.logits.numpy(),)


@nnx.jit
def _run(model, ids, mask):
    return model(ids, mask)


def jt5_outputs(model, ids, mask) -> tuple:
    out = _run(model, jnp.asarray(ids), jnp.asarray(mask))
    return tuple(np.asarray(o) for o in (out if isinstance(out, tuple) else (out,)))


@pytest.fixture(scope="module", params=[(v, h) for v in VARIANTS for h in HF_HEADS],
                ids=[f"{v}-{h}" for v in VARIANTS for h in HF_HEADS])
def head_dir(request, tmp_path_factory):
    variant, head = request.param
    path = tmp_path_factory.mktemp(f"{variant}-{head}")
    return variant, head, path, build_head(variant, head, path)


def test_logits_equal_transformers(head_dir):
    variant, head, path, hf = head_dir
    ids, mask = eos_inputs(hf.config.vocab_size)
    model = heads.HEAD_CLASSES[head].from_pretrained(path, attention="xla")
    for ours, ref in zip(jt5_outputs(model, ids, mask), hf_outputs(hf, ids, mask), strict=True):
        assert_close(ours, ref, dtype="float32", check="logits", what=f"{variant} {head}")
    if head != "question-answering":
        assert model.config.id2label == tuple(LABELS.values())


def test_round_trip_both_ways(head_dir, tmp_path):
    """transformers' file -> jt5 -> save_pretrained: the same tensors bit for bit, a config
    transformers' head class reads with the same labels, loading as quietly as its own save,
    and ``jt5.load`` recognising the head from ``architectures``."""
    from tests.test_bridge import _load_warnings

    variant, head, path, hf = head_dir
    model = jt5.load(path, attention="xla")
    assert type(model) is heads.HEAD_CLASSES[head]
    model.save_pretrained(tmp_path)
    theirs = {k: v for k, v in load_file(str(path / "model.safetensors")).items()
              if k.split("transformer.")[-1] not in _TIED}
    ours = load_file(str(tmp_path / "model.safetensors"))
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].tobytes() == v.tobytes(), k
    Model = type(hf)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == [Model.__name__]
    back = Model.from_pretrained(tmp_path).eval()
    assert back.config.id2label == hf.config.id2label
    assert _load_warnings(Model, tmp_path) <= _load_warnings(Model, path)
    ids, mask = eos_inputs(hf.config.vocab_size)
    for a, b in zip(hf_outputs(back, ids, mask), hf_outputs(hf, ids, mask)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant,head", [("t5-v1_1", h) for h in HF_HEADS]
                         + [("umt5", "sequence-classification")])
def test_base_checkpoint_gets_a_fresh_head(variant, head, tmp_path):
    """A base T5 checkpoint loads into a head: the head starts fresh with a warning naming its
    tensors; everything else is the checkpoint's, as transformers maps it (its head class loads
    the same file; with jt5's fresh head copied in, the logits agree)."""
    import torch

    hf_models.build(variant, tmp_path, style="hf")
    cls = heads.HEAD_CLASSES[head]
    labels = {} if head == "question-answering" else {"id2label": LABELS}
    with pytest.warns(UserWarning, match="newly initialized") as record:
        model = cls.from_pretrained(tmp_path, attention="xla", **labels)
    fresh = {r.hf for r in keymap.head_rules(model.config, head)}
    message = str(record[-1].message)
    assert all(k in message for k in fresh), message
    hf = hf_head_class(hf_models.VARIANTS[variant][0], head).from_pretrained(
        tmp_path, **labels).eval()
    sd, _ = jt5_to_hf(model.config, weights.model_params(model), head=head)
    with torch.no_grad():
        for k in fresh:
            hf.state_dict()[k].copy_(torch.as_tensor(sd[k]))
    ids, mask = eos_inputs(hf.config.vocab_size)
    for ours, ref in zip(jt5_outputs(model, ids, mask), hf_outputs(hf, ids, mask), strict=True):
        assert_close(ours, ref, dtype="float32", check="logits", what=f"{variant} {head} fresh")


def _encoder_classifier_reference(path, ids, mask, pooling: str):
    """transformers' encoder (reading jt5's file) + its T5ClassificationHead on pooled states."""
    import torch
    from transformers.models.t5.modeling_t5 import T5ClassificationHead

    raw = json.loads((path / "config.json").read_text())
    _, _, Encoder = hf_models.hf_classes(raw["model_type"])
    enc = Encoder.from_pretrained(path).eval()
    head = T5ClassificationHead(enc.config).eval()
    sd = load_file(str(path / "model.safetensors"))
    head.load_state_dict({k.split(".", 1)[1]: torch.as_tensor(v) for k, v in sd.items()
                          if k.startswith("classification_head.")})
    m = torch.as_tensor(mask)
    with torch.no_grad():
        h = enc(input_ids=torch.as_tensor(ids), attention_mask=m).last_hidden_state
        w = m[..., None].float()
        pooled = (h * w).sum(1) / w.sum(1) if pooling == "mean" else h[:, 0]
        return head(pooled).numpy()


@pytest.mark.parametrize("variant,pooling", [("t5-v1_0", "mean"), ("t5-v1_1", "first"),
                                             ("mt5", "mean"), ("umt5", "mean")])
def test_encoder_classifier_against_transformers_parts(variant, pooling, tmp_path):
    """``T5EncoderForSequenceClassification`` (jt5's): its export is read by transformers'
    encoder class as is, and its logits are that encoder's states pooled, through
    transformers' T5ClassificationHead with the exported head tensors."""
    hf_models.build(variant, tmp_path / "base", style="hf")
    with pytest.warns(UserWarning, match="newly initialized"):
        model = jt5.T5EncoderForSequenceClassification.from_pretrained(
            tmp_path / "base", attention="xla", id2label=LABELS, classifier_pooling=pooling)
    rng = np.random.default_rng(0)  # biases start at zero: make them count
    for mod in (model.classification_head.dense, model.classification_head.out_proj):
        mod.bias.set_value(jnp.asarray(rng.normal(size=mod.bias.shape), jnp.float32))
    model.save_pretrained(tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["classifier_pooling"] == pooling and raw["architectures"][0].endswith(
        "EncoderForSequenceClassification")
    ids, mask = eos_inputs(model.config.vocab_size)
    ref = _encoder_classifier_reference(tmp_path / "out", ids, mask, pooling)
    (ours,) = jt5_outputs(model, ids, mask)
    assert_close(ours, ref, dtype="float32", check="logits", what=f"{variant} encoder-cls")
    again = jt5.load(tmp_path / "out", attention="xla")
    assert type(again) is jt5.T5EncoderForSequenceClassification
    assert again.config == model.config
    np.testing.assert_array_equal(jt5_outputs(again, ids, mask)[0], ours)


def test_eos_counts_are_checked_as_in_transformers(tmp_path):
    import torch

    path = tmp_path
    hf = build_head("t5-v1_1", "sequence-classification", path)

    model = jt5.T5ForSequenceClassification.from_pretrained(path, attention="xla")
    ids, mask = eos_inputs(hf.config.vocab_size)
    two = ids.copy()
    two[0, 3] = 1  # row 0 has two EOS, the others one
    with pytest.raises(ValueError, match="same number of EOS"):
        model(jnp.asarray(two), jnp.asarray(mask))
    with pytest.raises(Exception, match="same number of <eos>"):
        with torch.no_grad():
            hf(input_ids=torch.as_tensor(two), attention_mask=torch.as_tensor(mask))
    none = ids.copy()
    none[none == 1] = 5
    with pytest.raises(ValueError, match="rows \\[0, 1, 2\\] have none"):
        model(jnp.asarray(none), jnp.asarray(mask))
    # Under jit nothing can be checked: each row's last EOS is read (here: the second one).
    (jitted,) = jt5_outputs(model, two, mask)
    assert np.all(np.isfinite(jitted))


def test_native_checkpoint_and_paths(tmp_path):
    """Every head class's parameters are exactly its keymap rules; a jt5 checkpoint of a head
    loads back as that class with its labels."""
    small = {k: v for k, v in hf_models.SMALL.items() if k != "dropout_rate"}
    cfg = jt5.T5Config(**small, num_labels=3, id2label=("a", "b", "c"))
    for head, cls in heads.HEAD_CLASSES.items():
        abstract = jt5.abstract_model(cfg, cls)
        paths = [p for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
        mapped = [r.jt5 for r in keymap.rules(cfg, head=head)]
        assert len(mapped) == len(set(mapped)) and set(mapped) == set(paths), head
    model = jt5.init_model(cfg, jt5.T5ForTokenClassification)
    weights.save_native(model, tmp_path / "ckpt")
    back = jt5.load(tmp_path / "ckpt")
    assert type(back) is jt5.T5ForTokenClassification and back.config.id2label == ("a", "b", "c")
    ids = np.arange(2, 12).reshape(2, 5)
    mask = np.ones_like(ids)
    np.testing.assert_array_equal(jt5_outputs(back, ids, mask)[0], jt5_outputs(model, ids, mask)[0])
    # A jt5 checkpoint of another class (a pretrained T5) loads into a head: its weights, a
    # fresh head, the warning naming it.
    base = jt5.init_model(cfg)
    weights.save_native(base, tmp_path / "base")
    with pytest.warns(UserWarning, match=r"newly initialized.*'qa_outputs.bias'"):
        qa = jt5.load(tmp_path / "base", jt5.T5ForQuestionAnswering)
    have = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
    for p, v in nnx.to_flat_state(nnx.state(qa, nnx.Param)):
        if p[0] != "qa_outputs":
            np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(have[p].get_value()))


def test_mismatched_label_count_is_named(tmp_path):
    build_head("mt5", "token-classification", tmp_path)
    with pytest.raises(CheckpointError, match=r"classifier/kernel is \(32, 3\)"):
        jt5.T5ForTokenClassification.from_pretrained(tmp_path, num_labels=5)


def test_head_checkpoint_loads_into_base_classes(tmp_path):
    """transformers' base classes read a head's file (prefix stripped, head announced); so do
    jt5's: the encoder states agree."""
    import torch

    path = tmp_path
    hf = build_head("umt5", "sequence-classification", path)

    with pytest.warns(UserWarning, match="not used by this model.*classification_head"):
        enc = jt5.T5EncoderModel.from_pretrained(path, attention="xla")
    ids, mask = eos_inputs(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf.transformer.encoder(input_ids=torch.as_tensor(ids),
                                     attention_mask=torch.as_tensor(mask)).last_hidden_state
    assert_close(enc(jnp.asarray(ids), jnp.asarray(mask)), ref.numpy(), dtype="float32",
                 check="hidden", what="umt5 head file as encoder")
