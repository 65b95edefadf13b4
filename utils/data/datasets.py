"""The dataset names that `--dataset` accepts: the reference's five corpora, lm1b, and `custom` (any folder
with train/valid/test.txt), and `prepared` (a folder written by scripts/prepare_corpus.py). data_utils.py holds each one's vocabulary rules."""

DATASETS = ("wt103", "wt2", "ptb", "enwik8", "text8", "lm1b", "custom", "prepared")
