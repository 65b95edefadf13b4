"""Hostile and broken input that must end in one line, not a traceback, a hang or lost data (issue 13):
preset files that attack the YAML loader (class 8), symbolic links planted in the work directory (class 11),
the permissions of what a run writes (class 12), and a vocabulary that does not match the checkpoint (class 10).
"""
import resource
import time
from pathlib import Path

import pytest
import yaml

import cli_runner
from cli_runner import tiny_args
from utils.config.presets import CONFIG_DIR, MAX_PRESET_BYTES, MAX_PRESET_NODES, load_preset, load_presets
from utils.io.errors import UserError


def assert_one_line_error(result, *words, code=2):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[:2000]
    for word in words:
        assert word in lines[0], lines[0]


# --- class 8: presets that attack the YAML loader -----------------------------------------------------------

def billion_laughs(levels: int = 9) -> str:
    """The classic alias bomb: level k is a list of nine aliases of level k-1, so level 9 stands for 9**9
    (387 million) strings while the file is under a kilobyte."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for k in range(1, levels + 1):
        lines.append(f"l{k}: &l{k} [" + ", ".join([f"*l{k - 1}"] * 9) + "]")
    lines.append(f"default:\n  train:\n    n_layer: *l{levels}")
    return "\n".join(lines) + "\n"


def merge_bomb(levels: int = 9) -> str:
    """The same with merge keys: each level merges nine copies of the previous mapping, and PyYAML's
    flatten_mapping copies the merged pairs, so the pairs multiply by nine per level."""
    lines = ["m0: &m0 {" + ", ".join(f"k{i}: {i}" for i in range(9)) + "}"]
    for k in range(1, levels + 1):
        lines.append(f"m{k}: &m{k} {{<<: [" + ", ".join([f"*m{k - 1}"] * 9) + "]}")
    lines.append(f"default:\n  train:\n    <<: *m{levels}")
    return "\n".join(lines) + "\n"


def load_bounded(path: Path, seconds: float = 1.0, extra_bytes: int = 200 << 20):
    """load_presets(path), asserting it ends within `seconds` and grows the peak memory of this process by
    less than `extra_bytes` (ru_maxrss is a high-water mark: it only shows growth beyond the earlier peak,
    so a bomb that allocates gigabytes shows up, a small allocation does not)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    try:
        return load_presets(path)
    finally:
        elapsed = time.perf_counter() - start
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        assert elapsed < seconds, f"took {elapsed:.2f} s"
        assert grown < extra_bytes, f"peak memory grew by {grown >> 20} MiB"


@pytest.mark.parametrize("text", [billion_laughs(), merge_bomb()], ids=["aliases", "merge_keys"])
def test_alias_bomb_is_refused_at_once(tmp_path, text):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    assert len(text) < 2000
    with pytest.raises(UserError) as info:
        load_bounded(path)
    assert str(info.value) == (f"config file {path} is refused: its aliases expand to more than "
                               f"{MAX_PRESET_NODES:,} values; a preset file holds a few hundred values")


def test_a_smaller_bomb_under_the_budget_still_loads(tmp_path):
    # 9**4 = 6561 strings: legitimate sharing well within the budget is not mistaken for an attack
    path = tmp_path / "small.yaml"
    path.write_text(billion_laughs(levels=3).replace("n_layer", "shared"))
    loaded = load_bounded(path)
    assert len(loaded["default"]["train"]["shared"]) == 9 and loaded["default"]["train"]["shared"][0][0][0] == ["lol"] * 9


@pytest.mark.parametrize("text", ["a: &a [1, *a]\n", "a: &a {b: *a}\n"], ids=["list", "mapping"])
def test_an_anchor_that_contains_itself_is_refused(tmp_path, text):
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match="^config file .* is refused: an anchor contains an alias of itself; "):
        load_bounded(path)


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:   # a sparse file of 300 MB: reading it would cost its size in memory
        f.truncate(300 << 20)
    with pytest.raises(UserError) as info:
        load_bounded(path, extra_bytes=50 << 20)
    assert str(info.value) == (f"config file {path} is 314,572,800 bytes, over the limit of {MAX_PRESET_BYTES:,} "
                               "bytes for a preset file; pass a preset file (configs/*.yaml), not a data file")


def test_a_file_just_under_the_limit_is_parsed_within_a_second(tmp_path):
    lines, size = ["default:", "  train:"], 0
    while size < MAX_PRESET_BYTES - 100:
        lines.append(f"    key_{len(lines):07d}: {len(lines)}")
        size += len(lines[-1]) + 1
    path = tmp_path / "long.yaml"
    path.write_text("\n".join(lines)[:MAX_PRESET_BYTES] + "\n")
    assert path.stat().st_size <= MAX_PRESET_BYTES
    assert len(load_bounded(path, seconds=3.0)["default"]["train"]) == len(lines) - 2  # 3 s: a shared CI core


