"""Checkpoints of a training run: what goes into one, writing last / best / every one (--save_all), which
one a run resumes from, and resuming from it.

A checkpoint (format txl-train-v2) holds, as tensors and plain Python types:

    format, args (the configuration), model_config, vocab, model_state, optimizer_state,
    and the TrainState (utils/training/state.py): train_step, tokens_seen, epoch, batch, last_iter,
    best_val_loss, train_elapsed, log_acc, world_size, batch_chunk, data_states, rng_states, memory,
    scheduler_state, scaler_state.

txl-train-v1 (before TrainState) had the same keys without tokens_seen. eval.py / generate.py read
format, model_config, model_state, vocab and args["dataset"]. The reference trainer's checkpoints resume with
their weights only.
"""
import logging
from pathlib import Path

import torch

from utils.data.vocabulary import Vocab, check_fingerprint
from utils.distributed import group as distributed
from utils.distributed.fsdp import full_model_state, full_optimizer_state, load_model_state, load_optimizer_state
from utils.io.checkpoint import CHECKPOINT_FORMAT, copy_checkpoint_atomic, load_checkpoint, save_checkpoint_atomic
from utils.io.errors import UserError
from utils.model.model_config import architecture_differences
from utils.model.reference_compat import reference_state_dict_to_ours
from utils.training.reference_resume import (check_optimizer_shapes, optimizer_family_of_groups, parameter_names,
                                             restore_reference_run)
from utils.training.rng import rng_state, set_rng_state
from utils.training.state import LogInterval, TrainState, check_state_values

