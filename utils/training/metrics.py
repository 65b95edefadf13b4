"""Meters, the reference's log-line formats, and metric sinks (JSON lines, TensorBoard).

The log lines are the reference trainer's, to the character: users parse them.
"""
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from utils.io.atomic import open_nofollow, raise_append_fault

BPC_DATASETS = ("enwik8", "text8")
CHAR_LEVEL = "char-level"   # the label of another character-level corpus (custom, prepared): bits per character

LINE = "-" * 100
DOUBLE_LINE = "=" * 100


class AverageMeter:
    """Weighted running average that skips its first `warmup` updates; optionally keeps every value."""

    def __init__(self, warmup: int = 0, keep: bool = False):
        self.warmup = warmup
        self.keep = keep
        self.values: list[float] = []
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0.0
        self.avg = 0.0
        self.iters = 0
        self.values = []
        self.all_sum = 0.0     # warm-up updates included
        self.all_count = 0.0

    def update(self, val: float, n: float = 1.0) -> None:
        self.iters += 1
        self.val = val
        self.all_sum += val * n
        self.all_count += n
        if self.iters <= self.warmup:
            return
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count
        if self.keep:
            self.values.append(val)

    def avg_or_warmup(self) -> float:
        """The average after the warm-up; over every update when there were no more than the warm-up ones
        (a short run, or a short resumed one), so that a run that did work never reports 0."""
        if self.count:
            return self.avg
        return self.all_sum / self.all_count if self.all_count else 0.0



def uses_bpc(dataset: str) -> bool:
    """Character-level corpora report bits per character instead of perplexity: the enwik8 and text8 benchmarks
    and any other character-level corpus (`corpus_label`)."""
    return dataset in BPC_DATASETS or dataset == CHAR_LEVEL


def corpus_label(dataset: str, custom_level: str | None = None, vocab=None) -> str:
    """The name the metrics go by: the dataset, or CHAR_LEVEL for another character-level corpus: a custom one
    with --custom_level char, or any whose vocabulary splits text into characters (a prepared --level char
    corpus, a checkpoint's vocabulary)."""
    if dataset in BPC_DATASETS:
        return dataset
    if (dataset == "custom" and custom_level == "char") or getattr(vocab, "delimiter", None) == "":
        return CHAR_LEVEL
    return dataset


def loss_metrics(prefix: str, loss: float, dataset: str) -> dict:
    """The metrics record of a loss: `{prefix}_loss` and `{prefix}_perplexity`, or for character-level
    datasets `{prefix}_bits_per_character` (the reference's DLLogger keys)."""
    if uses_bpc(dataset):
        return {f"{prefix}_loss": loss, f"{prefix}_bits_per_character": loss / math.log(2)}
    return {f"{prefix}_loss": loss, f"{prefix}_perplexity": safe_exp(loss)}


def safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def format_train_line(epoch: int, step: int, batch: int, n_batch: int, lr: float, ms_per_batch: float,
                      tok_per_s: float, loss: float, dataset: str) -> str:
    line = (f"| epoch {epoch:3d} step {step:>8d} | batches {batch:>6d} / {n_batch:d} | lr {lr:.3e} "
            f"| ms/batch {ms_per_batch:5.1f} | tok/s {tok_per_s:7.0f} | loss {loss:5.2f}")
    if uses_bpc(dataset):
        return line + f" | bpc {loss / math.log(2):9.5f}"
    return line + f" | ppl {safe_exp(loss):9.2f}"


def format_eval_line(eval_index: int, step: int, seconds: float, loss: float, dataset: str) -> str:
    line = f"| Eval {eval_index:3d} at step {step:>8d} | time: {seconds:5.2f}s | valid loss {loss:5.2f}"
    if uses_bpc(dataset):
        return line + f" | bpc {loss / math.log(2):9.5f}"
    return line + f" | valid ppl {safe_exp(loss):9.3f}"


def format_test_line(seconds: float, loss: float, dataset: str) -> str:
    line = f"| End of training | test time: {seconds:5.2f}s | test loss {loss:5.2f}"
    if uses_bpc(dataset):
        return line + f" | test bpc {loss / math.log(2):9.5f}"
    return line + f" | test ppl {safe_exp(loss):9.3f}"


