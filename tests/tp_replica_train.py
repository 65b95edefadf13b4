"""train.py that checks, after every training step, that the replicated parameters (embeddings, softmax,
LayerNorms: plain tensors under --tensor_parallel) are bit for bit the same on every rank, for
tests/test_tensor_parallel.py. With dropout they stay so only if the ranks of a tensor-parallel group draw the
same dropout masks for their replicated activations."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch.distributed.tensor import DTensor  # noqa: E402

import train  # noqa: E402
from utils.distributed import group as distributed  # noqa: E402
from utils.io.errors import run_cli  # noqa: E402
from utils.training import loop  # noqa: E402

_train_step = loop.Trainer._train_step


def _checked_train_step(self, data, target):
    out = _train_step(self, data, target)
    replicated = {n: p.detach().double().sum().item() for n, p in self.model.named_parameters()
                  if not isinstance(p, DTensor)}
    everyone = distributed.gather_objects(replicated)
    if everyone is not None and any(other != everyone[0] for other in everyone[1:]):
        differ = sorted(n for n in everyone[0] if any(o[n] != everyone[0][n] for o in everyone[1:]))
        raise RuntimeError(f"step {self.state.train_step}: replicated parameters differ across ranks: {differ[:5]}")
    if everyone is not None:
        print(f"step {self.state.train_step}: {len(replicated)} replicated parameters equal on all ranks", flush=True)
    return out


loop.Trainer._train_step = _checked_train_step

if __name__ == "__main__":
    run_cli(train.main)
