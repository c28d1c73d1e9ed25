"""Training: UL2 pretraining and fine-tuning on one or many hosts (``jt5 pretrain``, ``jt5 finetune``).

Importing the package alone is light: the CLI's ``--help`` reads the choices below without
loading optax and the training stack."""
if __name__ != "jt5.train":  # one module identity: never a second, top-level copy
    raise ImportError(f"import this package as jt5.train, not {__name__}")

OPTIMIZERS = ("adamw", "adafactor")                    # jt5.train.step.OptimConfig.optimizer
SCHEDULES = ("cosine", "linear", "rsqrt", "constant")  # jt5.train.step.OptimConfig.schedule
