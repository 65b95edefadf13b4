"""eval.py --mem_len_sweep 0,32,160,640: the perplexity of each split at each memory length, the same
weights and segments otherwise: how much Transformer-XL's memory buys. A table on the log, and JSON:

    {"model": ..., "dataset": ..., "tgt_len": 64, "clamp_len": -1, "same_length": false, "batch_size": 16,
     "results": [{"mem_len": 0, "split": "test", "loss": 3.5, "ppl": 33.1 (or "bpc")}, ...]}
"""
import json
import math
from pathlib import Path

from utils.io.atomic import write_text_atomic
from utils.training.metrics import safe_exp, uses_bpc


def sweep_lengths(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def result_row(mem_len: int, split: str, loss: float, label: str) -> dict:
    """One result; `label`: utils.training.metrics.corpus_label (bpc for character-level corpora)."""
    row = {"mem_len": mem_len, "split": split, "loss": loss}
    if uses_bpc(label):
        row["bpc"] = loss / math.log(2)
    else:
        row["ppl"] = safe_exp(loss)
    return row


def format_table(rows: list[dict]) -> list[str]:
    """The table lines: one row per (split, mem_len), the change against the first memory length."""
    metric = "bpc" if "bpc" in rows[0] else "ppl"
    lines = [f"| split | mem_len | loss | {metric} | vs mem_len {rows[0]['mem_len']} |", "|---|---:|---:|---:|---:|"]
    first = {}
    for row in rows:
        base = first.setdefault(row["split"], row[metric])
        change = f"{100 * (row[metric] / base - 1):+.1f}%" if base else "-"
        lines.append(f"| {row['split']} | {row['mem_len']} | {row['loss']:.4f} | {row[metric]:.3f} | {change} |")
    return lines


def write_json(path: Path, header: dict, rows: list[dict]) -> None:
    write_text_atomic(path, json.dumps({**header, "results": rows}, indent=1) + "\n")
