"""LAMB, the optimizer of the reference's recipes (`--optim lamb` / `--optim jitlamb`).

The implementation and its math are in utils/training/lamb.py; this file keeps the reference's layout, where
`lamb.py` sits beside train.py.
"""
from utils.training.lamb import Lamb

__all__ = ["Lamb"]
