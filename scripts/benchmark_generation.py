#!/usr/bin/env python3
"""Time per generated token from the 10th to the 500th: generation carries the memory, so it stays flat.

    python scripts/benchmark_generation.py --model ../shared/fixtures/reference-checkpoint/ptb_tiny_attn0.pt
    python scripts/benchmark_generation.py --model LM-TFM/checkpoint_best.pt --mem_len 640 --cuda --bf16

Runs inference.generation.generate (the loop generate.py uses) on a fixed random prompt of mem_len tokens
(the memory is full from the first generated token on), --repeat times, timing every step (the forward
pass of the newest token and the sampling of the next). Prints, for tokens 10, 50, 100, ..., 500, the median
step time over the 10 tokens around it (median over the runs), the
ratio last / first and whether it stays within 20%; then, for comparison, what one step would cost if the
whole text were recomputed instead (one forward pass over prompt + 500 tokens without memory).

    python scripts/benchmark_generation.py --compare_cache                 # random 4-layer d_model 256 model
    python scripts/benchmark_generation.py --compare_cache --model LM-TFM/checkpoint_best.pt --mem_lens 160 640

--compare_cache (issue 18): per-token time WITHOUT the memory's key/value cache (every step recomputes the
memory's keys and values) and WITH it (inference/kv_cache.py), at each of --mem_lens, side by side: the two
runs alternate --repeat times on the same prompt (mem_len random tokens, so the memory is full) and seed;
the median step time over tokens 2..--cache_tokens of each run, median over the runs; and whether both drew
the same tokens. Without --model the model is random: --random_config (JSON of MemTransformerLM arguments).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from inference.generation import generate  # noqa: E402
from inference.runtime import (current_lengths, length_overrides, load_for_inference, precision_of,  # noqa: E402
                               prepare_runtime)
from utils.io.atomic import write_text_atomic  # noqa: E402
from utils.io.errors import UserError, run_cli  # noqa: E402

CHECKPOINTS = (10, 50, 100, 200, 300, 400, 500)
WINDOW = 10


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=str, default=None, help="checkpoint (ours or the reference's)")
    parser.add_argument("--load_torchscript", type=str, default=None, help="TorchScript file from eval.py")
    parser.add_argument("--num_tokens", type=int, default=500)
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--prompt_len", type=int, default=None,
                        help="tokens of the random prompt (default: mem_len, so the memory is full from the start)")
    parser.add_argument("--mem_len", type=int, default=None, help="memory length (default: the model's)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cuda", action="store_true", help="run on the GPU")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=str, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--compare_cache", action="store_true", help="with / without the key/value cache")
    parser.add_argument("--mem_lens", type=int, nargs="+", default=[160, 640, 1600])
    parser.add_argument("--cache_tokens", type=int, default=40, help="tokens per run with --compare_cache")
    parser.add_argument("--random_config", type=str, default=json.dumps(RANDOM_CONFIG),
                        help="MemTransformerLM arguments of the random model of --compare_cache without --model")
    return parser.parse_args()


RANDOM_CONFIG = dict(n_token=10000, n_layer=4, n_head=4, d_model=256, d_head=64, d_inner=1024, dropout=0.0,
                     dropatt=0.0, tgt_len=64, mem_len=160, attn_type=0)


def step_times(model, prompt, n_tokens, kv_cache, seed, device) -> tuple:
    """(seconds of every generation step, the tokens drawn)."""
    times, drawn = [], []
    steps = generate(model, prompt, n_tokens, 1, generator=torch.Generator(device=device).manual_seed(seed),
                     device=device, kv_cache=kv_cache)
    start = time.perf_counter()
    for step in steps:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        times.append(now - start)
        drawn.append(int(step.tokens[0]))
        start = now
    return times, drawn


def compare_cache(args, device) -> int:
    from mem_transformer import MemTransformerLM
    if args.model:
        loaded = load_for_inference(args.model, None, overrides={}, device=device)
        model, n_token = loaded.model, int(loaded.model_config["n_token"])
        name = args.model
    else:
        config = json.loads(args.random_config)
        torch.manual_seed(args.seed)
        model = MemTransformerLM(**config)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        n_token, name = config["n_token"], f"random {config}"
    model = prepare_runtime(model, "pytorch", precision_of(args), device)
    print(f"model {name}; {precision_of(args)} on {device}, {torch.get_num_threads()} CPU thread(s); "
          f"{args.cache_tokens} tokens per run, {args.repeat} runs per variant, alternated")
    print(f"{'mem_len':>8} {'no cache ms/token':>18} {'cache ms/token':>15} {'speed-up':>9} {'same tokens':>12}")
    rows = []
    for mem_len in args.mem_lens:
        prompt = torch.randint(0, n_token, (mem_len,), generator=torch.Generator().manual_seed(0)).tolist()
        saved = model.mem_len
        model.reset_length(model.tgt_len, model.ext_len, mem_len)
        per = {False: [], True: []}
        tokens = {}
        for _ in range(args.repeat):
            for kv_cache in (False, True):
                times, drawn = step_times(model, prompt, args.cache_tokens, kv_cache, args.seed, device)
                per[kv_cache].append(statistics.median(times[1:]))
                tokens[kv_cache] = drawn
        model.reset_length(model.tgt_len, model.ext_len, saved)
        plain, cached = (1000 * statistics.median(per[k]) for k in (False, True))
        same = tokens[False] == tokens[True]
        rows.append({"mem_len": mem_len, "no_cache_ms": plain, "cache_ms": cached, "speedup": plain / cached,
                     "same_tokens": same})
        print(f"{mem_len:>8} {plain:>18.3f} {cached:>15.3f} {plain / cached:>8.2f}x {'yes' if same else 'NO':>12}")
    if args.json:
        write_text_atomic(args.json, json.dumps({"model": name, "device": str(device), "rows": rows}, indent=1) + "\n")
    return 0 if all(r["same_tokens"] for r in rows) else 1


def time_steps(model, prompt, args, device) -> list:
    """Seconds of every generation step (the first includes the prompt)."""
    times = []
    steps = generate(model, prompt, args.num_tokens, args.num_samples, mem_len=args.mem_len,
                     generator=torch.Generator(device=device).manual_seed(args.seed), device=device)
    start = time.perf_counter()
    for _ in steps:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times


@torch.no_grad()
def recompute_time(model, n_tokens: int, args, device) -> float:
    """Seconds of one forward pass over n_tokens without memory (the cost of a step without the memory)."""
    data = torch.randint(0, 100, (n_tokens, args.num_samples), device=device)
    best = float("inf")
    for _ in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model.next_token_logprobs(data, None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_cache:
        return compare_cache(args, torch.device("cuda" if args.cuda else "cpu"))
    if (args.model is None) == (args.load_torchscript is None):
        raise UserError("pass either --model CHECKPOINT or --load_torchscript FILE")
    if args.num_tokens < max(CHECKPOINTS):
        raise UserError(f"--num_tokens must be >= {max(CHECKPOINTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda else "cpu")
    overrides = length_overrides(args)
    loaded = load_for_inference(args.model, args.load_torchscript, overrides=overrides, device=device)
    runtime = "torchscript" if args.load_torchscript else "pytorch"
    model = prepare_runtime(loaded.model, runtime, precision_of(args), device)
    n_token = int(loaded.model_config["n_token"])
    lengths = current_lengths(model)
    args.prompt_len = args.prompt_len or lengths["mem_len"]
    prompt = torch.randint(0, n_token, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"model {args.model or args.load_torchscript}: {loaded.model_config['n_layer']} layers, d_model "
          f"{loaded.model_config['d_model']}, {n_token} tokens; mem_len {lengths['mem_len']}, prompt "
          f"{args.prompt_len} tokens, {args.num_samples} sample(s), {precision_of(args)} on {device}, "
          f"{torch.get_num_threads()} CPU thread(s), {args.repeat} runs")

    runs = [time_steps(model, prompt, args, device) for _ in range(args.repeat)]
    table = {}
    print(f"{'token':>6} {'ms per token':>13}   (median of the {WINDOW} tokens around it, median over runs)")
    for t in CHECKPOINTS:
        first = min(t - WINDOW // 2, args.num_tokens - WINDOW)            # tokens first+1 .. first+WINDOW
        per_run = [statistics.median(run[first:first + WINDOW]) for run in runs]
        table[t] = 1000 * statistics.median(per_run)
        print(f"{t:>6} {table[t]:>13.3f}")
    ratio = table[CHECKPOINTS[-1]] / table[CHECKPOINTS[0]]
    flat = abs(ratio - 1) <= 0.2
    print(f"token {CHECKPOINTS[-1]} / token {CHECKPOINTS[0]}: {ratio:.3f} -> flat within 20%: {'yes' if flat else 'no'}")
    full = 1000 * recompute_time(model, args.prompt_len + CHECKPOINTS[-1], args, device)
    print(f"for comparison, recomputing all {args.prompt_len + CHECKPOINTS[-1]} tokens without memory: "
          f"{full:.3f} ms per token")
    if args.json:
        write_text_atomic(args.json, json.dumps({
            "model": args.model or args.load_torchscript, "mem_len": lengths["mem_len"], "device": str(device),
            "threads": torch.get_num_threads(), "precision": precision_of(args), "num_samples": args.num_samples,
            "ms_per_token": table, "ratio": ratio, "flat": flat, "recompute_ms": full}, indent=1) + "\n")
    return 0 if flat else 1


if __name__ == "__main__":
    run_cli(main)
