"""Portable exports (issue 17): scripts/export.py writes weights (safetensors), config.json and a Hugging Face
tokenizer.json; the model rebuilt from config.json alone scores what the checkpoint scores; the tokenizer
encodes the test split to the corpus cache's ids; eval.py and generate.py read the folder."""
import json

import numpy as np
import pytest
import torch

import cli_runner
from cli_runner import tiny_args

REPO = cli_runner.REPO


@pytest.fixture(scope="module")
def exported(demo_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    result = cli_runner.train(tiny_args(demo_corpus, tmp / "work", max_step=10, eval_max_steps=2), tmp)
    assert result.returncode == 0, result.stderr
    out = tmp / "exported"
    done = cli_runner.run(str(REPO / "scripts" / "export.py"), ["--model", tmp / "work" / "checkpoint_best.pt",
                                                                "--output", out], tmp, name="export")
    assert done.returncode == 0, done.stderr
    return demo_corpus, tmp / "work" / "checkpoint_best.pt", out


def _test_loss(model, ids, tgt_len=8, mem_len=8):
    """Mean NLL of the ids in one stream, segments of tgt_len carrying the memory (float64)."""
    model = model.double().eval()
    model.reset_length(tgt_len, 0, mem_len)
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    total, mems = 0.0, None
    with torch.no_grad():
        for i in range(0, len(ids) - 1, tgt_len):
            data, target = ids[i: i + tgt_len], ids[i + 1: i + 1 + tgt_len]
            nll, mems = model(data[: len(target), None], target[:, None], mems)
            total += nll.sum().item()
    return total / (len(ids) - 1)


def test_weights_config_and_tokenizer_rebuild_the_model(exported):
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    import data_utils
    from mem_transformer import MemTransformerLM

    corpus_dir, ckpt_path, out = exported
    ckpt = torch.load(ckpt_path, weights_only=True)
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == ckpt["model_state"].keys()
    assert all(torch.equal(weights[k], ckpt["model_state"][k]) for k in weights)
    config = json.loads((out / "config.json").read_text())
    assert config["model_config"] == json.loads(json.dumps(ckpt["model_config"]))
    assert config["dataset"] == "custom" and config["evaluation"]["tgt_len"] == 8

    # the test split through tokenizer.json, line by line: the corpus cache's ids
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    lines = (corpus_dir / "test.txt").read_text(encoding="utf-8").splitlines()
    ids = [i for line in lines for i in tokenizer.encode(line).ids]
    cached = np.asarray(data_utils.get_lm_corpus(corpus_dir, "custom", verbose=False).test)
    assert ids == cached.tolist()

    # a model built from config.json and the safetensors weights alone scores what the checkpoint's model scores
    rebuilt = MemTransformerLM(**config["model_config"])
    rebuilt.load_state_dict(weights)
    original = MemTransformerLM(**ckpt["model_config"])
    original.load_state_dict(ckpt["model_state"])
    first = ids[:200]
    assert _test_loss(rebuilt, first) == _test_loss(original, first)


@pytest.mark.slow
def test_eval_and_generate_read_the_folder(exported, tmp_path):
    corpus_dir, ckpt_path, out = exported
    flags = ["--split", "test", "--work_dir", tmp_path / "w"]
    from_ckpt = cli_runner.evaluate(["--model", ckpt_path, *flags], tmp_path, name="ckpt")
    from_dir = cli_runner.evaluate(["--model", out, *flags], tmp_path, name="dir")
    assert from_ckpt.returncode == from_dir.returncode == 0, from_dir.stderr
    line = [l for l in from_ckpt.lines if l.startswith("| test loss")]
    assert line and line == [l for l in from_dir.lines if l.startswith("| test loss")]
    assert any(l.startswith(f"From the checkpoint's configuration: --data {corpus_dir}") for l in from_dir.lines)
    generated = cli_runner.run(str(REPO / "generate.py"), ["--model", out, "--num_tokens", 5, "--prompt", "the",
                                                           "--no_cuda", "--progress"], tmp_path, name="generate")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("=== sample 1 ===")
    assert "generating" in generated.stderr and "token/s" in generated.stderr      # the bar, on stderr only


@pytest.mark.slow
@pytest.mark.parametrize("name,dataset", [("ptb", "ptb"), ("wikitext-2", "wt2")])
def test_tokenizer_json_encodes_a_real_test_split_to_the_cached_ids(shared_dir, tmp_path, name, dataset):
    """PTB (lower-cased, <unk> in the text) and WikiText-2: the exported tokenizer, line by line, gives the ids
    of the corpus cache, <eos> included."""
    import shutil

    from tokenizers import Tokenizer

    import data_utils
    from inference.export import hf_tokenizer, line_ends_of

    source = shared_dir / "data" / name
    if not (source / "test.txt").is_file():
        pytest.skip(f"{source} not present")
    data = tmp_path / name
    shutil.copytree(source, data, ignore=shutil.ignore_patterns(".*"))
    corpus = data_utils.get_lm_corpus(data, dataset, verbose=False, progress=False)
    path = tmp_path / "tokenizer.json"
    path.write_text(hf_tokenizer(corpus.vocab, line_ends_of(dataset)).to_str())
    tokenizer = Tokenizer.from_file(str(path))
    lines = (data / "test.txt").read_text(encoding="utf-8").splitlines()
    ids = [i for encoding in tokenizer.encode_batch(lines) for i in encoding.ids]
    assert ids == np.asarray(corpus.test).tolist()
