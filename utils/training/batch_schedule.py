"""The global batch per step (`--batch_size` or `--batch_schedule`), the token count of a step, and the
training data stream of a run whose batch changes (`ScheduledStream`).

BatchPlan. Step t (1-based) trains on `batch_of_step(t)` global sequences of `--tgt_len` tokens:
`--batch_schedule "0:8,10:16"` means 8 sequences for steps 1-10 and 16 from step 11 on (an entry STEP:BATCH
holds once STEP steps are done). `tokens_at(t)` counts the nominal tokens of steps 1..t (batch x tgt_len
each); the learning-rate schedules and `--max_tokens` count these, so that they are a function of the step
alone (exact on resume) and the same per token at every batch size. The metrics' `tokens` is the tokens
really trained on (an epoch's last, shorter segment and --varlen make it differ slightly).

ScheduledStream (what happens at a batch change, README "Batch-size schedule"). The epoch starts like the
ordinary iterator: the corpus cut into B streams (rotated with --roll). When the batch changes to B' in the
middle of an epoch, the tokens not trained yet (the rest of every stream after its last target, in stream
order) are cut into B' new streams of equal length; the epoch goes on with those. So no token of the epoch is
trained twice, and none is skipped except the last (rest mod B') tokens, dropped as the ordinary layout drops
(corpus length mod B), and each new stream's first token, which is an input only (as every stream's first).
A new stream may cross the place where an old one ended (a jump in the text, like a rotation's wrap-around).
The memory is reset at the change (its shape changes and most new streams start mid-text). The next epoch
starts fresh with the batch of that step.
The layout (pieces of the corpus), the position and the epoch are in the iterator's state, so a resume
continues exactly, also across a change.
"""
import math
from typing import Any, Callable, Optional

import numpy as np
import torch

from utils.io.errors import UserError
from utils.training.lr_scaling import lr_scale


def parse_schedule(text: str) -> list[tuple[int, int]]:
    """"0:8,10:16" -> [(0, 8), (10, 16)]; ValueError says what is wrong."""
    entries = []
    for item in str(text).replace(" ", "").split(","):
        step, sep, batch = item.partition(":")
        if not sep or not step.isdigit() or not batch.isdigit():
            raise ValueError(f"expects STEP:BATCH entries separated by commas such as \"0:8,1000:16\", got {item!r}")
        entries.append((int(step), int(batch)))
    if entries[0][0] != 0:
        raise ValueError(f"the first entry must be at step 0, got {entries[0][0]}")
    if any(b[0] <= a[0] for a, b in zip(entries, entries[1:])):
        raise ValueError("the steps must increase")
    if any(batch < 1 for _, batch in entries):
        raise ValueError("every batch must be >= 1")
    return entries


