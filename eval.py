#!/usr/bin/env python
"""Evaluate a Transformer-XL language model: perplexity on a dataset split or on `--manual` text.

    python eval.py --model LM-TFM/checkpoint_best.pt --data data/wikitext-103 --split test \\
        --tgt_len 64 --mem_len 640 --clamp_len 400 --same_length
    python eval.py --model LM-TFM/checkpoint_best.pt --manual "recognize speech"

Reads our checkpoints and the reference trainer's (without running pickled code); the text is encoded with
the vocabulary stored in the checkpoint. Output lines are the reference eval.py's.
"""
import utils.runtime.openmp_env  # noqa: F401  (first: bounds OpenMP's spin-wait before torch loads it)
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data_utils
from inference.checkpoint_settings import check_data_folder, describe, fill_from_stored
from inference.export import load_export
from inference.mem_sweep import format_table, result_row, sweep_lengths, write_json
from inference.runtime import (LoadedModel, apply_lengths, is_export, length_overrides, load_for_inference,
                               precision_of, prepare_runtime, save_torchscript, torchscript_file, warm_up)
from utils.config.cli import eval_parser, eval_splits, parse_args
from utils.data.prepared import end_of_document
from utils.distributed import group as distributed
from utils.io.atomic import write_text_atomic
from utils.io.checkpoint import load_checkpoint
from utils.io.errors import UserError, run_cli
from utils.runtime.device import (check_process_count, configure_backends, environment_summary, resolve_speed_flags,
                                  select_device)
from utils.training.evaluation import evaluate_stream, reduce_eval_result
from utils.training.evaluator import check_targets
from utils.training.metrics import (DOUBLE_LINE, AverageMeter, MetricsWriter, corpus_label,
                                    format_eval_progress_line, format_split_result, safe_exp, setup_logging, uses_bpc)
from utils.training.progress import progress_bar, show_progress


def check(args) -> int:
    """--check N: what each of N processes would check alike before evaluating, done once, in this process:
    processes against GPUs, the model file and the data folder (from the checkpoint unless given)."""
    note = check_process_count(args.check, args.cuda)
    stored = None
    if args.load_torchscript:
        torchscript_file(args.load_torchscript)
    elif args.manual_config is None and is_export(args.model):
        stored = load_export(args.model)[4]
    elif args.manual_config is None:
        ckpt = load_checkpoint(args.model or Path(args.work_dir) / "checkpoint_best.pt")
        stored = ckpt.get("args") if ckpt["format"] != "reference" else None
    if not args.manual:
        check_data_folder(*fill_from_stored(args, stored))
    if note:
        print(note, file=sys.stderr)
    return 0


def load_model(args, device, log) -> LoadedModel:
    """The model, its vocabulary, model_config and dataset from --load_torchscript, --manual_config or the
    checkpoint (--model, default work_dir/checkpoint_best.pt), with the lengths of this run."""
    if args.manual_config is not None and not args.load_torchscript:
        log.info("Building the model from --manual_config: the weights are random")
    model_path = args.model or str(Path(args.work_dir) / "checkpoint_best.pt")
    return load_for_inference(model_path=model_path, torchscript_path=args.load_torchscript,
                              manual_config=args.manual_config, overrides=length_overrides(args), device=device)


def settings_from_checkpoint(args, loaded: LoadedModel, log):
    """The corpus and the evaluation lengths stored in the checkpoint unless the user set them (on the command
    line or in a preset): a model is scored on the corpus it was trained on, as training scored it
    (inference/checkpoint_settings.py). Says what it took; the lengths are set on the model."""
    filled, taken = fill_from_stored(args, loaded.settings)
    if taken:
        log.info(describe(filled, taken))
        apply_lengths(loaded.model, length_overrides(filled))
    if not filled.manual:
        check_data_folder(filled, taken)
    return filled


