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
cut by the reference's own `LMOrderedIterator`. Float32, eager, on the CPU (`--no_cuda`): the reference's
mixed precision is apex's, which does not run on the CPU, and it has no compiled mode. Flags of ours that
the reference lacks (other attention kernels, activation checkpointing, CUDA graphs, tensor parallelism,
--varlen, --swap_mem, uniform init) are refused.

The step is the one the reference's train.py runs (reference-inventory.md §3.2): every gradient set to None,
the batch split into --batch_chunk chunks, per chunk forward with that chunk's memory, `loss.float().mean()
.type_as(loss) / batch_chunk`, backward, `loss.item()`; then `clip_grad_norm_(model.parameters(), clip)`,
`optimizer.step()` and the cosine schedule's warm-up learning rate or scheduler step. The JIT profiling
executor is turned off when the checkout's train.py turns it off (later versions do, in `__main__`). Its
logging, evaluation and checkpointing run at intervals and are not timed here, nor are ours. Parameters get
the reference's initialization rules (normal init: weights N(0, init_std), projections N(0, proj_init_std),
LayerNorm weights N(1, init_std), biases 0), applied here by parameter name.

--jit_profiling auto|on|off: TorchScript's profiling executor (it decides how JITLamb's scripted kernel
runs); auto follows the checkout's train.py (later versions turn it off in `__main__`, earlier ones leave it
on).

Process settings: by default the reference runs as it ships, with the C library's and OpenMP's defaults.
Our trainer sets two things for the process (on the CPU): OpenMP's spin-wait bound
(utils/runtime/openmp_env.py) and glibc malloc's reuse of freed memory (utils/runtime/cpu_allocator.py);
--our_process_settings gives the reference's step those too, which separates what the process settings
gain from what the step's code gains (the reference frees and re-allocates large buffers every step, and
without malloc's reuse the kernel zero-fills their pages again each time). NVIDIA's `dllogger`, which the
reference's utils package imports for its logs (it is not on PyPI), is replaced by an empty module. Peak
memory is the child's own (VmHWM).

Output: the lines of scripts/benchmark_train.py that scripts/benchmark_ab.py reads (`tokens/s X`), so the two
run alternated, side by side:

    python scripts/benchmark_ab.py --runs 5 \\
      --cmd "reference=python scripts/benchmark_reference_train.py --reference $REF --preset base ..." \\
      --cmd "ours=python scripts/benchmark_train.py --preset base ..."
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the command line other than this script's own flags goes to benchmark_train.py's parser (tests/docs_flags.py)
FLAGS_ALSO_OF = "scripts/benchmark_train.py"
NEEDED = ("mem_transformer.py", "lamb.py", "data_utils.py")


class FlagParser(argparse.ArgumentParser):
    """This script's own flags (before `--`); a bad value gets one line and exit status 2."""

    def __init__(self):
        super().__init__(add_help=False, allow_abbrev=False)

    def error(self, message):
        from utils.io.errors import UserError
        raise UserError(message)

    def split(self, argv):
        """(this script's flags, the rest of the command line for scripts/benchmark_train.py's parser)"""
        cut = argv.index("--") if "--" in argv else len(argv)
        own, rest = self.parse_known_args(argv[:cut])
        return own, rest + argv[cut:]


def checked_reference(reference) -> Path:
    """--reference DIR, resolved, holding the reference's modules; else one line saying what to give."""
    from utils.io.errors import UserError
    if reference is None:
        raise UserError("--reference DIR is required: the reference's pytorch/ folder (a checkout of NVIDIA "
                        "DeepLearningExamples, PyTorch/LanguageModeling/Transformer-XL/pytorch)")
    reference = Path(reference).resolve()
    missing = [f for f in NEEDED if not (reference / f).is_file()]
    if missing:
        raise UserError(f"--reference {reference}: no {', '.join(missing)} there; give the reference's pytorch/ "
                        "folder (PyTorch/LanguageModeling/Transformer-XL/pytorch in DeepLearningExamples)")
    return reference


def parent(argv) -> int:
    """Check and parse the flags with our parser (benchmark_train.py's), then run the reference in a child."""
    user_spincount = os.environ.get("GOMP_SPINCOUNT")     # before our modules set it for this process
    sys.path.insert(0, str(REPO))
    from utils.io.errors import UserError
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    parser = FlagParser()
    parser.add_argument("--reference", metavar="DIR", help="the reference's pytorch/ folder")
    parser.add_argument("--jit_profiling", choices=["auto", "on", "off"], default="auto",
                        help="TorchScript's profiling executor (auto: as the checkout's train.py sets it)")
    parser.add_argument("--our_process_settings", action="store_true",
                        help="give the reference's step our malloc and OpenMP settings")
    own, argv = parser.split(argv)
    reference = checked_reference(own.reference)
    jit_profiling, our_settings = own.jit_profiling, own.our_process_settings

    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark_train as ours
    import torch
    from utils.model.model_config import build_model_config

    bench, extra = ours.parse_cli(argv)
    if bench.steps < 1 or bench.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    ours_only = {"--precision": bench.precision != "fp32", "--compile": bool(bench.compile),
                 "--data": bool(bench.data), "--report": bench.report, "--repo": bool(bench.repo),
                 "--attn_impl": bool(bench.attn_impl), "--checkpoint_activations": bench.checkpoint_activations,
                 "--cuda_graphs": bench.cuda_graphs, "--saved_activations": bench.saved_activations,
                 "--profile": bool(bench.profile), "--json": bool(bench.json), "--device cuda": bench.device == "cuda"}
    args = ours.train_args(bench, extra)
    ours_only.update({"--varlen": args.varlen, "--swap_mem": args.swap_mem, "--tp": args.tensor_parallel > 1,
                      "--init uniform": args.init != "normal", "--sample_softmax": args.sample_softmax > 0})
    refused = [flag for flag, given in ours_only.items() if given]
    if refused:
        raise UserError(f"the reference benchmark runs the reference's float32 eager step on synthetic data, "
                        f"without {', '.join(refused)}: drop {'it' if len(refused) == 1 else 'them'}")
    if args.cuda is not False and bench.device != "cpu":
        raise UserError("the reference benchmark runs on the CPU: pass --no_cuda after `--` (or --device cpu), "
                        "and the same to scripts/benchmark_train.py")
    if args.dataset not in ours.VOCAB_SIZES:
        raise UserError(f"no synthetic vocabulary size for --dataset {args.dataset}")
    if args.optim not in ("jitlamb", "lamb") or args.scheduler != "cosine":
        raise UserError(f"the reference benchmark runs --optim jitlamb or lamb with --scheduler cosine, not "
                        f"--optim {args.optim} --scheduler {args.scheduler}")
    n_token = ours.VOCAB_SIZES[args.dataset]
    tokens_needed = (bench.warmup + bench.steps + 2) * args.tgt_len * args.batch_size + args.ext_len
    law = f"Zipf(s={bench.zipf})" if bench.zipf is not None else "WikiText-103 rank-frequency curve"
    if jit_profiling == "auto":
        train_py = reference / "train.py"
        jit_profiling = "off" if train_py.is_file() and "_jit_set_profiling_executor(False)" in \
            train_py.read_text(errors="replace") else "on"
    spec = {
        "reference": str(reference), "model_config": build_model_config(args, n_token),
        "batch_size": args.batch_size, "batch_chunk": args.batch_chunk, "tgt_len": args.tgt_len,
        "ext_len": args.ext_len, "optim": args.optim, "lr": args.lr, "weight_decay": args.weight_decay,
        "clip": args.clip, "warmup_step": args.warmup_step, "max_step": args.max_step_scheduler or args.max_step,
        "eta_min": args.eta_min, "seed": args.seed, "init_std": args.init_std, "proj_init_std": args.proj_init_std,
        "warmup": bench.warmup, "steps": bench.steps, "profiling_executor_off": jit_profiling == "off",
        "data": f"synthetic {law} over {n_token} ids (scripts/benchmark_train.py's stream)",
        "allocator": str(REPO / "utils" / "runtime" / "cpu_allocator.py") if our_settings else None,
    }
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if our_settings:
        env.setdefault("GOMP_SPINCOUNT", "10000")          # utils/runtime/openmp_env.py's bound
    elif user_spincount is None:
        env.pop("GOMP_SPINCOUNT", None)                    # OpenMP's default, as the reference runs
    else:
        env["GOMP_SPINCOUNT"] = user_spincount
    with tempfile.TemporaryDirectory(prefix="reference_bench_") as tmp:
        spec["stream"] = str(Path(tmp) / "stream.pt")
        torch.save(ours.synthetic_stream(n_token, tokens_needed, bench.zipf, args.seed), spec["stream"])
        child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child"],
                               input=json.dumps(spec), text=True, cwd=reference, env=env)
    if child.returncode < 0:
        raise UserError(f"the reference's process was killed by signal {-child.returncode} (out of memory?); "
                        f"try a smaller --batch_size")
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
            elif "bias" in name:            # Linear and LayerNorm biases, r_bias, cluster_bias, out_layers_biases.i
                p.zero_()
            elif "proj" in name:
                p.normal_(0.0, proj_init_std)
            elif "norm" in name:
                p.normal_(1.0, init_std)
            else:
                p.normal_(0.0, init_std)


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: of its own address space, which ru_maxrss is not after a
    vfork + exec from a larger parent)."""
    import resource
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_reference(spec):
    """The reference's modules, its model built and initialized, its optimizer."""
    sys.path.insert(0, spec["reference"])
    sys.modules.setdefault("dllogger", types.ModuleType("dllogger"))
    # its deprecation warnings (old overloads of add_ / addcmul_, torch.jit) would print its source lines into
    # logs that this project keeps
    warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
    import torch
    import data_utils
    import lamb
    import mem_transformer

    if spec["profiling_executor_off"]:
        torch._C._jit_set_profiling_executor(False)
        torch._C._jit_set_profiling_mode(False)
    torch.manual_seed(spec["seed"])
    model = mem_transformer.MemTransformerLM(**spec["model_config"])
    initialize(model, spec["init_std"], spec["proj_init_std"])
    model.train()
    optim_cls = lamb.JITLamb if spec["optim"] == "jitlamb" else lamb.Lamb
    optimizer = optim_cls(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
    stream = torch.load(spec["stream"], weights_only=True)
    it = data_utils.LMOrderedIterator(stream, spec["batch_size"], spec["tgt_len"], device="cpu",
                                      ext_len=spec["ext_len"])
    return torch, model, optimizer, it


def reference_step(torch, model, optimizer, data, target, mems, clip):
    """One training step of the reference's train() (reference-inventory.md §3.2), the learning rate left as
    it is; `mems` holds one memory per batch chunk (len(mems) chunks). Returns (loss, gradient norm)."""
    chunks = len(mems)
    for p in model.parameters():
        p.grad = None
    train_loss = 0.0
    for c, (data_c, target_c) in enumerate(zip(torch.chunk(data, chunks, 1), torch.chunk(target, chunks, 1))):
        loss, mems[c] = model(data_c.contiguous(), target_c.contiguous(), mems[c])
        loss = loss.float().mean().type_as(loss) / chunks
        loss.backward()
        train_loss += loss.float().item()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return train_loss, float(norm)


def child() -> int:
    spec = json.loads(sys.stdin.read())
    if spec["allocator"]:            # --our_process_settings (module docstring), before torch allocates
        import importlib.util
        loader = importlib.util.spec_from_file_location("txl_cpu_allocator", spec["allocator"])
        allocator = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(allocator)
        allocator.tune_cpu_allocator()
    try:
        torch, model, optimizer, it = load_reference(spec)
    except Exception as e:  # another version of the reference, or a broken checkout: one line, not a traceback
        print(f"error: --reference {spec['reference']}: its model or optimizer does not load here "
              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
        return 2
    cfg = spec["model_config"]
    w, m = spec["warmup_step"], spec["max_step"]
    # (a benchmark's few steps stay in the warm-up; the horizon only has to be valid)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, m - w), eta_min=spec["eta_min"])
    chunks = spec["batch_chunk"]
    mems = [None] * chunks
    step_times, cpu_times, tokens, loss_value = [], [], 0, None
    bounds = [0] + list(cfg["cutoffs"]) + [cfg["n_token"]]
    counts = [0] * (len(bounds) - 1)
    checksum = 0
    train_step = 0
    for i, batch in enumerate(it.get_fixlen_iter()):
        if i == spec["warmup"] + spec["steps"]:
            break
        data, target = batch[0], batch[1]
        t0, c0 = time.perf_counter(), time.process_time()
        train_loss, _ = reference_step(torch, model, optimizer, data, target, mems, spec["clip"])
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
            checksum += int((flat * torch.arange(1, flat.numel() + 1)).sum())
            for c in range(len(counts)):
                counts[c] += int(((flat >= bounds[c]) & (flat < bounds[c + 1])).sum())
    if len(step_times) < spec["steps"]:
        print(f"error: the data gave only {spec['warmup'] + len(step_times)} batches", file=sys.stderr)
        return 1
    elapsed = sum(step_times)
    n_params = sum(p.numel() for p in model.parameters())      # parameters() lists a tied table once
    print(f"reference trainer ({spec['reference']}) | CPU ({torch.get_num_threads()} threads) | torch "
          f"{torch.__version__} | fp32 | batch {spec['batch_size']} x tgt_len {spec['tgt_len']} (mem_len "
          f"{cfg['mem_len']}), {chunks} chunk(s) | {cfg['n_layer']} layers, d_model {cfg['d_model']}, "
          f"{cfg['n_token']} tokens | optimizer {type(optimizer).__name__} | JIT profiling executor "
          f"{'off' if spec['profiling_executor_off'] else 'on'} | process settings "
          f"{'ours (malloc reuse, GOMP_SPINCOUNT ' + os.environ.get('GOMP_SPINCOUNT', '') + ')' if spec['allocator'] else 'the defaults'}")
    print(f"data: {spec['data']}; {n_params:,} parameters; tokens per cluster: "
          f"{', '.join(f'{n / max(1, sum(counts)):.4f}' for n in counts)}; timed targets checksum {checksum}")
    print(f"warm-up: {spec['warmup']} steps; timed: {spec['steps']} steps")
    print(f"tokens/s {tokens / elapsed:.0f} | ms/step {1000 * elapsed / len(step_times):.1f} (median "
          f"{1000 * statistics.median(step_times):.1f}, CPU time {1000 * statistics.median(cpu_times):.1f}) | "
          f"peak RSS {peak_rss_bytes() / 2 ** 30:.2f} GiB (process) | loss {loss_value:.3f}", flush=True)
    return 0


def run_script(parent_main, child_main) -> None:
    """A script of the reference's: the child when started as one (`--_child`), else the parent's command line."""
    if sys.argv[1:] == ["--_child"]:
        sys.exit(child_main())
    sys.path.insert(0, str(REPO))
    from utils.io.errors import run_cli
    run_cli(lambda: parent_main(sys.argv[1:]))


if __name__ == "__main__":
    run_script(parent, child)
