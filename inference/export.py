"""A model folder other programs can read without this project's checkpoint format (scripts/export.py):

    model.safetensors   the weights only (safetensors: no pickle, no code), the names of model.state_dict()
    config.json         {"model_config": the MemTransformerLM arguments, "dataset", "vocab_type",
                         "evaluation": the lengths training evaluated with, "training_args": the run's flags,
                         "vocab_fingerprint", "format"}
    tokenizer.json      a Hugging Face `tokenizers` file: text -> the model's ids (word or character vocabulary:
                         WordLevel + whitespace or character split, <eos> appended to each line as the corpus
                         does; BPE: the BPE tokenizer itself)
    vocab.json          this project's vocabulary (eval.py and generate.py rebuild the exact one from it)

eval.py --model DIR and generate.py --model DIR load such a folder (`load_export`).
"""
import json
from pathlib import Path

from utils.data.vocabulary import BPEVocab, Vocab, check_fingerprint
from utils.io.atomic import write_bytes_atomic, write_text_atomic
from utils.io.errors import UserError

EXPORT_FORMAT = "txl-export-v1"
FILES = ("model.safetensors", "config.json", "tokenizer.json", "vocab.json")


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def line_ends_of(dataset) -> str:
    """How the corpus marks a line: "eos" (<eos> after it), "double" (lm1b: <S> around it) or "none"."""
    return "double" if dataset == "lm1b" else "none" if dataset in ("enwik8", "text8") else "eos"


def hf_tokenizer(vocab, line_ends: str = "eos"):
    """A `tokenizers.Tokenizer` that encodes a line of text to the ids `vocab` gives it, with the line-end
    marks of the corpus (`line_ends_of`)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    if isinstance(vocab, BPEVocab):
        return Tokenizer.from_str(vocab.tokenizer.to_str())
    unk = next((s for s in ("<unk>", "<UNK>") if s in vocab.sym2idx), "<unk>")
    tokenizer = Tokenizer(models.WordLevel(vocab=dict(vocab.sym2idx), unk_token=unk))
    steps = [normalizers.Strip()] + ([normalizers.Lowercase()] if vocab.lower_case else [])
    tokenizer.normalizer = normalizers.Sequence(steps)
    if vocab.delimiter == "":                        # character level: every character is a token
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("(?s)."), behavior="isolated")
    elif vocab.delimiter is None:
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Split(vocab.delimiter, behavior="removed")
    if line_ends == "eos" and "<eos>" in vocab.sym2idx:
        tokenizer.post_processor = processors.TemplateProcessing(single="$A <eos>",
                                                                 special_tokens=[("<eos>", vocab.sym2idx["<eos>"])])
    elif line_ends == "double" and "<S>" in vocab.sym2idx:
        tokenizer.post_processor = processors.TemplateProcessing(single="<S> $A <S>",
                                                                 special_tokens=[("<S>", vocab.sym2idx["<S>"])])
    return tokenizer


def write_export(loaded, output: str | Path, evaluation: dict, training_args: dict | None) -> Path:
    """Write the folder for `loaded` (inference.runtime.LoadedModel of a checkpoint) into `output`."""
    from safetensors.torch import save

    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; name a folder")
    output.mkdir(parents=True, exist_ok=True)
    # tied weights share storage; safetensors stores each name once, so every tensor gets its own copy
    state = {name: t.detach().to("cpu").clone().contiguous() for name, t in loaded.model.state_dict().items()}
    config = {"format": EXPORT_FORMAT, "architecture": "MemTransformerLM", "model_config": _plain(loaded.model_config),
              "dataset": loaded.dataset, "vocab_type": "bpe" if isinstance(loaded.vocab, BPEVocab) else "word",
              "vocab_size": len(loaded.vocab), "vocab_fingerprint": loaded.vocab.fingerprint(),
              "evaluation": _plain(evaluation), "training_args": _plain(training_args or {})}
    tokenizer = hf_tokenizer(loaded.vocab, line_ends_of(loaded.dataset))
    write_bytes_atomic(output / "model.safetensors", save(state, metadata={"format": "pt"}))
    write_text_atomic(output / "config.json", json.dumps(config, indent=1) + "\n")
    write_text_atomic(output / "tokenizer.json", tokenizer.to_str(pretty=True))
    write_text_atomic(output / "vocab.json", json.dumps(loaded.vocab.to_dict(), ensure_ascii=False))
    return output


def load_export(path: str | Path):
    """(model in eval mode on the CPU, vocab, model_config, dataset, training_args) of an exported folder."""
    from safetensors.torch import load_file

    from inference.runtime import model_from_config

    path = Path(path)
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise UserError(f"{path} is not a folder written by scripts/export.py (missing {', '.join(missing)})")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        vocab = Vocab.from_dict(json.loads((path / "vocab.json").read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: config.json or vocab.json is not readable JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise UserError(f"{path}/config.json is not a {EXPORT_FORMAT} file; export the model with scripts/export.py")
    check_fingerprint(vocab, config.get("vocab_fingerprint"), f"{path}/vocab.json",
                      "the folder was altered; export the model again")
    model = model_from_config(dict(config["model_config"]), f"{path}/config.json")
    try:
        state = load_file(str(path / "model.safetensors"))
        model.load_state_dict(state)
    except Exception as exc:  # safetensors raises its own error types for damaged files
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"{path}/model.safetensors does not fit config.json ({first})") from None
    return model.eval(), vocab, config["model_config"], config.get("dataset"), config.get("training_args") or None
