"""The pretraining loop: mesh, init or restore, jitted sharded steps, metrics, checkpoints, export.

    result = run(LoopConfig(model="tiny", out="runs/pretrain", steps=800))

Re-running the same configuration resumes from the newest complete checkpoint in ``OUT`` and
continues exactly as an uninterrupted run would: batch ``s`` is a pure function of ``s`` (see
``train/data.py``), the dropout key of update ``s`` is ``fold_in(rng, s)``, and ``metrics.jsonl``
is cut back to the restored step before new lines are appended. A non-finite loss stops the run
(:class:`NonFiniteLoss`) before anything computed from it is saved. SIGINT / SIGTERM finish the
step in flight, save it and stop (:class:`train.signals.Interrupted`). At the end the model is
written as a transformers directory (``OUT/hf``, with tokenizer files) and a few held-out examples
are generated from it into ``OUT/samples.txt``.

Every process of a multi-host job runs this same function (after ``jax.distributed.initialize``);
each feeds its own rows of the global batch; process 0 writes metrics, export and samples.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jt5 import formats, sharding
from jt5.config import PRESETS, T5Config, preset
from jt5.model import T5ForConditionalGeneration, abstract_model
from jt5.tokenizer import load_tokenizer
from train import step as step_lib
from train.checkpoint import Checkpoints
from train.data import FEATURES, DataConfig, Pipeline, assemble
from train.signals import Interrupted, StopOnSignal
from train.ul2 import Examples

log = logging.getLogger(__name__)

# Metrics that depend on the wall clock; everything else in a metrics line is reproducible.
TIMING_KEYS = ("step_time", "tokens_per_s", "elapsed")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """One pretraining run; the CLI flags map onto these fields one to one (see ``jt5 pretrain -h``)."""

    model: Union[str, T5Config] = "tiny"   # preset name, transformers directory, or a T5Config
    out: str = "runs/pretrain"
    steps: int = 800
    batch_size: int = 16                   # global, all hosts
    inputs_length: int = 128
    targets_length: int = 32
    data: tuple = ("builtin",)
    tokenizer: Optional[str] = None        # None: the --model directory's tokenizer, else "byte"
    pack: bool = True
    seed: int = 0
    mesh: Optional[str] = None             # "data=2,fsdp=2,tensor=2"; None: all devices on data
    save_every: int = 200
    keep: int = 3
    eval_every: int = 0                    # 0: never (held-out loss on sample-prompt documents)
    optim: Optional[step_lib.OptimConfig] = None  # None: warmup 50, decay over `steps`
    dtype: Optional[str] = None            # None: bfloat16 on GPU/TPU, float32 on CPU
    remat: str = "none"
    attention: str = "auto"
    dropout_rate: Optional[float] = None   # None: the model's (0 for presets)
    tensorboard: bool = False
    export: bool = True
    samples_per_kind: int = 1
    max_new_tokens: int = 64
    progress: bool = True
    async_checkpoints: bool = True

    def __post_init__(self):
        if self.optim is None:
            object.__setattr__(self, "optim", step_lib.OptimConfig(warmup_steps=50,
                                                                   total_steps=self.steps))
        if self.steps < 1 or self.keep < 1:
            raise ValueError(f"steps={self.steps} and keep={self.keep} must be >= 1")


class RunResult(NamedTuple):
    out: Path
    start_step: int         # the step this invocation resumed from (0: fresh)
    step: int               # the step reached
    history: list           # the metric lines this invocation produced


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, loss: float, last_good: Optional[int], directory):
        kept = (f"the last good checkpoint is step {last_good} in {directory}"
                if last_good is not None else "no checkpoint had been saved yet")
        super().__init__(f"non-finite loss {loss} at step {step}: stopping the run; {kept} "
                         "(nothing computed after it was saved). Try a lower --lr, more --warmup, "
                         "or --clip.")
        self.step, self.loss, self.last_good = step, loss, last_good


# -- setup ------------------------------------------------------------------------------------
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")


def init_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None) -> None:
    """``jax.distributed.initialize`` for multi-host runs; call before anything touches devices.

    Flags win; without them jax auto-detects SLURM / Open MPI / TPU pods / ``JAX_COORDINATOR_*``
    environments. A plain single-host run (none of those) initialises nothing. On CPU, gloo
    provides the cross-process collectives.
    """
    flags = (coordinator, num_processes, process_id)
    detected = any(os.environ.get(k) for k in _CLUSTER_ENV)
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        detected = False  # a one-task SLURM allocation is a single host
    if all(f is None for f in flags) and not detected:
        return
    if num_processes == 1 and coordinator is None:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    log.info("process %d of %d (%d local devices, %d global)", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def default_dtype() -> str:
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _is_model_path(model) -> bool:
    """``--model`` names a directory (any format jt5.formats reads) rather than a preset."""
    return isinstance(model, (str, os.PathLike)) and (os.fspath(model) not in PRESETS)


def model_config(cfg: LoopConfig) -> T5Config:
    """The architecture ``--model`` names, with this run's numerics."""
    if isinstance(cfg.model, T5Config):
        base = cfg.model
    elif cfg.model in PRESETS:
        base = preset(cfg.model)
    elif _is_model_path(cfg.model) and os.path.exists(cfg.model):
        try:
            base = formats.load_config(cfg.model)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--model {cfg.model}: {e}") from e
    else:
        raise ValueError(f"--model {cfg.model!r} is neither a preset ({', '.join(PRESETS)}) "
                         "nor an existing model directory")
    overrides = dict(dtype=cfg.dtype or default_dtype(), param_dtype="float32",
                     attention=cfg.attention, remat=cfg.remat)
    if cfg.dropout_rate is not None:
        overrides["dropout_rate"] = cfg.dropout_rate
    return base.replace(**overrides)


