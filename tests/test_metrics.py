"""Log lines match the reference's examples character for character; the meter averages correctly."""
import math

from utils.training.metrics import (AverageMeter, format_eval_line, format_split_result, format_test_line,
                           format_train_line)


def test_train_line_matches_reference_readme_example():
    # From the reference README: loss printed 3.12 (rounded), ppl 22.71 computed from the unrounded loss.
    line = format_train_line(18, 36000, 283, 2101, 1.220e-03, 185.1, 265585, math.log(22.71), "wt103")
    assert line == ("| epoch  18 step    36000 | batches    283 / 2101 | lr 1.220e-03 | ms/batch 185.1 "
                    "| tok/s  265585 | loss  3.12 | ppl     22.71")


def test_eval_line_matches_reference_readme_example():
    line = format_eval_line(7, 35000, 1.37, math.log(23.132), "wt103")
    assert line == "| Eval   7 at step    35000 | time:  1.37s | valid loss  3.14 | valid ppl    23.132"


def test_bpc_datasets_report_bits_per_character():
    loss = 0.7
    assert format_train_line(1, 10, 10, 100, 1e-3, 1.0, 1.0, loss, "enwik8").endswith(
        f"| bpc {loss / math.log(2):9.5f}")
    assert format_test_line(1.0, loss, "text8").endswith(f"| test bpc {loss / math.log(2):9.5f}")
    assert "ppl" not in format_eval_line(1, 10, 1.0, loss, "enwik8")


def test_split_result_line_matches_reference_eval_output():
    # expected.json of the reference fixture: "| valid loss  6.80 | valid ppl   902.165"
    assert format_split_result("valid", math.log(902.165), "wt103").rstrip() == "| valid loss  6.80 | valid ppl   902.165"


def test_average_meter_skips_warmup_and_weights_by_n():
    meter = AverageMeter(warmup=2, keep=True)
    for val, n in [(100.0, 1.0), (100.0, 1.0), (1.0, 1.0), (4.0, 3.0)]:
        meter.update(val, n)
    assert meter.avg == (1.0 * 1 + 4.0 * 3) / 4
    assert meter.values == [1.0, 4.0]
    assert meter.avg_or_warmup() == meter.avg


def test_average_meter_of_a_run_no_longer_than_its_warmup_averages_every_update():
    meter = AverageMeter(warmup=3)
    assert meter.avg_or_warmup() == 0.0
    for val, n in [(10.0, 1.0), (40.0, 2.0)]:
        meter.update(val, n)
    assert meter.avg == 0.0
    assert meter.avg_or_warmup() == (10.0 * 1 + 40.0 * 2) / 3
