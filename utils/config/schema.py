"""The configuration schema of train.py, eval.py and generate.py: every option declared once.

Options are fields of frozen dataclasses grouped the way a user thinks of them (model, data, optimization
and schedule, run, distributed, precision and speed, and the options of eval.py and generate.py alone).
Each field carries an `Option` in its metadata: help text, the CLIs that offer it, its valid range or
choices, and a default per CLI where the CLIs differ (eval.py's reference defaults: tgt_len 64, mem_len 640,
batch_size 16). The command-line parsers, the preset checks, the range checks and the dumped configuration
are all generated from these declarations (utils/config/cli.py).

A resolved configuration is a `Config`: frozen groups (`cfg.architecture.n_layer`), read flat as well (`cfg.n_layer`,
every option name is unique), changed only by deriving a new one (`cfg.replace(batch_size=64)`).
"""
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from utils.data.datasets import DATASETS
from utils.io.errors import UserError

TRAIN, EVAL, GENERATE = "train", "eval", "generate"
CLIS = (TRAIN, EVAL, GENERATE)
ALL = CLIS
TRAIN_EVAL = (TRAIN, EVAL)

OPTIMIZERS = ("adam", "sgd", "adagrad", "lamb", "jitlamb")
SCHEDULERS = ("cosine", "inv_sqrt", "dev_perf", "constant", "linear")
LR_SCALING_RULES = ("none", "linear", "sqrt")
DDP_COMM_HOOKS = ("none", "fp16", "bf16")
AFFINITY_MODES = ("socket", "single", "single_unique", "socket_unique_interleaved",
                  "socket_unique_continuous", "disabled")


@dataclass(frozen=True)
class Option:
    """What the schema knows about one option besides its name, type and default."""
    help: str
    clis: tuple = (TRAIN,)
    choices: Optional[tuple] = None
    low: Optional[float] = None          # valid range: low <= value (low < value with low_open)
    high: Optional[float] = None         # value <= high (value < high with high_open)
    low_open: bool = False
    high_open: bool = False
    finite: bool = True                  # floats: nan and inf are out of range
    special: tuple = ()                  # values allowed outside the range (e.g. -1 for "automatic")
    cli_defaults: dict = field(default_factory=dict)  # {cli: default} where a CLI differs from the field's
    parse: Optional[Callable[[str], Any]] = None      # text -> value where the type alone does not say how
    nargs: Optional[str] = None
    const: Any = None                    # the value of a bare `--flag` with nargs "?"
    aliases: tuple = ()
    no_effect: Optional[str] = None      # accepted for the reference's command lines: what replaces it
    default_from: Optional[Callable[[], Any]] = None  # a default read when parsing (e.g. from the environment)
    preset: bool = True                  # False: command line only (--config, --config_file)
    dumped: bool = True                  # written to config.yaml and the checkpoint


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A schema field: `default` for every CLI unless `cli_defaults` says otherwise."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"option": Option(help, **kwargs)})
    return field(default=default, metadata={"option": Option(help, **kwargs)})


# ---- conversions the type alone does not give ----------------------------------------------------------------

class ConversionError(ValueError):
    """A value that cannot be read as the option's type (the message says why)."""


def parse_json_object(text: Any) -> dict:
    """--manual_config: a JSON object (a checkpoint's model_config); a YAML mapping is taken as is."""
    import json
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConversionError("expects a JSON object such as '{\"n_layer\": 16, ...}'")
    return value


def parse_amp(text: Any) -> str:
    """--amp: only torch.amp remains; apex is refused with a hint."""
    if text == "apex":
        raise ConversionError("apex AMP is not supported (apex is unmaintained); use --amp pytorch (torch.amp), "
                              "the default")
    return str(text)


def parse_clip(text: Any) -> float:
    """--clip: a positive number, or 'off' (no clipping; the gradient norm is still measured and logged)."""
    if isinstance(text, str) and text.strip().lower() == "off":
        return math.inf
    if isinstance(text, bool):
        raise ConversionError(f"expects a number or 'off', got {text!r}")
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ConversionError(f"expects a number or 'off', got {text!r}") from None


