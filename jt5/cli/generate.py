"""`jt5 generate`: text from a model directory (greedy, sampling, beam search), one flag per
`GenerationConfig` field."""
from __future__ import annotations

import argparse
import json

from jt5.cli.common import (DTYPES, MODEL_DIR, NON_NEGATIVE, POSITIVE, add_text_input,
                            add_weights, attention_impls, float_in)

HELP = "generate text from a model directory (greedy, sampling, beam search)"


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") \
            from None


def _ids(text: str):
    ids = _int_list(text)
    return ids[0] if len(ids) == 1 else ids


def _json_words(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"expected JSON like [[3,4],[5]], got {text!r}") from None


def _decay(text: str):
    start, _, factor = text.partition(",")
    try:
        return int(start), float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,FACTOR, got {text!r}") from None


def _early(text: str):
    try:
        return {"true": True, "false": False, "never": "never"}[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true, false or never, got {text!r}") from None

# One flag per GenerationConfig field (jt5.generation_config.FIELDS): (argparse type, help).
# Unset flags are not passed, so the checkpoint's generation_config.json / config.json apply.
_GEN_FLAGS = {
    "max_new_tokens": (POSITIVE, "tokens to generate (wins over --max-length)"),
    "max_length": (POSITIVE, "output length counting the decoder start token"),
    "min_new_tokens": (NON_NEGATIVE, "no EOS before this many new tokens"),
    "min_length": (NON_NEGATIVE, "no EOS before this length (counting the start token)"),
    "num_beams": (POSITIVE, "beam search if > 1"),
    "do_sample": (None, "sample instead of argmax"),
    "num_return_sequences": (POSITIVE, "outputs per input, printed one per line"),
    "early_stopping": (_early, "(beams) true / false / never"),
    "temperature": (float_in(0.0, open_low=True), "(sampling)"),
    "top_k": (NON_NEGATIVE, "(sampling; 0 = off; transformers' default 50)"),
    "top_p": (float_in(0.0, 1.0, open_low=True), "(sampling; 1 = off)"),
    "length_penalty": (float, "(beams) exponent of the length normalisation"),
    "repetition_penalty": (float_in(0.0, open_low=True), "> 1 penalises seen tokens"),
    "no_repeat_ngram_size": (NON_NEGATIVE, "no n-gram of this size twice"),
    "encoder_no_repeat_ngram_size": (NON_NEGATIVE, "no n-gram of the input of this size"),
    "bad_words_ids": (_json_words, "JSON list of banned token-id sequences, e.g. [[3,4],[5]]"),
    "suppress_tokens": (_int_list, "comma-separated ids never generated"),
    "begin_suppress_tokens": (_int_list, "comma-separated ids not generated first"),
    "forced_bos_token_id": (NON_NEGATIVE, "force this first token"),
    "forced_eos_token_id": (_ids, "force this token (or one of these ids) last"),
    "exponential_decay_length_penalty": (_decay, "START,FACTOR: EOS grows after START"),
    "eos_token_id": (_ids, "end-of-sequence id(s), comma-separated"),
    "pad_token_id": (NON_NEGATIVE, "pad id of finished rows"),
    "decoder_start_token_id": (NON_NEGATIVE, "first decoder token"),
    "seed": (NON_NEGATIVE, "sampling seed (default 0)"),
}


def add(p: argparse.ArgumentParser):
    from jt5.generation_config import FIELDS
    assert set(_GEN_FLAGS) == set(FIELDS) - {"bos_token_id"}, "a field without a flag"
    p.add_argument("texts", nargs="*", metavar="TEXT",
                   help="input texts, one output each; special-token strings in them "
                        "(<extra_id_N>, </s>) become their ids")
    p.add_argument("--model", required=True, help=MODEL_DIR)
    p.add_argument("--tokenizer", default=None,
                   help="'byte' (ByT5 bytes) or a transformers tokenizer directory (default: the "
                        "--model directory's; for a run directory, its export or the tokenizer "
                        "it trained with)")
    add_text_input(p, "prompts from a file instead of TEXT", "blank lines skipped")
    add_weights(p, "encoder and decoder")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="write JSON lines {index, input, output} in input order (default: print "
                        "the texts)")
    p.add_argument("--batch-size", type=POSITIVE, default=16,
                   help="prompts per batch; prompts are sorted by length into batches (default 16)")
    p.add_argument("--task", default=None,
                   help="apply config.json's task_specific_params[TASK] (e.g. summarization, "
                        "translation_en_to_de) and its input prefix, as transformers' pipelines")
    p.add_argument("--mesh", default=None,
                   help="shard over devices, e.g. data=4,tensor=2 (rows over data x fsdp)")
    g = p.add_argument_group("generation (default: the checkpoint's generation_config.json, "
                             "else config.json, else transformers' defaults)")
    for name, (kind, text) in _GEN_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if kind is None:
            g.add_argument(flag, action="store_const", const=True, default=None, help=text)
        else:
            g.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument("--show-special-tokens", action="store_true",
                   help="print sentinels (<extra_id_N>) and </s> in the outputs (default: they are "
                        "stripped, except that an output with no text left is printed with them "
                        "rather than blank)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default: as the checkpoint stores it)")
    p.add_argument("--attention", choices=attention_impls(), default=None,
                   help="attention implementation (default auto: pallas on GPU, xla elsewhere)")


