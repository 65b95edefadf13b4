"""Models for inference, shared by eval.py and generate.py: loading, precision, runtime, TorchScript files.

    loaded = load_for_inference(model_path=..., overrides=length_overrides(args), device=device)  # or torchscript_path
    model = prepare_runtime(loaded.model, "compile", "bf16", device)
    warm_up(model, loaded.model_config["n_token"], tgt_len, mem_len, bsz, device, "bf16", "compile")

Runtimes: `pytorch` (eager), `torchscript` (`torch.jit.script` of the one model definition) and `compile`
(`torch.compile`). Precisions: fp32, and fp16 / bf16 as the reference ran them: the whole model converted
(LayerNorm and softmax included; the adaptive softmax takes its log-softmax in float32).

A TorchScript file from `save_torchscript` holds the scripted model (code and weights) and, as the extra
file `txl_meta.json`, the vocabulary, model_config and dataset name, so it is evaluated or sampled from
alone. Loading it imports none of the project's model code: `mem_transformer` (and the adaptive softmax it
uses) is imported only when a model is built from a checkpoint or a config.
"""
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from utils.io.atomic import atomic_open
from utils.io.checkpoint import load_checkpoint
from utils.io.errors import UserError
from utils.data.vocabulary import Vocab, check_fingerprint

TORCHSCRIPT_EXTRA = "txl_meta.json"  # vocabulary, model_config and dataset, stored inside a TorchScript file
RUNTIMES = ("pytorch", "torchscript", "compile")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
LENGTH_KEYS = ("tgt_len", "ext_len", "mem_len", "clamp_len", "same_length")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    vocab: object                 # Vocab / BPEVocab, or None for a --manual_config model
    model_config: dict            # the constructor arguments it was built with (the reference's key names)
    dataset: Optional[str]        # dataset the model was trained on, when known
    source: str                   # "checkpoint", "torchscript" or "config"
    settings: Optional[dict] = None  # the configuration stored in one of our checkpoints (flat option values)


def precision_of(args) -> str:
    """'fp16', 'bf16' or 'fp32' from the --fp16 / --bf16 flags."""
    return "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"


def length_overrides(args) -> dict:
    """The segment/memory settings a run sets on the model (the reference's eval.py overrides)."""
    return {key: getattr(args, key) for key in LENGTH_KEYS if getattr(args, key) is not None}


# ---- loading --------------------------------------------------------------------------------------------
def load_for_inference(model_path: Optional[str] = None, torchscript_path: Optional[str] = None,
                       manual_config: Optional[dict] = None, overrides: Optional[dict] = None,
                       device: torch.device = torch.device("cpu")) -> LoadedModel:
    """A model in eval mode on `device` (fp32 unless a TorchScript file was saved otherwise) with the lengths
    of `overrides` (tgt_len, ext_len, mem_len, clamp_len, same_length) set on it.

    The model is built with the config it was trained with (the learned position tables of attention types
    1 and 3 keep their size) and the lengths are set afterwards; `model_config` is that config.
    """
    if torchscript_path:
        loaded = _load_torchscript(Path(torchscript_path), device)
    elif manual_config is not None:                     # random weights, built with the run's lengths
        config = {**manual_config, **(overrides or {})}
        config.pop("dtype", None)
        loaded = LoadedModel(model_from_config(config, "--manual_config"), None, config, None, "config")
    elif is_export(model_path):                         # a folder of scripts/export.py
        from inference.export import load_export
        model, vocab, config, dataset, settings = load_export(model_path)
        loaded = LoadedModel(model, vocab, config, dataset, "export", settings)
    else:
        loaded = _load_checkpoint(Path(model_path))
    apply_lengths(loaded.model, overrides or {})
    loaded.model = loaded.model.to(device).eval()
    return loaded


def is_export(path) -> bool:
    """A folder written by scripts/export.py (another folder means its checkpoint_last.pt, as before)."""
    return path is not None and Path(path).is_dir() and (Path(path) / "config.json").is_file()


def model_from_config(config: dict, where: str) -> torch.nn.Module:
    """MemTransformerLM(**config), with a one-line error naming missing or unknown keys."""
    import inspect

    from mem_transformer import MemTransformerLM

    params = inspect.signature(MemTransformerLM.__init__).parameters
    required = [name for name, p in params.items() if name != "self" and p.default is inspect.Parameter.empty]
    missing = [name for name in required if name not in config]
    unknown = sorted(set(config) - set(params))
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(unknown)}"] if unknown else [])
        raise UserError(f"{where}: the model config is incomplete or wrong ({'; '.join(parts)}); it needs "
                        f"{', '.join(required)} (see a checkpoint's model_config)")
    try:
        return MemTransformerLM(**config)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: the model config is invalid ({exc})") from None


def apply_lengths(model: torch.nn.Module, lengths: dict) -> None:
    """Set tgt_len / ext_len / mem_len (reset_length), clamp_len and same_length; missing keys keep their value."""
    model.reset_length(int(lengths.get("tgt_len", model.tgt_len)), int(lengths.get("ext_len", model.ext_len)),
                       int(lengths.get("mem_len", model.mem_len)))
    model.clamp_len = int(lengths.get("clamp_len", model.clamp_len))
    model.same_length = bool(lengths.get("same_length", model.same_length))


def current_lengths(model: torch.nn.Module) -> dict:
    return {key: getattr(model, key) for key in LENGTH_KEYS}