def data_config(cfg: LoopConfig) -> DataConfig:
    tok = cfg.tokenizer
    if tok is None:
        found = formats.locate(cfg.model).tokenizer if _is_model_path(cfg.model) else None
        tok = found or "byte"
    return DataConfig(data=tuple(cfg.data), tokenizer=tok, inputs_length=cfg.inputs_length,
                      targets_length=cfg.targets_length, batch_size=cfg.batch_size, pack=cfg.pack,
                      seed=cfg.seed)


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: dataclasses.asdict(o)
                                 if dataclasses.is_dataclass(o) else str(o)))


def run_meta(model_cfg: T5Config, data_cfg: DataConfig, cfg: LoopConfig, mesh) -> dict:
    return _jsonable({"model_config": dataclasses.asdict(model_cfg),
                      "data_config": dataclasses.asdict(data_cfg),
                      "optim_config": dataclasses.asdict(cfg.optim), "seed": cfg.seed,
                      "mesh": dict(mesh.shape), "process_count": jax.process_count()})


_NUMERICS = ("dtype", "param_dtype", "attention", "remat", "dropout_rate")


def _check_resume(meta: dict, now: dict, where):
    """Architecture must match the checkpoint; other differences are allowed but announced."""
    arch = {k: v for k, v in now["model_config"].items() if k not in _NUMERICS}
    old = {k: v for k, v in meta["model_config"].items() if k not in _NUMERICS}
    if arch != old:
        diff = sorted(k for k in set(arch) | set(old) if arch.get(k) != old.get(k))
        raise ValueError(f"the checkpoint in {where} was written for another model "
                         f"(differs in {diff}): resume with the same --model, or pass a new --out")
    for key in ("data_config", "optim_config", "seed"):
        if meta.get(key) != now[key]:
            log.warning("resuming with a different %s than the checkpoint was written with "
                        "(was %s, now %s): the continuation will differ from an uninterrupted run",
                        key, meta.get(key), now[key])


def _start_line(cfg: LoopConfig, mcfg: T5Config, abstract, mesh, data: Pipeline, start: int,
                out: Path) -> str:
    """What this run is about to do, in one line (printed before the progress bar)."""
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(abstract)))
    name = "custom config" if isinstance(cfg.model, T5Config) else str(cfg.model)
    devices = jax.devices()
    where = f"{len(devices)} {devices[0].platform} device(s)"
    if jax.process_count() > 1:
        where += f" on {jax.process_count()} processes"
    shape = ",".join(f"{k}={v}" for k, v in mesh.shape.items())
    store = data.store
    tok = data.config.tokenizer if data.config.tokenizer == "byte" else "tokenizer " + str(
        data.config.tokenizer)
    begin = f"resuming from step {start}" if start else "fresh start"
    return (f"pretrain {name}: {n_params / 1e6:.2f}M parameters, {mcfg.dtype}; mesh {shape} over "
            f"{where}; data {', '.join(data.config.data)} ({len(store.doc_index):,} documents, "
            f"{len(store.tokens):,} tokens, {tok}); {begin}, to step {cfg.steps}; {out}")


