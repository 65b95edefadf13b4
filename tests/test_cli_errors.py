"""Bad input to train.py / eval.py: one line on stderr (`error: ...`) saying what is wrong, a non-zero exit code,
no traceback, and nothing lost (a good checkpoint is never overwritten)."""
import hashlib
import shutil

import pytest

import cli_runner
from cli_runner import tiny_args


@pytest.fixture(scope="module")
def checkpoint(demo_corpus, tmp_path_factory):
    """A 4-step SGD run on the demo demo_corpus, checkpointed at step 4."""
    tmp = tmp_path_factory.mktemp("trained")
    argv = tiny_args(demo_corpus, tmp / "work", max_step=4, eval_interval=2, no_test=True, optim="sgd", lr=0.1,
                     scheduler="constant", warmup_step=0)
    result = cli_runner.train(argv, tmp)
    assert result.returncode == 0, result.stderr
    return tmp / "work" / "checkpoint_last.pt", argv


def assert_error(result, *words, code=2):
    """Exactly one stderr line, `error: ...` containing `words`; exit code `code`."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corrupt_copy(checkpoint, tmp_path):
    path = tmp_path / "corrupt.pt"
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 3: len(data) // 3 + 4096] = b"\xff" * 4096   # overwrite part of the zip data
    path.write_bytes(bytes(data))
    return path


def truncated_copy(checkpoint, tmp_path):
    path = tmp_path / "truncated.pt"
    path.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    return path


# ---------------------------------------------------------------------------------------------------------
# train.py


def test_train_missing_data_folder(tmp_path):
    result = cli_runner.train(tiny_args(tmp_path / "nowhere", tmp_path / "work"), tmp_path)
    assert_error(result, "nowhere", "data folder not found")


def test_train_unknown_dataset(demo_corpus, tmp_path):
    result = cli_runner.train(tiny_args(demo_corpus, tmp_path / "work", dataset="wt104"), tmp_path)
    assert_error(result, "--dataset", "wt104", "wt103")


def test_train_unknown_flag(demo_corpus, tmp_path):
    result = cli_runner.train(tiny_args(demo_corpus, tmp_path / "work") + ["--n_layers", "2"], tmp_path)
    assert_error(result, "unknown flag --n_layers", "--n_layer")


def test_train_unknown_preset(tmp_path):
    result = cli_runner.train(["--config_file", "configs/cpu_small.yaml", "--config", "dem"], tmp_path)
    assert_error(result, "preset 'dem' not found", "'demo'")


def test_train_restart_from_corrupt_checkpoint(demo_corpus, checkpoint, tmp_path):
    path = corrupt_copy(checkpoint[0], tmp_path)
    result = cli_runner.train(tiny_args(demo_corpus, tmp_path / "work", restart=path), tmp_path)
    assert_error(result, str(path), "cannot be read")
    assert not list((tmp_path / "work").glob("*.pt"))


def test_train_restart_from_truncated_checkpoint(demo_corpus, checkpoint, tmp_path):
    path = truncated_copy(checkpoint[0], tmp_path)
    result = cli_runner.train(tiny_args(demo_corpus, tmp_path / "work", restart=path), tmp_path)
    assert_error(result, str(path), "truncated")


def test_train_restart_on_data_with_another_vocabulary(checkpoint, tmp_path):
    other = cli_runner.demo_corpus(tmp_path / "other", train_docs=3)   # another sample: other names
    result = cli_runner.train(tiny_args(other, tmp_path / "work", restart=checkpoint[0]), tmp_path)
    assert_error(result, "another vocabulary", "--data")


@pytest.mark.parametrize("flags, message", [
    ({"eval_tgt_len": 17}, "--eval_tgt_len (17) must be <= --mem_len + --tgt_len (8 + 8)"),
    ({"eval_tgt_len": 10, "mem_len": 0, "ext_len": 1}, "--eval_tgt_len (10) must be <= --ext_len + --tgt_len (1 + 8)"),
])
def test_train_eval_tgt_len_longer_than_the_context(demo_corpus, tmp_path, flags, message):
    result = cli_runner.train(tiny_args(demo_corpus, tmp_path / "work", **flags), tmp_path)
    assert_error(result, message)


def test_train_negative_ext_len(demo_corpus, tmp_path):
    result = cli_runner.train(tiny_args(demo_corpus, tmp_path / "work", ext_len=-1), tmp_path)
    assert_error(result, "--ext_len must be >= 0")


def test_train_non_positive_loss_scale(demo_corpus, tmp_path):
    result = cli_runner.train(tiny_args(demo_corpus, tmp_path / "work", init_loss_scale=0, fp16=True), tmp_path)
    assert_error(result, "--init_loss_scale must be > 0, got 0.0")


def test_train_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(checkpoint, tmp_path):
    """A restart with an absurd learning rate: the weights blow up at step 5, the loss of step 6 is NaN."""
    work = tmp_path / "work"
    shutil.copytree(checkpoint[0].parent, work)
    before = {p.name: digest(p) for p in work.glob("*.pt")}
    argv = [a if a != str(checkpoint[0].parent) else str(work) for a in checkpoint[1]]
    argv += ["--restart", str(work), "--lr", "1e12", "--max_step", "20", "--log_interval", "1"]
    result = cli_runner.train(argv, tmp_path)
    assert_error(result, "the training loss became nan at step 6", str(work / "checkpoint_last.pt"), code=3)
    assert {p.name: digest(p) for p in work.glob("*.pt")} == before
    assert "Saving checkpoint" not in result.stdout


# ---------------------------------------------------------------------------------------------------------
# eval.py


def test_eval_missing_checkpoint(tmp_path):
    result = cli_runner.evaluate(["--model", tmp_path / "none.pt", "--manual", "a", "--work_dir", tmp_path / "eval"],
                                 tmp_path)
    assert_error(result, "none.pt", "does not exist")


def test_eval_corrupt_checkpoint(checkpoint, tmp_path):
    path = corrupt_copy(checkpoint[0], tmp_path)
    result = cli_runner.evaluate(["--model", path, "--manual", "a", "--work_dir", tmp_path], tmp_path)
    assert_error(result, str(path), "cannot be read")


def test_eval_truncated_checkpoint(checkpoint, tmp_path):
    path = truncated_copy(checkpoint[0], tmp_path)
    result = cli_runner.evaluate(["--model", path, "--manual", "a", "--work_dir", tmp_path], tmp_path)
    assert_error(result, str(path), "truncated")


def test_eval_words_outside_the_vocabulary_without_unk(checkpoint, tmp_path):
    """The demo vocabulary has no <unk>: a word it never saw cannot be scored."""
    result = cli_runner.evaluate(["--model", checkpoint[0], "--manual", "the", "zyxwv", "--debug"], tmp_path)
    assert_error(result, "'zyxwv' is not in the vocabulary", "no <unk>")


def test_eval_split_with_words_outside_the_vocabulary(checkpoint, tmp_path):
    other = cli_runner.demo_corpus(tmp_path / "other", train_docs=1, eval_docs=1)
    for name in ("valid.txt", "test.txt"):
        (other / name).write_text("the zyxwv sees the .\n")
    result = cli_runner.evaluate(["--model", checkpoint[0], "--data", other, "--dataset", "custom", "--split", "test",
                                  "--debug"], tmp_path)
    assert_error(result, "test.txt: line 1: 'zyxwv' is not in the vocabulary")


def test_eval_manual_with_empty_text(checkpoint, tmp_path):
    result = cli_runner.evaluate(["--model", checkpoint[0], "--manual", " ", "--debug"], tmp_path)
    assert_error(result, "--manual got empty text")


def test_eval_incomplete_manual_config(demo_corpus, tmp_path):
    result = cli_runner.evaluate(["--manual_config", '{"n_layer": 1}', "--data", demo_corpus, "--dataset", "custom",
                                  "--debug"], tmp_path)
    assert_error(result, "--manual_config", "missing n_token")


@pytest.mark.parametrize("flags, message", [
    (["--ext_len", "-1"], "--ext_len must be >= 0, got -1"),
    (["--tgt_len", "0"], "--tgt_len must be >= 1, got 0"),
    (["--mem_len", "-2"], "--mem_len must be >= 0, got -2"),
])
def test_eval_lengths_the_reference_rejects(checkpoint, tmp_path, flags, message):
    result = cli_runner.evaluate(["--model", checkpoint[0], "--manual", "the", "--debug"] + flags, tmp_path)
    assert_error(result, message)
