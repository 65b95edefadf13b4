#!/usr/bin/env python3
"""The reference trainer's training step (NVIDIA DeepLearningExamples, Transformer-XL for PyTorch), timed the
way scripts/benchmark_train.py times ours: same flags, same synthetic batches, tokens/s and peak memory.

    git clone https://github.com/NVIDIA/DeepLearningExamples ../dle
    python scripts/benchmark_reference_train.py --reference ../dle/PyTorch/LanguageModeling/Transformer-XL/pytorch \\
        --preset base --batch_size 8 --steps 6 --warmup 2 -- --n_layer 4 --d_model 256 --no_cuda

This project contains none of the reference's code: the checkout given by --reference is imported in a child
process (its `utils` package and ours share a name). The command line is scripts/benchmark_train.py's (preset,
batch size, flags after `--` for train.py's parser), parsed here by our parser, so that both benchmarks build
the same model: the model_config our train.py derives goes to the reference's `MemTransformerLM`, the
optimizer is the reference's (`lamb.JITLamb` for `--optim jitlamb`, the presets' choice, or `lamb.Lamb`), the
batches are benchmark_train.py's synthetic stream (WikiText-103's rank-frequency curve, or Zipf with --zipf)
cut by the reference's own `LMOrderedIterator`.

The step is the one the reference's train.py runs (reference-inventory.md §3.2): every gradient set to None,
the batch split into --batch_chunk chunks, per chunk forward with that chunk's memory, `loss.float().mean()
.type_as(loss) / batch_chunk`, backward, `loss.item()`; then `clip_grad_norm_(model.parameters(), clip)`,
`optimizer.step()` and the cosine schedule's learning-rate update; with the JIT profiling executor off, as
its `__main__` sets it. Its logging, evaluation and checkpointing run at intervals and are not timed here,
nor are ours. Float32 only (the reference's mixed precision is apex's, which does not run on the CPU).
Parameters get the reference's initialization rules (normal, init_std 0.02, LayerNorm weights N(1, 0.02),
biases 0), written here by parameter name. NVIDIA's `dllogger`, which the reference's utils package imports
for its logs (not on PyPI), is replaced by an empty module; the OpenMP spin-wait bound of our benchmark
(utils/runtime/openmp_env.py) applies to both.

Output: the lines of scripts/benchmark_train.py that scripts/benchmark_ab.py reads (`tokens/s X`), so the two
run alternated, side by side:

    python scripts/benchmark_ab.py --runs 5 \\
      --cmd "reference=python scripts/benchmark_reference_train.py --reference $REF --preset base ..." \\
      --cmd "ours=python scripts/benchmark_train.py --preset base ..."
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parent(argv) -> int:
    """Parse the flags with our parser (benchmark_train.py's), then run the reference in a child process."""
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark_train as ours
    from utils.io.errors import UserError
    from utils.model.model_config import build_model_config

    if "--reference" not in argv[:-1]:
        raise UserError("--reference DIR is required: the reference's pytorch/ folder (a checkout of NVIDIA "
                        "DeepLearningExamples, PyTorch/LanguageModeling/Transformer-XL/pytorch)")
    at = argv.index("--reference")
    reference = Path(argv[at + 1]).resolve()
    argv = argv[:at] + argv[at + 2:]
    missing = [f for f in ("mem_transformer.py", "lamb.py", "data_utils.py") if not (reference / f).is_file()]
    if missing:
        raise UserError(f"--reference {reference}: no {', '.join(missing)} there; give the reference's pytorch/ "
                        "folder (PyTorch/LanguageModeling/Transformer-XL/pytorch in DeepLearningExamples)")
    bench, extra = ours.parse_cli(argv)
    if bench.steps < 1 or bench.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    if bench.precision != "fp32" or bench.compile or bench.data or bench.report or bench.repo:
        raise UserError("the reference benchmark runs float32 eager steps on synthetic data: drop --precision, "
                        "--compile, --data, --report and --repo")
    args = ours.train_args(bench, extra)
    if args.dataset not in ours.VOCAB_SIZES:
        raise UserError(f"no synthetic vocabulary size for --dataset {args.dataset}")
    if args.optim not in ("jitlamb", "lamb") or args.scheduler != "cosine":
        raise UserError(f"the reference benchmark runs --optim jitlamb or lamb with --scheduler cosine, not "
                        f"--optim {args.optim} --scheduler {args.scheduler}")
    n_token = ours.VOCAB_SIZES[args.dataset]
    tokens_needed = (bench.warmup + bench.steps + 2) * args.tgt_len * args.batch_size + args.ext_len
    stream = ours.synthetic_stream(n_token, tokens_needed, bench.zipf, args.seed)
    law = f"Zipf(s={bench.zipf})" if bench.zipf is not None else "WikiText-103 rank-frequency curve"
    spec = {
        "reference": str(reference), "model_config": build_model_config(args, n_token),
        "batch_size": args.batch_size, "batch_chunk": args.batch_chunk, "tgt_len": args.tgt_len,
        "ext_len": args.ext_len, "optim": args.optim, "lr": args.lr, "weight_decay": args.weight_decay,
        "clip": args.clip, "warmup_step": args.warmup_step, "max_step": args.max_step_scheduler or args.max_step,
        "eta_min": args.eta_min, "seed": args.seed, "init_std": args.init_std, "proj_init_std": args.proj_init_std,
        "warmup": bench.warmup, "steps": bench.steps, "stream": stream.tolist(),
        "data": f"synthetic {law} over {n_token} ids (scripts/benchmark_train.py's stream)",
    }
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child"], input=json.dumps(spec),
                           text=True, cwd=reference, env=env)
    return child.returncode


