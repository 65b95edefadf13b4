"""Shared test fixtures: the repository root on sys.path, and ../shared when it exists.

How to compare numbers (bitwise only where the project promises it: same inputs and shapes in the same
process, exact resume; a dtype-fitted tolerance from numerics.py wherever inputs or shapes differ) and what a
test may not assume about the machine: tests/README.md.
"""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Without a GPU, Triton kernels (utils/model/triton_rel_attention.py) run in Triton's interpreter, which Triton
# reads when it is imported: set before any test imports it.
if "TRITON_INTERPRET" not in os.environ:
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# ../shared holds real corpora and a reference checkpoint on development and CI machines only.
SHARED = Path(os.environ.get("TXL_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present (reference material exists only on development machines)")
    return SHARED


@pytest.fixture(params=["math", "sdpa"])
def attn_impl(request, monkeypatch) -> str:
    """Runs a test once per eager attention implementation (tiny_model uses it; 'flex' needs torch.compile
    and has its own tests). Use with `pytestmark = pytest.mark.usefixtures("attn_impl")`."""
    import model_testlib
    monkeypatch.setattr(model_testlib, "ATTN_IMPL", request.param)
    return request.param


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """A small synthetic demo corpus (tests/cli_runner.py: 12 batches of 16 x 8 per epoch) for the CLI tests."""
    import cli_runner
    return cli_runner.demo_corpus(tmp_path_factory.mktemp("demo_corpus") / "demo")
