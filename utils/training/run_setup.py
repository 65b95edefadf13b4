"""What a training run sets up from its configuration before the loop: the batch split over the processes,
the work dir (its lock, its log, its configuration) and the vocabulary options of the corpus.

A work dir belongs to one run at a time. The order of train.py keeps a failed start from touching it: the
checks of the command line and the inputs first, then the lock, then the checks of what the work dir holds,
and only then the log (appended to, never truncated) and, once corpus and model are built, config.yaml (an
earlier, different one kept as config.<n>.yaml)."""
import logging
import os
import time
from pathlib import Path

from utils.config.cli import CONFIG_DUMP_NAME, dump_config
from utils.distributed import group as distributed
from utils.io.atomic import copy_file_atomic, fsync_dir, make_dir
from utils.io.checkpoint import remove_partial_writes
from utils.io.errors import UserError
from utils.io.workdir_lock import WorkDirLock
from utils.training.metrics import setup_logging

CHECKPOINT_GLOB = "checkpoint*.pt"       # last, best and --save_all's checkpoint_<step>.pt (temp files start with .)


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


def base_work_dir(args) -> Path:
    """--work_dir with --append_dataset's suffix (without --append_time's stamp, which is new for each run)."""
    work_dir = Path(args.work_dir)
    if args.append_dataset:
        work_dir = Path(f"{work_dir}-{args.dataset}")
    return work_dir


def make_work_dir(args, rank: int) -> Path:
    work_dir = base_work_dir(args)
    if args.append_time:
        stamp = distributed.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
        work_dir = work_dir / stamp
    if rank == 0 and not args.debug:
        make_dir(work_dir, "work dir", "--work_dir")
    return work_dir


def lock_work_dir(args, work_dir: Path, rank: int) -> WorkDirLock | None:
    """Rank 0 takes the work dir's lock for the whole run (the other ranks of the run share it); every rank
    raises the same one-line error when another run holds it. --debug writes nothing, so it takes none."""
    if args.debug:
        return None
    lock, error = None, None
    if rank == 0:
        try:
            lock = WorkDirLock(work_dir).acquire()
        except UserError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)
    if error:
        raise UserError(error)
    return lock


def resuming(args) -> bool:
    """This run continues an earlier one: --restart, or torchrun restarted the workers after a failure."""
    return bool(args.restart) or distributed.env_int("TORCHELASTIC_RESTART_COUNT", 0) > 0


def restarts_from_elsewhere(args, work_dir: Path) -> bool:
    """--restart names a checkpoint (or folder) outside the work dir: this run continues another run's training
    into this work dir, and its checkpoints will replace whatever the work dir holds. A torchrun restart of the
    workers resumes the work dir's own checkpoint first (resolve_restart), so it continues this work dir."""
    if not args.restart or args.restart == "auto" or distributed.env_int("TORCHELASTIC_RESTART_COUNT", 0) > 0:
        return False
    source = Path(args.restart)
    folder = source if source.is_dir() else source.parent
    return folder.resolve() != Path(work_dir).resolve()


def earlier_checkpoints(work_dir: Path) -> list[Path]:
    return sorted(work_dir.glob(CHECKPOINT_GLOB)) if work_dir.is_dir() else []


def check_fresh_start(args, work_dir: Path) -> None:
    """A new run must not replace the checkpoints of an earlier one in its work dir without being told to."""
    elsewhere = restarts_from_elsewhere(args, work_dir)
    if args.debug or args.overwrite or (resuming(args) and not elsewhere):
        return
    found = [p.name for p in earlier_checkpoints(work_dir)]
    if not distributed.broadcast_object(found):
        return
    if elsewhere:
        raise UserError(f"work dir {work_dir} holds the checkpoints of another run ({', '.join(found)}) and "
                        f"--restart {args.restart} continues a checkpoint from elsewhere, whose saves would replace "
                        f"them; resume this work dir's own run with --restart {work_dir}, choose another --work_dir, "
                        "or pass --overwrite to replace them")
    raise UserError(f"work dir {work_dir} holds the checkpoints of an earlier run ({', '.join(found)}); resume "
                    f"it with --restart {work_dir}, choose another --work_dir, or pass --overwrite to start a "
                    "new run there (replacing them)")


def open_log(args, work_dir: Path, rank: int) -> logging.Logger:
    """The training log: console and <work_dir>/<txtlog_file>, always appended to (the logs of earlier runs
    in the work dir are kept)."""
    log_file = None if args.debug else work_dir / args.txtlog_file
    return setup_logging(log_file, rank, args.log_all_ranks, filemode="a")


def prepare_work_dir(args, work_dir: Path, log: logging.Logger) -> None:
    """Rank 0, under the lock: clear what a killed run left half-written (no other run can be writing)."""
    log.info(f"Experiment dir : {work_dir}")
    for partial in remove_partial_writes(work_dir):
        log.info(f"Removed {partial.name}: a checkpoint write cut short by a killed run")


def start_run(args, work_dir: Path, log: logging.Logger) -> None:
    """Rank 0, once corpus and model are built: record this run's configuration as config.yaml (an earlier,
    different one is kept as config.<n>.yaml) and, for --overwrite, delete the earlier run's checkpoints (so
    that no later --restart resumes them by mistake)."""
    record_config(args, work_dir, log)
    if not resuming(args) or restarts_from_elsewhere(args, work_dir):
        keep_earlier_metrics(args, work_dir, log)
        if args.overwrite:
            for old in earlier_checkpoints(work_dir):
                old.unlink()
                log.info(f"--overwrite: deleted {old.name} of an earlier run")


def keep_earlier_metrics(args, work_dir: Path, log: logging.Logger) -> None:
    """A new run in a work dir that holds an earlier run's JSON metrics: that file is kept as
    <name>.<n>.json (renamed, so nothing is copied or lost) and this run's records start a file of their own."""
    path = work_dir / args.dllog_file
    if not path.is_file() or path.is_symlink() or path.stat().st_size == 0:
        return
    n = 1
    while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists() or kept.is_symlink():
        n += 1
    os.rename(path, kept)
    fsync_dir(work_dir)
    log.info(f"Kept the earlier run's metrics of this work dir as {kept.name}")


def record_config(args, work_dir: Path, log: logging.Logger) -> Path:
    path = work_dir / CONFIG_DUMP_NAME
    earlier = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    kept = None
    if earlier is not None:                  # kept before the new one is written: a kill in between loses neither
        n = 1
        while (kept := work_dir / f"{path.stem}.{n}{path.suffix}").exists() or kept.is_symlink():
            n += 1
        copy_file_atomic(path, kept)
    dump_config(args, path, section="train")
    if kept is not None:
        if path.read_bytes() == earlier:
            os.unlink(kept)                  # the same configuration (a resume with the same flags): one copy
        else:
            log.info(f"Kept the earlier configuration of this work dir as {kept.name}")
    return path


def corpus_options(args) -> dict:
    """Vocabulary options of data_utils.get_lm_corpus (the custom-only ones only for --dataset custom)."""
    options = {"bpe_model": args.bpe_model, "bpe_vocab_size": args.bpe_vocab_size}
    if args.dataset == "custom":
        options.update(custom_level=args.custom_level, lower_case=args.lower_case, min_freq=args.min_freq,
                       max_size=args.max_vocab_size)
    return options
