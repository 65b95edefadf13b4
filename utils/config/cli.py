"""The flag schema of train.py and eval.py, YAML presets from configs/, strict parsing.

Flags keep the reference's names, types and defaults; the differences are listed in docs/configuration.md
and marked "ours" or "changed" in the help texts. A preset file maps preset names to `train` and `eval` sections:

    default:
      train: {n_layer: 16, lr: 0.01, ...}
      eval: {tgt_len: 64, mem_len: 640, ...}

`--config_file FILE --config NAME` (NAME defaults to `default`) loads `FILE[NAME][section]`. A value given on
the command line beats the preset, which beats the flag's default. Unlike the reference, everything is
checked: unknown flags, abbreviated flags, unknown preset keys, values of the wrong type or outside the
choices, missing presets or sections, and `--config` without `--config_file` are errors (UserError: one line,
exit 2, with a suggestion). Every on/off flag can be switched off on the command line with `--no_<name>`
(e.g. `--no_fp16` against a preset's `fp16: true`); flags already named `no_*` / `not_*` get no negation.

`dump_config(args, path, section)` writes the resolved configuration as a preset file (preset `default`), so
`--config_file <work_dir>/config.yaml` re-runs with the same settings.
"""
import argparse
import difflib
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml

from utils.io.errors import UserError
from utils.model.attention import ATTN_IMPLS

LOG = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
SECTIONS = ("train", "eval")
DEFAULT_PRESET = "default"
CONFIG_DUMP_NAME = "config.yaml"

DATASETS = ("wt103", "wt2", "ptb", "enwik8", "text8", "lm1b", "custom")
AFFINITY_MODES = ("socket", "single", "single_unique", "socket_unique_interleaved",
                  "socket_unique_continuous", "disabled")
OPTIMIZERS = ("adam", "sgd", "adagrad", "lamb", "jitlamb")
SCHEDULERS = ("cosine", "inv_sqrt", "dev_perf", "constant")
# keys of a preset that only make sense on the command line
_CLI_ONLY = ("config", "config_file")
# flags left out of a dumped configuration: how it was loaded, the per-process rank, an ignored flag
_NOT_DUMPED = _CLI_ONLY + ("local_rank", "apex_amp_opt_level")


# --------------------------------------------------------------------------------------------------------
# argparse with one-line errors and no abbreviations


class Settings(argparse.Namespace):
    """Parsed flags. Code that needs another value derives a new object with `replace` instead of assigning."""

    def replace(self, **changes: Any) -> "Settings":
        return Settings(**{**vars(self), **changes})

    def to_dict(self) -> dict:
        return dict(vars(self))


def _did_you_mean(word: str, candidates: Sequence[str], quote: bool = False) -> str:
    """'; did you mean X or Y?' for the closest candidates (prefix matches first), or ''."""
    prefixed = sorted((c for c in candidates if c.startswith(word) and c != word), key=len)
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    matches = list(dict.fromkeys(prefixed[:3] + close))[:3]
    if quote:
        matches = [repr(m) for m in matches]
    return f"; did you mean {' or '.join(matches)}?" if matches else ""


