#!/usr/bin/env python3
"""Our training step against the reference trainer's (NVIDIA DeepLearningExamples, Transformer-XL for PyTorch),
step by step, from the same weights on the same batches: the losses, the gradient norms, and the parameters
and LAMB moments after the last step. On the CPU, where both draw dropout masks from ATen's generator in the
same order (on CUDA, sdpa's fused attention dropout and inductor's generator draw others).

    python scripts/compare_reference_train.py --reference ../dle/PyTorch/LanguageModeling/Transformer-XL/pytorch \\
        --preset base --batch_size 8 --steps 5 --float64 -- --n_layer 4 --d_model 256 --no_cuda --optim lamb

The flags are scripts/benchmark_reference_train.py's (scripts/benchmark_train.py's preset, batch size and
train.py flags after `--`); --steps is the number of steps compared. The reference runs first, in a child
process (benchmark_reference_train.py's loader: its model, JITLamb or Lamb, and its iterator over
benchmark_train.py's synthetic stream); it initializes its model by the reference's rules, saves those
weights, then trains. Ours (train.py's model, optimizer and TrainStep, `--compile` allowed) starts from the
reference's weights, mapped by utils/model/reference_compat.py as a reference checkpoint is, on the same
batches. Both reseed the random generator right before the first step, so with dropout the two draw their
masks from the same stream. The learning rate is --lr held constant on both sides: the schedules are compared
by tests/test_lr_scheduler.py, not here. --float64 runs both models in float64, where only rounding separates them
(the same sums in other orders).

Exit status 0 when they agree, 1 otherwise: the gradient norms within --rtol (relative; default 1e-9 in
float64, 1e-4 in float32), the losses within --rtol or 2.5e-7, whichever is larger (both trainers reduce the
loss in float32, `loss.float().mean()`, so in float64 the sums can round one float32 ulp apart), and every
parameter and LAMB moment within --param_rtol of the largest magnitude of its tensor (default 1e-5 in
float64, 5e-2 in float32). LAMB normalizes each tensor's update, so a gradient that is a sum of cancelling
terms passes its rounding noise on at full size: r_net's at initialization differs by ~1e-8 after the first
step in float64, and the difference grows to ~1e-6 in its moments by step 4. In float32 with --compile, whose
fused kernels round differently, a pre-activation within rounding of zero can fall on the other side of the
ReLU: after 4 steps of a 2-layer model the feed-forward weights differ by up to 3e-4 and their second moments
by 1.5e-2 of the largest. float64 is the strict check. The defects this is for are far larger (dropout masks drawn in another order: 5e-5 in the first loss; a
table moved by its moments where the reference leaves it: 0.3).
float64 is the strict check: eager and --compile agree with the reference to 1e-12 in the gradient norms,
with `-- --optim lamb` (the reference's JITLamb rounds each trust ratio to float32, `trust_ratio.float()`,
which in float64 shows as differences of ~1e-9 in the gradient norms after the first step).
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the command line other than this script's own flags goes to benchmark_train.py's parser (tests/docs_flags.py)
FLAGS_ALSO_OF = "scripts/benchmark_train.py"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_reference_train as bench_ref  # noqa: E402  (stdlib only at import)


def parent(argv) -> int:
    sys.path.insert(0, str(REPO))
    from utils.io.errors import UserError
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    parser = bench_ref.FlagParser()
    parser.add_argument("--reference", metavar="DIR", help="the reference's pytorch/ folder")
    parser.add_argument("--float64", action="store_true", help="both models in float64")
    parser.add_argument("--rtol", type=float, default=None, help="tolerance of the losses and gradient norms")
    parser.add_argument("--param_rtol", type=float, default=None, help="tolerance of the parameters")
    own, argv = parser.split(argv)
    reference = bench_ref.checked_reference(own.reference)
    float64 = own.float64
    rtol = (1e-9 if float64 else 1e-4) if own.rtol is None else own.rtol
    param_rtol = (1e-5 if float64 else 5e-2) if own.param_rtol is None else own.param_rtol

    import benchmark_train as ours
    import torch
    from mem_transformer import MemTransformerLM
    import data_utils
    from utils.model.model_config import build_model_config
    from utils.model.reference_compat import reference_state_dict_to_ours
    from utils.runtime.device import amp_context, compile_model, grad_scaler, resolve_speed_flags
    from utils.training.optimizers import build_optimizer
    from utils.training.train_step import TrainStep

    bench, extra = ours.parse_cli(argv)
    if bench.steps < 1:
        raise UserError("--steps must be >= 1")
    args = ours.train_args(bench, extra)
    if args.cuda is not False and bench.device != "cpu":
        raise UserError("the comparison runs on the CPU: pass --no_cuda after `--`")
    if bench.precision != "fp32" or bench.data or args.varlen or args.tensor_parallel > 1 or args.swap_mem:
        raise UserError("the comparison runs float32 (or --float64) steps on synthetic data, one process: drop "
                        "--precision, --data, --varlen, --tp and --swap_mem")
    if args.optim not in ("jitlamb", "lamb") or args.dataset not in ours.VOCAB_SIZES:
        raise UserError(f"the comparison runs --optim jitlamb or lamb on a synthetic vocabulary, not --optim "
                        f"{args.optim} --dataset {args.dataset}")
    device = torch.device("cpu")
    args = resolve_speed_flags(args, device)
    n_token = ours.VOCAB_SIZES[args.dataset]
    model_config = build_model_config(args, n_token)
    dtype = torch.float64 if float64 else torch.float32

    # ours first only to learn the learning rate our optimizer starts from (--lr after any batch scaling)
    probe = MemTransformerLM(**model_config)
    lr = build_optimizer(args, probe).param_groups[0]["lr"]
    del probe

    stream = ours.synthetic_stream(n_token, (bench.steps + 2) * args.tgt_len * args.batch_size + args.ext_len,
                                   bench.zipf, args.seed)
    with tempfile.TemporaryDirectory(prefix="reference_compare_") as tmp:
        tmp = Path(tmp)
        spec = {"reference": str(reference), "model_config": model_config, "batch_size": args.batch_size,
                "batch_chunk": args.batch_chunk, "tgt_len": args.tgt_len, "ext_len": args.ext_len,
                "optim": args.optim, "lr": lr, "weight_decay": args.weight_decay, "clip": args.clip,
                "seed": args.seed, "init_std": args.init_std, "proj_init_std": args.proj_init_std,
                "steps": bench.steps, "float64": bool(float64), "stream": str(tmp / "stream.pt"),
                "profiling_executor_off": True, "init_state": str(tmp / "init.pt"),
                "final_state": str(tmp / "final.pt"), "moments": str(tmp / "moments.pt")}
        torch.save(stream, spec["stream"])
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child"], input=json.dumps(spec),
                               text=True, cwd=reference, env=env, stdout=subprocess.PIPE)
        if child.returncode != 0:
            return child.returncode
        theirs = json.loads(child.stdout.strip().splitlines()[-1])
        ref_init = torch.load(spec["init_state"], weights_only=True)
        ref_final = torch.load(spec["final_state"], weights_only=True)
        ref_moments = torch.load(spec["moments"], weights_only=True)

    model = MemTransformerLM(**model_config)
    model.load_state_dict(reference_state_dict_to_ours(ref_init, model_config))
    model.to(dtype)
    model.set_attn_impl(args.attn_impl)
    model.train()
    optimizer = build_optimizer(args, model)
    step = TrainStep(model, compile_model(model, args), optimizer, grad_scaler(args, device),
                     amp_context(args, device), args.clip, args.batch_chunk, False, False)
    it = data_utils.LMOrderedIterator(stream, args.batch_size, args.tgt_len, device=device, ext_len=args.ext_len)
    mems = [None] * args.batch_chunk
    losses, norms = [], []
    torch.manual_seed(args.seed + 1)                       # as the reference's side, right before step 1
    for i, (data, target, _, _) in enumerate(it):
        if i == bench.steps:
            break
        loss, norm = step(data, target, mems)
        losses.append(loss)
        norms.append(norm)

    def rel(a, b):
        return abs(a - b) / max(abs(a), abs(b), 1e-30)

    print(f"ours ({'compiled' if args.compile else 'eager'}, attn {args.attn_impl}) against the reference trainer "
          f"({reference}), {bench.steps} steps, {'float64' if float64 else 'float32'}, batch {args.batch_size} x "
          f"tgt_len {args.tgt_len}, {model_config['n_layer']} layers, d_model {model_config['d_model']}, "
          f"{n_token} tokens, dropout {model_config['dropout']}, lr {lr:g} (constant), optimizer {args.optim}")
    print("step |            loss (ours) |       loss (reference) | rel. diff | grad norm rel. diff")
    loss_worst = norm_worst = 0.0
    for i, (a, b, na, nb) in enumerate(zip(losses, theirs["losses"], norms, theirs["grad_norms"])):
        loss_worst, norm_worst = max(loss_worst, rel(a, b)), max(norm_worst, rel(na, nb))
        print(f"{i + 1:4d} | {a:22.15f} | {b:22.15f} | {rel(a, b):9.2e} | {rel(na, nb):9.2e}")
    def largest_difference(theirs_by_name, ours_by_name):
        worst, at = 0.0, None
        for name, value in theirs_by_name.items():
            ours_value = ours_by_name[name].to(value.dtype)
            scale = max(float(value.abs().max()), float(ours_value.abs().max()), 1e-30)
            diff = float((ours_value - value).abs().max()) / scale
            if diff > worst:
                worst, at = diff, name
        return worst, at

    param_worst, where = largest_difference(reference_state_dict_to_ours(ref_final, model_config),
                                            model.state_dict())
    # the LAMB moments, by parameter name (a parameter that never had a gradient: a fresh state's zeros)
    names = {id(p): n for n, p in model.named_parameters()}
    for key in ("exp_avg", "exp_avg_sq"):
        ours_moments = {names[id(p)]: optimizer.state[p][key] if key in optimizer.state.get(p, {})
                        else torch.zeros_like(p) for p in model.parameters()}
        worst, at = largest_difference(reference_state_dict_to_ours(ref_moments[key], model_config), ours_moments)
        if worst > param_worst:
            param_worst, where = worst, f"{at} ({key})"
    loss_rtol = max(rtol, 2.5e-7)
    print(f"largest relative differences: losses {loss_worst:.2e} (tolerance {loss_rtol:g}), gradient norms "
          f"{norm_worst:.2e} ({rtol:g}), parameters and LAMB moments after step {bench.steps} {param_worst:.2e} "
          f"of the tensor's largest magnitude, in {where} ({param_rtol:g})")
    ok = loss_worst <= loss_rtol and norm_worst <= rtol and param_worst <= param_rtol
    print("agree" if ok else "DIFFER")
    return 0 if ok else 1


def child() -> int:
    spec = json.loads(sys.stdin.read())
    try:
        torch, model, optimizer, it = bench_ref.load_reference(spec)
    except Exception as e:  # another version of the reference, or a broken checkout: one line
        print(f"error: --reference {spec['reference']}: its model or optimizer does not load here "
              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
        return 2
    if spec["float64"]:
        model.double()
        # the optimizer holds the same parameter objects (.double() converts in place): nothing to rebuild
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, spec["init_state"])
    chunks = spec["batch_chunk"]
    mems = [None] * chunks
    losses, norms = [], []
    torch.manual_seed(spec["seed"] + 1)                    # as our side, right before step 1
    for i, batch in enumerate(it.get_fixlen_iter()):
        if i == spec["steps"]:
            break
        data, target = batch[0], batch[1]
        # the step benchmark_reference_train.py times, the learning rate held constant
        train_loss, norm = bench_ref.reference_step(torch, model, optimizer, data, target, mems, spec["clip"])
        losses.append(train_loss)
        norms.append(norm)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, spec["final_state"])
    # its optimizer's moments under the parameters' names (zeros where a parameter never had a gradient)
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        moments[key] = {n: (optimizer.state[p][key] if key in optimizer.state.get(p, {})
                            else torch.zeros_like(p)).detach().clone() for n, p in model.named_parameters()}
    torch.save(moments, spec["moments"])
    print(json.dumps({"losses": losses, "grad_norms": norms}))
    return 0


if __name__ == "__main__":
    bench_ref.run_script(parent, child)
