"""Helpers for the eval.py / generate.py tests: a small word corpus, checkpoints of random models, and
running the CLIs in-process (no second Python start-up) with their printed lines captured."""
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

from model_testlib import tiny_model
from utils.data.demo_corpus import write_demo_corpus
from utils.data.vocabulary import Vocab

REPO = Path(__file__).resolve().parent.parent
_RESULT = re.compile(r"\| (\w+) loss +[\d.naif-]+ \| \1 ppl +([\d.]+|inf|nan) ")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy shared machine makes more threads much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_corpus(folder: Path) -> Path:
    """A small WikiText-style corpus (about 900 words; valid/test of about 600 tokens each)."""
    return write_demo_corpus(folder, n_train_docs=12, n_eval_docs=1, sentences_per_doc=(60, 80), seed=3)


def write_checkpoint(path: Path, corpus: Path, attn_type: int = 0, n_layer: int = 2, **config) -> Path:
    """A checkpoint in our format of a random float32 model over the corpus' word vocabulary."""
    vocab = Vocab(special=["<eos>"], lower_case=False).build([corpus / f"{s}.txt" for s in ("train", "valid", "test")])
    config.setdefault("tgt_len", 8)
    config.setdefault("mem_len", 16)
    model = tiny_model(attn_type, n_layer=n_layer, n_token=len(vocab), dtype=torch.float32, **config)
    model_config = dict(n_token=len(vocab), n_layer=n_layer, n_head=2, d_model=16, d_head=8, d_inner=24,
                        dropout=0.0, dropatt=0.0, dtype=None, tie_weight=True, d_embed=16, div_val=1,
                        tie_projs=[False], pre_lnorm=False, tgt_len=config["tgt_len"], ext_len=0,
                        mem_len=config["mem_len"], cutoffs=[], same_length=False, attn_type=attn_type,
                        clamp_len=-1, sample_softmax=-1)
    model_config.update({k: v for k, v in config.items() if k in model_config})
    state = {"format": "txl-train-v1", "args": {"dataset": "custom"}, "model_config": model_config,
             "model_state": model.state_dict(), "vocab": vocab.to_dict()}
    torch.save(state, path)
    return path


def run_cli(module_name: str, argv: list, capsys) -> tuple[int, str, str]:
    """Run `module_name.main()` with `argv` in this process; -> (return code, stdout, stderr)."""
    module = importlib.import_module(module_name)
    saved = sys.argv
    sys.argv = [f"{module_name}.py"] + [str(a) for a in argv]
    try:
        code = module.main()
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    return code, out, err


def perplexities(output: str) -> dict:
    """{split: perplexity} from eval.py's result lines."""
    return {m.group(1): float(m.group(2)) for m in _RESULT.finditer(output)}
