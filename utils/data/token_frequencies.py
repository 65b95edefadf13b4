"""WikiText-103's token frequency distribution by rank, for synthetic benchmark data (scripts/benchmark_train.py,
scripts/benchmark_inference.py), as a few fitted numbers (no corpus text).

Ids of a WikiText-103 vocabulary are frequency ranks (the most frequent word first), so a synthetic stream
drawn from p(rank) gives the adaptive softmax the cluster sizes of the real corpus. Only the validation and
test splits are available here (463,215 tokens with <eos>, 28,441 distinct words), not the training split
the vocabulary was ranked on, so p is fitted in two parts (scripts/fit_token_frequencies.py prints them again
from the two files; tests/test_token_frequencies.py checks them):

- head, ranks 1 .. HEAD_RANKS: the measured cumulative share of tokens at a few ranks (WT103_HEAD_CUMULATIVE),
  the counts ranked within the sample (there a word's count is >= 17, so the ranking is close to the true one);
  between two table ranks the share falls off as 1/rank;
- tail, ranks HEAD_RANKS+1 .. 267,735: a power law A · rank^-s whose two parameters are fixed by two facts:
  it holds the rest of the measured mass (1 - the head's share), and its last rank has the frequency of the
  rarest vocabulary word, 3 in the 103,227,021 training tokens (WikiText-103 keeps words seen at least 3
  times). Its value at the first tail rank then matches the measured one (17.5 against 17 occurrences): the
  two parts join without a step.

The shares of the base cutoffs (19,997 / 39,997 / 199,997) this gives: 95.2% of tokens in the shortlist,
2.1%, 2.5% and 0.25% in the tail clusters (Zipf with exponent 1.3 over the same ranks, the old synthetic
data: 97.6% in the shortlist). Measured bounds for the shortlist share without the training split: 98.2%
(ranked and counted on the same sample: too high, rare words that happened to occur rank early) and 90.5%
(ranked on valid, counted on test: too low, every word unseen in valid ranks last).
"""
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

WT103_VOCAB = 267735                      # words in the vocabulary, <eos> included
WT103_TRAIN_TOKENS = 103227021            # tokens of the training split (published)
WT103_MIN_COUNT = 3                       # the vocabulary keeps words seen at least this often
HEAD_RANKS = 3000
# (rank, share of the tokens in ranks 1..rank), measured on valid + test (scripts/fit_token_frequencies.py)
WT103_HEAD_CUMULATIVE: Tuple[Tuple[int, float], ...] = (
    (1, 0.057513), (2, 0.103278), (3, 0.139307), (4, 0.166694), (5, 0.190883), (7, 0.228948), (10, 0.275904),
    (15, 0.323606), (20, 0.354861), (30, 0.402491), (50, 0.442512), (70, 0.467645), (100, 0.492426),
    (150, 0.523034), (200, 0.546109), (300, 0.580998), (500, 0.628699), (700, 0.662731), (1000, 0.700459),
    (1500, 0.744648), (2000, 0.776691), (3000, 0.822907),
)
WT103_TAIL_EXPONENT = 1.596629            # s of the tail power law (fitted as described above)


def rank_probabilities(n_token: int = WT103_VOCAB, head: Sequence[Tuple[int, float]] = WT103_HEAD_CUMULATIVE,
                       tail_exponent: float = WT103_TAIL_EXPONENT) -> np.ndarray:
    """p[r - 1] for ranks 1..n_token (float64, sums to 1). For a vocabulary other than WikiText-103's the same
    curve is cut at n_token (or continued with the tail law) and normalized."""
    last_head = head[-1][0]
    ranks = np.arange(1, max(n_token, last_head) + 1, dtype=np.float64)
    p = np.empty_like(ranks)
    prev_rank, prev_share = 0, 0.0
    for rank, share in head:                               # each segment's mass spread as 1/rank
        seg = slice(prev_rank, rank)
        weights = 1.0 / ranks[seg]
        p[seg] = (share - prev_share) * weights / weights.sum()
        prev_rank, prev_share = rank, share
    tail = ranks[last_head:]
    if tail.size:
        # A from the tail's mass over WikiText-103's own tail ranks, so the curve does not depend on n_token
        full_tail = np.arange(last_head + 1, WT103_VOCAB + 1, dtype=np.float64) ** -tail_exponent
        p[last_head:] = (1.0 - head[-1][1]) * tail ** -tail_exponent / full_tail.sum()
    p = p[:n_token]
    return p / p.sum()


def cluster_shares(p: np.ndarray, cutoffs: Sequence[int]) -> List[float]:
    """Shares of the probability mass in the shortlist (ids < cutoffs[0]) and each tail cluster."""
    bounds = [0] + list(cutoffs) + [len(p)]
    return [float(p[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]


# ---- fitting (scripts/fit_token_frequencies.py, tests/test_token_frequencies.py) -------------------------
def count_words(paths: Iterable[Path]) -> Counter:
    """Word counts with WikiText-103's rules: whitespace-split lines, an <eos> after every line."""
    counts: Counter = Counter()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                counts.update(line.split())
                counts["<eos>"] += 1
    return counts


def fit(counts: Counter, table_ranks: Sequence[int] = tuple(r for r, _ in WT103_HEAD_CUMULATIVE),
        n_token: int = WT103_VOCAB, last_frequency: float = WT103_MIN_COUNT / WT103_TRAIN_TOKENS
        ) -> Dict[str, object]:
    """The head table and the tail exponent (see the module docstring) from word counts."""
    sorted_counts = np.array(sorted(counts.values(), reverse=True), dtype=np.float64)
    cumulative = np.cumsum(sorted_counts) / sorted_counts.sum()
    head = tuple((int(r), round(float(cumulative[r - 1]), 6)) for r in table_ranks)
    last_head, head_share = head[-1]
    tail_ranks = np.arange(last_head + 1, n_token + 1, dtype=np.float64)

    def tail_mass(s: float) -> float:                      # A fixed by p(n_token) = last_frequency
        return float((last_frequency * (tail_ranks / n_token) ** -s).sum())

    lo, hi = 1.0, 4.0                                      # tail_mass grows with s: bisect
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail_mass(mid) < 1.0 - head_share else (lo, mid)
    s = (lo + hi) / 2
    first_tail = last_frequency * ((last_head + 1) / n_token) ** -s * sorted_counts.sum()
    return {"head": head, "tail_exponent": round(s, 6), "tokens": int(sorted_counts.sum()),
            "types": len(sorted_counts), "first_tail_expected_count": first_tail,
            "first_tail_observed_count": float(sorted_counts[last_head])}


def held_out_shortlist_share(rank_counts: Counter, eval_counts: Counter, cutoff: int) -> float:
    """Share of eval tokens whose word ranks below `cutoff` when ranked by rank_counts (unseen: last)."""
    ranked = {w: i for i, (w, _) in enumerate(rank_counts.most_common())}
    inside = sum(n for w, n in eval_counts.items() if ranked.get(w, cutoff) < cutoff)
    return inside / sum(eval_counts.values())
