"""`--multi_gpu fsdp`: FSDP2 (`fully_shard`) sharding, and checkpoints in the single-process format.

Each decoder layer is one FSDP unit and the root unit holds the rest (embeddings, output layer, positional
biases), so the tied embedding/output weights are gathered together for the whole forward. Parameters,
gradients and optimizer state are sharded over all ranks; the forward and backward all-gather one layer at
a time. Mixed precision keeps working through autocast (the parameters stay float32).

Checkpoints hold full tensors with the same names and the same optimizer-state layout as a single
process's, so a checkpoint written under FSDP loads into one process (eval.py, train.py --restart), into
DDP, or into FSDP with another number of ranks. The helpers below also work for unsharded models, so the
trainer calls them without asking which mode it runs in.
"""
import torch
from torch import nn

from utils.runtime.device import scaler_options


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard `model` in place over all ranks (the parameters move to `device`); returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def is_distributed(model: nn.Module) -> bool:
    """Sharded by FSDP, or split by --tensor_parallel: its parameters are (partly) DTensors."""
    from torch.distributed.tensor import DTensor
    return is_sharded(model) or any(isinstance(p, DTensor) for p in model.parameters())


def scalar(value) -> float:
    """A Python float of a tensor that may be a DTensor (e.g. the gradient norm of sharded gradients)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(model: nn.Module) -> dict:
    """The model's state dict as full CPU tensors. Sharded: every rank must call it; only rank 0 gets the
    tensors (the other ranks get an empty dict)."""
    if not is_distributed(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_model_state(model: nn.Module, state: dict) -> None:
    """Load a full state dict (from any checkpoint) into `model`, sharded or not."""
    if not is_distributed(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, state, options=_options())


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in the order a single process's state_dict numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` as one process would have it (states numbered, full tensors). Sharded: every
    rank must call it; rank 0 gets the result (the other ranks get a dict without state)."""
    if not is_distributed(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    by_name = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = []
    for group in by_name.get("param_groups", []):
        groups.append({**group, "params": [index[name] for name in group["params"]]})
    return {"state": {index[name]: s for name, s in by_name.get("state", {}).items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a single-process optimizer state dict into `optimizer`, whose model may be sharded."""
    if not is_distributed(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    names = _param_names(model, optimizer)
    if len(names) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError("the checkpoint's optimizer has another number of parameters")
    by_name = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())


def grad_scaler(args, device: torch.device):
    """Loss scaling for --fp16 that agrees across shards on skipping a step (each rank sees only its shard
    of the gradients, so the inf/NaN check must be reduced over ranks)."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    return ShardedGradScaler(device.type, **scaler_options(args))
