"""What ``jt5 pretrain`` and ``jt5 finetune`` share: setup, the step loop, and the export.

    mcfg, mesh = prepare(cfg)                       # cheap checks: model, mesh, batch divisibility
    trainer = Trainer(cfg, mcfg, mesh, data_config, kind="finetune", data_text="...")
    history = trainer.train(batches, evaluate=fn)   # batches: iterator of (step, local batch dict)
    export_hf(trainer.model(), tokenizer, out)      # OUT/hf with tokenizer files

``Trainer`` builds the mesh layout, restores the newest complete checkpoint in ``OUT`` (or
initialises / loads ``--model``), and prints the run's start line. ``train`` runs the jitted,
donated steps with the same guarantees for every kind of run: a non-finite loss stops it before
anything computed from it is saved (:class:`NonFiniteLoss`); SIGINT / SIGTERM finish the step in
flight, save it and raise :class:`jt5.train.signals.Interrupted`; ``OUT/metrics.jsonl`` is cut back to
the restored step, so a resumed run's file equals an uninterrupted one's (given batches that are a
pure function of the step, and dropout keyed by ``fold_in(rng, step)``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Union

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jt5 import formats, heads, sharding
from jt5.config import PRESETS, T5Config, preset
from jt5.model import T5ForConditionalGeneration, abstract_model
from jt5.train import step as step_lib
from jt5.train.checkpoint import Checkpoints
from jt5.train.data import FEATURES
from jt5.train.signals import Interrupted, StopOnSignal

log = logging.getLogger(__name__)

# Metrics that depend on the wall clock; everything else in a metrics line is reproducible.
TIMING_KEYS = ("step_time", "tokens_per_s", "elapsed")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The fields every training run has (pretrain's ``LoopConfig`` and finetune's config add theirs)."""

    model: Union[str, T5Config] = "tiny"   # preset name, model directory (jt5.formats), or T5Config
    out: str = "runs/pretrain"
    steps: int = 800
    batch_size: int = 16                   # global, all hosts
    inputs_length: int = 128
    targets_length: int = 32
    tokenizer: Optional[str] = None        # None: the --model directory's tokenizer, else "byte"
    pack: bool = True
    seed: int = 0
    mesh: Optional[str] = None             # "data=2,fsdp=2,tensor=2"; None: all devices on data
    save_every: int = 200
    keep: int = 3
    eval_every: int = 0                    # 0: never
    optim: Optional[step_lib.OptimConfig] = None  # None: warmup 50, decay over `steps`
    dtype: Optional[str] = None            # None: bfloat16 on GPU/TPU, float32 on CPU
    remat: str = "none"
    scan_layers: bool = False              # one compiled layer body per stack (deep models)
    attention: str = "auto"
    dropout_rate: Optional[float] = None   # None: the model's (0 for presets)
    tensorboard: bool = False
    export: bool = True
    progress: bool = True
    async_checkpoints: bool = True

    def __post_init__(self):
        if self.optim is None:
            object.__setattr__(self, "optim", step_lib.OptimConfig(warmup_steps=50,
                                                                   total_steps=self.steps))
        if self.steps < 1 or self.keep < 1:
            raise ValueError(f"steps={self.steps} and keep={self.keep} must be >= 1")


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


def is_model_path(model) -> bool:
    """``--model`` names a directory (any format jt5.formats reads) rather than a preset."""
    return isinstance(model, (str, os.PathLike)) and (os.fspath(model) not in PRESETS)


def model_config(cfg: RunConfig) -> T5Config:
    """The architecture ``--model`` names, with this run's numerics."""
    if isinstance(cfg.model, T5Config):
        base = cfg.model
    elif cfg.model in PRESETS:
        base = preset(cfg.model)
    elif is_model_path(cfg.model) and os.path.exists(cfg.model):
        try:
            base = formats.load_config(cfg.model)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--model {cfg.model}: {e}") from e
    else:
        raise ValueError(f"--model {cfg.model!r} is neither a preset ({', '.join(PRESETS)}) "
                         "nor an existing model directory")
    overrides = dict(dtype=cfg.dtype or default_dtype(), param_dtype="float32",
                     attention=cfg.attention, remat=cfg.remat, scan_layers=cfg.scan_layers)
    if cfg.dropout_rate is not None:
        overrides["dropout_rate"] = cfg.dropout_rate
    return base.replace(**overrides)


def tokenizer_spec(cfg: RunConfig) -> str:
    """``--tokenizer``, else the ``--model`` directory's tokenizer, else bytes."""
    if cfg.tokenizer is not None:
        return cfg.tokenizer
    found = formats.locate(cfg.model).tokenizer if is_model_path(cfg.model) else None
    return found or "byte"


