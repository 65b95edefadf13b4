#!/usr/bin/env python
"""Train a Transformer-XL language model.

    python train.py --config_file configs/wt103_base.yaml --config dgx1_8gpu_fp16 [flags]
    torchrun --nproc_per_node 8 train.py --config_file configs/wt103_base.yaml ...
    srun --ntasks-per-node 8 python train.py ...          (one process per GPU, see run.sub)

The flags, presets and log lines are the reference trainer's (NVIDIA DeepLearningExamples); see README.md.
"""
import utils.runtime.openmp_env  # noqa: F401  (first: bounds OpenMP's spin-wait before torch loads it)
import contextlib
import itertools
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

import data_utils
from mem_transformer import MemTransformerLM
from utils.distributed import group as distributed
from utils.io.checkpoint import copy_checkpoint_atomic, load_checkpoint, remove_partial_writes, save_checkpoint_atomic
from utils.config.cli import dump_config, parse_args, train_parser, CONFIG_DUMP_NAME
from utils.io.errors import UserError, run_cli
from utils.distributed.fsdp import (full_model_state, full_optimizer_state, grad_scaler as sharded_grad_scaler, is_sharded,
                        load_model_state, load_optimizer_state)
from utils.training.evaluation import eval_lengths, evaluate_stream, reduce_eval_result
from utils.training.lr_scheduler import build_scheduler
from utils.training.metrics import (DOUBLE_LINE, LINE, AverageMeter, MetricsWriter, format_eval_line, format_test_line,
                           format_train_line, loss_metrics, safe_exp, setup_logging)
from utils.model.init import count_parameters, init_weights
from utils.training.optimizers import build_optimizer
from utils.training.preemption import PreemptionHandler, clear_marker, write_marker
from utils.model.reference_compat import reference_state_dict_to_ours
from utils.runtime.device import (amp_context, compile_model, configure_backends, environment_summary, grad_scaler,
                           resolve_speed_flags, select_device)
from utils.training.train_step import TrainStep
from utils.data.vocabulary import Vocab

CHECKPOINT_FORMAT = "txl-train-v1"


class TrainingDiverged(UserError):
    exit_code = 3


class PeerFailure(UserError):
    """Another process of the job died or stopped answering (raised from a failed collective)."""
    exit_code = 4


# ----------------------------------------------------------------------------------------------------------
# setup


def adaptive_cutoffs(args, n_token: int) -> tuple[list[int], list[bool]]:
    """Adaptive softmax clusters (--adaptive) as the reference chose them, and which projections are tied.

    wt103 (and wt2, which shares its vocabulary rules): [19997, 39997, 199997] with tied tail projections;
    lm1b: [59997, 99997, 639997], untied. Other vocabularies keep the wt103 cutoffs that fall inside them
    (the reference used cutoffs larger than the vocabulary for BPE).
    """
    if not args.adaptive:
        return [], [False]
    if args.dataset == "lm1b":
        cutoffs, tie_projs = [59997, 99997, 639997], [False, False, False, False]
    else:
        cutoffs, tie_projs = [19997, 39997, 199997], [False, True, True, True]
    kept = [c for c in cutoffs if c < n_token - 1]
    if not kept:
        raise UserError(f"--adaptive needs a vocabulary larger than {cutoffs[0] + 1} tokens, this one has "
                        f"{n_token}; drop --adaptive")
    return kept, tie_projs[: len(kept) + 1]


def build_model_config(args, n_token: int) -> dict:
    cutoffs, tie_projs = adaptive_cutoffs(args, n_token)
    return dict(
        n_token=n_token, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, d_head=args.d_head,
        d_inner=args.d_inner, dropout=args.dropout, dropatt=args.dropatt, dtype=None, tie_weight=args.tied,
        d_embed=args.d_embed, div_val=args.div_val, tie_projs=tie_projs, pre_lnorm=args.pre_lnorm,
        tgt_len=args.tgt_len, ext_len=args.ext_len, mem_len=args.mem_len, cutoffs=cutoffs,
        same_length=args.same_length, attn_type=args.attn_type, clamp_len=args.clamp_len,
        sample_softmax=args.sample_softmax,
    )


