"""Faults while files are written (issue 13): a SIGKILL at any point of a checkpoint save loses nothing, a full
disk or a read-only directory is one line naming the file, and a damaged dataset cache is rebuilt."""
import contextlib
import os
import signal

import pytest
import torch

import cli_runner
from cli_runner import tiny_args

# ----------------------------------------------------------------------------------------------------------
# hooks (run in the train.py child by cli_runner; module-level so that the forkserver can import them)


def kill_at_write(name: str, nth: int, moment: str) -> None:
    """SIGKILL on the `nth` write of the file called `name` through utils.io.atomic (torch.save or a copy):
    `moment` "during": its data is complete in the temporary file but not yet renamed onto `name`; "after":
    right after the rename, before whatever the saver does next."""
    from utils.io import atomic
    original = atomic.atomic_open
    count = [0]

    @contextlib.contextmanager
    def killing_open(path, *args, **kwargs):
        if os.path.basename(path) != name:
            with original(path, *args, **kwargs) as f:
                yield f
            return
        count[0] += 1
        with original(path, *args, **kwargs) as f:
            yield f
            if count[0] == nth and moment == "during":
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        if count[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    atomic.atomic_open = killing_open


# ----------------------------------------------------------------------------------------------------------
# class 4: a kill at any point of a save


def _weights(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["train_step"], ckpt["best_val_loss"], ckpt["model_state"], ckpt["optimizer_state"]


def _assert_same_checkpoint(a, b):
    step_a, best_a, model_a, optim_a = _weights(a)
    step_b, best_b, model_b, optim_b = _weights(b)
    assert (step_a, best_a) == (step_b, best_b)
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for index, state in optim_a["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(optim_b["state"][index][key])), (index, key)


@pytest.fixture(scope="module")
def uninterrupted(demo_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    result = cli_runner.train(tiny_args(demo_corpus, tmp / "work", max_step=20, eval_interval=5, no_test=True),
                              tmp, name="whole")
    assert result.returncode == 0, result.stderr
    return tmp / "work"


@pytest.mark.parametrize("name,moment", [("checkpoint_best.pt", "during"), ("checkpoint_best.pt", "after"),
                                         ("checkpoint_last.pt", "during")])
def test_a_kill_while_saving_then_resuming_ends_with_the_uninterrupted_checkpoints(demo_corpus, tmp_path,
                                                                                 uninterrupted, name, moment):
    """Killed at the last save (step 20, a new best validation loss) while or right after checkpoint_best.pt
    (or checkpoint_last.pt) is written, then resumed: checkpoint_last.pt and checkpoint_best.pt equal the
    uninterrupted run's bit for bit. Before issue 13, last was written first: a kill before the copy to best
    left last at step 20 with the step-20 best loss and best at step 15, and the resumed run (at max_step
    already) never wrote the best again."""
    work = tmp_path / "work"
    argv = tiny_args(demo_corpus, work, max_step=20, eval_interval=5, no_test=True)
    killed = cli_runner.train(argv, tmp_path, name="killed", hook=kill_at_write, hook_args=(name, 4, moment))
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(work / "checkpoint_last.pt", weights_only=True)["train_step"] == 15
    assert torch.load(uninterrupted / "checkpoint_best.pt", weights_only=True)["train_step"] == 20   # a new best

    resumed = cli_runner.train(argv + ["--restart", str(work)], tmp_path, name="resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from {work} at step 15" in resumed.lines
    for file in ("checkpoint_last.pt", "checkpoint_best.pt"):
        _assert_same_checkpoint(work / file, uninterrupted / file)
