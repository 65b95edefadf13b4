"""--reset_mems_at_doc (utils/model/documents.py): a token attends only to its own article.

Checked against independent truth: each article of a multi-article stream scores, token by token, what the
same article scores alone from an empty memory (float64, relative positions); changing the other articles
changes nothing of an article (every attention type); a stream without end-of-document symbols is scored
bit for bit as without the flag; a stopped and resumed train.py run equals the uninterrupted one; the forward
compiles without graph breaks."""
import shutil

import pytest
import torch

import cli_runner
from model_testlib import tiny_model
from numerics import assert_rounding_close, moved_beyond_rounding

EOD = 3
N_TOKEN = 40
# article lengths (the last token of each is EOD) per batch column: boundaries fall anywhere in the segments
LENGTHS = [[3, 7, 2, 5, 6, 4, 7, 3, 5], [7, 7, 1, 6, 2, 5, 4, 6, 2], [2, 2, 5, 3, 7, 6, 6, 4, 9]]


def article_stream(length, seed=0, lengths=LENGTHS):
    """[length, bsz] ids: each column its articles (random ids other than EOD, then EOD), cut at `length`."""
    g = torch.Generator().manual_seed(seed)
    columns = []
    for lens in lengths:
        ids = []
        for n in lens:
            ids += torch.randint(EOD + 1, N_TOKEN, (n - 1,), generator=g).tolist() + [EOD]
        assert len(ids) >= length
        columns.append(ids[:length])
    return torch.tensor(columns).t().contiguous()


def run_stream(model, stream, tgt_len, ext_len=0, target=True):
    """Segment by segment as data_utils.LMOrderedIterator cuts it (the first without its extended context),
    carrying the memory: NLL [len - 1, bsz] (or, target=False, the hidden states of the scored positions)."""
    model.reset_length(tgt_len, ext_len, model.mem_len)
    mems, out = None, []
    with torch.no_grad():
        for i in range(0, stream.size(0) - 1, tgt_len):
            tgt = stream[i + 1:i + 1 + tgt_len]
            data = stream[max(0, i - ext_len):i + tgt.size(0)]
            if target:
                nll, mems = model(data, tgt, mems)
            else:
                nll, mems = model(data, None, mems)
                nll = nll[nll.size(0) - tgt.size(0):]
            out.append(nll)
    return torch.cat(out), mems


