#!/usr/bin/env python3
"""Training speed of a preset: tokens/s, ms/step, peak memory and MFU, through train.py's own training step.

    python scripts/benchmark_train.py --preset base --batch_size 32 --precision bf16
    python scripts/benchmark_train.py --preset large --batch_size 16 --precision bf16 --checkpoint_activations
    python scripts/benchmark_train.py --preset cpu_small --data ../shared/data/wikitext-2   # the CPU benchmark
    python scripts/benchmark_train.py --preset base --batch_size 32 -- --attn_impl math --no_compile

Presets: base / large = configs/wt103_base.yaml / wt103_large.yaml (preset `default`), cpu_small =
configs/cpu_small.yaml (`default`: WikiText-2, 4 layers, d_model 256, tgt = mem = 64, batch 16). The flags
are parsed by train.py's parser (anything after `--` is passed to it), the model, optimizer, LR schedule,
loss scaler and step are train.py's (utils/training/train_step.py), batches come from the same iterator.

Data: `--data DIR` reads the preset's corpus from DIR (as train.py does). Without it the batches are a
synthetic token stream of the preset's vocabulary size (wt103: 267,735; wt2: 33,278) whose ids (frequency
ranks, as in the reference's vocabularies) follow WikiText-103's rank-frequency curve, fitted from its
validation and test splits (utils/data/token_frequencies.py: 95.2% of tokens in the base shortlist; Zipf
with exponent 1.3, the earlier synthetic data, put 97.6% there), or Zipf's law with exponent --zipf S; so the
adaptive softmax sees realistic cluster sizes. The shares of tokens per cluster are printed and enter the FLOPs.

Timing: --warmup steps (compilation happens there; its time is printed), then --steps timed steps, each
ending with the loss read back to the host (as in train.py). tokens/s = target tokens of the timed steps /
their wall time. Peak memory: on CUDA the allocator's peak over the timed steps (allocated and reserved);
on the CPU the process's peak resident memory. --saved_activations also measures the bytes autograd keeps
for the backward pass of one step (eager model, parameters excluded): the activation memory on any device.
MFU and the FLOPs formula: utils/model/flops.py (and README.md, "Performance").

--report (issue 18) adds, per steady-state step: eager ATen ops and dtype casts (a step of the uncompiled model,
counted by a TorchDispatchMode), graph breaks (torch._dynamo.explain of the training forward), graphs compiled
over the run (warm-up included), host syncs of one step (utils/runtime/host_sync.py), beside the peak memory
and tokens/s. --repo DIR runs another checkout's model, optimizer and step (e.g. a worktree of main) under
the same benchmark, so that before / after figures come from one script:

    python scripts/benchmark_train.py --preset cpu_small --report --repo ../wt-main -- --adaptive ...

--profile FILE (issue 18) runs one more steady-state step under torch.profiler and writes its ops sorted by
self CPU time (by op, and by op and input shapes) to FILE. The printed "CPU time" is the process's CPU time
per step (all threads, median): the work, less sensitive than the wall time to other jobs on shared cores.

Tensor parallelism: under torchrun, `-- --tp N` splits the model as train.py does (each process runs the
whole --batch_size). After the timed steps one more forward and backward run under a communication-counting
mode (torch.distributed.tensor.debug.CommDebugMode): the bytes all-reduced per step are printed against the
analytic figure (utils/distributed/tensor_parallel.py, analytic_all_reduce_bytes), with each rank's
parameter memory. Only rank 0 prints.

    torchrun --nproc_per_node 2 scripts/benchmark_train.py --preset cpu_small --steps 2 -- --tp 2
"""
import argparse
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# --repo: import the model / optimizer / step of another checkout (before / after comparisons)
CODE = Path(sys.argv[sys.argv.index("--repo") + 1]).resolve() if "--repo" in sys.argv[:-1] else REPO
sys.path.insert(0, str(CODE))

import utils.runtime.openmp_env  # noqa: E402,F401  (before torch: bounds OpenMP's spin-wait)
import torch  # noqa: E402

