"""A model and batch that cannot fit the device are refused in one line, before the model is built (issue 13,
class 9); the estimate is a lower bound, so a run that fits is never refused."""
import pytest
import torch

import cli_runner
from cli_runner import tiny_args
from utils.config.cli import parse_args, train_parser
from utils.io.errors import UserError
from utils.training import memory

CONFIG = dict(n_layer=2, d_model=8, n_token=100, cutoffs=[])


def args(*argv):
    return parse_args(train_parser(), ["--batch_size", "4", "--tgt_len", "5", "--mem_len", "3", "--eval_tgt_len", "5",
                                       *argv])


def test_the_lower_bound_counts_weights_gradients_optimizer_memory_and_logits():
    parts = memory.needed_bytes(1000, args("--optim", "adam"), CONFIG, world_size=1)
    assert parts == {"weights, gradients and optimizer state": 1000 * 4 * 4,         # weight, grad, 2 moments
                     "memory": 3 * 3 * 4 * 8 * 4,                                       # (layers+1) x mem x bsz x d
                     "output layer": 5 * 4 * 100 * 4}                                   # tokens x vocabulary
    sgd = memory.needed_bytes(1000, args("--optim", "sgd"), CONFIG, 1)
    assert sgd["weights, gradients and optimizer state"] == 1000 * 4 * 2
    sharded = memory.needed_bytes(1000, args("--multi_gpu", "fsdp", "--batch_chunk", "2"), CONFIG, world_size=2)
    assert sharded["weights, gradients and optimizer state"] == 1000 * 4 * 4 // 2
    assert sharded["output layer"] == 5 * 1 * 100 * 4                                  # 2 per rank, in 2 chunks
    assert "output layer" not in memory.needed_bytes(1000, args(), dict(CONFIG, cutoffs=[50]), 1)


def test_refused_with_the_estimate_and_what_to_do(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * memory.GIB)
    memory.check_memory(10 ** 6, args(), CONFIG, torch.device("cpu"))                  # 16 MB: fits
    with pytest.raises(UserError, match=r"^the model and batch need at least 14\.9 GiB \(1000M parameters; weights, "
                                        r"gradients and optimizer state 14\.9 GiB\), this machine has 2\.0 GiB free: "
                                        r"use a smaller model"):
        memory.check_memory(10 ** 9, args(), CONFIG, torch.device("cpu"))
    with pytest.raises(UserError, match=r"x 2 processes"):                             # CPU processes share it
        memory.check_memory(10 ** 8, args(), CONFIG, torch.device("cpu"), world_size=2)
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)               # unknown: no refusal
    memory.check_memory(10 ** 12, args(), CONFIG, torch.device("cpu"))


def test_train_py_refuses_a_model_larger_than_the_machine(demo_corpus, tmp_path):
    argv = tiny_args(demo_corpus, tmp_path / "work", d_model=16384, d_inner=65536, n_head=16, d_head=1024,
                     n_layer=16)
    result = cli_runner.train(argv, tmp_path)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: the model and batch need at least ") and "GiB free" in lines[0]
    assert not (tmp_path / "work" / "checkpoint_last.pt").exists()
