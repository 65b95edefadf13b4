"""--restart from a checkpoint that does not fit this run: one line naming the checkpoint and what does not fit,
exit 2, nothing trained (issue 13, class 5). A checkpoint whose fields were damaged is refused the same way,
never resumed with a silently wrong position."""
import pytest
import torch

import cli_runner
from cli_runner import tiny_args


@pytest.fixture(scope="module")
def trained(demo_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    result = cli_runner.train(tiny_args(demo_corpus, tmp / "work", max_step=4, eval_interval=2, no_test=True,
                                        no_env=True), tmp)
    assert result.returncode == 0, result.stderr
    return demo_corpus, tmp / "work" / "checkpoint_last.pt"


def first_weight(state: dict) -> str:
    return next(k for k in state if k.endswith("weight"))


DAMAGE = {
    "a step that is text": (lambda c: c.update(train_step="3"), "the training state's train_step is '3', expected "
                                                                "an integer >= 0"),
    "a negative position": (lambda c: c.update(batch=-5), "the training state's batch is -5, expected an integer >= 0"),
    "a position past the end": (lambda c: c["data_states"][0].update(batch=10 ** 6),
                                "cannot resume the data stream: its saved batch is 1000000, outside this stream "
                                "(0..12)"),
    "a best loss that is text": (lambda c: c.update(best_val_loss="x"),
                                 "the training state's best_val_loss is 'x', expected a finite number or none"),
    "a missing field": (lambda c: c.pop("log_acc"), "the training state lacks log_acc"),
    "fewer per-rank entries": (lambda c: c.update(rng_states=[]),
                               "the training state's rng_states has 0 entries, expected one per process (1)"),
    "a missing weight": (lambda c: c["model_state"].pop("r_w_bias"),
                         'its weights do not fit the model (Error(s) in loading state_dict for MemTransformerLM: '
                         'Missing key(s) in state_dict: "r_w_bias".)'),
    "an extra weight": (lambda c: c["model_state"].update({"bogus.weight": torch.zeros(1)}),
                        'Unexpected key(s) in state_dict: "bogus.weight"'),
    "a weight of another shape": (lambda c: c["model_state"].update({first_weight(c["model_state"]): torch.zeros(3, 3)}),
                                  "its weights do not fit the model (Error(s) in loading state_dict for "
                                  "MemTransformerLM: size mismatch for"),
    "another vocabulary size": (lambda c: c["model_config"].update(n_token=c["model_config"]["n_token"] + 1),
                                "it has another model (n_token="),
    "no vocabulary": (lambda c: c.pop("vocab"), "its vocabulary is missing or damaged; resume from another "
                                                "checkpoint"),
    "a vocabulary that is text": (lambda c: c.update(vocab="x"), "its vocabulary is missing or damaged"),
    "no optimizer state": (lambda c: c.pop("optimizer_state"), "it has no 'optimizer_state' field; resume from "
                                                               "another checkpoint"),
    "a moment of another shape": (lambda c: c["optimizer_state"]["state"][0].update(exp_avg=torch.zeros(3, 3)),
                                  "its optimizer state exp_avg of "),
    "a moment for no parameter": (lambda c: c["optimizer_state"]["state"].update({999: {}}),
                                  "its optimizer state has an entry 999 for no parameter of this model"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_refused_in_one_line(trained, tmp_path, damage):
    corpus, checkpoint = trained
    change, expected = DAMAGE[damage]
    ckpt = torch.load(checkpoint, weights_only=True)
    change(ckpt)
    damaged = tmp_path / "damaged.pt"
    torch.save(ckpt, damaged)
    result = cli_runner.train(tiny_args(corpus, tmp_path / "work", max_step=8, restart=damaged), tmp_path)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: checkpoint {damaged} cannot be resumed: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "work" / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("optim", ["sgd", "adam", "adagrad"])
def test_another_optimizer_is_refused_in_one_line(trained, tmp_path, optim):
    corpus, checkpoint = trained
    result = cli_runner.train(tiny_args(corpus, tmp_path / "work", max_step=8, restart=checkpoint, optim=optim),
                              tmp_path)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: checkpoint {checkpoint} cannot be resumed: it was trained with --optim lamb, this run has --optim "
        f"{optim}; resume with --optim lamb"]


def test_the_multi_tensor_form_of_the_same_optimizer_resumes(trained, tmp_path):
    corpus, checkpoint = trained
    result = cli_runner.train(tiny_args(corpus, tmp_path / "work", max_step=6, eval_interval=2, no_test=True,
                                        restart=checkpoint, optim="jitlamb"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert torch.load(tmp_path / "work" / "checkpoint_last.pt", weights_only=True)["train_step"] == 6