import data_utils  # noqa: E402
from mem_transformer import MemTransformerLM  # noqa: E402
from utils.config.cli import parse_args, train_parser  # noqa: E402
from utils.distributed import group as distributed  # noqa: E402
from utils.io.errors import UserError, run_cli  # noqa: E402
from utils.model.model_config import build_model_config  # noqa: E402
from utils.model.flops import cluster_fractions, cluster_sizes, mfu, peak_flops, training_flops_per_token  # noqa: E402
from utils.training.lr_scheduler import build_scheduler  # noqa: E402
from utils.training.metrics import setup_logging  # noqa: E402
from utils.model.init import count_parameters, init_weights  # noqa: E402
from utils.training.optimizers import build_optimizer  # noqa: E402
from utils.runtime.device import (amp_context, compile_model, configure_backends, grad_scaler,  # noqa: E402
                           resolve_speed_flags, select_device)
from utils.training.rng import seed_everything  # noqa: E402
from utils.training.run_setup import corpus_options  # noqa: E402
from utils.training.train_step import TrainStep  # noqa: E402

PRESETS = {
    "base": ("configs/wt103_base.yaml", "default"),
    "large": ("configs/wt103_large.yaml", "default"),
    "cpu_small": ("configs/cpu_small.yaml", "default"),
}
# vocabulary sizes of the reference's word vocabularies (synthetic data)
VOCAB_SIZES = {"wt103": 267735, "wt2": 33278, "ptb": 10000}
PRECISIONS = {"fp32": ["--no_tf32"], "tf32": ["--tf32"], "bf16": ["--bf16"], "fp16": ["--fp16"]}


