#!/usr/bin/env python3
"""Time the float32 output layer of the step-time configuration of issue 18 on the CPU, forward and backward:
the tied adaptive softmax over WikiText-103's 267,735 ids with the base cutoffs (20k, 40k, 200k), d_model 256,
one batch of 8 x 64 targets drawn from WikiText-103's rank-frequency curve. Variants, alternated in one process:

    oneDNN   the matmuls through oneDNN (utils/model/linear_nll.py: onednn_applies), what runs where it is built
    sgemm    the same loss with the BLAS's sgemm (MKL on x86), what ran before

    python scripts/benchmark_output_layer.py [--rounds 8] [--tokens 512]

A round runs every variant once, in turn, so slow and quiet periods of a shared machine hit them alike. Printed:
median and min ms per forward + backward, the targets per cluster, and each variant's largest difference from
a float64 run of the same loss (NLL and every gradient, relative to the gradient's largest entry).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from utils.data.token_frequencies import rank_probabilities  # noqa: E402
from utils.model import linear_nll  # noqa: E402
from utils.model.adaptive_nll import shared_table_adaptive_nll  # noqa: E402
from utils.runtime.cpu_allocator import tune_cpu_allocator  # noqa: E402

N_TOKEN, D_MODEL, CUTOFFS = 267735, 256, [20000, 40000, 200000]


def loss_and_grads(params, hidden, target):
    """(nll sum, [grads of table, bias, cluster weight, cluster bias, hidden]) of one forward + backward."""
    for p in (*params, hidden):
        p.grad = None
    table, bias, extra_w, extra_b = params
    nll = shared_table_adaptive_nll(hidden, target, table, bias, extra_w, extra_b, [None] * 4, CUTOFFS, None)
    nll.sum().backward()
    return nll.detach(), [p.grad for p in (*params, hidden)]


def with_onednn(enabled: bool):
    def run(params, hidden, target):
        saved = linear_nll._ONEDNN
        linear_nll._ONEDNN = enabled and linear_nll._probe_onednn()
        try:
            return loss_and_grads(params, hidden, target)
        finally:
            linear_nll._ONEDNN = saved
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="rounds of both variants, alternated (default: 8)")
    parser.add_argument("--tokens", type=int, default=512,
                        help="targets per step, batch x tgt_len (default: 512)")
    args = parser.parse_args()
    tune_cpu_allocator()                         # as the trainer does: freed buffers reused, not page-faulted again
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(N_TOKEN, D_MODEL, generator=gen) * 0.02, torch.randn(N_TOKEN, generator=gen) * 0.01,
              torch.randn(len(CUTOFFS), D_MODEL, generator=gen) * 0.02, torch.zeros(len(CUTOFFS))]
    params = [p.requires_grad_() for p in params]
    hidden = torch.randn(args.tokens, D_MODEL, generator=gen).requires_grad_()
    probabilities = torch.from_numpy(rank_probabilities(N_TOKEN))
    target = torch.multinomial(probabilities, args.tokens, replacement=True, generator=gen)
    counts = torch.bucketize(target, torch.tensor(CUTOFFS), right=True).bincount(minlength=len(CUTOFFS) + 1)
    if not linear_nll._probe_onednn():
        print("oneDNN's linear is not available in this build: only the sgemm path runs here")
    variants = {"oneDNN": with_onednn(True), "sgemm": with_onednn(False)}
    times = {name: [] for name in variants}
    for step in variants.values():               # warm-up: first-touch of buffers, oneDNN's kernel generation
        step(params, hidden, target)
    for _ in range(args.rounds):
        for name, step in variants.items():
            start = time.perf_counter()
            step(params, hidden, target)
            times[name].append(time.perf_counter() - start)
    print(f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}, {args.rounds} rounds; "
          f"targets per cluster (head, tails): {counts.tolist()}")
    for name, ts in times.items():
        print(f"  {name}: median {1000 * statistics.median(ts):.1f} ms | min {1000 * min(ts):.1f} ms "
              "per forward + backward")
    params64 = [p.detach().double().requires_grad_() for p in params]
    nll64, grads64 = loss_and_grads(params64, hidden.detach().double().requires_grad_(), target)
    for name, step in variants.items():
        nll, grads = step(params, hidden, target)
        worst_nll = ((nll.double() - nll64).abs() / nll64.abs()).max().item()
        worst_grad = max(((g.double() - g64).abs().max() / g64.abs().max()).item() for g, g64 in zip(grads, grads64))
        print(f"  {name} against float64: NLL {worst_nll:.1e} relative, gradients {worst_grad:.1e} "
              "(of each gradient's largest entry)")


if __name__ == "__main__":
    main()