def make_work_dir(args, rank: int) -> Path:
    work_dir = Path(args.work_dir)
    if args.append_dataset:
        work_dir = Path(f"{work_dir}-{args.dataset}")
    if args.append_time:
        stamp = distributed.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
        work_dir = work_dir / stamp
    if rank == 0 and not args.debug:
        work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """Every random generator the training uses, as tensors and plain types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": _python_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    return state


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_state(args, model_config, model, optimizer, scheduler, scaler, vocab, mems, tr_iter, progress,
                     device) -> dict:
    """Everything an exact resume needs, gathered from all ranks (rank 0 writes it)."""
    per_rank = {
        "rng": rng_state(device),
        "memory": [None if m is None else m.detach().cpu() for m in mems],
        "data": tr_iter.state_dict(),
    }
    gathered = distributed.gather_objects(per_rank)
    model_state = full_model_state(model)                   # collectives under FSDP: every rank calls them
    optimizer_state = full_optimizer_state(model, optimizer)
    return {
        "format": CHECKPOINT_FORMAT,
        "args": args.to_dict(),
        "model_config": model_config,
        "model_state": model_state,
        "optimizer_state": optimizer_state,
        "scheduler_state": scheduler.state_dict(),
        "scaler_state": scaler.state_dict() if scaler.is_enabled() else None,
        "vocab": vocab.to_dict(),
        "world_size": distributed.get_world_size(),
        "batch_chunk": args.batch_chunk,
        "rng_states": [g["rng"] for g in gathered] if gathered else None,
        "memory": [g["memory"] for g in gathered] if gathered else None,
        "data_states": [g["data"] for g in gathered] if gathered else None,
        **progress,
    }


def save_checkpoint(state: dict, work_dir: Path, is_best: bool, save_all: bool, log) -> None:
    last = work_dir / "checkpoint_last.pt"
    log.info(f"Saving checkpoint to {last}")
    save_checkpoint_atomic(state, last)
    if is_best:
        copy_checkpoint_atomic(last, work_dir / "checkpoint_best.pt")
    if save_all:
        copy_checkpoint_atomic(last, work_dir / f"checkpoint_{state['train_step']}.pt")


def same_vocab(a, b) -> bool:
    return a.to_dict().get("idx2sym") == b.to_dict().get("idx2sym") and len(a) == len(b)


# ----------------------------------------------------------------------------------------------------------
# the loop


class Trainer:
    def __init__(self, args, log):
        self.args, self.log = args, log
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        self.last_train_loss = None  # the last logged training loss

    # ---- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, iterator) -> float:
        """Mean NLL of a split with the training-time evaluation settings (reference §3.5)."""
        args, model = self.args, self.model
        model.eval()
        model.reset_length(*self.eval_len)
        result = evaluate_stream(model, iterator, self.device, max_steps=args.eval_max_steps,
                                 autocast=self.autocast)
        model.reset_length(args.tgt_len, args.ext_len, args.mem_len)
        model.train()
        total, count = reduce_eval_result(result, iterator)
        if count == 0:
            raise UserError("evaluation scored no tokens (--eval_max_steps covers only the memory warm-up "
                            "batches); raise --eval_max_steps or set it to -1")
        return total / count

    # ---- one optimizer step ----------------------------------------------------------------------------------
    def train_step(self, data, target) -> tuple[float, float]:
        return self.step(data, target, self.mems)

    # ---- everything ------------------------------------------------------------------------------------------
    def run(self) -> int:
        args, log = self.args, self.log
        self.device = select_device(args, log)
        device = self.device
        args = self.args = resolve_speed_flags(args, device)
        configure_backends(args, device)
        if not args.no_env:
            log.info(environment_summary(device))
        self.autocast = amp_context(args, device)
        seed_everything(args.seed)

        corpus = data_utils.get_lm_corpus(args.data, args.dataset, args.vocab, cache_dir=args.cache_dir,
                                          verbose=self.rank == 0, progress=self.rank == 0, **corpus_options(args))
        vocab = corpus.vocab
        n_token = len(vocab)
        tr_iter = corpus.get_iterator("train", args.batch_size, args.tgt_len, device=device, ext_len=args.ext_len,
                                      rank=self.rank, world_size=self.world_size, varlen=args.varlen,
                                      seed=args.seed)
        self.eval_len = eval_lengths(args.tgt_len, args.ext_len, args.mem_len, args.eval_tgt_len)
        eval_tgt, eval_ext, eval_mem = self.eval_len
        va_iter, te_iter = (corpus.get_iterator(split, args.eval_batch_size, eval_tgt, device=device,
                                                ext_len=eval_ext, mem_len=eval_mem, rank=self.rank,
                                                world_size=self.world_size)
                            for split in ("valid", "test"))

        model_config = build_model_config(args, n_token)
        model = MemTransformerLM(**model_config)
        init_weights(model, args.init, args.init_range, args.init_std, args.proj_init_std)
        model.set_attn_impl(args.attn_impl)
        model.set_checkpoint_activations(args.checkpoint_activations)
        n_all, n_nonemb = count_parameters(model)
        if not (args.multi_gpu == "fsdp" and self.world_size > 1):
            model.to(device)                                 # FSDP moves each rank's shards there itself
        self.model = model
        self.para_model = distributed.wrap_model(model, args, device)
        self.optimizer = build_optimizer(args, model)        # after sharding: FSDP replaces the parameters
        self.scheduler = build_scheduler(args, self.optimizer)
        self.scaler = sharded_grad_scaler(args, device) if is_sharded(model) else grad_scaler(args, device)
        self.step = TrainStep(model, compile_model(self.para_model, args), self.optimizer, self.scaler,
                              self.autocast, args.clip, args.batch_chunk, args.swap_mem, args.cuda_graphs)
        # Every rank built the same initial weights from --seed; dropout (and sampled softmax) now draw from a
        # stream of their own per rank, so that ranks do not repeat each other's dropout masks.
        seed_everything(args.seed + self.rank)

        log.info(DOUBLE_LINE)
        for key, value in sorted(args.to_dict().items()):
            log.info(f"    - {key} : {value}")
        log.info(DOUBLE_LINE)
        log.info(f"#params = {n_all}")
        log.info(f"#non emb params = {n_nonemb}")

        progress = {"epoch": 1, "batch": 0, "last_iter": 0, "train_step": 0, "best_val_loss": None,
                    "train_elapsed": 0.0, "log_acc": {"loss": 0.0, "steps": 0, "tokens": 0, "elapsed": 0.0}}
        self.mems = [None] * args.batch_chunk
        restart = resolve_restart(args, self.work_dir, log)
        if self.rank == 0 and not args.debug:
            clear_marker(self.work_dir)                      # this run is the resumption of a stopped one
        if restart:
            progress = self.restore(restart, tr_iter, vocab, model_config, progress)
            if progress is None:
                return 1

        throughput = AverageMeter(warmup=args.mem_len // args.tgt_len + 2)
        metrics = MetricsWriter(None if args.debug else self.work_dir / args.dllog_file,
                                None if args.debug else self.work_dir / "tensorboard",
                                enabled=self.rank == 0, append=bool(restart))
        metrics.log("PARAMETER", {k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool))})
        train_step = progress["train_step"]
        best_val_loss = progress["best_val_loss"]
        acc = dict(progress["log_acc"])
        stop_reason = None
        start_time = time.time()
        train_elapsed = progress["train_elapsed"]
        last_eval_step = None
        # main() installed the signal handler before the setup, so that a signal during the setup is not lost
        with contextlib.nullcontext(self.preemption) as preemption:
            for epoch in itertools.count(progress["epoch"]):
                if args.roll:
                    tr_iter.roll(args.seed, epoch)
                log_start = time.time()
                for data, target, seq_len, warm in tr_iter:
                    loss, grad_norm = self.train_step(data, target)
                    train_step += 1
                    used_lr = self.optimizer.param_groups[0]["lr"]
                    self.scheduler.step(train_step)
                    if not math.isfinite(loss):
                        self.diverged(train_step, "training loss", loss)
                    if not math.isfinite(grad_norm) and not self.scaler.is_enabled():  # fp16: a skipped step
                        self.diverged(train_step, "gradient norm", grad_norm)
                    acc["loss"] += loss
                    acc["steps"] += 1
                    acc["tokens"] += target.numel()

                    if train_step % args.log_interval == 0:
                        elapsed = time.time() - log_start + acc["elapsed"]
                        cur_loss = distributed.all_reduce_item(acc["loss"] / acc["steps"], "mean")
                        avg_elapsed = distributed.all_reduce_item(elapsed / acc["steps"], "max")
                        tokens = distributed.all_reduce_item(acc["tokens"], "sum")
                        tok_per_s = tokens / elapsed if elapsed > 0 else 0.0
                        throughput.update(tok_per_s, elapsed)
                        log.info(format_train_line(epoch, train_step, tr_iter.batch, tr_iter.n_batch, used_lr,
                                                   avg_elapsed * 1000, tok_per_s, cur_loss, args.dataset))
                        record = {"epoch": epoch, "train_batch": tr_iter.batch, "lr": used_lr,
                                  "train_time/batch": avg_elapsed * 1000, "train_throughput": tok_per_s,
                                  **loss_metrics("train", cur_loss, args.dataset), "grad_norm": grad_norm}
                        if self.scaler.is_enabled():
                            skipped = self.step.skipped_steps
                            record["skipped_steps"] = skipped
                            record["loss_scale"] = self.scaler.get_scale()
                            if skipped:
                                log.info(f"fp16: {skipped} of the last {acc['steps']} steps skipped "
                                         f"(loss scale now {self.scaler.get_scale():.0f})")
                            self.step.skipped_steps = 0
                        metrics.log(train_step, record, tb_prefix="train")
                        self.last_train_loss = cur_loss
                        acc = {"loss": 0.0, "steps": 0, "tokens": 0, "elapsed": 0.0}
                        log_start = time.time()

                    preempted = distributed.any_rank(preemption.requested)
                    done = train_step >= args.max_step
                    if train_step % args.eval_interval == 0 or done or preempted:
                        pause = time.time()
                        val_loss = None
                        if not args.no_eval and not preempted:
                            eval_start = time.time()
                            val_loss = self.evaluate(va_iter)
                            if not math.isfinite(val_loss):
                                self.diverged(train_step, "validation loss", val_loss)
                            log.info(LINE)
                            log.info(format_eval_line(train_step // args.eval_interval, train_step,
                                                      time.time() - eval_start, val_loss, args.dataset))
                            log.info(LINE)
                            metrics.log(train_step, {"valid_elapsed": time.time() - eval_start,
                                                     **loss_metrics("valid", val_loss, args.dataset)},
                                        tb_prefix="valid")
                            self.scheduler.step_eval(val_loss)
                        is_best = val_loss is not None and (best_val_loss is None or val_loss < best_val_loss)
                        if is_best:
                            best_val_loss = val_loss
                        if not args.debug:
                            acc_saved = dict(acc, elapsed=acc["elapsed"] + pause - log_start)
                            state = checkpoint_state(
                                args, model_config, model, self.optimizer, self.scheduler, self.scaler, vocab,
                                self.mems, tr_iter, {
                                    "epoch": epoch, "batch": tr_iter.batch, "last_iter": tr_iter.last_iter,
                                    "train_step": train_step, "best_val_loss": best_val_loss,
                                    "train_elapsed": train_elapsed + time.time() - start_time,
                                    "log_acc": acc_saved}, device)
                            if self.rank == 0:
                                save_checkpoint(state, self.work_dir, is_best, args.save_all, log)
                        last_eval_step = train_step
                        log_start += time.time() - pause  # evaluation time does not count as training time
                        if preempted:
                            stop_reason = "preempted"
                            break
                        if done:
                            break
                if stop_reason or train_step >= args.max_step:
                    break
            if stop_reason is None:
                log.info(LINE)
                log.info("End of training")

        train_elapsed += time.time() - start_time
        distributed.barrier()
        if stop_reason == "preempted":
            if args.debug:
                log.info(f"Received a signal, exiting at step {train_step} (--debug: no checkpoint)")
                return 0
            name = preemption.signal_name or "a signal (on another rank)"
            if self.rank == 0:
                write_marker(self.work_dir, name, train_step)
            log.info(f"Received {name}, exiting after saving the checkpoint at step {train_step}; "
                     f"resume with --restart {self.work_dir}")
            return 0

        test_loss = None
        best_path = self.work_dir / "checkpoint_best.pt"
        if not (args.debug or args.no_test or args.no_eval) and best_path.is_file():
            best = load_checkpoint(best_path, map_location=device)
            load_model_state(model, best["model_state"])
            test_start = time.time()
            test_loss = self.evaluate(te_iter)
            log.info(DOUBLE_LINE)
            log.info(format_test_line(time.time() - test_start, test_loss, args.dataset))
            log.info(DOUBLE_LINE)
        log.info(f"Training time: {train_elapsed / 60:.2f} minutes")
        log.info(f"Training throughput: {throughput.avg_or_warmup():.2f} tok/s")
        summary = {"train_throughput": throughput.avg_or_warmup(), "train_elapsed": train_elapsed / 60}
        if self.last_train_loss is not None:
            summary["train_loss"] = self.last_train_loss
        if test_loss is not None:
            summary.update(loss_metrics("test", test_loss, args.dataset))
        if best_val_loss is not None:
            summary.update(loss_metrics("valid", best_val_loss, args.dataset))
        metrics.log("SUMMARY", summary)
        metrics.close()
        return check_targets(args, best_val_loss, throughput.avg_or_warmup(), log)

    # ---- restart ---------------------------------------------------------------------------------------------
    def restore(self, path, tr_iter, vocab, model_config, progress) -> dict | None:
        args, log = self.args, self.log
        ckpt = load_checkpoint(path, map_location=self.device)
        if ckpt["format"] == "reference":
            ckpt_vocab = Vocab.from_reference(ckpt["vocab"])
            state = reference_state_dict_to_ours(ckpt["model_state"], ckpt["model_config"])
        else:
            ckpt_vocab = Vocab.from_dict(ckpt["vocab"])
            state = ckpt["model_state"]
        if not same_vocab(ckpt_vocab, vocab):
            raise UserError(f"checkpoint {path} was trained with another vocabulary ({len(ckpt_vocab)} symbols, "
                            f"this corpus has {len(vocab)}); restart with the same --data / --dataset / --vocab")
        arch = ("n_token", "n_layer", "n_head", "d_model", "d_head", "d_inner", "d_embed", "div_val", "cutoffs",
                "tie_weight", "attn_type", "pre_lnorm")
        changed = [k for k in arch if ckpt["model_config"].get(k) != model_config.get(k)]
        if changed:
            differences = ", ".join(f"{k}={ckpt['model_config'].get(k)}" for k in changed)
            raise UserError(f"checkpoint {path} has another model ({differences}); restart with the same model flags")
        if ckpt["train_step"] >= args.max_step:
            log.info(f"Loaded checkpoint after {ckpt['train_step']} steps, but this run was scheduled for a total "
                     f"of {args.max_step} steps, exiting")
            return None
        load_model_state(self.model, state)
        self.model.update_dropout(args.dropout)
        self.model.update_dropatt(args.dropatt)
        if ckpt["format"] == "reference":
            log.info(f"Loaded the reference checkpoint {path} (model weights, step {ckpt['train_step']}); the "
                     "optimizer state, memory and data position start fresh")
            self.scheduler.step(ckpt["train_step"])
            return dict(progress, train_step=ckpt["train_step"], best_val_loss=ckpt.get("best_val_loss"))
        try:
            load_optimizer_state(self.model, self.optimizer, ckpt["optimizer_state"])
        except (ValueError, KeyError) as exc:
            raise UserError(f"checkpoint {path}: the optimizer state does not fit --optim {args.optim} ({exc}); "
                            "restart with the optimizer it was trained with") from None
        self.scheduler.load_state_dict(ckpt["scheduler_state"])
        if ckpt.get("scaler_state") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler_state"])
        same_layout = ckpt["world_size"] == self.world_size and ckpt["batch_chunk"] == args.batch_chunk
        if same_layout:
            set_rng_state(ckpt["rng_states"][self.rank], self.device)
            self.mems = [None if m is None else m.to(self.device) for m in ckpt["memory"][self.rank]]
            if args.swap_mem:
                self.mems = [None if m is None else m.cpu() for m in self.mems]
            tr_iter.load_state_dict(ckpt["data_states"][self.rank])
        else:
            log.info(f"Checkpoint written by {ckpt['world_size']} process(es) with batch_chunk {ckpt['batch_chunk']}; "
                     f"this run has {self.world_size} and {args.batch_chunk}: memory and random state start fresh, "
                     "the data stream resumes at the same position")
            data_state = dict(ckpt["data_states"][0])
            tr_iter.load_state_dict(data_state)
        log.info(f"Resuming from {path} at step {ckpt['train_step']}")
        return {k: ckpt[k] for k in progress}

    def diverged(self, step: int, what: str, value: float) -> None:
        """Stop without writing a checkpoint: the last one written holds the last good weights."""
        last = self.work_dir / "checkpoint_last.pt"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        raise TrainingDiverged(f"the {what} became {value} at step {step}; stopped without saving, {kept}; "
                               "lower --lr, raise --warmup_step or use --bf16 instead of --fp16")


def resolve_restart(args, work_dir: Path, log) -> str:
    """The checkpoint to resume from ("" for a fresh start).

    --restart PATH: that checkpoint (a folder: its checkpoint_last.pt, or a fresh start while it has none, so
    one command line serves the first launch and every requeue). --restart auto: the work dir's
    checkpoint_last.pt when there is one.
    When torchrun restarted the workers after a failure (--max-restarts, TORCHELASTIC_RESTART_COUNT > 0), the
    work dir's checkpoint_last.pt is this run's latest state, so it wins over --restart when it exists.
    Rank 0 looks at the file system for all ranks.
    """
    restarted = distributed.env_int("TORCHELASTIC_RESTART_COUNT", 0) > 0
    if not restarted and args.restart != "auto":
        folder = Path(args.restart)
        empty = bool(args.restart) and folder.is_dir() and not (folder / "checkpoint_last.pt").exists()
        if distributed.broadcast_object(empty):
            log.info(f"No checkpoint in {folder} yet, starting training from random init")
            return ""
        return args.restart
    last = work_dir / "checkpoint_last.pt"
    why = "torchrun restarted the workers" if restarted else "--restart auto"
    if distributed.broadcast_object(last.is_file()):
        log.info(f"{why}: resuming from {last}")
        return str(last)
    fallback = "" if args.restart == "auto" else args.restart
    log.info(f"{why}: no checkpoint in {work_dir} yet, " + (f"resuming from {fallback}" if fallback else
                                                              "starting from scratch"))
    return fallback


def check_batch_split(args, world_size: int) -> None:
    """Every rank gets the same number of batch columns, and each rank's share splits into batch_chunk chunks."""
    if args.batch_size % world_size:
        raise UserError(f"--batch_size {args.batch_size} does not split evenly over {world_size} processes; use a "
                        f"multiple of {world_size} (or --local_batch_size, the batch per process)")
    local = args.batch_size // world_size
    if local % args.batch_chunk:
        raise UserError(f"the batch per process ({args.batch_size} / {world_size} = {local}) does not split into "
                        f"--batch_chunk {args.batch_chunk} chunks; choose a --batch_chunk that divides {local}")