def parse_mem_len_sweep(text: Any) -> str:
    """--mem_len_sweep: memory lengths separated by commas ("0,32,160,640"), each >= 0; kept as that text."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise ConversionError(f"expects memory lengths separated by commas such as 0,32,160,640, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise ConversionError(f"expects one or more memory lengths >= 0 separated by commas, got {text!r}")
    return ",".join(str(v) for v in values)


def parse_batch_schedule(text: Any) -> str:
    """--batch_schedule: "STEP:BATCH,STEP:BATCH,..." (steps increasing from 0, batches >= 1), kept as text."""
    from utils.training.batch_schedule import parse_schedule   # the one reader of the format
    try:
        return ",".join(f"{step}:{batch}" for step, batch in parse_schedule(str(text)))
    except ValueError as exc:
        raise ConversionError(str(exc)) from None


def env_local_rank() -> int:
    """--local_rank's default: $LOCAL_RANK (set by torchrun), else 0."""
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"LOCAL_RANK={value!r} is not an integer") from None


# ---- the groups ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    """The network (train.py) and the lengths it runs with (all CLIs; eval.py and generate.py can change them)."""
    n_layer: int = opt(16, "number of layers", low=1)
    n_head: int = opt(8, "number of heads", low=1)
    d_head: int = opt(64, "head dimension", low=1)
    d_embed: int = opt(-1, "embedding dimension (-1: d_model)", low=1, special=(-1,))
    d_model: int = opt(512, "model dimension", low=1)
    d_inner: int = opt(2048, "inner dimension of the feed-forward layer", low=1)
    dropout: float = opt(0.1, "global dropout rate", low=0, high=1, high_open=True)
    dropatt: float = opt(0.0, "attention probability dropout rate", low=0, high=1, high_open=True)
    pre_lnorm: bool = opt(False, "apply LayerNorm to the input instead of the output")
    attn_type: int = opt(0, "attention type: 0 Transformer-XL, 1 Shaw et al., 2 Vaswani et al., 3 Al-Rfou et al.",
                         choices=(0, 1, 2, 3))
    not_tied: bool = opt(False, "do not tie the word embedding and softmax weights")
    adaptive: bool = opt(False, "use adaptive softmax and adaptive input")
    div_val: int = opt(1, "dimension divisor of the adaptive clusters", low=1)
    sample_softmax: int = opt(-1, "number of samples in sampled softmax (-1: off)", low=0, special=(-1,))
    init: str = opt("normal", "parameter initializer (changed: other values are rejected, not skipped)",
                    choices=("normal", "uniform"))
    emb_init: str = opt("normal", "unused by the reference too", no_effect="embeddings use --init and --init_std")
    init_range: float = opt(0.1, "U(-init_range, init_range) for --init uniform", low=0, low_open=True)
    emb_init_range: float = opt(0.01, "unused by the reference too", no_effect="embeddings use --init_range")
    init_std: float = opt(0.02, "std of the normal initializer", low=0, low_open=True)
    proj_init_std: float = opt(0.01, "std of the projection initializer", low=0, low_open=True)
    tgt_len: int = opt(192, "number of tokens to predict per segment", clis=ALL, low=1,
                       cli_defaults={EVAL: 64, GENERATE: None})
    ext_len: int = opt(0, "length of the extended context", clis=TRAIN_EVAL, low=0)
    mem_len: int = opt(192, "length of the retained memory", clis=ALL, low=0, cli_defaults={EVAL: 640, GENERATE: None})
    clamp_len: int = opt(-1, "clamp relative distances above this (> 0; -1: no clamping)", clis=ALL, low=-1,
                         cli_defaults={GENERATE: None})
    same_length: bool = opt(False, "use the same attention length for all tokens", clis=ALL,
                            cli_defaults={GENERATE: None})

    @property
    def tied(self) -> bool:
        return not self.not_tied


