"""Learning curves of one or more runs, read from their JSON-lines metrics (work_dir/train_log.json), drawn
into one PNG: training loss and validation perplexity (bits per character for character-level corpora)
against steps and against tokens, the learning rate and the throughput; one line per run, named.

    runs = [load_run("runs/a"), load_run("runs/b")]
    plot_runs(runs, "curves.png")

scripts/plot_runs.py is the command line; train.py --plot redraws work_dir/curves.png at each evaluation.
Uses matplotlib's Agg canvas directly (no pyplot, no display, the process's backend untouched); the file is
written atomically, so a viewer never sees half a PNG.
"""
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from utils.io.atomic import write_bytes_atomic
from utils.io.errors import UserError

METRICS_FILE = "train_log.json"


@dataclass
class Run:
    name: str
    train: dict = field(default_factory=dict)     # step -> {"loss", "lr", "throughput", "tokens"}
    valid: dict = field(default_factory=dict)     # step -> {"loss", "ppl" or "bpc"}
    tokens_per_step: float | None = None          # batch_size x tgt_len, for steps without a token count
    bpc: bool = False

    def tokens_at(self, step: int) -> float | None:
        record = self.train.get(step)
        if record and record.get("tokens") is not None:
            return record["tokens"]
        return step * self.tokens_per_step if self.tokens_per_step else None


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def load_run(path: str | Path, name: str | None = None) -> Run:
    """The curves of the run in `path` (a work dir, or its metrics file). A resumed run's records of a step
    replace the earlier ones of the same step."""
    path = Path(path)
    file = path / METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no {METRICS_FILE} (the JSON log train.py writes into its work dir); pass a work "
                        "directory of train.py")
    run = Run(name or (path.name if path.is_dir() else path.parent.name))
    for number, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue                               # a line cut by a crash: the rest still plots
        if not isinstance(record, dict):
            continue
        step = record.get("step")
        if step == "PARAMETER":
            batch, tgt = _number(record.get("batch_size")), _number(record.get("tgt_len"))
            run.tokens_per_step = batch * tgt if batch and tgt else None
        elif isinstance(step, int) and "train_loss" in record:
            run.train[step] = {"loss": _number(record.get("train_loss")), "lr": _number(record.get("lr")),
                               "throughput": _number(record.get("train_throughput")),
                               "tokens": _number(record.get("tokens"))}
        elif isinstance(step, int) and "valid_loss" in record:
            if "valid_bits_per_character" in record:
                run.bpc = True
                run.valid[step] = {"value": _number(record["valid_bits_per_character"])}
            else:
                run.valid[step] = {"value": _number(record.get("valid_perplexity"))}
    return run


def _series(points: dict, key: str, x_of) -> tuple[list, list]:
    xs, ys = [], []
    for step in sorted(points):
        x, y = x_of(step), points[step].get(key)
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def render_png(runs: list[Run], title: str | None = None) -> bytes:
    """The PNG of the curves of `runs`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs:
        raise UserError("no run to plot; pass one or more work directories")
    if all(r.bpc for r in runs):
        valid_label = "validation bpc"
    else:
        valid_label = "validation perplexity / bpc" if any(r.bpc for r in runs) else "validation perplexity"
    figure = Figure(figsize=(15, 8.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3)
    panels = [  # (axes, points, key, x: "step" or "tokens", y label, log scale)
        (axes[0][0], "train", "loss", "step", "training loss", False),
        (axes[0][1], "valid", "value", "step", valid_label, True),
        (axes[0][2], "train", "lr", "step", "learning rate", False),
        (axes[1][0], "train", "loss", "tokens", "training loss", False),
        (axes[1][1], "valid", "value", "tokens", valid_label, True),
        (axes[1][2], "train", "throughput", "step", "throughput (tokens/s)", False),
    ]
    for ax, which, key, x_kind, label, log in panels:
        drawn = False
        for run in runs:
            x_of = (lambda s: s) if x_kind == "step" else run.tokens_at
            xs, ys = _series(getattr(run, which), key, x_of)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=run.name)
                drawn = True
        ax.set_xlabel("step" if x_kind == "step" else "tokens")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs {'steps' if x_kind == 'step' else 'tokens'}")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
            values = [y for line in ax.get_lines() for y in line.get_ydata()]
            if log and min(values) > 0 and max(values) > 3 * min(values):   # perplexity falls over decades
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    if title:
        figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def plot_runs(runs: list[Run], output: str | Path, title: str | None = None) -> Path:
    """Draw `runs` into the PNG `output` (written atomically)."""
    output = Path(output)
    data = render_png(runs, title)
    if output.parent != Path(""):
        output.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(output, data)
    return output


def unique_names(paths: list[Path]) -> list[str]:
    """A name per run: the folder's name, or its path where two folders share a name."""
    names = [p.name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def redraw_curves(work_dir: Path, metrics_file: str, log, name: str = "curves.png") -> None:
    """train.py --plot: work_dir/curves.png from the run's metrics so far. A plot that fails (e.g. no
    matplotlib) is one warning line: it never stops a training run."""
    try:
        plot_runs([load_run(Path(work_dir) / metrics_file, Path(work_dir).name)], Path(work_dir) / name)
    except (ImportError, OSError, UserError, ValueError) as exc:
        log.warning(f"--plot: could not draw {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
