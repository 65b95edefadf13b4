"""Text in and out of a vocabulary for generation: prompts to ids, generated ids back to readable text.

Kinds of vocabulary (`TextCodec.kind`):
    word   WikiText / PTB / lm1b / custom words. Prompts are tokenized as eval.py --manual does
           (Moses + WikiText's @-@ / @,@ / @.@ splits, then the vocabulary's own lower-casing); output is
           detokenized: `@-@` `@,@` `@.@` joined, no space before punctuation, `do n't` -> `don't`,
           `<eos>` -> a new line, `<unk>` shown as is.
    chars  character-level custom corpora (delimiter ''): one symbol per character.
    text8  text8: characters a-z with `_` standing for the space.
    bytes  enwik8: symbols are the decimal values of the UTF-8 bytes (line breaks are not in the data).
    bpe    byte-level BPE (tokenizers): encode / decode, `<|endoftext|>` -> a new line.
A prompt starts with the vocabulary's line-start symbol (`<eos>`, `<S>` or `<|endoftext|>`) when it has one,
so an empty prompt means "the start of a line" and text after a line break looks like the training data.
"""
import functools
import re
from typing import Iterable, Optional, Sequence

from utils.io.errors import UserError
from utils.data.vocabulary import BPEVocab

KINDS = ("word", "chars", "text8", "bytes", "bpe")
_START_SYMBOLS = ("<eos>", "<S>")


def detect_kind(vocab, dataset: Optional[str] = None) -> str:
    """The kind of a vocabulary, from its type, the dataset it was built for, and its symbols."""
    if isinstance(vocab, BPEVocab):
        return "bpe"
    if vocab.delimiter == "":
        return "chars"
    if dataset in ("enwik8", "text8"):
        return "bytes" if dataset == "enwik8" else "text8"
    plain = [s for s in vocab.idx2sym if s not in vocab.special]
    if plain and all(s.isdigit() and int(s) < 256 for s in plain):
        return "bytes"
    if plain and "_" in plain and all(len(s) == 1 for s in plain):
        return "text8"
    return "word"


@functools.lru_cache(maxsize=1)
def _moses_detokenizer():
    from sacremoses import MosesDetokenizer

    return MosesDetokenizer("en")


def detokenize_words(tokens: Sequence[str]) -> str:
    """WikiText/PTB-style tokens of one line -> readable text."""
    text = " ".join(tokens)
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    text = _moses_detokenizer().detokenize(text.split(), unescape=False)
    return re.sub(r"(\w) (n't)\b", r"\1\2", text, flags=re.IGNORECASE)


class TextCodec:
    def __init__(self, vocab, dataset: Optional[str] = None, kind: Optional[str] = None):
        if vocab is None:
            raise UserError("this model has no vocabulary (built from --manual_config); generate from a checkpoint "
                            "or a TorchScript file written by eval.py --save_torchscript")
        self.vocab = vocab
        self.kind = kind or detect_kind(vocab, dataset)
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "bpe":
            self.start_id: Optional[int] = vocab.eot_idx
        else:
            self.start_id = next((vocab.sym2idx[s] for s in _START_SYMBOLS if s in vocab.sym2idx), None)
        self.line_end_ids = {self.start_id} if self.start_id is not None else set()

    # ---- prompt -> ids ------------------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> tuple[list[int], list[str]]:
        """(ids, unknown words) of a prompt; lines are joined with the line-end symbol where there is one."""
        ids = [] if self.start_id is None else [self.start_id]
        if self.kind == "bpe":
            pieces = [self.vocab.encode(line) for line in text.split("\n")]
            return ids + _join(pieces, self.start_id), []
        lines = text.split("\n")
        if self.kind == "word":
            return self._encode_words(ids, lines)
        if self.kind == "bytes":                           # enwik8 drops line breaks unless byte 10 is a symbol
            lines = [text if "10" in self.vocab.sym2idx else text.replace("\n", "")]
        elif self.start_id is None:
            lines = [" ".join(lines)]                      # no line-end symbol: line breaks become spaces
        pieces, missing = [], []
        for line in lines:
            if self.vocab.lower_case or self.kind == "text8":
                line = line.lower()
            if self.kind == "text8":
                symbols = list(line.replace(" ", "_"))
            elif self.kind == "bytes":
                symbols = [str(b) for b in line.encode("utf-8")]
            else:
                symbols = list(line)
            missing += [s for s in symbols if s not in self.vocab.sym2idx]
            pieces.append([self.vocab.sym2idx[s] for s in symbols if s in self.vocab.sym2idx])
        if missing:
            shown = sorted({chr(int(s)) if self.kind == "bytes" and int(s) < 128 else s for s in missing})
            raise UserError(f"the prompt has characters the vocabulary does not know: {' '.join(map(repr, shown[:10]))}"
                            + ("; text8 knows only a-z and the space" if self.kind == "text8" else ""))
        return ids + _join(pieces, self.start_id), []

    def _encode_words(self, ids: list[int], lines: list[str]) -> tuple[list[int], list[str]]:
        from data_utils import tokenize_raw

        pieces, unknown = [], []
        for line in lines:
            symbols = self.vocab.tokenize(tokenize_raw(line)) if line.strip() else []
            unknown += [s for s in symbols if s not in self.vocab.sym2idx]
            pieces.append(self.vocab.get_indices(symbols))
        return ids + _join(pieces, self.start_id), unknown

    # ---- ids -> text --------------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int]) -> str:
        """Readable text of generated (or prompt) ids; line-end symbols become new lines."""
        lines: list[list[int]] = [[]]
        for i in ids:
            if int(i) in self.line_end_ids:
                lines.append([])
            else:
                lines[-1].append(int(i))
        return "\n".join(self._decode_line(line) for line in lines)

    def _decode_line(self, ids: list[int]) -> str:
        if self.kind == "bpe":
            return self.vocab.decode(ids)
        symbols = self.vocab.get_symbols(ids)
        if self.kind == "word":
            return detokenize_words(symbols)
        if self.kind == "bytes":
            return bytes(int(s) for s in symbols if s.isdigit() and int(s) < 256).decode("utf-8", errors="replace")
        text = "".join(symbols)
        return text.replace("_", " ") if self.kind == "text8" else text


def _join(pieces: list[list[int]], separator: Optional[int]) -> list[int]:
    out: list[int] = []
    for n, piece in enumerate(pieces):
        if n and separator is not None:
            out.append(separator)
        out += piece
    return out