class BatchPlan:
    """The global batch, the nominal tokens and the LR factor of each step (module docstring)."""

    def __init__(self, args):
        self.entries = parse_schedule(args.batch_schedule) if args.batch_schedule else [(0, args.batch_size)]
        self.tgt_len = args.tgt_len
        self.rule, self.base_batch = args.lr_scaling, args.base_batch_size
        self.token_unit = args.warmup_tokens is not None or args.max_tokens is not None

    @property
    def scheduled(self) -> bool:
        return len(self.entries) > 1

    def batch_at(self, done: int) -> int:
        """The global batch of the step after `done` steps."""
        return next(batch for step, batch in reversed(self.entries) if step <= done)

    def batch_of_step(self, t: int) -> int:
        return self.batch_at(max(t - 1, 0))

    def switches_at(self, t: int) -> bool:
        """Step t trains on another batch size than step t - 1."""
        return t > 1 and self.batch_of_step(t) != self.batch_of_step(t - 1)

    def tokens_at(self, t: int) -> int:
        """Nominal tokens of steps 1..t."""
        total, bounds = 0, [step for step, _ in self.entries[1:]] + [math.inf]
        for (start, batch), end in zip(self.entries, bounds):
            if t <= start:
                break
            total += (min(t, end) - start) * batch * self.tgt_len
        return int(total)

    def steps_for_tokens(self, tokens: int) -> int:
        """The first step t with tokens_at(t) >= tokens."""
        t, bounds = 0, [step for step, _ in self.entries[1:]] + [math.inf]
        for (start, batch), end in zip(self.entries, bounds):
            per_step = batch * self.tgt_len
            need = tokens - self.tokens_at(start)
            if need <= (end - start) * per_step:
                return start + max(1, -(-need // per_step))
        return t  # not reached: the last range is unbounded

    def lr_scale_at(self, t: int) -> float:
        return lr_scale(self.rule, self.batch_of_step(t), self.base_batch)


def resolve_max_step(args):
    """--max_tokens as a step count: the first step that reaches it (or --max_step when given and earlier)."""
    if args.max_tokens is None:
        return args
    steps = BatchPlan(args).steps_for_tokens(args.max_tokens)
    if "max_step" in args.given:
        steps = min(steps, args.max_step)
    return args.replace(max_step=steps)


def check_batch_layout(args, world_size: int) -> None:
    """Every batch of the schedule splits evenly over the processes and into --batch_chunk chunks; the noise
    scale has several gradients to compare (chunks or processes)."""
    if args.log_noise_scale and args.batch_chunk < 2 and world_size < 2:
        raise UserError("--log_noise_scale compares the gradients of the batch chunks (or of the processes): in "
                        "one process it needs --batch_chunk >= 2")
    if not args.batch_schedule:
        return
    for step, batch in parse_schedule(args.batch_schedule):
        if batch % world_size or (batch // world_size) % args.batch_chunk:
            raise UserError(f"--batch_schedule: the batch {batch} (from step {step}) does not split into "
                            f"{world_size} process(es) x --batch_chunk {args.batch_chunk}; use multiples of "
                            f"{world_size * args.batch_chunk}")


# ---- the data stream ---------------------------------------------------------------------------------------------

class _Layout:
    """`bsz` streams of `rows` tokens: stream c is positions [c * rows, (c + 1) * rows) of the concatenation of
    the pieces (start, length) of the corpus; `pos` is the next row."""

    def __init__(self, bsz: int, starts, lengths, pos: int = 0):
        self.bsz = bsz
        self.starts, self.lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
        self.cum = np.concatenate([[0], np.cumsum(self.lengths)])
        self.rows = int(self.cum[-1]) // bsz
        self.pos = pos

    def positions(self, virtual: np.ndarray) -> np.ndarray:
        """Corpus positions of positions in the concatenation of the pieces."""
        piece = np.searchsorted(self.cum, virtual, side="right") - 1
        return self.starts[piece] + (virtual - self.cum[piece])

    def pieces_of(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """[lo, hi) of the concatenation as corpus pieces."""
        out, p = [], int(np.searchsorted(self.cum, lo, side="right") - 1)
        while lo < hi:
            take = min(hi, int(self.cum[p + 1])) - lo
            out.append((int(self.starts[p] + lo - self.cum[p]), take))
            lo, p = lo + take, p + 1
        return out

    def rest(self, bsz: int) -> Optional["_Layout"]:
        """The rows not trained yet, cut into `bsz` new streams (None: too few tokens left for one batch)."""
        skip = self.pos + (1 if self.pos else 0)           # row pos was the last batch's target already
        pieces = [piece for c in range(self.bsz) for piece in self.pieces_of(c * self.rows + skip,
                                                                             (c + 1) * self.rows)]
        if sum(n for _, n in pieces) // bsz < 2:
            return None
        return _Layout(bsz, [s for s, _ in pieces], [n for _, n in pieces])

    def state_dict(self) -> dict:
        return {"bsz": self.bsz, "starts": self.starts.tolist(), "lengths": self.lengths.tolist(), "pos": self.pos}


class ScheduledStream:
    """The training batches of a run with --batch_schedule: the interface of data_utils.LMOrderedIterator that the
    trainer and the checkpointer use (iteration over one epoch, roll, batch, n_batch, last_iter, state_dict,
    load_state_dict). `iterator_for(bsz)` gives an ordinary iterator of global batch bsz (for this rank's
    columns, the rotation and the variable lengths); `wanted_batch()` the batch of the next step."""

    def __init__(self, iterator_for: Callable[[int], Any], wanted_batch: Callable[[], int], device):
        self.iterator_for, self.wanted_batch = iterator_for, wanted_batch
        self._probes: dict[int, Any] = {}
        probe = self._probe(wanted_batch())
        if not hasattr(probe, "shifts"):
            raise UserError("--batch_schedule works with ordered corpora only (not lm1b's sentence iterator)")
        self.src, self.bptt, self.ext_len, self.varlen = probe.src, probe.bptt, probe.ext_len, probe.varlen
        self.device = torch.device(device)
        self.layout: Optional[_Layout] = None      # None: the next pass starts a fresh epoch
        self.epoch, self.batch, self.last_iter = 0, 0, None
        self.roll_key: Optional[tuple[int, int]] = None

    def _probe(self, bsz: int):
        if bsz not in self._probes:
            self._probes[bsz] = self.iterator_for(bsz)
        return self._probes[bsz]

    def _fresh(self, bsz: int) -> _Layout:
        """The epoch's first layout: the ordinary iterator's (rotated with --roll)."""
        n = len(self.src) // bsz
        shifts = np.zeros(bsz, np.int64)
        if self.roll_key is not None:
            probe = self._probe(bsz)
            probe.roll(*self.roll_key)
            shifts = probe.shifts
        starts, lengths = [], []
        for c, s in enumerate(int(v) for v in shifts):
            starts += [c * n + s] + ([c * n] if s else [])
            lengths += [n - s] + ([s] if s else [])
        return _Layout(bsz, starts, lengths)

    @property
    def n_batch(self) -> int:
        layout = self.layout
        if layout is None:
            return -(-(len(self.src) // self.wanted_batch() - 1) // self.bptt)
        return self.batch + -(-max(layout.rows - 1 - layout.pos, 0) // self.bptt)

    def roll(self, seed: int, epoch: int = 0) -> None:
        self.roll_key, self.epoch = (seed, epoch), epoch

    def __iter__(self):
        if self.layout is None:
            self.layout = self._fresh(self.wanted_batch())
        while True:
            wanted = self.wanted_batch()
            if wanted != self.layout.bsz:
                self.layout = self.layout.rest(wanted)
                if self.layout is None:
                    break
            layout = self.layout
            if layout.pos >= layout.rows - 1:
                break
            probe = self._probe(layout.bsz)
            length = self.bptt
            if self.varlen:
                probe.epoch = self.epoch
                length = probe.varlen_bptt(self.batch)
            i = layout.pos
            seq_len = min(length, layout.rows - 1 - i)
            first = max(0, i - self.ext_len)
            rows = np.arange(first, i + seq_len + 1)[:, None]
            cols = np.arange(probe.col_first, probe.col_last)[None, :]
            tokens = np.asarray(self.src[layout.positions(cols * layout.rows + rows)]).astype(np.int64)
            tokens = torch.from_numpy(tokens).to(self.device)
            layout.pos, self.batch, self.last_iter = i + seq_len, self.batch + 1, i
            yield tokens[: i + seq_len - first], tokens[i + 1 - first:], seq_len, True
        self.layout, self.batch = None, 0
        self.epoch += 1

    def state_dict(self) -> dict:
        return {"type": "scheduled", "n_tokens": len(self.src), "epoch": self.epoch, "batch": self.batch,
                "last_iter": self.last_iter, "roll": list(self.roll_key) if self.roll_key else None,
                "layout": None if self.layout is None else self.layout.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("type") != "scheduled" or state.get("n_tokens") != len(self.src):
            raise UserError("cannot resume the data stream: it was not saved by a run with --batch_schedule on this "
                            "corpus (resume with the same --batch_schedule and data)")
        layout = state["layout"]
        self.layout = None if layout is None else _Layout(layout["bsz"], layout["starts"], layout["lengths"],
                                                          layout["pos"])
        self.epoch, self.batch, self.last_iter = state["epoch"], state["batch"], state["last_iter"]
        self.roll_key = tuple(state["roll"]) if state["roll"] else None