@dataclass(frozen=True)
class DataConfig:
    """The corpus and its vocabulary."""
    data: str = opt("data/wikitext-103", "corpus directory (changed: relative to the repository root)", clis=TRAIN_EVAL)
    dataset: str = opt("wt103", "dataset (custom: any folder with train.txt, valid.txt, test.txt; prepared: a folder written by "
                       "scripts/prepare_corpus.py); generate.py: "
                       "how to read and write text", clis=ALL, choices=DATASETS, cli_defaults={GENERATE: None})
    vocab: str = opt("word", "vocabulary type", choices=("word", "bpe"))
    custom_level: str = opt("word", "--dataset custom: word or character tokens (ours)", choices=("word", "char"))
    lower_case: bool = opt(False, "--dataset custom: lower-case the text (ours)")
    min_freq: int = opt(0, "--dataset custom: drop words seen fewer times (they become <unk>) (ours)", low=0)
    max_vocab_size: Optional[int] = opt(None, "--dataset custom: keep the most frequent words only (ours)", low=1)
    bpe_model: Optional[str] = opt(None, "--vocab bpe: a tokenizer.json or a folder with vocab.json + merges.txt "
                                   "(ours; default: train a BPE on train.txt)")
    bpe_vocab_size: Optional[int] = opt(None, "--vocab bpe: size of the BPE trained on train.txt (ours; default "
                                        "32000)", low=1)
    cache_dir: Optional[str] = opt(None, "folder for the encoded-corpus cache (ours; default: inside --data, or "
                                   "~/.cache/transformer-xl when --data is read-only)")
    roll: bool = opt(False, "rotate each stream randomly at every epoch")
    varlen: bool = opt(False, "variable-length segments")
    varlen_buckets: list[int] = opt([], "--varlen with --compile: segment lengths to pad to, one compiled graph "
                                    "each (ours; default: multiples of 8 around --tgt_len and one for the short "
                                    "segments; see docs/gpu_step.md)", nargs="*", low=1)
    reset_mems_at_doc: bool = opt(False, "--dataset prepared: a token attends only to its own article; the memory "
                                  "of an article that ended is not seen by the next one in its batch column (ours)",
                                  clis=TRAIN_EVAL)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer, learning-rate schedule, steps and batch."""
    optim: str = opt("jitlamb", "optimizer (jitlamb: multi-tensor LAMB, lamb: per-tensor LAMB)", choices=OPTIMIZERS)
    lr: float = opt(0.01, "initial learning rate", low=0, low_open=True)
    mom: float = opt(0.0, "SGD momentum", low=0)
    scheduler: str = opt("cosine", "LR schedule", choices=SCHEDULERS)
    max_step_scheduler: Optional[int] = opt(None, "cosine horizon (default: --max_step)", low=1)
    warmup_step: int = opt(1000, "linear warm-up steps", low=0)
    decay_rate: float = opt(0.5, "LR decay factor of dev_perf", low=0, high=1, low_open=True, high_open=True)
    lr_min: float = opt(0.0, "minimum LR of dev_perf; the LR the linear schedule decays to", low=0)
    clip: float = opt(0.25, "gradient norm clipping (> 0; 'off': no clipping)", low=0, low_open=True,
                      finite=False, parse=parse_clip)
    clip_nonemb: bool = opt(False, "unused by the reference too", no_effect="--clip applies to all parameters")
    weight_decay: float = opt(0.0, "weight decay (adam, lamb, jitlamb)", low=0)
    patience: int = opt(0, "evaluations without improvement (dev_perf)", low=0)
    eta_min: float = opt(0.001, "minimum LR of the cosine schedule", low=0)
    max_step: int = opt(40000, "number of optimizer steps", low=1)
    batch_size: int = opt(256, "global batch size", clis=TRAIN_EVAL, low=1, cli_defaults={EVAL: 16})
    local_batch_size: Optional[int] = opt(None, "batch size per process (overrides --batch_size = world size x this)",
                                          low=1)
    batch_chunk: int = opt(1, "split each batch into this many gradient-accumulation chunks", low=1)
    # large-batch training (README "Moving a recipe to more GPUs")
    lr_scaling: str = opt("none", "scale --lr with the global batch: linear (lr x batch / --base_batch_size) or "
                          "sqrt (lr x sqrt(batch / --base_batch_size)); none: --lr as given", choices=LR_SCALING_RULES)
    base_batch_size: Optional[int] = opt(None, "the global batch (sequences) --lr is given for (needs --lr_scaling)",
                                         low=1)
    warmup_tokens: Optional[int] = opt(None, "linear warm-up in training tokens instead of --warmup_step (every "
                                       "schedule then counts tokens)", low=0)
    max_tokens: Optional[int] = opt(None, "stop after this many training tokens (the first of --max_step and this; "
                                    "the schedules then count tokens)", low=1)
    batch_schedule: Optional[str] = opt(None, "global batch per step range, \"STEP:BATCH,...\" (the first at step "
                                        "0, e.g. \"0:8,1000:16\"); the memory is reset at each change",
                                        parse=parse_batch_schedule)
    lr_range_test: bool = opt(False, "instead of training: grow the LR exponentially from --lr_range_min to "
                              "--lr_range_max, write lr_range_test.jsonl and .png, print a suggested LR")
    lr_range_min: float = opt(1e-5, "first LR of --lr_range_test", low=0, low_open=True)
    lr_range_max: float = opt(1.0, "last LR of --lr_range_test", low=0, low_open=True)
    lr_range_steps: int = opt(200, "steps of --lr_range_test", low=2)


@dataclass(frozen=True)
class RunConfig:
    """Work directory, presets, logging, checkpoints, evaluation during training, pass/fail targets."""
    config: str = opt("default", "preset name in --config_file (needs --config_file)", clis=TRAIN_EVAL, preset=False,
                      dumped=False)
    config_file: Optional[str] = opt(None, "YAML preset file, e.g. configs/wt103_base.yaml (a bare name is also "
                                     "looked up in configs/)", clis=TRAIN_EVAL, preset=False, dumped=False)
    work_dir: str = opt("LM-TFM", "directory for logs and checkpoints", clis=TRAIN_EVAL)
    debug: bool = opt(False, "no experiment dir; logs go to /dev/null (train: no checkpoints, no final test)",
                      clis=TRAIN_EVAL)
    append_dataset: bool = opt(False, "append the dataset name to work_dir")
    append_time: bool = opt(False, "append a timestamp to work_dir")
    restart: str = opt("", "checkpoint file or directory to resume from (a directory without checkpoint_last.pt: "
                       "a fresh start); 'auto': work_dir/checkpoint_last.pt when it exists, else a fresh start "
                       "(run.sub uses it after a requeue)")
    overwrite: bool = opt(False, "start a new run (no --restart) in a work_dir that holds the checkpoints of an earlier "
                          "run: they are deleted when it starts (without this flag such a run is refused)",
                          preset=False, dumped=False)
    txtlog_file: str = opt("train_log.log", "name of the text log")
    dllog_file: str = opt("train_log.json", "name of the JSON log in work_dir", clis=TRAIN_EVAL,
                          cli_defaults={EVAL: "eval_log.json"})
    log_interval: int = opt(10, "log every N steps", clis=TRAIN_EVAL, low=1)
    log_all_ranks: bool = opt(False, "one log file per rank", clis=TRAIN_EVAL)
    no_env: bool = opt(False, "do not log the environment (versions, device; changed: one line, not collect_env)",
                       clis=TRAIN_EVAL)
    save_all: bool = opt(False, "also keep checkpoint_{step}.pt at every evaluation")
    plot: bool = opt(False, "redraw work_dir/curves.png (training loss, validation perplexity or bpc, learning rate, "
                     "throughput; scripts/plot_runs.py) at each evaluation (ours)")
    no_eval: bool = opt(False, "no periodic evaluation and no final test (checkpoints are still written every "
                        "--eval_interval steps)")
    no_test: bool = opt(False, "skip the final test evaluation")
    eval_tgt_len: int = opt(192, "segment length for evaluation", low=1)
    eval_batch_size: int = opt(16, "global batch size for evaluation", low=1)
    eval_max_steps: int = opt(-1, "at most this many eval batches (0 or -1: all, as in the reference)", low=-1)
    eval_interval: int = opt(5000, "evaluate (and write a checkpoint) every N steps", low=1)
    target_throughput: Optional[float] = opt(None, "exit 1 when the average throughput (tok/s) is below this",
                                             clis=TRAIN_EVAL, low=0)
    target_perplexity: Optional[float] = opt(None, "exit 1 when the perplexity is above this", clis=TRAIN_EVAL,
                                             low=0, low_open=True)
    log_noise_scale: bool = opt(False, "log the gradient noise scale B_simple (from the batch chunks, or the "
                                "processes; one process needs --batch_chunk >= 2) and, with LAMB, the trust ratios")
    seed: int = opt(1111, "random seed", clis=ALL, low=0, high=2 ** 32 - 1)
    progress: Optional[bool] = opt(None, "progress bars with ETA on stderr for evaluation, corpus preparation and "
                                   "generation (ours; default: only when stderr is a terminal; --no_progress: never)",
                                   clis=ALL)
    check: Optional[int] = opt(None, "check everything each of N processes would check alike (flags, preset, data "
                               "folder, checkpoint, processes against GPUs) in this one process, then exit: 0 when "
                               "all is well, else one error line and 2; the recipes and run.sub run it before "
                               "starting the processes (a bare --check: N = 1; default: train or evaluate)",
                               clis=TRAIN_EVAL, nargs="?", const=1, low=1, preset=False, dumped=False)


@dataclass(frozen=True)
class DistributedConfig:
    """Several processes: torchrun, Slurm."""
    multi_gpu: Optional[str] = opt(None, "multi-GPU mode (changed: a bare --multi_gpu means ddp)",
                                   choices=("ddp", "dp", "fsdp"), nargs="?", const="ddp")
    tensor_parallel: int = opt(1, "tensor (Megatron-style) parallelism: split each layer's attention heads and "
                               "feed-forward block over this many processes (consecutive ranks, keep them inside a "
                               "node); the world size / N processes are the data-parallel ranks (ours)",
                               aliases=("--tp",), low=1)
    local_rank: int = opt(0, "local device index (default: $LOCAL_RANK or 0)", clis=ALL, aliases=("--local-rank",),
                          default_from=env_local_rank,
                          low=0, dumped=False)
    dist_timeout: float = opt(600.0, "seconds to wait for the other processes to join and for any collective; a peer "
                              "that never starts or dies then ends the job with an error instead of a hang (ours)",
                              clis=TRAIN_EVAL, low=0, low_open=True)
    ddp_comm_hook: str = opt("none", "--multi_gpu ddp: all-reduce the gradients compressed to fp16 or bf16 "
                             "(half the traffic)", choices=DDP_COMM_HOOKS)
    ddp_bucket_cap_mb: Optional[float] = opt(None, "--multi_gpu ddp: gradient bucket size in MiB (default: DDP's, "
                                             "25)", low=0, low_open=True)
    gpu0_bsz: int = opt(-1, "batch size on GPU 0 with DataParallel (reference)",
                        no_effect="there is no DataParallel; each process of a torchrun job gets the same share")
    affinity: str = opt("disabled", "CPU affinity mode of the reference (pynvml)", clis=TRAIN_EVAL,
                        choices=AFFINITY_MODES,
                        no_effect="CPU placement is left to the launcher (e.g. torchrun, srun --cpu-bind)")


@dataclass(frozen=True)
class SpeedConfig:
    """Device, precision, kernels and compilation."""
    cuda: Optional[bool] = opt(None, "run on CUDA (default: CUDA when a GPU is present; --no_cuda forces the CPU; "
                               "falls back to the CPU with a warning when there is no GPU)", clis=ALL)
    fp16: bool = opt(False, "float16 mixed precision (eval.py, generate.py: a float16 model)", clis=ALL)
    bf16: bool = opt(False, "bfloat16 mixed precision, no loss scaling (ours; exclusive with --fp16)", clis=ALL)
    tf32: Optional[bool] = opt(None, "float32 matmuls on TF32 tensor cores (ours; default: on with CUDA, as in the "
                               "reference's container; --no_tf32 for full float32)", clis=TRAIN_EVAL)
    amp: str = opt("pytorch", "mixed-precision implementation (changed: only pytorch = torch.amp)",
                   choices=("pytorch",), parse=parse_amp)
    apex_amp_opt_level: str = opt("O2", "apex optimization level of the reference", choices=("O0", "O1", "O2", "O3"),
                                  no_effect="mixed precision uses torch.amp (--amp pytorch)")
    init_loss_scale: float = opt(2.0 ** 16, "--fp16: the dynamic loss scale to start from (ours; torch.amp's "
                                 "default); halved at each step with a non-finite gradient (the step is skipped), "
                                 "doubled after 2000 steps without one", low=0, low_open=True)
    attn_impl: str = opt("auto", "attention kernel, same results (ours): math (matmuls + softmax), sdpa "
                         "(scaled_dot_product_attention, position term as a bias), flex (FlexAttention for attn_type 0 "
                         "with --compile and --dropatt 0; sdpa otherwise), triton (one fused Triton kernel forward "
                         "and backward for attn_type 0 and --dropatt 0, needs triton and a GPU; sdpa otherwise); "
                         "auto: sdpa on CUDA, math on the CPU",
                         clis=TRAIN_EVAL, choices=("auto", "math", "sdpa", "flex", "triton"))
    compile: Optional[bool] = opt(None, "torch.compile the model and the jitlamb step (default: on with CUDA, off on "
                                  "the CPU; --no_compile to switch off)")
    cuda_graphs: bool = opt(False, "replay the compiled step as CUDA graphs (torch.compile mode reduce-overhead; needs "
                            "--compile, a GPU and --batch_chunk 1)")
    checkpoint_activations: bool = opt(False, "recompute each layer's activations in the backward pass instead of "
                                       "keeping them (less memory, ~1/3 more compute)")
    swap_mem: bool = opt(False, "keep the memory on the CPU between chunks")
    softmax_tail_capacity: Optional[float] = opt(
        None, "adaptive softmax: rows per tail cluster as a fraction of a batch's tokens (ours): fixed shapes, no "
        "host read-back, no graph break; exact while no tail cluster holds more of the batch (tokens over it get a "
        "NaN loss, which stops the run); 1 is exact for any batch but scores every token in every tail cluster; "
        "default: exact sizes read back once per step (with --compile the output layer then runs eagerly)",
        low=0, low_open=True, high=1)


@dataclass(frozen=True)
class EvalConfig:
    """eval.py: what to score and how to run the model."""
    model: Optional[str] = opt(None, "checkpoint (eval.py default: work_dir/checkpoint_best.pt; ours or the "
                               "reference's)", clis=(EVAL, GENERATE))
    load_torchscript: Optional[str] = opt(None, "a TorchScript file written by eval.py --save_torchscript (instead "
                                          "of --model)", clis=(EVAL, GENERATE))
    manual: Optional[list[str]] = opt(None, "evaluate these words instead of a dataset split (batch size 1)", clis=(EVAL,),
                                 nargs="+")
    manual_file: Optional[str] = opt(None, "evaluate the text of this file (UTF-8) like --manual (ours; for texts "
                                     "longer than a command line)", clis=(EVAL,))
    split: str = opt("all", "split to evaluate (all: valid, then test)", clis=(EVAL,),
                     choices=("all", "valid", "test"))
    type: str = opt("pytorch", "model runtime: eager, TorchScript, or torch.compile (changed: compile added)",
                    clis=(EVAL,), choices=("pytorch", "torchscript", "compile"))
    compile_mode: str = opt("default", "torch.compile mode with --type compile (ours; reduce-overhead uses CUDA "
                            "graphs)", clis=(EVAL,), choices=("default", "reduce-overhead", "max-autotune"))
    manual_config: Optional[dict] = opt(None, "model_config as JSON: build the model from it (random weights)",
                                        clis=(EVAL,), parse=parse_json_object)
    manual_vocab: str = opt("word", "vocabulary type with --manual_config", clis=(EVAL,), choices=("word", "bpe"))
    save_data: bool = opt(False, "save latency and throughput samples and print percentiles", clis=(EVAL,))
    repeat: int = opt(1, "evaluate the data this many times", clis=(EVAL,), low=1)
    max_size: Optional[int] = opt(None, "at most this many batches per pass", clis=(EVAL,), low=1)
    percentiles: list[int] = opt([90, 95, 99], "latency percentiles to report (changed: parsed as integers)",
                            clis=(EVAL,), nargs="+", low=0, high=100)
    save_torchscript: Optional[str] = opt(None, "save the TorchScript model here", clis=(EVAL,))
    mem_len_sweep: Optional[str] = opt(None, "score the split(s) once per memory length, e.g. 0,32,160,640: prints a "
                                       "table and writes work_dir/mem_len_sweep.json (ours)", clis=(EVAL,),
                                       parse=parse_mem_len_sweep)


@dataclass(frozen=True)
class GenerateConfig:
    """generate.py: the prompt and the sampling."""
    prompt: str = opt("", "text to continue (default: the start of a line)", clis=(GENERATE,))
    prompt_file: Optional[str] = opt(None, "read the prompt from this file", clis=(GENERATE,))
    num_tokens: int = opt(100, "tokens to generate per sample", clis=(GENERATE,), low=1)
    num_samples: int = opt(1, "independent samples (one batch)", clis=(GENERATE,), low=1)
    temperature: float = opt(1.0, "divides the logits (0: most likely token)", clis=(GENERATE,), low=0)
    top_k: int = opt(0, "sample among the k most likely tokens (0: all)", clis=(GENERATE,), low=0)
    top_p: float = opt(1.0, "sample among the most likely tokens that together have this probability (1: all)",
                       clis=(GENERATE,), low=0, high=1, low_open=True)
    kv_cache: Optional[bool] = opt(None, "keep the memory's keys and values from token to token (ours; attention "
                                   "types 0 and 1 of an eager model; default: on; --no_kv_cache recomputes them)",
                                   clis=(GENERATE,))


# group attribute names of Config (none equals an option name: --model and --data are options)
GROUPS = {"architecture": ModelConfig, "corpus": DataConfig, "optimization": OptimConfig, "run": RunConfig,
          "distributed": DistributedConfig, "speed": SpeedConfig, "evaluation": EvalConfig,
          "generation": GenerateConfig}
GROUP_TITLES = {"architecture": "model", "corpus": "data", "optimization": "optimization and schedule",
                "run": "run: work dir, logs, checkpoints, evaluation during training", "distributed": "distributed",
                "speed": "precision and speed", "evaluation": "evaluation", "generation": "generation"}


# ---- reading the schema --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """One option as the parsers and checks see it."""
    name: str
    group: str
    kind: type                 # int, float, str, bool, list, dict
    item: type                 # the type of a list's items (int for list[int])
    optional: bool             # None is a valid value
    default: Any               # the dataclass default (train.py's)
    option: Option

    def default_for(self, cli: str) -> Any:
        if self.option.default_from is not None:
            return self.option.default_from()
        value = self.option.cli_defaults.get(cli, self.default)
        return list(value) if isinstance(value, list) else value

    def nullable_for(self, cli: str) -> bool:
        return self.optional or self.default_for(cli) is None


def _type_of(annotation: Any) -> tuple[type, type, bool]:
    """(kind, list item type, optional) of a field annotation such as `Optional[int]` or `list`."""
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        annotation = next(a for a in args if a is not type(None))
    kind = typing.get_origin(annotation) or annotation
    items = typing.get_args(annotation) if kind is list else ()
    return kind, items[0] if items else str, optional


def _specs() -> dict[str, Spec]:
    specs: dict[str, Spec] = {}
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            if f.name in specs:
                raise TypeError(f"option {f.name} is declared twice ({specs[f.name].group} and {group})")
            kind, item, optional = _type_of(f.type)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            specs[f.name] = Spec(f.name, group, kind, item, optional, default, f.metadata["option"])
    return specs


SPECS = _specs()
DERIVED = {"tied": "architecture"}   # read-only values computed from options (properties of the groups)


def options_of(cli: str) -> list[Spec]:
    """The options `cli` offers, in declaration order."""
    return [spec for spec in SPECS.values() if cli in spec.option.clis]


def range_text(spec: Spec) -> str:
    """'>= 1', 'in [0, 1)', '-1 or >= 1', ... ('' when the option has no range)."""
    o = spec.option
    fmt = lambda v: str(int(v)) if float(v).is_integer() else str(v)  # noqa: E731
    if o.low is not None and o.high is not None:
        text = f"in {'(' if o.low_open else '['}{fmt(o.low)}, {fmt(o.high)}{')' if o.high_open else ']'}"
    elif o.low is not None:
        text = f"{'>' if o.low_open else '>='} {fmt(o.low)}"
    elif o.high is not None:
        text = f"{'<' if o.high_open else '<='} {fmt(o.high)}"
    else:
        return ""
    if o.special:
        text = " or ".join(str(s) for s in o.special) + " or " + text
    return text


def out_of_range(spec: Spec, value: Any) -> bool:
    """Whether a (converted, not None) value lies outside the option's declared range."""
    o = spec.option
    if isinstance(value, float) and (math.isnan(value) or (o.finite and math.isinf(value))):
        return True
    if value in o.special:
        return False
    if o.low is not None and (value < o.low or (o.low_open and value == o.low)):
        return True
    if o.high is not None and (value > o.high or (o.high_open and value == o.high)):
        return True
    return False


