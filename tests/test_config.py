"""Flag schema, YAML presets and strict parsing (utils/config/cli.py) and the shipped configs/*.yaml."""
import logging
import sys

import pytest
import yaml

from utils.config import cli as cfg
from utils.config.cli import dump_config, eval_parser, eval_splits, parse_args, train_parser
from utils.config.presets import CONFIG_DIR, load_presets
from utils.io.errors import UserError, run_cli

BASE = str(CONFIG_DIR / "wt103_base.yaml")
LARGE = str(CONFIG_DIR / "wt103_large.yaml")


def train(*argv):
    return parse_args(train_parser(), list(argv), "train")


def evaluate(*argv):
    return parse_args(eval_parser(), list(argv), "eval")


def write(tmp_path, text, name="presets.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# every shipped preset


def _all_presets():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        for name, preset in load_presets(path).items():
            for section in preset:
                yield pytest.param(str(path), name, section, id=f"{path.stem}:{name}:{section}")


@pytest.mark.parametrize("path, name, section", list(_all_presets()))
def test_every_shipped_preset_parses(path, name, section):
    parser = train_parser() if section == "train" else eval_parser()
    args = parse_args(parser, ["--config_file", path, "--config", name], section)
    assert args.config == name and args.config_file == path
    if "cpu_small" not in path:
        assert args.cuda is True


def test_preset_lists_match_the_reference():
    base, large = load_presets(BASE), load_presets(LARGE)
    systems = [f"dgx1_{n}gpu_{m}" for n in (8, 4, 2, 1) for m in ("fp16", "fp32")]
    systems += [f"dgx2_{n}gpu_{m}" for n in (16, 8, 4, 2, 1) for m in ("fp16", "fp32")]
    systems += [f"dgxa100_{n}gpu_{m}" for n in (8, 4, 2, 1) for m in ("fp16", "tf32")]
    assert list(base) == ["default", "manual_eval"] + systems + ["trainbench"]
    multinode = [f"{n}dgx2_16gpu_{m}" for n in (8, 4, 2, 1) for m in ("fp16", "fp32")]
    assert list(large) == ["default", "manual_eval"] + systems + multinode + ["trainbench", "trainbench_multinode"]
    assert list(base["trainbench"]) == ["train"]
    for name in ("wt103", "train", "eval"):
        assert name not in base and name not in large
    assert "train_multinode" not in large


# values from the reference's tables (spec §1.4), written out
SPOT_CHECKS = [
    (BASE, "default", "train", dict(n_layer=16, d_model=512, n_head=8, d_head=64, d_inner=2048, dropout=0.1,
                                    dropatt=0.0, optim="jitlamb", lr=0.01, eta_min=0.001, roll=True,
                                    warmup_step=1000, max_step=40000, tgt_len=192, mem_len=192,
                                    eval_tgt_len=192, batch_size=256, multi_gpu="ddp", log_interval=10,
                                    eval_interval=5000, vocab="word", adaptive=True, dataset="wt103",
                                    data="data/wikitext-103/", fp16=False, batch_chunk=1, d_embed=512)),
    (BASE, "default", "eval", dict(tgt_len=64, mem_len=640, clamp_len=400, same_length=True, split="test",
                                   batch_size=16, fp16=False)),
    (BASE, "dgxa100_1gpu_fp16", "train", dict(fp16=True, batch_chunk=8, batch_size=256)),
    (BASE, "dgxa100_1gpu_fp16", "eval", dict(fp16=True)),
    (BASE, "dgx1_1gpu_fp32", "train", dict(fp16=False, batch_chunk=16)),
    (BASE, "dgx2_8gpu_fp16", "train", dict(fp16=True, batch_chunk=2)),
    (BASE, "trainbench", "train", dict(log_interval=1, max_step=500, max_step_scheduler=40000)),
    (LARGE, "default", "train", dict(n_layer=18, d_model=1024, n_head=16, d_inner=4096, dropout=0.2,
                                     dropatt=0.2, eta_min=0.0001, warmup_step=16000, max_step=100000,
                                     tgt_len=384, mem_len=384, init_std=0.005, eval_tgt_len=128,
                                     batch_size=128, log_interval=100, div_val=4)),
    (LARGE, "default", "eval", dict(tgt_len=128, mem_len=1600, clamp_len=1000, same_length=True, split="test")),
    (LARGE, "dgx1_1gpu_fp32", "train", dict(batch_chunk=64, swap_mem=True, fp16=False)),
    (LARGE, "dgx1_8gpu_fp16", "train", dict(batch_chunk=4, fp16=True, swap_mem=False)),
    (LARGE, "dgxa100_8gpu_tf32", "train", dict(batch_chunk=2, fp16=False)),
    (LARGE, "dgxa100_1gpu_tf32", "train", dict(batch_chunk=16)),
    (LARGE, "8dgx2_16gpu_fp16", "train", dict(lr=0.02, max_step=25000, batch_size=512, eta_min=0.0001,
                                              eval_batch_size=128, eval_interval=1000, fp16=True,
                                              batch_chunk=1, n_layer=18, warmup_step=16000)),
    (LARGE, "8dgx2_16gpu_fp16", "eval", dict(batch_size=128, fp16=True, mem_len=1600)),
    (LARGE, "2dgx2_16gpu_fp32", "train", dict(batch_chunk=2, fp16=False, lr=0.02)),
    (LARGE, "1dgx2_16gpu_fp16", "train", dict(batch_chunk=2, fp16=True)),
    (LARGE, "1dgx2_16gpu_fp32", "train", dict(batch_chunk=4)),
    (LARGE, "1dgx2_16gpu_fp32", "eval", dict(batch_size=16)),
    (LARGE, "trainbench_multinode", "train", dict(log_interval=1, max_step=500, max_step_scheduler=25000,
                                                  lr=0.02, batch_size=512)),
]


@pytest.mark.parametrize("path, name, section, expected", SPOT_CHECKS,
                         ids=[f"{p.split('/')[-1]}:{n}:{s}" for p, n, s, _ in SPOT_CHECKS])
def test_preset_values_match_the_reference_tables(path, name, section, expected):
    parser = train_parser() if section == "train" else eval_parser()
    args = parse_args(parser, ["--config_file", path, "--config", name], section)
    assert {key: getattr(args, key) for key in expected} == expected


def test_manual_eval_preset_builds_a_model_config():
    args = evaluate("--config_file", LARGE, "--config", "manual_eval")
    mc = args.manual_config
    assert (mc["n_layer"], mc["d_model"], mc["div_val"], mc["n_token"]) == (18, 1024, 4, 267735)
    assert mc["cutoffs"] == [19997, 39997, 199997] and mc["tie_projs"] == [False, True, True, True]
    assert evaluate("--config_file", BASE, "--config", "manual_eval").manual_config["n_layer"] == 16


# ---------------------------------------------------------------------------------------------------------
# precedence, switches, recipes


def test_precedence_command_line_over_preset_over_default():
    args = train("--config_file", BASE, "--config", "dgx1_4gpu_fp16", "--batch_chunk", "4", "--lr=0.005")
    assert args.batch_chunk == 4  # command line beats the preset's 2
    assert args.lr == 0.005  # command line beats the preset's 0.01
    assert args.n_layer == 16 and args.fp16 is True  # preset
    assert args.clip == 0.25 and args.seed == 1111  # argparse defaults


def test_default_preset_when_only_config_file_is_given():
    assert train("--config_file", LARGE).n_layer == 18


def test_bare_file_name_is_found_in_configs():
    args = train("--config_file", "wt103_base.yaml", "--config", "dgx1_8gpu_fp16")
    assert args.fp16 is True and args.config_file == BASE


def test_no_switches_off_a_preset_true():
    args = train("--config_file", BASE, "--config", "dgx1_8gpu_fp16", "--no_fp16", "--no_roll",
                 "--no_adaptive", "--no_cuda")
    assert (args.fp16, args.roll, args.adaptive, args.cuda) == (False, False, False, False)
    args = evaluate("--config_file", BASE, "--no_same_length")
    assert args.same_length is False
    assert train("--fp16", "--no_fp16").fp16 is False and train("--no_fp16", "--fp16").fp16 is True


def test_negative_flags_get_no_double_negation():
    for flag in ("--no_no_env", "--no_no_eval", "--no_no_test", "--no_not_tied"):
        with pytest.raises(UserError, match="unknown flag"):
            train(flag)
    args = train("--no_env", "--no_eval", "--no_test", "--not_tied")
    assert (args.no_env, args.no_eval, args.no_test, args.tied) == (True, True, True, False)


@pytest.mark.parametrize("argv", [
    # run_wt103_base.sh train 8 --config dgx1_8gpu_fp16 (scripts/tests/train_bench.sh)
    ["--config_file", "wt103_base.yaml", "--config", "dgx1_8gpu_fp16", "--max_step", "64", "--debug",
     "--no_eval", "--log_interval", "1", "--target_throughput", "230000"],
    # scripts/tests/train_short.sh
    ["--config_file", "wt103_base.yaml", "--config", "dgxa100_8gpu_fp16", "--debug", "--max_step", "5000",
     "--max_step_scheduler", "40000", "--target_perplexity", "43.5", "--log_interval", "1"],
    # run.sub -> run_multinode_wt103_large.sh with extra env settings
    ["--config_file", "wt103_large.yaml", "--config", "8dgx2_16gpu_fp16", "--work_dir", "results/1",
     "--local_batch_size", "4", "--batch_chunk", "2", "--eval_batch_size", "128", "--seed", "7"],
    # run_enwik8_base.sh (legacy: bare --multi_gpu meant DataParallel)
    ["--cuda", "--data", "../data/enwik8/", "--dataset", "enwik8", "--n_layer", "12", "--d_model", "512",
     "--n_head", "8", "--d_head", "64", "--d_inner", "2048", "--dropout", "0.1", "--dropatt", "0.0",
     "--optim", "adam", "--lr", "0.00025", "--warmup_step", "0", "--max_step", "400000", "--tgt_len", "512",
     "--mem_len", "512", "--eval_tgt_len", "128", "--batch_size", "22", "--multi_gpu", "--gpu0_bsz", "4"],
    # an old command line with apex settings
    ["--fp16", "--amp", "pytorch", "--apex_amp_opt_level", "O1", "--affinity", "socket_unique_interleaved"],
])
def test_recipe_command_lines(argv):
    args = train(*argv)
    assert args.tied is True


def test_recipe_values():
    args = train("--config_file", "wt103_large.yaml", "--config", "8dgx2_16gpu_fp16", "--local_batch_size", "4",
                 "--batch_chunk", "2")
    assert (args.local_batch_size, args.batch_chunk, args.lr, args.fp16) == (4, 2, 0.02, True)
    args = train("--multi_gpu", "--gpu0_bsz", "4")
    assert (args.multi_gpu, args.gpu0_bsz) == ("ddp", 4)
    args = evaluate("--config_file", "wt103_base.yaml", "--work_dir", "LM-TFM/inference/x", "--model", "m.pt",
                    "--type", "torchscript", "--batch_size", "4", "--log_interval", "1", "--no_env", "--fp16",
                    "--save_data")
    assert (args.type, args.batch_size, args.fp16, args.save_data, args.mem_len) == ("torchscript", 4, True,
                                                                                      True, 640)


def test_apex_is_refused_and_its_opt_level_ignored_with_a_note(caplog):
    with pytest.raises(UserError, match="apex AMP is not supported"):
        train("--amp", "apex")
    with caplog.at_level(logging.WARNING, logger="utils.config.cli"):
        args = train("--apex_amp_opt_level", "O1")
    assert args.amp == "pytorch" and "ignored" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="utils.config.cli"):
        train()
    assert "apex" not in caplog.text