def initialize(model, init_std: float, proj_init_std: float) -> None:
    """The reference's initialization rules (normal init), by parameter name: the r_w_bias / r_r_bias vectors
    and weights N(0, init_std), projections N(0, proj_init_std), LayerNorm weights N(1, init_std), biases 0."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("r_w_bias", "r_r_bias"):
                p.normal_(0.0, init_std)
            elif "bias" in name:            # Linear and LayerNorm biases, cluster_bias, out_layers_biases.i
                p.zero_()
            elif "proj" in name:
                p.normal_(0.0, proj_init_std)
            elif "norm" in name:
                p.normal_(1.0, init_std)
            else:
                p.normal_(0.0, init_std)


def child() -> int:
    spec = json.loads(sys.stdin.read())
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")     # before torch, as utils/runtime/openmp_env.py does
    sys.path.insert(0, spec["reference"])
    # the reference's utils/__init__ imports its experiment logger, which imports NVIDIA's dllogger (not on
    # PyPI); the step logs nothing, so an empty module stands in for it
    sys.modules.setdefault("dllogger", types.ModuleType("dllogger"))
    import torch
    import data_utils
    import lamb
    import mem_transformer

    try:        # the reference's train.py turns the JIT profiling executor off in its __main__
        torch._C._jit_set_profiling_executor(False)
        torch._C._jit_set_profiling_mode(False)
    except AttributeError:
        pass
    torch.manual_seed(spec["seed"])
    cfg = spec["model_config"]
    model = mem_transformer.MemTransformerLM(**cfg)
    initialize(model, spec["init_std"], spec["proj_init_std"])
    model.train()
    optim_cls = lamb.JITLamb if spec["optim"] == "jitlamb" else lamb.Lamb
    optimizer = optim_cls(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
    w, m = spec["warmup_step"], spec["max_step"]
    # (a benchmark's few steps stay in the warm-up; the horizon only has to be valid)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, m - w), eta_min=spec["eta_min"])
    stream = torch.tensor(spec["stream"], dtype=torch.long)
    it = data_utils.LMOrderedIterator(stream, spec["batch_size"], spec["tgt_len"], device="cpu",
                                      ext_len=spec["ext_len"])
    chunks = spec["batch_chunk"]
    mems = [None] * chunks
    step_times, cpu_times, tokens, loss_value = [], [], 0, None
    bounds = [0] + list(cfg["cutoffs"]) + [cfg["n_token"]]
    counts = [0] * (len(bounds) - 1)
    train_step = 0
    for i, batch in enumerate(it.get_fixlen_iter()):
        if i == spec["warmup"] + spec["steps"]:
            break
        data, target = batch[0], batch[1]
        t0, c0 = time.perf_counter(), time.process_time()
        # reference-inventory.md §3.2: one training step of the reference's train()
        for p in model.parameters():
            p.grad = None
        data_chunks = torch.chunk(data, chunks, 1)
        target_chunks = torch.chunk(target, chunks, 1)
        train_loss = 0.0
        for c in range(chunks):
            loss, mems[c] = model(data_chunks[c].contiguous(), target_chunks[c].contiguous(), mems[c])
            loss = loss.float().mean().type_as(loss) / chunks
            loss.backward()
            train_loss += loss.float().item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"])
        optimizer.step()
        train_step += 1
        if train_step < w:
            optimizer.param_groups[0]["lr"] = spec["lr"] * train_step / w
        else:
            scheduler.step(train_step - w)
        if i >= spec["warmup"]:
            step_times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            tokens += target.numel()
            loss_value = train_loss
            flat = target.reshape(-1)
            for c in range(len(counts)):
                counts[c] += int(((flat >= bounds[c]) & (flat < bounds[c + 1])).sum())
    if len(step_times) < spec["steps"]:
        print(f"error: the data gave only {spec['warmup'] + len(step_times)} batches", file=sys.stderr)
        return 1
    elapsed = sum(step_times)
    print(f"reference trainer ({spec['reference']}) | CPU ({torch.get_num_threads()} threads) | torch "
          f"{torch.__version__} | fp32 | batch {spec['batch_size']} x tgt_len {spec['tgt_len']} (mem_len "
          f"{cfg['mem_len']}) | {cfg['n_layer']} layers, d_model {cfg['d_model']}, {cfg['n_token']} tokens | "
          f"optimizer {optim_cls.__name__}")
    n_params = sum(p.numel() for p in model.parameters())      # parameters() lists a tied table once
    print(f"data: {spec['data']}; {n_params:,} parameters; tokens per cluster: "
          f"{', '.join(f'{n / max(1, sum(counts)):.4f}' for n in counts)}")
    print(f"warm-up: {spec['warmup']} steps; timed: {spec['steps']} steps")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"tokens/s {tokens / elapsed:.0f} | ms/step {1000 * elapsed / len(step_times):.1f} (median "
          f"{1000 * statistics.median(step_times):.1f}, CPU time {1000 * statistics.median(cpu_times):.1f}) | "
          f"peak RSS {peak / 2 ** 30:.2f} GiB (process) | loss {loss_value:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--_child"]:
        sys.exit(child())
    sys.path.insert(0, str(REPO))
    from utils.io.errors import run_cli
    run_cli(lambda: parent(sys.argv[1:]))
