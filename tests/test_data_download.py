"""scripts/getdata.py: every network failure in one line, preparation of each dataset on tiny synthetic archives.

The network failures are served from 127.0.0.1 by the tests themselves (a port bound but not listening, a
server that resets, closes, answers garbage, stops half-way or never answers), so they do not depend on the
machine's network, on a port being free, or on the proxy settings of whoever runs the tests.
"""
import io
import os
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import urllib.error
import zipfile
from pathlib import Path

import pytest

from data_utils import get_lm_corpus
from utils.io.errors import UserError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import getdata  # noqa: E402

PROXY_VARS = ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 that refuses connections: bound by this test (so nothing else takes it) but not
    listening. (A fixed port such as 9 may be open on some machines: the discard service.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def serve():
    """serve(reply) -> a base URL on 127.0.0.1 whose every connection gets `reply(conn)` (raw bytes)."""
    servers = []

    def start(reply):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(0.2)
        stop = threading.Event()

        def loop():
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except OSError:
                    continue
                with conn:
                    conn.settimeout(5)
                    try:
                        conn.recv(65536)                   # the request
                        reply(conn)
                    except OSError:
                        pass
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        servers.append((server, stop, thread))
        return f"http://127.0.0.1:{server.getsockname()[1]}"
    yield start
    for server, stop, thread in servers:
        stop.set()
        thread.join(5)
        server.close()


def reset(conn):             # RST instead of an orderly close
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def close(conn):             # an orderly close without a reply
    pass


def garbage(conn):
    conn.sendall(b"\x00\xffnot HTTP at all\r\n\r\n")


def truncated(conn):         # promises 1000 bytes, sends 10, closes
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")


def not_found(conn):
    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def silent(conn):            # accepts, never answers (the test lowers the timeout)
    threading.Event().wait(3)


def served_file(conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")


def no_proxy_env(monkeypatch, **proxies):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    for name, value in proxies.items():
        monkeypatch.setenv(name, value)


def assert_one_line_failure(tmp_path, url, *reason_parts):
    with pytest.raises(UserError) as info:
        getdata.download("1b_word_vocab.txt", tmp_path / ".downloads", mirror=url)
    message = str(info.value)
    assert message.startswith(f"cannot download 1b_word_vocab.txt ({url}/1b_word_vocab.txt: "), message
    assert "\n" not in message and "network" in message
    for part in reason_parts:                                          # each a text or a tuple of alternatives
        assert any(alt in message for alt in ((part,) if isinstance(part, str) else part)), message
    assert os.listdir(tmp_path / ".downloads") == []                  # no partial file left


def run_getdata(tmp_path, mirror, **env):
    """getdata.sh as a user runs it, with this interpreter (python3 on PATH may lack the requirements)."""
    child_env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    child_env.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(REPO / "getdata.sh"), "--data", str(tmp_path), "--mirror", mirror, "wt2"],
                          capture_output=True, text=True, timeout=120, env=child_env)


def assert_cli_one_line(proc, tmp_path):
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: cannot download wikitext-2-v1.zip") and "network" in proc.stderr
    assert not (tmp_path / "wikitext-2").exists() and os.listdir(tmp_path / ".downloads") == []


def test_offline_is_one_line(tmp_path, closed_port):
    assert_cli_one_line(run_getdata(tmp_path, f"http://127.0.0.1:{closed_port}"), tmp_path)


def test_garbled_reply_on_the_command_line_is_one_line(tmp_path, serve):
    assert_cli_one_line(run_getdata(tmp_path, serve(garbage)), tmp_path)


def test_a_dead_proxy_in_the_environment_is_one_line(tmp_path, closed_port):
    """A mirror elsewhere goes through the proxy (here a refused one); nothing is looked up on the network."""
    proxy = f"http://127.0.0.1:{closed_port}"
    proc = run_getdata(tmp_path, "http://mirror.invalid/data", http_proxy=proxy, HTTP_PROXY=proxy)
    assert_cli_one_line(proc, tmp_path)
    assert "Connection refused" in proc.stderr or "ConnectionRefusedError" in proc.stderr


@pytest.mark.parametrize("reply, reason", [
    (reset, ("ConnectionResetError", "RemoteDisconnected")),  # the latter when the RST comes after the read
    (close, "RemoteDisconnected"),
    (garbage, "BadStatusLine"),
    (truncated, "IncompleteRead"),
    (not_found, "HTTP 404 Not Found"),
])
def test_each_failure_of_a_server_is_one_line(tmp_path, monkeypatch, serve, reply, reason):
    no_proxy_env(monkeypatch)
    assert_one_line_failure(tmp_path, serve(reply), reason)


def test_a_server_that_never_answers_times_out_in_one_line(tmp_path, monkeypatch, serve):
    no_proxy_env(monkeypatch)
    monkeypatch.setattr(getdata, "TIMEOUT_S", 0.5)
    assert_one_line_failure(tmp_path, serve(silent), "timed out")


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1:notaport", "InvalidURL"),
    ("nosuchscheme://host", "unknown url type"),
])
def test_a_malformed_mirror_is_one_line(tmp_path, monkeypatch, url, reason):
    no_proxy_env(monkeypatch)
    assert_one_line_failure(tmp_path, url, reason)


def test_refused_connection_is_one_line(tmp_path, monkeypatch, closed_port):
    no_proxy_env(monkeypatch)
    assert_one_line_failure(tmp_path, f"http://127.0.0.1:{closed_port}", "Connection refused")


@pytest.mark.parametrize("variable", ["http_proxy", "HTTP_PROXY", "all_proxy"])
def test_a_mirror_on_this_machine_bypasses_any_proxy(tmp_path, monkeypatch, serve, closed_port, variable):
    no_proxy_env(monkeypatch, **{variable: f"http://127.0.0.1:{closed_port}"})
    path = getdata.download("1b_word_vocab.txt", tmp_path / ".downloads", mirror=serve(served_file))
    assert path.read_bytes() == b"hello" and os.listdir(tmp_path / ".downloads") == ["1b_word_vocab.txt"]


def test_public_sources_unreachable(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(getdata, "_open", no_network)
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