class StrictArgumentParser(argparse.ArgumentParser):
    """argparse without prefix abbreviations whose errors are UserErrors (one line, no usage dump) and
    which rejects unknown arguments, suggesting the closest flag."""

    def __init__(self, section: str | None = None, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(**kwargs)
        self.section = section  # the preset section this parser reads: 'train' or 'eval'

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
        return f"unknown flag {name}{note}{_did_you_mean(name, options)} (see {self.prog} --help)"


def _flag(group, name: str, help: str) -> None:
    """An on/off flag `--name`, plus `--no_name` (not listed in --help) to switch off a preset's true."""
    group.add_argument(f"--{name}", action="store_true", help=help)
    if not name.startswith(("no_", "not_")):
        group.add_argument(f"--no_{name}", dest=name, action="store_false", default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)


def _json_object(text: str) -> dict:
    """--manual_config: a JSON object (the model_config of a checkpoint)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expects a JSON object such as '{\"n_layer\": 16, ...}'")
    return value


def _amp_impl(value: str) -> str:
    """--amp: only torch.amp remains; apex is refused with a hint."""
    if value == "apex":
        raise argparse.ArgumentTypeError(
            "apex AMP is not supported (apex is unmaintained); use --amp pytorch (torch.amp), the default")
    return value


def _env_local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", 0))
    except ValueError:
        raise UserError(f"LOCAL_RANK={os.environ['LOCAL_RANK']!r} is not an integer") from None


_EPILOG = ("Every on/off flag --X also has --no_X to switch it off (e.g. against a preset's 'X: true'). "
           "Presets: --config_file FILE --config NAME; the command line overrides the preset.")


# --------------------------------------------------------------------------------------------------------
# flags shared by train.py and eval.py


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("config")
    group.add_argument("--config", type=str, default=DEFAULT_PRESET,
                       help="preset name in --config_file (needs --config_file)")
    group.add_argument("--config_file", type=str, default=None,
                       help="YAML preset file, e.g. configs/wt103_base.yaml (a bare name is also looked up "
                            "in configs/)")


def _add_run_flags(group, *, dllog_file: str) -> None:
    """Work dir, device, precision, logging, pass/fail targets."""
    group.add_argument("--work_dir", type=str, default="LM-TFM", help="directory for logs and checkpoints")
    _flag(group, "debug", "no experiment dir; logs go to /dev/null (train: no checkpoints, no final test)")
    _flag(group, "cuda", "run on CUDA (default: CUDA when a GPU is present; --no_cuda forces the CPU; "
                         "falls back to the CPU with a warning when there is no GPU)")
    group.set_defaults(cuda=None)  # None: automatic
    _flag(group, "fp16", "float16 mixed precision")
    _flag(group, "bf16", "bfloat16 mixed precision, no loss scaling (ours; exclusive with --fp16)")
    _flag(group, "tf32", "float32 matmuls on TF32 tensor cores (ours; default: on with CUDA, as in the "
                         "reference's container; --no_tf32 for full float32)")
    group.set_defaults(tf32=None)  # None: automatic
    group.add_argument("--attn_impl", type=str, default="auto", choices=("auto",) + ATTN_IMPLS,
                       help="attention kernel, same results (ours): math (matmuls + softmax), sdpa "
                            "(scaled_dot_product_attention, position term as a bias), flex (FlexAttention for "
                            "attn_type 0 with --compile and --dropatt 0; sdpa otherwise); auto: sdpa on CUDA, "
                            "math on the CPU")
    _flag(group, "log_all_ranks", "one log file per rank")
    group.add_argument("--dllog_file", type=str, default=dllog_file, help="name of the JSON log in work_dir")
    _flag(group, "no_env", "do not log the environment (versions, device; changed: one line, not collect_env)")
    group.add_argument("--log_interval", type=int, default=10, help="log every N steps")
    group.add_argument("--target_throughput", type=float, default=None,
                       help="exit 1 when the average throughput (tok/s) is below this")
    group.add_argument("--target_perplexity", type=float, default=None,
                       help="exit 1 when the perplexity is above this")
    group.add_argument("--affinity", type=str, default="disabled", choices=AFFINITY_MODES,
                       help="CPU affinity mode (changed: default disabled)")


def _add_data_flags(group) -> None:
    group.add_argument("--data", type=str, default="data/wikitext-103",
                       help="corpus directory (changed: relative to the repository root)")
    group.add_argument("--dataset", type=str, default="wt103", choices=DATASETS,
                       help="dataset (custom: any folder with train.txt, valid.txt, test.txt)")


def _add_length_flags(group, *, tgt_len: int, mem_len: int) -> None:
    group.add_argument("--tgt_len", type=int, default=tgt_len, help="number of tokens to predict per segment")
    group.add_argument("--ext_len", type=int, default=0, help="length of the extended context")
    group.add_argument("--mem_len", type=int, default=mem_len, help="length of the retained memory")
    group.add_argument("--clamp_len", type=int, default=-1, help="clamp relative distances above this (>0)")
    _flag(group, "same_length", "use the same attention length for all tokens")


def _add_process_flags(group) -> None:
    group.add_argument("--seed", type=int, default=1111, help="random seed")
    group.add_argument("--local_rank", "--local-rank", type=int, default=_env_local_rank(),
                       help="local device index (default: $LOCAL_RANK or 0)")
    group.add_argument("--dist_timeout", type=float, default=600.0,
                       help="seconds to wait for the other processes to join and for any collective; a peer that "
                            "never starts or dies then ends the job with an error instead of a hang (ours)")


# --------------------------------------------------------------------------------------------------------
# the two schemas


def _new_parser(section: str, description: str, group_title: str):
    """`{section}.py`'s parser with the config flags and, in a first group, the run flags; returns both."""
    parser = StrictArgumentParser(section=section, prog=f"{section}.py", description=description, epilog=_EPILOG)
    _add_config_flags(parser)
    group = parser.add_argument_group(group_title)
    _add_run_flags(group, dllog_file=f"{section}_log.json")
    return parser, group


def train_parser() -> StrictArgumentParser:
    """The flags of train.py (reference §1.2)."""
    parser, general = _new_parser("train", "Train a Transformer-XL language model.", "general setup")
    _flag(general, "append_dataset", "append the dataset name to work_dir")
    _flag(general, "append_time", "append a timestamp to work_dir")
    general.add_argument("--restart", type=str, default="",
                         help="checkpoint file or directory to resume from (a directory without "
                              "checkpoint_last.pt: a fresh start); 'auto': work_dir/checkpoint_last.pt when it "
                              "exists, else a fresh start (run.sub uses it after a requeue)")
    general.add_argument("--txtlog_file", type=str, default="train_log.log", help="name of the text log")
    _flag(general, "save_all", "also keep checkpoint_{step}.pt at every evaluation")
    _flag(general, "no_eval", "no periodic evaluation and no final test (checkpoints are still written every "
                             "--eval_interval steps)")
    _flag(general, "no_test", "skip the final test evaluation")
    general.add_argument("--apex_amp_opt_level", type=str, default="O2", choices=["O0", "O1", "O2", "O3"],
                         help="accepted for old command lines and ignored (apex is not used)")
    general.add_argument("--amp", type=_amp_impl, default="pytorch", choices=["pytorch"],
                         help="mixed-precision implementation (changed: only pytorch = torch.amp)")
    general.add_argument("--init_loss_scale", type=float, default=2.0 ** 16,
                         help="--fp16: the dynamic loss scale to start from (ours; torch.amp's default); halved "
                              "at each step with a non-finite gradient (the step is skipped), doubled after 2000 "
                              "steps without one")

    dataset = parser.add_argument_group("dataset setup")
    _add_data_flags(dataset)
    dataset.add_argument("--vocab", type=str, default="word", choices=["word", "bpe"], help="vocabulary type")
    dataset.add_argument("--custom_level", type=str, default="word", choices=["word", "char"],
                         help="--dataset custom: word or character tokens (ours)")
    _flag(dataset, "lower_case", "--dataset custom: lower-case the text (ours)")
    dataset.add_argument("--min_freq", type=int, default=0,
                         help="--dataset custom: drop words seen fewer times (they become <unk>) (ours)")
    dataset.add_argument("--max_vocab_size", type=int, default=None,
                         help="--dataset custom: keep the most frequent words only (others become <unk>) (ours)")
    dataset.add_argument("--bpe_model", type=str, default=None,
                         help="--vocab bpe: a tokenizer.json or a folder with vocab.json + merges.txt (ours; "
                              "default: train a BPE on train.txt)")
    dataset.add_argument("--bpe_vocab_size", type=int, default=None,
                         help="--vocab bpe: size of the BPE trained on train.txt (ours; default 32000)")
    dataset.add_argument("--cache_dir", type=str, default=None,
                         help="folder for the encoded-corpus cache (ours; default: inside --data, or "
                              "~/.cache/transformer-xl when --data is read-only)")

    model = parser.add_argument_group("model setup")
    model.add_argument("--n_layer", type=int, default=16, help="number of layers")
    model.add_argument("--n_head", type=int, default=8, help="number of heads")
    model.add_argument("--d_head", type=int, default=64, help="head dimension")
    model.add_argument("--d_embed", type=int, default=-1, help="embedding dimension (-1: d_model)")
    model.add_argument("--d_model", type=int, default=512, help="model dimension")
    model.add_argument("--d_inner", type=int, default=2048, help="inner dimension of the feed-forward layer")
    model.add_argument("--dropout", type=float, default=0.1, help="global dropout rate")
    model.add_argument("--dropatt", type=float, default=0.0, help="attention probability dropout rate")
    _flag(model, "pre_lnorm", "apply LayerNorm to the input instead of the output")
    model.add_argument("--attn_type", type=int, default=0,
                       help="attention type: 0 Transformer-XL, 1 Shaw et al., 2 Vaswani et al., 3 Al-Rfou et al.")
    _flag(model, "not_tied", "do not tie the word embedding and softmax weights")
    _flag(model, "adaptive", "use adaptive softmax and adaptive input")
    model.add_argument("--div_val", type=int, default=1, help="dimension divisor of the adaptive clusters")
    model.add_argument("--sample_softmax", type=int, default=-1, help="number of samples in sampled softmax")
    model.add_argument("--init", type=str, default="normal", choices=["normal", "uniform"],
                       help="parameter initializer (changed: other values are rejected, not skipped)")
    model.add_argument("--emb_init", type=str, default="normal", help="unused, kept for old command lines")
    model.add_argument("--init_range", type=float, default=0.1, help="U(-init_range, init_range) for uniform")
    model.add_argument("--emb_init_range", type=float, default=0.01, help="unused, kept for old command lines")
    model.add_argument("--init_std", type=float, default=0.02, help="std of the normal initializer")
    model.add_argument("--proj_init_std", type=float, default=0.01, help="std of the projection initializer")

    optim = parser.add_argument_group("optimizer setup")
    optim.add_argument("--optim", type=str, default="jitlamb", choices=OPTIMIZERS,
                       help="optimizer (jitlamb: multi-tensor LAMB, lamb: per-tensor LAMB)")
    optim.add_argument("--lr", type=float, default=0.01, help="initial learning rate")
    optim.add_argument("--mom", type=float, default=0.0, help="SGD momentum")
    optim.add_argument("--scheduler", type=str, default="cosine", choices=SCHEDULERS, help="LR schedule")
    optim.add_argument("--max_step_scheduler", type=int, default=None,
                       help="cosine horizon (default: --max_step)")
    optim.add_argument("--warmup_step", type=int, default=1000, help="linear warm-up steps")
    optim.add_argument("--decay_rate", type=float, default=0.5, help="LR decay factor of dev_perf")
    optim.add_argument("--lr_min", type=float, default=0.0, help="minimum LR of dev_perf")
    optim.add_argument("--clip", type=float, default=0.25, help="gradient norm clipping")
    optim.add_argument("--weight_decay", type=float, default=0.0, help="weight decay (adam, lamb, jitlamb)")
    _flag(optim, "clip_nonemb", "unused, kept for old command lines")
    optim.add_argument("--patience", type=int, default=0, help="evaluations without improvement (dev_perf)")
    optim.add_argument("--eta_min", type=float, default=0.001, help="minimum LR of the cosine schedule")

    training = parser.add_argument_group("training setup")
    training.add_argument("--max_step", type=int, default=40000, help="number of optimizer steps")
    training.add_argument("--batch_size", type=int, default=256, help="global batch size")
    training.add_argument("--local_batch_size", type=int, default=None,
                          help="batch size per process (overrides --batch_size = world size x this)")
    training.add_argument("--batch_chunk", type=int, default=1,
                          help="split each batch into this many gradient-accumulation chunks")
    _flag(training, "roll", "rotate each stream randomly at every epoch")
    _add_length_flags(training, tgt_len=192, mem_len=192)
    _add_process_flags(training)
    training.add_argument("--multi_gpu", type=str, default=None, nargs="?", const="ddp",
                          choices=["ddp", "dp", "fsdp"],
                          help="multi-GPU mode (changed: a bare --multi_gpu means ddp)")
    training.add_argument("--gpu0_bsz", type=int, default=-1, help="batch size on GPU 0 (dp only)")
    _flag(training, "varlen", "variable-length segments")
    _flag(training, "swap_mem", "keep the memory on the CPU between chunks")

    speed = parser.add_argument_group("speed and memory (ours)")
    _flag(speed, "compile", "torch.compile the model and the jitlamb step (default: on with CUDA, off on the "
                            "CPU; --no_compile to switch off)")
    speed.set_defaults(compile=None)  # None: automatic
    _flag(speed, "cuda_graphs", "replay the compiled step as CUDA graphs (torch.compile mode reduce-overhead; "
                                "needs --compile, a GPU and --batch_chunk 1)")
    _flag(speed, "checkpoint_activations", "recompute each layer's activations in the backward pass instead of "
                                           "keeping them (less memory, ~1/3 more compute)")

    valid = parser.add_argument_group("validation setup")
    valid.add_argument("--eval_tgt_len", type=int, default=192, help="segment length for evaluation")
    valid.add_argument("--eval_batch_size", type=int, default=16, help="global batch size for evaluation")
    valid.add_argument("--eval_max_steps", type=int, default=-1, help="at most this many eval batches (-1: all)")
    valid.add_argument("--eval_interval", type=int, default=5000, help="evaluate every N steps")
    return parser


def eval_parser() -> StrictArgumentParser:
    """The flags of eval.py (reference §1.3)."""
    parser, group = _new_parser("eval", "Evaluate a Transformer-XL language model.", "evaluation")
    _add_data_flags(group)
    group.add_argument("--manual", type=str, default=None, nargs="+",
                       help="evaluate these words instead of a dataset split (batch size 1)")
    group.add_argument("--split", type=str, default="all", choices=["all", "valid", "test"],
                       help="split to evaluate (all: valid, then test)")
    group.add_argument("--type", type=str, default="pytorch", choices=["pytorch", "torchscript", "compile"],
                       help="model runtime: eager, TorchScript, or torch.compile (changed: compile added)")
    group.add_argument("--compile_mode", type=str, default="default",
                       choices=["default", "reduce-overhead", "max-autotune"],
                       help="torch.compile mode with --type compile (ours; reduce-overhead uses CUDA graphs)")
    group.add_argument("--batch_size", type=int, default=16, help="global batch size")
    _add_length_flags(group, tgt_len=64, mem_len=640)
    _add_process_flags(group)
    group.add_argument("--model", type=str, default="", help="checkpoint (default: work_dir/checkpoint_best.pt)")
    group.add_argument("--manual_config", type=_json_object, default=None,
                       help="model_config as JSON: build the model from it (random weights)")
    group.add_argument("--manual_vocab", type=str, default="word", choices=["word", "bpe"],
                       help="vocabulary type with --manual_config")
    _flag(group, "save_data", "save latency and throughput samples and print percentiles")
    group.add_argument("--repeat", type=int, default=1, help="evaluate the data this many times")
    group.add_argument("--max_size", type=int, default=None, help="at most this many batches per pass")
    group.add_argument("--percentiles", type=int, default=[90, 95, 99], nargs="+",
                       help="latency percentiles to report (changed: parsed as integers)")
    group.add_argument("--save_torchscript", type=str, default=None, help="save the TorchScript model here")
    group.add_argument("--load_torchscript", type=str, default=None, help="load a TorchScript model")
    return parser


def generate_parser() -> StrictArgumentParser:
    """The flags of generate.py (ours; the reference has no generation). Lengths default to the model's."""
    parser = StrictArgumentParser(prog="generate.py", description="Sample text from a Transformer-XL language "
                                  "model, carrying the memory from token to token.")
    model = parser.add_argument_group("model")
    model.add_argument("--model", type=str, default=None, help="checkpoint (ours or the reference's)")
    model.add_argument("--load_torchscript", type=str, default=None,
                       help="a TorchScript file written by eval.py --save_torchscript (instead of --model)")
    model.add_argument("--dataset", type=str, default=None, choices=DATASETS,
                       help="how to read and write text (default: the dataset the model was trained on)")
    model.add_argument("--tgt_len", type=int, default=None, help="segment length for feeding the prompt")
    model.add_argument("--mem_len", type=int, default=None, help="memory length (tokens each token can see)")
    model.add_argument("--clamp_len", type=int, default=None, help="clamp relative distances above this (>0)")
    model.add_argument("--same_length", action="store_true", default=None,
                       help="every prompt token sees mem_len tokens before it (default: the model's setting)")
    model.add_argument("--no_same_length", dest="same_length", action="store_false", help=argparse.SUPPRESS)
    _flag(model, "cuda", "run on CUDA (default: CUDA when a GPU is present; --no_cuda forces the CPU)")
    model.set_defaults(cuda=None)
    _flag(model, "fp16", "float16 model")
    _flag(model, "bf16", "bfloat16 model")
    text = parser.add_argument_group("text")
    text.add_argument("--prompt", type=str, default="", help="text to continue (default: the start of a line)")
    text.add_argument("--prompt_file", type=str, default=None, help="read the prompt from this file")
    text.add_argument("--num_tokens", type=int, default=100, help="tokens to generate per sample")
    text.add_argument("--num_samples", type=int, default=1, help="independent samples (one batch)")
    text.add_argument("--temperature", type=float, default=1.0, help="divides the logits (0: most likely token)")
    text.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    text.add_argument("--top_p", type=float, default=1.0,
                      help="sample among the most likely tokens that together have this probability (1: all)")
    text.add_argument("--seed", type=int, default=1111, help="random seed (same seed, same text)")
    text.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return parser


# --------------------------------------------------------------------------------------------------------
# preset files


def resolve_config_file(name: str | os.PathLike) -> Path:
    """The preset file: the path as given, else the same name in configs/ (old command lines passed
    `--config_file wt103_base.yaml` from the reference's pytorch/ directory)."""
    path = Path(name)
    if path.is_file():
        return path
    if not path.is_absolute():
        for candidate in (CONFIG_DIR / path, CONFIG_DIR / path.name):
            if candidate.is_file():
                return candidate
    shipped = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
    raise UserError(f"config file {name} not found; the shipped preset files are in {CONFIG_DIR}: {shipped}")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)  # merge keys (<<) as in the reference; a repeated << key: the later wins
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must map preset names to 'train' / 'eval' sections")
    return data