def _load_checkpoint(path: Path) -> LoadedModel:
    from utils.model.reference_compat import reference_state_dict_to_ours

    ckpt = load_checkpoint(path, map_location="cpu")
    config = dict(ckpt["model_config"])
    reference = ckpt["format"] == "reference"
    vocab = Vocab.from_reference(ckpt["vocab"]) if reference else Vocab.from_dict(ckpt["vocab"])
    check_fingerprint(vocab, ckpt.get("vocab_fingerprint"), f"checkpoint {path}",
                      "the file was altered; use another checkpoint")
    if config["n_token"] != len(vocab):
        raise UserError(f"checkpoint {path}: the model predicts {config['n_token']} tokens but its vocabulary has "
                        f"{len(vocab)}; the file is inconsistent, use another checkpoint")
    model = model_from_config(config, f"checkpoint {path}")
    state = reference_state_dict_to_ours(ckpt["model_state"], config) if reference else ckpt["model_state"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path} does not fit its own model_config ({str(exc).splitlines()[0][:200]})") from None
    args = ckpt.get("args")
    dataset = args.get("dataset") if isinstance(args, dict) else None
    settings = dict(args) if isinstance(args, dict) and not reference else None
    return LoadedModel(model, vocab, config, dataset, "checkpoint", settings)


def torchscript_file(path: str | os.PathLike) -> Path:
    """The TorchScript file `path` names, or the one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"TorchScript file {path} does not exist")
    return path


def _load_torchscript(path: Path, device: torch.device) -> LoadedModel:
    path = torchscript_file(path)
    extra = {TORCHSCRIPT_EXTRA: ""}
    try:
        model = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError / ValueError / zipfile errors for bad files
        raise UserError(f"{path} is not a loadable TorchScript file ({str(exc).strip().splitlines()[0][:200]})") from None
    try:
        meta = json.loads(extra[TORCHSCRIPT_EXTRA] or "{}")
    except json.JSONDecodeError:
        meta = {}
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise UserError(f"{path} was not written by eval.py --save_torchscript (no {TORCHSCRIPT_EXTRA} inside); "
                        "save the model with eval.py --save_torchscript")
    vocab = Vocab.from_dict(meta["vocab"]) if meta.get("vocab") is not None else None
    return LoadedModel(model, vocab, meta["model_config"], meta.get("dataset"), "torchscript")


# ---- runtime and precision ------------------------------------------------------------------------------
def prepare_runtime(model: torch.nn.Module, runtime: str, precision: str, device: torch.device,
                    compile_mode: str = "default") -> torch.nn.Module:
    """`model` on `device` in `precision`, run eagerly, as TorchScript or compiled (in eval mode)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    scripted = isinstance(model, torch.jit.ScriptModule)
    if runtime == "compile" and scripted:
        raise UserError("--type compile needs a checkpoint: a TorchScript file runs as TorchScript "
                        "(drop --load_torchscript or use --type torchscript)")
    model = model.to(device=device, dtype=PRECISIONS[precision]).eval()
    if runtime == "torchscript" and not scripted:
        model = torch.jit.script(model)
    elif runtime == "compile":
        model = torch.compile(model, options=compile_options(compile_mode))
    return model


def compile_options(mode: str = "default") -> dict:
    """Inductor options of a torch.compile mode, with in-place buffer reuse off: with it (torch 2.13, CPU),
    attention types 2 and 3 returned a wrong memory for layers >= 1 (the stored layer input was overwritten)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    import torch._inductor

    return {**torch._inductor.list_mode_options(mode), "inplace_buffers": False}


@torch.no_grad()
def warm_up(model: torch.nn.Module, n_token: int, tgt_len: int, mem_len: int, bsz: int, device: torch.device,
            precision: str = "fp32", runtime: str = "pytorch") -> float:
    """Forwards on random tokens before anything is timed, with an empty, a partial and a full memory (the
    shapes an evaluation goes through): TorchScript profiles and torch.compile compiles here. A precision or
    runtime that cannot run on the device ends here with one line. Returns the seconds it took."""
    start = time.time()
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, n_token, (tgt_len + 1, bsz), generator=g).to(device)
    try:
        _, mems = model(data[:-1], data[1:], None)                  # empty memory
        _, mems = model(data[:-1], data[1:], mems)                  # partial memory
        if mems is not None and mems.size(1) < mem_len:             # full memory
            full = mems.repeat(1, -(-mem_len // mems.size(1)), 1, 1)[:, :mem_len]
            model(data[:-1], data[1:], full)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of GPU memory for a batch of {bsz} x {tgt_len} tokens with a memory of {mem_len}; "
                        "lower --batch_size or --mem_len, or use --fp16 / --bf16") from None
    except (RuntimeError, NotImplementedError, AssertionError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{precision} with --type {runtime} does not run on {device} with this PyTorch build "
                        f"({reason}); use another precision or runtime") from None
    return time.time() - start


# ---- TorchScript files ----------------------------------------------------------------------------------
def save_torchscript(model: torch.nn.Module, path: str | os.PathLike, vocab, model_config: dict,
                     dataset: Optional[str]) -> Path:
    """Write `model` (scripted here unless it already is) with its vocabulary and config, atomically."""
    scripted = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.script(model)
    meta = {"vocab": None if vocab is None else vocab.to_dict(), "model_config": model_config, "dataset": dataset}
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.jit.save(scripted, f, _extra_files={TORCHSCRIPT_EXTRA: json.dumps(meta)})
    return path