def corpus_options(args) -> dict:
    """Vocabulary options of data_utils.get_lm_corpus (the custom-only ones only for --dataset custom)."""
    options = {"bpe_model": args.bpe_model, "bpe_vocab_size": args.bpe_vocab_size}
    if args.dataset == "custom":
        options.update(custom_level=args.custom_level, lower_case=args.lower_case, min_freq=args.min_freq,
                       max_size=args.max_vocab_size)
    return options


def check_targets(args, best_val_loss, throughput: float, log) -> int:
    """--target_perplexity / --target_throughput: exit code 1 when a target is missed."""
    passed = True
    if args.target_perplexity is not None:
        achieved = safe_exp(best_val_loss) if best_val_loss is not None else float("inf")
        log.info(f"Perplexity achieved: {achieved:.2f} target: {args.target_perplexity:.2f}")
        ok = achieved <= args.target_perplexity
        log.info(f"Perplexity test {'passed' if ok else 'failed'}")
        passed &= ok
    if args.target_throughput is not None:
        log.info(f"Throughput achieved: {throughput:.2f} target: {args.target_throughput:.2f}")
        ok = throughput >= args.target_throughput
        log.info(f"Throughput test {'passed' if ok else 'failed'}")
        passed &= ok
    return 0 if passed else 1


