"""One process of test_loop.test_two_processes_train_together.

    python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT TMP_DIR

Two CPU devices per process, gloo collectives, coordinator on 127.0.0.1:PORT; trains the test's
micro model for 3 steps on a data=2 x fsdp=2 mesh spanning both processes and writes this
process's metric lines to TMP_DIR/history_<id>.json.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

from jt5.train import loop  # noqa: E402
from jt5.train import step as step_lib  # noqa: E402


def main():
    pid, nproc, port, tmp = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    loop.init_distributed(f"127.0.0.1:{port}", nproc, pid)
    assert jax.process_count() == nproc and jax.device_count() == 2 * nproc
    from tests.train.test_step import micro_config
    cfg = loop.LoopConfig(model=micro_config(), out=os.path.join(tmp, "run"), steps=3,
                          batch_size=8, inputs_length=48, targets_length=16, save_every=2,
                          mesh="data=2,fsdp=2", progress=False, max_new_tokens=8,
                          optim=step_lib.OptimConfig(warmup_steps=1, total_steps=3))
    result = loop.run(cfg)
    with open(os.path.join(tmp, f"history_{pid}.json"), "w") as f:
        json.dump(result.history, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
