"""Continuing a run of the reference trainer from its checkpoint (issue 13): the optimizer moments, schedule,
random state, memory and data position are restored, not only the weights.

The reference's own continuation losses are not among the fixtures, so the continuation is checked against
the next best truth: our trainer, which equals the reference trainer step by step, run without a stop. A run
of ours is stopped, its checkpoint rewritten in the reference's format (its names, its parameter order, its
per-layer memory list, no `format` key) by `to_reference_format` below, and restarted: the next 10 losses must
be those of the uninterrupted run. The reference's real checkpoint checks the parameter order it numbers its
optimizer states by."""
import json
import re

import pytest
import torch

import cli_runner
from cli_runner import tiny_args
from utils.io.checkpoint import load_checkpoint
from utils.training.reference_resume import map_optimizer_state, reference_parameter_names

# our names -> the reference's (attn_type 0); reference_compat.py holds the other direction
_OURS_TO_REFERENCE = [(r"layers\.(\d+)\.attn\.", r"layers.\1.dec_attn."), (r"layers\.(\d+)\.ff\.fc1\.", r"layers.\1.pos_ff.CoreNet.0."),
                      (r"layers\.(\d+)\.ff\.fc2\.", r"layers.\1.pos_ff.CoreNet.3."),
                      (r"layers\.(\d+)\.ff\.layer_norm\.", r"layers.\1.pos_ff.layer_norm.")]


def _reference_name(name: str) -> str:
    for pattern, replacement in _OURS_TO_REFERENCE:
        name = re.sub(pattern, replacement, name)
    return name


def _reference_order(names):
    """The reference registers r_w_bias and r_r_bias before the embedding and the layers (its state dict and
    thus its optimizer numbering), unlike ours: the conversion must reorder."""
    first = [n for n in names if n in ("r_w_bias", "r_r_bias")]
    return first + [n for n in names if n not in first]


def to_reference_format(ours: dict, optim: str) -> dict:
    """One of our single-process checkpoints as the reference trainer writes it (reference-inventory.md §3.6)."""
    our_names = list(ours["model_state"])                                       # our optimizer's order
    order = _reference_order(our_names)
    model_state = {_reference_name(n): ours["model_state"][n] for n in order}
    model_state["pos_emb.inv_freq"] = torch.ones(ours["model_config"]["d_model"] // 2)   # a buffer: not numbered
    ref_index = {n: i for i, n in enumerate(order)}
    optimizer_state = {
        "state": {ref_index[our_names[i]]: s for i, s in ours["optimizer_state"]["state"].items()},
        "param_groups": [{**g, "params": sorted(ref_index[our_names[i]] for i in g["params"])}
                         for g in ours["optimizer_state"]["param_groups"]],
    }
    memory = [list(m.unbind(0)) for m in ours["memory"][0]]                       # per chunk: per-layer tensors
    return {"args": {"optim": optim}, "model_config": ours["model_config"], "model_state": model_state,
            "optimizer_state": optimizer_state, "scheduler_state": None,
            "rng_states": [ours["rng_states"][0]["torch"]], "memory": memory,
            "vocab": {"idx2sym": ours["vocab"]["idx2sym"], "special": ours["vocab"].get("special"),
                      "lower_case": ours["vocab"].get("lower_case"), "delimiter": ours["vocab"].get("delimiter")},
            "amp_state": None, "epoch": ours["epoch"], "batch": ours["batch"], "last_iter": ours["last_iter"],
            "train_step": ours["train_step"], "best_val_loss": ours["best_val_loss"]}


def _losses(work_dir):
    records = [json.loads(line) for line in (work_dir / "train_log.json").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if isinstance(r["step"], int) and "train_loss" in r}


@pytest.mark.parametrize("optim,lr", [("adam", 0.002), ("lamb", 0.01)])
def test_a_reference_checkpoint_continues_as_the_uninterrupted_run(demo_corpus, tmp_path, optim, lr):
    # inv_sqrt: a learning rate that does not depend on --max_step, so the run stopped at step 6 and the
    # uninterrupted one follow the same schedule
    common = dict(max_step=16, eval_interval=6, log_interval=1, no_test=True, optim=optim, lr=lr, warmup_step=4,
                  scheduler="inv_sqrt", dropout=0.1, mem_len=12)
    whole = cli_runner.train(tiny_args(demo_corpus, tmp_path / "whole", **common), tmp_path, name="whole")
    assert whole.returncode == 0, whole.stderr
    first = cli_runner.train(tiny_args(demo_corpus, tmp_path / "first", **{**common, "max_step": 6}), tmp_path,
                             name="first")
    assert first.returncode == 0, first.stderr
    ours = torch.load(tmp_path / "first" / "checkpoint_last.pt", weights_only=True)
    assert ours["train_step"] == 6 and ours["memory"][0][0].shape[1] == 12      # a full memory to carry over
    reference_file = tmp_path / "reference_step6.pt"
    torch.save(to_reference_format(ours, optim), reference_file)
    assert load_checkpoint(reference_file)["format"] == "reference"

    continued = cli_runner.train(tiny_args(demo_corpus, tmp_path / "continued", restart=reference_file, **common),
                                 tmp_path, name="continued")
    assert continued.returncode == 0, continued.stderr
    assert ("Restored from the reference checkpoint: model, optimizer and schedule, random state, memory, data "
            "position") in continued.lines
    expected, got = _losses(tmp_path / "whole"), _losses(tmp_path / "continued")
    assert sorted(got) == list(range(7, 17))
    for step in range(7, 17):                  # same inputs, same process layout: the same arithmetic
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=0), step


