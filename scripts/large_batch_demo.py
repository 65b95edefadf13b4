"""Plot and tabulate scripts/large_batch_demo.sh's runs: validation perplexity against training tokens.

    python scripts/large_batch_demo.py OUT_DIR RUN [RUN ...]     -> OUT_DIR/large_batch_demo.png, a table
"""
import json
import math
import sys
from pathlib import Path


def curve(work_dir: Path, tokens_per_step: int) -> list[tuple[int, float]]:
    """(training tokens, validation perplexity) at each validation of a run (nominal tokens: steps x batch x
    tgt_len, what --max_tokens counts)."""
    records = [json.loads(line) for line in (work_dir / "train_log.json").read_text().splitlines() if line.strip()]
    return [(r["step"] * tokens_per_step, math.exp(r["valid_loss"])) for r in records
            if isinstance(r["step"], int) and "valid_loss" in r]


def main(out: Path, runs: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    print("| run | global batch | lr scaling | effective lr | steps | tokens | final valid ppl |")
    print("|---|---|---|---|---|---|---|")
    for name in runs:
        config = json.loads((out / name / "train_log.json").read_text().splitlines()[0])
        batch, rule = config["batch_size"], config["lr_scaling"]
        points = curve(out / name, batch * config["tgt_len"])
        ax.plot([t for t, _ in points], [p for _, p in points], marker="o", label=name)
        factor = {"none": 1.0, "linear": batch / 16, "sqrt": math.sqrt(batch / 16)}[rule]
        print(f"| {name} | {batch} | {rule} | {config['lr'] * factor:g} | {config['max_step']} | {points[-1][0]} "
              f"| {points[-1][1]:.2f} |")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title("cpu_small demo: the same tokens at batch 16 and 64")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "large_batch_demo.png", dpi=100)
    print(f"wrote {out / 'large_batch_demo.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
