"""`--tensor_parallel N` (`--tp N`): Megatron-style tensor parallelism with PyTorch's DTensor API, applied to the
model from outside (the model code runs unchanged on each rank's local shards).

The processes form a 2-D mesh ("dp", "tp") of WORLD_SIZE / N data-parallel groups of N consecutive ranks. In
each decoder layer (Shoeybi et al., 2019):

    attention     the fused q/k/v projection split by heads: rank r holds the rows of heads r*H/N ..
                  (r+1)*H/N - 1 of q, of k and of v (a DTensor with the strided placement _StridedShard(0, 3):
                  its full tensor is the unsplit [q; k; v] weight, so nothing is permuted, in memory or in a
                  checkpoint); the relative-position projection r_net column-wise (ColwiseParallel); r_w_bias,
                  r_r_bias (and attn_type 1's r_emb / r_bias tables) split with their heads; the output
                  projection o_net row-wise (RowwiseParallel: one all-reduce of [tgt_len, bsz, d_model]).
    feed-forward  fc1 column-wise, fc2 row-wise (one all-reduce of [tgt_len, bsz, d_model]).

The backward pass all-reduces the gradient of each split block's input: [klen, bsz, d_model] before the
q/k/v projection (klen = mem_len + tgt_len: keys and values are also computed from the memory rows, whose
LayerNorm under --pre_lnorm has parameters) and [tgt_len, bsz, d_model] before fc1.

Replicated on every rank of a tensor-parallel group: the adaptive embedding, the adaptive softmax (see
docs/tensor_parallel.md for why) and the LayerNorms; their gradients are the same on every rank of the group,
because everything flowing into them is. The memory (`mems`, the layer inputs) is then the same full
[n_layer, mlen, bsz, d_model] tensor on each rank of the group: it is what the split layers take as input.

Data parallelism over the "dp" dimension is FSDP2 (`fully_shard` on the "dp" sub-mesh; 2-D parameters).
Checkpoints hold full tensors in the single-process layout (utils/distributed/fsdp.py gathers DTensors with
torch.distributed.checkpoint.state_dict), so they load at any TP size and in one process.
"""
import logging
import os
import re
import sys
from collections import defaultdict
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from utils.distributed import group as distributed
from utils.io.errors import UserError

LOG = logging.getLogger("txl")

_MESH = None            # the ("dp", "tp") DeviceMesh of this job, once init_mesh made it


def check_layout(tp: int, world_size: int, n_head: int) -> None:
    """One line for a tensor-parallel size that cannot split this job or this model."""
    if world_size % tp:
        raise UserError(f"--tensor_parallel {tp} does not divide the {world_size} process(es) of this job; start a "
                        f"multiple of {tp} processes (data-parallel size x {tp}) or choose a --tensor_parallel that "
                        f"divides {world_size}")
    if n_head % tp:
        raise UserError(f"--n_head {n_head} is not divisible by --tensor_parallel {tp}: each rank holds whole "
                        f"attention heads; choose a --tensor_parallel that divides {n_head}")


def node_warning(tp: int, local_world_size: int) -> Optional[str]:
    """A warning when a tensor-parallel group would span nodes (its all-reduces are on the critical path of
    every layer: they should stay on the node's fast links)."""
    if local_world_size >= tp and local_world_size % tp == 0:
        return None
    return (f"warning: --tensor_parallel {tp} with {local_world_size} process(es) per node: tensor-parallel "
            f"groups span nodes (each layer all-reduces across them, twice forward and twice backward); keep "
            f"--tensor_parallel a divisor of the processes per node")


def processes_per_node(world_size: int) -> int:
    """Processes on this node: torchrun's LOCAL_WORLD_SIZE, or Slurm's tasks per node ("8" or "8(x2)")."""
    local = distributed.env_int("LOCAL_WORLD_SIZE", 0)
    if local:
        return local
    slurm = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_NTASKS_PER_NODE") or ""
    match = re.match(r"\d+", slurm)
    return int(match.group()) if match else world_size


