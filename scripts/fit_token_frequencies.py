#!/usr/bin/env python3
"""Fit WikiText-103's rank-frequency curve from its validation and test splits and print the numbers that
utils/data/token_frequencies.py stores (a table of cumulative shares and a tail exponent, no corpus text),
with the shares of the base cutoffs and the bounds measured without the training split.

    python scripts/fit_token_frequencies.py --data ../shared/data/wikitext-103
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from utils.data import token_frequencies as tf  # noqa: E402
from utils.io.errors import UserError, run_cli  # noqa: E402

BASE_CUTOFFS = (19997, 39997, 199997)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "wikitext-103"),
                        help="folder with valid.txt and test.txt")
    args = parser.parse_args()
    paths = [Path(args.data) / name for name in ("valid.txt", "test.txt")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{', '.join(missing)} not found; pass --data with WikiText-103's valid.txt and test.txt")
    valid, test = tf.count_words(paths[:1]), tf.count_words(paths[1:])
    fitted = tf.fit(valid + test)
    print(f"{fitted['tokens']:,} tokens, {fitted['types']:,} distinct words (valid + test)")
    print("WT103_HEAD_CUMULATIVE =", fitted["head"])
    print("WT103_TAIL_EXPONENT =", fitted["tail_exponent"])
    print(f"first tail rank: {fitted['first_tail_expected_count']:.1f} expected occurrences, "
          f"{fitted['first_tail_observed_count']:.0f} observed")
    p = tf.rank_probabilities(tf.WT103_VOCAB, fitted["head"], fitted["tail_exponent"])
    shares = tf.cluster_shares(p, BASE_CUTOFFS)
    print("cluster shares (base cutoffs):", " / ".join(f"{100 * s:.2f}%" for s in shares))
    zipf = tf.np.arange(1, tf.WT103_VOCAB + 1, dtype=float) ** -1.3
    print(f"Zipf 1.3 shortlist share: {100 * tf.cluster_shares(zipf / zipf.sum(), BASE_CUTOFFS)[0]:.2f}%")
    in_sample = tf.held_out_shortlist_share(valid + test, valid + test, BASE_CUTOFFS[0])
    held_out = tf.held_out_shortlist_share(valid, test, BASE_CUTOFFS[0])
    print(f"shortlist share bounds: {100 * held_out:.2f}% (ranked on valid, counted on test) .. "
          f"{100 * in_sample:.2f}% (ranked and counted on valid + test)")


if __name__ == "__main__":
    run_cli(main)