def main() -> int:
    distributed.adopt_slurm_env()                       # one process per srun task: ranks from SLURM_* variables
    args = parse_args(train_parser(), section="train")
    with PreemptionHandler() as preemption:
        args = distributed.init_from_env(args)
        try:
            code = train(args, preemption)
        except (torch.distributed.DistError, RuntimeError) as exc:
            if not distributed.is_initialized() or not is_peer_failure(exc):
                raise
            # no orderly shutdown of the process group: it would wait for the peer that is gone
            raise PeerFailure(f"rank {distributed.get_rank()}: another process of the job failed or stopped "
                              f"answering ({distributed.first_line(exc)}); the job cannot go on. Resume from the "
                              "last checkpoint with --restart <work_dir> (or --restart auto)") from None
        distributed.shutdown()
        return code


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because a peer died, closed its connection or timed out."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc).lower()
    return any(k in text for k in ("connection closed", "connection reset", "broken pipe", "timed out"))


def train(args, preemption: PreemptionHandler) -> int:
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    if args.local_batch_size is not None:
        args = args.replace(batch_size=world_size * args.local_batch_size)
    check_batch_split(args, world_size)
    trainer_work_dir = make_work_dir(args, rank)
    log_file = None if args.debug else trainer_work_dir / args.txtlog_file
    resuming = bool(args.restart) or distributed.env_int("TORCHELASTIC_RESTART_COUNT", 0) > 0
    log = setup_logging(log_file if not args.debug else None, rank, args.log_all_ranks,
                        filemode="a" if resuming else "w")
    if rank == 0 and not args.debug:
        log.info(f"Experiment dir : {trainer_work_dir}")
        for partial in remove_partial_writes(trainer_work_dir):
            log.info(f"Removed {partial.name}: a checkpoint write cut short by a killed run")
        dump_config(args, trainer_work_dir / CONFIG_DUMP_NAME, section="train")
    log.info(f"world size: {world_size}" + (f" ({args.multi_gpu})" if world_size > 1 else ""))
    trainer = Trainer(args, log)
    trainer.work_dir = trainer_work_dir
    trainer.preemption = preemption
    return trainer.run()


if __name__ == "__main__":
    run_cli(main)
