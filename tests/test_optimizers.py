"""build_optimizer: each --optim value gives the reference's optimizer with the flags it reads."""
import argparse

import pytest
import torch

from lamb import Lamb
from utils.io.errors import UserError
from utils.training.optimizers import build_optimizer


def build(optim):
    args = argparse.Namespace(optim=optim, lr=0.02, weight_decay=0.1, mom=0.9, compile=False)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)
    return build_optimizer(args, model)


@pytest.mark.parametrize("optim, cls, expected", [
    ("jitlamb", Lamb, {"lr": 0.02, "weight_decay": 0.1, "fused": True}),
    ("lamb", Lamb, {"lr": 0.02, "weight_decay": 0.1, "fused": False}),
    ("adam", torch.optim.Adam, {"lr": 0.02, "weight_decay": 0.1}),
    ("sgd", torch.optim.SGD, {"lr": 0.02, "momentum": 0.9}),
    ("adagrad", torch.optim.Adagrad, {"lr": 0.02}),
])
def test_mapping(optim, cls, expected):
    opt = build(optim)
    assert type(opt) is cls
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 3  # frozen bias left out
    for key, value in expected.items():
        assert opt.param_groups[0][key] == value


def test_unknown_optimizer():
    with pytest.raises(UserError, match="unknown --optim"):
        build("rmsprop")
