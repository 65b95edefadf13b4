"""TrainState and the checkpoint format: the state survives a weights-only save and load, checkpoints of the
previous format (txl-train-v1) still resume and evaluate, a newer format is refused in one line."""
import io
import json
import shutil

import pytest
import torch

import cli_runner
from cli_runner import tiny_args
from utils.io.errors import UserError
from utils.io.checkpoint import CHECKPOINT_FORMAT, check_format
from utils.training.lr_scheduler import build_scheduler
from utils.training.rng import rng_state
from utils.training.state import LogInterval, TrainState

FIXTURE = "fixtures/project-checkpoint-03da7ed"


def assert_same(a, b, where="state"):
    """Equal nested dicts / lists of plain values and tensors (tensors: same dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def busy_state() -> TrainState:
    """A TrainState as a two-rank run with two batch chunks would checkpoint it in the middle of epoch 3."""
    from argparse import Namespace
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = build_scheduler(Namespace(scheduler="cosine", lr=0.1, max_step=100, max_step_scheduler=None,
                                          warmup_step=10, eta_min=0.0, lr_min=0.0, decay_rate=0.5, patience=0),
                                optimizer)
    scheduler.step(37)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    data = {"type": "ordered", "pos": 480, "batch": 30, "last_iter": 464, "epoch": 3, "seed": 7, "roll": None,
            "varlen": False}
    return TrainState(
        train_step=37, tokens_seen=37 * 64, epoch=3, batch=5, last_iter=40, best_val_loss=4.25, train_elapsed=12.5,
        log_acc=LogInterval(loss=9.5, steps=2, tokens=128, elapsed=0.75), world_size=2, batch_chunk=2,
        data_states=[data, dict(data, pos=481)], rng_states=[rng_state(torch.device("cpu"))] * 2,
        memory=[[torch.randn(2, 8, 4, 16), None], [torch.randn(2, 8, 4, 16), torch.randn(2, 8, 4, 16)]],
        scheduler_state=scheduler.state_dict(), scaler_state=scaler.state_dict())


def test_state_dict_survives_a_weights_only_save_and_load():
    state = busy_state()
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    loaded = TrainState()
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same(state.state_dict(), loaded.state_dict())
    assert loaded.log_acc == state.log_acc and loaded.best_val_loss == 4.25


def test_a_fresh_state_round_trips_too():
    state = TrainState()
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    loaded = TrainState(train_step=5)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert loaded == state


def test_best_validation_loss_and_layout():
    state = TrainState()
    assert state.record_validation(None) is False and state.best_val_loss is None
    assert state.record_validation(5.0) and not state.record_validation(5.5) and state.record_validation(4.0)
    assert state.best_val_loss == 4.0
    assert state.same_layout(1, 1) and not state.same_layout(2, 1) and not state.same_layout(1, 2)


def test_a_v1_state_without_tokens_seen_loads_and_keeps_the_estimate():
    v1 = {k: v for k, v in busy_state().state_dict().items() if k != "tokens_seen"}
    state = TrainState(tokens_seen=123)
    state.load_state_dict({"format": "txl-train-v1", "model_state": {}, **v1})
    assert state.tokens_seen == 123 and state.train_step == 37
    with pytest.raises(UserError, match="lacks log_acc"):
        TrainState().load_state_dict({k: v for k, v in v1.items() if k != "log_acc"})


def test_checkpoint_formats():
    for known in ("txl-train-v1", CHECKPOINT_FORMAT, "reference"):
        check_format({"format": known}, "x.pt")
    with pytest.raises(UserError, match=r"checkpoint x\.pt was written by a newer version \(format txl-train-v9\)"):
        check_format({"format": "txl-train-v9"}, "x.pt")


def test_a_checkpoint_of_a_newer_format_is_refused_in_one_line(demo_corpus, tmp_path):
    argv = tiny_args(demo_corpus, tmp_path / "work", max_step=2, eval_interval=2, log_interval=1, no_test=True)
    first = cli_runner.train(argv, tmp_path, name="first")
    assert first.returncode == 0, first.stderr
    ckpt = torch.load(tmp_path / "work" / "checkpoint_last.pt", weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["tokens_seen"] == 2 * 16 * 8
    newer = tmp_path / "newer.pt"
    torch.save({**ckpt, "format": "txl-train-v99"}, newer)
    result = cli_runner.train(tiny_args(demo_corpus, tmp_path / "again", max_step=4, restart=newer), tmp_path,
                              name="newer")
    expected = (f"error: checkpoint {newer} was written by a newer version (format txl-train-v99); this version "
                "reads txl-train-v1, txl-train-v2: update the code, or use a checkpoint written by this version")
    assert result.returncode == 2 and result.stderr.strip() == expected
    scored = cli_runner.evaluate(["--model", newer, "--manual", "a", "b", "--work_dir", tmp_path / "eval"], tmp_path,
                                 name="eval-newer")                 # eval.py refuses it the same way
    assert scored.returncode == 2 and scored.stderr.strip() == expected


# ---------------------------------------------------------------------------------------------------------
# a real checkpoint of the previous format, written by this project at commit 03da7ed


@pytest.fixture
def v1_fixture(shared_dir):
    folder = shared_dir / FIXTURE
    if not (folder / "expected.json").is_file():
        pytest.skip(f"{folder} not present")
    return folder / "checkpoint_best.pt", json.loads((folder / "expected.json").read_text())


def test_eval_of_the_v1_checkpoint_prints_its_line(v1_fixture, tmp_path):
    path, expected = v1_fixture
    assert torch.load(path, weights_only=True)["format"] == "txl-train-v1"
    result = cli_runner.evaluate(["--model", path, "--manual", expected["manual_text"], "--work_dir",
                                  tmp_path / "work", *expected["eval_flags"]], tmp_path)
    assert result.returncode == 0, result.stderr
    assert [l.rstrip() for l in result.lines if l.startswith("| all loss")] == [expected["printed_line"]]


def test_training_resumes_from_the_v1_checkpoint(v1_fixture, shared_dir, tmp_path):
    """The fixture's own run (expected.json "trained_with": 30 steps on the first 400 lines of PTB train)
    continues to step 40 from its position, and its next checkpoint has the current format."""
    path, _ = v1_fixture
    data = tmp_path / "data"
    data.mkdir()
    for split, lines in (("train", 400), ("valid", 80), ("test", 80)):
        text = (shared_dir / "data" / "ptb" / f"{split}.txt").read_text().splitlines(keepends=True)
        (data / f"{split}.txt").write_text("".join(text[:lines]))
    restart = tmp_path / "v1.pt"
    shutil.copyfile(path, restart)
    work = tmp_path / "work"
    argv = ["--data", data, "--dataset", "ptb", "--n_layer", 2, "--d_model", 32, "--n_head", 2, "--d_head", 16,
            "--d_inner", 64, "--tgt_len", 16, "--mem_len", 16, "--eval_tgt_len", 16, "--batch_size", 4,
            "--eval_batch_size", 4, "--max_step", 40, "--eval_interval", 15, "--log_interval", 5,
            "--warmup_step", 0, "--lr", 0.01, "--seed", 4321, "--work_dir", work, "--cache_dir", tmp_path / "cache",
            "--no_test", "--restart", restart]
    result = cli_runner.train(argv, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"Resuming from {restart} at step 30" in result.lines
    steps = [int(l.split("step")[1].split("|")[0]) for l in result.lines if l.startswith("| epoch")]
    assert steps == [35, 40]
    ckpt = torch.load(work / "checkpoint_last.pt", weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["train_step"] == 40 and ckpt["batch"] == 40
    assert ckpt["tokens_seen"] == 40 * 4 * 16          # 30 steps estimated (v1 did not count), 10 counted