def prepare(cfg: RunConfig, devices=None):
    """The cheap checks, before any data is read or OUT created: -> (model config, mesh).
    ``devices``: the mesh's (default all; ``jt5 plan`` passes a GPU topology's)."""
    mcfg = model_config(cfg)
    try:
        mesh = sharding.make_mesh(cfg.mesh, devices)
    except ValueError as e:
        raise ValueError(f"--mesh {cfg.mesh or '(default: all devices on data)'}: {e}") from e
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.batch_size // cfg.optim.accum_steps
    if cfg.batch_size % cfg.optim.accum_steps or micro % shards:
        raise ValueError(f"--batch-size {cfg.batch_size} / --accum {cfg.optim.accum_steps} must be "
                         f"a whole multiple of data x fsdp = {shards} (mesh {dict(mesh.shape)})")
    return mcfg, mesh


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: dataclasses.asdict(o)
                                 if dataclasses.is_dataclass(o) else str(o)))


def run_meta(model_cfg: T5Config, data_cfg, cfg: RunConfig, mesh) -> dict:
    return _jsonable({"model_config": dataclasses.asdict(model_cfg),
                      "data_config": dataclasses.asdict(data_cfg),
                      "optim_config": dataclasses.asdict(cfg.optim), "seed": cfg.seed,
                      "mesh": dict(mesh.shape), "process_count": jax.process_count()})


_NUMERICS = ("dtype", "param_dtype", "attention", "remat", "scan_layers", "dropout_rate")


def check_resume(meta: dict, now: dict, where):
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


def global_batch(local: dict, shardings: dict) -> dict:
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


# -- the step program -------------------------------------------------------------------------
class StepProgram(NamedTuple):
    """The jitted steps of a run and the shapes and shardings they take: what ``Trainer`` runs
    and what ``jt5 plan`` compiles for GPUs it does not have (nothing here is allocated)."""
    graphdef: object
    abstract_model: object      # nnx.State of ShapeDtypeStructs (with logical axis metadata)
    tx: object                  # the optax transformation
    param_sh: dict              # NamedShardings of the parameters (a pure dict)
    state_sh: step_lib.TrainState
    abstract_state: step_lib.TrainState   # ShapeDtypeStructs carrying state_sh
    batch_sh: dict              # feature -> NamedSharding
    train_step: Callable        # jitted, donating the state
    eval_step: Callable


# T5ForConditionalGeneration on train/data.py's features: what pretraining and seq2seq
# fine-tuning train (the task heads' tasks: jt5.train.head_tasks).
SEQ2SEQ = step_lib.Task(
    T5ForConditionalGeneration, step_lib.forward_terms,
    {k: ("inputs" if k.startswith("encoder") else "targets",
         "float32" if k == "decoder_loss_weights" else "int32") for k in FEATURES})


def abstract_batch(cfg: RunConfig, batch_sh: dict, task: step_lib.Task = SEQ2SEQ) -> dict:
    """ShapeDtypeStructs of one global batch (the task's features and dtypes)."""
    out = {}
    for k, sh in batch_sh.items():
        length, dtype = task.features[k]
        shape = (cfg.batch_size,) + (() if length is None else
                                     (cfg.inputs_length if length == "inputs"
                                      else cfg.targets_length,))
        out[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    return out


def step_program(cfg: RunConfig, mcfg: T5Config, mesh,
                 task: step_lib.Task = SEQ2SEQ) -> StepProgram:
    graphdef, abstract = nnx.split(abstract_model(mcfg, task.model_cls))
    param_sh = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh))
    tx = step_lib.make_optimizer(cfg.optim)
    shapes = jax.eval_shape(lambda p: step_lib.init_state(p, tx, cfg.seed),
                            nnx.to_pure_dict(abstract))
    state_sh = step_lib.state_shardings(shapes, param_sh, tx, mesh)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, state_sh)
    replicated = NamedSharding(mesh, P())
    batch_sh = {k: sharding.batch_sharding(mesh, 1 if length is None else 2)
                for k, (length, _) in task.features.items()}
    dropout = mcfg.dropout_rate > 0 or mcfg.classifier_dropout > 0
    with jax.set_mesh(mesh):  # the model's activation constraints name this mesh's axes
        train_step = jax.jit(
            step_lib.make_train_step(graphdef, cfg.optim, tx, dropout=dropout,
                                     forward=task.forward),
            in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
            donate_argnums=0)
        eval_step = jax.jit(step_lib.make_eval_step(graphdef, cfg.optim, forward=task.forward,
                                                    predict=task.predict),
                            in_shardings=(state_sh.params, batch_sh), out_shardings=replicated)
    return StepProgram(graphdef, abstract, tx, param_sh, state_sh, abstract_state, batch_sh,
                       train_step, eval_step)


