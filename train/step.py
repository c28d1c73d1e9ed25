"""Loss, train step and eval step: pure functions of (state, batch) that the loop jits with shardings.

    tx = make_optimizer(optim)                                   # AdamW | Adafactor, clipped
    state = init_state(params, tx, seed)                         # TrainState(step, params, opt_state, rng)
    train_step = make_train_step(graphdef, optim, tx, dropout=config.dropout_rate > 0)
    state, metrics = jax.jit(train_step, donate_argnums=0, ...)(state, batch)

``params`` is the model's ``nnx.to_pure_dict`` (a plain nested dict of arrays; ``nnx.merge(graphdef,
params)`` rebuilds the module inside the traced function), so the whole state is an ordinary pytree
that optax updates, orbax saves and ``jax.jit`` donates.

Loss (t5x ``losses.cross_entropy_with_logits``): float32 cross-entropy plus the z-loss
``z_loss * logsumexp(logits)**2`` (PaLM §5, keeps the softmax normaliser near 1), both weighted by
``decoder_loss_weights`` and divided by the number of target tokens in the *whole* step (all
micro-batches), so accumulating ``k`` micro-batches gives the gradient of the full batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jt5.sharding import constrain
from jt5.train import OPTIMIZERS, SCHEDULES

DEFAULT_LR = {"adamw": 3e-3, "adafactor": 1e-2}  # tuned on the small default model


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer, schedule and loss settings (everything the step needs besides the model)."""

    optimizer: str = "adamw"
    lr: Optional[float] = None      # None: DEFAULT_LR[optimizer]
    warmup_steps: int = 100         # linear warmup to lr
    total_steps: int = 1000         # the decay ends here
    schedule: str = "cosine"        # after warmup: cosine | linear (to final_lr_fraction*lr) | rsqrt | constant
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0       # decoupled (AdamW); Adafactor: weight_decay_rate; matrices only
    b1: float = 0.9
    b2: float = 0.99
    clip: float = 1.0               # global-norm gradient clipping; 0 disables
    z_loss: float = 1e-4
    accum_steps: int = 1            # micro-batches per step (gradient accumulation)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} must be one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be one of {SCHEDULES}")
        if self.accum_steps < 1 or self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"need accum_steps >= 1 (got {self.accum_steps}), total_steps >= 1 "
                             f"(got {self.total_steps}), warmup_steps >= 0 (got {self.warmup_steps})")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


class TrainState(NamedTuple):
    step: jax.Array       # int32 []: updates applied so far
    params: Any           # nnx pure dict of the model's parameters (float32 master weights)
    opt_state: Any        # optax state
    rng: jax.Array        # uint32 [2]: dropout key; step s uses fold_in(rng, s), so resumes replay it


class Task(NamedTuple):
    """What a run trains, besides the optimizer: the model class, the loss terms of a batch, and
    the batch's features. The default (``runner.SEQ2SEQ``) is T5ForConditionalGeneration on
    t5x-style features; ``jt5.train.head_tasks`` has the task heads'."""
    model_cls: type
    forward: Callable        # (graphdef, params, batch, *, z_loss, rng) -> LossTerms
    features: dict           # name -> (length: "inputs" | "targets" | None for [B], dtype)
    # (model, batch) -> dict of arrays the eval step returns beside its metrics (predictions)
    predict: Optional[Callable] = None


class LossTerms(NamedTuple):
    """Sums over the target tokens of one (micro-)batch; metrics divide by ``weight``."""
    cross_entropy: jax.Array
    z_loss: jax.Array
    correct: jax.Array
    weight: jax.Array     # sum of decoder_loss_weights = number of target tokens
    tokens: jax.Array     # non-padding encoder + decoder tokens


# -- optimizer --------------------------------------------------------------------------------
def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup to ``lr`` (``lr * (s+1) / warmup`` at update s), then the chosen decay."""
    lr, warm = cfg.peak_lr, cfg.warmup_steps
    end = lr * cfg.final_lr_fraction
    decay_steps = max(cfg.total_steps - warm, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.final_lr_fraction)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end, decay_steps)
    elif cfg.schedule == "rsqrt":  # T5: lr * sqrt(warmup / step) once past warmup
        def after(count):
            return lr * jnp.sqrt(max(warm, 1) / (count + max(warm, 1)))
    else:
        after = optax.constant_schedule(lr)
    if warm == 0:
        return after

    def warmup(count):  # the first update already uses lr / warm (a zero step would be wasted)
        return lr * jnp.minimum(count + 1, warm) / warm
    return optax.join_schedules([warmup, after], [warm])


def _matrices(params):
    """Weight decay mask: matrices and embeddings yes, norm scales and other vectors no."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    schedule = make_schedule(cfg)
    if cfg.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=1e-8, weight_decay=cfg.weight_decay,
                          mask=_matrices)
    else:  # Shazeer & Stern 2018, with t5x's defaults (factored, parameter scaling, update clip 1)
        opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None,
                              weight_decay_mask=_matrices)
    return optax.chain(optax.clip_by_global_norm(cfg.clip), opt) if cfg.clip > 0 else opt


def init_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32))


