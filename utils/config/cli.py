"""Command lines and presets into a resolved, frozen configuration (utils/config/schema.py).

The parsers of train.py, eval.py and generate.py are generated from the schema; so are the checks of preset
values and the dumped configuration. Flags keep the reference's names, types and defaults; the differences
are listed in docs/configuration.md and marked "ours" or "changed" in the help texts.

`--config_file FILE --config NAME` (NAME defaults to `default`) loads `FILE[NAME][section]` (train.py: the
`train` section, eval.py: `eval`). A value given on the command line beats the preset, which beats the
option's default. Everything is checked, in one line each (UserError, exit 2): unknown or abbreviated flags
and preset keys (with a suggestion), values of the wrong type, outside their choices or their declared range,
and the rules that tie options together. Every on/off flag can be switched off with `--no_<name>` (e.g.
`--no_fp16` against a preset's `fp16: true`); flags already named `no_*` / `not_*` get no negation.
Reference flags that do nothing here are accepted, with one warning line each saying what replaces them.

`dump_config(cfg, path)` writes the resolved configuration as a preset file (preset `default`), so
`--config_file <work_dir>/config.yaml` re-runs with the same settings.
"""
import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from utils.config import schema
from utils.config.presets import (CONFIG_DIR, DEFAULT_PRESET, SECTIONS, did_you_mean, files_with_preset, load_preset,
                                  resolve_config_file)
from utils.config.schema import (CLIS, EVAL, GENERATE, GROUP_TITLES, TRAIN, Config, ConversionError, Spec, options_of,
                                 out_of_range, parse_json_object, range_text)
from utils.config.large_batch import check_large_batch
from utils.io.errors import UserError

LOG = logging.getLogger(__name__)

CONFIG_DUMP_NAME = "config.yaml"
DESCRIPTIONS = {
    TRAIN: "Train a Transformer-XL language model.",
    EVAL: "Evaluate a Transformer-XL language model.",
    GENERATE: "Sample text from a Transformer-XL language model, carrying the memory from token to token. "
              "Lengths and the dataset default to the model's.",
}
_EPILOG = ("Every on/off flag --X also has --no_X to switch it off (e.g. against a preset's 'X: true'). "
           "Presets: --config_file FILE --config NAME; the command line overrides the preset.")


# --------------------------------------------------------------------------------------------------------
# argparse with one-line errors and no abbreviations


