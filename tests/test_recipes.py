"""The run_<dataset>_<size>.sh recipes: the command line each one builds (with a stand-in torchrun that
records its arguments), that this command line parses with train.py's / eval.py's flags, their usage
errors, and one real training + evaluation through run_wt2_base.sh on a tiny corpus."""
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from utils.config.cli import eval_parser, parse_args, train_parser
from utils.data.demo_corpus import write_demo_corpus

# recipe -> (preset file, preset); the presets the recipes must use
RECIPES = {
    "run_wt103_base.sh": ("configs/wt103_base.yaml", None),
    "run_wt103_large.sh": ("configs/wt103_large.yaml", None),
    "run_wt2_base.sh": ("configs/wt2.yaml", None),
    "run_ptb_base.sh": ("configs/ptb.yaml", None),
    "run_enwik8_base.sh": ("configs/enwik8.yaml", None),
    "run_enwik8_large.sh": ("configs/enwik8.yaml", "large"),
    "run_text8_base.sh": ("configs/text8.yaml", None),
    "run_text8_large.sh": ("configs/text8.yaml", "large"),
    "run_lm1b_base.sh": ("configs/lm1b.yaml", None),
    "run_lm1b_large.sh": ("configs/lm1b.yaml", "large"),
}
DATASETS = {"wt103": "wt103", "wt2": "wt2", "ptb": "ptb", "enwik8": "enwik8", "text8": "text8", "lm1b": "lm1b"}
# flags with spaces, an empty value and shell characters must arrive as the same separate words
EXTRA = ["--work_dir", "runs/my run", "--seed", "7", "--dllog_file", "a'b\"c $HOME;.json", "--txtlog_file", ""]
EXTRA_EVAL = ["--work_dir", "runs/my run", "--seed", "7", "--dllog_file", "a'b\"c $HOME;.json"]