def load_presets(path: str | os.PathLike) -> dict[str, dict]:
    """The presets of a file: its top-level entries that have a 'train' and/or 'eval' section (the others,
    e.g. the anchors `wt103`, `train`, `eval`, are building blocks, not presets)."""
    path = Path(path)
    presets = {}
    for name, value in _read_yaml(path).items():
        if isinstance(value, dict) and any(key in SECTIONS for key in value):
            other = [str(key) for key in value if key not in SECTIONS]
            if other:
                raise UserError(f"preset {name!r} in {path} has unknown section(s) {', '.join(other)}; "
                                "a preset holds only 'train' and 'eval'")
            presets[str(name)] = value
    return presets


def load_preset(path: str | os.PathLike, name: str, section: str) -> dict:
    """The raw `section` mapping of preset `name` in `path`, with clear errors when it is not there."""
    path = Path(path)
    presets = load_presets(path)
    names = list(presets)
    if name not in presets:
        if name in {str(key) for key in _read_yaml(path)}:
            raise UserError(f"{name!r} in {path} is not a preset (it has no 'train' or 'eval' section); "
                            f"available presets: {', '.join(names)}")
        raise UserError(f"preset {name!r} not found in {path} (available presets: {', '.join(names)})"
                        f"{_did_you_mean(name, names, quote=True)}")
    if section not in presets[name]:
        having = [n for n in names if section in presets[n]]
        raise UserError(f"preset {name!r} in {path} has no {section!r} section (it is for "
                        f"{' and '.join(presets[name])} only); presets with one: {', '.join(having)}")
    values = presets[name][section]
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path} [{name}.{section}] must be a mapping of flag names to values")
    return values


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The first action of each flag (the on-form of on/off flags)."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            actions.setdefault(action.dest, action)
    return actions


