#!/usr/bin/env python3
"""Expected memory per GPU of a preset's training at tensor-parallel sizes 1, 2, 4 and 8 (computed, nothing
is allocated: the model is built on the meta device).

    python scripts/tensor_parallel_memory.py --config_file configs/wt103_xl.yaml [--config default] [--gpus 8]

Per GPU, for each TP size, with the preset's batch per data-parallel rank (--batch_size / (--gpus / the
preset's --tensor_parallel), processed in --batch_chunk chunks):

    weights, gradients, optimizer state   float32, 4 x (2 + optimizer values) bytes per parameter: the split
                                          parameters (utils/distributed/tensor_parallel.py) divided by TP,
                                          the replicated ones (embeddings, softmax, LayerNorms, fc2 biases)
                                          whole; the last column: with FSDP over the --gpus / TP data-parallel
                                          ranks (what --tp uses when there are several), which divides it
    memory (mems)                         (n_layer + 1) x mem_len x local batch x d_model float32, replicated
    activations                           an estimate of what autograd keeps for one chunk without activation
                                          checkpointing, at the activation precision (2 bytes with
                                          --fp16/--bf16): per layer and token, about (5 + klen/tgt_len) x d_model
                                          replicated values, and q, k, v, the attention output, the scores
                                          and probabilities and fc1's two outputs split by TP; plus the float32
                                          logits of the adaptive softmax's head cluster (twice)

It is an estimate (allocator overhead, temporary buffers and communication buffers come on top), meant to
choose the TP size; measure a real run with scripts/benchmark_train.py.
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from mem_transformer import MemTransformerLM  # noqa: E402
from utils.config.cli import parse_args, train_parser  # noqa: E402
from utils.distributed.tensor_parallel import split_parameter_names  # noqa: E402
from utils.io.errors import UserError, run_cli  # noqa: E402
from utils.model.model_config import build_model_config  # noqa: E402
from utils.training.memory import OPTIMIZER_VALUES  # noqa: E402

VOCAB_SIZES = {"wt103": 267735, "wt2": 33278, "ptb": 10000, "lm1b": 793471, "enwik8": 204, "text8": 27}
GIB = 2 ** 30


def parameter_split(model_config: dict) -> tuple[int, int]:
    """(split, replicated) parameter counts of the model under --tensor_parallel."""
    with torch.device("meta"):
        model = MemTransformerLM(**model_config)
    split = set(split_parameter_names(model))
    params = dict(model.named_parameters())
    n_split = sum(p.numel() for n, p in params.items() if n in split)
    return n_split, sum(p.numel() for p in params.values()) - n_split


def memory_per_gpu(args, model_config: dict, tp: int, local_batch: int, dp: int) -> dict:
    """Bytes per GPU at tensor-parallel size `tp` with `local_batch` sequences per data-parallel rank."""
    n_split, n_replicated = parameter_split(model_config)
    optimizer = OPTIMIZER_VALUES.get(args.optim, 2) + (1 if args.optim == "sgd" and args.mom > 0 else 0)
    state = 4 * (2 + optimizer) * (n_split / tp + n_replicated)
    chunk = max(local_batch // args.batch_chunk, 1)
    d, layers, heads = model_config["d_model"], model_config["n_layer"], model_config["n_head"]
    hd, inner = heads * model_config["d_head"], model_config["d_inner"]
    qlen, klen = args.tgt_len, args.tgt_len + args.mem_len
    element = 2 if (args.fp16 or args.bf16) else 4
    per_token = (5 + klen / qlen) * d + (hd * (2 + 2 * klen / qlen) + 2 * heads * klen + 2 * inner) / tp
    activations = layers * per_token * qlen * chunk * element
    cutoffs = model_config["cutoffs"]
    head_size = (cutoffs[0] + len(cutoffs)) if cutoffs else model_config["n_token"]
    activations += 2 * qlen * chunk * head_size * 4
    mems = (layers + 1) * args.mem_len * local_batch * d * 4
    return {"params_per_gpu": n_split / tp + n_replicated, "state": state, "state_fsdp": state / max(dp, 1),
            "mems": mems, "activations": activations, "total": state + mems + activations,
            "total_fsdp": state / max(dp, 1) + mems + activations}


def table(args, model_config: dict, gpus: int) -> str:
    """Memory per GPU at TP 1, 2, 4, 8 for the preset's batch per data-parallel rank (what a GPU's memory
    depends on; the global batch grows with the data-parallel size)."""
    n_split, n_replicated = parameter_split(model_config)
    local_batch = args.batch_size // max(gpus // args.tensor_parallel, 1)
    lines = [f"{(n_split + n_replicated) / 1e9:.2f}B parameters: {n_split / 1e9:.2f}B split by --tensor_parallel, "
             f"{n_replicated / 1e6:.0f}M replicated (embeddings, softmax, LayerNorms); optimizer {args.optim}; "
             f"{local_batch} sequences per data-parallel rank (the preset's at {gpus} GPUs) x tgt_len "
             f"{args.tgt_len} (mem_len {args.mem_len}) in {args.batch_chunk} chunk(s); "
             f"{'16-bit' if args.fp16 or args.bf16 else 'float32'} activations",
             f"{'TP':>3} | {'params/GPU':>10} | {'weights+grads+optim':>19} | {'mems':>8} | {'activations':>11} | "
             f"{'total/GPU':>9} | with FSDP over {gpus} GPUs / TP"]
    for tp in (1, 2, 4, 8):
        if model_config["n_head"] % tp or gpus % tp:
            lines.append(f"{tp:>3} | n_head {model_config['n_head']} or {gpus} GPUs not divisible by {tp}")
            continue
        m = memory_per_gpu(args, model_config, tp, local_batch, gpus // tp)
        lines.append(f"{tp:>3} | {m['params_per_gpu'] / 1e6:>9.0f}M | {m['state'] / GIB:>15.1f} GiB | "
                     f"{m['mems'] / GIB:>4.2f} GiB | {m['activations'] / GIB:>7.1f} GiB | "
                     f"{m['total'] / GIB:>5.1f} GiB | "
                     f"{m['total_fsdp'] / GIB:.1f} GiB (state {m['state_fsdp'] / GIB:.1f} GiB)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--config_file", required=True)
    parser.add_argument("--config", default="default")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the job (data-parallel size = GPUs / TP)")
    ours, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    args = parse_args(train_parser(), ["--config_file", ours.config_file, "--config", ours.config, *extra],
                      section="train")
    if args.dataset not in VOCAB_SIZES:
        raise UserError(f"no vocabulary size known for --dataset {args.dataset}")
    model_config = build_model_config(args, VOCAB_SIZES[args.dataset])
    print(table(args, model_config, ours.gpus))
    return 0


if __name__ == "__main__":
    run_cli(main)
