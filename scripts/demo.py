#!/usr/bin/env python
"""The demo: does the memory help? Train the same small model twice on the built-in corpus, once with
memory (mem_len > 0) and once without (mem_len 0), evaluate both on the same test text, print both
perplexities.

    python scripts/demo.py                  # a few minutes on a CPU
    python scripts/demo.py --max_step 100   # any further flag goes to both train.py runs

Steps, each printed before it runs so that it can be repeated by hand:
1. `python -m utils.data.demo_corpus data/demo` (synthetic text with long-range structure; no download),
2. `train.py --config_file configs/cpu_small.yaml --config demo` with the preset's mem_len, then with --mem_len 0,
3. `eval.py` on the test split of each, with the preset's segment length; the model trained with memory
   is evaluated with its memory, the model trained without memory without memory (--mem_len 0).
Everything else (data, segments, scored tokens, batch) is the same for both evaluations.
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from utils.config.presets import load_preset  # noqa: E402

PRESET_FILE = "configs/cpu_small.yaml"
PRESET = "demo"


def run(cmd: list[str], env: dict) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    result = subprocess.run(cmd, cwd=REPO, env=env)
    if result.returncode != 0:
        sys.exit(f"demo: the command above failed with exit code {result.returncode}")


def test_loss(work_dir: Path) -> float:
    """The eval loss of the last eval.py run in work_dir (its JSON-lines log, SUMMARY record)."""
    records = [json.loads(line) for line in (work_dir / "eval_log.json").read_text().splitlines() if line.strip()]
    summaries = [r for r in records if r.get("step") == "SUMMARY" and r.get("split") == "test"]
    if not summaries:
        sys.exit(f"demo: no test result in {work_dir / 'eval_log.json'}")
    return summaries[-1]["eval_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Unknown flags are passed to both train.py runs.")
    parser.add_argument("--data", default="data/demo", help="corpus folder (written when absent)")
    parser.add_argument("--work_dir", default="LM-TFM/demo", help="the two runs go to with_memory/ and no_memory/")
    args, train_flags = parser.parse_known_args()

    # One thread per process: the tiny model is too small for more, and OpenMP threads that wait for a
    # busy core slow a shared CPU down many times over. A value set by the user is kept.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    python = sys.executable
    data = Path(args.data)
    work = Path(args.work_dir)
    train_preset = load_preset(REPO / PRESET_FILE, PRESET, "train")
    eval_preset = load_preset(REPO / PRESET_FILE, PRESET, "eval")
    start = time.time()

    if not all((REPO / data / f"{split}.txt").is_file() for split in ("train", "valid", "test")):
        run([python, "-m", "utils.data.demo_corpus", str(data)], env)

    common = ["--config_file", PRESET_FILE, "--config", PRESET, "--data", str(data)]
    runs = {"with memory": (work / "with_memory", []), "without memory": (work / "no_memory", ["--mem_len", "0"])}
    for work_dir, mem_flags in runs.values():
        run([python, "train.py", *common, "--work_dir", str(work_dir), *train_flags, *mem_flags], env)
    for work_dir, mem_flags in runs.values():
        run([python, "eval.py", *common, "--work_dir", str(work_dir), "--model", str(work_dir / "checkpoint_best.pt"),
             "--split", "test", *mem_flags], env)

    tgt_len, mem_len = eval_preset["tgt_len"], eval_preset["mem_len"]
    ppl = {name: math.exp(test_loss(REPO / work_dir)) for name, (work_dir, _) in runs.items()}
    change = 100 * (ppl["with memory"] / ppl["without memory"] - 1)
    print("\n" + "=" * 100)
    print(f"Demo ({time.time() - start:.0f} s): one model ({train_preset['n_layer']} layers, d_model "
          f"{train_preset['d_model']}) trained twice with the same data, seed and steps, with and without memory.")
    print(f"Evaluation: the test split of {data}, segments of {tgt_len} tokens, batch {eval_preset['batch_size']}, "
          "every token scored once;")
    print(f"each model uses the memory it was trained with (mem_len {mem_len} and mem_len 0).")
    print(f"  with memory    (mem_len {mem_len:>3}):  test ppl {ppl['with memory']:8.2f}")
    print(f"  without memory (mem_len   0):  test ppl {ppl['without memory']:8.2f}")
    print(f"With memory the test perplexity is {abs(change):.1f}% {'lower' if change <= 0 else 'higher'}.")
    print("=" * 100)

if __name__ == "__main__":
    main()
