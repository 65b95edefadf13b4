#!/usr/bin/env python3
"""Export a checkpoint as a portable model folder: weights, configuration and tokenizer for other programs.

    python scripts/export.py --model LM-TFM/checkpoint_best.pt --output exported/wt103-base

writes model.safetensors (weights only), config.json (the model configuration, the dataset, the lengths training
evaluated with), tokenizer.json (a Hugging Face `tokenizers` file: a line of text -> the model's ids, <eos>
included) and vocab.json (this project's vocabulary). eval.py --model DIR and generate.py --model DIR read the
folder; README.md ("Exporting a model") shows how another program loads it. Reads our checkpoints and the
reference's (without running pickled code).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.checkpoint_settings import evaluation_settings  # noqa: E402
from inference.export import write_export  # noqa: E402
from inference.runtime import load_for_inference  # noqa: E402
from utils.io.errors import UserError, run_cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint to export (ours or the reference's)")
    parser.add_argument("--output", required=True, help="folder to write (created; its files are replaced)")
    args = parser.parse_args(argv)
    if not Path(args.model).is_file():
        raise UserError(f"--model {args.model}: no such checkpoint file")
    loaded = load_for_inference(model_path=args.model)
    out = write_export(loaded, args.output, evaluation_settings(loaded.settings), loaded.settings)
    print(f"exported {args.model} to {out}: model.safetensors, config.json, tokenizer.json, vocab.json")
    return 0


if __name__ == "__main__":
    run_cli(main)