def test_local_rank_from_environment(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert train().local_rank == 3 and evaluate().local_rank == 3
    assert train("--local-rank=5").local_rank == 5  # spelling of the newer torch.distributed.launch
    assert train("--local_rank", "2").local_rank == 2


def test_defaults_and_choices():
    args = train()
    assert (args.optim, args.scheduler, args.amp, args.affinity, args.multi_gpu) == ("jitlamb", "cosine",
                                                                                    "pytorch", "disabled", None)
    assert (args.data, args.dataset, args.bf16, args.d_embed, args.tied) == ("data/wikitext-103", "wt103",
                                                                          False, 512, True)
    for dataset in ("wt103", "wt2", "ptb", "enwik8", "text8", "lm1b", "custom"):
        assert train("--dataset", dataset).dataset == dataset
    for mode in ("ddp", "dp", "fsdp"):
        assert train("--multi_gpu", mode).multi_gpu == mode
    args = evaluate()
    assert (args.split, args.type, args.batch_size, args.tgt_len, args.mem_len, args.percentiles) == (
        "all", "pytorch", 16, 64, 640, [90, 95, 99])
    assert eval_splits(args) == ["valid", "test"] and eval_splits(evaluate("--split", "test")) == ["test"]


def test_eval_specifics(caplog):
    args = evaluate("--percentiles", "50", "99", "--manual", "the", "cat", "--batch_size", "8")
    assert args.percentiles == [50, 99] and args.batch_size == 1 and args.manual == ["the", "cat"]
    with pytest.raises(UserError, match="invalid int value"):
        evaluate("--percentiles", "9x")
    with pytest.raises(UserError, match="0..100"):
        evaluate("--percentiles", "101")
    with pytest.raises(UserError, match="JSON"):
        evaluate("--manual_config", "{not json")
    with caplog.at_level(logging.WARNING, logger="utils.config.cli"):
        evaluate("--same_length", "--tgt_len", "128", "--mem_len", "64")
    assert "same_length" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# strict errors


def test_unknown_flag_with_suggestion():
    with pytest.raises(UserError, match=r"unknown flag --lrr; did you mean --lr"):
        train("--lrr", "0.1")
    with pytest.raises(UserError, match=r"unknown flag --n_layers.*did you mean --n_layer"):
        train("--n_layers=3")
    with pytest.raises(UserError, match=r"abbreviated flags are not accepted.*--max_step"):
        train("--max", "3")
    with pytest.raises(UserError, match="unexpected argument 'foo'"):
        train("foo")
    with pytest.raises(UserError, match="holds several words"):
        train("--max_step 10 --lr 0.1")  # run.sub's quoted "${EXTRA_TRAIN_PARAMS}"
    with pytest.raises(UserError, match="unknown flag --percentile"):
        evaluate("--percentile", "90")


def test_argparse_errors_are_one_line_user_errors(capsys):
    with pytest.raises(UserError, match=r"argument --optim: invalid choice: 'lam'"):
        train("--optim", "lam")
    with pytest.raises(UserError, match="expected one argument"):
        train("--lr")

    def main():
        train("--max_step", "ten")

    with pytest.raises(SystemExit) as exc:
        run_cli(main)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --max_step: invalid int value")
    assert "usage:" not in err


def test_help_still_works(capsys):
    with pytest.raises(SystemExit) as exc:
        train("--help")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--n_layer" in out and "--no_X" in out and "--no_fp16" not in out


def test_config_without_config_file_names_the_file():
    with pytest.raises(UserError, match=r"--config dgx1_1gpu_fp32 needs --config_file.*wt103_base\.yaml"):
        train("--config", "dgx1_1gpu_fp32")
    with pytest.raises(UserError, match="needs --config_file"):
        train("--config", "nowhere")


def test_missing_preset_lists_available(tmp_path):
    with pytest.raises(UserError, match=r"preset 'dgx1_8gpu_fp61' not found.*available presets: default, "
                                        r"manual_eval, .*trainbench\); did you mean 'dgx1_8gpu_fp16'"):
        train("--config_file", BASE, "--config", "dgx1_8gpu_fp61")
    with pytest.raises(UserError, match="'train_multinode' .* is not a preset"):
        train("--config_file", LARGE, "--config", "train_multinode")
    path = write(tmp_path, "other:\n  train: {lr: 0.1}\n")
    with pytest.raises(UserError, match=r"preset 'default' not found.*available presets: other"):
        train("--config_file", path)


def test_preset_without_the_section():
    with pytest.raises(UserError, match=r"preset 'trainbench' .* has no 'eval' section"):
        evaluate("--config_file", BASE, "--config", "trainbench")


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(UserError, match="config file nope.yaml not found"):
        train("--config_file", "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        train("--config_file", write(tmp_path, "default: {train: [\n"))
    with pytest.raises(UserError, match="must map preset names"):
        train("--config_file", write(tmp_path, "- a\n- b\n"))
    with pytest.raises(UserError, match="unknown section"):
        train("--config_file", write(tmp_path, "default: {train: {}, evaluation: {}}\n"))


@pytest.mark.parametrize("body, message", [
    ("lrr: 0.1", r"\[default\.train\]: unknown key 'lrr'; did you mean 'lr'"),
    ("n_layer: 2.5", r"n_layer: expects an integer, got 2\.5"),
    ("n_layer: sixteen", "n_layer: expects an integer"),
    ("lr: fast", "lr: expects a number"),
    ("fp16: 1", "fp16: expects true or false"),
    ("optim: jitlam", r"optim: invalid choice 'jitlam' \(choose from .*\); did you mean 'jitlamb'"),
    ("amp: apex", "apex AMP is not supported"),
    ("n_layer: null", "n_layer: needs a value"),
    ("config: default", "cannot be set inside a preset"),
    ("tgt_len: [1, 2]", "tgt_len: expects an integer"),
])
def test_bad_preset_values(tmp_path, body, message):
    path = write(tmp_path, f"default:\n  train:\n    {body}\n")
    with pytest.raises(UserError, match=message):
        train("--config_file", path)


def test_preset_values_are_converted_like_the_command_line(tmp_path):
    path = write(tmp_path, "default:\n  train: {lr: 1e-3, max_step_scheduler: null, n_layer: '4', data: 12}\n"
                           "  eval: {percentiles: 50, manual_config: {n_layer: 2}, split: valid}\n")
    args = train("--config_file", path)
    assert (args.lr, args.max_step_scheduler, args.n_layer, args.data) == (0.001, None, 4, "12")
    args = evaluate("--config_file", path)
    assert (args.percentiles, args.manual_config, args.split) == ([50], {"n_layer": 2}, "valid")


def test_merge_keys_repeated_later_wins(tmp_path):
    # PyYAML (safe and full loaders alike): both merges apply, the later one wins (spec §1.1.8)
    text = ("a: &a {lr: 0.1, n_layer: 2}\nb: &b {lr: 0.2, d_model: 64}\n"
            "default:\n  train:\n    <<: *a\n    <<: *b\n    n_head: 2\n")
    assert yaml.safe_load(text)["default"]["train"] == yaml.load(text, Loader=yaml.FullLoader)["default"]["train"]
    args = train("--config_file", write(tmp_path, text))
    assert (args.lr, args.n_layer, args.d_model, args.n_head) == (0.2, 2, 64, 2)


# ---------------------------------------------------------------------------------------------------------
# post-parse checks (§1.1.9, §1.1.10) and derived values


@pytest.mark.parametrize("argv, message", [
    (["--ext_len", "-1"], "--ext_len must be >= 0"),
    (["--eval_tgt_len", "400", "--tgt_len", "192", "--mem_len", "192"], r"--eval_tgt_len \(400\) must be <= "
                                                                        r"--mem_len \+ --tgt_len"),
    (["--mem_len", "0", "--tgt_len", "64", "--ext_len", "16", "--eval_tgt_len", "96"],
     r"<= --ext_len \+ --tgt_len \(16 \+ 64\) when --mem_len is 0"),
    (["--batch_size", "10", "--batch_chunk", "4"], r"--batch_size \(10\) must be divisible by --batch_chunk"),
    (["--local_batch_size", "6", "--batch_chunk", "4", "--batch_size", "8"],
     r"--local_batch_size \(6\) must be divisible"),
    (["--batch_chunk", "0"], "--batch_chunk must be >= 1"),
    (["--fp16", "--bf16"], "exclude each other"),
])
def test_train_checks(argv, message):
    with pytest.raises(UserError, match=message):
        train(*argv)


def test_train_checks_accept_the_boundaries_and_derive_values():
    args = train("--mem_len", "0", "--tgt_len", "64", "--ext_len", "16", "--eval_tgt_len", "80", "--not_tied",
                 "--d_embed", "128")
    assert (args.tied, args.d_embed) == (False, 128)
    assert train("--eval_tgt_len", "384").eval_tgt_len == 384


def test_eval_checks():
    with pytest.raises(UserError, match="--ext_len must be >= 0"):
        evaluate("--ext_len", "-2")
    with pytest.raises(UserError, match="--repeat must be >= 1"):
        evaluate("--repeat", "0")


# ---------------------------------------------------------------------------------------------------------
# dumped configuration


@pytest.mark.parametrize("section", ["train", "eval"])
def test_dump_config_reloads_as_a_preset(tmp_path, section):
    parser = train_parser if section == "train" else eval_parser
    argv = ["--config_file", LARGE, "--config", "dgx1_8gpu_fp16", "--lr", "0.003", "--no_fp16"]
    if section == "eval":
        argv = argv[:4] + ["--manual_config", '{"n_layer": 2}', "--percentiles", "50", "--batch_size", "4"]
    args = parse_args(parser(), argv, section)
    path = dump_config(args, tmp_path / "run" / cfg.CONFIG_DUMP_NAME, section)
    assert path.read_text().startswith("# Resolved")
    dumped = yaml.safe_load(path.read_text())["default"][section]
    assert not {"config", "config_file", "local_rank", "tied", "apex_amp_opt_level"} & set(dumped)
    again = parse_args(parser(), ["--config_file", str(path)], section)
    left_out = {"config", "config_file"}
    assert {k: v for k, v in again.to_dict().items() if k not in left_out} == \
           {k: v for k, v in args.to_dict().items() if k not in left_out}


def test_parse_args_defaults_to_sys_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--n_layer", "3"])
    assert parse_args(train_parser()).n_layer == 3
    monkeypatch.setattr(sys, "argv", ["eval.py", "--split", "valid"])
    assert parse_args(eval_parser()).split == "valid"  # section from the parser
