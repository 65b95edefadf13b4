"""What a training run sets up from its configuration before the loop: the batch split over the processes,
the work dir and its log, and the vocabulary options of the corpus."""
import logging
import time
from pathlib import Path

from utils.config.cli import CONFIG_DUMP_NAME, dump_config
from utils.distributed import group as distributed
from utils.io.checkpoint import remove_partial_writes
from utils.io.errors import UserError
from utils.training.metrics import setup_logging


def global_batch(args, world_size: int):
    """The configuration with --batch_size the batch of all processes (--local_batch_size is per process)."""
    if args.local_batch_size is None:
        return args
    return args.replace(batch_size=world_size * args.local_batch_size)


def check_batch_split(args, world_size: int) -> None:
    """Every rank gets the same number of batch columns, and each rank's share splits into batch_chunk chunks."""
    if args.batch_size % world_size:
        raise UserError(f"--batch_size {args.batch_size} does not split evenly over {world_size} processes; use a "
                        f"multiple of {world_size} (or --local_batch_size, the batch per process)")
    local = args.batch_size // world_size
    if local % args.batch_chunk:
        raise UserError(f"the batch per process ({args.batch_size} / {world_size} = {local}) does not split into "
                        f"--batch_chunk {args.batch_chunk} chunks; choose a --batch_chunk that divides {local}")


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


def open_log(args, work_dir: Path, rank: int) -> logging.Logger:
    """The training log: console and <work_dir>/<txtlog_file>, appended to when this run resumes another."""
    resuming = bool(args.restart) or distributed.env_int("TORCHELASTIC_RESTART_COUNT", 0) > 0
    log_file = None if args.debug else work_dir / args.txtlog_file
    return setup_logging(log_file, rank, args.log_all_ranks, filemode="a" if resuming else "w")


def prepare_work_dir(args, work_dir: Path, log: logging.Logger) -> None:
    """Rank 0: clear what a killed run left half-written and record this run's configuration."""
    log.info(f"Experiment dir : {work_dir}")
    for partial in remove_partial_writes(work_dir):
        log.info(f"Removed {partial.name}: a checkpoint write cut short by a killed run")
    dump_config(args, work_dir / CONFIG_DUMP_NAME, section="train")


def corpus_options(args) -> dict:
    """Vocabulary options of data_utils.get_lm_corpus (the custom-only ones only for --dataset custom)."""
    options = {"bpe_model": args.bpe_model, "bpe_vocab_size": args.bpe_vocab_size}
    if args.dataset == "custom":
        options.update(custom_level=args.custom_level, lower_case=args.lower_case, min_freq=args.min_freq,
                       max_size=args.max_vocab_size)
    return options
