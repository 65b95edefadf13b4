"""Issue 18: no host-device synchronization inside training steps between log intervals.

A whole train.py run (in this process, CPU) under HostSyncCounter, which sees every op that reads a value back
or sizes its output by the data (the dispatcher, forward and backward) plus .tolist()/.numpy(); the count is
sampled right after each optimizer step (the loop asks the LR scheduler then). Steady-state steps between two
log intervals must read nothing back; the log intervals themselves do (the counter works)."""
import runpy
import sys

import pytest
import torch

import cli_runner
from cli_runner import tiny_args
from conftest import REPO
from utils.runtime.host_sync import HostSyncCounter


def syncs_per_step(monkeypatch, argv):
    from utils.training.lr_scheduler import LRScheduler
    counter = HostSyncCounter()
    at_step = {}
    original = LRScheduler.step

    def record(self, train_step):
        at_step[train_step] = list(counter.events)
        return original(self, train_step)
    monkeypatch.setattr(LRScheduler, "step", record)
    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), *map(str, argv)])
    threads = torch.get_num_threads()
    try:
        with counter, pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    assert exit_info.value.code in (0, None)
    return at_step


@pytest.mark.parametrize("flags", [
    dict(optim="jitlamb"),                                           # full softmax, fused LAMB
    dict(optim="jitlamb", fp16=True),                                # loss scaler on the device
    dict(optim="jitlamb", attn_type=1, batch_chunk=2),
], ids=["jitlamb", "jitlamb_fp16", "attn1_chunk2"])
# (torch's own Adam on the CPU reads its step counter, a CPU tensor, with .item() every step: not a device
# sync; on CUDA --optim adam is the fused kernel)
def test_no_host_sync_between_log_intervals(demo_corpus, tmp_path, monkeypatch, flags):
    argv = tiny_args(demo_corpus, tmp_path / "work", max_step=20, log_interval=10, eval_interval=100,
                     no_eval=True, no_test=True, debug=True, **flags)
    at = syncs_per_step(monkeypatch, argv)
    # steps 2..9 and 12..19 (the events recorded between the scheduler calls of steps 2 and 9, 12 and 19)
    for first, last in ((2, 9), (12, 19)):
        between = at[last][len(at[first]):]
        assert between == [], f"host syncs in steps {first + 1}..{last}: {between}"
    # the log interval of step 10 reads the interval's numbers back (between steps 10 and 11)
    assert len(at[11]) > len(at[10])


@pytest.mark.parametrize("div_val", [1, 4])
def test_adaptive_softmax_training_steps_read_nothing_back(div_val):
    """The adaptive softmax with a tail capacity (static shapes) and AdaptiveEmbedding with div_val 4: steady
    training steps (TrainStep.run, fused LAMB, clipping) do no host sync at all."""
    import contextlib
    from lamb import Lamb
    from mem_transformer import MemTransformerLM
    from utils.training.train_step import TrainStep
    torch.manual_seed(0)
    model = MemTransformerLM(200, 2, 2, 16, 8, 32, 0.1, 0.0, tie_weight=True, div_val=div_val, cutoffs=[50, 100],
                             tie_projs=[False, True, True], tgt_len=8, mem_len=8, d_embed=16).train()
    model.crit.tail_capacity = 0.5
    step = TrainStep(model, model, Lamb(model.parameters(), lr=0.01), torch.amp.GradScaler("cpu", enabled=False),
                     contextlib.nullcontext, clip=0.25)
    stream = torch.randint(0, 200, (8 * 6 + 1, 4), generator=torch.Generator().manual_seed(0))
    mems = [None]
    for i in range(2):
        step.run(stream[8 * i: 8 * i + 8], stream[8 * i + 1: 8 * i + 9], mems)
    with HostSyncCounter() as syncs:
        for i in range(2, 6):
            step.run(stream[8 * i: 8 * i + 8], stream[8 * i + 1: 8 * i + 9], mems)
    assert syncs.events == []