# -- the trainer ------------------------------------------------------------------------------
class Trainer:
    """A run's state on the mesh (restored, loaded or fresh), its jitted steps and checkpoints.

    ``data_config``: the dataclass that determines the batches (saved with each checkpoint; a
    resume with another one is announced). ``data_text``: how the start line describes the data.
    ``task``: the model class and loss (default: seq2seq T5; the task heads' in head_tasks).
    """

    def __init__(self, cfg: RunConfig, mcfg: T5Config, mesh, data_config, *, kind: str,
                 data_text: str, task: step_lib.Task = SEQ2SEQ):
        self.cfg, self.mcfg, self.mesh, self.kind, self.task = cfg, mcfg, mesh, kind, task
        self.out = out = Path(cfg.out).absolute()
        if jax.process_index() == 0:
            out.mkdir(parents=True, exist_ok=True)
        self.ckpts = Checkpoints(out / "checkpoints", keep=cfg.keep,
                                 async_save=cfg.async_checkpoints)
        self.start = start = self.ckpts.latest_step() or 0
        meta = self.ckpts.read_meta(start) if start else None
        self.meta = run_meta(mcfg, data_config, cfg, mesh)
        self.meta["model_class"] = task.model_cls.__name__  # what jt5.load(run dir) builds
        if meta:
            check_resume(meta, self.meta, out)

        prog = step_program(cfg, mcfg, mesh, task)
        self.graphdef, self.batch_sh = prog.graphdef, prog.batch_sh
        if jax.process_index() == 0:
            print(self._start_line(prog.abstract_model, data_text), flush=True)
        if start:  # restored straight into this mesh's layout, whatever mesh wrote it
            self.state, _ = self.ckpts.restore(start, prog.abstract_state)
        else:
            self.state = self._fresh_state(prog.param_sh, prog.state_sh, prog.tx)
        self.train_step, self._eval_step = prog.train_step, prog.eval_step

    def _start_line(self, abstract, data_text: str) -> str:
        """What this run is about to do, in one line (printed before the progress bar)."""
        cfg = self.cfg
        n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(abstract)))
        name = "custom config" if isinstance(cfg.model, T5Config) else str(cfg.model)
        devices = jax.devices()
        where = f"{len(devices)} {devices[0].platform} device(s)"
        if jax.process_count() > 1:
            where += f" on {jax.process_count()} processes"
        shape = ",".join(f"{k}={v}" for k, v in self.mesh.shape.items())
        begin = f"resuming from step {self.start}" if self.start else "fresh start"
        return (f"{self.kind} {name}: {n_params / 1e6:.2f}M parameters, {self.mcfg.dtype}; mesh "
                f"{shape} over {where}; {data_text}; {begin}, to step {cfg.steps}; {self.out}")

    def _fresh_state(self, param_sh, state_sh, tx):
        """A new TrainState: random init (created directly sharded) or the weights ``--model``
        names (a transformers directory, a jt5 checkpoint or another run), read onto the mesh."""
        cfg, mcfg, mesh = self.cfg, self.mcfg, self.mesh
        cls = self.task.model_cls
        if is_model_path(cfg.model):
            # The head's label set and options are this run's (a base checkpoint has none).
            head = {k: getattr(mcfg, k) for k in heads.CONFIG_FIELDS}
            model = formats.load(cfg.model, cls, dtype=mcfg.dtype,
                                 param_dtype="float32", attention=mcfg.attention,
                                 remat=mcfg.remat, scan_layers=mcfg.scan_layers,
                                 dropout_rate=mcfg.dropout_rate,
                                 shardings=lambda a: sharding.param_shardings(a, mesh), **head)
            params = nnx.to_pure_dict(nnx.state(model))
        else:
            def init():
                return nnx.to_pure_dict(nnx.state(cls(mcfg, rngs=nnx.Rngs(params=cfg.seed))))
            params = jax.jit(init, out_shardings=param_sh)()
        return jax.jit(lambda p: step_lib.init_state(p, tx, cfg.seed),
                       out_shardings=state_sh)(params)

    def local_rows(self, rows: dict) -> dict:
        """This process's share of a global batch given whole (every process holds all rows)."""
        n = next(iter(rows.values())).shape[0] // jax.process_count()
        lo = jax.process_index() * n
        return {k: v[lo:lo + n] for k, v in rows.items()}

    def eval_step(self, params, local: dict) -> dict:
        """Metrics of one global batch (this process's rows given) under ``params``."""
        with jax.set_mesh(self.mesh):
            return jax.device_get(self._eval_step(params, global_batch(local, self.batch_sh)))

    def model(self, params=None):
        """The model with the current (or given) parameters, still on the mesh."""
        return nnx.merge(self.graphdef, self.state.params if params is None else params)

    def train(self, batches: Iterator[tuple[int, dict]], *,
              evaluate: Optional[Callable[[int, object], dict]] = None,
              on_step: Optional[Callable[[int, dict], None]] = None,
              batch_metrics: Optional[Callable[[int], dict]] = None) -> list[dict]:
        """Steps ``start -> cfg.steps`` from ``batches`` (which must start at ``self.start``).
        ``batch_metrics(step)``: more numbers for line ``step`` (e.g. per-source tokens of the
        batch that made it).

        ``evaluate(step, params) -> metrics`` runs every ``cfg.eval_every`` steps, after the
        step's loss was found finite (so it may save things, e.g. a best checkpoint); its metrics
        join the step's line. ``on_step(step, line)`` is called after each metrics line (tests use
        it to simulate a crash). Returns the metric lines this invocation produced."""
        cfg, ckpts, out = self.cfg, self.ckpts, self.out
        start, nproc = self.start, jax.process_count()
        evaluate = evaluate if cfg.eval_every else None
        writer = MetricsWriter(out, start, cfg.tensorboard)
        history: list[dict] = []
        last_saved = start or None
        t_start = t_prev = time.perf_counter()
        bar = None
        if cfg.progress and jax.process_index() == 0 and start < cfg.steps:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=start, desc=self.kind, unit="step",
                       dynamic_ncols=True)

        def finish(step: int, metrics, params=None):
            """Fetch, check, log one step's metrics (step = updates done after it)."""
            nonlocal t_prev
            line = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
            if not math.isfinite(line["loss"]):
                raise NonFiniteLoss(step, line["loss"], last_saved, ckpts.directory)
            if batch_metrics is not None:
                line.update(batch_metrics(step))
            if evaluate is not None and params is not None and step % cfg.eval_every == 0:
                line.update(evaluate(step, params))
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

        stop = StopOnSignal(enabled=nproc == 1)
        try:
            with jax.set_mesh(self.mesh):
                pending = None  # the previous step's metrics, fetched after the next is queued
                for s in range(start, cfg.steps):
                    _, local = next(batches)
                    self.state, metrics = self.train_step(self.state,
                                                          global_batch(local, self.batch_sh))
                    if pending is not None:
                        finish(*pending)
                    pending = (s + 1, metrics)
                    due_eval = evaluate is not None and (s + 1) % cfg.eval_every == 0
                    due_save = ((cfg.save_every > 0 and (s + 1) % cfg.save_every == 0)
                                or s + 1 == cfg.steps)
                    if due_save or due_eval:
                        finish(*pending, params=self.state.params)  # validated before saving
                        pending = None
                        if due_save:
                            ckpts.save(s + 1, self.state, self.meta)
                            last_saved = s + 1
                    if stop.signum is not None:  # the step in flight is done: save it, stop
                        if pending is not None:
                            finish(*pending)
                            pending = None
                        if last_saved != s + 1:
                            ckpts.save(s + 1, self.state, self.meta)
                        ckpts.wait()
                        raise Interrupted(stop.signum, s + 1, ckpts.directory)
                if pending is not None:
                    finish(*pending)
                ckpts.wait()
        finally:
            stop.restore()
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # stops a prefetch thread
            if bar is not None:
                bar.close()
            writer.close()
            ckpts.close()
        return history


# -- export -----------------------------------------------------------------------------------
def export_hf(model, tokenizer, out: Path) -> Optional[Path]:
    """Write ``OUT/hf`` with tokenizer files (all processes gather, process 0 writes); returns
    the directory on process 0, None elsewhere."""
    from jt5 import weights
    from jt5.bridge import hf
    from jt5.tokenizer import tokenizer_files

    params = weights.model_params(model)  # a collective on multi-host: every process calls it
    if jax.process_index() != 0:
        return None
    cls = type(model)  # a task head writes its own architecture and tensors
    sd, hf_cfg = hf.jt5_to_hf(model.config, params, encoder_only=weights.is_encoder_only(cls),
                              head=weights.head_of(cls))
    hf_dir = Path(out) / "hf"
    # The tokenizer goes with the weights, with the special-token ids the run trained with.
    hf.write_hf_dir(hf_dir, sd, hf_cfg, extra_files=tokenizer_files(tokenizer))
    print(f"exported a transformers model to {hf_dir}")
    return hf_dir
