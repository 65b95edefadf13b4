#!/usr/bin/env python
"""Train a Transformer-XL language model.

    python train.py --config_file configs/wt103_base.yaml --config dgx1_8gpu_fp16 [flags]
    torchrun --nproc_per_node 8 train.py --config_file configs/wt103_base.yaml ...
    srun --ntasks-per-node 8 python train.py ...          (one process per GPU, see run.sub)

The flags, presets and log lines are the reference trainer's (NVIDIA DeepLearningExamples); see README.md.
This file composes the run: configuration, processes, corpus and model; the loop is utils/training/loop.py.
"""
import utils.runtime.openmp_env  # noqa: F401  (first: bounds OpenMP's spin-wait before torch loads it)

import gc
import sys
from pathlib import Path

import torch

import data_utils
from mem_transformer import MemTransformerLM
from utils.config.cli import parse_args, train_parser
from utils.data.prepared import end_of_document
from utils.distributed import group as distributed
from utils.io.checkpoint import checkpoint_file
from utils.io.errors import UserError, run_cli
from utils.model.init import init_weights
from utils.model.model_config import build_model_config
from utils.runtime.device import (check_process_count, configure_backends, environment_summary, resolve_speed_flags,
                                  select_device)
from utils.training.batch_schedule import check_batch_layout, resolve_max_step
from utils.training.loop import Trainer
from utils.training.memory import check_memory
from utils.training.preemption import PreemptionHandler
from utils.training.progress import show_progress
from utils.training.rng import seed_everything
from utils.io.workdir_lock import check_unlocked
from utils.training.run_setup import (base_work_dir, check_batch_split, check_fresh_start, corpus_options,
                                      global_batch, lock_work_dir, make_work_dir, open_log, prepare_work_dir,
                                      start_run)


class PeerFailure(UserError):
    """Another process of the job died or stopped answering (raised from a failed collective)."""
    exit_code = 4               # scripts/launch.py: PEER_FAILURE_EXIT
    caused_by_peer = True


def main() -> int:
    distributed.adopt_slurm_env()                       # one process per srun task: ranks from SLURM_* variables
    args = parse_args(train_parser(), section="train")
    if args.check is not None:
        return check(args)
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
        # An FSDP-sharded model sits in reference cycles (its hooks and sharding state refer back to it): free it
        # now, while its process group still exists, not during interpreter exit, where tearing down its gloo
        # state aborted the process now and then ("terminate called without an active exception").
        gc.collect()
        distributed.shutdown()
        return code


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because a peer died, closed its connection or timed out."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc).lower()
    return any(k in text for k in ("connection closed", "connection reset", "broken pipe", "timed out"))


def check(args) -> int:
    """--check N: what each of N processes would check alike before training, done once, in this process: the
    batch split, processes against GPUs, the data and the checkpoint to resume, and that the work dir is
    free (no run holds it, no earlier checkpoints a new run would replace). Writes nothing."""
    data_parallel = args.check
    if args.tensor_parallel > 1:                        # the batch is split over the data-parallel ranks only
        from utils.distributed.tensor_parallel import check_layout
        check_layout(args.tensor_parallel, args.check, args.n_head)
        data_parallel = args.check // args.tensor_parallel
    args = resolve_max_step(global_batch(args, data_parallel))
    check_batch_split(args, data_parallel)
    check_batch_layout(args, data_parallel)
    note = check_process_count(args.check, args.cuda)
    check_inputs(args)
    if not args.debug and not args.append_time:         # --append_time: a new folder each run
        check_unlocked(base_work_dir(args))
        check_fresh_start(args, base_work_dir(args))
    if note:
        print(note, file=sys.stderr)
    return 0


def check_inputs(args) -> None:
    """The data folder and the checkpoint to resume, before the work dir is touched."""
    data_utils.check_corpus(args.data, args.dataset, args.vocab, **corpus_options(args))
    if args.reset_mems_at_doc:                          # the corpus's articles must end with a symbol
        end_of_document(args.dataset, args.data)
    restart = Path(args.restart)
    # a folder without a checkpoint yet is a fresh start, and so is the work dir this run will create
    if args.restart and args.restart != "auto" and not restart.is_dir() and \
            restart.absolute() != base_work_dir(args).absolute():
        checkpoint_file(args.restart)


