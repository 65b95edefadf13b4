#!/usr/bin/env python3
"""Time one LAMB step over the parameters of the step-time configuration of issue 18 (the 267,735 x 256
WikiText-103 table plus a 4-layer d_model 256 model's tensors), variants alternated in one process:

    python scripts/benchmark_lamb.py                       # eager CPU update: one stream / two streams
    python scripts/benchmark_lamb.py --compiled            # compiled: multi-tensor / per tensor (what runs)

Each variant owns its parameters, gradients and moments (same random values); a round runs every variant once,
in turn, so slow and quiet periods of a shared machine hit them alike. Printed: median and min ms per step, and
whether the variants' parameters are equal bit for bit (eager) or within float32 rounding (compiled).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from utils.training import lamb  # noqa: E402

SHAPES = [(267735, 256)] + [(768, 256), (256, 256), (1024, 256), (256, 1024)] * 4 + [(256,)] * 25


def tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [torch.randn(s, generator=g) for s in SHAPES]
    return params, grads, [torch.zeros(s) for s in SHAPES], [torch.zeros(s) for s in SHAPES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compiled", action="store_true", help="time the compiled updates instead of the eager ones")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, adam=False)
    clip = torch.tensor(0.5)
    if args.compiled:
        multi = torch.compile(lamb._lamb_multi_tensor, dynamic=False)
        per_tensor = torch.compile(lamb._lamb_compiled_cpu, dynamic=False)
        lr = torch.tensor(kw.pop("lr"))
        # no clip factor here: the multi-tensor update writes the clipped gradient back (clip_grad_norm_'s
        # contract), so repeated steps on the same gradients would drift apart
        variants = {
            "compiled multi-tensor": lambda t: multi(*t, lr=lr, **kw),
            "compiled per tensor (what --compile runs on the CPU)": lambda t: per_tensor(*t, lr=lr, **kw),
        }
    else:
        buffers = {}

        def blocked(streams):
            def run(t):
                with torch.no_grad(), lamb._one_thread() as threads:
                    b = buffers.setdefault(streams, [torch.empty(s) for s in SHAPES])
                    lamb._lamb_blocked(*t, buffers=b, clip_coef=clip, streams=min(streams, threads), **kw)
            return run
        variants = {"eager, one stream": blocked(1), "eager, two streams (what runs with >= 2 threads)": blocked(2)}
    state = {name: tensors() for name in variants}
    times = {name: [] for name in variants}
    for name, step in variants.items():                    # warm-up (compilation, first-touch of buffers)
        step(state[name])
    for _ in range(args.rounds):
        for name, step in variants.items():
            start = time.perf_counter()
            step(state[name])
            times[name].append(time.perf_counter() - start)
    print(f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}, {args.rounds} rounds")
    for name, ts in times.items():
        print(f"  {name}: median {1000 * statistics.median(ts):.1f} ms | min {1000 * min(ts):.1f} ms")
    first, *others = [state[name][0] for name in variants]
    for other in others:
        if args.compiled:
            worst = max((a - b).abs().max().item() for a, b in zip(first, other))
            print(f"  largest parameter difference between the variants: {worst:.2e}")
        else:
            print("  parameters equal bit for bit:", all(torch.equal(a, b) for a, b in zip(first, other)))


if __name__ == "__main__":
    main()
