"""The configuration schema (utils/config/schema.py): one declaration per option feeds the three parsers, the
preset checks, the range checks, the frozen configuration and the dumped file; the layers of the project
import one way."""
import ast
import dataclasses
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest

import cli_runner
from cli_runner import tiny_args
from utils.config import schema
from utils.config.cli import eval_parser, generate_parser, parse_args, train_parser
from utils.config.schema import EVAL, GENERATE, SPECS, TRAIN, Config
from utils.io.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def train(*argv):
    return parse_args(train_parser(), list(argv))


# ---------------------------------------------------------------------------------------------------------
# one schema


def test_an_option_added_to_the_schema_reaches_the_parsers_that_offer_it(monkeypatch, tmp_path):
    @dataclasses.dataclass(frozen=True)
    class WithProbe(schema.ModelConfig):
        probe_width: int = schema.opt(7, "an option added by this test", clis=(TRAIN, GENERATE), low=1,
                                      cli_defaults={GENERATE: 5})

    monkeypatch.setitem(schema.GROUPS, "architecture", WithProbe)
    monkeypatch.setattr(schema, "SPECS", schema._specs())

    assert train().probe_width == 7 and train("--probe_width", "3").probe_width == 3
    assert parse_args(generate_parser(), ["--model", "m.pt"]).probe_width == 5
    assert "--probe_width" in train_parser().format_help() and "--probe_width" in generate_parser().format_help()
    assert "--probe_width" not in eval_parser().format_help()
    with pytest.raises(UserError, match="unknown flag --probe_width"):
        parse_args(eval_parser(), ["--probe_width", "3"])
    with pytest.raises(UserError, match="--probe_width must be >= 1, got 0"):
        train("--probe_width", "0")
    preset = tmp_path / "p.yaml"
    preset.write_text("default:\n  train: {probe_width: 4}\n")
    assert train("--config_file", str(preset)).probe_width == 4


def test_every_option_is_declared_once_with_a_help_text_and_a_cli():
    for spec in SPECS.values():
        assert spec.option.help and set(spec.option.clis) <= {TRAIN, EVAL, GENERATE}, spec.name
    assert len(SPECS) == sum(len(dataclasses.fields(g)) for g in schema.GROUPS.values())
    assert not set(SPECS) & {f.name for f in dataclasses.fields(Config)}   # flat reading is unambiguous


@pytest.mark.parametrize("parser", [train_parser, eval_parser, generate_parser])
def test_help_shows_every_default(parser):
    text = " ".join(parser().format_help().split())
    for action in parser()._actions:
        if action.help and action.help != "==SUPPRESS==" and action.dest != "help":
            assert "default:" in " ".join((action.help % {}).split()), action.dest
    assert "(default: 16)" in text or parser is not train_parser


def test_help_of_each_cli_shows_its_own_defaults():
    def help_of(parser, flag):
        return next(a.help for a in parser()._actions if flag in a.option_strings)
    assert "(default: 192)" in help_of(train_parser, "--tgt_len")
    assert "(default: 64)" in help_of(eval_parser, "--tgt_len")
    assert "(default: 640)" in help_of(eval_parser, "--mem_len")
    assert "(default: the model's)" in help_of(generate_parser, "--mem_len")
    assert "(default: the model's)" in help_of(generate_parser, "--dataset")
    assert "(default: none)" in help_of(generate_parser, "--prompt_file")


# ---------------------------------------------------------------------------------------------------------
# values checked where they are declared