def _type_name(action: argparse.Action) -> str:
    kind = action.type or str
    return {int: "an integer", float: "a number", str: "a string"}.get(kind, "a value for " + action.dest)


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """A preset value converted like the command line would (type, then choices)."""
    kind = action.type or str
    try:
        if isinstance(value, bool) or (isinstance(value, (list, dict)) and kind in (int, float, str)):
            raise ValueError
        if kind is int:
            if isinstance(value, float):
                raise ValueError
            result = int(value)
        elif kind in (float, str):
            result = kind(value)
        elif isinstance(value, str):
            result = kind(value)
        elif kind is _json_object and isinstance(value, dict):  # manual_config written as a YAML mapping
            result = value
        else:
            raise ValueError
    except argparse.ArgumentTypeError as exc:
        raise UserError(f"{where}: {exc}") from None
    except (TypeError, ValueError):
        raise UserError(f"{where}: expects {_type_name(action)}, got {value!r}") from None
    if action.choices is not None and result not in action.choices:
        choices = [str(c) for c in action.choices]
        raise UserError(f"{where}: invalid choice {result!r} (choose from {', '.join(choices)})"
                        f"{_did_you_mean(str(result), choices, quote=True)}")
    return result


def _coerce_preset(parser: argparse.ArgumentParser, values: dict, where: str) -> dict:
    """Check every key of a preset section against the flags and convert its value."""
    actions = _actions_by_dest(parser)
    out = {}
    for key, value in values.items():
        here = f"{where}: {key}"
        if key in _CLI_ONLY:
            raise UserError(f"{here} cannot be set inside a preset; pass --{key} on the command line")
        if key not in actions:
            raise UserError(f"{where}: unknown key {key!r}{_did_you_mean(str(key), list(actions), quote=True)}")
        action = actions[key]
        if action.nargs == 0:  # on/off flag
            if value is None and action.default is None:  # an automatic flag (cuda) left automatic
                out[key] = None
                continue
            if not isinstance(value, bool):
                raise UserError(f"{here}: expects true or false, got {value!r}")
            out[key] = value
        elif value is None:
            if action.default is not None:
                raise UserError(f"{here}: needs a value (null is allowed only for flags whose default is null)")
            out[key] = None
        elif action.nargs in ("+", "*"):
            items = value if isinstance(value, list) else [value]
            if not items and action.nargs == "+":
                raise UserError(f"{here}: needs at least one value")
            out[key] = [_convert(action, item, here) for item in items]
        else:
            out[key] = _convert(action, value, here)
    return out