class StrictArgumentParser(argparse.ArgumentParser):
    """argparse without prefix abbreviations whose errors are UserErrors (one line, no usage dump) and
    which rejects unknown arguments, suggesting the closest flag."""

    def __init__(self, section: str | None = None, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(**kwargs)
        self.section = section  # the CLI this parser is for: 'train', 'eval' or 'generate'

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")

    def option_names(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings if s.startswith("--")]

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            raise UserError(self._unknown_message(extras))
        return namespace

    def _unknown_message(self, extras: list[str]) -> str:
        flag = next((e for e in extras if e.startswith("-")), None)
        if flag is None:
            return f"unexpected argument {extras[0]!r}: {self.prog} takes flags only (--name value)"
        if any(c.isspace() for c in flag):
            return (f"argument {flag!r} holds several words; pass each flag and each value as its own "
                    "argument (was a shell variable quoted?)")
        name = flag.split("=", 1)[0]
        options = self.option_names()
        note = " (abbreviated flags are not accepted)" if any(o.startswith(name) for o in options) else ""
        return f"unknown flag {name}{note}{did_you_mean(name, options)} (see {self.prog} --help)"


# --------------------------------------------------------------------------------------------------------
# parsers generated from the schema


def _argparse_type(spec: Spec):
    """What argparse calls on each command-line string of the option."""
    parse = spec.option.parse or (parse_json_object if spec.kind is dict else None)
    if parse is None:
        return spec.item if spec.kind is list else spec.kind

    def convert(text: str):
        try:
            return parse(text)
        except ConversionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = spec.kind.__name__
    return convert


def _shown_default(spec: Spec, cli: str) -> str:
    value = spec.default_for(cli)
    if value is None and cli == GENERATE and spec.group in ("architecture", "corpus"):
        return "the model's"
    if spec.kind is bool and value is not None:
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return repr(value) if value == "" else str(value)


def _help(spec: Spec, cli: str) -> str:
    text = spec.option.help
    if spec.option.no_effect:
        text = f"{text}; accepted for old command lines, no effect here: {spec.option.no_effect}"
    if "default:" not in text:
        text = f"{text} (default: {_shown_default(spec, cli)})"
    rng = range_text(spec)
    if rng and spec.kind is not bool:
        text = f"{text} [{rng}]"
    return text.replace("%", "%%")


def _add_option(group, spec: Spec, cli: str) -> None:
    flag = f"--{spec.name}"
    if spec.kind is bool:
        group.add_argument(flag, dest=spec.name, action="store_true", default=argparse.SUPPRESS,
                           help=_help(spec, cli))
        if not spec.name.startswith(("no_", "not_")):
            group.add_argument(f"--no_{spec.name}", dest=spec.name, action="store_false",
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return
    kwargs: dict[str, Any] = dict(dest=spec.name, type=_argparse_type(spec), default=argparse.SUPPRESS,
                                  help=_help(spec, cli))
    if spec.option.choices is not None:
        kwargs["choices"] = spec.option.choices
    if spec.option.nargs is not None:
        kwargs["nargs"] = spec.option.nargs
    if spec.option.const is not None:
        kwargs["const"] = spec.option.const
    group.add_argument(flag, *spec.option.aliases, **kwargs)


def build_parser(cli: str) -> StrictArgumentParser:
    """The parser of `cli` ('train', 'eval', 'generate'): one argument group per schema group. Defaults are
    not filled in by argparse (the namespace holds only what was given); `parse_args` adds them."""
    if cli not in CLIS:
        raise ValueError(f"cli must be one of {CLIS}, got {cli!r}")
    parser = StrictArgumentParser(section=cli, prog=f"{cli}.py", usage="%(prog)s [--flag value ...]",
                                  description=DESCRIPTIONS[cli], epilog=_EPILOG)
    groups: dict[str, Any] = {}
    for spec in options_of(cli):
        if spec.group not in groups:
            groups[spec.group] = parser.add_argument_group(GROUP_TITLES[spec.group])
        _add_option(groups[spec.group], spec, cli)
    return parser


def train_parser() -> StrictArgumentParser:
    """The flags of train.py (reference §1.2)."""
    return build_parser(TRAIN)


def eval_parser() -> StrictArgumentParser:
    """The flags of eval.py (reference §1.3)."""
    return build_parser(EVAL)


def generate_parser() -> StrictArgumentParser:
    """The flags of generate.py (ours; the reference has no generation)."""
    return build_parser(GENERATE)


# --------------------------------------------------------------------------------------------------------
# preset values: the same conversions as the command line


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "a mapping", list: "a list"}


def _convert_one(spec: Spec, kind: type, value: Any, where: str) -> Any:
    try:
        if spec.option.parse is not None or kind is dict:
            result = (spec.option.parse or parse_json_object)(value)
        elif isinstance(value, bool) or isinstance(value, (list, dict)):
            raise ValueError
        elif kind is int:
            if isinstance(value, float):
                raise ValueError
            result = int(value)
        else:
            result = kind(value)
    except ConversionError as exc:
        raise UserError(f"{where}: {exc}") from None
    except (TypeError, ValueError):
        raise UserError(f"{where}: expects {_TYPE_NAMES.get(kind, kind.__name__)}, got {value!r}") from None
    choices = spec.option.choices
    if choices is not None and result not in choices:
        names = [str(c) for c in choices]
        raise UserError(f"{where}: invalid choice {result!r} (choose from {', '.join(names)})"
                        f"{did_you_mean(str(result), names, quote=True)}")
    return result


def convert_preset_value(spec: Spec, value: Any, cli: str, where: str) -> Any:
    """A preset value checked and converted like the command line would."""
    if spec.kind is bool:
        if value is None and spec.nullable_for(cli):  # an automatic flag (cuda) left automatic
            return None
        if not isinstance(value, bool):
            raise UserError(f"{where}: expects true or false, got {value!r}")
        return value
    if value is None:
        if not spec.nullable_for(cli):
            raise UserError(f"{where}: needs a value (null is allowed only for flags whose default is null)")
        return None
    if spec.kind is list:
        items = value if isinstance(value, list) else [value]
        if not items and spec.option.nargs == "+":
            raise UserError(f"{where}: needs at least one value")
        return [_convert_one(spec, spec.item, item, where) for item in items]
    return _convert_one(spec, spec.kind, value, where)


def _preset_values(cli: str, raw: dict, where: str) -> dict:
    offered = {spec.name: spec for spec in options_of(cli)}
    out = {}
    for key, value in raw.items():
        spec = offered.get(key)
        if spec is None:
            raise UserError(f"{where}: unknown key {key!r}{did_you_mean(str(key), list(offered), quote=True)}")
        if not spec.option.preset:
            raise UserError(f"{where}: {key} cannot be set inside a preset; pass --{key} on the command line")
        out[key] = convert_preset_value(spec, value, cli, f"{where}: {key}")
    return out


def _preparse(argv: list[str], prog: str) -> tuple[str | None, str | None]:
    pre = StrictArgumentParser(prog=prog, add_help=False)
    pre.add_argument("--config", type=str, default=None)
    pre.add_argument("--config_file", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    return known.config, known.config_file


def _load_preset_values(cli: str, argv: list[str], prog: str) -> tuple[dict, str | None, str | None]:
    """(the preset's values, --config, the resolved --config_file) for `argv`."""
    if "config_file" not in {spec.name for spec in options_of(cli)}:
        return {}, None, None
    config, config_file = _preparse(argv, prog)
    if config_file is None:
        if config is not None:
            files = files_with_preset(config)
            hint = (f"; e.g. --config_file {files[0]} --config {config} (found in {', '.join(files)})"
                    if files else f"; the preset files are in {CONFIG_DIR}")
            raise UserError(f"--config {config} needs --config_file (the YAML file that defines it){hint}")
        return {}, config, None
    path = resolve_config_file(config_file)
    name = config or DEFAULT_PRESET
    raw = load_preset(path, name, cli)
    return _preset_values(cli, raw, where=f"{path} [{name}.{cli}]"), config, str(path)


# --------------------------------------------------------------------------------------------------------
# parsing, range checks, rules between options, derived values


def parse_args(parser: StrictArgumentParser, argv: Sequence[str] | None = None,
               section: str | None = None) -> Config:
    """Parse `argv` (default: sys.argv[1:]) on top of the preset's `section` (default: the parser's CLI), check
    every value and the rules between them, and return the frozen configuration."""
    cli = section or parser.section or TRAIN
    if cli not in CLIS:
        raise ValueError(f"section must be one of {CLIS}, got {cli!r}")
    argv = list(sys.argv[1:] if argv is None else argv)
    preset, config, config_file = _load_preset_values(cli, argv, parser.prog)
    given = vars(parser.parse_args(argv))
    values = {**preset, **given}
    if cli != GENERATE:  # generate.py has no presets
        values.update(config=config or DEFAULT_PRESET, config_file=config_file)
    check_ranges(values)
    cfg = Config.build(cli, values, given=frozenset(preset) | frozenset(given))
    warn_no_effect(cfg)
    return _RULES[cli](cfg)


def check_ranges(values: dict) -> None:
    """Every value within its option's declared range: one line naming the option, the value and the range."""
    for name, value in values.items():
        spec = schema.SPECS[name]
        if value is None or spec.kind is bool:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (int, float)) and out_of_range(spec, item):
                what = " (each value)" if isinstance(value, list) else ""
                finite = "a finite number " if spec.option.finite and not math.isfinite(item) else ""
                raise UserError(f"--{name}{what} must be {finite}{range_text(spec)}, got {item}")


def warn_no_effect(cfg: Config) -> None:
    """One warning line for each reference flag given that does nothing here, and for --multi_gpu dp."""
    for name in sorted(cfg.given):
        note = schema.SPECS[name].option.no_effect
        if note:
            LOG.warning(f"note: --{name} is ignored (no effect in this project): {note}")
    if cfg.cli == TRAIN and cfg.multi_gpu == "dp":
        LOG.warning("note: --multi_gpu dp: there is no DataParallel here; one process trains on one device. For "
                    "several GPUs start one process per GPU: torchrun --nproc_per_node N train.py ... (DDP)")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _check_common(cfg: Config) -> None:
    _require(not (cfg.fp16 and cfg.bf16), "--fp16 and --bf16 exclude each other; pick one")


def check_train(cfg: Config) -> Config:
    """The reference's train.py checks (§1.1.9) and the rules between options; resolves `d_embed`."""
    _check_common(cfg)
    cfg = check_large_batch(cfg)
    if cfg.mem_len == 0:
        _require(cfg.eval_tgt_len <= cfg.ext_len + cfg.tgt_len,
                 f"--eval_tgt_len ({cfg.eval_tgt_len}) must be <= --ext_len + --tgt_len "
                 f"({cfg.ext_len} + {cfg.tgt_len}) when --mem_len is 0")
    else:
        _require(cfg.eval_tgt_len <= cfg.mem_len + cfg.tgt_len,
                 f"--eval_tgt_len ({cfg.eval_tgt_len}) must be <= --mem_len + --tgt_len "
                 f"({cfg.mem_len} + {cfg.tgt_len})")
    _require(not (cfg.cuda_graphs and cfg.compile is False), "--cuda_graphs needs --compile; drop --no_compile")
    _require(not (cfg.cuda_graphs and cfg.batch_chunk > 1),
             "--cuda_graphs needs --batch_chunk 1 (a graph's buffers are reused by the next chunk)")
    _require(cfg.batch_size % cfg.batch_chunk == 0,
             f"--batch_size ({cfg.batch_size}) must be divisible by --batch_chunk ({cfg.batch_chunk})")
    if cfg.local_batch_size is not None:
        _require(cfg.local_batch_size % cfg.batch_chunk == 0,
                 f"--local_batch_size ({cfg.local_batch_size}) must be divisible by --batch_chunk "
                 f"({cfg.batch_chunk})")
    return cfg.replace(d_embed=cfg.d_model) if cfg.d_embed < 0 else cfg


def check_eval(cfg: Config) -> Config:
    """The reference's eval.py checks (§1.1.10); `--manual` forces batch size 1."""
    _check_common(cfg)
    if cfg.same_length and cfg.tgt_len > cfg.mem_len:
        LOG.warning("--same_length is intended for --tgt_len <= --mem_len (got tgt_len %d, mem_len %d)",
                    cfg.tgt_len, cfg.mem_len)
    return cfg.replace(batch_size=1) if cfg.manual else cfg


def check_generate(cfg: Config) -> Config:
    _check_common(cfg)
    _require((cfg.model is None) != (cfg.load_torchscript is None),
             "pass either --model CHECKPOINT or --load_torchscript FILE")
    _require(cfg.mem_len is None or cfg.mem_len >= 1, f"--mem_len must be >= 1, got {cfg.mem_len} (generation "
             "carries the memory from token to token)")
    return cfg


_RULES = {TRAIN: check_train, EVAL: check_eval, GENERATE: check_generate}


def eval_splits(cfg: Config) -> list[str]:
    """The dataset splits eval.py evaluates: `--split all` means valid, then test."""
    return ["valid", "test"] if cfg.split == "all" else [cfg.split]


def fill_from_checkpoint(cfg: Config, stored: dict | None, names: Sequence[str]) -> Config:
    """`cfg` with the options `names` taken from a checkpoint's stored configuration where the user did not
    set them (eval.py and generate.py score a model on the data it was trained on unless told otherwise)."""
    if not isinstance(stored, dict):
        return cfg
    changes = {n: stored[n] for n in names if n not in cfg.given and n in stored and stored[n] is not None}
    return cfg.replace(**changes) if changes else cfg


# --------------------------------------------------------------------------------------------------------
# the resolved configuration, written to the work dir


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def dump_config(cfg: Config, path: str | os.PathLike, section: str | None = None) -> Path:
    """Write the resolved options of `cfg` as a preset file with preset `default`, atomically.

    Derived values (`tied`), `--config`, `--config_file`, `--local_rank` and the flags that have no effect are
    left out, so `--config_file <path>` reproduces the run."""
    from utils.io.atomic import write_text_atomic

    section = section or cfg.cli
    if section not in SECTIONS:
        raise ValueError(f"section must be one of {SECTIONS}, got {section!r}")
    values = {key: _plain(value) for key, value in cfg.to_dict(dumped_only=True).items()}
    header = (f"# Resolved {section} configuration. Re-run with: "
              f"{section}.py --config_file <this file> (preset '{DEFAULT_PRESET}')\n")
    text = header + yaml.safe_dump({DEFAULT_PRESET: {section: values}}, sort_keys=True, default_flow_style=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return path
