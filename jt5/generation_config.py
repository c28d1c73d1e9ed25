"""GenerationConfig: the ONE spelling of generation options, as transformers spells them.

    gc = GenerationConfig.from_dict(json.load(open("generation_config.json")))
    ids = model.generate(ids, mask)                      # model.generation_config's defaults
    ids = model.generate(ids, mask, num_beams=4)         # an explicit argument wins

Every field is ``None`` when unset. Precedence is transformers' (``GenerationMixin.
_prepare_generation_config``): explicit arguments > the model's generation config > transformers'
global defaults (``GenerationConfig._get_default_generation_params``: ``max_length=20``,
``top_k=50``, ...). The model's generation config is read by the loader the way
``PreTrainedModel.from_pretrained`` reads it: ``generation_config.json`` if the directory has one,
otherwise the generation fields of ``config.json`` (``GenerationConfig.from_model_config``) — a
whole-file choice, not a per-field merge, exactly as transformers does.

``resolve`` turns the merged config into concrete values with transformers' length semantics for
encoder-decoders (``_prepare_generated_length``): ``max_length`` counts the decoder start token,
``max_new_tokens`` wins over it, nothing set means 20 new tokens; ``min_new_tokens`` wins over
``min_length``. ``FIELDS`` says, per field, whether it shapes the compiled program (``static``)
or is a traced argument of it (``traced``): ``jt5.generate`` builds both from ``Resolved``.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

Ids = Union[int, tuple]

# name -> (transformers' global default when unset, "static" | "traced" | "length")
# "static": part of the compiled program (a new value compiles once); "traced": an argument of it
# (changing it never recompiles); "length": resolved into the static max_new_tokens and the
# traced EOS-ban length. For processors that are off by default (penalty 1.0, size 0, None) only
# *whether* they are on is static; their values are traced where their shapes allow.
FIELDS: dict[str, tuple[Any, str]] = {
    "max_length": (20, "length"),
    "max_new_tokens": (None, "length"),
    "min_length": (0, "length"),
    "min_new_tokens": (None, "length"),
    "do_sample": (False, "static"),
    "num_beams": (1, "static"),
    "num_return_sequences": (1, "static"),
    "early_stopping": (False, "static"),
    "temperature": (1.0, "traced"),
    "top_k": (50, "static"),
    "top_p": (1.0, "traced"),          # whether top_p < 1 is static
    "length_penalty": (1.0, "traced"),
    "repetition_penalty": (1.0, "traced"),
    "no_repeat_ngram_size": (0, "static"),
    "encoder_no_repeat_ngram_size": (0, "static"),
    "bad_words_ids": (None, "traced"),      # the number of words and longest prefix are static
    "suppress_tokens": (None, "traced"),    # a [V] mask
    "begin_suppress_tokens": (None, "traced"),
    "forced_bos_token_id": (None, "traced"),
    "forced_eos_token_id": (None, "traced"),  # the number of ids is static
    "exponential_decay_length_penalty": (None, "traced"),
    "eos_token_id": (None, "traced"),         # the number of ids is static
    "pad_token_id": (None, "traced"),
    "decoder_start_token_id": (None, "traced"),
    "bos_token_id": (None, "traced"),         # the decoder start when that is unset
    "seed": (0, "traced"),                    # jt5's: the PRNG seed of sampling
}
# jt5-only fields: never written to generation_config.json.
_JT5_ONLY = ("seed",)
# transformers options jt5 does not implement: a file that sets one to a non-default value gets
# a warning naming it (the output would differ from transformers'); an argument is a TypeError.
UNSUPPORTED = {"typical_p": 1.0, "min_p": None, "top_h": None, "epsilon_cutoff": 0.0,
               "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0, "num_beam_groups": 1,
               "diversity_penalty": 0.0, "renormalize_logits": False,
               "remove_invalid_values": False, "sequence_bias": None, "guidance_scale": None,
               "constraints": None, "force_words_ids": None, "stop_strings": None,
               "max_time": None, "penalty_alpha": None, "forced_decoder_ids": None,
               "watermarking_config": None}


def _ids(value, name: str, *, allow_list: bool) -> Optional[Ids]:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be a token id")
    if isinstance(value, int) or hasattr(value, "__index__"):
        v = int(value)
        # a negative EOS id is allowed (transformers only warns): it never matches, so rows run
        # to the maximum length
        if v < 0 and name != "eos_token_id":
            raise ValueError(f"{name}={v} must be a non-negative token id")
        return v
    if allow_list and isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_ids(v, name, allow_list=False) for v in value)
    raise ValueError(f"{name}={value!r} must be a token id" + (" or a list of them"
                                                                if allow_list else ""))


def _token_list(value, name: str) -> Optional[tuple]:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name}={value!r} must be a list of token ids")
    return tuple(_ids(v, name, allow_list=False) for v in value)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Generation options; ``None`` = unset (falls back to the model's, then transformers')."""
    max_length: Optional[int] = None
    max_new_tokens: Optional[int] = None
    min_length: Optional[int] = None
    min_new_tokens: Optional[int] = None
    do_sample: Optional[bool] = None
    num_beams: Optional[int] = None
    num_return_sequences: Optional[int] = None
    early_stopping: Optional[Union[bool, str]] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    length_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    no_repeat_ngram_size: Optional[int] = None
    encoder_no_repeat_ngram_size: Optional[int] = None
    bad_words_ids: Optional[tuple] = None
    suppress_tokens: Optional[tuple] = None
    begin_suppress_tokens: Optional[tuple] = None
    forced_bos_token_id: Optional[int] = None
    forced_eos_token_id: Optional[Ids] = None
    exponential_decay_length_penalty: Optional[tuple] = None
    eos_token_id: Optional[Ids] = None
    pad_token_id: Optional[int] = None
    decoder_start_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    seed: Optional[int] = None

    def __post_init__(self):
        set_ = object.__setattr__
        for name in ("max_length", "max_new_tokens", "min_length", "min_new_tokens", "num_beams",
                     "num_return_sequences", "top_k", "no_repeat_ngram_size",
                     "encoder_no_repeat_ngram_size", "seed"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, bool) or not hasattr(v, "__index__"):
                    raise ValueError(f"{name}={v!r} must be an integer")
                set_(self, name, int(v))
        for name, lo in (("max_length", 1), ("max_new_tokens", 1), ("num_beams", 1),
                         ("num_return_sequences", 1), ("min_length", 0), ("min_new_tokens", 0),
                         ("top_k", 0), ("no_repeat_ngram_size", 0),
                         ("encoder_no_repeat_ngram_size", 0)):
            v = getattr(self, name)
            if v is not None and v < lo:
                raise ValueError(f"{name}={v} must be >= {lo}")
        for name in ("temperature", "top_p", "length_penalty", "repetition_penalty"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(
                        v, "__float__"):
                    raise ValueError(f"{name}={v!r} must be a number")
                set_(self, name, float(v))
        if self.do_sample is not None:
            set_(self, "do_sample", bool(self.do_sample))
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            # transformers' RepetitionPenaltyLogitsProcessor: "strictly positive float"
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if self.early_stopping not in (None, True, False, "never"):
            raise ValueError(f"early_stopping={self.early_stopping!r} must be True, False or "
                             f"'never'")
        for name in ("forced_eos_token_id", "eos_token_id"):
            set_(self, name, _ids(getattr(self, name), name, allow_list=True))
        for name in ("forced_bos_token_id", "pad_token_id", "decoder_start_token_id",
                     "bos_token_id"):
            set_(self, name, _ids(getattr(self, name), name, allow_list=False))
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            set_(self, name, _token_list(getattr(self, name), name))
        if self.bad_words_ids is not None:
            words = self.bad_words_ids
            if isinstance(words, (str, bytes)) or not isinstance(words, Sequence) or not words:
                raise ValueError(f"bad_words_ids={words!r} must be a non-empty list of lists of "
                                 f"token ids")
            words = tuple(_token_list(w, "bad_words_ids") for w in words)
            if any(len(w) == 0 for w in words):
                raise ValueError(f"bad_words_ids={self.bad_words_ids!r}: a word has no tokens")
            set_(self, "bad_words_ids", words)
        if self.exponential_decay_length_penalty is not None:
            d = self.exponential_decay_length_penalty
            if (isinstance(d, (str, bytes)) or not isinstance(d, Sequence) or len(d) != 2
                    or isinstance(d[0], bool) or not hasattr(d[0], "__index__")):
                raise ValueError(f"exponential_decay_length_penalty={d!r} must be (start_index, "
                                 f"decay_factor)")
            set_(self, "exponential_decay_length_penalty", (int(d[0]), float(d[1])))

    def __repr__(self):  # the set fields only, like transformers' GenerationConfig
        return f"GenerationConfig({', '.join(f'{k}={v!r}' for k, v in self.set_fields().items())})"

    def set_fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping, *, source: str = "generation config") -> "GenerationConfig":
        """The fields jt5 knows from a ``generation_config.json`` / ``config.json`` dict; other
        keys are ignored, and unsupported options set to a non-default value are warned about."""
        ignored = [k for k, default in UNSUPPORTED.items()
                   if k in d and d[k] is not None and d[k] != default]
        if ignored:
            warnings.warn(f"{source}: jt5 does not implement {ignored}; generation ignores them "
                          f"and may differ from transformers'", stacklevel=2)
        return cls(**{k: d[k] for k in FIELDS if k in d and k not in _JT5_ONLY})

    def replace(self, **kwargs) -> "GenerationConfig":
        """A copy with ``kwargs`` set; ``None`` leaves a field as it is (unset = not given)."""
        check_names(kwargs)
        return dataclasses.replace(self, **{k: v for k, v in kwargs.items() if v is not None})

    def merged(self, other: "GenerationConfig") -> "GenerationConfig":
        """``other``'s set fields over this one's."""
        return self.replace(**{f.name: getattr(other, f.name)
                               for f in dataclasses.fields(other)})

    def to_dict(self) -> dict:
        """The set fields, as transformers' ``generation_config.json`` spells them."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None or f.name in _JT5_ONLY:
                continue
            if f.name == "bad_words_ids":
                v = [list(w) for w in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def resolve(self, model_config) -> "Resolved":
        """Concrete values: unset fields take transformers' defaults, token ids the model's."""
        return _resolve(self, model_config)


def check_names(kwargs: Mapping):
    unknown = sorted(set(kwargs) - set(FIELDS))
    if unknown:
        hint = [k for k in unknown if k in UNSUPPORTED]
        raise TypeError(f"unknown generation arguments: {unknown}"
                        + (f" ({hint} are transformers options jt5 does not implement)"
                           if hint else ""))


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Every option concrete, lengths in new tokens (after the decoder start token)."""
    max_new_tokens: int
    eos_ban_steps: int           # EOS is masked while fewer new tokens exist (min_length/new)
    do_sample: bool
    num_beams: int
    num_return_sequences: int
    early_stopping: Union[bool, str]
    temperature: float
    top_k: int
    top_p: float
    length_penalty: float
    repetition_penalty: float
    no_repeat_ngram_size: int
    encoder_no_repeat_ngram_size: int
    bad_words: tuple             # EOS-only words dropped, as NoBadWordsLogitsProcessor does
    suppress_tokens: tuple
    begin_suppress_tokens: tuple
    begin_suppress_step: int     # the step (new-token index) at which they apply
    forced_bos_token_id: Optional[int]
    forced_eos: tuple
    decay: Optional[tuple]       # (start step, factor): penalty from step > start
    eos: tuple
    pad: int
    start: int
    seed: int