def _preparse(argv: list[str], prog: str) -> tuple[str | None, str | None]:
    pre = StrictArgumentParser(prog=prog, add_help=False)
    pre.add_argument("--config", type=str, default=None)
    pre.add_argument("--config_file", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    return known.config, known.config_file


def _files_with_preset(name: str) -> list[str]:
    found = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        try:
            if name in load_presets(path):
                found.append(str(path.relative_to(REPO_ROOT)))
        except UserError:
            continue
    return found


# --------------------------------------------------------------------------------------------------------
# parsing, checks, derived values


def parse_args(parser: StrictArgumentParser, argv: Sequence[str] | None = None,
               section: str | None = None) -> argparse.Namespace:
    """Parse `argv` (default: sys.argv[1:]) with `parser` on top of the preset's `section` (default: the
    parser's own, 'train' for train_parser(), 'eval' for eval_parser()), then run the checks of `section`
    (train: §1.1.9, eval: §1.1.10) and fill in derived values."""
    section = section or getattr(parser, "section", None) or "train"
    if section not in SECTIONS:
        raise ValueError(f"section must be one of {SECTIONS}, got {section!r}")
    argv = list(sys.argv[1:] if argv is None else argv)
    config, config_file = _preparse(argv, parser.prog)
    preset: dict = {}
    resolved_file = None
    if config_file is None:
        if config is not None:
            files = _files_with_preset(config)
            hint = (f"; e.g. --config_file {files[0]} --config {config} (found in {', '.join(files)})"
                    if files else f"; the preset files are in {CONFIG_DIR}")
            raise UserError(f"--config {config} needs --config_file (the YAML file that defines it){hint}")
    else:
        resolved_file = resolve_config_file(config_file)
        name = config or DEFAULT_PRESET
        raw = load_preset(resolved_file, name, section)
        preset = _coerce_preset(parser, raw, where=f"{resolved_file} [{name}.{section}]")

    args = parser.parse_args(argv, namespace=Settings(**preset))
    args.config = config or DEFAULT_PRESET
    args.config_file = None if resolved_file is None else str(resolved_file)

    if section == "train":
        given = "apex_amp_opt_level" in preset or any(
            a == "--apex_amp_opt_level" or a.startswith("--apex_amp_opt_level=") for a in argv)
        if given:
            LOG.warning("note: --apex_amp_opt_level is ignored; mixed precision uses torch.amp (--amp pytorch)")
        check_train_args(args)
    else:
        check_eval_args(args)
    return args


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _check_at_least(args: argparse.Namespace, minimum: int, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None:
            _require(value >= minimum, f"--{name} must be >= {minimum}, got {value}")


def _check_common(args: argparse.Namespace) -> None:
    _require(not (args.fp16 and args.bf16), "--fp16 and --bf16 exclude each other; pick one")
    _require(args.ext_len >= 0, f"--ext_len must be >= 0, got {args.ext_len}")
    _check_at_least(args, 0, ["mem_len"])
    _check_at_least(args, 1, ["tgt_len", "batch_size", "log_interval"])


def check_train_args(args: argparse.Namespace) -> None:
    """The reference's train.py checks (§1.1.9) plus positivity checks; sets `tied` and resolves `d_embed`."""
    _check_common(args)
    _check_at_least(args, 1, ["eval_tgt_len", "eval_batch_size", "batch_chunk", "local_batch_size",
                              "max_step", "max_step_scheduler", "eval_interval", "n_layer", "n_head",
                              "d_head", "d_model", "d_inner"])
    _check_at_least(args, 0, ["warmup_step"])
    if args.mem_len == 0:
        _require(args.eval_tgt_len <= args.ext_len + args.tgt_len,
                 f"--eval_tgt_len ({args.eval_tgt_len}) must be <= --ext_len + --tgt_len "
                 f"({args.ext_len} + {args.tgt_len}) when --mem_len is 0")
    else:
        _require(args.eval_tgt_len <= args.mem_len + args.tgt_len,
                 f"--eval_tgt_len ({args.eval_tgt_len}) must be <= --mem_len + --tgt_len "
                 f"({args.mem_len} + {args.tgt_len})")
    _require(args.init_loss_scale > 0 and math.isfinite(args.init_loss_scale),
             f"--init_loss_scale must be a positive number, got {args.init_loss_scale}")
    _require(not (args.cuda_graphs and args.compile is False), "--cuda_graphs needs --compile; drop --no_compile")
    _require(not (args.cuda_graphs and args.batch_chunk > 1),
             "--cuda_graphs needs --batch_chunk 1 (a graph's buffers are reused by the next chunk)")
    _require(args.batch_size % args.batch_chunk == 0,
             f"--batch_size ({args.batch_size}) must be divisible by --batch_chunk ({args.batch_chunk})")
    if args.local_batch_size is not None:
        _require(args.local_batch_size % args.batch_chunk == 0,
                 f"--local_batch_size ({args.local_batch_size}) must be divisible by --batch_chunk "
                 f"({args.batch_chunk})")
    args.tied = not args.not_tied
    if args.d_embed < 0:
        args.d_embed = args.d_model


def check_eval_args(args: argparse.Namespace) -> None:
    """The reference's eval.py checks (§1.1.10) plus positivity checks; `--manual` forces batch size 1."""
    _check_common(args)
    _check_at_least(args, 1, ["repeat", "max_size"])
    bad = [p for p in args.percentiles if not 0 <= p <= 100]
    _require(not bad, f"--percentiles must be within 0..100, got {bad}")
    if args.manual:
        args.batch_size = 1
    if args.same_length and args.tgt_len > args.mem_len:
        LOG.warning("--same_length is intended for --tgt_len <= --mem_len (got tgt_len %d, mem_len %d)",
                    args.tgt_len, args.mem_len)


def eval_splits(args: argparse.Namespace) -> list[str]:
    """The dataset splits eval.py evaluates: `--split all` means valid, then test."""
    return ["valid", "test"] if args.split == "all" else [args.split]


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


def dump_config(args: argparse.Namespace, path: str | os.PathLike, section: str = "train") -> Path:
    """Write the resolved flags of `args` as a preset file with preset `default`, atomically.

    Derived values that are not flags (e.g. `tied`), `--config`, `--config_file`, `--local_rank` and the
    ignored `--apex_amp_opt_level` are left out, so `--config_file <path>` reproduces the run."""
    if section not in SECTIONS:
        raise ValueError(f"section must be one of {SECTIONS}, got {section!r}")
    parser = train_parser() if section == "train" else eval_parser()
    flags = set(_actions_by_dest(parser)) - set(_NOT_DUMPED)
    values = {key: _plain(value) for key, value in vars(args).items() if key in flags}
    header = (f"# Resolved {section} configuration. Re-run with: "
              f"{parser.prog} --config_file <this file> (preset '{DEFAULT_PRESET}')\n")
    text = header + yaml.safe_dump({DEFAULT_PRESET: {section: values}}, sort_keys=True, default_flow_style=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
