"""Run train.py and eval.py as separate processes for the CLI tests, and tiny corpora for them.

Every run is its own process, with its own exit code, stdout, stderr and signals, as on a command line.
Starting Python and importing torch costs seconds on the shared 2-core CI machine, so the processes are
forked from a multiprocessing "forkserver" that imported torch and the project once (and never ran a torch
operation, so no thread pool is inherited). The child sets `sys.argv`, runs the script as `__main__` (the
same `run_cli(main)` a shell would run) and exits with its exit code; its stdout and stderr go to files.

A run can be given a `hook`: a function of this module called in the child before the script starts. The
hooks below monkeypatch library code *in that child only* to make an event happen at an exact point
(a signal after a given step, a kill in the middle of writing a checkpoint), so the tests of preemption and
crashes are deterministic instead of timing-dependent.
"""
import io
import multiprocessing
import os
import re
import runpy
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "train.py")
EVAL = str(REPO / "eval.py")

# torch._dynamo: the first optimizer built imports it (seconds)
_PRELOAD = ["torch", "torch._dynamo", "numpy", "yaml", "sacremoses", "torch.utils.tensorboard", "data_utils",
            "mem_transformer", "lamb", "utils.io.checkpoint", "utils.config.cli", "utils.distributed.group", "utils.training.evaluation",
            "utils.training.metrics", "utils.model.init", "utils.training.optimizers", "utils.training.lr_scheduler", "utils.model.reference_compat",
            "utils.data.vocabulary", "utils.training.preemption", "utils.runtime.device", "utils.training.loop"]
# launcher variables a test process may have inherited: a CLI run here is always a single process
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_ERROR_FILE",
                  "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


def _child(script: str, argv: list[str], cwd: str, out: str, err: str, env: dict, hook, hook_args) -> None:
    for fd, path in ((1, out), (2, err)):
        file_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(file_fd, fd)
        os.close(file_fd)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    import torch
    torch.set_num_threads(1)  # two cores shared by everyone: one thread per run is fastest and steady
    sys.argv = [script, *argv]
    if hook is not None:
        hook(*hook_args)
    runpy.run_path(script, run_name="__main__")