def with_manual_file(args):
    """--manual_file PATH: its text becomes the --manual text (batch size 1)."""
    if args.manual_file is None:
        return args
    if args.manual:
        raise UserError("--manual and --manual_file exclude each other; pass the text one way")
    try:
        text = Path(args.manual_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --manual_file {args.manual_file}: {exc}") from None
    return args.replace(manual=[text], batch_size=1)


def report_unknown(symbols: list, vocab, log) -> None:
    """--manual: how many words the vocabulary does not know (scored as <unk>), and the first few."""
    known = getattr(vocab, "sym2idx", None)
    if known is None:                          # BPE: every text has ids
        return
    unknown = [sym for sym in symbols if sym not in known]
    if not unknown:
        return
    first = ", ".join(list(dict.fromkeys(unknown))[:10])             # the first ten distinct ones
    if vocab.unk_idx is None:
        raise UserError(f"--manual: {unknown[0]!r} is not in the vocabulary, which has no <unk> to stand for unknown "
                        f"words ({len(unknown)} of {len(symbols)} words are unknown: {first})")
    log.info(f"--manual: {len(unknown)} of {len(symbols)} words are not in the vocabulary and are scored as "
             f"<unk>: {first}")


def manual_ids(args, vocab) -> np.ndarray:
    text = " ".join(args.manual).strip()
    if not text:
        raise UserError("--manual got empty text; pass the words to score, e.g. --manual \"recognize speech\"")
    if vocab is None:
        raise UserError("--manual needs a vocabulary: pass --model with a checkpoint (--manual_config has none)")
    tokenized = data_utils.tokenize_raw(text)
    if hasattr(vocab, "tokenize"):
        report_unknown(vocab.tokenize(tokenized), vocab, logging.getLogger("txl"))
    ids = vocab.encode(tokenized, add_eos=True)
    if len(ids) < 2:
        raise UserError("--manual text is too short: it needs at least one word")
    return np.asarray(ids, dtype=np.int64)


def evaluate(model, iterator, args, device, log, meters) -> tuple[float, int]:
    """One split, `--repeat` times; logs progress lines; returns (mean NLL over all ranks' tokens, batches).

    With several processes each evaluates its columns of the global batch; a batch's latency is the slowest
    rank's, its throughput the sum over ranks, and the loss is averaged over every scored token."""
    total_loss, total_len, n_batches = 0.0, 0, 0
    start = time.time()
    interval = {"loss": 0.0, "time": 0.0, "tokens": 0, "batches": 0}
    n_batch = iterator.n_batch if args.max_size is None else min(iterator.n_batch, args.max_size)
    step = [0]
    full = [0]                                  # tokens of a full batch (the largest seen)

    def on_batch(index: int, seconds: float, loss: float, n_tokens: int) -> None:
        step[0] += 1
        tokens_per_s = distributed.all_reduce_item(n_tokens / seconds if seconds > 0 else 0.0, "sum")
        seconds = distributed.all_reduce_item(seconds, "max")
        full[0] = max(full[0], n_tokens)
        # --type compile: a shorter (last) batch is a shape the warm-up did not compile; its time is a
        # compilation, not a latency, so it is not a timing sample (issue 18)
        if not (args.type == "compile" and n_tokens < full[0]):
            meters["latency"].update(seconds * 1000)
            meters["throughput"].update(tokens_per_s, seconds)
        interval["loss"] += loss
        interval["time"] += seconds
        interval["tokens"] += n_tokens
        interval["batches"] += 1
        if step[0] % args.log_interval == 0:
            b = interval["batches"]
            log.info(format_eval_progress_line(step[0], index + 1, n_batch, interval["time"] / b * 1000,
                                               interval["tokens"] / interval["time"] if interval["time"] else 0,
                                               interval["loss"] / b))
            interval.update(loss=0.0, time=0.0, tokens=0, batches=0)

    bar = progress_bar(n_batch * args.repeat, "evaluating", show_progress(args) and distributed.is_main_process())

    def on_batch_and_bar(*values) -> None:
        on_batch(*values)
        bar.update()

    for _ in range(args.repeat):
        result = evaluate_stream(model, iterator, device, max_steps=args.max_size or -1, timed=True,
                                 on_batch=on_batch_and_bar)
        loss_sum, scored = reduce_eval_result(result, iterator)     # over all ranks' columns
        total_loss += loss_sum
        total_len += scored
        n_batches += result.n_batches
    bar.close()
    elapsed = time.time() - start
    log.info(f"Time : {elapsed:.2f}s, {1000 * elapsed / max(n_batches, 1):.2f}ms/segment")
    if total_len == 0:
        raise UserError("nothing was scored: every batch only primed the memory; raise --max_size or lower --mem_len")
    return total_loss / total_len, n_batches


def main() -> int:
    distributed.adopt_slurm_env()                       # one process per srun task: ranks from SLURM_* variables
    args = with_manual_file(parse_args(eval_parser(), section="eval"))
    if args.check is not None:
        return check(args)
    args = distributed.init_from_env(args)
    work_dir = eval_work_dir(args)
    log = open_eval_log(args, work_dir)
    device = select_device(args, log)
    args = resolve_speed_flags(args, device)
    configure_backends(args, device)
    if not args.no_env:
        log.info(environment_summary(device))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    loaded = load_model(args, device, log)
    args = settings_from_checkpoint(args, loaded, log)
    model, precision, runtime = build_runtime(args, loaded, device, log)
    splits = split_iterators(args, loaded.vocab, device, loaded.model_config["n_token"])
    log.info(f"Evaluating with: math {precision} type {runtime} bsz {args.batch_size} tgt_len {args.tgt_len} "
             f"ext_len {args.ext_len} mem_len {args.mem_len} clamp_len {args.clamp_len}")
    warmup = args.mem_len // args.tgt_len + 2
    meters = {"throughput": AverageMeter(warmup=warmup, keep=args.save_data),
              "latency": AverageMeter(warmup=warmup, keep=args.save_data)}
    metrics = MetricsWriter(None if args.debug else work_dir / args.dllog_file,
                            enabled=distributed.is_main_process(), append=True)
    metrics.log("PARAMETER", {k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool))})
    dataset = corpus_label((loaded.dataset if args.manual else args.dataset) or args.dataset, vocab=loaded.vocab)
    if args.mem_len_sweep:
        losses = sweep_memory(model, loaded, dataset, args, device, log, meters, metrics, work_dir)
    else:
        losses = [score_split(model, split, iterator, dataset, args, device, log, meters, metrics)
                  for split, iterator in splits.items()]
    if args.save_data:
        report_latency(args, meters, work_dir, log, metrics, device, f"{precision}_{runtime}")
    metrics.close()
    code = check_targets(args, losses[-1], meters["throughput"].avg, log)
    distributed.shutdown()
    return code


