"""Generation: the sampler loop (prompt in segments, then one token per step carrying the memory) against a
full recomputation without memory; sampling filters against loops; text in and out; generate.py."""
import math

import pytest
import torch

from inference.generation import filter_logits, generate
from inference.text import TextCodec, detokenize_words
from inference_testlib import run_cli, write_checkpoint, write_corpus
from inference_testlib import one_thread  # noqa: F401  (autouse: one thread per test module)
from model_testlib import tiny_model, tokens
from utils.io.errors import UserError
from utils.data.vocabulary import BPEVocab, Vocab

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning")

MEM, SEG, PROMPT, N_TOKENS, N_SAMPLES = 5, 4, 11, 10, 2


def recorded_generation(model, prompt, **kwargs):
    """Run generate() on `model`, recording the input shape and memory length of every forward step."""
    calls = []
    step_fn = model.next_token_logprobs

    def spy(data, mems):
        calls.append((tuple(data.shape), 0 if mems is None else mems.size(1)))
        return step_fn(data, mems)

    model.next_token_logprobs = spy
    try:
        steps = list(generate(model, prompt.tolist(), N_TOKENS, N_SAMPLES, mem_len=MEM, segment_len=SEG,
                              generator=torch.Generator().manual_seed(5), **kwargs))
    finally:
        del model.next_token_logprobs
    return steps, calls


def recomputed_logprob(model, context: torch.Tensor, token: int, same_length: bool) -> float:
    """log p(token | context) from one forward pass over `context` without memory (the NLL path)."""
    model.same_length = same_length
    model.reset_length(context.numel(), 0, MEM)
    target = torch.cat([context[1:], torch.tensor([token])])
    nll, _ = model(context.unsqueeze(1), target.unsqueeze(1), None)
    return -nll[-1, 0].item()


# (attn_type, n_layer, same_length). Types 0 and 1 see relative distances, so with same_length one pass over
# the whole text, each token seeing itself and the MEM before it in every layer, is exactly what the memory
# computes, however many layers. Type 2 adds positions counted from the end of the window, so only a
# one-layer model (whose memory is the position-free word embedding) has a window-free equivalent: one pass
# over the tokens the last fed token saw.
CASES = [(0, 3, True), (0, 1, False), (2, 1, True), (2, 1, False)]


@pytest.mark.parametrize("attn_type,n_layer,same_length", CASES)
def test_incremental_generation_equals_full_recomputation(attn_type, n_layer, same_length):
    model = tiny_model(attn_type, n_layer=n_layer, tgt_len=8, mem_len=3, clamp_len=3, same_length=same_length)
    prompt = tokens(PROMPT, 1, 40, seed=7)[:, 0]
    steps, calls = recorded_generation(model, prompt, temperature=1.5)

    # the prompt in segments of SEG, then exactly one new token per forward step, memory bounded by MEM
    n_segments = math.ceil(PROMPT / SEG)
    assert [shape for shape, _ in calls[:n_segments]] == [(SEG, 1)] * (n_segments - 1) + [(PROMPT % SEG or SEG, 1)]
    assert [shape for shape, _ in calls[n_segments:]] == [(1, N_SAMPLES)] * (N_TOKENS - 1)
    assert [m for _, m in calls] == [min(MEM, SEG * i) for i in range(n_segments)] + [MEM] * (N_TOKENS - 1)
    assert (model.tgt_len, model.mem_len, model.same_length) == (8, 3, same_length)   # restored

    generated = torch.stack([s.tokens for s in steps], dim=1)                # [N_SAMPLES, N_TOKENS]
    assert not torch.equal(generated[0], generated[1])
    last_segment_start = (PROMPT - 1) // SEG * SEG
    for sample in range(N_SAMPLES):
        text = torch.cat([prompt, generated[sample]])
        for j, step in enumerate(steps):
            t = PROMPT + j - 1                                                # position of the last token fed
            if n_layer > 1:
                first = 0                                                     # the whole text, banded
            elif j == 0 and not same_length:
                first = max(0, last_segment_start - MEM)                      # memory before the last segment
            else:
                first = max(0, t - MEM)
            expected = recomputed_logprob(model, text[first:t + 1], int(text[t + 1]), same_length or n_layer > 1)
            assert abs(step.logprobs[sample].item() - expected) <= 1e-9, (sample, j)


