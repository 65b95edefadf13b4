"""train.py end to end on a tiny model: log lines, metrics files, TensorBoard, the dumped config, checkpoints,
pass/fail targets and the training flags (each run is a separate process, see cli_runner.py)."""
import json
import math

import pytest
import torch

import cli_runner
from cli_runner import parse_line, tiny_args
from utils.config.cli import CONFIG_DUMP_NAME, parse_args, train_parser

CHECKPOINT_KEYS = {"format", "args", "model_config", "model_state", "optimizer_state", "scheduler_state",
                   "scaler_state", "vocab", "vocab_fingerprint", "world_size", "batch_chunk", "rng_states", "memory",
                   "data_states", "epoch", "batch", "last_iter", "train_step", "tokens_seen", "best_val_loss",
                   "train_elapsed", "log_acc"}


@pytest.fixture(scope="module")
def trained(demo_corpus, tmp_path_factory):
    """One 20-step run: log every 5 steps, evaluate and checkpoint every 10, keep every checkpoint."""
    tmp = tmp_path_factory.mktemp("trained")
    argv = tiny_args(demo_corpus, tmp / "work", save_all=True)
    result = cli_runner.train(argv, tmp)
    assert result.returncode == 0, result.stderr
    return result, tmp / "work", argv


def records(work_dir, name="train_log.json"):
    return [json.loads(line) for line in (work_dir / name).read_text().splitlines()]


def test_log_lines_have_the_reference_formats(trained):
    result, _, _ = trained
    lines = result.lines
    train = [parse_line(l, "train") for l in lines if l.startswith("| epoch")]
    assert [v[1] for v in train] == [5, 10, 15, 20]                 # step
    assert [v[0] for v in train] == [1, 1, 2, 2]                     # epoch: 12 batches each
    assert all(v[3] == 12 for v in train)
    assert [v[2] for v in train] == [5, 10, 3, 8]                    # batch within the epoch
    evals = [parse_line(l, "eval") for l in lines if l.startswith("| Eval")]
    assert [(v[0], v[1]) for v in evals] == [(1, 10), (2, 20)]
    tests = [parse_line(l, "test") for l in lines if l.startswith("| End of training")]
    assert len(tests) == 1 and tests[0] is not None
    assert parse_line(next(l for l in lines if l.startswith("Training time")), "training_time")
    assert parse_line(next(l for l in lines if l.startswith("Training throughput")), "training_throughput")
    # the eval and test results are framed by lines of 100 dashes / equal signs, as the reference printed them
    i = next(i for i, l in enumerate(lines) if l.startswith("| Eval"))
    assert lines[i - 1] == lines[i + 1] == "-" * 100
    i = next(i for i, l in enumerate(lines) if l.startswith("| End of training"))
    assert lines[i - 1] == lines[i + 1] == "=" * 100
    assert lines.index("End of training") < i and lines[lines.index("End of training") - 1] == "-" * 100
    assert any(l.startswith("#params = ") for l in lines) and any(l.startswith("#non emb params = ") for l in lines)
    assert "    - n_layer : 2" in lines and "    - optim : lamb" in lines
    assert sum(l.startswith("Environment: python ") for l in lines) == 1


def test_log_file_holds_the_console_lines(trained):
    result, work_dir, _ = trained
    logged = [line.split(" - INFO - ", 1)[1] for line in (work_dir / "train_log.log").read_text().splitlines()
              if " - INFO - " in line]
    assert [l for l in result.lines if l.startswith("| ")] == [l for l in logged if l.startswith("| ")]