def newest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a resume of `folder` starts from: checkpoint_last.pt, or, where it is missing (deleted, or
    a kill between the files of the first save, which writes checkpoint_best.pt and --save_all's copy before
    it), the newest complete one left: the highest checkpoint_<step>.pt, then checkpoint_best.pt. A fresh start
    there would replace them."""
    last = folder / "checkpoint_last.pt"
    if last.is_file():
        return last
    numbered = [(int(p.stem.split("_")[1]), p) for p in folder.glob("checkpoint_*.pt")
                if p.stem.split("_")[1].isdigit() and p.is_file()]
    if numbered:
        return max(numbered)[1]
    best = folder / "checkpoint_best.pt"
    return best if best.is_file() else None


def resolve_restart(args, work_dir: Path, log: logging.Logger) -> str:
    """The checkpoint to resume from ("" for a fresh start).

    --restart PATH: that checkpoint (a folder: its newest checkpoint, see newest_checkpoint, or a fresh start
    while it has none, so one command line serves the first launch and every requeue). --restart auto: the work
    dir's newest checkpoint when there is one.
    When torchrun restarted the workers after a failure (--max-restarts, TORCHELASTIC_RESTART_COUNT > 0), the
    work dir's newest checkpoint is this run's latest state, so it wins over --restart when it exists.
    Rank 0 looks at the file system for all ranks.
    """
    restarted = distributed.env_int("TORCHELASTIC_RESTART_COUNT", 0) > 0
    if not restarted and args.restart != "auto":
        folder = Path(args.restart)
        if not distributed.broadcast_object(folder.is_dir()):
            return args.restart
        found = distributed.broadcast_object(newest_checkpoint(folder))
        if found is None:
            log.info(f"No checkpoint in {folder} yet, starting training from random init")
            return ""
        if found.name == "checkpoint_last.pt":
            return args.restart
        log.info(f"No checkpoint_last.pt in {folder}: resuming from {found.name}, the newest checkpoint there")
        return str(found)
    found = distributed.broadcast_object(newest_checkpoint(work_dir) if work_dir.is_dir() else None)
    why = "torchrun restarted the workers" if restarted else "--restart auto"
    if found is not None:
        log.info(f"{why}: resuming from {found}")
        return str(found)
    fallback = "" if args.restart == "auto" else args.restart
    log.info(f"{why}: no checkpoint in {work_dir} yet, " + (f"resuming from {fallback}" if fallback else
                                                              "starting from scratch"))
    return fallback


def _family(optim: str) -> str:
    """Optimizers whose states are interchangeable: jitlamb is the multi-tensor form of lamb."""
    return "lamb" if optim in ("lamb", "jitlamb") else optim


def same_vocab(a: Vocab, b: Vocab) -> bool:
    # the fingerprint, not the symbol lists: BPE vocabularies have none, and two of one size passed as equal
    return len(a) == len(b) and a.fingerprint() == b.fingerprint()


class Checkpointer:
    """Takes and restores the checkpoints of one run: the model, optimizer, scheduler and scaler it was
    given, the training data iterator's position, and the TrainState."""

    def __init__(self, args, work_dir: Path, log: logging.Logger, device: torch.device, parts: dict):
        """`parts`: model_config, vocab, model, optimizer, scheduler, scaler, train_iter."""
        self.args, self.work_dir, self.log, self.device = args, Path(work_dir), log, device
        self.model_config, self.vocab = parts["model_config"], parts["vocab"]
        self.model, self.optimizer = parts["model"], parts["optimizer"]
        self.scheduler, self.scaler, self.train_iter = parts["scheduler"], parts["scaler"], parts["train_iter"]
        # the memory, data position and random state are per data-parallel rank (see group.gather_dp_objects)
        self.rank, self.world_size = distributed.dp_rank(), distributed.dp_world_size()

    # ---- taking one ------------------------------------------------------------------------------------------
    def capture(self, state: TrainState, mems: list) -> dict:
        """The checkpoint of this moment. Every rank calls it (its per-rank parts are gathered, and FSDP
        gathers the full weights); only rank 0's result is complete."""
        per_rank = {"rng": rng_state(self.device), "memory": [None if m is None else m.detach().cpu() for m in mems],
                    "data": self.train_iter.state_dict()}
        gathered = distributed.gather_dp_objects(per_rank)
        state.batch, state.last_iter = self.train_iter.batch, self.train_iter.last_iter
        state.world_size, state.batch_chunk = self.world_size, self.args.batch_chunk
        state.rng_states = [g["rng"] for g in gathered] if gathered else None
        state.memory = [g["memory"] for g in gathered] if gathered else None
        state.data_states = [g["data"] for g in gathered] if gathered else None
        state.scheduler_state = self.scheduler.state_dict()
        state.scaler_state = self.scaler.state_dict() if self.scaler.is_enabled() else None
        model_state = full_model_state(self.model)          # collectives under FSDP: every rank calls them
        optimizer_state = full_optimizer_state(self.model, self.optimizer)
        ckpt = {"format": CHECKPOINT_FORMAT, "args": self.args.to_dict(), "model_config": self.model_config,
                "vocab": self.vocab.to_dict(), "vocab_fingerprint": self.vocab.fingerprint(), "model_state": model_state, "optimizer_state": optimizer_state,
                **state.state_dict()}
        state.drop_snapshot()                               # the checkpoint holds it; the live objects go on
        return ckpt

    def save(self, ckpt: dict, is_best: bool) -> None:
        """Rank 0: checkpoint_last.pt, and a copy as checkpoint_best.pt / checkpoint_<step>.pt (--save_all).

        checkpoint_last.pt is written last: it records (best_val_loss, the step) that this save is done, so
        the copies it promises must exist before it does. A process killed anywhere in between leaves the
        previous checkpoint_last.pt, the resumed run redoes the steps since then and writes every file of this
        save again, bit for bit the same. (Written first, checkpoint_last.pt would record the new best
        validation loss while checkpoint_best.pt still held an older step, and a resumed run would never write
        the best again.)"""
        last = self.work_dir / "checkpoint_last.pt"
        files = [self.work_dir / "checkpoint_best.pt"] if is_best else []
        if self.args.save_all:
            files.append(self.work_dir / f"checkpoint_{ckpt['train_step']}.pt")
        files.append(last)
        self.log.info(f"Saving checkpoint to {last}")
        save_checkpoint_atomic(ckpt, files[0])              # serialised once, the others are copies of it
        for file in files[1:]:
            copy_checkpoint_atomic(files[0], file)

    # ---- resuming from one -----------------------------------------------------------------------------------
    def restore(self, path: str) -> tuple[TrainState, list] | None:
        """Load the checkpoint at `path` into the model, optimizer, scheduler, scaler and data iterator;
        returns its TrainState and this rank's memory, or None when it already reached --max_step. A checkpoint
        that does not fit this run (another vocabulary, model, optimizer or data stream; missing, extra or
        damaged fields) is one UserError naming it."""
        ckpt = load_checkpoint(path, map_location=self.device)
        try:
            if ckpt["format"] != "reference":
                vocab = Vocab.from_dict(ckpt["vocab"])
        except (UserError, KeyError, TypeError, ValueError, AttributeError):
            raise UserError(f"checkpoint {path} cannot be resumed: its vocabulary is missing or damaged; resume "
                            "from another checkpoint") from None
        if ckpt["format"] != "reference":
            check_fingerprint(vocab, ckpt.get("vocab_fingerprint"), f"checkpoint {path}",
                              "the file was altered; resume from another checkpoint")
        try:
            return self._restore(ckpt, path)
        except UserError as exc:
            raise UserError(f"checkpoint {path} cannot be resumed: {exc}") from None
        except KeyError as exc:
            raise UserError(f"checkpoint {path} cannot be resumed: it has no {exc} field; resume from another "
                            "checkpoint") from None

    def _restore(self, ckpt: dict, path) -> tuple[TrainState, list] | None:
        reference = ckpt["format"] == "reference"
        state = self._reference_state(ckpt) if reference else self._train_state(ckpt)
        self._check_fits(ckpt, reference)
        if state.train_step >= self.args.max_step:
            self.log.info(f"Loaded checkpoint after {state.train_step} steps, but this run was scheduled for a "
                          f"total of {self.args.max_step} steps, exiting")
            return None
        self._load_weights(ckpt, reference)
        if reference:
            self.log.info(f"Loaded the reference checkpoint {path} at step {state.train_step}")
            mems = restore_reference_run(ckpt, args=self.args, model=self.model, optimizer=self.optimizer,
                                         scheduler=self.scheduler, scaler=self.scaler, train_iter=self.train_iter,
                                         state=state, rank=self.rank, world_size=self.world_size,
                                         device=self.device, log=self.log)
            return state, mems
        self._forget_a_missing_best(state)
        self._restore_optimization(ckpt, state)
        mems = self._restore_position(state)
        state.drop_snapshot()
        self.log.info(f"Resuming from {path} at step {state.train_step}")
        return state, mems

    def _forget_a_missing_best(self, state: TrainState) -> None:
        """A checkpoint's best validation loss promises a checkpoint_best.pt of that loss. This work dir has
        none when the run continues another directory's checkpoint (or the file was deleted): forget the loss,
        so that the next validation writes one, instead of never while the loss stays above the old best."""
        best = self.work_dir / "checkpoint_best.pt"
        if state.best_val_loss is None or distributed.broadcast_object(best.is_file()):
            return
        self.log.info(f"No {best} for the checkpoint's best validation loss {state.best_val_loss:.4f}: the next "
                      "validation writes it")
        state.best_val_loss = None

    def _check_fits(self, ckpt: dict, reference: bool) -> None:
        """The checkpoint's vocabulary, architecture and optimizer are this run's."""
        ckpt_vocab = Vocab.from_reference(ckpt["vocab"]) if reference else Vocab.from_dict(ckpt["vocab"])
        if not same_vocab(ckpt_vocab, self.vocab):
            same_size = " of the same size, other symbols" if len(ckpt_vocab) == len(self.vocab) else ""
            raise UserError(f"it was trained with another vocabulary{same_size} ({len(ckpt_vocab)} symbols, this "
                            f"corpus has {len(self.vocab)}); restart with the same --data / --dataset / --vocab")
        differences = architecture_differences(ckpt["model_config"], self.model_config)
        if differences:
            raise UserError(f"it has another model ({', '.join(differences)}); restart with the same model flags")
        trained_with = (ckpt.get("args") or {}).get("optim")
        if reference and not trained_with:                  # its args may lack it: its param_groups tell
            trained_with = optimizer_family_of_groups((ckpt.get("optimizer_state") or {}).get("param_groups"))
        if trained_with and _family(trained_with) != _family(self.args.optim):
            raise UserError(f"it was trained with --optim {trained_with}, this run has --optim {self.args.optim}; "
                            f"resume with --optim {trained_with}")

    def _load_weights(self, ckpt: dict, reference: bool) -> None:
        state = reference_state_dict_to_ours(ckpt["model_state"], ckpt["model_config"]) if reference \
            else ckpt["model_state"]
        try:
            load_model_state(self.model, state)
        except (RuntimeError, KeyError, ValueError) as exc:   # missing, extra or misshapen weights
            reason = " ".join(str(exc).split())
            raise UserError(f"its weights do not fit the model ({reason[:300]})") from None
        self.model.update_dropout(self.args.dropout)
        self.model.update_dropatt(self.args.dropatt)

    def _reference_state(self, ckpt: dict) -> TrainState:
        step, best = ckpt.get("train_step"), ckpt.get("best_val_loss")
        check_state_values({"train_step": step, "best_val_loss": best, "log_acc": LogInterval().state_dict(),
                            "world_size": 1, "data_states": None, "rng_states": None, "memory": None})
        return TrainState(train_step=step, tokens_seen=self._estimated_tokens(step), best_val_loss=best)

    def _train_state(self, ckpt: dict) -> TrainState:
        state = TrainState()
        state.load_state_dict(ckpt)                         # checks every field first
        if "tokens_seen" not in ckpt:                       # txl-train-v1 did not count the tokens
            state.tokens_seen = self._estimated_tokens(state.train_step)
        return state

    def _estimated_tokens(self, steps: int) -> int:
        """Checkpoints before txl-train-v2 did not count the tokens: `steps` full batches of this run's size."""
        return steps * self.args.batch_size * self.args.tgt_len

    def _restore_optimization(self, ckpt: dict, state: TrainState) -> None:
        check_optimizer_shapes(ckpt["optimizer_state"], ckpt["model_state"],
                               parameter_names(self.model, self.optimizer))
        try:
            load_optimizer_state(self.model, self.optimizer, ckpt["optimizer_state"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"the optimizer state does not fit --optim {self.args.optim} ({exc}); restart with the "
                            "optimizer it was trained with") from None
        self.scheduler.load_state_dict(state.scheduler_state)
        if state.scaler_state is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(state.scaler_state)

    def _restore_position(self, state: TrainState) -> list:
        """Put the data iterator (and, with the same layout, the random generators and the memory) where the
        checkpoint left them; returns this rank's memory."""
        args = self.args
        if not state.same_layout(self.world_size, args.batch_chunk):
            self.log.info(f"Checkpoint written by {state.world_size} process(es) with batch_chunk "
                          f"{state.batch_chunk}; this run has {self.world_size} and {args.batch_chunk}: memory and "
                          "random state start fresh, the data stream resumes at the same position")
            self.train_iter.load_state_dict(dict(state.data_states[0]))
            return [None] * args.batch_chunk
        set_rng_state(state.rng_states[self.rank], self.device)
        mems = [None if m is None else m.to(self.device) for m in state.memory[self.rank]]
        if args.swap_mem:
            mems = [None if m is None else m.cpu() for m in mems]
        self.train_iter.load_state_dict(state.data_states[self.rank])
        return mems
