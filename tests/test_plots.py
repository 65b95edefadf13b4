"""Learning curves (issue 17): scripts/plot_runs.py draws two runs into a PNG that is not blank, each run's
line in its own colour; train.py --plot writes work_dir/curves.png during training."""
import json

import numpy as np
import pytest

import cli_runner
from cli_runner import tiny_args

REPO = cli_runner.REPO
SHORT = dict(max_step=15, eval_interval=5, log_interval=5, eval_max_steps=2)   # 3 evaluations


def _pixels(path):
    from matplotlib.image import imread
    image = imread(path)                         # [h, w, 3 or 4] floats in [0, 1]
    return (image[..., :3] * 255).round().astype(int)


def _has_colour(pixels, hex_colour, tolerance=8):
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - rgb).max(axis=-1) <= tolerance).sum())


@pytest.fixture(scope="module")
def two_runs(demo_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    plotted = cli_runner.train(tiny_args(demo_corpus, tmp / "with_plot", plot=True, **SHORT), tmp, name="a")
    assert plotted.returncode == 0, plotted.stderr
    other = cli_runner.train(tiny_args(demo_corpus, tmp / "lr_half", lr=0.005, **SHORT), tmp, name="b")
    assert other.returncode == 0, other.stderr
    return tmp / "with_plot", tmp / "lr_half"


@pytest.mark.slow
def test_train_plot_writes_curves_png_at_each_evaluation(two_runs):
    with_plot, without = two_runs
    png = with_plot / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (without / "curves.png").exists()
    assert _has_colour(_pixels(png), "#1f77b4") > 100             # the run's lines (matplotlib's first colour)
    assert not list(with_plot.glob("*.tmp*"))                      # written atomically: no temporary file left


@pytest.mark.slow
def test_plot_runs_draws_two_runs_each_in_its_colour(two_runs, tmp_path):
    out = tmp_path / "curves.png"
    result = cli_runner.run(str(REPO / "scripts" / "plot_runs.py"), [*two_runs, "-o", out], tmp_path)
    assert result.returncode == 0, result.stderr
    pixels = _pixels(out)
    assert pixels.std() > 10                                       # not blank
    assert _has_colour(pixels, "#1f77b4") > 100 and _has_colour(pixels, "#ff7f0e") > 100   # one line per run


@pytest.mark.slow
def test_load_run_reads_the_metrics_records(two_runs):
    from utils.training.plots import load_run
    work = two_runs[1]
    run = load_run(work)
    records = [json.loads(line) for line in (work / "train_log.json").read_text().splitlines()]
    train = {r["step"]: r for r in records if isinstance(r["step"], int) and "train_loss" in r}
    valid = {r["step"]: r for r in records if isinstance(r["step"], int) and "valid_loss" in r}
    assert sorted(run.train) == sorted(train) == [5, 10, 15]
    assert [run.train[s]["loss"] for s in sorted(train)] == [train[s]["train_loss"] for s in sorted(train)]
    assert [run.valid[s]["value"] for s in sorted(valid)] == [valid[s]["valid_perplexity"] for s in sorted(valid)]
    # tokens counted by the trainer (an epoch's last batch is shorter); without the count: batch x tgt_len x step
    assert [run.tokens_at(s) for s in sorted(train)] == [train[s]["tokens"] for s in sorted(train)]
    assert run.tokens_at(5) == 5 * 16 * 8 and run.tokens_at(15) < 15 * 16 * 8
    run.train[15]["tokens"] = None
    assert run.tokens_at(15) == 15 * 16 * 8
    assert not run.bpc


def test_a_character_level_run_plots_bpc_and_a_missing_log_is_one_line(tmp_path):
    from utils.io.errors import UserError
    from utils.training.plots import load_run, plot_runs
    work = tmp_path / "char"
    work.mkdir()
    lines = [{"step": "PARAMETER", "batch_size": 4, "tgt_len": 8},
             {"step": 10, "train_loss": 1.0, "lr": 0.1, "train_throughput": 5.0},
             {"step": 10, "valid_loss": 0.7, "valid_bits_per_character": 0.7 / np.log(2)}]
    (work / "train_log.json").write_text("\n".join(json.dumps(r) for r in lines) + "\n{cut")
    run = load_run(work)
    assert run.bpc and run.valid[10]["value"] == pytest.approx(1.0099, abs=1e-4)
    plot_runs([run], tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(UserError, match="train_log.json"):
        load_run(tmp_path / "nothing")