def parse_cli(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     epilog="Flags after `--` go to train.py's parser.")
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--config", default=None, help="another preset name in the preset's file")
    parser.add_argument("--batch_size", type=int, default=None, help="batch size (default: the preset's)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                        help="fp32 (no TF32), tf32, bf16 or fp16 (mixed precision, float32 weights)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile (default: train.py's: on with CUDA, off on the CPU)")
    parser.add_argument("--attn_impl", default=None, help="math, sdpa, flex, triton (default: train.py's auto)")
    parser.add_argument("--checkpoint_activations", action="store_true")
    parser.add_argument("--cuda_graphs", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--data", default=None, help="read the preset's corpus from here instead of synthetic data")
    parser.add_argument("--zipf", type=float, default=None,
                        help="synthetic tokens from Zipf's law with this exponent (default: WikiText-103's curve)")
    parser.add_argument("--saved_activations", action="store_true",
                        help="also measure the bytes saved for backward by one eager step")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    parser.add_argument("--report", action="store_true",
                        help="also count ATen ops, casts, graph breaks, compilations and host syncs per step")
    parser.add_argument("--repo", default=None, help="run this checkout's code (default: this one)")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="after the timed steps, profile one more step (torch.profiler) and write its ops "
                             "sorted by self CPU time to FILE")
    if "--" in argv:
        cut = argv.index("--")
        ours, extra = argv[:cut], argv[cut + 1:]
    else:
        ours, extra = argv, []
    return parser.parse_args(ours), extra


def train_args(bench, extra):
    """train.py's arguments for the benchmark, parsed by train.py's own parser."""
    config_file, name = PRESETS[bench.preset]
    argv = ["--config_file", str(REPO / config_file), "--config", bench.config or name, "--debug",
            "--no_eval", "--max_step", str(bench.warmup + bench.steps)]
    argv += PRECISIONS[bench.precision]
    if bench.batch_size is not None:
        argv += ["--batch_size", str(bench.batch_size), "--batch_chunk", "1"]
    if bench.compile is not None:
        argv += ["--compile" if bench.compile else "--no_compile"]
    if bench.attn_impl:
        argv += ["--attn_impl", bench.attn_impl]
    if bench.checkpoint_activations:
        argv += ["--checkpoint_activations"]
    if bench.cuda_graphs:
        argv += ["--cuda_graphs"]
    if bench.device != "auto":
        argv += ["--cuda" if bench.device == "cuda" else "--no_cuda"]
    if bench.data:
        argv += ["--data", bench.data]
    return parse_args(train_parser(), argv + extra, section="train")


def rank_probabilities(n_token: int, zipf) -> torch.Tensor:
    """Probability of each id (= frequency rank): Zipf's law with exponent `zipf`, or WikiText-103's curve
    (loaded from this checkout's file even with --repo, so that before / after runs see the same stream)."""
    if zipf is not None:
        probs = torch.arange(1, n_token + 1, dtype=torch.float64).pow(-zipf)
        return probs / probs.sum()
    import importlib.util
    spec = importlib.util.spec_from_file_location("txl_token_frequencies",
                                                  REPO / "utils" / "data" / "token_frequencies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return torch.from_numpy(module.rank_probabilities(n_token))


def synthetic_stream(n_token: int, length: int, zipf, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(rank_probabilities(n_token, zipf), length, replacement=True, generator=gen)


def batches(bench, args, device):
    """(iterator, n_token, description) with the preset's batch and segment sizes."""
    tokens_needed = (bench.warmup + bench.steps + 2) * args.tgt_len * args.batch_size + args.ext_len
    if bench.data:
        corpus = data_utils.get_lm_corpus(args.data, args.dataset, args.vocab, cache_dir=args.cache_dir,
                                          verbose=False, progress=False,
                                          **corpus_options(args))
        it = corpus.get_iterator("train", args.batch_size, args.tgt_len, device=device, ext_len=args.ext_len,
                                 seed=args.seed)
        if it.n_batch < bench.warmup + bench.steps:
            raise UserError(f"{args.data}: {it.n_batch} batches, fewer than --warmup + --steps")
        return it, len(corpus.vocab), f"{args.dataset} train ({args.data})"
    if args.dataset not in VOCAB_SIZES:
        raise UserError(f"no synthetic vocabulary size for --dataset {args.dataset}; pass --data DIR")
    n_token = VOCAB_SIZES[args.dataset]
    stream = synthetic_stream(n_token, tokens_needed, bench.zipf, args.seed)
    it = data_utils.LMOrderedIterator(stream, args.batch_size, args.tgt_len, device=device, ext_len=args.ext_len)
    law = f"Zipf(s={bench.zipf})" if bench.zipf is not None else "WikiText-103 rank-frequency curve"
    return it, n_token, f"synthetic {law} over {n_token} ids"


def saved_activation_bytes(model, data, target, mems, autocast) -> int:
    """Bytes of the tensors autograd saves for backward in one forward (parameters and repeats excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss, _ = model(data, target, mems)
    loss.float().mean().backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _step_report_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("_issue18_step_report", REPO / "utils" / "runtime" / "step_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(bench, extra) -> dict:
    args = distributed.init_from_env(train_args(bench, extra))
    log = setup_logging(None, distributed.get_rank())
    device = select_device(args, log)
    args = resolve_speed_flags(args, device)
    configure_backends(args, device)
    seed_everything(args.seed)
    iterator, n_token, data_desc = batches(bench, args, device)

    model_config = build_model_config(args, n_token)
    model = MemTransformerLM(**model_config)
    init_weights(model, args.init, args.init_range, args.init_std, args.proj_init_std)
    model.set_attn_impl(args.attn_impl)
    model.set_checkpoint_activations(args.checkpoint_activations)
    model.crit.tail_capacity = getattr(args, "softmax_tail_capacity", None)   # static shapes (issue 18)
    model.to(device)
    n_all, n_nonemb = count_parameters(model)
    para_model = distributed.wrap_model(model, args, device)     # --tp: split (replaces the parameters)
    optimizer = build_optimizer(args, model)
    scheduler = build_scheduler(args, optimizer)
    scaler = grad_scaler(args, device)
    autocast = amp_context(args, device)
    report_tools = _step_report_module() if bench.report else None
    graphs_before = report_tools.compiled_graphs() if report_tools else 0
    step = TrainStep(model, compile_model(para_model, args), optimizer, scaler, autocast, args.clip,
                     args.batch_chunk, args.swap_mem, args.cuda_graphs)
    # a step that reads nothing back when the code has one (issue 18), else the one that returns floats
    step_fn = getattr(step, "run", step)
    mems = [None] * args.batch_chunk

    sizes = cluster_sizes(n_token, model_config["cutoffs"])
    counts = [0] * len(sizes)
    bounds = [0] + list(model_config["cutoffs"]) + [n_token]
    step_times, cpu_times, tokens, losses = [], [], 0, []
    saved = None
    start = time.perf_counter()
    warmup_s = None
    for i, (data, target, _, _) in enumerate(iterator):
        if i == bench.warmup + bench.steps:
            break
        if i == bench.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            warmup_s = time.perf_counter() - start
        t0, c0 = time.perf_counter(), time.process_time()
        loss, _ = step_fn(data, target, mems)
        scheduler.step(i + 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)                  # per-step times (the step itself reads nothing back)
        if i >= bench.warmup:
            step_times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            tokens += target.numel()
            losses.append(loss)
            flat = target.reshape(-1)
            for c in range(len(sizes)):
                counts[c] += int(((flat >= bounds[c]) & (flat < bounds[c + 1])).sum())
    if len(step_times) < bench.steps:
        raise UserError(f"the data gave only {bench.warmup + len(step_times)} batches")
    elapsed = sum(step_times)
    losses = [float(x) for x in losses]
    report = None
    if report_tools:
        report = {"compiled_graphs": report_tools.compiled_graphs() - graphs_before}
        report.update(report_tools.count_syncs(lambda: step_fn(data, target, mems)))
        eager_step = TrainStep(model, model, optimizer, scaler, autocast, args.clip, args.batch_chunk,
                               args.swap_mem, False)
        if getattr(step, "compute_weights", None) is not None:
            eager_step.compute_weights = step.compute_weights   # one set of bf16 copies, as in a training run
        eager_fn = getattr(eager_step, "run", eager_step)
        # LAMB's eager CPU update runs its multi-tensor ops block by block (a CPU cache optimization, ~17k ops
        # for the base table); the count is of the step a GPU runs: the unblocked multi-tensor update
        lamb = sys.modules.get("utils.training.lamb")
        blocked = getattr(lamb, "CPU_BLOCKED_UPDATE", None)
        if blocked is not None:
            lamb.CPU_BLOCKED_UPDATE = False
        try:
            report.update(report_tools.count_ops(lambda: eager_fn(data, target, mems)))
        finally:
            if blocked is not None:
                lamb.CPU_BLOCKED_UPDATE = blocked
        with autocast():
            report.update(report_tools.graph_breaks(model, data, target, mems[0]))
    if bench.profile:
        profile_step(bench.profile, lambda: (step_fn(data, target, mems), scheduler.step(i + 1)))
    if bench.saved_activations:
        saved = saved_activation_bytes(model, data, target, mems[0], autocast)
    traffic = tensor_parallel_traffic(para_model, model, args, data, target, mems[0], autocast) \
        if args.tensor_parallel > 1 else None

    fractions = cluster_fractions(counts)
    flops = training_flops_per_token(model_config, fractions)
    tok_s = tokens / elapsed
    name = device_name(device)
    peak = peak_flops(name) if device.type == "cuda" else None
    result = {
        "preset": bench.preset, "config": bench.config or PRESETS[bench.preset][1], "device": name,
        "torch": torch.__version__, "precision": bench.precision, "batch_size": args.batch_size,
        "tgt_len": args.tgt_len, "mem_len": args.mem_len, "compile": args.compile, "attn_impl": args.attn_impl,
        "cuda_graphs": args.cuda_graphs, "checkpoint_activations": args.checkpoint_activations,
        "extra_flags": extra, "data": data_desc, "params": n_all, "nonemb_params": n_nonemb,
        "steps": bench.steps, "warmup_steps": bench.warmup, "warmup_s": warmup_s,
        "tokens_per_s": tok_s, "ms_per_step": 1000 * elapsed / len(step_times),
        "ms_per_step_median": 1000 * statistics.median(step_times),
        # CPU time of the process (all its threads) per step: the work, less sensitive than the wall time to
        # other jobs sharing the cores (it still counts the threads' spin-waits)
        "cpu_ms_per_step_median": 1000 * statistics.median(cpu_times),
        "flops_per_token": flops, "cluster_fractions": fractions, "peak_flops": peak,
        "mfu": mfu(tok_s, flops, peak), "last_loss": losses[-1] if losses else None,
    }
    if device.type == "cuda":
        result["peak_memory_allocated"] = torch.cuda.max_memory_allocated(device)
        result["peak_memory_reserved"] = torch.cuda.max_memory_reserved(device)
    else:
        result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if saved is not None:
        result["saved_activations"] = saved
    if report is not None:
        result["report"] = report
        result["code"] = str(CODE)
    if traffic is not None:
        result["tensor_parallel"] = traffic
    return result


def profile_step(path: str, fn) -> None:
    """One more steady-state step under torch.profiler; its ops by self CPU time, as a table, into `path`."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn()
    by_op = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=40, max_shapes_column_width=80)
    Path(path).write_text(f"# {' '.join(sys.argv)}\n# code: {CODE}\n# by op\n{by_op}\n# by op and input shapes\n"
                          f"{by_shape}\n", encoding="utf-8")


def tensor_parallel_traffic(para_model, model, args, data, target, mems, autocast) -> dict:
    """Bytes all-reduced by one forward and one backward (one batch chunk), counted and analytic, and this
    rank's parameter memory against one process's."""
    from utils.distributed.tensor_parallel import (analytic_all_reduce_bytes, comm_bytes_mode, full_parameter_bytes,
                                                   local_parameter_bytes)
    counted = {}
    with comm_bytes_mode() as forward, autocast():
        loss, _ = para_model(data, target, mems)
    counted["forward"] = dict(forward.bytes_by_op)
    with comm_bytes_mode() as backward:
        loss.float().mean().backward()
    counted["backward"] = dict(backward.bytes_by_op)
    model.zero_grad(set_to_none=True)
    mlen = 0 if mems is None else mems.size(1)
    element_size = torch.finfo(torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32).bits // 8
    analytic = analytic_all_reduce_bytes(args.n_layer, target.size(0), mlen, target.size(1), args.d_model,
                                         element_size)
    return {"tp": args.tensor_parallel, "mlen": mlen, "counted": counted, "analytic": analytic,
            "param_bytes_rank": local_parameter_bytes(model), "param_bytes_full": full_parameter_bytes(model),
            "split_param_bytes_rank": local_parameter_bytes(model, True),
            "split_param_bytes_full": full_parameter_bytes(model, True)}


def gb(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def report(r: dict) -> str:
    lines = [f"preset {r['preset']} ({r['config']}) | {r['device']} | torch {r['torch']} | {r['precision']} | "
             f"batch {r['batch_size']} x tgt_len {r['tgt_len']} (mem_len {r['mem_len']}) | compile "
             f"{'on' if r['compile'] else 'off'}{' + CUDA graphs' if r['cuda_graphs'] else ''} | attn "
             f"{r['attn_impl']} | activation checkpointing {'on' if r['checkpoint_activations'] else 'off'}"
             + (f" | {' '.join(r['extra_flags'])}" if r["extra_flags"] else ""),
             f"data: {r['data']}; {r['params']:,} parameters ({r['nonemb_params']:,} non-embedding); tokens per "
             f"cluster: {', '.join(f'{f:.4f}' for f in r['cluster_fractions'])}",
             f"warm-up: {r['warmup_steps']} steps in {r['warmup_s']:.1f} s; timed: {r['steps']} steps"]
    memory = (f"peak memory {gb(r['peak_memory_allocated'])} allocated, {gb(r['peak_memory_reserved'])} reserved"
              if "peak_memory_allocated" in r else f"peak RSS {gb(r['peak_rss'])} (process)")
    if "saved_activations" in r:
        memory += f" | saved activations {gb(r['saved_activations'])}"
    util = (f"MFU {100 * r['mfu']:.1f}% of {r['peak_flops'] / 1e12:.0f} TFLOP/s" if r["mfu"] is not None
            else "MFU n/a (no datasheet peak for this device)")
    lines.append(f"tokens/s {r['tokens_per_s']:.0f} | ms/step {r['ms_per_step']:.1f} (median "
                 f"{r['ms_per_step_median']:.1f}, CPU time {r['cpu_ms_per_step_median']:.1f}) | {memory} | FLOPs/token {r['flops_per_token'] / 1e6:.1f} M | "
                 f"{r['tokens_per_s'] * r['flops_per_token'] / 1e12:.2f} TFLOP/s | {util} | loss {r['last_loss']:.3f}")
    if "report" in r:
        rep = r["report"]
        lines.append(f"report ({r['code']}): eager ATen ops/step {rep['aten_ops']} (casts {rep['casts']}) | graph "
                     f"breaks {rep['graph_breaks']} ({rep['graphs']} graphs) | graphs compiled in the run "
                     f"{rep['compiled_graphs']} | host syncs/step {rep['host_syncs']} {rep['sync_ops'] or ''}")
        if "ops_by_phase" in rep:
            lines.append(f"  ops by phase: {rep['ops_by_phase']} (forward / backward / after the last backward: "
                         f"clipping, optimizer); views among them {rep['views']}"
                         + (f"; mixed-dtype ops (promoting arithmetic, not casts) {rep['mixed_dtype_ops']}"
                            if "mixed_dtype_ops" in rep else ""))
        lines.append(f"  most frequent ops: {rep['top_ops']}")
        if rep["break_reasons"]:
            lines.append(f"  graph breaks: {rep['break_reasons']}")
    tp = r.get("tensor_parallel")
    if tp:
        fw, bw = (sum(tp["counted"][k].values()) for k in ("forward", "backward"))
        lines.append(f"tensor parallel {tp['tp']}: all-reduced per step (one chunk, memory {tp['mlen']}) forward "
                     f"{fw:,} B counted / {tp['analytic']['forward']:,} B analytic, backward {bw:,} B counted / "
                     f"{tp['analytic']['backward']:,} B analytic (Megatron's 2 x tgt_len x batch x d_model per "
                     f"layer: {tp['analytic']['megatron_backward']:,} B; the q/k/v input gradient also covers the "
                     f"memory rows); ops {sorted(set(tp['counted']['forward']) | set(tp['counted']['backward']))}")
        lines.append(f"parameters per rank {tp['param_bytes_rank'] / 2**20:.2f} MiB of "
                     f"{tp['param_bytes_full'] / 2**20:.2f} MiB; split layers {tp['split_param_bytes_rank']:,} of "
                     f"{tp['split_param_bytes_full']:,} B "
                     f"({tp['split_param_bytes_rank'] / tp['split_param_bytes_full']:.3f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    bench, extra = parse_cli(sys.argv[1:] if argv is None else argv)
    if bench.steps < 1 or bench.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    if bench.compile and bench.warmup < 2:
        # issue 18: every timed shape is warmed up: the memory-less first step and the full-memory steps are
        # two graphs, so two warm-up steps compile both before the clock starts
        raise UserError("--compile needs --warmup >= 2 (the first, memory-less step and a full-memory step "
                        "compile a graph each; timed steps must not compile)")
    result = run(bench, extra)
    if not distributed.is_main_process():
        distributed.shutdown()
        return 0
    print(report(result), flush=True)
    distributed.shutdown()
    if bench.json:
        with open(bench.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    if not math.isfinite(result["last_loss"]):
        raise UserError(f"the training loss is {result['last_loss']}: the configuration does not train")
    return 0


if __name__ == "__main__":
    run_cli(main)