def test_a_reference_checkpoint_with_weights_only_continues_differently(demo_corpus, tmp_path):
    """The check above is sharp: without the optimizer moments (the state before this change) the continuation
    moves away from the uninterrupted run by far more than its tolerance (about 6e-4 relative here)."""
    common = dict(max_step=10, eval_interval=6, log_interval=1, no_test=True, optim="adam", lr=0.002,
                  warmup_step=4, scheduler="inv_sqrt", dropout=0.1, mem_len=12)
    whole = cli_runner.train(tiny_args(demo_corpus, tmp_path / "whole", **common), tmp_path, name="whole")
    first = cli_runner.train(tiny_args(demo_corpus, tmp_path / "first", **{**common, "max_step": 6}), tmp_path,
                             name="first")
    assert whole.returncode == 0 and first.returncode == 0
    converted = to_reference_format(torch.load(tmp_path / "first" / "checkpoint_last.pt", weights_only=True), "adam")
    converted["optimizer_state"]["state"] = {}
    torch.save(converted, tmp_path / "no_moments.pt")
    continued = cli_runner.train(tiny_args(demo_corpus, tmp_path / "continued", restart=tmp_path / "no_moments.pt",
                                           **common), tmp_path, name="continued")
    assert continued.returncode == 0, continued.stderr
    expected, got = _losses(tmp_path / "whole"), _losses(tmp_path / "continued")
    assert max(abs(got[s] - expected[s]) / expected[s] for s in range(8, 11)) > 20 * 1e-5


def test_another_optimizer_than_the_reference_used_is_one_line(demo_corpus, tmp_path):
    first = cli_runner.train(tiny_args(demo_corpus, tmp_path / "first", max_step=6, eval_interval=6, no_test=True,
                                       optim="adam"), tmp_path, name="first")
    assert first.returncode == 0, first.stderr
    converted = to_reference_format(torch.load(tmp_path / "first" / "checkpoint_last.pt", weights_only=True), "adam")
    del converted["args"]["optim"]                            # known from its param_groups' keys alone
    torch.save(converted, tmp_path / "ref.pt")
    refused = cli_runner.train(tiny_args(demo_corpus, tmp_path / "work", restart=tmp_path / "ref.pt", optim="sgd",
                                         max_step=8), tmp_path, name="refused")
    assert refused.returncode == 2
    assert refused.stderr == (f"error: checkpoint {tmp_path / 'ref.pt'} cannot be resumed: it was trained with "
                              "--optim adam, this run has --optim sgd; resume with --optim adam\n")


def test_the_reference_fixture_numbers_its_optimizer_states_in_its_parameter_order(shared_dir):
    """The reference's real checkpoint (Adam, 100 steps): its 26 states land on parameters of their own shape,
    r_w_bias first, the embedding table third, as the reference registers them."""
    ckpt = load_checkpoint(shared_dir / "fixtures" / "reference-checkpoint" / "ptb_tiny_attn0.pt")
    names = reference_parameter_names(ckpt["model_state"])
    assert len(names) == 26 and names[:3] == ["r_w_bias", "r_r_bias", "word_emb.emb_layers.0.weight"]
    from mem_transformer import MemTransformerLM
    from utils.model.reference_compat import reference_state_dict_to_ours
    model = MemTransformerLM(**ckpt["model_config"])
    ours = [n for n, _ in model.named_parameters()]
    weights = reference_state_dict_to_ours(ckpt["model_state"], ckpt["model_config"])
    mapped = map_optimizer_state(ckpt["optimizer_state"], ckpt["model_state"], ckpt["model_config"], ours,
                                 {n: tuple(weights[n].shape) for n in ours})
    assert set(mapped) == set(ours)                          # every parameter has its moments, shapes checked
    state = ckpt["optimizer_state"]["state"]
    assert torch.equal(mapped["word_emb.emb_layers.0.weight"]["exp_avg_sq"], state[2]["exp_avg_sq"])
    assert torch.equal(mapped["r_r_bias"]["exp_avg"], state[1]["exp_avg"])
    assert all(float(s["step"]) == 100 for s in mapped.values())