def start(script: str, argv, tmp_path: Path, hook=None, hook_args=(), name: str = "run"):
    """Start `script argv` in a new process; returns (process, stdout path, stderr path).

    The environment is this process's, without launcher variables (one process, no process group) and
    without GPUs (CPU runs are bitwise reproducible, which the resume tests compare)."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env["CUDA_VISIBLE_DEVICES"] = ""
    process = _forkserver().Process(
        target=_child, args=(script, [str(a) for a in argv], str(REPO), str(out), str(err), env, hook, hook_args))
    process.start()
    return process, out, err


def run(script: str, argv, tmp_path: Path, hook=None, hook_args=(), timeout: float = 300,
        name: str = "run") -> Result:
    """Run `script argv` to the end (cwd: the repository root)."""
    process, out, err = start(script, argv, tmp_path, hook, hook_args, name)
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        raise TimeoutError(f"{Path(script).name} {' '.join(map(str, argv))} ran longer than {timeout} s")
    return Result(process.exitcode, out.read_text(), err.read_text())


def train(argv, tmp_path: Path, **kwargs) -> Result:
    return run(TRAIN, argv, tmp_path, **kwargs)


def evaluate(argv, tmp_path: Path, **kwargs) -> Result:
    return run(EVAL, argv, tmp_path, **kwargs)


def train_whole_and_resumed(data: Path, tmp_path: Path, steps: int, **flags) -> tuple[Path, Path]:
    """tiny_args training on `data` for `steps` steps in one run (tmp_path/whole), and stopped at steps // 2
    then resumed with --restart (tmp_path/split); every run must succeed. Returns the two work dirs."""
    def args(work, max_step, **more):
        return tiny_args(data, work, max_step=max_step, **flags, **more)
    whole, split = tmp_path / "whole", tmp_path / "split"
    for name, argv in (("whole", args(whole, steps)), ("first", args(split, steps // 2)),
                       ("second", args(split, steps, restart=split))):
        result = train(argv, tmp_path, name=name)
        assert result.returncode == 0, result.stderr
    return whole, split


# ----------------------------------------------------------------------------------------------------------
# tiny corpora and models


def demo_corpus(path: Path, train_docs: int = 4, eval_docs: int = 2) -> Path:
    """The synthetic demo corpus, small: with the default sizes ~1.3k training words (an epoch of 12
    batches of 16 x 8), ~700 words per evaluation split."""
    from utils.data.demo_corpus import write_demo_corpus
    return write_demo_corpus(path, n_train_docs=train_docs, n_eval_docs=eval_docs)


def tiny_args(data: Path, work_dir: Path, **overrides) -> list[str]:
    """train.py flags of a 2-layer model with 8-token segments on `data` (dataset custom)."""
    flags = dict(data=data, dataset="custom", work_dir=work_dir, n_layer=2, d_model=32, n_head=2, d_head=16,
                 d_inner=64, dropout=0.1, tgt_len=8, mem_len=8, eval_tgt_len=8, batch_size=16, eval_batch_size=4,
                 optim="lamb", lr=0.01, warmup_step=5, max_step=20, eval_interval=10, log_interval=5,
                 eval_max_steps=4)
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None and value is not False:
            argv += [f"--{key}", str(value)]
    return argv


# ----------------------------------------------------------------------------------------------------------
# hooks (run in the child before the script)


def signal_after_step(step: int, name: str = "SIGTERM") -> None:
    """Deliver signal `name` to this process right after optimizer step `step` (as a cluster scheduler would;
    the training loop reads the scheduler's LR right after each step)."""
    from utils.training.lr_scheduler import LRScheduler
    original = LRScheduler.step

    def step_then_signal(self, train_step):
        lr = original(self, train_step)
        if train_step == step:
            signal.raise_signal(getattr(signal, name))
        return lr
    LRScheduler.step = step_then_signal


def sigkill_while_saving(save_number: int) -> None:
    """On the `save_number`-th checkpoint write, write half of the bytes, flush them, and die by SIGKILL."""
    import torch
    from utils.io import checkpoint
    original = torch.save
    calls = [0]

    def save_then_die(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] < save_number:
            return original(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.torch.save = save_then_die


# ----------------------------------------------------------------------------------------------------------
# the reference's log-line formats (spec §3.4, §3.5, §3.8, §6.1), as its code wrote them

REFERENCE_FORMATS = {
    "train": "| epoch {:3d} step {:>8d} | batches {:>6d} / {:d} | lr {:.3e} | ms/batch {:5.1f} | tok/s {:7.0f} "
             "| loss {:5.2f} | ppl {:9.2f}",
    "train_bpc": "| epoch {:3d} step {:>8d} | batches {:>6d} / {:d} | lr {:.3e} | ms/batch {:5.1f} "
                 "| tok/s {:7.0f} | loss {:5.2f} | bpc {:9.5f}",
    "eval": "| Eval {:3d} at step {:>8d} | time: {:5.2f}s | valid loss {:5.2f} | valid ppl {:9.3f}",
    "eval_bpc": "| Eval {:3d} at step {:>8d} | time: {:5.2f}s | valid loss {:5.2f} | bpc {:9.5f}",
    "test": "| End of training | test time: {:5.2f}s | test loss {:5.2f} | test ppl {:9.3f}",
    "test_bpc": "| End of training | test time: {:5.2f}s | test loss {:5.2f} | test bpc {:9.5f}",
    "training_time": "Training time: {:.2f} minutes",
    "training_throughput": "Training throughput: {:.2f} tok/s",
    "eval_progress": "| step {:>8d} | batches {:>6d} / {:d} | ms/batch {:5.2f} | tok/s {:7.0f} | loss {:5.2f} "
                     "| ppl {:5.2f}",
    "eval_time": "Time : {:.2f}s, {:.2f}ms/segment",
    "evaluating_with": "Evaluating with: math {} type {} bsz {:d} tgt_len {:d} ext_len {:d} mem_len {:d} "
                       "clamp_len {:d}",
    "throughput_avg": "Throughput Avg: {:.2f} tok/s",
    "latency_avg": "Latency Avg: {:.2f} ms",
    "latency_percentile": "Latency {}%: {:.2f} ms",
}
for _split in ("valid", "test", "all"):  # eval.py's result line (it ends with a space)
    REFERENCE_FORMATS[f"result_{_split}"] = f"| {_split} loss {{:5.2f}} | {_split} ppl {{:9.3f}} "


def _format_regex(fmt: str) -> re.Pattern:
    """A regex capturing each `{...}` field of a str.format string (literal text must match exactly)."""
    parts = re.split(r"(\{[^}]*\})", fmt)
    pattern = "".join(r"\s*(-?(?:\d+\.?\d*(?:e[+-]\d+)?|inf|nan))" if p.startswith("{:") and p[-2] in "def"
                      else r"(\S+)" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(pattern)


def parse_line(line: str, kind: str):
    """The values of `line` if it has the reference's format `kind`, re-formatted to the very same
    characters (so widths, precisions and separators all match); None if it does not."""
    fmt = REFERENCE_FORMATS[kind]
    if kind.startswith("train"):     # ours after the reference's fields: the run's elapsed time and the ETA
        line = re.sub(r" \| elapsed \d+:\d\d:\d\d \| eta (?:\d+:\d\d:\d\d|-)$", "", line)
    match = _format_regex(fmt).fullmatch(line)
    if match is None:
        return None
    specs = re.findall(r"\{([^}]*)\}", fmt)
    values = [int(v) if spec.endswith("d") else float(v) if spec[-1:] in ("e", "f") else v
              for v, spec in zip(match.groups(), specs)]
    return values if fmt.format(*values) == line else None
