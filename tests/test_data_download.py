"""scripts/getdata.py: offline failure in one line, preparation of each dataset on tiny synthetic archives."""
import io
import os
import subprocess
import sys
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import pytest

from data_utils import get_lm_corpus
from utils.io.errors import UserError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import getdata  # noqa: E402


def test_offline_is_one_line(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "getdata.sh"), "--data", str(tmp_path), "--mirror", "http://127.0.0.1:9", "wt2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: cannot download wikitext-2-v1.zip") and "network" in proc.stderr
    assert not (tmp_path / "wikitext-2").exists() and os.listdir(tmp_path / ".downloads") == []


def test_public_sources_unreachable(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(getdata.urllib.request, "urlopen", no_network)
    with pytest.raises(UserError, match=r"cannot download enwik8\.zip \(http://mattmahoney\.net/dc/enwik8\.zip: Name"):
        getdata.get_dataset("enwik8", tmp_path, mirror=None)


def test_unknown_dataset(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'wt5'"):
        getdata.main(["--data", str(tmp_path), "wt5"])


def test_char_preparations():
    assert getdata.split_last(b"0123456789", 2) == (b"012345", b"67", b"89")
    assert getdata.enwik8_text(b"ab\nc\xff") == "97 98 \n 99 255"
    assert getdata.text8_text(" ab c ") == "a b _ c"


def zip_bytes(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def tgz_bytes(members: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def mirror(tmp_path):
    """A local mirror (file://) with tiny archives laid out like the real ones."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    splits = ("train", "valid", "test")
    (folder / "wikitext-2-v1.zip").write_bytes(
        zip_bytes({f"wikitext-2/wiki.{s}.tokens": f" = {s} = \n a b c \n" for s in splits}))
    ptb = {f"./simple-examples/data/ptb.{s}.txt": f" {s} words here \n".encode() for s in splits}
    ptb.update({f"./simple-examples/data/ptb.char.{s}.txt": b"a b _ c\n" for s in splits})
    (folder / "simple-examples.tgz").write_bytes(tgz_bytes(ptb))
    root = getdata.LM1B_ROOT
    lm1b = {f"{root}/training-monolingual.tokenized.shuffled/news.en-00001-of-00100": b"The cat .\nA dog .\n"}
    lm1b.update({f"{root}/" + getdata.LM1B_HELDOUT[len(root) + 1 :].format(i): f"held {i} .\n".encode() for i in (0, 1)})
    (folder / f"{root}.tar.gz").write_bytes(tgz_bytes(lm1b))
    (folder / "1b_word_vocab.txt").write_text("<S> 0\n</S> 0\n<UNK> 0\nThe 3\n. 2\n")
    return folder


def test_datasets_from_a_mirror(tmp_path, mirror, capsys):
    data = tmp_path / "data"
    getdata.main(["--data", str(data), "--mirror", mirror.as_uri(), "wt2", "ptb", "lm1b"])
    assert (data / "wikitext-2/valid.txt").read_text() == " = valid = \n a b c \n"
    assert (data / "ptb/test.txt").read_text() == " test words here \n"
    assert (data / "pennchar/train.txt").read_text() == "a b _ c\n"
    lm1b = data / "one-billion-words"
    assert (lm1b / "valid.txt").read_text() == "held 1 .\n" and (lm1b / "test.txt").read_text() == "held 0 .\n"
    capsys.readouterr()
    getdata.main(["--data", str(data), "--mirror", mirror.as_uri(), "wt2", "lm1b"])
    assert capsys.readouterr().out.count("already has the data, skipping") == 2
    corpus = get_lm_corpus(lm1b, "lm1b", cache_dir=tmp_path / "cache", verbose=False)
    assert corpus.vocab.get_symbols(corpus.train[0]) == ["<S>", "The", "<UNK>", ".", "<S>"]
    assert len(get_lm_corpus(data / "ptb", "ptb", cache_dir=tmp_path / "cache", verbose=False).vocab) == 6  # 5 words, <eos>


def test_enwik8_and_text8_preparation(tmp_path):
    raw = bytes(range(20, 60)) + b"\n" + bytes([200, 201, 10, 65])
    (tmp_path / "enwik8.zip").write_bytes(zip_bytes({"enwik8": raw}))
    getdata.prepare_enwik8(tmp_path / "enwik8.zip", tmp_path / "enwik8", n_test=5)
    out = tmp_path / "enwik8"
    assert (out / "valid.txt").read_text() == "55 56 57 58 59"
    assert (out / "test.txt").read_text() == "\n 200 201 \n 65"
    assert (out / "train.txt.raw").read_bytes() == raw[:-10]
    corpus = get_lm_corpus(out, "enwik8", cache_dir=tmp_path / "c", verbose=False)
    assert corpus.vocab.get_symbols(corpus.test) == ["200", "201", "65"]

    text = "the quick brown fox jumps over the lazy dog"
    (tmp_path / "text8.zip").write_bytes(zip_bytes({"text8": text}))
    getdata.prepare_text8(tmp_path / "text8.zip", tmp_path / "text8", n_test=6)
    assert (tmp_path / "text8/valid.txt").read_text() == "t h e _ l a"
    assert (tmp_path / "text8/test.txt").read_text() == "z y _ d o g"
    assert (tmp_path / "text8/train.txt.raw").read_text() == text[:-12]