def _heldout_batch(data: Pipeline, rows: int) -> Optional[dict]:
    """``rows`` held-out examples (the sample-prompt documents, never trained on) as a batch."""
    kinds = len({d.kind for d in data.mixture})
    prompts = data.sample_prompts(per_kind=math.ceil(rows / kinds))[:rows]
    if len(prompts) < rows:
        return None
    L_in, L_tgt = data.config.inputs_length, data.config.targets_length
    inputs = np.zeros((rows, L_in), np.int32)
    targets = np.zeros((rows, L_tgt), np.int32)
    for r, p in enumerate(prompts):
        inputs[r, :len(p.inputs)] = p.inputs[:L_in]
        targets[r, :len(p.targets)] = p.targets[:L_tgt]
    ex = Examples(inputs, np.array([min(len(p.inputs), L_in) for p in prompts], np.int32), targets,
                  np.array([min(len(p.targets), L_tgt) for p in prompts], np.int32),
                  np.zeros(rows, np.int32))
    zero = np.zeros(rows, np.int64)
    return assemble(ex, np.arange(rows), zero, zero, np.ones(rows, np.int32), rows)


def _global_batch(local: dict, shardings: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


# -- metrics output ---------------------------------------------------------------------------
class MetricsWriter:
    """``OUT/metrics.jsonl`` (one JSON object per step) and optionally TensorBoard; process 0 only."""

    def __init__(self, out: Path, start_step: int, tensorboard: bool):
        self.enabled = jax.process_index() == 0
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not self.enabled:
            return
        if self.path.exists():  # drop lines past the restored step (they will be recomputed)
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)

    def write(self, line: dict):
        if not self.enabled:
            return
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in line.items():
                if k != "step":
                    self.tb.add_scalar(k if k.startswith("eval") else f"train/{k}", v, line["step"])

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(out) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- the loop ---------------------------------------------------------------------------------
def run(cfg: LoopConfig, *, on_step: Optional[Callable[[int, dict], None]] = None) -> RunResult:
    """Train (or resume) to ``cfg.steps``, then export and sample. ``on_step(step, line)`` is
    called after each metrics line (tests use it to simulate a crash)."""
    out = Path(cfg.out).absolute()
    pid, nproc = jax.process_index(), jax.process_count()
    # Cheap checks first, before the corpus is tokenised or OUT is created.
    mcfg = model_config(cfg)
    try:
        mesh = sharding.make_mesh(cfg.mesh)
    except ValueError as e:
        raise ValueError(f"--mesh {cfg.mesh or '(default: all devices on data)'}: {e}") from e
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.batch_size // cfg.optim.accum_steps
    if cfg.batch_size % cfg.optim.accum_steps or micro % shards:
        raise ValueError(f"--batch-size {cfg.batch_size} / --accum {cfg.optim.accum_steps} must be "
                         f"a whole multiple of data x fsdp = {shards} (mesh {dict(mesh.shape)})")
    data_cfg = data_config(cfg)
    try:
        tokenizer = load_tokenizer(data_cfg.tokenizer)
    except ValueError as e:
        raise ValueError(f"--tokenizer {data_cfg.tokenizer}: {e}") from e
    try:
        data = Pipeline(data_cfg, process_index=pid, process_count=nproc, tokenizer=tokenizer)
    except (ValueError, OSError) as e:  # missing, empty, binary or malformed data files
        raise ValueError(f"--data {' '.join(data_cfg.data)}: {e}") from e
    if data.vocab_size > mcfg.vocab_size:
        raise ValueError(f"the tokenizer/data use ids up to {data.vocab_size - 1} but the model's "
                         f"vocab_size is {mcfg.vocab_size}")
    if pid == 0:
        out.mkdir(parents=True, exist_ok=True)

    ckpts = Checkpoints(out / "checkpoints", keep=cfg.keep, async_save=cfg.async_checkpoints)
    start = ckpts.latest_step() or 0
    meta = ckpts.read_meta(start) if start else None
    now = run_meta(mcfg, data_cfg, cfg, mesh)
    if meta:
        _check_resume(meta, now, out)

    graphdef, abstract = nnx.split(abstract_model(mcfg))
    if pid == 0:
        print(_start_line(cfg, mcfg, abstract, mesh, data, start, out), flush=True)
    param_sh = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh))
    tx = step_lib.make_optimizer(cfg.optim)
    abstract_state = jax.eval_shape(lambda p: step_lib.init_state(p, tx, cfg.seed),
                                    nnx.to_pure_dict(abstract))
    state_sh = step_lib.state_shardings(abstract_state, param_sh, tx, mesh)
    replicated = NamedSharding(mesh, P())
    batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in FEATURES}

    if start:  # restored straight into this mesh's layout, whatever mesh wrote it
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, state_sh)
        state, _ = ckpts.restore(start, target)
    else:
        state = _fresh_state(cfg, mcfg, param_sh, state_sh, tx, mesh)

    with jax.set_mesh(mesh):  # the model's activation constraints name this mesh's axes
        train_step = jax.jit(step_lib.make_train_step(graphdef, cfg.optim, tx,
                                                      dropout=mcfg.dropout_rate > 0),
                             in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                             donate_argnums=0)
        eval_step = jax.jit(step_lib.make_eval_step(graphdef, cfg.optim),
                            in_shardings=(state_sh.params, batch_sh), out_shardings=replicated)
        eval_batch = None
        if cfg.eval_every:
            rows = _heldout_batch(data, cfg.batch_size)
            if rows is None:
                log.warning("not enough held-out documents for --eval-every; evaluation is off")
            else:
                lo = pid * (cfg.batch_size // nproc)
                eval_batch = _global_batch({k: v[lo:lo + cfg.batch_size // nproc]
                                            for k, v in rows.items()}, batch_sh)

        writer = MetricsWriter(out, start, cfg.tensorboard)
        history: list[dict] = []
        last_saved = start or None
        t_start = t_prev = time.perf_counter()
        bar = None
        if cfg.progress and pid == 0 and start < cfg.steps:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)

        def finish(step: int, metrics, params=None):
            """Fetch, check, log one step's metrics (step = updates done after it)."""
            nonlocal t_prev
            line = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
            if not math.isfinite(line["loss"]):
                raise NonFiniteLoss(step, line["loss"], last_saved, ckpts.directory)
            if eval_batch is not None and params is not None and step % cfg.eval_every == 0:
                ev = jax.device_get(eval_step(params, eval_batch))
                line.update(eval_loss=float(ev["loss"]), eval_accuracy=float(ev["accuracy"]))
            now_t = time.perf_counter()
            line.update(step_time=now_t - t_prev, tokens_per_s=line["tokens"] / (now_t - t_prev),
                        elapsed=now_t - t_start)
            t_prev = now_t
            writer.write(line)
            history.append(line)
            if bar is not None:
                recent = history[-20:]
                rate = sum(h["tokens"] for h in recent) / sum(h["step_time"] for h in recent)
                bar.set_postfix(loss=f"{line['loss']:.3f}", lr=f"{line['learning_rate']:.2e}",
                                tok_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
            if on_step is not None:
                on_step(step, line)

        batches = data.iterate(start)
        stop = StopOnSignal(enabled=nproc == 1)
        try:
            pending = None  # the previous step's metrics, fetched after the next step is queued
            for s in range(start, cfg.steps):
                _, local = next(batches)
                state, metrics = train_step(state, _global_batch(local, batch_sh))
                if pending is not None:
                    finish(*pending)
                pending = (s + 1, metrics)
                due_eval = eval_batch is not None and (s + 1) % cfg.eval_every == 0
                due_save = (cfg.save_every > 0 and (s + 1) % cfg.save_every == 0) or s + 1 == cfg.steps
                if due_save or due_eval:
                    finish(*pending, params=state.params)  # validated before it can be saved
                    pending = None
                    if due_save:
                        ckpts.save(s + 1, state, now)
                        last_saved = s + 1
                if stop.signum is not None:  # the step in flight is done: save it, then stop
                    if pending is not None:
                        finish(*pending)
                        pending = None
                    if last_saved != s + 1:
                        ckpts.save(s + 1, state, now)
                    ckpts.wait()
                    raise Interrupted(stop.signum, s + 1, ckpts.directory)
            if pending is not None:
                finish(*pending)
            ckpts.wait()
        finally:
            stop.restore()
            batches.close()  # stops the prefetch thread
            if bar is not None:
                bar.close()
            writer.close()
            ckpts.close()

    if cfg.export:  # outside the mesh context: loading the export builds an unsharded model
        export_and_sample(nnx.merge(graphdef, state.params), data, out, cfg)
    return RunResult(out, start, max(start, cfg.steps), history)


def _fresh_state(cfg: LoopConfig, mcfg: T5Config, param_sh, state_sh, tx, mesh):
    """A new TrainState: random init (created directly sharded) or the weights ``--model`` names
    (a transformers directory, a jt5 checkpoint or another run), read straight onto the mesh."""
    if _is_model_path(cfg.model):
        model = formats.load(cfg.model, T5ForConditionalGeneration, dtype=mcfg.dtype,
                             param_dtype="float32", attention=mcfg.attention, remat=mcfg.remat,
                             dropout_rate=mcfg.dropout_rate,
                             shardings=lambda a: sharding.param_shardings(a, mesh))
        params = nnx.to_pure_dict(nnx.state(model))
    else:
        def init():
            return nnx.to_pure_dict(nnx.state(T5ForConditionalGeneration(
                mcfg, rngs=nnx.Rngs(params=cfg.seed))))
        params = jax.jit(init, out_shardings=param_sh)()
    return jax.jit(lambda p: step_lib.init_state(p, tx, cfg.seed), out_shardings=state_sh)(params)


# -- export -----------------------------------------------------------------------------------
def export_and_sample(model, data: Pipeline, out: Path, cfg: LoopConfig) -> None:
    """Write OUT/hf (all processes gather, process 0 writes) and OUT/samples.txt (process 0)."""
    from bridge import hf
    from jt5.tokenizer import tokenizer_files

    params = hf.model_params(model)  # a collective on multi-host: every process calls it
    if jax.process_index() != 0:
        return
    sd, hf_cfg = hf.jt5_to_hf(model.config, params)
    hf_dir = out / "hf"
    # The tokenizer goes with the weights, with the special-token ids jt5 trained with.
    hf.write_hf_dir(hf_dir, sd, hf_cfg, extra_files=tokenizer_files(data.tokenizer))
    print(f"exported a transformers model to {hf_dir}")
    write_samples(hf_dir, data, out / "samples.txt", cfg)


def write_samples(hf_dir: Path, data: Pipeline, path: Path, cfg: LoopConfig) -> None:
    """Greedy outputs of the *exported* model on held-out examples: printed and saved."""
    if cfg.samples_per_kind <= 0:
        return
    prompts = data.sample_prompts(per_kind=cfg.samples_per_kind)
    if not prompts:
        log.warning("no held-out documents: no samples")
        return
    try:
        model = T5ForConditionalGeneration.from_pretrained(hf_dir, dtype=default_dtype(),
                                                           attention=cfg.attention)
        width = max(len(p.inputs) for p in prompts)
        ids = np.zeros((len(prompts), width), np.int32)
        mask = np.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, :len(p.inputs)] = p.inputs
            mask[r, :len(p.inputs)] = 1
        gen = np.asarray(model.generate(ids, mask, max_new_tokens=cfg.max_new_tokens))
    except ImportError as e:  # generation not available in this build
        log.warning("no samples: %s", e)
        return
    lines = []
    for p, row in zip(prompts, gen):
        lines += [f"== {p.denoiser} (held-out {p.document})",
                  f"input    : {data.render(p.inputs)}",
                  f"target   : {data.render(p.targets)}",
                  f"generated: {data.render(row[1:])}", ""]
    text = "\n".join(lines)
    path.write_text(text)
    print(text)