@pytest.mark.parametrize("flag, value, expected", [
    ("dropout", "2", "--dropout must be in [0, 1), got 2.0"),
    ("dropout", "1", "--dropout must be in [0, 1), got 1.0"),
    ("dropatt", "-0.1", "--dropatt must be in [0, 1), got -0.1"),
    ("lr", "-1", "--lr must be > 0, got -1.0"),
    ("lr", "0", "--lr must be > 0, got 0.0"),
    ("lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("lr", "inf", "--lr must be a finite number > 0, got inf"),
    ("clip", "-1", "--clip must be > 0, got -1.0"),
    ("clip", "0", "--clip must be > 0, got 0.0"),
    ("seed", "-1", "--seed must be in [0, 4294967295], got -1"),
    ("n_layer", "0", "--n_layer must be >= 1, got 0"),
    ("tgt_len", "0", "--tgt_len must be >= 1, got 0"),
    ("d_embed", "0", "--d_embed must be -1 or >= 1, got 0"),
    ("batch_size", "0", "--batch_size must be >= 1, got 0"),
    ("mem_len", "-1", "--mem_len must be >= 0, got -1"),
    ("init_std", "0", "--init_std must be > 0, got 0.0"),
    ("decay_rate", "1", "--decay_rate must be in (0, 1), got 1.0"),
])
def test_values_outside_their_range_are_one_line_errors(flag, value, expected):
    with pytest.raises(UserError) as exc:
        train(f"--{flag}", value)
    assert str(exc.value) == expected


def test_ranges_apply_to_preset_values_too(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("default:\n  train: {dropout: 1.5}\n")
    with pytest.raises(UserError, match=r"--dropout must be in \[0, 1\), got 1.5"):
        train("--config_file", str(preset))


def test_boundaries_and_special_values_are_accepted():
    args = train("--dropout", "0", "--d_embed", "-1", "--seed", "0", "--mem_len", "0", "--eval_tgt_len", "192",
                 "--clamp_len", "-1", "--sample_softmax", "-1")
    assert (args.dropout, args.d_embed, args.seed, args.mem_len) == (0.0, 512, 0, 0)


def test_clip_off_means_no_clipping():
    assert train("--clip", "off").clip == math.inf
    assert train("--clip", "OFF").clip == math.inf
    with pytest.raises(UserError, match="expects a number or 'off'"):
        train("--clip", "none")


@pytest.mark.parametrize("argv", [["--dropout", "2"], ["--lr", "-1"], ["--lr", "nan"], ["--clip", "-1"],
                                  ["--seed", "-1"], ["--n_layer", "0"], ["--tgt_len", "0"], ["--d_embed", "0"],
                                  ["--batch_size", "0"]])
def test_train_py_refuses_out_of_range_values_before_touching_the_work_dir(argv, tmp_path):
    work_dir = tmp_path / "work"
    result = cli_runner.train(["--work_dir", work_dir, "--data", tmp_path / "nowhere", *argv], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {argv[0]} must be "), result.stderr
    assert not work_dir.exists()


# ---------------------------------------------------------------------------------------------------------
# reference flags that do nothing here


NO_EFFECT = [("--affinity", "socket"), ("--gpu0_bsz", "4"), ("--emb_init", "uniform"), ("--emb_init_range", "0.1"),
             ("--clip_nonemb", None), ("--apex_amp_opt_level", "O1")]


@pytest.mark.parametrize("flag, value", NO_EFFECT)
def test_each_no_effect_flag_warns_once_and_parses(flag, value, caplog):
    with caplog.at_level(logging.WARNING, logger="utils.config.cli"):
        train(flag, *([value] if value else []))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"note: {flag} is ignored (no effect in this project): ")


def test_no_effect_flags_are_not_dumped_and_silent_when_not_given(caplog):
    with caplog.at_level(logging.WARNING, logger="utils.config.cli"):
        args = train()
    assert not caplog.records
    dumped = args.to_dict(dumped_only=True)
    assert not {"affinity", "gpu0_bsz", "emb_init", "emb_init_range", "clip_nonemb", "apex_amp_opt_level"} & set(dumped)


def test_multi_gpu_dp_says_what_runs_instead(caplog):
    with caplog.at_level(logging.WARNING, logger="utils.config.cli"):
        assert train("--multi_gpu", "dp").multi_gpu == "dp"
    assert "there is no DataParallel here; one process trains on one device" in caplog.text


def test_a_run_with_the_reference_flags_prints_the_notes_and_trains(demo_corpus, tmp_path):
    argv = tiny_args(demo_corpus, tmp_path / "work", max_step=2, eval_interval=2, no_test=True, no_env=True,
                     affinity="socket", gpu0_bsz=4, emb_init="uniform", clip_nonemb=True)
    result = cli_runner.train(argv, tmp_path)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert [n.split()[1] for n in notes] == ["--affinity", "--clip_nonemb", "--emb_init", "--gpu0_bsz"]
    assert (tmp_path / "work" / "checkpoint_last.pt").is_file()


# ---------------------------------------------------------------------------------------------------------
# the resolved configuration


def test_configuration_is_frozen_and_derived_by_replace():
    args = train("--lr", "0.5")
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.lr = 0.1
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.optimization.lr = 0.1
    changed = args.replace(lr=0.25, n_layer=3)
    assert (changed.lr, changed.n_layer, args.lr, args.n_layer) == (0.25, 3, 0.5, 16)
    assert changed.optimization.lr == 0.25 and changed.architecture.n_layer == 3
    with pytest.raises(AttributeError, match="no option 'learning_rate'"):
        args.replace(learning_rate=1)
    with pytest.raises(AttributeError, match="no option 'learning_rate'"):
        args.learning_rate


def test_given_records_what_the_user_set(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("default:\n  eval: {dataset: wt2}\n")
    args = parse_args(eval_parser(), ["--config_file", str(preset), "--tgt_len", "32"])
    assert {"dataset", "tgt_len"} <= args.given and "data" not in args.given


# ---------------------------------------------------------------------------------------------------------
# dependencies point one way


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


TOP_LEVEL = {p.stem for p in REPO.glob("*.py")}


def test_importing_the_model_loads_no_configuration_and_no_cli():
    code = ("import sys, mem_transformer; "
            "print(sorted(m for m in sys.modules if m.startswith('utils.config') or m in ('train', 'eval', "
            "'generate', 'data_utils')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_scripts_import_no_cli_and_utils_imports_no_top_level_file():
    for path in sorted((REPO / "scripts").glob("*.py")):
        assert not _imports(path) & {"train", "eval", "generate"}, path.name
    for path in sorted((REPO / "utils").rglob("*.py")):
        assert not {name.split(".")[0] for name in _imports(path)} & TOP_LEVEL, path
    for path in sorted((REPO / "utils" / "model").glob("*.py")):
        assert not any(name.startswith("utils.config") for name in _imports(path)), path.name
