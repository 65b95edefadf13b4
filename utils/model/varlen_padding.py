"""`--varlen` with `--compile`: segments padded to a few bucket lengths, so that a run compiles one graph per
bucket instead of one per length (and never runs past dynamo's recompile limit into eager mode).

Padding goes at the END of a segment and its targets are -1. That changes nothing for the real tokens:
- attention is causal, so no real query sees a padded key of its own segment; the position terms of
  attention types 0 and 1 depend on distances only, and same_length's band for a full memory (mlen =
  mem_len) is j - i > -1 whatever the segment length (MemTransformerLM._mask_band);
- the memory for the next segment is taken at the real end (`padded_memory`), so padded positions never
  enter it;
- the loss of the padded positions is cut off before the mean (`BucketPadding`), so the loss, its gradient
  and train.py's token counts are those of the real tokens.
Types 2 and 3 count absolute positions from the end of the window, so padding would move them: they are not
padded (every length compiles its own graph, as without buckets). A segment is padded only when its memory
is full (mlen = mem_len), so that the new memory has a fixed size; the segments before the memory is full
(the first one or few of a run, and those after a memory reset such as a --batch_schedule change) and any
segment longer than the largest bucket run through the uncompiled model, so the compiled graphs are one per
bucket and per batch size, whatever the lengths. Dropout masks are drawn for the padded shape, so with
dropout > 0 the random numbers differ from an unpadded run (same distribution).
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.io.errors import UserError


def padded_memory(hids: List[Tensor], mems: Tensor, n_pad: Tensor, ext_len: int, mem_len: int) -> Tensor:
    """The next memory when the last n_pad positions of the segment are padding: the mem_len positions before
    the real end of [memory; segment] minus ext_len. mems [n_layer, mem_len, bsz, d] (full), hids: each
    layer's input [qlen, bsz, d]. A gather with a tensor offset: one shape for every n_pad."""
    qlen = hids[0].size(0)
    whole = torch.cat([mems, torch.stack(hids)], 1)                             # [n_layer, mem_len + qlen, ...]
    start = qlen - ext_len - n_pad                                              # real end - mem_len
    index = torch.arange(mem_len, device=whole.device) + start.to(whole.device)
    return whole.index_select(1, index).detach()


def default_buckets(tgt_len: int, std: int = 5, max_deviation: int = 3) -> List[int]:
    """Bucket lengths for the lengths LMOrderedIterator.varlen_bptt draws (tgt_len, or tgt_len / 2 with
    probability 0.05, plus N(0, std), within [5, tgt_len + max_deviation * std]): multiples of 8 around
    tgt_len (padding about 4 positions on average) and one for the short segments."""
    longest = tgt_len + max_deviation * std
    round8 = lambda n: -(-n // 8) * 8                                           # noqa: E731
    buckets = {round8(tgt_len // 2 + max_deviation * std), round8(tgt_len - 2 * std), round8(tgt_len),
               round8(tgt_len + std), round8(longest)}
    return sorted(b for b in buckets if b > 0)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= length:
            return b
    return length                                                               # longer than all: unpadded


class BucketPadding:
    """Wraps the (compiled) model for TrainStep: pads data and target of a segment with a full memory to its
    bucket, returns the loss of the real positions only. Anything else is the wrapped model's."""

    def __init__(self, model, buckets: Sequence[int], mem_len: int, eager=None):
        self.model = model
        self.eager = model if eager is None else eager          # the uncompiled model
        self.buckets = sorted(buckets)
        self.mem_len = mem_len

    def __call__(self, data: Tensor, target: Tensor, mems: Optional[Tensor]):
        length = target.size(0)
        if mems is None or mems.size(1) != self.mem_len or length > self.buckets[-1]:
            # memory not yet full (its length would be one more shape) or longer than every bucket: uncompiled
            return self.eager(data, target, mems)
        bucket = bucket_for(length, self.buckets)
        if bucket == length:
            return self.model(data, target, mems)
        pad = bucket - length
        data = F.pad(data, [0, 0, 0, pad])                                      # token 0: never seen by a real one
        target = F.pad(target, [0, 0, 0, pad], value=-1)
        loss, new_mems = self.model(data, target, mems)
        return loss[:length], new_mems

    def __getattr__(self, name):
        return getattr(self.model, name)


def enable(model: torch.nn.Module, forward_model, args):
    """BucketPadding around forward_model when --varlen with --compile applies (attention types 0 and 1,
    a memory); the model(s) inside are told to read target -1 as padding. Otherwise the uncompiled model: every
    length would be a graph of its own, past dynamo's recompile limit an eager run anyway."""
    import logging

    import torch._dynamo
    log = logging.getLogger("txl")
    cores = [m for m in model.modules() if hasattr(m, "varlen_padding")]      # the MemTransformerLM(s) inside
    if not cores or cores[0].attn_type not in (0, 1) or cores[0].mem_len == 0 or cores[0].eod_index >= 0:
        log.warning("--varlen with --compile: segments are padded to bucket lengths only for attention types 0 and 1 "
                    "with a memory, without --reset_mems_at_doc; here every length would compile a graph of its own, "
                    "so the model runs uncompiled (drop --varlen to compile it)")
        return model
    buckets = sorted(args.varlen_buckets) if getattr(args, "varlen_buckets", None) else default_buckets(args.tgt_len)
    if min(buckets) < 1:
        raise UserError(f"--varlen_buckets must be positive lengths, got {buckets}")
    longest = args.tgt_len + 3 * 5                              # LMOrderedIterator.varlen_bptt's longest segment
    if buckets[-1] < longest:
        log.warning(f"--varlen_buckets: the largest bucket ({buckets[-1]}) is shorter than the longest segment "
                    f"--varlen draws ({longest}); longer segments run uncompiled")
    for core in cores:
        core.varlen_padding = True
    schedule = getattr(args, "batch_schedule", None)
    batch_sizes = 1
    if schedule:
        from utils.training.batch_schedule import parse_schedule
        batch_sizes = len({batch for _, batch in parse_schedule(schedule)})
    limit = len(buckets) * batch_sizes + 2                     # one graph per bucket and batch size (+ margin)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.fail_on_recompile_limit_hit = True    # past it: an error, never a silent eager run
    return BucketPadding(forward_model, buckets, cores[0].mem_len, eager=model)