def init_mesh(tp: int, n_head: int, device_type: str):
    """The ("dp", "tp") mesh of all processes; registers the data-parallel rank, size and group with
    utils.distributed.group, which the data, metrics and checkpoints then use."""
    global _MESH
    from torch.distributed.device_mesh import init_device_mesh
    world_size = distributed.get_world_size()
    check_layout(tp, world_size, n_head)
    warning = node_warning(tp, processes_per_node(world_size))
    if warning and distributed.is_main_process():
        print(warning, file=sys.stderr, flush=True)       # before the training log exists
    _MESH = init_device_mesh(device_type, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))
    dp_mesh = _MESH["dp"]
    distributed.set_data_parallel(dp_mesh.get_local_rank(), dp_mesh.size(), tp, dp_mesh.get_group())
    return _MESH


def mesh():
    return _MESH


# ---- the model --------------------------------------------------------------------------------------------------
class HeadParallelQKVInput(nn.Module):
    """Replaces MultiHeadAttn.qkv_input: the input passes unchanged (its gradient is all-reduced over the
    tensor-parallel group: each rank's heads give only part of it), the weight becomes this rank's rows
    [q of its heads; k of its heads; v of its heads]."""

    def __init__(self, tp_mesh):
        super().__init__()
        self.tp_mesh = tp_mesh

    def forward(self, x: Tensor, weight: Tensor):
        from torch.distributed.tensor import DTensor, Partial, Replicate
        x = DTensor.from_local(x, self.tp_mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
        return x, weight.to_local()


def _local_head_arguments(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a split attention: the per-head position parameters it is passed (r_w_bias,
    r_r_bias, attn_type 1's tables) as this rank's heads."""
    from torch.distributed.tensor import DTensor
    return tuple(a.to_local() if isinstance(a, DTensor) else a for a in args)


def check_model(model: nn.Module, tp: int) -> None:
    if model.n_head % tp:
        raise UserError(f"--n_head {model.n_head} is not divisible by --tensor_parallel {tp}: each rank holds whole "
                        f"attention heads; choose a --tensor_parallel that divides {model.n_head}")
    if getattr(model.layers[0].attn, "attn_impl", "math") == "flex":
        raise UserError("--attn_impl flex does not run under --tensor_parallel (FlexAttention is compiled for the "
                        "full set of heads); use --attn_impl math or sdpa")
    if getattr(model.layers[0].attn, "attn_impl", "math") == "triton":
        raise UserError("--attn_impl triton is not checked under --tensor_parallel; use --attn_impl math or sdpa")


def split_layers(model: nn.Module, tp_mesh) -> nn.Module:
    """Split `model`'s decoder layers and per-head position parameters over `tp_mesh` (in place)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.distributed.tensor.placement_types import _StridedShard
    tp = tp_mesh.size()
    check_model(model, tp)
    for layer in model.layers:
        attn = layer.attn
        plan = {"attn.o_net": RowwiseParallel(), "ff.fc1": ColwiseParallel(), "ff.fc2": RowwiseParallel()}
        if attn.r_net is not None:
            plan["attn.r_net"] = ColwiseParallel()
        parallelize_module(layer, tp_mesh, plan)
        # rows [q; k; v], each [n_head * d_head]: split each third by heads (strided), not the whole by rows
        weight = attn.qkv_net.weight
        heads_of_q_k_v = [_StridedShard(0, split_factor=3)]
        attn.qkv_net.weight = nn.Parameter(distribute_tensor(weight.detach(), tp_mesh, heads_of_q_k_v),
                                           requires_grad=weight.requires_grad)
        attn.qkv_input = HeadParallelQKVInput(tp_mesh)
        attn.n_head = attn.n_head // tp                    # the heads this rank computes (views and reshapes)
        attn.register_forward_pre_hook(_local_head_arguments)
    # the head dimension of each per-head position parameter (attn_type 0: [H, Dh]; 1: [L, H, Dh], [L, T, H, Dh],
    # [L, T, H]); attn_type 3's r_emb [L, T, d_model] has no heads and stays replicated
    head_dims = {"r_w_bias": -2, "r_r_bias": -2}
    if model.attn_type == 1:
        head_dims.update(r_emb=-2, r_bias=-1)
    for name, dim in head_dims.items():
        param = getattr(model, name)
        if param is not None:
            placement = Shard(param.dim() + dim)
            setattr(model, name, nn.Parameter(distribute_tensor(param.detach(), tp_mesh, [placement]),
                                              requires_grad=param.requires_grad))
    return model


def parallelize(model: nn.Module, args) -> nn.Module:
    """The model the training step calls: split over the "tp" dimension of the mesh, and sharded with FSDP2
    over the "dp" dimension when there are several data-parallel groups."""
    if _MESH is None:
        raise UserError("--tensor_parallel needs several processes (torchrun --nproc_per_node N ...)")
    split_layers(model, _MESH["tp"])
    LOG.info(parameter_memory_line(model))
    if _MESH["dp"].size() > 1:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor, Shard

        def placement(param):
            # a tensor-parallel parameter is split by FSDP along another dimension than its "tp" split (the
            # q/k/v weight's strided rows: its columns), so that the two splits stay independent and full
            # tensors gather and scatter exactly (checkpoints); 1-D ones share their only dimension
            tp_dim = getattr(param.placements[0], "dim", None) if isinstance(param, DTensor) else None
            if tp_dim is not None and param.dim() > 1:
                tp_dim %= param.dim()
                return Shard(max((d for d in range(param.dim()) if d != tp_dim), key=lambda d: param.size(d)))
            return None

        for layer in model.layers:
            fully_shard(layer, mesh=_MESH["dp"], shard_placement_fn=placement)
        fully_shard(model, mesh=_MESH["dp"], shard_placement_fn=placement)
    return model


# ---- what the optimizer step needs -----------------------------------------------------------------------------
def _mesh_key(t: Tensor):
    mesh_ = getattr(t, "device_mesh", None)
    return (t.device, t.dtype, None if mesh_ is None else id(mesh_))


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ for a model whose parameters are partly DTensors (on one or several
    meshes) and partly plain tensors: the norm of each kind is computed on its own (a DTensor's over its full
    tensor), the total norm is theirs, and every gradient is scaled by the same factor."""
    params = [p for p in parameters if p.grad is not None]
    groups = defaultdict(list)
    for p in params:
        groups[_mesh_key(p.grad)].append(p.grad)
    if len(groups) <= 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    coef = min(1.0, max_norm / (total.item() + 1e-6))
    for grads in groups.values():
        torch._foreach_mul_(grads, coef)
    return total


# ---- memory -------------------------------------------------------------------------------------------------------
def local_parameter_bytes(model: nn.Module, split_only: bool = False) -> int:
    """Bytes of the parameters this rank holds (a DTensor's local shard); `split_only`: of the split ones only
    (the decoder layers' q/k/v, r_net, o_net, fc1, fc2 weights, fc1's bias and the per-head parameters)."""
    from torch.distributed.tensor import DTensor
    total = 0
    for p in model.parameters():
        if split_only and not _is_split(p):
            continue
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def full_parameter_bytes(model: nn.Module, split_only: bool = False) -> int:
    """Bytes of the parameters of the whole model (a DTensor's full tensor), as one process holds them."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not split_only or _is_split(p))


def _is_split(param) -> bool:
    """A DTensor sharded over some mesh dimension (RowwiseParallel's bias is a replicated DTensor)."""
    from torch.distributed.tensor import DTensor, Replicate
    return isinstance(param, DTensor) and any(not isinstance(p, Replicate) for p in param.placements)


def parameter_memory_line(model: nn.Module) -> str:
    """The log line of the parameter memory per rank against one process (tests read it)."""
    split_local, split_full = local_parameter_bytes(model, True), full_parameter_bytes(model, True)
    local, full = local_parameter_bytes(model), full_parameter_bytes(model)
    return (f"tensor parallel: parameters per rank {local / 2**20:.3f} MiB of {full / 2**20:.3f} MiB; split layers "
            f"{split_local} of {split_full} bytes ({split_local / max(split_full, 1):.3f}), replicated "
            f"{local - split_local} bytes")


def parameters_per_rank(model: nn.Module, tp: int) -> int:
    """The parameters one rank holds at --tensor_parallel `tp`, of a model that is not split (build it on the
    meta device to count without allocating)."""
    split = set(split_parameter_names(model))
    return sum(p.numel() // tp if n in split else p.numel() for n, p in model.named_parameters())


def split_parameter_names(model: nn.Module) -> list[str]:
    """The names of the parameters that --tensor_parallel splits (in a model that is not split)."""
    names = []
    for name, _ in model.named_parameters():
        leaf = name.split(".")
        if name in ("r_w_bias", "r_r_bias") or (model.attn_type == 1 and name in ("r_emb", "r_bias")):
            names.append(name)
        elif len(leaf) >= 4 and leaf[0] == "layers" and ".".join(leaf[2:4]) in (
                "attn.qkv_net", "attn.r_net", "attn.o_net", "ff.fc1", "ff.fc2"):
            if not (leaf[2:] == ["ff", "fc2", "bias"]):          # fc2's bias is added after the all-reduce
                names.append(name)
    return names


# ---- communication ------------------------------------------------------------------------------------------------
class _NoModuleTracker:
    name, is_bw, activation_checkpointing = "Global", False, False
    module_parents_dict = {"Global": set()}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def comm_bytes_mode():
    """A torch.distributed.tensor.debug.CommDebugMode that also adds up the bytes of the tensors each
    collective it counts is given (`bytes_by_op`: op name -> bytes); scripts/benchmark_train.py reads it."""
    from torch.distributed.tensor.debug import CommDebugMode

    class CommBytesMode(CommDebugMode):
        def __init__(self):
            super().__init__()
            self.bytes_by_op = defaultdict(int)
            # no per-module attribution: its module tracker loses its place in this model's nested calls
            # (IndexError in torch 2.13); the caller counts the forward and the backward apart instead
            self.advanced_module_tracker = _NoModuleTracker()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = self.get_total_counts()
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if out is not NotImplemented and self.get_total_counts() > before:
                tensors = [a for a in args if isinstance(a, Tensor)]
                tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, Tensor)]
                if tensors:
                    self.bytes_by_op[func._overloadpacket.__name__] += tensors[0].numel() * tensors[0].element_size()
            return out

    return CommBytesMode()


def analytic_all_reduce_bytes(n_layer: int, tgt_len: int, mlen: int, bsz: int, d_model: int,
                              element_size: int) -> dict:
    """Bytes all-reduced per training step by the split layers (one forward + backward, one batch chunk).

    Forward, per layer: the outputs of o_net and fc2, [tgt_len, bsz, d_model] each (Megatron's two). Backward:
    the gradients of the inputs of fc1 ([tgt_len, bsz, d_model]) and of the q/k/v projection, which also
    computes keys and values of the mlen memory rows ([mlen + tgt_len, bsz, d_model]); with mlen = 0 these
    are Megatron's two all-reduces of [tgt_len, bsz, d_model].
    """
    row = bsz * d_model * element_size
    return {"forward": n_layer * 2 * tgt_len * row, "backward": n_layer * (2 * tgt_len + mlen) * row,
            "megatron_backward": n_layer * 2 * tgt_len * row}