def _flagged(e: Exception) -> str:
    """``num_beams=0 must be ...`` -> ``--num-beams 0 must be ...``: errors name the flag."""
    import re
    return re.sub(r"\b(" + "|".join(_GEN_FLAGS) + r")=(\S+)",
                  lambda m: f"--{m.group(1).replace('_', '-')} {m.group(2)}", str(e))


def options(args, task) -> dict:
    """Generation options: transformers' order, the task's fields over the checkpoint's and
    explicit flags over both (``jt5 plan generate`` takes the same)."""
    return {**task.generation,
            **{k: getattr(args, k) for k in _GEN_FLAGS if getattr(args, k) is not None}}


def run(args) -> int:
    from jt5 import batch_generate as bg
    from jt5 import formats
    from jt5.generate import resolve_config
    from jt5.inputs import read_texts
    from jt5.model import T5ForConditionalGeneration
    from jt5.tokenizer import load_tokenizer

    if args.input is not None and args.texts:
        raise ValueError("give TEXT arguments or --input FILE, not both")
    if args.input is None and not args.texts:
        raise ValueError("nothing to generate from: give TEXT arguments or --input FILE "
                         "('-' for stdin)")
    for i, text in enumerate(args.texts, 1):
        if not text.strip():
            raise ValueError(f"TEXT {i} is empty: give each input some text")
    if args.field and args.input is None:
        raise ValueError("--field names the text of --input .jsonl records: give --input FILE")
    prompts = args.texts or read_texts(args.input, field=args.field)
    try:
        src = formats.locate(args.model)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--model {e}") from e
    spec = args.tokenizer or src.tokenizer
    if spec is None:
        raise ValueError(f"--model {args.model} holds no tokenizer files: pass --tokenizer byte "
                         "or a tokenizer directory")
    try:
        tok = load_tokenizer(spec)
    except ValueError as e:
        flag = "--tokenizer" if args.tokenizer else "--model"
        raise ValueError(f"{flag} {args.tokenizer or args.model}: {e}") from e
    task = bg.task_params(src.path, args.task) if args.task else bg.TaskParams("", {})
    kw = options(args, task)
    mesh = None
    if args.mesh:
        from jt5 import sharding
        try:
            mesh = sharding.make_mesh(args.mesh)
        except ValueError as e:
            raise ValueError(f"--mesh {args.mesh}: {e}") from e
    model = formats.load(src.path, T5ForConditionalGeneration, dtype=args.dtype,
                         attention=args.attention, weights=args.weights,
                         int8_compute=args.int8_compute or None,
                         quant_group_size=args.quant_group_size)
    try:
        resolve_config(model, **kw)  # fail before any work, naming the flag
    except (ValueError, TypeError) as e:
        raise ValueError(_flagged(e)) from e
    out = bg.open_output(args.output)
    try:
        for i, texts in bg.generate_texts(
                model, tok, prompts, batch_size=args.batch_size, prefix=task.prefix,
                progress=args.input is not None, mesh=mesh,
                skip_special_tokens=not args.show_special_tokens, **kw):
            if out is None:
                print("\n".join(texts), flush=True)
            else:
                bg.write_jsonl(out, i, prompts[i], texts)
    finally:
        if out is not None:
            out.close()
    return 0