def test_metrics_file_has_the_reference_keys_and_the_printed_values(trained):
    result, work_dir, _ = trained
    recs = records(work_dir)
    assert recs[0]["step"] == "PARAMETER" and recs[0]["n_layer"] == 2 and recs[0]["optim"] == "lamb"
    train = [r for r in recs if "train_loss" in r and isinstance(r["step"], int)]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    for record, line in zip(train, [l for l in result.lines if l.startswith("| epoch")]):
        assert set(record) >= {"epoch", "train_batch", "lr", "train_time/batch", "train_throughput", "train_loss",
                               "train_perplexity", "grad_norm"}
        values = parse_line(line, "train")
        assert values[4] == float(f"{record['lr']:.3e}") and values[7] == float(f"{record['train_loss']:.2f}")
        assert math.isclose(record["train_perplexity"], math.exp(record["train_loss"]), rel_tol=1e-12)
        assert record["grad_norm"] > 0
    valid = [r for r in recs if "valid_loss" in r and isinstance(r["step"], int)]
    assert [r["step"] for r in valid] == [10, 20]
    assert all({"valid_elapsed", "valid_perplexity"} <= set(r) for r in valid)
    summary = recs[-1]
    assert summary["step"] == "SUMMARY"
    assert set(summary) >= {"train_throughput", "train_elapsed", "train_loss", "test_loss", "test_perplexity",
                            "valid_loss", "valid_perplexity"}
    assert summary["train_loss"] == train[-1]["train_loss"]
    assert summary["valid_loss"] == min(r["valid_loss"] for r in valid)
    test_line = parse_line(next(l for l in result.lines if l.startswith("| End of training")), "test")
    assert test_line[1] == float(f"{summary['test_loss']:.2f}")