def alone(model, stream):
    """The truth: every article of every column run on its own, in one segment, from an empty memory; the NLL
    of each of its tokens' next token (an article's EOD predicts the next article's first token)."""
    length, bsz = stream.shape
    out = torch.full((length - 1, bsz), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        for c in range(bsz):
            col, start = stream[:, c], 0
            for end in range(length - 1):
                if col[end] == EOD or end == length - 2:
                    nll, _ = model(col[start:end + 1, None], col[start + 1:end + 2, None], None)
                    out[start:end + 1, c] = nll[:, 0]
                    start = end + 1
    assert not out.isnan().any()
    return out


@pytest.mark.usefixtures("attn_impl")  # math and sdpa
@pytest.mark.parametrize("attn_type, same_length, ext_len", [(0, False, 0), (0, True, 2), (1, False, 2),
                                                            (1, True, 0)])
def test_each_article_scores_what_it_scores_alone(attn_type, same_length, ext_len):
    """Articles of at most mem_len + 1 tokens: in both runs every token sees all earlier tokens of its
    article, and with relative positions nothing else may differ. Without the flag the stream differs."""
    model = tiny_model(attn_type, mem_len=8, tgt_len=4, ext_len=ext_len, same_length=same_length)
    stream = article_stream(37)
    truth = alone(model, stream)
    plain, _ = run_stream(model, stream, 4, ext_len)
    assert moved_beyond_rounding(plain, truth)            # the memory does carry articles over without the flag
    model.set_reset_mems_at_doc(EOD)
    nll, mems = run_stream(model, stream, 4, ext_len)
    assert_rounding_close(nll, truth, "stream with --reset_mems_at_doc vs each article alone")
    assert mems.size(0) == model.n_layer + 1               # the open-article flags travel as the memory's last row


@pytest.mark.usefixtures("attn_impl")  # math and sdpa
@pytest.mark.parametrize("attn_type", [0, 1, 2, 3])
def test_other_articles_do_not_reach_an_article(attn_type):
    """Every column's tokens before its fourth article replaced by others (the EODs kept): the hidden states
    from that article on do not move with the flag (they do without it). Types 2 and 3 too, whose window
    positions make an article in the stream differ from the article alone."""
    model = tiny_model(attn_type, mem_len=8, tgt_len=4)
    stream = article_stream(37)
    other = stream.clone()
    starts = []
    for c, lens in enumerate(LENGTHS):
        start = sum(lens[:3])
        starts.append(start)
        before = other[:start, c]
        other[:start, c] = torch.where(before == EOD, before, EOD + 1 + (before - EOD) % (N_TOKEN - EOD - 1))
    assert not torch.equal(other, stream)
    for flag in (None, EOD):
        model.set_reset_mems_at_doc(flag)
        hidden, _ = run_stream(model, stream, 4, target=False)
        hidden_other, _ = run_stream(model, other, 4, target=False)
        moved = any(moved_beyond_rounding(hidden_other[s:, c], hidden[s:, c]) for c, s in enumerate(starts))
        assert moved == (flag is None), f"flag {flag}"
        if flag is not None:
            for c, s in enumerate(starts):
                assert_rounding_close(hidden_other[s:, c], hidden[s:, c], f"column {c} from position {s}")


@pytest.mark.usefixtures("attn_impl")  # math and sdpa
@pytest.mark.parametrize("attn_type", [0, 2])
def test_without_an_end_of_document_the_flag_changes_nothing(attn_type):
    """No EOD in the stream: training-mode loss, gradients and memory bit for bit those of a run without the
    flag (same dropout masks); the flag row says every memory position is the open article's."""
    results = []
    for flag in (None, EOD):
        model = tiny_model(attn_type, mem_len=5, tgt_len=4, dropout=0.2, dropatt=0.1).train()
        model.set_reset_mems_at_doc(flag)
        data = torch.randint(EOD + 1, N_TOKEN, (13, 3), generator=torch.Generator().manual_seed(2))
        torch.manual_seed(7)
        mems, losses = None, []
        for i in range(0, 12, 4):
            nll, mems = model(data[i:i + 4], data[i + 1:i + 5], mems)
            losses.append(nll)
        loss = torch.cat(losses).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((torch.cat(losses), grads, mems))
    (nll_a, grads_a, mems_a), (nll_b, grads_b, mems_b) = results
    assert torch.equal(nll_a, nll_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert torch.equal(mems_b[:-1], mems_a) and torch.equal(mems_b[-1], torch.ones_like(mems_b[-1]))


def test_a_memory_without_flags_counts_as_the_open_article():
    """A memory from a run without the flag (no flag row) is seen whole, as the flag row of ones would be;
    a memory with the row is read by a run without the flag as plain memory."""
    model = tiny_model(0, mem_len=5, tgt_len=4)
    data = article_stream(13)
    with torch.no_grad():
        _, plain_mems = model(data[:4], data[1:5], None)
        model.set_reset_mems_at_doc(EOD)
        ones = torch.cat([plain_mems, torch.ones_like(plain_mems[:1])])
        a, mems_a = model(data[4:8], data[5:9], plain_mems)
        b, mems_b = model(data[4:8], data[5:9], ones)
        model.set_reset_mems_at_doc(None)
        c, mems_c = model(data[4:8], data[5:9], ones)
        d, mems_d = model(data[4:8], data[5:9], plain_mems)
    assert torch.equal(a, b) and torch.equal(mems_a, mems_b)
    assert torch.equal(c, d) and torch.equal(mems_c, mems_d)


def test_an_end_of_document_id_outside_the_vocabulary_is_refused():
    from utils.io.errors import UserError
    with pytest.raises(UserError, match="outside the vocabulary"):
        tiny_model(0).set_reset_mems_at_doc(N_TOKEN)


@pytest.mark.parametrize("attn_type", [0, 3])
def test_the_training_forward_with_the_flag_has_no_graph_break(attn_type):
    model = tiny_model(attn_type, mem_len=4, tgt_len=4, dtype=torch.float32, dropout=0.1).train()
    model.set_reset_mems_at_doc(EOD)

    def loss_of(data, target, mems):
        loss, new_mems = model(data, target, mems)
        return loss.float().mean(), new_mems
    torch._dynamo.reset()
    mems = torch.cat([torch.zeros(2, 4, 3, 16), torch.ones(1, 4, 3, 16)])
    explained = torch._dynamo.explain(loss_of)(article_stream(4), article_stream(5)[1:], mems)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1



@pytest.mark.slow
def test_flex_attention_under_compile_hides_other_articles_as_the_matmuls_do():
    """attn_impl flex reads the document numbers in its score function (forward only: PyTorch has no CPU
    backward for FlexAttention); the segment holds ends of articles, so the flag changes the result."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler on PATH: torch.compile's CPU backend (inductor) cannot build kernels")
    model = tiny_model(0, n_layer=1, d_model=32, d_head=16, dtype=torch.float32, tgt_len=6, mem_len=4,
                       clamp_len=3, same_length=True)                # the CPU kernel needs d_head >= 16
    data = article_stream(13)
    with torch.no_grad():
        plain, _ = model(data[6:12], data[7:13], model(data[:6], data[1:7], None)[1])
        model.set_reset_mems_at_doc(EOD)
        _, mems = model(data[:6], data[1:7], None)
        expected, expected_mems = model(data[6:12], data[7:13], mems)
        model.set_attn_impl("flex")
        nll, new_mems = torch.compile(model, dynamic=False)(data[6:12], data[7:13], mems)
    assert (plain - expected).abs().max().item() > 1e-2
    assert (nll - expected).abs().max().item() < 1e-4
    assert torch.equal(new_mems, expected_mems)


# ---- train.py / eval.py ----------------------------------------------------------------------------------

def test_train_with_the_flag_resumes_exactly_and_eval_scores_with_it(tmp_path):
    """On a prepared corpus (articles of 10-100 tokens, 8-token segments, 16 columns in 2 batch chunks): 12
    steps in one go == 6, stop, --restart, 6 more, bit for bit; the checkpoint's memory carries the flag row,
    with ended articles in it; eval.py scores the valid split with the flag."""
    from test_prepare_corpus import write_jsonl, zipf_articles
    from test_train_resume import assert_same_training
    from utils.data.prepare import Options, prepare_corpus

    src = write_jsonl(tmp_path / "c.jsonl", zipf_articles(n_docs=120, vocab=400, seed=2))
    data = tmp_path / "prepared"
    prepare_corpus([src], data, Options(max_vocab_size=300, valid_docs=10, test_docs=10, shard_tokens=500), workers=1)
    whole, split = cli_runner.train_whole_and_resumed(
        data, tmp_path, 12, dataset="prepared", reset_mems_at_doc=True, batch_chunk=2, max_step_scheduler=12,
        log_interval=1, eval_interval=6, no_test=True)
    assert_same_training(whole, split, range(1, 13))
    ckpt = torch.load(whole / "checkpoint_last.pt", weights_only=True)
    chunk_memory = ckpt["memory"][0]
    assert len(chunk_memory) == 2
    for mems in chunk_memory:
        assert mems.shape == (3, 8, 8, 32)                  # n_layer + 1 rows, mem_len, columns per chunk, d_model
        flags = mems[2]
        assert set(flags.unique().tolist()) == {0.0, 1.0}   # some positions of ended articles, some of open ones
    scored = cli_runner.evaluate(["--model", whole / "checkpoint_last.pt", "--data", data, "--dataset",
                                  "prepared", "--split", "valid", "--tgt_len", 8, "--mem_len", 8, "--batch_size", 4,
                                  "--reset_mems_at_doc", "--work_dir", tmp_path / "eval"], tmp_path, name="eval")
    assert scored.returncode == 0, scored.stderr
    valid_line = [line for line in scored.lines if line.startswith("| valid") and " loss " in line]
    assert len(valid_line) == 1
    # from the checkpoint alone: the flag is taken from the training configuration, same score; switched off
    # on the command line, the memory of ended articles is seen again and the score moves
    same = ["--model", whole / "checkpoint_last.pt", "--data", data, "--split", "valid", "--tgt_len", 8,
            "--mem_len", 8, "--batch_size", 4]
    taken = cli_runner.evaluate(same + ["--work_dir", tmp_path / "eval2"], tmp_path, name="eval2")
    assert taken.returncode == 0, taken.stderr
    assert any("--reset_mems_at_doc on" in line for line in taken.lines), taken.lines
    assert [line for line in taken.lines if line.startswith("| valid") and " loss " in line] == valid_line
    off = cli_runner.evaluate(same + ["--no_reset_mems_at_doc", "--work_dir", tmp_path / "eval3"], tmp_path,
                              name="eval3")
    assert off.returncode == 0, off.stderr
    off_line = [line for line in off.lines if line.startswith("| valid") and " loss " in line]
    assert len(off_line) == 1 and off_line != valid_line


def test_a_corpus_without_end_of_document_symbols_is_refused_in_one_line(demo_corpus, tmp_path):
    result = cli_runner.train(cli_runner.tiny_args(demo_corpus, tmp_path / "work", reset_mems_at_doc=True),
                              tmp_path, name="refused")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--reset_mems_at_doc" in result.stderr, result.stderr
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_two_ranks_with_the_flag_train_like_one_process(tmp_path):
    """DDP over 2 gloo ranks, each with its own columns and their memory flags: the per-step losses and the
    final weights of one process with the same global batch (no dropout)."""
    import dist_testlib
    from test_prepare_corpus import write_jsonl, zipf_articles
    from utils.data.prepare import Options, prepare_corpus

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    src = write_jsonl(tmp_path / "c.jsonl", zipf_articles(n_docs=200, vocab=400, seed=3))
    data = tmp_path / "prepared"
    prepare_corpus([src], data, Options(max_vocab_size=300, valid_docs=10, test_docs=10), workers=1)
    flags = ["--dataset", "prepared", "--reset_mems_at_doc", "--max_step", "8", "--no_test"]
    one = dist_testlib.python_train(data, tmp_path / "one", *flags)
    assert one.returncode == 0, one.stderr[-3000:]
    two = dist_testlib.torchrun(2, data, tmp_path / "two", *flags, "--multi_gpu", "ddp")
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    ours, theirs = dist_testlib.step_losses(tmp_path / "two"), dist_testlib.step_losses(tmp_path / "one")
    assert sorted(ours) == sorted(theirs) == list(range(1, 9))
    assert max(abs(ours[s] - theirs[s]) for s in ours) <= 1e-5
    ckpt = dist_testlib.last_checkpoint(tmp_path / "two")
    assert [m[0].size(0) for m in ckpt["memory"]] == [3, 3]       # each rank's memory carries its flag row
    diff = dist_testlib.max_weight_difference(ckpt["model_state"],
                                              dist_testlib.last_checkpoint(tmp_path / "one")["model_state"])
    assert diff <= 1e-5