def test_generation_from_a_torchscript_model_equals_eager():
    model = tiny_model(0, n_layer=2, tgt_len=4, mem_len=MEM, clamp_len=3, same_length=True)
    prompt = tokens(PROMPT, 1, 40, seed=7)[:, 0]
    eager, _ = recorded_generation(model, prompt)
    scripted = list(generate(torch.jit.script(model), prompt.tolist(), N_TOKENS, N_SAMPLES, mem_len=MEM,
                             segment_len=SEG, generator=torch.Generator().manual_seed(5)))
    for a, b in zip(eager, scripted):
        assert torch.equal(a.tokens, b.tokens) and torch.allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-12)


def naive_filter(logprobs: list, temperature: float, top_k: int, top_p: float) -> list:
    """The kept tokens' probabilities after the filters, with plain Python loops (0 for dropped tokens)."""
    scaled = [lp / temperature for lp in logprobs]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = order[:top_k] if top_k > 0 else order
    total = sum(math.exp(scaled[i]) for i in kept)
    if top_p < 1:
        nucleus, mass = [], 0.0
        for i in kept:
            if mass >= top_p:
                break
            nucleus.append(i)
            mass += math.exp(scaled[i]) / total
        kept = nucleus
    norm = sum(math.exp(scaled[i]) for i in kept)
    return [math.exp(scaled[i]) / norm if i in kept else 0.0 for i in range(len(scaled))]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6),
                                                     (0.9, 8, 0.8), (1.0, 3, 0.01), (2.0, 50, 0.95)])
