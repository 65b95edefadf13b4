"""The rules between the large-batch options of train.py (README "Moving a recipe to more GPUs")."""
from utils.io.errors import UserError


def check_large_batch(cfg):
    """One line per broken rule; --batch_schedule's first batch becomes --batch_size (the schedule replaces a
    preset's or the command line's --batch_size)."""
    if cfg.lr_scaling != "none" and cfg.base_batch_size is None:
        raise UserError(f"--lr_scaling {cfg.lr_scaling} needs --base_batch_size (the global batch --lr is given for)")
    if cfg.lr_range_test and cfg.lr_range_min >= cfg.lr_range_max:
        raise UserError(f"--lr_range_min ({cfg.lr_range_min}) must be below --lr_range_max ({cfg.lr_range_max})")
    if cfg.log_noise_scale and cfg.multi_gpu == "fsdp":
        raise UserError("--log_noise_scale reads whole gradients per chunk, which FSDP shards; use --multi_gpu ddp")
    if cfg.log_noise_scale and cfg.tensor_parallel > 1:
        raise UserError("--log_noise_scale reads whole gradients per chunk, which --tensor_parallel splits; drop one")
    if not cfg.batch_schedule:
        return cfg
    from utils.training.batch_schedule import parse_schedule
    first = parse_schedule(cfg.batch_schedule)[0][1]
    if cfg.local_batch_size is not None:
        raise UserError("--batch_schedule gives global batches; drop --local_batch_size")
    if cfg.dataset == "lm1b":
        raise UserError("--batch_schedule works with ordered corpora only, not lm1b's sentence stream")
    return cfg.replace(batch_size=first)