def test_tensorboard_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, work_dir, _ = trained
    events = EventAccumulator(str(work_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/train_loss", "train/train_perplexity", "train/lr", "train/train_throughput",
                "train/grad_norm", "valid/valid_loss", "valid/valid_perplexity"):
        assert tag in tags
    loss = events.Scalars("train/train_loss")
    assert [e.step for e in loss] == [5, 10, 15, 20]
    train = [r for r in records(work_dir) if "train_loss" in r and isinstance(r["step"], int)]
    assert [e.value for e in loss] == pytest.approx([r["train_loss"] for r in train], rel=1e-6)


def test_dumped_config_reloads_to_the_same_flags(trained):
    _, work_dir, argv = trained
    original = parse_args(train_parser(), argv)
    reloaded = parse_args(train_parser(), ["--config_file", str(work_dir / CONFIG_DUMP_NAME)])
    original, reloaded = original.to_dict(), reloaded.to_dict()
    differ = {k for k in original if original[k] != reloaded[k]}
    assert differ == {"config_file"}


def test_checkpoints_hold_plain_types_and_save_all_keeps_each(trained):
    _, work_dir, _ = trained
    names = sorted(p.name for p in work_dir.glob("*.pt"))
    assert names == ["checkpoint_10.pt", "checkpoint_20.pt", "checkpoint_best.pt", "checkpoint_last.pt"]
    assert not list(work_dir.glob(".*tmp"))                  # no temporary files left behind
    for name in names:
        state = torch.load(work_dir / name, weights_only=True)   # tensors and plain Python types only
        assert set(state) == CHECKPOINT_KEYS
    assert torch.load(work_dir / "checkpoint_10.pt", weights_only=True)["train_step"] == 10
    assert (work_dir / "checkpoint_20.pt").read_bytes() == (work_dir / "checkpoint_last.pt").read_bytes()
    last = torch.load(work_dir / "checkpoint_last.pt", weights_only=True)
    assert last["train_step"] == 20 and last["epoch"] == 2 and last["batch"] == 8
    assert len(last["rng_states"]) == 1 and set(last["rng_states"][0]) >= {"torch", "numpy", "python"}
    assert last["memory"][0][0].shape == (2, 8, 16, 32)        # [n_layer, mem_len, batch, d_model], one chunk


def test_targets_pass_and_fail_with_exit_codes(demo_corpus, tmp_path):
    common = tiny_args(demo_corpus, tmp_path / "work", max_step=6, eval_interval=6, log_interval=1, debug=True,
                       no_env=True)
    passed = cli_runner.train(common + ["--target_perplexity", "1e9", "--target_throughput", "1"], tmp_path)
    assert passed.returncode == 0, passed.stderr
    assert "Perplexity test passed" in passed.lines and "Throughput test passed" in passed.lines
    achieved = next(l for l in passed.lines if l.startswith("Perplexity achieved: "))
    valid = parse_line(next(l for l in passed.lines if l.startswith("| Eval")), "eval")
    assert achieved == f"Perplexity achieved: {valid[4]:.2f} target: 1000000000.00"

    failed = cli_runner.train(common + ["--target_perplexity", "1.5", "--target_throughput", "1e12"], tmp_path)
    assert failed.returncode == 1
    assert "Perplexity test failed" in failed.lines and "Throughput test failed" in failed.lines
    assert failed.stderr == "" and not any(l.startswith("Environment:") for l in failed.lines)
    assert not (tmp_path / "work").exists()                        # --debug: no work dir, no checkpoints


def test_no_eval_append_dataset_append_time_local_batch_size(demo_corpus, tmp_path):
    """--no_eval: no evaluation, no final test, but checkpoints at the eval interval (the reference wrote
    none); --append_dataset / --append_time name the work dir; --local_batch_size sets the batch."""
    argv = tiny_args(demo_corpus, tmp_path / "work", max_step=6, eval_interval=3, log_interval=3, no_eval=True,
                     append_dataset=True, append_time=True, local_batch_size=8)
    result = cli_runner.train(argv, tmp_path)
    assert result.returncode == 0, result.stderr
    work_dir, = (tmp_path / "work-custom").iterdir()
    assert len(work_dir.name) == len("20250101-120000") and work_dir.name[8] == "-"
    assert f"Experiment dir : {work_dir}" in result.lines and "    - batch_size : 8" in result.lines
    assert not any(l.startswith(("| Eval", "| End of training")) for l in result.lines)
    assert sorted(p.name for p in work_dir.glob("*.pt")) == ["checkpoint_last.pt"]
    last = torch.load(work_dir / "checkpoint_last.pt", weights_only=True)
    assert last["train_step"] == 6 and last["memory"][0][0].shape[2] == 8 and last["best_val_loss"] is None
    assert (work_dir / CONFIG_DUMP_NAME).is_file() and (work_dir / "train_log.log").is_file()
    # 2 log intervals, fewer than the throughput's warm-up (mem_len // tgt_len + 2 = 3): the summary averages
    # them all instead of printing 0
    interval_tok_s = [r["train_throughput"] for r in records(work_dir) if isinstance(r["step"], int)
                      and "train_throughput" in r]
    (line,) = [l for l in result.lines if l.startswith("Training throughput")]
    (summary_tok_s,) = parse_line(line, "training_throughput")
    assert len(interval_tok_s) == 2 and min(interval_tok_s) <= summary_tok_s + 0.01
    assert summary_tok_s <= max(interval_tok_s) + 0.01


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_the_cpu(demo_corpus, trained, tmp_path, precision):
    """torch.amp autocast on the CPU: the first 5 steps' loss is within 1% of the float32 run's; fp16 keeps
    its loss scaler in the checkpoint."""
    argv = tiny_args(demo_corpus, tmp_path / "work", max_step=5, max_step_scheduler=20, eval_interval=5, no_test=True)
    result = cli_runner.train(argv + [f"--{precision}"], tmp_path)
    assert result.returncode == 0, result.stderr
    (fp32_step5,) = [r for r in records(trained[1]) if r["step"] == 5 and "train_loss" in r]
    (step5,) = [r for r in records(tmp_path / "work") if r["step"] == 5 and "train_loss" in r]
    assert step5["train_loss"] == pytest.approx(fp32_step5["train_loss"], rel=1e-2)
    assert step5["train_loss"] != fp32_step5["train_loss"]          # it did run in lower precision
    scaler = torch.load(tmp_path / "work" / "checkpoint_last.pt", weights_only=True)["scaler_state"]
    assert (scaler is not None and scaler["scale"] > 0) if precision == "fp16" else scaler is None


def test_fp16_logs_its_skipped_steps_once_per_interval(demo_corpus, tmp_path):
    """A loss scale far too large: float16 gradients overflow, the scaler skips those steps and halves its
    scale each time; each log interval says how many it skipped, and the scale at every interval is the
    starting one halved once per skipped step so far (no growth within 2000 steps)."""
    init = 2.0 ** 30
    argv = tiny_args(demo_corpus, tmp_path / "work", max_step=20, eval_interval=20, no_test=True,
                     init_loss_scale=init)
    result = cli_runner.train(argv + ["--fp16"], tmp_path)
    assert result.returncode == 0, result.stderr
    intervals = [r for r in records(tmp_path / "work") if isinstance(r["step"], int) and "train_loss" in r]
    assert [r["step"] for r in intervals] == [5, 10, 15, 20]
    skipped = [r["skipped_steps"] for r in intervals]
    assert skipped[0] == 5                          # 2^30 .. 2^26: every gradient overflows in float16
    assert 0 < sum(skipped) < 20                    # it recovered and trained
    for i, r in enumerate(intervals):
        assert r["loss_scale"] == init / 2 ** sum(skipped[:i + 1])
    lines = [l for l in result.lines if "steps skipped" in l]
    assert len(lines) == sum(1 for s in skipped if s)
    assert lines[0].endswith(f"fp16: 5 of the last 5 steps skipped (loss scale now {init / 2 ** 5:.0f})")


def test_restart_from_a_folder_without_a_checkpoint_starts_from_scratch(demo_corpus, tmp_path):
    """The first launch of a job that always passes --restart <work_dir> (as requeued jobs do)."""
    work = tmp_path / "work"
    work.mkdir()
    result = cli_runner.train(tiny_args(demo_corpus, work, max_step=2, eval_interval=2, restart=work, no_test=True),
                              tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"No checkpoint in {work} yet, starting training from random init" in result.lines
    assert torch.load(work / "checkpoint_last.pt", weights_only=True)["train_step"] == 2


def test_clip_bounds_the_update_and_grad_norm_is_logged_before_clipping(demo_corpus, tmp_path):
    """Plain SGD with lr 1: the step-2 update is the clipped gradient, so its norm is min(grad norm, clip)."""
    clip = 0.05
    argv = tiny_args(demo_corpus, tmp_path / "work", optim="sgd", lr=1.0, scheduler="constant", warmup_step=0,
                     clip=clip, max_step=2, eval_interval=1, log_interval=1, save_all=True, no_eval=True)
    result = cli_runner.train(argv, tmp_path)
    assert result.returncode == 0, result.stderr
    before = torch.load(tmp_path / "work" / "checkpoint_1.pt", weights_only=True)["model_state"]
    after = torch.load(tmp_path / "work" / "checkpoint_2.pt", weights_only=True)["model_state"]
    step = math.sqrt(sum(((after[k].double() - before[k].double()) ** 2).sum().item() for k in before))
    grad_norm = records(tmp_path / "work")[2]["grad_norm"]            # PARAMETER, step 1, step 2
    assert grad_norm > clip
    assert step == pytest.approx(clip, rel=1e-4)


def test_batch_chunk_gives_the_same_training_as_the_whole_batch(demo_corpus, tmp_path):
    """Gradient accumulation over 2 chunks, each with its own memory stream, trains like the whole batch
    (without dropout, whose random draws differ)."""
    losses = {}
    for chunks in (1, 2):
        work = tmp_path / f"chunks{chunks}"
        argv = tiny_args(demo_corpus, work, dropout=0.0, max_step=12, log_interval=1, eval_interval=12, no_test=True,
                         batch_chunk=chunks)
        result = cli_runner.train(argv, tmp_path, name=f"chunks{chunks}")
        assert result.returncode == 0, result.stderr
        losses[chunks] = [r["train_loss"] for r in records(work) if "train_loss" in r and isinstance(r["step"], int)]
        memory = torch.load(work / "checkpoint_last.pt", weights_only=True)["memory"][0]
        assert [m.shape[2] for m in memory] == [16 // chunks] * chunks
    assert len(losses[1]) == 12
    assert losses[2] == pytest.approx(losses[1], rel=1e-4)


def test_character_level_datasets_report_bits_per_character(demo_corpus, tmp_path):
    """text8 layout (characters separated by spaces, '_' for a space): every result in bits per character."""
    data = tmp_path / "text8"
    data.mkdir()
    for split in ("train", "valid", "test"):
        text = " ".join((demo_corpus / f"{split}.txt").read_text().replace("\n", " ").replace(" ", "_"))
        (data / f"{split}.txt").write_text(text[: 2 * 12000 if split == "train" else 2 * 2000] + "\n")
    work = tmp_path / "work"
    result = cli_runner.train(tiny_args(data, work, dataset="text8", max_step=4, eval_interval=4, log_interval=2),
                              tmp_path)
    assert result.returncode == 0, result.stderr
    for kind, start in (("train_bpc", "| epoch"), ("eval_bpc", "| Eval"), ("test_bpc", "| End of training")):
        lines = [l for l in result.lines if l.startswith(start)]
        assert lines and all(parse_line(l, kind) for l in lines), lines
    train = [r for r in records(work) if "train_loss" in r and isinstance(r["step"], int)]
    assert all(r["train_bits_per_character"] == pytest.approx(r["train_loss"] / math.log(2)) for r in train)
    assert "test_bits_per_character" in records(work)[-1] and "test_perplexity" not in records(work)[-1]
