"""The training loop: next batch, train step, log, evaluate, checkpoint, stop.

`Trainer(args, log, work_dir, device, corpus, model, model_config, preemption).run()` trains `model` (built and
initialized by the caller, not yet on the device) on `corpus` and returns the exit code. The progress lives in
one TrainState (utils/training/state.py); checkpoints are the Checkpointer's, evaluation the Evaluator's.
"""
import logging
import time
from pathlib import Path

import torch

from utils.distributed import group as distributed
from utils.distributed.fsdp import grad_scaler as sharded_grad_scaler, is_sharded
from utils.model.init import count_parameters
from utils.runtime.device import amp_context, compile_model, grad_scaler
from utils.training.batch_schedule import BatchPlan, ScheduledStream
from utils.training.checkpointer import Checkpointer, resolve_restart
from utils.training.divergence import DivergenceGuard
from utils.training.evaluator import Evaluator, check_targets
from utils.training.lr_scaling import describe as describe_lr_scaling
from utils.training.lr_scheduler import build_scheduler
from utils.training.metrics import (DOUBLE_LINE, LINE, AverageMeter, MetricsWriter, corpus_label,
                                    format_train_line, loss_metrics)
from utils.training.noise_scale import NoiseScaleMeter, interval_record
from utils.training.optimizers import build_optimizer
from utils.training.plots import redraw_curves
from utils.training.progress import eta_seconds, progress_fields
from utils.training.preemption import PreemptionHandler, clear_marker, write_marker
from utils.training.rng import seed_everything
from utils.training.state import LogInterval, TrainState
from utils.training.step_metrics import StepMetrics
from utils.training.train_step import TrainStep


