"""The reference's data rules (reference-inventory.md §5.1, §5.3, §5.4) written out plainly, line by line and
with torch ops, independently of data_utils / utils.data.vocabulary, so tests compare against the rule and not
against our own output."""
import collections

import torch


def read_lines(path):
    with open(path, encoding="utf-8") as f:  # text mode: universal newlines, as the reference reads
        yield from f


def tokenize(line, lower_case, add_eos=False, add_double_eos=False, delimiter=None):
    line = line.strip()
    if lower_case:
        line = line.lower()
    symbols = list(line) if delimiter == "" else line.split(delimiter)
    if add_double_eos:
        return ["<S>"] + symbols + ["<S>"]
    return symbols + ["<eos>"] if add_eos else symbols


def build_vocab(paths, special, lower_case, min_freq=0, max_size=None, delimiter=None):
    """Counter over every line's symbols (no <eos>), specials first, then most_common (ties: first seen)."""
    counter = collections.Counter()
    for path in paths:
        for line in read_lines(path):
            counter.update(tokenize(line, lower_case, delimiter=delimiter))
    sym2idx = {}  # add_symbol: a symbol already present (a special one) is not added again
    for sym in special:
        sym2idx.setdefault(sym, len(sym2idx))
    for sym, cnt in counter.most_common(max_size):
        if cnt < min_freq:
            break
        sym2idx.setdefault(sym, len(sym2idx))
    return list(sym2idx), counter


def encode(path, idx2sym, lower_case, add_eos=True, add_double_eos=False, delimiter=None, unk="<unk>"):
    sym2idx = {s: i for i, s in enumerate(idx2sym)}
    ids = []
    for line in read_lines(path):
        for sym in tokenize(line, lower_case, add_eos, add_double_eos, delimiter):
            ids.append(sym2idx[sym] if sym in sym2idx else sym2idx[unk])
    return ids


def encode_ends(path, idx2sym, lower_case, n, add_eos=True):
    """The ids of the first n and the last n symbols of a file, by the same rule as encode()."""
    head, tail = [], collections.deque(maxlen=n)
    for line in read_lines(path):
        symbols = tokenize(line, lower_case, add_eos)
        if len(head) < n:
            head.extend(symbols[: n - len(head)])
        tail.extend(symbols)
    sym2idx = {s: i for i, s in enumerate(idx2sym)}
    return [sym2idx[s] for s in head], [sym2idx[s] for s in tail]


class OrderedIterator:
    """The reference's LMOrderedIterator on a tensor, as §5.3 describes it (warm-up, rank chunk, roll)."""

    def __init__(self, data, bsz, bptt, mem_len=None, ext_len=0, warmup=True, rank=0, world_size=1):
        data = torch.as_tensor(data, dtype=torch.long)
        self.bptt, self.ext_len, self.mem_len, self.warmup = bptt, ext_len, mem_len, warmup
        n_step = data.size(0) // bsz
        self.data = data[: n_step * bsz].view(bsz, -1).t().contiguous()
        self.warmup_elems = 0
        if mem_len and warmup:
            self.warmup_elems = -(-mem_len // bptt) * bptt
            warm = self.data.roll((self.warmup_elems, 1), (0, 1))[: self.warmup_elems]
            self.data = torch.cat((warm, self.data))
        self.data = self.data.chunk(world_size, dim=1)[rank]

    def roll(self, seed):  # in place, cumulative (the reference's behaviour)
        rng = torch.Generator()
        rng.manual_seed(seed)
        for i in range(self.data.size(1)):
            row = self.data[:, i]
            shift = torch.randint(0, self.data.size(0), (1,), generator=rng)
            self.data[:, i] = torch.cat((row[shift:], row[:shift]))

    def batches(self):
        rows = self.data.size(0)
        for i in range(0, rows - 1, self.bptt):
            seq_len = min(self.bptt, rows - 1 - i)
            data = self.data[max(0, i - self.ext_len) : i + seq_len]
            target = self.data[i + 1 : i + 1 + seq_len]
            warm = i >= self.warmup_elems if self.warmup_elems else True
            yield data, target, seq_len, warm