# ---- the resolved configuration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """A resolved configuration: the groups, the CLI it was made for, and the options the user set (on the
    command line or in a preset) as opposed to defaults. Frozen: assigning raises
    dataclasses.FrozenInstanceError; `replace` derives a changed copy."""
    cli: str
    architecture: ModelConfig
    corpus: DataConfig
    optimization: OptimConfig
    run: RunConfig
    distributed: DistributedConfig
    speed: SpeedConfig
    evaluation: EvalConfig
    generation: GenerateConfig
    given: frozenset = frozenset()

    def __getattr__(self, name: str) -> Any:
        # called only for names that are not fields: the options, read flat
        group = SPECS[name].group if name in SPECS else DERIVED.get(name)
        if group is None:
            raise AttributeError(f"the configuration has no option {name!r}")
        return getattr(object.__getattribute__(self, group), name)

    def replace(self, **changes: Any) -> "Config":
        """A new configuration with `changes` applied (option names, flat)."""
        by_group: dict[str, dict] = {}
        for name, value in changes.items():
            if name not in SPECS:
                raise AttributeError(f"the configuration has no option {name!r}")
            by_group.setdefault(SPECS[name].group, {})[name] = value
        groups = {g: dataclasses.replace(getattr(self, g), **c) for g, c in by_group.items()}
        return dataclasses.replace(self, **groups)

    def to_dict(self, dumped_only: bool = False) -> dict:
        """The options of this configuration's CLI as a flat dict of plain values."""
        return {spec.name: getattr(self, spec.name) for spec in options_of(self.cli)
                if not dumped_only or (spec.option.dumped and spec.option.no_effect is None)}

    @classmethod
    def build(cls, cli: str, values: dict, given: frozenset = frozenset()) -> "Config":
        """The configuration of `cli` from `values` (flat), the CLI's defaults for the rest."""
        unknown = set(values) - set(SPECS)
        if unknown:
            raise AttributeError(f"unknown option(s) {', '.join(sorted(unknown))}")
        groups = {}
        for group, group_cls in GROUPS.items():
            kwargs = {}
            for f in dataclasses.fields(group_cls):
                spec = SPECS[f.name]
                kwargs[f.name] = values[f.name] if f.name in values else spec.default_for(cli)
            groups[group] = group_cls(**kwargs)
        return cls(cli=cli, given=frozenset(given), **groups)