def eval_work_dir(args) -> Path:
    """Where eval_log.log / eval_log.json go: --work_dir, or without it the folder of --model when it is
    writable (the training's work dir, next to its train_log), so that `eval.py --model WORK/checkpoint_best.pt`
    writes nothing elsewhere."""
    if args.model and "work_dir" not in args.given and not args.load_torchscript and not is_export(args.model):
        model = Path(args.model)
        folder = model if model.is_dir() else model.parent    # a work dir stands for its checkpoint_last.pt
        if os.access(folder, os.W_OK):                        # else (a read-only copy): --work_dir's default
            return folder
    return Path(args.work_dir)


def open_eval_log(args, work_dir: Path):
    """eval_log.log in the work dir (appended to), or no file with --debug."""
    if distributed.is_main_process() and not args.debug:
        work_dir.mkdir(parents=True, exist_ok=True)
    return setup_logging(None if args.debug else work_dir / "eval_log.log", distributed.get_rank(),
                         args.log_all_ranks, filemode="a")


def build_runtime(args, loaded: LoadedModel, device, log):
    """The model in the runtime and precision this run asks for, warmed up; (model, precision, runtime)."""
    if not isinstance(loaded.model, torch.jit.ScriptModule):
        loaded.model.set_attn_impl(args.attn_impl)
    if args.reset_mems_at_doc:
        if isinstance(loaded.model, torch.jit.ScriptModule) or loaded.vocab is None:
            raise UserError("--reset_mems_at_doc needs a model loaded from a checkpoint with its vocabulary; evaluate "
                            "with --model CHECKPOINT or drop --reset_mems_at_doc")
        loaded.model.set_reset_mems_at_doc(end_of_document(args.dataset, args.data, loaded.vocab))
    precision = precision_of(args)
    runtime = "torchscript" if args.load_torchscript and args.type != "compile" else args.type
    if args.load_torchscript and args.type == "pytorch":
        log.info("--load_torchscript: running the TorchScript model (type torchscript)")
    start = time.time()
    model = prepare_runtime(loaded.model, runtime, precision, device, args.compile_mode)
    if args.save_torchscript:
        path = save_torchscript(model if runtime == "torchscript" else loaded.model, args.save_torchscript,
                                loaded.vocab, loaded.model_config, loaded.dataset or args.dataset)
        log.info(f"Saved the TorchScript model to {path}")
    if runtime != "pytorch" or precision != "fp32":
        local_bsz = 1 if args.manual else -(-args.batch_size // distributed.get_world_size())
        warm_up(model, loaded.model_config["n_token"], args.tgt_len, args.mem_len, local_bsz, device, precision,
                runtime)
        log.info(f"Building the model took {time.time() - start:.2f} seconds")
    return model, precision, runtime


def split_iterators(args, vocab, device, n_token: int) -> dict:
    """{split: batch iterator}: the --manual text, or the dataset splits (--split) with this rank's columns."""
    if args.manual:
        return {args.split: data_utils.LMOrderedIterator(manual_ids(args, vocab), 1, args.tgt_len, device=device,
                                                         ext_len=args.ext_len, warmup=False)}
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    if vocab is None:
        vocab = data_utils.get_lm_corpus(args.data, args.dataset, args.manual_vocab, verbose=rank == 0).vocab
        if len(vocab) > n_token:    # a model without a vocabulary: ids past n_token would fail mid-run
            raise UserError(f"the model predicts {n_token} tokens (n_token), but the {args.dataset} vocabulary of "
                            f"{args.data} has {len(vocab)}; set n_token to {len(vocab)} in --manual_config")
    splits = {}
    for split in eval_splits(args):
        ids = data_utils.encode_split(args.data, args.dataset, split, vocab)
        kind = data_utils.LMShuffledIterator if isinstance(ids, data_utils.SentenceData) else data_utils.LMOrderedIterator
        splits[split] = kind(ids, args.batch_size, args.tgt_len, device=device, mem_len=args.mem_len,
                             ext_len=args.ext_len, rank=rank, world_size=world_size)
    return splits


def score_split(model, split, iterator, dataset, args, device, log, meters, metrics) -> float:
    """Evaluate one split, print its result line and log its summary (eval_ppl, and eval_bpc for a
    character-level corpus); the mean loss."""
    loss, _ = evaluate(model, iterator, args, device, log, meters)
    log.info(DOUBLE_LINE)
    log.info(format_split_result(split, loss, dataset))
    log.info(DOUBLE_LINE)
    score = {"eval_ppl": safe_exp(loss), **({"eval_bpc": loss / math.log(2)} if uses_bpc(dataset) else {})}
    metrics.log("SUMMARY", {"split": split, "eval_loss": loss, **score})
    return loss


def sweep_memory(model, loaded, dataset, args, device, log, meters, metrics, work_dir: Path) -> list[float]:
    """--mem_len_sweep: every split at every memory length (inference/mem_sweep.py); the losses, in order."""
    rows, losses = [], []
    for mem_len in sweep_lengths(args.mem_len_sweep):
        run = args.replace(mem_len=mem_len)
        model.reset_length(run.tgt_len, run.ext_len, mem_len)
        log.info(f"--mem_len_sweep: mem_len {mem_len}")
        for split, iterator in split_iterators(run, loaded.vocab, device, loaded.model_config["n_token"]).items():
            loss = score_split(model, split, iterator, dataset, run, device, log, meters, metrics)
            rows.append(result_row(mem_len, split, loss, dataset))
            losses.append(loss)
    log.info(f"Memory sweep: tgt_len {args.tgt_len} clamp_len {args.clamp_len} same_length {args.same_length} "
             f"bsz {args.batch_size}")
    for line in format_table(rows):
        log.info(line)
    if not args.debug and distributed.is_main_process():
        header = {"model": args.model or args.load_torchscript, "dataset": args.dataset, "tgt_len": args.tgt_len,
                  "ext_len": args.ext_len, "clamp_len": args.clamp_len, "same_length": args.same_length,
                  "batch_size": args.batch_size}
        write_json(work_dir / "mem_len_sweep.json", header, rows)
        log.info(f"Wrote {work_dir / 'mem_len_sweep.json'}")
    return losses


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def report_latency(args, meters, work_dir: Path, log, metrics, device, run_name: str) -> None:
    """--save_data: throughput and latency samples after the warm-up batches as JSON
    (work_dir/eval_data_{bsz}_{precision}_{type}.json), and the reference's summary lines."""
    throughput = np.array(meters["throughput"].values, dtype=np.float64)
    latency = np.array(meters["latency"].values, dtype=np.float64)
    if latency.size == 0:
        log.info("No timing samples after the warm-up batches; evaluate more batches for latency figures")
        return
    data = {"args": args.to_dict(), "device": device_name(device),
            "world_size": distributed.get_world_size(), "throughput": throughput.tolist(), "latency": latency.tolist()}
    if not args.debug and distributed.is_main_process():
        path = work_dir / f"eval_data_{args.batch_size}_{run_name}.json"
        write_text_atomic(path, json.dumps(data))
    summary = {"eval_throughput": float(throughput.mean()), "eval_avg_latency": float(latency.mean())}
    log.info(f"Throughput Avg: {throughput.mean():.2f} tok/s")
    log.info(f"Latency Avg: {latency.mean():.2f} ms")
    for p in args.percentiles:
        value = float(np.percentile(latency, p))
        summary[f"eval_{p}%_latency"] = value
        log.info(f"Latency {p}%: {value:.2f} ms")
    log.info(DOUBLE_LINE)
    metrics.log("SUMMARY", summary)


if __name__ == "__main__":
    run_cli(main)
