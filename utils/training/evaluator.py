"""Evaluation during training: the periodic validation, the final test of the best checkpoint, and the
--target_perplexity / --target_throughput verdict. Log lines and metrics records are the reference's."""
import time
from pathlib import Path
from typing import Optional

from utils.distributed import group as distributed
from utils.distributed.fsdp import load_model_state
from utils.io.checkpoint import load_checkpoint
from utils.io.errors import UserError
from utils.training.divergence import DivergenceGuard
from utils.training.evaluation import eval_lengths, evaluate_stream, reduce_eval_result
from utils.training.metrics import (DOUBLE_LINE, LINE, MetricsWriter, corpus_label, format_eval_line,
                                    format_test_line, loss_metrics, safe_exp)
from utils.training.progress import progress_bar, show_progress


class Evaluator:
    """Scores the model with the training-time evaluation settings (reference §3.5): segments of
    --eval_tgt_len with the context size of training (`lengths`), at most --eval_max_steps batches."""

    def __init__(self, model, args, device, autocast, log, guard: DivergenceGuard, label: Optional[str] = None):
        self.model, self.args, self.device, self.autocast, self.log = model, args, device, autocast, log
        self.guard = guard
        self.lengths = eval_lengths(args.tgt_len, args.ext_len, args.mem_len, args.eval_tgt_len)
        # the name the metrics go by (metrics.corpus_label): bits per character for character-level corpora
        self.label = label or corpus_label(args.dataset, args.custom_level)

    def mean_loss(self, iterator, split: str = "valid") -> float:
        """Mean NLL per token of a split, over all ranks (a progress bar on a terminal, rank 0)."""
        args, model = self.args, self.model
        model.eval()
        model.reset_length(*self.lengths)
        # as the reference: --eval_max_steps 0 (or -1) means no limit
        max_steps = args.eval_max_steps if args.eval_max_steps > 0 else -1
        n_batch = getattr(iterator, "n_batch", None)
        total = min(n_batch, max_steps) if n_batch is not None and max_steps > 0 else n_batch
        with progress_bar(total, f"evaluating {split}", show_progress(args) and distributed.is_main_process()) as bar:
            result = evaluate_stream(model, iterator, self.device, max_steps=max_steps, autocast=self.autocast,
                                     on_batch=lambda *_: bar.update())
        model.reset_length(args.tgt_len, args.ext_len, args.mem_len)
        model.train()
        total, count = reduce_eval_result(result, iterator)
        if count == 0:
            raise UserError("evaluation scored no tokens (--eval_max_steps covers only the memory warm-up "
                            "batches); raise --eval_max_steps or set it to -1")
        return total / count

    def validate(self, step: int, iterator, metrics: MetricsWriter) -> float:
        """The validation loss at `step`, logged (stops the run when it is not finite)."""
        args, log = self.args, self.log
        log.info(f"Evaluating the valid split at step {step} ...")
        start = time.time()
        val_loss = self.mean_loss(iterator)
        self.guard.check(step, "validation loss", val_loss)
        log.info(LINE)
        log.info(format_eval_line(step // args.eval_interval, step, time.time() - start, val_loss, self.label))
        log.info(LINE)
        metrics.log(step, {"valid_elapsed": time.time() - start, **loss_metrics("valid", val_loss, self.label)},
                    tb_prefix="valid")
        return val_loss

    def test_best(self, best_path: Path, iterator) -> Optional[float]:
        """The test loss of the best checkpoint's weights (loaded into the model), logged; None when there
        is no test (--debug, --no_test, --no_eval) or no best checkpoint."""
        args = self.args
        if args.debug or args.no_test or args.no_eval or not best_path.is_file():
            return None
        best = load_checkpoint(best_path, map_location=self.device)
        load_model_state(self.model, best["model_state"])
        self.log.info("Evaluating the best checkpoint on the test split ...")
        start = time.time()
        test_loss = self.mean_loss(iterator, "test")
        self.log.info(DOUBLE_LINE)
        self.log.info(format_test_line(time.time() - start, test_loss, self.label))
        self.log.info(DOUBLE_LINE)
        return test_loss


def check_targets(args, best_val_loss: Optional[float], throughput: float, log) -> int:
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