def train(args, preemption: PreemptionHandler) -> int:
    """Set up the work dir, the device, the corpus and the model, and hand them to the training loop."""
    # the batch is split over the data-parallel ranks (with --tensor_parallel N, the world size / N)
    rank, world_size = distributed.get_rank(), distributed.dp_world_size()
    args = resolve_max_step(global_batch(args, world_size))
    check_batch_split(args, world_size)
    check_batch_layout(args, world_size)
    check_inputs(args)
    requested = args                                  # config.yaml: as asked, before the device resolves speed flags
    # nothing in the work dir is touched before the checks above and the lock and check_fresh_start below
    work_dir = make_work_dir(args, rank)
    lock = lock_work_dir(args, work_dir, rank)        # held (by rank 0, for all ranks) until this process ends
    check_fresh_start(args, work_dir)
    log = open_log(args, work_dir, rank)
    if rank == 0 and not args.debug:
        prepare_work_dir(args, work_dir, log)
    if args.tensor_parallel > 1:                      # data parallelism across the tensor-parallel groups is FSDP2
        log.info(f"world size: {distributed.get_world_size()} (tensor parallel {args.tensor_parallel} x data "
                 f"parallel {world_size}" + (" fsdp)" if world_size > 1 else ")"))
    else:
        log.info(f"world size: {world_size}" + (f" ({args.multi_gpu})" if world_size > 1 else ""))

    device = select_device(args, log)
    args = resolve_speed_flags(args, device)
    configure_backends(args, device)
    if not args.no_env:
        log.info(environment_summary(device))
    seed_everything(args.seed)
    corpus = data_utils.get_lm_corpus(args.data, args.dataset, args.vocab, cache_dir=args.cache_dir,
                                      verbose=rank == 0, progress=rank == 0 and show_progress(args),
                                      **corpus_options(args))
    model_config = build_model_config(args, len(corpus.vocab))
    check_memory(parameters_per_process(args, model_config, world_size), args, model_config, device, world_size)
    model = build_model(args, model_config)
    if args.reset_mems_at_doc:
        model.set_reset_mems_at_doc(end_of_document(args.dataset, args.data, corpus.vocab))
    if rank == 0 and not args.debug:
        start_run(requested, work_dir, log)               # the run really starts: its configuration, --overwrite
    # main() installed the signal handler before the setup, so that a signal during the setup is not lost
    try:
        return Trainer(args, log, work_dir, device, corpus, model, model_config, preemption).run()
    finally:
        if lock is not None:
            lock.release()


def parameter_count(model_config: dict) -> int:
    """The model's parameters, counted on the meta device (nothing allocated: a model too large for the
    machine is refused before it is built)."""
    with torch.device("meta"):
        return sum(p.numel() for p in MemTransformerLM(**model_config).parameters())


def parameters_per_process(args, model_config: dict, dp_world_size: int) -> int:
    """The parameters the memory check counts for one process: all of them, or with --tensor_parallel this
    rank's share of the split layers plus the replicated rest (and FSDP's division over the data-parallel
    ranks, which --tensor_parallel always uses and the check applies only for --multi_gpu fsdp)."""
    if args.tensor_parallel == 1:
        return parameter_count(model_config)
    from utils.distributed.tensor_parallel import parameters_per_rank
    with torch.device("meta"):
        count = parameters_per_rank(MemTransformerLM(**model_config), args.tensor_parallel)
    return count // dp_world_size if args.multi_gpu != "fsdp" else count


def build_model(args, model_config: dict) -> MemTransformerLM:
    """A new model with the reference's initialization (on the CPU: the trainer places it)."""
    model = MemTransformerLM(**model_config)
    init_weights(model, args.init, args.init_range, args.init_std, args.proj_init_std)
    model.set_attn_impl(args.attn_impl)
    model.set_checkpoint_activations(args.checkpoint_activations)
    model.crit.tail_capacity = args.softmax_tail_capacity   # static adaptive-softmax shapes (issue 18)
    return model


if __name__ == "__main__":
    run_cli(main)
