"""The ``jt5`` command. Argument parsing only: each subcommand wires library calls.

    jt5 pretrain   UL2-pretrain a T5 (no arguments: a small model on the built-in corpus)
    jt5 generate   generate text from a model directory
    jt5 convert    move a checkpoint between transformers and jt5 formats
    jt5 bench      run a benchmark script from benchmarks/
    jt5 finetune   fine-tune on (input, target) pairs
    jt5 embed      encoder embeddings of texts
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

def _preset_names() -> tuple[str, ...]:
    from jt5.config import PRESETS  # cheap: the jt5 package is already imported to get here
    return tuple(PRESETS)


MODEL_DIR = ("a transformers model directory, a jt5 checkpoint directory, or a jt5 pretraining "
             "run directory (its newest complete checkpoint)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: argument --steps: must be >= 1 (got -5)``."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low} (got {value})")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def _float_in(low: float, high: float = float("inf"), *, open_low: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if open_low else low <= value) or value > high:
            lo = f"> {low}" if open_low else f">= {low}"
            rng = f"{lo} and <= {high}" if high != float("inf") else lo
            raise argparse.ArgumentTypeError(f"must be {rng} (got {value})")
        return value
    parse.__name__ = "number"
    return parse


POSITIVE, NON_NEGATIVE = _int_at_least(1), _int_at_least(0)


# -- convert ----------------------------------------------------------------------------------
def _add_convert(p: argparse.ArgumentParser):
    p.add_argument("src", help=MODEL_DIR)
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", choices=("hf", "jt5"), default=None,
                   help="output format (default: the other one than the source's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="store parameters in this dtype (default: as stored in the source)")
    p.add_argument("--encoder-only", action="store_true",
                   help="keep only the encoder (a T5EncoderModel)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="split transformers safetensors above this size (default 5GB)")


def _run_convert(args) -> int:
    from jt5 import formats, weights
    from jt5.bridge import hf
    from jt5.model import T5EncoderModel, T5ForConditionalGeneration
    from jt5.tokenizer import tokenizer_files

    src = formats.locate(args.src)
    if Path(args.dst).resolve() == src.path.resolve():
        raise ValueError(f"convert {args.src} {args.dst}: the output directory is the source")
    try:
        hf._parse_size(args.max_shard_size)
    except ValueError:
        raise ValueError(f"--max-shard-size {args.max_shard_size!r}: expected a size such as "
                         "5GB, 500MB or a number of bytes") from None
    cls = T5EncoderModel if args.encoder_only else T5ForConditionalGeneration
    model = formats.load(src.path, cls, dtype=args.dtype, progress=True)
    # The tokenizer travels with the weights, so the output works with `jt5 generate` and
    # AutoTokenizer as the source did.
    files = tokenizer_files(src.tokenizer) if src.tokenizer else {}
    to = args.to or ("jt5" if src.kind == "hf" else "hf")
    if to == "hf":
        weights.save_hf(model, args.dst, max_shard_size=args.max_shard_size, progress=True,
                        extra_files=files)
    else:
        weights.save_native(model, args.dst, extra_files=files)
    carried = f" with tokenizer files ({', '.join(sorted(files))})" if files else (
        " (no tokenizer files found at the source)")
    print(f"wrote {to} checkpoint of {type(model).__name__} to {args.dst}{carried}")
    return 0


# -- generate ---------------------------------------------------------------------------------
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
    "temperature": (_float_in(0.0, open_low=True), "(sampling)"),
    "top_k": (NON_NEGATIVE, "(sampling; 0 = off; transformers' default 50)"),
    "top_p": (_float_in(0.0, 1.0, open_low=True), "(sampling; 1 = off)"),
    "length_penalty": (float, "(beams) exponent of the length normalisation"),
    "repetition_penalty": (_float_in(0.0, open_low=True), "> 1 penalises seen tokens"),
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


def _add_generate(p: argparse.ArgumentParser):
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
    p.add_argument("--input", default=None, metavar="FILE",
                   help="prompts from a file instead of TEXT: .jsonl (objects with a 'text' / "
                        "'input' / 'prompt' field), any other file one prompt a line; '-' reads "
                        "stdin")
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
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype (default: as the checkpoint stores it)")
    p.add_argument("--attention", choices=("auto", "xla", "pallas"), default=None,
                   help="attention implementation (default auto: pallas on GPU, xla elsewhere)")


def _flagged(e: Exception) -> str:
    """``num_beams=0 must be ...`` -> ``--num-beams 0 must be ...``: errors name the flag."""
    import re
    return re.sub(r"\b(" + "|".join(_GEN_FLAGS) + r")=(\S+)",
                  lambda m: f"--{m.group(1).replace('_', '-')} {m.group(2)}", str(e))


def _run_generate(args) -> int:
    from jt5 import batch_generate as bg
    from jt5 import formats
    from jt5.generate import resolve_config
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
    prompts = args.texts or bg.read_prompts(args.input)
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
    # transformers' order: the task's fields over the checkpoint's, explicit flags over both
    kw = {**task.generation,
          **{k: getattr(args, k) for k in _GEN_FLAGS if getattr(args, k) is not None}}
    mesh = None
    if args.mesh:
        from jt5 import sharding
        try:
            mesh = sharding.make_mesh(args.mesh)
        except ValueError as e:
            raise ValueError(f"--mesh {args.mesh}: {e}") from e
    model = formats.load(src.path, T5ForConditionalGeneration, dtype=args.dtype,
                         attention=args.attention)
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


# -- bench ------------------------------------------------------------------------------------
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _add_bench(p: argparse.ArgumentParser):
    p.add_argument("name", help="benchmark script in benchmarks/ (e.g. attention, generate, train)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")


def _run_bench(args) -> int:
    import runpy

    script = BENCHMARKS / f"{args.name}.py"
    if not script.is_file():
        found = sorted(f.stem for f in BENCHMARKS.glob("*.py")) if BENCHMARKS.is_dir() else []
        raise FileNotFoundError(f"no benchmark {args.name!r} in {BENCHMARKS} (have: {found}); "
                                f"benchmarks ship with the source tree, not the wheel")
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0

# -- pretrain ---------------------------------------------------------------------------------
_PRETRAIN_EPILOG = """\
With no arguments: the tiny preset (0.89M parameters, byte vocabulary) on the built-in corpus
(Python standard-library docstrings): 800 steps of 16 packed rows x (128 input, 32 target)
tokens, AdamW lr 3e-3, 50 warmup steps, cosine decay to 3e-4, float32 on CPU. About 2-3
minutes on a 2-core CPU; the loss falls from ~6.3 (ln 384 = 5.95) through ~3 at step 50 to
~2.6. Writes OUT/metrics.jsonl (one line per step), OUT/checkpoints/,
OUT/hf (a transformers directory with tokenizer files) and OUT/samples.txt. Re-running the same
command resumes from the newest complete checkpoint; Ctrl-C or SIGTERM first finishes the step
in flight and saves it (exit status 130 / 143). Multi-host: run the same command on every
host with --coordinator HOST:PORT --num-processes N --process-id I (SLURM / Open MPI
environments are detected without them).
"""


def _add_sequence_flags(g, *, unit: str):
    """Tokenizer, lengths, packing and numerics: the same flags for pretrain and finetune."""
    g.add_argument("--tokenizer", default=None,
                   help="'byte' (ByT5 bytes) or a transformers tokenizer directory (default: the "
                        "--model directory's tokenizer if it has one, else byte)")
    g.add_argument("--inputs-length", type=POSITIVE, default=128,
                   help="encoder length; longer inputs are truncated (default 128)")
    g.add_argument("--targets-length", type=POSITIVE, default=32,
                   help="decoder length; longer targets are truncated (default 32)")
    g.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help=f"pack several {unit} per row, segment-separated (default: --pack)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype; parameters stay float32 (default: bfloat16 on GPU/TPU, "
                        "float32 on CPU)")
    g.add_argument("--attention", choices=("auto", "xla", "pallas"), default="auto",
                   help="attention implementation (default auto: pallas on GPU, xla elsewhere)")


def _train(run, cfg) -> int:
    """Run a training loop; an interrupt (it saved a checkpoint) exits 130/143, else one summary."""
    from jt5.train import loop

    try:
        result = run(cfg)
    except loop.Interrupted as e:
        print(e, file=sys.stderr)
        return e.exit_code
    if result.history:
        first, last = result.history[0], result.history[-1]
        print(f"steps {result.start_step}->{result.step}: loss {first['loss']:.3f} -> "
              f"{last['loss']:.3f} in {last['elapsed']:.0f}s; run directory {result.out}")
    else:
        print(f"nothing to train: {result.out} is already at step {result.step}")
    return 0


def _add_pretrain(p: argparse.ArgumentParser):
    from jt5.train import OPTIMIZERS, SCHEDULES  # the package alone, not the training stack
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _PRETRAIN_EPILOG
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="tiny", metavar="PRESET_OR_DIR",
                   help=f"a preset ({', '.join(_preset_names())}) or a model to continue from: "
                        f"{MODEL_DIR} (default: tiny)")
    g.add_argument("--data", nargs="+", default=["builtin"], metavar="SOURCE",
                   help="'builtin' (the embedded corpus), text/.jsonl files or directories "
                        "(default: builtin)")
    _add_sequence_flags(g, unit="examples")
    g.add_argument("--remat", choices=("none", "full", "dots"), default="none",
                   help="recompute layer activations in the backward pass (default none)")
    g.add_argument("--dropout", type=_float_in(0.0, 1.0), default=None,
                   help="dropout rate (default: the model's; 0 for presets)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=POSITIVE, default=800, help="total train steps (default 800)")
    g.add_argument("--batch-size", type=POSITIVE, default=16,
                   help="global batch size in rows, over all hosts (default 16)")
    g.add_argument("--accum", type=POSITIVE, default=1,
                   help="gradient accumulation: micro-batches per step (default 1)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="(default adamw)")
    g.add_argument("--lr", type=_float_in(0.0, open_low=True), default=None,
                   help="peak learning rate (default 3e-3 for adamw, 1e-2 for adafactor: tuned "
                        "for small models; use less for base-sized ones)")
    g.add_argument("--warmup", type=NON_NEGATIVE, default=50,
                   help="linear warmup steps (default 50)")
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="decay after warmup: cosine / linear to 0.1 x lr at --steps, rsqrt, or "
                        "constant (default cosine)")
    g.add_argument("--weight-decay", type=_float_in(0.0), default=0.0,
                   help="decoupled weight decay on matrices (default 0)")
    g.add_argument("--clip", type=_float_in(0.0), default=1.0,
                   help="clip gradients to this global norm; 0 disables (default 1.0)")
    g.add_argument("--z-loss", type=_float_in(0.0), default=1e-4,
                   help="z-loss coefficient on logsumexp(logits)^2 (default 1e-4)")
    g.add_argument("--seed", type=NON_NEGATIVE, default=0,
                   help="parameter init, data and dropout (default 0)")
    g = p.add_argument_group("run, checkpoints and devices")
    g.add_argument("--out", default="runs/pretrain",
                   help="run directory: checkpoints, metrics, export (default runs/pretrain)")
    g.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=2,fsdp=2,tensor=2 (any axis may be 1, one may be "
                        "-1; default: all devices on data)")
    g.add_argument("--save-every", type=NON_NEGATIVE, default=200,
                   help="checkpoint every N steps (0: only at the end), at the end, and on "
                        "SIGINT/SIGTERM (default 200)")
    g.add_argument("--keep", type=POSITIVE, default=3, help="checkpoints to keep (default 3)")
    g.add_argument("--eval-every", type=NON_NEGATIVE, default=0,
                   help="held-out loss every N steps; 0 disables (default 0)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard events to OUT/tensorboard (needs tensorboardX)")
    g.add_argument("--samples", type=NON_NEGATIVE, default=1,
                   help="held-out samples to generate per denoiser kind at the end (default 1)")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=64,
                   help="sample length (default 64)")
    g.add_argument("--no-export", action="store_true",
                   help="skip the transformers export and samples at the end")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("multi-host (default: auto-detected, else single host)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0's coordinator")
    g.add_argument("--num-processes", type=POSITIVE, default=None, help="number of processes")
    g.add_argument("--process-id", type=NON_NEGATIVE, default=None, help="this process's index")


def _run_pretrain(args) -> int:
    from jt5.train import loop
    from jt5.train.step import OptimConfig

    loop.init_distributed(args.coordinator, args.num_processes, args.process_id)
    optim = OptimConfig(optimizer=args.optimizer, lr=args.lr, warmup_steps=args.warmup,
                        total_steps=args.steps, schedule=args.schedule,
                        weight_decay=args.weight_decay, clip=args.clip, z_loss=args.z_loss,
                        accum_steps=args.accum)
    cfg = loop.LoopConfig(
        model=args.model, out=args.out, steps=args.steps, batch_size=args.batch_size,
        inputs_length=args.inputs_length, targets_length=args.targets_length,
        data=tuple(args.data), tokenizer=args.tokenizer, pack=args.pack, seed=args.seed,
        mesh=args.mesh, save_every=args.save_every, keep=args.keep, eval_every=args.eval_every,
        optim=optim, dtype=args.dtype, remat=args.remat, attention=args.attention,
        dropout_rate=args.dropout, tensorboard=args.tensorboard, export=not args.no_export,
        samples_per_kind=args.samples, max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress)
    return _train(loop.run, cfg)


# -- finetune ---------------------------------------------------------------------------------
_FINETUNE_EPILOG = """\
Data: .jsonl (one object per line), .csv or .tsv (a header row) with an input and a target field.
Each step trains on --batch-size rows; --pack (default) lays several pairs per row with segment
ids that keep them apart. Every --eval-every steps the loss over the eval split (--eval-data, or
--eval-fraction of --data held out) joins OUT/metrics.jsonl; --keep-best keeps the parameters of
the lowest eval loss in OUT/best. At the end: OUT/hf (a transformers directory with tokenizer
files), and greedy outputs on the eval split in OUT/eval.jsonl with exact match and chrF.
Re-running the same command resumes; Ctrl-C or SIGTERM saves the step in flight (exit 130/143).
"""


def _add_run_flags(g, *, out: str, save_every: int):
    """Checkpoint, device and logging flags, spelled as `jt5 pretrain` spells them."""
    g.add_argument("--out", default=out, help=f"run directory (default {out})")
    g.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")
    g.add_argument("--save-every", type=NON_NEGATIVE, default=save_every,
                   help=f"checkpoint every N steps (0: only at the end), at the end, and on "
                        f"SIGINT/SIGTERM (default {save_every})")
    g.add_argument("--keep", type=POSITIVE, default=3, help="checkpoints to keep (default 3)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard events to OUT/tensorboard (needs tensorboardX)")
    g.add_argument("--no-export", action="store_true", help="skip the export (and evaluation) "
                   "at the end")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_finetune(p: argparse.ArgumentParser):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _FINETUNE_EPILOG
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, metavar="PRESET_OR_DIR",
                   help=f"the model to fine-tune: {MODEL_DIR}, or a preset "
                        f"({', '.join(_preset_names())}) to train from scratch")
    g.add_argument("--data", required=True, help="training pairs: .jsonl, .csv or .tsv")
    g.add_argument("--eval-data", default=None, help="eval pairs (same formats)")
    g.add_argument("--eval-fraction", type=_float_in(0.0, 0.99), default=0.0,
                   help="hold this fraction of --data out as the eval split when no --eval-data "
                        "(default 0)")
    g.add_argument("--input-field", default="input", help="(default input)")
    g.add_argument("--target-field", default="target", help="(default target)")
    g.add_argument("--prefix", default="", help="task prefix prepended to every input, e.g. "
                   "'translate English to German: ' (default none)")
    _add_sequence_flags(g, unit="pairs")
    g.add_argument("--dropout", type=_float_in(0.0, 1.0), default=None,
                   help="dropout rate (default: the model's)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=POSITIVE, default=300, help="train steps (default 300)")
    g.add_argument("--batch-size", type=POSITIVE, default=16, help="global rows (default 16)")
    g.add_argument("--lr", type=_float_in(0.0, open_low=True), default=1e-3,
                   help="peak AdamW learning rate (default 1e-3)")
    g.add_argument("--warmup", type=NON_NEGATIVE, default=30, help="(default 30)")
    g.add_argument("--weight-decay", type=_float_in(0.0), default=0.0, help="(default 0)")
    g.add_argument("--seed", type=NON_NEGATIVE, default=0, help="init, data order, dropout")
    g = p.add_argument_group("evaluation, run and devices")
    g.add_argument("--eval-every", type=NON_NEGATIVE, default=0,
                   help="eval loss every N steps; 0: never (default 0)")
    g.add_argument("--keep-best", action="store_true",
                   help="keep the parameters of the lowest eval loss in OUT/best and export them")
    g.add_argument("--eval-generate", type=NON_NEGATIVE, default=1000,
                   help="eval pairs to generate at the end (default 1000; 0: none)")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=None,
                   help="generated length at the end (default --targets-length)")
    _add_run_flags(g, out="runs/finetune", save_every=100)


def _run_finetune(args) -> int:
    from jt5.train import finetune
    from jt5.train.step import OptimConfig

    optim = OptimConfig(lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
                        weight_decay=args.weight_decay)
    cfg = finetune.FinetuneConfig(
        model=args.model, out=args.out, steps=args.steps, batch_size=args.batch_size,
        inputs_length=args.inputs_length, targets_length=args.targets_length,
        tokenizer=args.tokenizer, pack=args.pack, seed=args.seed, mesh=args.mesh,
        save_every=args.save_every, keep=args.keep, eval_every=args.eval_every, optim=optim,
        dtype=args.dtype, attention=args.attention, dropout_rate=args.dropout,
        tensorboard=args.tensorboard, export=not args.no_export, progress=not args.no_progress,
        data=args.data, eval_data=args.eval_data, eval_fraction=args.eval_fraction,
        input_field=args.input_field, target_field=args.target_field, prefix=args.prefix,
        keep_best=args.keep_best, max_new_tokens=args.max_new_tokens,
        eval_generate=args.eval_generate)
    return _train(finetune.run, cfg)


# -- embed ------------------------------------------------------------------------------------
def _add_embed(p: argparse.ArgumentParser):
    p.add_argument("input", metavar="INPUT",
                   help="texts: a text file (one per line) or .jsonl (the --field of each line)")
    p.add_argument("--model", required=True, help=MODEL_DIR + " (an encoder-only export works)")
    p.add_argument("--output", required=True,
                   help="x.npy ([N, D], pooled only) or x.safetensors (embeddings, + mask for "
                        "--pooling none)")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default text)")
    p.add_argument("--pooling", choices=("mean", "first", "none"), default="mean",
                   help="mean over real tokens, the first token, or none: per-token states "
                        "(default mean)")
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer directory "
                   "(default: the --model directory's)")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="(default 32)")
    p.add_argument("--max-length", type=_int_at_least(2), default=512,
                   help="truncate inputs to this many tokens, counted (default 512)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype (default bfloat16 on a GPU, float32 on CPU); outputs "
                        "are float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _read_texts(path: str, field: str) -> list[str]:
    import json as _json
    if not os.path.isfile(path):
        raise FileNotFoundError(f"INPUT {path} does not exist")
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not path.endswith(".jsonl"):
                texts.append(line)
                continue
            if not line.strip():
                continue
            try:
                value = _json.loads(line).get(field)
            except (ValueError, AttributeError):
                raise ValueError(f"{path}:{n}: not a JSON object") from None
            if not isinstance(value, str):
                raise ValueError(f"{path}:{n}: no string field {field!r}; set --field")
            texts.append(value)
    if not texts:
        raise ValueError(f"INPUT {path}: no texts (the file is empty)")
    return texts


def _run_embed(args) -> int:
    import time

    from jt5 import embeddings

    if not args.output.endswith((".npy", ".safetensors")):
        raise ValueError(f"--output {args.output}: expected a .npy or .safetensors file name")
    if args.output.endswith(".npy") and args.pooling == "none":
        raise ValueError(f"--output {args.output}: --pooling none needs .safetensors (it holds "
                         "the mask too)")
    texts = _read_texts(args.input, args.field)
    t0 = time.perf_counter()
    try:
        result = embeddings.embed(args.model, texts, pooling=args.pooling,
                                  tokenizer=args.tokenizer, batch_size=args.batch_size,
                                  max_length=args.max_length, dtype=args.dtype,
                                  progress=not args.no_progress)
    except FileNotFoundError as e:
        raise ValueError(f"--model {e}") from e
    embeddings.save(args.output, result, args.pooling)
    if result.truncated:
        logging.getLogger("jt5.embeddings").warning(
            "truncated %d of %d texts to --max-length %d", result.truncated, len(texts),
            args.max_length)
    print(f"embedded {len(texts)} texts -> {args.output} {list(result.embeddings.shape)} in "
          f"{time.perf_counter() - t0:.1f}s")
    return 0


COMMANDS = {
    "pretrain": ("UL2-pretrain a T5 (no arguments: a small model on the built-in corpus)",
                 _add_pretrain, _run_pretrain),
    "bench": ("run a benchmark script from benchmarks/ (jt5 bench NAME [ARGS...])",
              _add_bench, _run_bench),
    "generate": ("generate text from a model directory (greedy, sampling, beam search)",
                 _add_generate, _run_generate),
    "convert": ("move a checkpoint between transformers and jt5 (orbax) formats",
                _add_convert, _run_convert),
    "finetune": ("fine-tune a model on (input, target) pairs from JSONL / CSV / TSV",
                 _add_finetune, _run_finetune),
    "embed": ("encoder embeddings of texts to .npy / .safetensors",
              _add_embed, _run_embed),
}


class _Format(logging.Formatter):
    """``warning: ...`` for warnings and errors, the bare message for info: no logger names."""

    def format(self, record):
        text = record.getMessage()
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


class _Stderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced after setup)."""

    def emit(self, record):
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def _setup_logging():
    handler = _Stderr()
    handler.setFormatter(_Format())
    for name in ("jt5",):  # the project's loggers: info and up, clean format
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("jt5")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# What a user can cause: bad values, paths and files (CheckpointError is a ValueError), missing
# optional packages, and the project's own RuntimeErrors (NonFiniteLoss). Anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def _is_user_error(e: BaseException) -> bool:
    ours = type(e).__module__.split(".")[0] == "jt5"
    return isinstance(e, USER_ERRORS) or (ours and isinstance(e, RuntimeError))


def main(argv=None) -> int:
    parser = _Parser(prog="jt5", description="T5 in JAX: pretrain, generate, convert, benchmark.")
    parser.add_argument("--version", action="version", version=f"jt5 {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: environment JT5_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _setup_logging()
    debug = args.debug or os.environ.get("JT5_DEBUG", "") not in ("", "0")
    try:
        return COMMANDS[args.command][2](args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug or not _is_user_error(e):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