class Trainer:
    def __init__(self, args, log: logging.Logger, work_dir: Path, device: torch.device, corpus, model,
                 model_config: dict, preemption: PreemptionHandler):
        self.args, self.log, self.work_dir, self.device = args, log, Path(work_dir), device
        self.preemption = preemption
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        # the data, the memory and the random streams are per data-parallel rank (the ranks of a tensor-parallel
        # group share them: their replicated activations need the same dropout masks)
        self.dp_rank, self.dp_world_size = distributed.dp_rank(), distributed.dp_world_size()
        self.autocast = amp_context(args, device)
        self.guard = DivergenceGuard(self.work_dir)
        self.evaluator = Evaluator(model, args, device, self.autocast, log, self.guard,
                                   label=corpus_label(args.dataset, args.custom_level, corpus.vocab))
        self.plan = BatchPlan(args)                         # the global batch, tokens and LR factor of each step
        self.state = TrainState(world_size=self.dp_world_size, batch_chunk=args.batch_chunk)
        self.train_iter, self.valid_iter, self.test_iter = self._iterators(corpus)
        self.n_params = count_parameters(model)             # (all, non-embedding), before FSDP shards them
        self.model = model
        self.optimizer, self.scheduler, self.scaler, self.optimizer_step = self._build_optimization(model)
        self.checkpointer = Checkpointer(args, self.work_dir, log, device, dict(
            model_config=model_config, vocab=corpus.vocab, model=model, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.scaler, train_iter=self.train_iter))
        # loss / gradient norm stay on the device between log intervals (no host sync per step, issue 18)
        self.step_metrics = StepMetrics(device, check_grad_norm=not self.scaler.is_enabled())
        self.mems = [None] * args.batch_chunk               # the memory of each batch chunk
        self.throughput = AverageMeter(warmup=args.mem_len // args.tgt_len + 2)
        self.metrics = None                                 # opened by run(), once it knows whether it resumes
        self.last_train_loss = None                         # the last logged training loss (the summary's)
        self.interval_start = self.run_clock = time.time()  # when the log interval's / run's timing resumed
        # Every rank built the same initial weights from --seed; dropout (and sampled softmax) now draw from a
        # stream of their own per rank, so that ranks do not repeat each other's dropout masks.
        seed_everything(args.seed + self.dp_rank)

    # ---- setup -----------------------------------------------------------------------------------------------
    def _iterators(self, corpus) -> tuple:
        args, rank, world_size = self.args, self.dp_rank, self.dp_world_size
        def train_iterator(batch_size):
            return corpus.get_iterator("train", batch_size, args.tgt_len, device=self.device, ext_len=args.ext_len,
                                       rank=rank, world_size=world_size, varlen=args.varlen, seed=args.seed)
        train = train_iterator(args.batch_size) if not self.plan.scheduled else ScheduledStream(
            train_iterator, lambda: self.plan.batch_at(self.state.train_step), self.device)
        eval_tgt, eval_ext, eval_mem = self.evaluator.lengths
        valid, test = (corpus.get_iterator(split, args.eval_batch_size, eval_tgt, device=self.device,
                                           ext_len=eval_ext, mem_len=eval_mem, rank=rank, world_size=world_size)
                       for split in ("valid", "test"))
        return train, valid, test

    def _build_optimization(self, model) -> tuple:
        """(optimizer, LR schedule, loss scaler, step) of the model, which goes on the device (DDP- or
        FSDP-wrapped for several processes)."""
        args, device = self.args, self.device
        if not (args.multi_gpu == "fsdp" and self.world_size > 1 and args.tensor_parallel == 1):
            model.to(device)                                 # FSDP moves each rank's shards there itself
        para_model = distributed.wrap_model(model, args, device)
        optimizer = build_optimizer(args, model)             # after sharding: FSDP replaces the parameters
        scheduler = build_scheduler(args, optimizer, self.plan)
        sharded = is_sharded(model) or args.tensor_parallel > 1     # each rank sees part of the gradients
        scaler = sharded_grad_scaler(args, device) if sharded else grad_scaler(args, device)
        step = TrainStep(model, compile_model(para_model, args), optimizer, scaler, self.autocast, args.clip,
                         args.batch_chunk, args.swap_mem, args.cuda_graphs)
        if args.log_noise_scale:                             # the last chunk's gradient is all-reduced with DDP
            step.observer = NoiseScaleMeter(model.parameters(), args.batch_chunk, self.world_size == 1, scaler)
            hook_state = getattr(para_model, "comm_hook_state", None)
            if hook_state is not None and args.batch_chunk == 1:   # one chunk per rank: the ranks' gradients
                hook_state.observer = step.observer
            if hasattr(optimizer, "keep_trust_ratios"):
                optimizer.keep_trust_ratios()
        return optimizer, scheduler, scaler, step

    def _log_configuration(self) -> None:
        log = self.log
        log.info(DOUBLE_LINE)
        for key, value in sorted(self.args.to_dict().items()):
            log.info(f"    - {key} : {value}")
        log.info(DOUBLE_LINE)
        log.info(f"#params = {self.n_params[0]}")
        log.info(f"#non emb params = {self.n_params[1]}")
        if self.args.lr_scaling != "none" or self.plan.scheduled:
            log.info(describe_lr_scaling(self.args, self.plan.batch_of_step(1)))

    def _resume(self) -> bool:
        """Resume from the checkpoint --restart chose, if any; False when it already reached --max_step."""
        args = self.args
        restart = resolve_restart(args, self.work_dir, self.log)
        if self.rank == 0 and not args.debug:
            clear_marker(self.work_dir)                      # this run is the resumption of a stopped one
        restored = self.checkpointer.restore(restart) if restart else (self.state, self.mems)
        if restored is None:
            return False
        self.state, self.mems = restored
        if self.optimizer_step.observer is not None:    # the noise scale's open log interval (same layout only)
            same = self.state.same_layout(self.dp_world_size, self.args.batch_chunk)
            saved = self.state.noise_acc if same else None
            self.optimizer_step.observer.load_state_dict(saved, self.rank, self.device)
        self._open_metrics()
        return True

    def _open_metrics(self) -> None:
        """The JSON-lines metrics file and TensorBoard (rank 0), starting with the configuration. Always appended
        to: a resumed run continues its records; a new run's start_run has set an earlier run's file aside."""
        args = self.args
        if args.debug:                                       # --debug writes nothing to the work dir
            self.metrics = MetricsWriter(None, enabled=False)
        else:
            self.metrics = MetricsWriter(self.work_dir / args.dllog_file, self.work_dir / "tensorboard",
                                         enabled=self.rank == 0, append=True)
        self.metrics.log("PARAMETER", {k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool))})

    # ---- everything ------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Train to --max_step (or until a stop signal), test, report; the exit code."""
        self._log_configuration()
        if self.args.lr_range_test:
            from utils.training.lr_range_test import run_lr_range_test
            return run_lr_range_test(self)
        if not self._resume():
            return 1
        preempted = self.train_loop()
        if not preempted:
            self.log.info(LINE)
            self.log.info("End of training")
        self._count_elapsed()
        distributed.barrier()
        if preempted:
            self.metrics.close()
            return self._stop_for_signal()
        return self._finish()

    def train_loop(self) -> bool:
        """Epoch after epoch until --max_step or a stop signal; True when a signal stopped it."""
        args, state = self.args, self.state
        self.run_clock = self.session_clock = time.time()
        self.session_fraction = self.fraction_done()          # where this session started: the ETA's pace
        while True:
            self._start_epoch()
            for data, target, _, _ in self.train_iter:
                lr = self._train_step(data, target)
                if state.train_step % args.log_interval == 0:
                    self._log_interval(lr)
                stop = self._stop_reason()
                if stop or state.train_step % args.eval_interval == 0:
                    self._evaluate_and_checkpoint(validate=stop != "preempted")
                if stop:
                    return stop == "preempted"
            if state.train_step >= args.max_step:
                return False
            state.epoch += 1

    # ---- the steps -------------------------------------------------------------------------------------------
    def _start_epoch(self) -> None:
        if self.args.roll:
            self.train_iter.roll(self.args.seed, self.state.epoch)
        # as the reference: the log interval's clock restarts with each epoch
        self.interval_start = time.time()

    def _train_step(self, data, target) -> float:
        """One optimizer step; the learning rate it used. The loss and gradient norm stay on the device
        (self.step_metrics) until the next log interval or checkpoint, which also checks them for divergence
        (fp16 without: a step with an infinite norm is skipped)."""
        state = self.state
        if self.plan.switches_at(state.train_step + 1):     # a new batch size: new streams, fresh memory
            self.mems = [None] * self.args.batch_chunk
        if self.optimizer_step.observer is not None:
            self.optimizer_step.observer.global_batch = self.plan.batch_of_step(state.train_step + 1)
            self.optimizer_step.observer.local_batch = target.size(1)
        loss, grad_norm = self.optimizer_step.run(data, target, self.mems)   # device tensors
        state.train_step += 1
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step(state.train_step)
        self.step_metrics.add(state.train_step, loss, grad_norm, state.log_acc)
        state.log_acc.steps += 1                             # its loss sum: step_metrics.flush
        state.log_acc.tokens += target.numel()
        state.tokens_seen += target.numel() * self.dp_world_size  # every rank trains on a batch of the same shape
        return lr

    def fraction_done(self) -> float:
        """How far the run is, in [0, 1]: its nominal tokens against those of --max_step (--max_tokens is already a
        step count there); with a batch-size schedule a late step weighs more than an early one."""
        total = self.plan.tokens_at(self.args.max_step)
        if total <= 0:
            return min(1.0, self.state.train_step / self.args.max_step)
        return min(1.0, self.plan.tokens_at(self.state.train_step) / total)

    def _elapsed_and_eta(self) -> str:
        """The log line's end: the run's elapsed time (evaluations included) and the ETA at this session's pace."""
        now = time.time()
        eta = eta_seconds(now - self.session_clock, self.fraction_done(), self.session_fraction)
        return progress_fields(self.state.train_elapsed + now - self.run_clock, eta)

    def _log_interval(self, lr: float) -> None:
        """The training log line and metrics record of the steps since the last one (all ranks)."""
        args, state, acc = self.args, self.state, self.state.log_acc
        grad_norm = self.step_metrics.flush(acc, self.guard)  # the interval's one read-back from the device
        elapsed = time.time() - self.interval_start + acc.elapsed
        cur_loss = distributed.all_reduce_item(acc.loss / acc.steps, "mean")
        avg_elapsed = distributed.all_reduce_item(elapsed / acc.steps, "max")
        tokens = distributed.all_reduce_item(acc.tokens, "sum", distributed.dp_group())
        tok_per_s = tokens / elapsed if elapsed > 0 else 0.0
        self.throughput.update(tok_per_s, elapsed)
        batch, n_batch = self.train_iter.batch, self.train_iter.n_batch
        self.log.info(format_train_line(state.epoch, state.train_step, batch, n_batch, lr, avg_elapsed * 1000,
                                        tok_per_s, cur_loss, self.evaluator.label)
                      + self._elapsed_and_eta())
        record = {"epoch": state.epoch, "train_batch": batch, "lr": lr, "train_time/batch": avg_elapsed * 1000,
                  "train_throughput": tok_per_s, **loss_metrics("train", cur_loss, self.evaluator.label),
                  "grad_norm": grad_norm, "tokens": state.tokens_seen,
                  "batch_size": self.plan.batch_of_step(state.train_step)}
        if args.log_noise_scale:
            record.update(interval_record(self.optimizer_step.observer, self.optimizer, self.metrics,
                                          state.train_step))
        if self.scaler.is_enabled():
            record.update(self._loss_scale_report(acc.steps))
        self.metrics.log(state.train_step, record, tb_prefix="train")
        self.last_train_loss = cur_loss
        state.log_acc = LogInterval()
        self.step_metrics.restart_interval()
        self.interval_start = time.time()

    def _loss_scale_report(self, steps: int) -> dict:
        """fp16: the steps the loss scaler skipped in this log interval (logged when there were any)."""
        skipped, scale = self.optimizer_step.skipped_steps, self.scaler.get_scale()
        if skipped:
            self.log.info(f"fp16: {skipped} of the last {steps} steps skipped (loss scale now {scale:.0f})")
        self.optimizer_step.skipped_steps = 0
        return {"skipped_steps": skipped, "loss_scale": scale}

    def _stop_reason(self) -> str | None:
        """"preempted" when a stop signal reached any rank, "done" at --max_step.

        One process checks its signal flag after every step. Several ranks agree on it (a collective, so a
        wait for every rank) at log intervals only: a signal then stops the run at the next multiple of
        --log_interval (or --max_step), up to log_interval - 1 steps later."""
        if self.world_size == 1:
            requested = self.preemption.requested
        elif self.state.train_step % self.args.log_interval == 0:
            requested = distributed.any_rank(self.preemption.requested)  # every rank asks: they stop together
        else:
            requested = False
        if requested:
            return "preempted"
        return "done" if self.state.train_step >= self.args.max_step else None

    def _evaluate_and_checkpoint(self, validate: bool) -> None:
        """Validate (unless a stop signal came or --no_eval) and write a checkpoint (unless --debug). Their
        time does not count as training time."""
        args, state = self.args, self.state
        self.step_metrics.flush(state.log_acc, self.guard)   # the loss sum into the state; diverged: no save
        pause = time.time()
        state.log_acc.elapsed += pause - self.interval_start
        val_loss = None
        if validate and not args.no_eval:
            val_loss = self.evaluator.validate(state.train_step, self.valid_iter, self.metrics)
            self.scheduler.step_eval(val_loss)
        is_best = state.record_validation(val_loss)
        if not args.debug:
            self._count_elapsed()
            if self.optimizer_step.observer is not None:   # every rank's sums of the open log interval
                state.noise_acc = {"ranks": distributed.gather_objects(self.optimizer_step.observer.state_dict())}
            ckpt = self.checkpointer.capture(state, self.mems)
            if self.rank == 0:
                self.checkpointer.save(ckpt, is_best)
            if args.plot and self.rank == 0:
                redraw_curves(self.work_dir, args.dllog_file, self.log)
        self.interval_start = time.time()

    def _count_elapsed(self) -> None:
        """Add the time since the run's clock last moved to the state's train_elapsed (evaluation included)."""
        now = time.time()
        self.state.train_elapsed += now - self.run_clock
        self.run_clock = now

    # ---- the end ---------------------------------------------------------------------------------------------
    def _stop_for_signal(self) -> int:
        args, log, step = self.args, self.log, self.state.train_step
        if args.debug:
            log.info(f"Received a signal, exiting at step {step} (--debug: no checkpoint)")
            return 0
        name = self.preemption.signal_name or "a signal (on another rank)"
        if self.rank == 0:
            write_marker(self.work_dir, name, step)
        log.info(f"Received {name}, exiting after saving the checkpoint at step {step}; "
                 f"resume with --restart {self.work_dir}")
        return 0

    def _finish(self) -> int:
        """End of training: the test of the best checkpoint, the summary, the targets' verdict."""
        args, log, state = self.args, self.log, self.state
        test_loss = self.evaluator.test_best(self.work_dir / "checkpoint_best.pt", self.test_iter)
        throughput = self.throughput.avg_or_warmup()
        log.info(f"Training time: {state.train_elapsed / 60:.2f} minutes")
        log.info(f"Training throughput: {throughput:.2f} tok/s")
        summary = {"train_throughput": throughput, "train_elapsed": state.train_elapsed / 60}
        if self.last_train_loss is not None:
            summary["train_loss"] = self.last_train_loss
        if test_loss is not None:
            summary.update(loss_metrics("test", test_loss, self.evaluator.label))
        if state.best_val_loss is not None:
            summary.update(loss_metrics("valid", state.best_val_loss, self.evaluator.label))
        self.metrics.log("SUMMARY", summary)
        self.metrics.close()
        return check_targets(args, state.best_val_loss, throughput, log)
