"""Adaptive clusters that a batch does not touch keep their parameters and optimizer state, as in the reference.

With div_val > 1 each cluster has its own embedding table and projection, and each tail cluster its own output
bias. The reference embeds and scores a cluster only for the tokens in it: a cluster absent from a batch's
inputs (and, for the output side, its targets) leaves those parameters without a gradient (its train.py sets
every gradient to None before a step, reference-inventory.md §3.2), and the optimizer skips them: no update,
no decay of the moments, no step count. Our model has static shapes (no data-dependent sizes: one compiled
graph, issue 18), so every cluster takes part in every step and those parameters get exact-zero gradients;
LAMB or Adam would still move them by their moments. `UnusedClusterGuard` restores the reference's rule on
the device, with no read-back: per step, which clusters the batch's inputs and targets touch; after the
optimizer step, for the parameters of an untouched cluster, the values and the optimizer's tensors (moments,
Adam's step count) from before the step (`torch.where`; kept in buffers between steps). Found by
scripts/compare_reference_train.py (div_val 4, float64: the first step without a cluster-3 token moved that
cluster's table away from the reference's).

Which use counts (the reference's AdaptiveEmbedding and ProjectedAdaptiveLogSoftmax): cluster i's embedding
table and projection are used when an input token is in cluster i, or when the output layer shares them
(tie_weight, tie_projs[i]) and a target is in cluster i; for the head (i = 0), which every target uses, the
shared ones always are. A tail cluster's output bias, untied output table and untied projection are used when
a target is in it; the head's output parameters and the cluster logits always are.

Under DDP a cluster counts as used when any rank's batch uses it (the reference's DDP averages the gradients
of parameters used on some rank, and leaves those unused on every rank without one): the flags are
all-reduced (one small collective per step, only for div_val > 1). Not applied to FSDP or tensor-parallel
parameters (DTensors), nor to counters kept as Python numbers (LAMB's step, which its math does not read).
"""
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn


class UnusedClusterGuard:
    def __init__(self, model: nn.Module):
        # (parameter, cluster, used by the cluster's input tokens, used by its targets) per guarded parameter
        self.entries: List[Tuple[nn.Parameter, int, bool, bool]] = []
        self.bounds: List[int] = []
        self._saved = False
        self._bounds: Dict[torch.device, Tensor] = {}
        # per parameter: its value before the step, and its optimizer-state tensors' (kept between steps)
        self._buffers: Dict[nn.Parameter, Tuple[Tensor, Dict[str, Tensor]]] = {}
        self._had_state: Dict[nn.Parameter, bool] = {}
        emb, crit = getattr(model, "word_emb", None), getattr(model, "crit", None)
        if emb is None or crit is None or getattr(emb, "div_val", 1) == 1 or len(emb.bounds) <= 2:
            return
        if any(hasattr(p, "device_mesh") for p in model.parameters()):
            return
        self.bounds = list(emb.bounds)
        tied_proj = [bool(crit.has_proj and crit.tie_projs[i]) for i in range(len(self.bounds) - 1)]
        # the head (cluster 0) serves every target: only its embedding-side parameters that the output layer
        # does not share can go unused (no input token in the shortlist)
        if not crit.tie_weight:
            self.entries.append((emb.emb_layers[0].weight, 0, True, False))
        if len(emb.emb_projs) > 0 and not tied_proj[0]:
            self.entries.append((emb.emb_projs[0], 0, True, False))
        for i in range(1, len(self.bounds) - 1):
            self.entries.append((emb.emb_layers[i].weight, i, True, bool(crit.tie_weight)))
            if len(emb.emb_projs) > i:
                self.entries.append((emb.emb_projs[i], i, True, tied_proj[i]))
            if not crit.tie_weight:
                self.entries.append((crit.out_layers_weights[i], i, False, True))
            self.entries.append((crit.out_layers_biases[i], i, False, True))
            if crit.own_proj_index[i] >= 0:
                self.entries.append((crit.out_projs[crit.own_proj_index[i]], i, False, True))

    @property
    def active(self) -> bool:
        return bool(self.entries)

    def usage(self, data: Tensor, target: Tensor) -> Tensor:
        """[n_clusters + 1, 2] bool on the device: cluster touched by an input token / by a target."""
        bounds = self._bounds.get(data.device)
        if bounds is None:                           # once per device (no host-to-device copy per step)
            bounds = self._bounds[data.device] = torch.tensor(self.bounds, device=data.device)
        rows = []
        for ids in (data, target):
            flat = ids.reshape(-1, 1)
            rows.append(((flat >= bounds[:-1]) & (flat < bounds[1:])).any(0))   # [n_clusters + 1]
        used = torch.stack(rows, 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            as_int = used.to(torch.int32)
            torch.distributed.all_reduce(as_int, op=torch.distributed.ReduceOp.MAX)
            used = as_int.bool()
        return used

    @staticmethod
    def _state_tensors(optimizer: torch.optim.Optimizer, p: Tensor) -> Dict[str, Tensor]:
        """The optimizer's per-parameter tensors: moments (p's shape) and counters (0-dim: Adam's step)."""
        return {k: v for k, v in optimizer.state.get(p, {}).items()
                if isinstance(v, Tensor) and (v.shape == p.shape or v.dim() == 0)}

    @torch.no_grad()
    def snapshot(self, optimizer: torch.optim.Optimizer) -> None:
        """Before the optimizer step: the values and optimizer-state tensors of the guarded parameters."""
        for p, _, _, _ in self.entries:
            state = self._state_tensors(optimizer, p)
            value, saved = self._buffers.get(p, (None, {}))
            if value is None:
                value = torch.empty_like(p)
            value.copy_(p)
            for k, v in state.items():
                if k not in saved or saved[k].shape != v.shape or saved[k].device != v.device \
                        or saved[k].dtype != v.dtype:
                    saved[k] = torch.empty_like(v)
                saved[k].copy_(v)
            self._buffers[p] = (value, saved)
            self._had_state[p] = bool(state)
        self._saved = True

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer, used: Tensor) -> None:
        """After the optimizer step: parameters of untouched clusters back to their values from before it (state
        the step created, with nothing before, back to zeros: a fresh state's moments and step count)."""
        if not self._saved:
            return
        self._saved = False
        for p, cluster, by_input, by_target in self.entries:
            flag = (used[cluster, 0] & by_input) | (used[cluster, 1] & by_target)
            value, saved = self._buffers[p]
            p.copy_(torch.where(flag.to(p.device), p, value))
            for k, v in self._state_tensors(optimizer, p).items():
                before = saved.get(k) if self._had_state[p] else None
                v.copy_(torch.where(flag.to(v.device), v, before if before is not None else torch.zeros_like(v)))
