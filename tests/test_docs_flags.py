"""Docs that cannot go stale: every `--flag` that README.md and docs/*.md mention exists in the parser of the
program it is given to (tests/docs_flags.py says how a flag is tied to its program)."""
import pytest

from docs_flags import DOCS, REPO, mentions, unknown_flags


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_every_flag_in_the_docs_exists(doc):
    assert unknown_flags(doc.read_text(encoding="utf-8"), str(doc.relative_to(REPO))) == []


def test_a_made_up_flag_is_caught_in_a_command_and_in_prose():
    assert unknown_flags("```\npython train.py --max_step 10 --made_up_flag 3\n```\n") == [
        ":2: --made_up_flag is not a flag of train.py"]
    assert unknown_flags("Set `--made_up_flag` to go faster.\n")
    assert unknown_flags("Pass --made_up_flag to go faster.\n")
    assert unknown_flags("python scripts/benchmark_ab.py --runs 3 --made_up_flag\n") == [
        ":1: --made_up_flag is not a flag of train.py, eval.py, generate.py or a script"]   # prose
    assert unknown_flags("`python scripts/benchmark_ab.py --runs 3 --made_up_flag`") == [
        ":1: --made_up_flag is not a flag of scripts/benchmark_ab.py"]


def test_a_flag_is_checked_against_the_program_it_is_given_to():
    # --num_tokens is generate.py's, not eval.py's; --max_step is train.py's, not generate.py's
    assert unknown_flags("`python eval.py --num_tokens 5`") == [":1: --num_tokens is not a flag of eval.py"]
    assert unknown_flags("```\npython generate.py --model m.pt \\\n    --max_step 3\n```") == [
        ":2: --max_step is not a flag of generate.py"]
    # after `|` or `&&` the next program's flags; a launcher's own flags are not ours to check
    assert unknown_flags("`torchrun --nproc_per_node 8 train.py --max_step 3 && python eval.py --split test`") == []
    assert unknown_flags("`python train.py --split test`") == [":1: --split is not a flag of train.py"]
    assert [m[1:] for m in mentions("`python -m utils.data.demo_corpus data/demo`")] == []
    # booleans are accepted with --no_ too; a prefix like `--no_` is not a flag
    assert unknown_flags("`python train.py --no_compile` and any `--no_` form") == []