def _default(gc: GenerationConfig, name: str):
    v = getattr(gc, name)
    return FIELDS[name][0] if v is None else v


def _as_tuple(ids) -> tuple:
    return () if ids is None else (ids,) if isinstance(ids, int) else tuple(ids)


def _resolve(gc: GenerationConfig, cfg) -> Resolved:
    # Encoder-decoder: the decoder input starts as the start token alone, so transformers'
    # ``input_ids_length`` is 1 and every absolute length counts that token.
    if gc.max_new_tokens is not None:
        n = gc.max_new_tokens
    elif gc.max_length is not None:
        n = gc.max_length - 1
        if n < 1:  # transformers: "Input length of decoder_input_ids is 1, but max_length ..."
            raise ValueError(f"max_length={gc.max_length} leaves no room for a new token after "
                             f"the decoder start token; use max_length >= 2 or max_new_tokens")
    else:
        n = FIELDS["max_length"][0]  # the default max_length: 20 *new* tokens (transformers 5)
    min_len = (gc.min_new_tokens + 1 if gc.min_new_tokens is not None
               else _default(gc, "min_length"))
    do_sample, beams = _default(gc, "do_sample"), _default(gc, "num_beams")
    nrs = _default(gc, "num_return_sequences")
    if beams > 1 and nrs > beams:
        raise ValueError(f"num_return_sequences={nrs} must be <= num_beams={beams}")
    if beams == 1 and not do_sample and nrs > 1:
        raise ValueError(f"greedy decoding returns one sequence per input: "
                         f"num_return_sequences={nrs} needs do_sample=True or num_beams > 1")
    eos = _as_tuple(gc.eos_token_id if gc.eos_token_id is not None else cfg.eos_token_id)
    pad = gc.pad_token_id if gc.pad_token_id is not None else cfg.pad_token_id
    start = next(t for t in (gc.decoder_start_token_id, gc.bos_token_id,
                             cfg.decoder_start_token_id) if t is not None)
    V = cfg.vocab_size
    for name in ("suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                 "forced_eos_token_id", "bad_words_ids"):
        v = getattr(gc, name)
        flat = [t for w in v for t in w] if name == "bad_words_ids" and v else _as_tuple(v)
        bad = [t for t in flat if t >= V]
        if bad:
            raise ValueError(f"{name} has ids {bad} outside the vocabulary (vocab_size={V})")
    words = tuple(w for w in (gc.bad_words_ids or ()) if not (len(w) == 1 and w[0] in eos))
    decay = gc.exponential_decay_length_penalty
    # SuppressTokensAtBeginLogitsProcessor: begin_index = input length (1), +1 with a forced BOS
    begin = 0 if gc.forced_bos_token_id is None else 1
    return Resolved(
        max_new_tokens=n, eos_ban_steps=max(0, min_len - 1) if eos else 0, do_sample=do_sample,
        num_beams=beams, num_return_sequences=nrs,
        early_stopping=_default(gc, "early_stopping") if beams > 1 else False,
        temperature=_default(gc, "temperature"), top_k=_default(gc, "top_k"),
        top_p=_default(gc, "top_p"), length_penalty=_default(gc, "length_penalty"),
        repetition_penalty=_default(gc, "repetition_penalty"),
        no_repeat_ngram_size=_default(gc, "no_repeat_ngram_size"),
        encoder_no_repeat_ngram_size=_default(gc, "encoder_no_repeat_ngram_size"),
        bad_words=words, suppress_tokens=gc.suppress_tokens or (),
        begin_suppress_tokens=gc.begin_suppress_tokens or (), begin_suppress_step=begin,
        forced_bos_token_id=gc.forced_bos_token_id,
        forced_eos=_as_tuple(gc.forced_eos_token_id), decay=decay, eos=eos, pad=int(pad),
        start=int(start), seed=_default(gc, "seed"))


# -- files ------------------------------------------------------------------------------------
FILE = "generation_config.json"


def read_generation_config(path, raw_config: Mapping) -> GenerationConfig:
    """A checkpoint's generation defaults, as ``PreTrainedModel.from_pretrained`` finds them:
    ``generation_config.json`` if present (alone: transformers does not merge config.json's
    fields into it), else the generation fields of ``config.json`` (``raw_config``)."""
    import json
    from pathlib import Path

    f = Path(path) / FILE
    if not f.is_file():
        return GenerationConfig.from_dict(raw_config, source=str(Path(path) / "config.json"))
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: invalid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{f}: expected a JSON object")
    try:
        return GenerationConfig.from_dict(d, source=str(f))
    except ValueError as e:
        raise ValueError(f"{f}: {e}") from e


def generation_config_file(gc: GenerationConfig, model_config) -> str:
    """``generation_config.json`` text for ``save_pretrained``. transformers reads this file
    *instead of* config.json's fields, so the special token ids are always written (from the
    model config where unset), as transformers' own ``from_model_config`` export has them."""
    import json

    d = {"decoder_start_token_id": model_config.decoder_start_token_id,
         "eos_token_id": model_config.eos_token_id, "pad_token_id": model_config.pad_token_id,
         **gc.to_dict()}
    return json.dumps(d, indent=2) + "\n"