def format_split_result(split: str, loss: float, dataset: str) -> str:
    """eval.py's result line, e.g. `| test loss  3.14 | test ppl    23.132 ` (with the trailing space)."""
    if uses_bpc(dataset):
        return f"| {split} loss {loss:5.2f} | {split} bpc {loss / math.log(2):9.5f} "
    return f"| {split} loss {loss:5.2f} | {split} ppl {safe_exp(loss):9.3f} "


def format_eval_progress_line(step: int, batch: int, n_batch: int, ms_per_batch: float, tok_per_s: float,
                              loss: float) -> str:
    return (f"| step {step:>8d} | batches {batch:>6d} / {n_batch:d} | ms/batch {ms_per_batch:5.2f} "
            f"| tok/s {tok_per_s:7.0f} | loss {loss:5.2f} | ppl {safe_exp(loss):5.2f}")


def setup_logging(log_file: str | os.PathLike | None, rank: int = 0, log_all_ranks: bool = False,
                  filemode: str = "w") -> logging.Logger:
    """Plain-message logging to the console and to `log_file` (rank 0 only unless log_all_ranks).

    With log_all_ranks every rank writes `<stem>_rank_<r><suffix>` and prefixes console lines with
    `<r>: `; other ranks otherwise log nothing.
    """
    logger = logging.getLogger("txl")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if rank != 0 and not log_all_ranks:
        logger.addHandler(logging.NullHandler())
        return logger
    prefix = f"{rank}: " if log_all_ranks else ""
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(prefix + "%(message)s"))
    logger.addHandler(console)
    if log_file is not None:
        path = Path(log_file)
        if log_all_ranks:
            path = path.with_name(f"{path.stem}_rank_{rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _NoFollowFileHandler(path, mode=filemode)
        handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
        logger.addHandler(handler)
    return logger


class _NoFollowFileHandler(logging.FileHandler):
    """A FileHandler that refuses to write through a symbolic link planted where the log goes."""

    def __init__(self, path: Path, mode: str):
        # opened here, not lazily, so that a link is refused at startup with one line, not at the first record
        super().__init__(path, mode=mode, encoding="utf-8", delay=False)

    def _open(self):
        return open_nofollow(self.baseFilename, self.mode, encoding=self.encoding)

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is not None:                  # None once a write failed: the log is not written again
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """A full disk or a refused write stops the run with one line naming the log (logging's default prints
        a traceback and goes on, losing every later line without a word); other errors as logging does."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            stream, self.stream = self.stream, None
            try:
                stream.close()                       # flushing the failed line again may fail the same way
            except OSError:
                pass
            raise_append_fault(exc, self.baseFilename)
        super().handleError(record)


class MetricsWriter:
    """JSON-lines metrics file plus optional TensorBoard scalars; a no-op on ranks other than 0."""

    def __init__(self, jsonl_path: str | os.PathLike | None, tensorboard_dir: str | os.PathLike | None = None,
                 enabled: bool = True, append: bool = False):
        self.enabled = enabled and jsonl_path is not None
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
        self._file_path = Path(jsonl_path)
        self._file = open_nofollow(jsonl_path, "a" if append else "w", buffering=1)
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def log(self, step: Any, data: dict, tb_prefix: str | None = None) -> None:
        """One JSON line `{"step": step, **data}`; numeric values also go to TensorBoard as prefix/key."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain_number(v) for k, v in data.items()}}
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as exc:
            self._give_up_file()
            raise_append_fault(exc, self._file_path)
            raise
        if self._tb is not None and tb_prefix is not None and isinstance(step, int):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{tb_prefix}/{key}", value, step)

    def histogram(self, tag: str, values, step: int) -> None:
        """A histogram to TensorBoard only (e.g. LAMB's trust ratios)."""
        if self.enabled and self._tb is not None:
            self._tb.add_histogram(tag, values, step)

    def _give_up_file(self) -> None:
        file, self._file, self.enabled = self._file, None, False
        try:
            file.close()                             # flushing what failed may fail the same way
        except OSError:
            pass

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self._file = None
                raise_append_fault(exc, self._file_path)
                raise
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain_number(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