def state_shardings(abstract_state: TrainState, params_shardings, tx, mesh) -> TrainState:
    """Shardings of the whole train state from the parameters' (``jt5.sharding`` rules).

    Optimizer moments shaped like their parameter take its sharding; anything else (counters,
    Adafactor's factored row/column statistics) is replicated.
    """
    replicated = NamedSharding(mesh, P())

    def like_param(leaf, sharding, param):
        return sharding if tuple(leaf.shape) == tuple(param.shape) else replicated

    opt = optax.tree_map_params(tx, like_param, abstract_state.opt_state, params_shardings,
                                abstract_state.params,
                                transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params_shardings, opt_state=opt, rng=replicated)


# -- loss -------------------------------------------------------------------------------------
def loss_terms_from_logits(logits, targets, weights, z_loss: float) -> LossTerms:
    """Weighted sums of cross-entropy and z-loss over ``[B, T, V]`` float32 logits."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)                                      # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    w = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return LossTerms(cross_entropy=jnp.sum(w * (lse - target_logit)),
                     z_loss=jnp.sum(w * z_loss * jnp.square(lse)),
                     correct=jnp.sum(w * correct), weight=jnp.sum(w),
                     tokens=jnp.zeros((), jnp.float32))


def forward_terms(graphdef, params, batch, *, z_loss: float, rng=None) -> LossTerms:
    """Run the model on a t5x-style batch (packed: segment ids drive every attention mask)."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                   encoder_segment_ids=batch["encoder_segment_ids"],
                   decoder_segment_ids=batch["decoder_segment_ids"],
                   rngs=None if rng is None else nnx.Rngs(dropout=rng),
                   deterministic=rng is None)
    terms = loss_terms_from_logits(logits, batch["decoder_target_tokens"],
                                   batch["decoder_loss_weights"], z_loss)
    tokens = (jnp.sum(batch["encoder_segment_ids"] > 0) + jnp.sum(batch["decoder_segment_ids"] > 0))
    return terms._replace(tokens=tokens.astype(jnp.float32))


def _split_micro(batch: dict, k: int) -> dict:
    """``[B, ...] -> [k, B/k, ...]`` taking every k-th row, so each device's rows split locally."""
    def one(x):
        B = x.shape[0]
        if B % k:
            raise ValueError(f"batch size {B} is not divisible by accum_steps={k}")
        x = jnp.swapaxes(x.reshape((B // k, k) + x.shape[1:]), 0, 1)
        return constrain(x, (None, "batch") + ("length",) * (x.ndim - 2))
    return {name: one(x) for name, x in batch.items()}


def grads_and_terms(graphdef, params, batch, *, z_loss: float, accum_steps: int = 1, rng=None,
                    forward: Callable = forward_terms):
    """Gradient of the step's mean loss (all micro-batches) and the summed loss terms."""
    def summed(p, b, key):
        t = forward(graphdef, p, b, z_loss=z_loss, rng=key)
        return t.cross_entropy + t.z_loss, t

    grad_fn = jax.grad(summed, has_aux=True)
    if accum_steps == 1:
        g, terms = grad_fn(params, batch, rng)
    else:
        micro = _split_micro(batch, accum_steps)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zero_terms = LossTerms(*(jnp.zeros((), jnp.float32) for _ in LossTerms._fields))

        def body(carry, xs):
            acc, tot = carry
            i, b = xs
            key = None if rng is None else jax.random.fold_in(rng, i)
            g, t = grad_fn(params, b, key)
            acc = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, g)
            return (acc, jax.tree.map(jnp.add, tot, t)), None

        (g, terms), _ = jax.lax.scan(body, (zeros, zero_terms),
                                     (jnp.arange(accum_steps), micro))
    denom = jnp.maximum(terms.weight, 1.0)
    grads = jax.tree.map(lambda x, p: (x / denom).astype(p.dtype), g, params)
    return grads, terms


def _metrics(terms: LossTerms) -> dict:
    w = jnp.maximum(terms.weight, 1.0)
    return {"loss": (terms.cross_entropy + terms.z_loss) / w,
            "cross_entropy": terms.cross_entropy / w, "z_loss": terms.z_loss / w,
            "accuracy": terms.correct / w, "target_tokens": terms.weight, "tokens": terms.tokens}


# -- steps ------------------------------------------------------------------------------------
def make_train_step(graphdef, cfg: OptimConfig, tx: Optional[optax.GradientTransformation] = None,
                    *, dropout: bool = False, forward: Callable = forward_terms) -> Callable:
    """``train_step(state, batch) -> (state, metrics)``; jit it with ``donate_argnums=0``.

    Metrics (float32 scalars): loss (cross-entropy + z-loss per target token), cross_entropy,
    z_loss, accuracy, grad_norm (before clipping), learning_rate (of this update),
    target_tokens, tokens.
    """
    tx = tx if tx is not None else make_optimizer(cfg)
    schedule = make_schedule(cfg)

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step) if dropout else None
        grads, terms = grads_and_terms(graphdef, state.params, batch, z_loss=cfg.z_loss,
                                       accum_steps=cfg.accum_steps, rng=key, forward=forward)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = _metrics(terms)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
        return new, metrics

    return train_step


def make_eval_step(graphdef, cfg: OptimConfig, *, forward: Callable = forward_terms,
                   predict: Optional[Callable] = None) -> Callable:
    """``eval_step(params, batch) -> metrics`` (deterministic: no dropout); with ``predict``,
    its outputs on the batch join the metrics."""
    def eval_step(params, batch: dict):
        out = _metrics(forward(graphdef, params, batch, z_loss=cfg.z_loss))
        if predict is not None:
            out.update(predict(nnx.merge(graphdef, params), batch))
        return out
    return eval_step
