#!/usr/bin/env python
"""Sample text from a Transformer-XL language model, carrying the memory from token to token.

    python generate.py --model LM-TFM/checkpoint_best.pt --prompt "The castle was built in" \\
        --num_tokens 200 --num_samples 3 --temperature 0.8 --top_p 0.9 --seed 1 --mem_len 640

Reads our checkpoints, the reference trainer's, and TorchScript files from eval.py --save_torchscript
(--load_torchscript); the prompt is encoded and the output decoded with the vocabulary stored there. The
prompt is fed in segments of --tgt_len tokens, then each step feeds one new token and the memory of the
last --mem_len tokens, so a step costs the same however long the text has grown. The text (prompt and
continuation, detokenized) goes to stdout, one block per sample; messages go to stderr.
"""
import utils.runtime.openmp_env  # noqa: F401  (first: bounds OpenMP's spin-wait before torch loads it)
import logging
import sys
import time
from pathlib import Path

import torch

from inference.generation import check_sampling, generate
from inference.runtime import current_lengths, length_overrides, load_for_inference, precision_of, prepare_runtime
from inference.text import TextCodec
from utils.config.cli import generate_parser, parse_args
from utils.io.errors import UserError, run_cli
from utils.runtime.cpu_allocator import tune_cpu_allocator
from utils.runtime.device import select_device
from utils.training.progress import progress_bar, show_progress


def read_prompt(args) -> str:
    if args.prompt_file is None:
        return args.prompt
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8").rstrip("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --prompt_file {args.prompt_file}: {exc}") from None


def stderr_logger() -> logging.Logger:
    """Messages go to stderr, so that stdout holds only the generated text."""
    log = logging.getLogger("txl.generate")
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    return log


def main() -> int:
    args = parse_args(generate_parser())
    check_sampling(args.temperature, args.top_k, args.top_p)
    log = stderr_logger()
    device = select_device(args, log)
    if device.type == "cpu":
        tune_cpu_allocator()                  # as train.py and eval.py: freed buffers are reused, not re-zeroed
    prompt = read_prompt(args)

    loaded = load_for_inference(model_path=args.model, torchscript_path=args.load_torchscript,
                                overrides=length_overrides(args), device=device)
    runtime = "torchscript" if args.load_torchscript else "pytorch"
    model = prepare_runtime(loaded.model, runtime, precision_of(args), device)
    codec = TextCodec(loaded.vocab, args.dataset or loaded.dataset)
    prompt_ids, unknown = codec.encode_prompt(prompt)
    if unknown:
        shown = ", ".join(sorted(set(unknown))[:10])
        log.warning(f"{len(unknown)} prompt word(s) are not in the vocabulary and read as <unk>: {shown}")
    lengths = current_lengths(model)
    log.info(f"Generating {args.num_samples} x {args.num_tokens} tokens ({codec.kind} vocabulary of {len(loaded.vocab)}) "
             f"after a prompt of {len(prompt_ids)} tokens fed in segments of {lengths['tgt_len']}: mem_len "
             f"{lengths['mem_len']} clamp_len {lengths['clamp_len']} same_length {lengths['same_length']} "
             f"temperature {args.temperature} top_k {args.top_k} top_p {args.top_p} seed {args.seed} on {device}")

    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    tokens = []
    start = time.perf_counter()
    with progress_bar(args.num_tokens, "generating", show_progress(args), unit="token") as bar:
        for step in generate(model, prompt_ids, args.num_tokens, args.num_samples, args.temperature, args.top_k,
                             args.top_p, generator=generator, device=device, kv_cache=args.kv_cache is not False):
            tokens.append(step.tokens.cpu())
            bar.update()
    elapsed = time.perf_counter() - start
    samples = torch.stack(tokens, dim=1).tolist()                        # [n_samples, n_tokens]

    shown_prompt = prompt_ids[1:] if codec.start_id is not None else prompt_ids
    for n, sample in enumerate(samples):
        print(f"=== sample {n + 1} ===")
        print(codec.decode(shown_prompt + sample))
    sys.stdout.flush()
    log.info(f"{args.num_tokens} tokens x {args.num_samples} samples in {elapsed:.2f}s "
             f"({1000 * elapsed / args.num_tokens:.2f} ms per step, prompt included)")
    return 0


if __name__ == "__main__":
    run_cli(main)
