"""bf16 compute copies of the weights for a bf16 autocast training step (master weights stay float32).

Under autocast every weight is cast to bf16 in the forward and its bf16 gradient cast back to float32 in the
backward: two casts per weight per step (16 layers x 9 tensors for the base model). Here the weights that
autocast would cast live, for the duration of the step, as bf16 tensors:

    before the forward   one multi-tensor copy float32 master -> bf16 compute copy (`torch._foreach_copy_`),
                         the same rounding autocast applies; the model's parameters are swapped for the copies
    forward, backward    matmuls find bf16 weights (no casts); gradients arrive in bf16 on the copies
    after each backward  one multi-tensor copy (first batch chunk) or add (the others) of the bf16 gradients
                         into float32 gradient buffers, set as the masters' .grad (chunks accumulate in float32)
    after the step       the master parameters are back in the model: clipping, the optimizer, checkpoints
                         and evaluation see float32 parameters only

Nothing is added to the training state (the copies are rebuilt from the masters every step), so checkpoints
and exact resume are unchanged. For the nn.Linear weights and biases the values are autocast's bit for bit
(same rounding, same bf16 gradients). The relative-position parameters that meet bf16 activations
(r_w_bias / r_r_bias; attention type 1's r_emb / r_bias) are also in bf16, so `q + r_w_bias` stays in bf16
instead of promoting to float32 (two activation casts per layer saved; their gradients are summed over the
layers in bf16: a bf16 rounding difference from autocast).

The output layer's parameters that its NLL casts whole (div_val 1: the table, its bias, the cluster rows;
ProjectedAdaptiveLogSoftmax.output_parameters) get bf16 copies in the same refresh, handed to the NLL through
`crit.compute_copies` instead of being swapped in: the tied table is also the embedding, whose lookup keeps
the float32 master, and their gradients stay float32 as before (the NLL computes them). Bit for bit the
values the NLL's own casts gave.

Applies to one process with the plain model (or torch.compile of it): DDP, FSDP and tensor parallelism hook
the parameters themselves (FSDP2 has its own bf16 parameter policy) and keep autocast's casts.
"""
import contextlib
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

# model-level parameters that are used with bf16 activations: attention types 0 and 1 (mem_transformer.py)
POSITION_PARAMETERS = {0: ("r_w_bias", "r_r_bias"), 1: ("r_w_bias", "r_emb", "r_bias")}


def compute_parameters(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    """(module, name) of each parameter that gets a compute copy: nn.Linear weights and biases, and the
    position parameters of POSITION_PARAMETERS."""
    slots = [(module, name) for module in model.modules() if isinstance(module, nn.Linear)
             for name, p in module._parameters.items() if p is not None]
    for name in POSITION_PARAMETERS.get(getattr(model, "attn_type", None), ()):
        if getattr(model, name, None) is not None:
            slots.append((model, name))
    return slots


def autocast_dtype(autocast: Callable[[], contextlib.AbstractContextManager]) -> Optional[torch.dtype]:
    """The dtype of the autocast contexts `autocast` makes, None when they are not autocast."""
    context = autocast()
    if isinstance(context, torch.autocast) and context._enabled:
        return context.fast_dtype
    return None


class ComputeWeights:
    """`with weights.swapped(first_chunk): forward; backward; weights.collect_grads()` (see the module doc)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model = model
        self.dtype = dtype
        self.slots: List[Tuple[nn.Module, str, int]] = []          # (module, name, index into masters)
        self.masters: List[nn.Parameter] = []
        self.copies: List[Tensor] = []
        self.grads: List[Optional[Tensor]] = []                     # float32 gradient buffers, kept across steps
        # the output layer's parameters that its NLL casts whole: copies refreshed with the others, not swapped in
        self.crit = getattr(model, "crit", None)
        self.output_masters: List[Tensor] = self._output_parameters()
        self.output_copies: List[Tensor] = [torch.empty_like(p, dtype=dtype) for p in self.output_masters]
        index = {}
        for module, name in compute_parameters(model):
            p = module._parameters[name]
            if id(p) not in index:
                index[id(p)] = len(self.masters)
                self.masters.append(p)
                self.copies.append(torch.empty_like(p, dtype=dtype).requires_grad_(p.requires_grad))
                self.grads.append(None)
            self.slots.append((module, name, index[id(p)]))

    @staticmethod
    def for_step(model: nn.Module, forward_model: nn.Module,
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> Optional["ComputeWeights"]:
        """Compute weights for a bf16 step of the plain model (or torch.compile of it) in one process; None
        where the step keeps autocast's casts (float32, fp16, DDP / FSDP / tensor-parallel parameters)."""
        if autocast_dtype(autocast) != torch.bfloat16:
            return None
        if forward_model is not model and getattr(forward_model, "_orig_mod", None) is not model:
            return None                                             # a DDP / FSDP wrapper hooks the parameters
        if any(hasattr(p, "full_tensor") or hasattr(p, "_local_tensor") for p in model.parameters()):
            return None                                             # DTensors (FSDP2, tensor parallelism)
        return ComputeWeights(model, torch.bfloat16)

    def _output_parameters(self) -> List[Tensor]:
        embedding = getattr(self.model, "word_emb", None)
        if not hasattr(self.crit, "output_parameters") or not hasattr(embedding, "weights") \
                or getattr(self.model, "sampler", None) is not None:     # the sampled softmax reads no copies
            return []
        return list(self.crit.output_parameters(embedding.weights()))

    def _current(self) -> bool:
        """The masters are still the model's parameters (nothing replaced them since construction)."""
        outputs = self._output_parameters()
        return all(module._parameters.get(name) is self.masters[i] for module, name, i in self.slots) \
            and len(outputs) == len(self.output_masters) and all(a is b for a, b in zip(outputs, self.output_masters))

    @contextlib.contextmanager
    def swapped(self, refresh: bool) -> Iterator[None]:
        """The model computes with the bf16 copies inside the block (forward and backward: activation
        checkpointing recomputes in the backward); refresh=True copies the masters first (once per step)."""
        if not self._current():
            self.__init__(self.model, self.dtype)                   # parameters replaced (e.g. model.to(...))
        if refresh:
            with torch.no_grad():
                torch._foreach_copy_(self.copies + self.output_copies, self.masters + self.output_masters)
        for module, name, i in self.slots:
            module._parameters[name] = self.copies[i]
        if self.output_copies:
            self.crit.compute_copies = self.output_copies
        try:
            yield
        finally:
            for module, name, i in self.slots:
                module._parameters[name] = self.masters[i]
            if self.output_copies:
                self.crit.compute_copies = None

    def collect_grads(self) -> None:
        """Move the copies' bf16 gradients into the masters' float32 .grad: a copy where the master has no
        gradient yet this step (after zero_grad(set_to_none=True)), an add where it has one (batch chunks)."""
        fresh: Tuple[List[Tensor], List[Tensor]] = ([], [])
        added: Tuple[List[Tensor], List[Tensor]] = ([], [])
        for i, (master, copy) in enumerate(zip(self.masters, self.copies)):
            if copy.grad is None:
                continue
            if master.grad is None:
                if self.grads[i] is None:
                    self.grads[i] = torch.empty_like(master)
                fresh[0].append(self.grads[i])
                fresh[1].append(copy.grad)
                master.grad = self.grads[i]
            else:
                added[0].append(master.grad)
                added[1].append(copy.grad)
            copy.grad = None
        if fresh[0]:
            torch._foreach_copy_(*fresh)
        if added[0]:
            torch._foreach_add_(*added)
