"""The synthetic benchmark data's WikiText-103 rank-frequency curve (utils/data/token_frequencies.py): the
stored numbers are what the corpus files give, and the curve keeps the facts it was fitted to."""
import numpy as np
import pytest

from utils.data import token_frequencies as tf

BASE_CUTOFFS = (19997, 39997, 199997)


def corpus_counts(shared_dir):
    folder = shared_dir / "data" / "wikitext-103"
    if not (folder / "test.txt").is_file():
        pytest.skip(f"{folder} has no WikiText-103 valid/test splits")
    return tf.count_words([folder / "valid.txt"]), tf.count_words([folder / "test.txt"])


def test_the_stored_fit_is_what_the_validation_and_test_splits_give(shared_dir):
    valid, test = corpus_counts(shared_dir)
    fitted = tf.fit(valid + test)
    assert fitted["head"] == tf.WT103_HEAD_CUMULATIVE
    assert fitted["tail_exponent"] == tf.WT103_TAIL_EXPONENT
    # the head and the tail are fitted separately; they join without a step (within sampling noise)
    assert abs(fitted["first_tail_expected_count"] / fitted["first_tail_observed_count"] - 1) < 0.1
    # the shortlist share lies between the two estimates the corpus gives without its training split
    shortlist = tf.cluster_shares(tf.rank_probabilities(), BASE_CUTOFFS)[0]
    low = tf.held_out_shortlist_share(valid, test, BASE_CUTOFFS[0])
    high = tf.held_out_shortlist_share(valid + test, valid + test, BASE_CUTOFFS[0])
    assert low < shortlist < high


def test_the_curve_keeps_the_head_table_the_total_and_the_rarest_word_frequency():
    p = tf.rank_probabilities()
    assert p.shape == (tf.WT103_VOCAB,) and abs(p.sum() - 1) < 1e-12 and (p > 0).all()
    cumulative = np.cumsum(p)
    for rank, share in tf.WT103_HEAD_CUMULATIVE:
        assert abs(cumulative[rank - 1] - share) < 1e-9, rank
    # the last rank has the frequency of a word seen 3 times in the 103M training tokens
    assert abs(p[-1] * tf.WT103_TRAIN_TOKENS / tf.WT103_MIN_COUNT - 1) < 1e-3
    shares = tf.cluster_shares(p, BASE_CUTOFFS)
    zipf = np.arange(1, tf.WT103_VOCAB + 1, dtype=np.float64) ** -1.3
    assert shares[0] < tf.cluster_shares(zipf / zipf.sum(), BASE_CUTOFFS)[0]    # fewer than the old Zipf 1.3
    assert abs(sum(shares) - 1) < 1e-12


def test_a_smaller_vocabulary_cuts_the_same_curve():
    full, small = tf.rank_probabilities(), tf.rank_probabilities(33278)
    assert abs(small.sum() - 1) < 1e-12
    np.testing.assert_allclose(small / small[0], full[:33278] / full[0], rtol=1e-12)
