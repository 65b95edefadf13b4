"""Adaptive clusters that a batch does not touch keep their parameters and optimizer state, as in the reference.

With div_val > 1 each tail cluster has its own embedding table, projection and output bias. The reference
embeds and scores a tail cluster only for the tokens in it: a cluster absent from a batch's inputs and
targets leaves its parameters without a gradient, and the optimizer skips them (no update, no decay of the
moments). Our model has static shapes (no data-dependent sizes: one compiled graph, issue 18), so every
cluster takes part in every step and those parameters get exact-zero gradients, and LAMB or Adam would still
move them by their moments. `UnusedClusterGuard` restores the reference's rule on the device, with no
read-back: per step, which clusters the batch's inputs and targets touch; after the optimizer step, for the
parameters of an untouched cluster, the values and the moment tensors from before the step
(`torch.where`). Found by scripts/compare_reference_train.py (div_val 4, float64: the first step without a
cluster-3 token moved that cluster's table away from the reference's).

Which use counts (the reference's AdaptiveEmbedding and ProjectedAdaptiveLogSoftmax): cluster i >= 1's
embedding table and its projection are used when an input token is in cluster i, or when a target is and the
output layer shares them (tie_weight, tie_projs[i]); its output bias, untied output table and untied
projection when a target is. The head (cluster 0) and the cluster logits are used by every target.

Under DDP a cluster counts as used when any rank's batch uses it (the reference's DDP averages the gradients
of parameters used on some rank, and leaves those unused on every rank without one): the flags are
all-reduced (one small collective per step, only for div_val > 1). Not applied to FSDP or tensor-parallel
parameters (DTensors), nor to optimizer step counters (LAMB's is not read by its math).
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn


class UnusedClusterGuard:
    def __init__(self, model: nn.Module):
        # (parameter, cluster, used by the cluster's input tokens, used by its targets) per tail-cluster parameter
        self.entries: List[Tuple[nn.Parameter, int, bool, bool]] = []
        self.bounds: List[int] = []
        self._saved: Optional[list] = None
        self._bounds: Dict[torch.device, Tensor] = {}
        emb, crit = getattr(model, "word_emb", None), getattr(model, "crit", None)
        if emb is None or crit is None or getattr(emb, "div_val", 1) == 1 or len(emb.bounds) <= 2:
            return
        if any(hasattr(p, "device_mesh") for p in model.parameters()):
            return
        self.bounds = list(emb.bounds)
        for i in range(1, len(self.bounds) - 1):
            self.entries.append((emb.emb_layers[i].weight, i, True, bool(crit.tie_weight)))
            if len(emb.emb_projs) > i:
                self.entries.append((emb.emb_projs[i], i, True, bool(crit.has_proj and crit.tie_projs[i])))
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

    def snapshot(self, optimizer: torch.optim.Optimizer) -> None:
        """Before the optimizer step: the values and moment tensors of the guarded parameters."""
        saved = []
        for p, _, _, _ in self.entries:
            state = optimizer.state.get(p, {})
            moments = {k: v.detach().clone() for k, v in state.items()
                       if isinstance(v, Tensor) and v.shape == p.shape}
            saved.append((p.detach().clone(), moments))
        self._saved = saved

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer, used: Tensor) -> None:
        """After the optimizer step: parameters of untouched clusters back to their values from before it (a
        moment tensor the step created, with no value before, back to zeros: a fresh state's)."""
        if self._saved is None:
            return
        for (p, cluster, by_input, by_target), (old, moments) in zip(self.entries, self._saved):
            flag = (used[cluster, 0] & by_input) | (used[cluster, 1] & by_target)
            flag = flag.to(p.device)
            p.copy_(torch.where(flag, p, old))
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.shape == p.shape:
                    before = moments.get(k)
                    v.copy_(torch.where(flag, v, before if before is not None else torch.zeros_like(v)))
        self._saved = None