def test_a_non_utf8_file_names_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# café\ndefault:\n  train: {n_layer: 2}\n".encode("latin-1"))
    with pytest.raises(UserError) as info:
        load_bounded(path)
    assert str(info.value) == f"config file {path} is not UTF-8 text (byte 0xe9 at offset 5); save it as UTF-8"


@pytest.mark.parametrize("text, words", [
    ("[" * 100_000, "is not valid YAML: while increasing flow level exceeded maximum nesting depth"),
    ("default:\n  train:\n    seed: 2001-13-45\n", "holds a value that cannot be read: month must be in 1..12; "),
    ("default:\n  train:\n    seed: " + "1" * 5000 + "\n", "holds a value that cannot be read: Exceeds the limit"),
    ("default:\n  train:\n    x: \x00\n", "is not valid YAML: unacceptable character #x0000"),
    ("default:\n  train:\n    x: !!python/object:os.system {}\n", "is not valid YAML: could not determine a constructor"),
], ids=["deep_nesting", "bad_date", "huge_integer", "nul", "python_tag"])
def test_neighbours_end_in_one_short_line(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_bounded(path)
    message = str(info.value)
    assert words in message and "\n" not in message and len(message) < 500, message


def test_shipped_presets_with_anchors_and_merge_keys_load_as_plain_yaml_does():
    # the bounded loader gives exactly what yaml.safe_load gives for the shipped files (anchors, `<<: *train`)
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        plain = yaml.safe_load(path.read_text())
        for name, preset in load_presets(path).items():
            assert preset == plain[name], (path.name, name)
    assert load_preset(CONFIG_DIR / "wt103_large.yaml", "default", "train")["n_layer"] == 18


def test_train_with_a_bomb_preset_prints_one_line_and_touches_nothing(tmp_path, demo_corpus):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    work = tmp_path / "work"
    start = time.perf_counter()
    result = cli_runner.train(tiny_args(demo_corpus, work) + ["--config_file", str(path)], tmp_path)
    assert_one_line_error(result, str(path), "is refused: its aliases expand")
    assert time.perf_counter() - start < 30   # a forked process; the load itself is asserted above (< 1 s)
    assert not work.exists()


# --- class 11: never write through a symbolic link in the work directory -------------------------------------

VICTIM_TEXT = "export PATH=/usr/bin  # someone's file that a link in the work directory points at\n"


def plant_link(work: Path, name: str, tmp_path: Path) -> Path:
    victim = tmp_path / f"victim_{name}"
    victim.write_text(VICTIM_TEXT)
    work.mkdir(parents=True, exist_ok=True)
    (work / name).symlink_to(victim)
    return victim


@pytest.mark.parametrize("mode", ["a", "w"])
def test_open_nofollow_refuses_a_link_and_leaves_its_target(tmp_path, mode):
    from utils.io.atomic import open_nofollow
    victim = plant_link(tmp_path / "work", "train_log.log", tmp_path)
    with pytest.raises(UserError) as info:
        open_nofollow(tmp_path / "work" / "train_log.log", mode)
    assert str(info.value) == (f"{tmp_path / 'work' / 'train_log.log'} is a symbolic link (to {victim}); a run does "
                               "not write through links, which could overwrite their target: remove the link or "
                               "choose another work directory")
    assert victim.read_text() == VICTIM_TEXT


def test_open_nofollow_appends_to_and_rewrites_a_plain_file(tmp_path):
    from utils.io.atomic import open_nofollow
    path = tmp_path / "log.txt"
    with open_nofollow(path, "a") as f:
        f.write("one\n")
    with open_nofollow(path, "a") as f:
        f.write("two\n")
    assert path.read_text() == "one\ntwo\n"
    with open_nofollow(path, "w") as f:
        f.write("three\n")
    assert path.read_text() == "three\n"


def test_atomic_writes_replace_a_link_not_its_target(tmp_path):
    # os.replace renames onto the directory entry: the link is replaced by the new file, its target is untouched
    import torch
    from utils.io.atomic import copy_file_atomic, torch_save_atomic, write_text_atomic
    work = tmp_path / "work"
    victims = {name: plant_link(work, name, tmp_path) for name in ("config.yaml", "checkpoint_last.pt", "copy.pt")}
    write_text_atomic(work / "config.yaml", "default: {}\n")
    torch_save_atomic({"x": torch.arange(3)}, work / "checkpoint_last.pt")
    copy_file_atomic(work / "checkpoint_last.pt", work / "copy.pt")
    for name, victim in victims.items():
        assert not (work / name).is_symlink() and (work / name).is_file(), name
        assert victim.read_text() == VICTIM_TEXT, name
    assert (work / "config.yaml").read_text() == "default: {}\n"
    assert torch.equal(torch.load(work / "copy.pt")["x"], torch.arange(3))


@pytest.mark.parametrize("name", ["train_log.log", "train_log.json"])
def test_train_refuses_a_log_that_is_a_link(tmp_path, demo_corpus, name):
    work = tmp_path / "work"
    victim = plant_link(work, name, tmp_path)
    result = cli_runner.train(tiny_args(demo_corpus, work), tmp_path)
    assert_one_line_error(result, f"{work / name} is a symbolic link (to {victim})")
    assert victim.read_text() == VICTIM_TEXT
    assert not list(work.glob("*.pt"))


def test_train_replaces_links_to_its_config_and_checkpoints(tmp_path, demo_corpus):
    work = tmp_path / "work"
    victims = [plant_link(work, name, tmp_path) for name in ("config.yaml", "checkpoint_best.pt")]
    result = cli_runner.train(tiny_args(demo_corpus, work), tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    for victim in victims:
        assert victim.read_text() == VICTIM_TEXT
    if result.returncode == 0:    # (a run that refuses a work directory holding checkpoints is fine as well)
        assert not (work / "config.yaml").is_symlink() and (work / "config.yaml").is_file()
        assert not (work / "checkpoint_best.pt").is_symlink() and (work / "checkpoint_best.pt").is_file()
    else:
        assert_one_line_error(result)


# --- class 12: what a run writes honours the umask ----------------------------------------------------------

@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_train_writes_checkpoints_and_logs_with_the_umask(tmp_path, demo_corpus, umask, expected):
    import os
    import stat
    work, cache = tmp_path / "work", tmp_path / "cache"
    result = cli_runner.train(tiny_args(demo_corpus, work, cache_dir=cache), tmp_path, hook=os.umask,
                              hook_args=(umask,))
    assert result.returncode == 0, result.stderr
    written = sorted(p for p in work.iterdir() if p.is_file())
    assert {"checkpoint_last.pt", "checkpoint_best.pt", "config.yaml", "train_log.log"} <= {p.name for p in written}
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path.name, oct(path.stat().st_mode))
    # the dataset cache too, its folders included (a cache in a shared data folder serves the whole team)
    cached = [p for p in cache.rglob("*") if not p.name.startswith(".")]
    assert any(p.is_dir() for p in cached) and any(p.is_file() for p in cached)
    for path in cached:
        folder_mode = expected | (expected & 0o444) >> 2          # r -> x for folders
        want = folder_mode if path.is_dir() else expected
        assert stat.S_IMODE(path.stat().st_mode) == want, (path, oct(path.stat().st_mode))


# --- class 10: a vocabulary swapped for another one ---------------------------------------------------------

def sha256_of_symbols(symbols) -> str:
    import hashlib
    import json
    text = json.dumps({"idx2sym": list(symbols), "type": "word"}, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def swap_two(symbols: list) -> list:
    swapped = list(symbols)
    swapped[-1], swapped[-2] = swapped[-2], swapped[-1]
    return swapped


def test_word_fingerprint_is_the_hash_of_the_ordered_symbols():
    from utils.data.vocabulary import Vocab
    vocab = Vocab.from_dict({"type": "word", "idx2sym": ["<eos>", "the", "cat", "sat"], "special": ["<eos>"]})
    assert vocab.fingerprint() == sha256_of_symbols(["<eos>", "the", "cat", "sat"])
    swapped = Vocab.from_dict({"type": "word", "idx2sym": ["<eos>", "the", "sat", "cat"], "special": ["<eos>"]})
    assert swapped.fingerprint() != vocab.fingerprint()


def test_bpe_vocabularies_of_one_size_are_not_the_same(tmp_path):
    # before the fingerprint, resuming compared idx2sym lists, which BPE vocabularies do not have: any two BPE
    # vocabularies of one size passed as the same
    import random
    from utils.data.vocabulary import BPEVocab
    from utils.training.checkpointer import same_vocab
    vocabs = []
    for seed in (1, 2):
        rng = random.Random(seed)
        path = tmp_path / f"train{seed}.txt"
        path.write_text("\n".join(" ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6)))
                                           for _ in range(12)) for _ in range(300)) + "\n")
        vocabs.append(BPEVocab.train([path], vocab_size=300, min_frequency=1))
    assert len(vocabs[0]) == len(vocabs[1])
    assert vocabs[0].fingerprint() != vocabs[1].fingerprint()
    assert not same_vocab(vocabs[0], vocabs[1])
    assert same_vocab(vocabs[0], BPEVocab.from_dict(vocabs[0].to_dict()))


def copy_corpus(demo_corpus: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in ("train.txt", "valid.txt", "test.txt"):
        (target / name).write_bytes((demo_corpus / name).read_bytes())
    return target


def test_a_cache_whose_vocab_json_was_swapped_is_rebuilt(tmp_path, demo_corpus, capsys):
    import json
    import data_utils
    data = copy_corpus(demo_corpus, tmp_path / "data")
    corpus = data_utils.get_lm_corpus(data, "custom", cache_dir=tmp_path / "cache", verbose=False)
    assert corpus.meta["vocab_fingerprint"] == sha256_of_symbols(corpus.vocab.idx2sym)
    vocab_json = corpus.cache_path / "vocab.json"
    stored = json.loads(vocab_json.read_text())
    stored["idx2sym"] = swap_two(stored["idx2sym"])    # the same size: only the ids of two words change
    vocab_json.write_text(json.dumps(stored))
    capsys.readouterr()
    again = data_utils.get_lm_corpus(data, "custom", cache_dir=tmp_path / "cache", verbose=False)
    assert again.vocab.idx2sym == corpus.vocab.idx2sym                    # rebuilt: the ids read right again
    assert capsys.readouterr().err.startswith(f"warning: dataset cache {corpus.cache_path} is damaged (")


def test_a_checkpoint_whose_vocabulary_was_swapped_is_refused(tmp_path, demo_corpus):
    import torch
    data = copy_corpus(demo_corpus, tmp_path / "data")
    work = tmp_path / "work"
    result = cli_runner.train(tiny_args(data, work, max_step=10), tmp_path)
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(work / "checkpoint_last.pt", weights_only=False)
    assert ckpt["vocab_fingerprint"] == sha256_of_symbols(ckpt["vocab"]["idx2sym"])
    ckpt["vocab"]["idx2sym"] = swap_two(ckpt["vocab"]["idx2sym"])
    altered = tmp_path / "altered.pt"
    torch.save(ckpt, altered)
    expected = f"checkpoint {altered}: the vocabulary is not the one it was written with (fingerprint "

    scored = cli_runner.evaluate(["--model", altered, "--data", data, "--dataset", "custom", "--split", "test",
                                  "--work_dir", tmp_path / "eval"], tmp_path)
    assert_one_line_error(scored, expected, "the file was altered; use another checkpoint")
    resumed = cli_runner.train(tiny_args(data, tmp_path / "resumed", max_step=20, restart=altered), tmp_path)
    assert_one_line_error(resumed, expected, "the file was altered; resume from another checkpoint")


def test_eval_with_a_manual_config_smaller_than_the_corpus_vocabulary(tmp_path, demo_corpus):
    # a model without a vocabulary scores the corpus with the corpus's: ids past n_token were an IndexError
    import json
    config = {"n_token": 10, "n_layer": 2, "n_head": 2, "d_model": 32, "d_head": 16, "d_inner": 64,
              "dropout": 0.0, "dropatt": 0.0, "tgt_len": 8, "mem_len": 8, "ext_len": 0}
    data = copy_corpus(demo_corpus, tmp_path / "data")
    result = cli_runner.evaluate(["--manual_config", json.dumps(config), "--data", data, "--dataset", "custom",
                                  "--split", "test", "--tgt_len", "8", "--mem_len", "8", "--work_dir",
                                  tmp_path / "eval"], tmp_path)
    assert_one_line_error(result, "the model predicts 10 tokens (n_token), but the custom vocabulary of "
                                  f"{data} has ", "; set n_token to ")


def test_the_cache_build_lock_does_not_follow_a_link(tmp_path):
    """The dataset cache's build lock, like every file the project writes, refuses a symbolic link planted in
    its place (its target, here a file of the user's, is left as it was)."""
    import data_utils
    from utils.io.errors import UserError
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    root = tmp_path / "cache"
    root.mkdir()
    (root / ".somekey.lock").symlink_to(target)
    with pytest.raises(UserError, match="is a symbolic link"):
        with data_utils._build_lock(root, "somekey", verbose=False):
            pass
    assert target.read_text() == "keep me"
