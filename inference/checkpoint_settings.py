"""eval.py from the checkpoint alone: the corpus and the evaluation lengths a model was trained with.

One of our checkpoints stores the training configuration (`args`). Unless the user sets them (on the command
line or in a preset), eval.py takes from it

    --data, --dataset                    the corpus the model was trained on
    --tgt_len, --ext_len, --mem_len      the lengths training evaluated with: segments of --eval_tgt_len and
                                         the context of training (utils/training/evaluation.eval_lengths)
    --clamp_len, --same_length           as trained
    --batch_size                         training's --eval_batch_size
    --reset_mems_at_doc                  as trained, when the corpus scored is a prepared one (the flag needs
                                         its end-of-document symbol; another corpus is scored without it)

so that `eval.py --model WORK/checkpoint_best.pt` scores the split as training did and prints the same
perplexity. The vocabulary is always the checkpoint's (checked by its fingerprint when loaded): the text is
encoded with the ids the model knows, so a model is never scored on another numbering of the words.
A reference checkpoint stores no usable configuration: the reference's eval.py defaults then apply.
"""
from pathlib import Path
from typing import Optional

from utils.io.errors import UserError
from utils.training.evaluation import eval_lengths

DATA_KEYS = ("data", "dataset")
LENGTH_KEYS = ("tgt_len", "ext_len", "mem_len", "clamp_len", "same_length", "batch_size")


def _stored_int(stored: dict, key: str) -> Optional[int]:
    value = stored.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def evaluation_settings(stored: Optional[dict]) -> dict:
    """{option: value} eval.py should use to score like training did, from a checkpoint's stored `args`
    (only the keys it can derive; {} for a checkpoint without a configuration)."""
    if not isinstance(stored, dict):
        return {}
    out = {key: stored[key] for key in DATA_KEYS if isinstance(stored.get(key), str)}
    tgt, ext, mem = (_stored_int(stored, k) for k in ("tgt_len", "ext_len", "mem_len"))
    eval_tgt = _stored_int(stored, "eval_tgt_len") or tgt
    if None not in (tgt, ext, mem, eval_tgt):
        out["tgt_len"], out["ext_len"], out["mem_len"] = eval_lengths(tgt, ext, mem, eval_tgt)
    if _stored_int(stored, "clamp_len") is not None:
        out["clamp_len"] = stored["clamp_len"]
    if isinstance(stored.get("same_length"), bool):
        out["same_length"] = stored["same_length"]
    if _stored_int(stored, "eval_batch_size") is not None:
        out["batch_size"] = stored["eval_batch_size"]
    return out


def fill_from_stored(cfg, stored: Optional[dict], keys=DATA_KEYS + LENGTH_KEYS):
    """(cfg with `keys` taken from the checkpoint where the user did not set them, the names taken)."""
    derived = evaluation_settings(stored)
    changes = {k: derived[k] for k in keys if k in derived and k not in cfg.given}
    if cfg.cli == "eval" and cfg.manual:          # --manual scores one stream: batch size 1
        changes.pop("batch_size", None)
    if (isinstance(stored, dict) and stored.get("reset_mems_at_doc") is True and hasattr(cfg, "reset_mems_at_doc")
            and "reset_mems_at_doc" not in cfg.given and not (cfg.cli == "eval" and cfg.manual)
            and changes.get("dataset", cfg.dataset) == "prepared"):
        changes["reset_mems_at_doc"] = True
    return (cfg.replace(**changes) if changes else cfg), list(changes)


def describe(cfg, taken: list) -> str:
    """The start line naming what came from the checkpoint."""
    def shown(name):
        value = getattr(cfg, name)
        return ("on" if value else "off") if isinstance(value, bool) else value
    return "From the checkpoint's configuration: " + ", ".join(f"--{n} {shown(n)}" for n in taken)


def check_data_folder(cfg, taken: list) -> Path:
    """The data folder to read; a missing one that came from the checkpoint names the stored path and --data."""
    path = Path(cfg.data)
    if path.is_dir():
        return path
    if "data" in taken:
        raise UserError(f"the data folder stored in the checkpoint, {cfg.data}, is not found (moved or renamed?); "
                        f"pass --data FOLDER with the {cfg.dataset} corpus the model was trained on")
    raise UserError(f"{cfg.data}: data folder not found; download the dataset with getdata.sh or pass --data")
