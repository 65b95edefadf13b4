"""train.py with a fault injected into one process, for tests/test_launch.py: the process of rank $FAULT_RANK
fails at training step $FAULT_STEP, by SIGKILL to itself ($FAULT=kill, as the kernel's out-of-memory killer
ends a process), by an exception ($FAULT=raise, as a bug would) or by bad input found there ($FAULT=user: a
UserError, as a full disk or an unreadable file gives)."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from utils.io.errors import UserError, run_cli  # noqa: E402
from utils.training import loop  # noqa: E402

_train_step = loop.Trainer._train_step


def _faulty_train_step(self, data, target):
    if self.rank == int(os.environ["FAULT_RANK"]) and self.state.train_step + 1 == int(os.environ["FAULT_STEP"]):
        if os.environ["FAULT"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ["FAULT"] == "user":
            raise UserError("injected bad input on one process")
        raise RuntimeError("injected fault in the training step")
    return _train_step(self, data, target)


loop.Trainer._train_step = _faulty_train_step

if __name__ == "__main__":
    run_cli(train.main)