def test_sampling_filters_keep_what_the_definition_keeps(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(3, 20, generator=g, dtype=torch.float64) * 2, dim=-1)
    probs = torch.softmax(filter_logits(logprobs, temperature, top_k, top_p), dim=-1)
    for row in range(3):
        expected = naive_filter(logprobs[row].tolist(), temperature, top_k, top_p)
        assert torch.allclose(probs[row], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_temperature_zero_is_greedy_and_seeds_reproduce():
    model = tiny_model(0, n_layer=2, mem_len=MEM)
    prompt = tokens(PROMPT, 1, 40, seed=7)[:, 0].tolist()

    def run(seed, **kw):
        return [s.tokens.tolist() for s in generate(model, prompt, 12, 3, generator=torch.Generator().manual_seed(seed), **kw)]

    greedy = run(0, temperature=0)
    assert all(len(set(step)) == 1 for step in greedy) and run(1, temperature=0) == greedy
    assert run(1) == run(1) and run(1) != run(2)


# ---- text ---------------------------------------------------------------------------------------------
def word_vocab(symbols, lower_case=False):
    vocab = Vocab(special=["<eos>"], lower_case=lower_case)
    vocab._set_symbols(["<eos>", "<unk>"] + symbols)
    return vocab


def test_wikitext_conventions_are_undone():
    tokens_ = ("The 19 @,@ 000 @-@ strong army , led by Smith 's son , won in 1 @.@ 5 hours ( roughly ) ; "
               "it did n't stop : \" we <unk> ! \"").split()
    assert detokenize_words(tokens_) == ("The 19,000-strong army, led by Smith's son, won in 1.5 hours (roughly); "
                                         "it didn't stop: \"we <unk>!\"")


def test_word_prompts_are_encoded_like_eval_manual_and_decoded_back():
    from data_utils import tokenize_raw

    vocab = word_vocab("the army of 19 @,@ 000 men , well @-@ known . it won".split())
    codec = TextCodec(vocab, "wt103")
    ids, unknown = codec.encode_prompt("The army of 19,000 men, well-known.\nIt won")
    eos = vocab.sym2idx["<eos>"]
    line1 = vocab.encode(tokenize_raw("The army of 19,000 men, well-known."))
    assert ids == [eos] + line1 + [eos] + vocab.encode(tokenize_raw("It won"))
    assert unknown == ["The", "It"]
    assert codec.decode(ids[1:] + [vocab.sym2idx["won"], eos]) == "<unk> army of 19,000 men, well-known.\n<unk> won won\n"


def test_character_vocabularies_round_trip():
    text8 = Vocab(special=[], lower_case=True)
    text8._set_symbols(list("_abcdefghijklmnopqrstuvwxyz"))
    codec = TextCodec(text8, "text8")
    ids, _ = codec.encode_prompt("Anarchism is")
    assert codec.kind == "text8" and codec.decode(ids) == "anarchism is"
    with pytest.raises(UserError, match="a-z and the space"):
        codec.encode_prompt("no digits 1")

    text = "Grüße,\n€5"
    data = text.encode("utf-8")
    enwik8 = Vocab(special=[], lower_case=False)
    enwik8._set_symbols(sorted({str(b) for b in data}, key=lambda s: -data.count(int(s))))
    codec = TextCodec(enwik8, "enwik8")
    ids, _ = codec.encode_prompt(text)
    assert codec.kind == "bytes" and len(ids) == len(data) and codec.decode(ids) == text
    enwik8._set_symbols([s for s in enwik8.idx2sym if s != "10"])          # our enwik8 drops line breaks
    assert TextCodec(enwik8, "enwik8").decode(TextCodec(enwik8, "enwik8").encode_prompt(text)[0]) == "Grüße,€5"

    chars = Vocab(special=["<eos>"], lower_case=False, delimiter="")
    chars._set_symbols(["<eos>"] + list("ab c"))
    codec = TextCodec(chars, "custom")
    ids, _ = codec.encode_prompt("ab c\nca")
    assert codec.kind == "chars" and ids[0] == 0 and codec.decode(ids[1:]) == "ab c\nca"


def test_bpe_round_trip(tmp_path):
    (tmp_path / "train.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    vocab = BPEVocab.train([tmp_path / "train.txt"], vocab_size=300, min_frequency=1)
    codec = TextCodec(vocab)
    ids, _ = codec.encode_prompt("the lazy fox\njumps")
    assert codec.kind == "bpe" and ids[0] == vocab.eot_idx
    assert codec.decode(ids[1:]) == "the lazy fox\njumps"


# ---- generate.py ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    corpus = write_corpus(folder / "corpus")
    return write_checkpoint(folder / "model.pt", corpus, attn_type=0, tgt_len=8, mem_len=16)


def test_generate_cli_is_reproducible_and_reads_torchscript_files(checkpoint, tmp_path, capsys):
    args = ["--prompt", "= the", "--num_tokens", "30", "--num_samples", "2", "--top_k", "20",
            "--mem_len", "12", "--no_cuda"]
    code, first, err = run_cli("generate", ["--model", checkpoint, "--seed", "3"] + args, capsys)
    assert code == 0 and first.count("=== sample") == 2 and "mem_len 12" in err
    assert run_cli("generate", ["--model", checkpoint, "--seed", "3"] + args, capsys)[1] == first
    assert run_cli("generate", ["--model", checkpoint, "--seed", "4"] + args, capsys)[1] != first
    ts_file = tmp_path / "model.ts"
    run_cli("eval", ["--model", checkpoint, "--manual", "the", "the", "--tgt_len", "8", "--mem_len", "16",
                     "--debug", "--save_torchscript", ts_file], capsys)
    assert run_cli("generate", ["--load_torchscript", ts_file, "--seed", "3"] + args, capsys)[1] == first


def test_generate_cli_rejects_bad_settings(checkpoint, capsys):
    with pytest.raises(UserError, match="either --model"):
        run_cli("generate", ["--prompt", "x"], capsys)
    with pytest.raises(UserError, match="--top_p"):
        run_cli("generate", ["--model", checkpoint, "--top_p", "0"], capsys)


def test_reference_checkpoint_generates_the_same_text_for_the_same_seed(shared_dir, capsys):
    ckpt = shared_dir / "fixtures" / "reference-checkpoint" / "ptb_tiny_attn0.pt"
    args = ["--model", ckpt, "--prompt", "the company said it expects", "--num_tokens", "40", "--seed", "11",
            "--no_cuda"]
    code, first, _ = run_cli("generate", args, capsys)
    assert code == 0 and first.startswith("=== sample 1 ===\nthe company said it expects")
    assert run_cli("generate", args, capsys)[1] == first