def recorder(path: Path, record: Path) -> Path:
    """An executable that appends its arguments and OMP_NUM_THREADS as a JSON line to `record`."""
    path.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"print(json.dumps({{'argv': sys.argv[1:], 'omp': os.environ.get('OMP_NUM_THREADS')}}), "
                    f"file=open({str(record)!r}, 'a'))\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_python(tmp_path):
    """$PYTHON for the recipes: records each call (the check, then the launcher) in calls.jsonl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.jsonl"
    python = recorder(bin_dir / "python", record)
    return dict(os.environ, OMP_NUM_THREADS="8", PYTHON=str(python)), record


def run_recipe(recipe, args, env, cwd):
    return subprocess.run(["bash", str(REPO / recipe), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_every_recipe_is_listed():
    assert sorted(p.name for p in REPO.glob("run_*_*.sh") if "multinode" not in p.name) == sorted(RECIPES)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_command_line(recipe, mode, fake_python, tmp_path):
    env, record = fake_python
    extra = EXTRA if mode == "train" else EXTRA_EVAL
    result = run_recipe(recipe, [mode, "4", *extra], env, cwd=tmp_path)  # from another folder than the repo
    assert result.returncode == 0, result.stderr
    checked, called = [json.loads(line) for line in record.read_text().splitlines()]
    config_file, preset = RECIPES[recipe]
    command = [str(REPO / f"{mode}.py"), "--config_file", str(REPO / config_file)]
    command += ["--config", preset] if preset else []
    assert checked["argv"] == command + extra + ["--check", "4"]           # once, before any process starts
    assert called["argv"] == [str(REPO / "scripts" / "launch.py"), "--standalone", "--nproc_per_node=4",
                              *command, *extra]
    assert called["omp"] == checked["omp"] == "1"  # the reference's recipes export OMP_NUM_THREADS=1

    # what torchrun would start parses with the script's own flags, with the recipe's dataset
    args = parse_args(train_parser() if mode == "train" else eval_parser(), called["argv"][4:], section=mode)
    assert args.dataset == DATASETS[recipe.split("_")[1]]
    assert args.config == (preset or "default")
    assert args.work_dir == "runs/my run" and args.seed == 7 and args.dllog_file == "a'b\"c $HOME;.json"
    if mode == "train":
        assert args.txtlog_file == ""
        assert args.multi_gpu == "ddp"  # 4 processes need DDP (several processes without it are refused)


@pytest.mark.parametrize("args", [[], ["help"], ["Train", "1"], ["--help"], ["train"], ["eval", "0"],
                                  ["train", "two"], ["train", "-1"], ["train", "--max_step", "5"]])
def test_recipe_usage_errors(args, fake_python, tmp_path):
    env, record = fake_python
    result = run_recipe("run_wt103_base.sh", args, env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: bash run_wt103_base.sh train|eval <#GPUs>")
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert not record.exists()


def interpreter_env() -> dict:
    """This environment with this interpreter's folder first on PATH: the recipes call `torchrun` and
    `python` from PATH, as in a user's activated environment, but pytest may run as `/path/to/venv/bin/python
    -m pytest` without the environment activated (then PATH has no torchrun, or another python's)."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _summary(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if r["step"] == "SUMMARY"][-1]


@pytest.mark.slow
def test_wt2_recipe_trains_then_evaluates(tmp_path):
    """The real chain: run_wt2_base.sh -> scripts/launch.py -> two train.py processes, then run_wt2_base.sh eval
    on its checkpoint in one process."""
    data = write_demo_corpus(tmp_path / "data", n_train_docs=12, n_eval_docs=2, sentences_per_doc=(10, 20))
    work = tmp_path / "run dir"
    tiny = ["--data", str(data), "--work_dir", str(work), "--no_cuda", "--n_layer", "2", "--d_model", "32",
            "--n_head", "2", "--d_head", "16", "--d_inner", "64"]
    lengths = ["--tgt_len", "16", "--mem_len", "16"]
    train = run_recipe("run_wt2_base.sh", ["train", "2", *tiny, *lengths, "--eval_tgt_len", "16", "--batch_size", "4",
                                           "--eval_batch_size", "4", "--max_step", "6", "--eval_interval", "3",
                                           "--warmup_step", "2", "--log_interval", "2"],
                       interpreter_env(), cwd=tmp_path)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert "| epoch   1 step        6 |" in train.stdout and "world size: 2 (ddp)" in train.stdout
    assert "| End of training | test time:" in train.stdout
    config = (work / "config.yaml").read_text()  # the preset file was applied under the overrides
    assert "dataset: wt2" in config and "dropout: 0.3" in config and "n_layer: 2" in config
    assert (work / "checkpoint_best.pt").is_file() and (work / "checkpoint_last.pt").is_file()

    # eval.py with the training-time test settings must score the best checkpoint as train.py's final test did
    evaluation = run_recipe("run_wt2_base.sh", ["eval", "1", *tiny[:5], "--model", str(work / "checkpoint_best.pt"),
                                                *lengths, "--batch_size", "4", "--clamp_len", "-1",
                                                "--no_same_length", "--split", "test"],
                            interpreter_env(), cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stdout[-2000:] + evaluation.stderr[-2000:]
    assert "Evaluating with: math fp32 type pytorch bsz 4 tgt_len 16 ext_len 0 mem_len 16 clamp_len -1" in evaluation.stdout
    assert "| test loss " in evaluation.stdout
    trained, evaluated = _summary(work / "train_log.json"), _summary(work / "eval_log.json")
    assert evaluated["eval_loss"] == pytest.approx(trained["test_loss"], rel=1e-5)


@pytest.mark.slow
def test_sigterm_to_a_recipe_saves_a_checkpoint_and_exits_0(tmp_path):
    """A scheduler or a user stopping the recipe (SIGTERM to the script): the two workers finish their step,
    write a checkpoint and the recipe exits 0 (torchrun itself would exit 1 on the signal)."""
    data = write_demo_corpus(tmp_path / "data", n_train_docs=40, n_eval_docs=2, sentences_per_doc=(10, 20))
    work = tmp_path / "work"
    args = ["train", "2", "--data", str(data), "--work_dir", str(work), "--no_cuda", "--n_layer", "1",
            "--d_model", "16", "--n_head", "2", "--d_head", "8", "--d_inner", "32", "--tgt_len", "8",
            "--mem_len", "8", "--eval_tgt_len", "8", "--batch_size", "2", "--max_step", "100000",
            "--eval_interval", "100000", "--log_interval", "1"]
    proc = subprocess.Popen(["bash", str(REPO / "run_wt2_base.sh"), *args], cwd=tmp_path, env=interpreter_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:                    # wait until training runs
            if "| epoch   1 step        3 |" in line:
                break
        proc.send_signal(15)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 0, out[-2000:]
    assert "Received SIGTERM" in out and "error" not in out
    assert torch.load(work / "checkpoint_last.pt", weights_only=True)["world_size"] == 2


# ---------------------------------------------------------------------------------------------------------
# mistakes that every process would make alike: checked once, before torchrun starts any


def assert_fails_once(result, error: str, elapsed: float):
    """Exit 2 within 30 s, at most 3 non-empty lines, no traceback, `error` exactly once."""
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert result.returncode == 2, output
    assert elapsed < 30 and len(lines) <= 3 and "Traceback" not in output, output
    assert sum(error in line for line in lines) == 1, output


def timed_recipe(recipe, args, tmp_path):
    start = time.time()
    result = run_recipe(recipe, args, interpreter_env(), cwd=tmp_path)
    return result, time.time() - start


def test_missing_data_is_one_line_and_starts_no_process(tmp_path):
    # the command README and the reference give first; a checkout that has the data gets a folder that has not
    data = [] if not (REPO / "data" / "wikitext-103").exists() else ["--data", str(tmp_path / "wikitext-103")]
    result, elapsed = timed_recipe("run_wt103_base.sh", ["train", "8", *data], tmp_path)
    assert_fails_once(result, "data folder not found; download the dataset with getdata.sh or pass --data", elapsed)
    assert "world size" not in result.stdout + result.stderr          # no training process started


def test_unknown_flag_is_one_line(tmp_path):
    result, elapsed = timed_recipe("run_ptb_base.sh", ["train", "2", "--no_such_flag", "1"], tmp_path)
    assert_fails_once(result, "error: unknown flag --no_such_flag", elapsed)


def test_missing_checkpoint_to_evaluate_is_one_line(tmp_path):
    result, elapsed = timed_recipe("run_wt103_base.sh", ["eval", "2", "--model", "missing.pt"], tmp_path)
    assert_fails_once(result, "error: checkpoint missing.pt does not exist", elapsed)


def test_missing_checkpoint_to_resume_is_one_line(tmp_path):
    corpus = write_demo_corpus(tmp_path / "demo", n_train_docs=2, n_eval_docs=1)
    result, elapsed = timed_recipe("run_ptb_base.sh", ["train", "2", "--data", str(corpus), "--dataset", "custom",
                                                       "--restart", str(tmp_path / "gone.pt")], tmp_path)
    assert_fails_once(result, f"error: checkpoint {tmp_path / 'gone.pt'} does not exist", elapsed)
