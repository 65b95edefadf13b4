"""Continuing a run of the reference trainer (NVIDIA DLE Transformer-XL) from its checkpoint.

The reference's own --restart restores the model, the optimizer, the scheduler, the loss scaler, the rank's
random state, the memory of each batch chunk and the data position (reference-inventory.md §3.6-3.7). Restoring
only the weights makes the continuation differ from the reference's own (Adam or LAMB restart with empty
moments), so each part is mapped here onto this run:

    optimizer_state   the reference numbers its states by its model.parameters() order: its state-dict order
                      without buffers (pos_emb.inv_freq) and without the second name of a tied tensor. The
                      moments are renamed with the same map as the weights (utils.model.reference_compat), so a
                      split q_net / kv_net pair becomes our qkv_net rows as the weights do.
    scheduler_state   cosine, inv_sqrt and constant are functions of the step (our scheduler recomputes them);
                      dev_perf (ReduceLROnPlateau) keeps its best loss, bad-evaluation count and current level.
    amp_state         a GradScaler state (or apex's loss_scaler0) sets the loss scale when this run has --fp16.
    rng_states[rank]  the torch generator of the device the reference ran on (numpy's was not saved).
    memory[chunk]     the reference's [n_layer, mlen, bsz, d_model] memory, saved as one tensor or a list of
                      per-layer tensors; restored for a one-process run with the same batch layout.
    epoch, batch, last_iter   the reference resumes at row last_iter + tgt_len of its ordered iterator.

A part that does not fit this run starts fresh, and the log says which; an optimizer of another kind is refused.
"""
import logging

import torch

from utils.io.errors import UserError
from utils.model.reference_compat import reference_state_dict_to_ours

_BUFFERS = ("pos_emb.inv_freq",)


def reference_parameter_names(model_state: dict) -> list[str]:
    """The reference model's parameters in its model.parameters() order (the optimizer's numbering)."""
    names, seen = [], set()
    for name, tensor in model_state.items():
        bare = name[len("module."):] if name.startswith("module.") else name
        if bare in _BUFFERS:
            continue
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if storage in seen:                      # a tied tensor's second name: parameters() lists it once
            continue
        seen.add(storage)
        names.append(name)
    return names


def optimizer_family_of_groups(groups) -> str | None:
    """Which optimizer wrote these param_groups (torch.optim's and the reference's LAMB keys); None if unknown."""
    if not isinstance(groups, list) or not groups or not isinstance(groups[0], dict):
        return None
    keys = set(groups[0])
    if "amsgrad" in keys:
        return "adam"
    if "nesterov" in keys or "dampening" in keys:
        return "sgd"
    if "lr_decay" in keys or "initial_accumulator_value" in keys:
        return "adagrad"
    return "lamb"


def map_optimizer_state(ref_optimizer_state: dict, ref_model_state: dict, model_config: dict,
                        our_names: list[str], full_shapes: dict) -> dict:
    """The reference optimizer's per-parameter states keyed by our parameter names.

    `our_names`: our optimizer's parameters in its order; `full_shapes`: their full shapes by name."""
    ref_names = reference_parameter_names(ref_model_state)
    groups = ref_optimizer_state.get("param_groups") or []
    numbered = [i for g in groups for i in g["params"]]
    if len(numbered) != len(ref_names):
        raise UserError(f"its optimizer state numbers {len(numbered)} parameters, its model has {len(ref_names)}")
    states = ref_optimizer_state.get("state") or {}
    # which reference parameters make up each of ours: rename their index as if it were a weight
    index_of = {name: torch.tensor([float(k)]) for k, name in zip(numbered, ref_names)}
    sources = {ours: [int(v) for v in ids.tolist()]
               for ours, ids in reference_state_dict_to_ours(index_of, model_config).items()}
    mapped = {}
    for name in our_names:
        parts = [states.get(k, states.get(str(k))) for k in sources.get(name, [])]
        if not parts or any(p is None for p in parts):
            continue                              # no state yet (no gradient reached it): starts empty
        state = {}
        for key, value in parts[0].items():
            if torch.is_tensor(value) and value.dim() > 0:
                value = torch.cat([p[key] for p in parts], 0) if len(parts) > 1 else value
                if tuple(value.shape) != tuple(full_shapes[name]):
                    raise UserError(f"its optimizer state {key} of {name} has shape {tuple(value.shape)}, the "
                                    f"parameter {tuple(full_shapes[name])}")
            state[key] = value
        mapped[name] = state
    return mapped


def restore_reference_run(ckpt: dict, *, args, model, optimizer, scheduler, scaler, train_iter, state,
                          rank: int, world_size: int, device: torch.device, log: logging.Logger) -> list:
    """Load what the reference checkpoint holds beyond the weights (already loaded) into this run; returns
    this rank's memory per batch chunk. `state` (the TrainState) gets the data position."""
    _restore_optimizer(ckpt, args, model, optimizer)
    _restore_scheduler(ckpt, args, scheduler, state.train_step)
    mems = _reference_memory(ckpt, args, model, rank, world_size, device)
    parts = {"loss scale": _restore_scaler(ckpt, scaler) if scaler.is_enabled() else None,
             "random state": _restore_rng(ckpt, rank, world_size, device),
             "memory": mems is not None,
             "data position": _restore_position(ckpt, args, train_iter, state)}
    restored = ["model, optimizer and schedule"] + [part for part, done in parts.items() if done]
    fresh = [part for part, done in parts.items() if done is False]
    log.info(f"Restored from the reference checkpoint: {', '.join(restored)}" +
             (f"; starting fresh: {', '.join(fresh)}" if fresh else ""))
    return mems if mems is not None else [None] * args.batch_chunk


def check_optimizer_shapes(optimizer_state: dict, model_state: dict, names: list[str]) -> None:
    """Every per-parameter tensor of a checkpoint's optimizer state has its parameter's shape (a damaged or
    foreign state would load, then fail at the first step with a traceback)."""
    states = optimizer_state.get("state") if isinstance(optimizer_state, dict) else None
    if not isinstance(states, dict):
        raise UserError("its optimizer state is missing or damaged; resume from another checkpoint")
    for index, state in states.items():
        if not isinstance(index, int) or not 0 <= index < len(names) or not isinstance(state, dict):
            raise UserError(f"its optimizer state has an entry {index!r} for no parameter of this model")
        weight = model_state.get(names[index])
        for key, value in state.items():
            if torch.is_tensor(weight) and torch.is_tensor(value) and value.dim() > 0 \
                    and tuple(value.shape) != tuple(weight.shape):
                raise UserError(f"its optimizer state {key} of {names[index]} has shape {tuple(value.shape)}, the "
                                f"parameter {tuple(weight.shape)}; resume from another checkpoint")


def parameter_names(model, optimizer) -> list[str]:
    """The names of the optimizer's parameters in its order, without the wrappers' prefixes (DDP, compile)."""
    names = {id(p): n for n, p in model.named_parameters()}
    result = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            for prefix in ("module.", "_orig_mod."):
                name = name.replace(prefix, "")
            result.append(name)
    return result


def _restore_optimizer(ckpt: dict, args, model, optimizer) -> None:
    from utils.distributed.fsdp import load_optimizer_state
    ref_state = ckpt.get("optimizer_state")       # its kind was checked with the model (Checkpointer._check_fits)
    if not isinstance(ref_state, dict) or not isinstance(ref_state.get("state"), dict) \
            or not isinstance(ref_state.get("param_groups"), list):
        raise UserError("it holds no optimizer state; load its weights with eval.py, or retrain")
    our_names = parameter_names(model, optimizer)
    weights = reference_state_dict_to_ours(ckpt["model_state"], ckpt["model_config"])
    mapped = map_optimizer_state(ref_state, ckpt["model_state"], ckpt["model_config"], our_names,
                                 {name: tuple(weights[name].shape) for name in our_names if name in weights})
    ours = optimizer.state_dict()                 # our groups (this run's hyper-parameters), numbered states
    ours["state"] = {i: mapped[name] for i, name in enumerate(our_names) if name in mapped}
    try:
        load_optimizer_state(model, optimizer, ours)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise UserError(f"its optimizer state does not fit --optim {args.optim} ({exc})") from None


def _restore_scheduler(ckpt: dict, args, scheduler, train_step: int) -> None:
    ref = ckpt.get("scheduler_state")
    if args.scheduler == "dev_perf" and isinstance(ref, dict) and "best" in ref:
        groups = (ckpt.get("optimizer_state") or {}).get("param_groups") or [{}]
        scheduler.load_state_dict({"scheduler": "dev_perf", "last_step": train_step,
                                   "level": float(groups[0].get("lr", args.lr)), "best": float(ref["best"]),
                                   "num_bad_evals": int(ref.get("num_bad_epochs", 0))})
        return
    scheduler.step(train_step)                    # the other schedules are functions of the step


def _restore_scaler(ckpt: dict, scaler) -> bool:
    amp = ckpt.get("amp_state")
    if not isinstance(amp, dict):
        return False
    if "scale" in amp:
        scaler.load_state_dict(amp)
        return True
    apex = amp.get("loss_scaler0")
    if isinstance(apex, dict) and "loss_scale" in apex:
        scaler.load_state_dict({**scaler.state_dict(), "scale": float(apex["loss_scale"]),
                                "_growth_tracker": int(apex.get("unskipped", 0))})
        return True
    return False


def _restore_rng(ckpt: dict, rank: int, world_size: int, device: torch.device) -> bool:
    states = ckpt.get("rng_states")
    if not isinstance(states, list) or len(states) != world_size or not torch.is_tensor(states[rank]):
        return False
    rng = states[rank].to("cpu", torch.uint8)
    if rng.numel() == torch.get_rng_state().numel() and device.type == "cpu":
        torch.set_rng_state(rng)
        return True
    if device.type == "cuda" and rng.numel() == torch.cuda.get_rng_state(device).numel():
        torch.cuda.set_rng_state(rng, device)
        return True
    return False


def _reference_memory(ckpt: dict, args, model, rank: int, world_size: int, device: torch.device) -> list | None:
    memory = ckpt.get("memory")
    if world_size != 1 or not isinstance(memory, list) or len(memory) != args.batch_chunk or not args.mem_len:
        return None
    n_layer, d_model = ckpt["model_config"]["n_layer"], ckpt["model_config"]["d_model"]
    chunk_bsz = args.batch_size // args.batch_chunk
    mems = []
    for saved in memory:
        if isinstance(saved, (list, tuple)) and saved and all(torch.is_tensor(t) for t in saved):
            if len(saved) != n_layer or len({tuple(t.shape) for t in saved}) != 1:
                return None
            saved = torch.stack(list(saved))
        if not torch.is_tensor(saved) or saved.dim() != 4:
            return None
        if saved.shape[0] != n_layer or saved.shape[2] != chunk_bsz or saved.shape[3] != d_model \
                or saved.shape[1] > args.mem_len:
            return None
        dtype = next(model.parameters()).dtype
        mems.append(saved.to(device=device, dtype=dtype))
    if args.swap_mem:
        mems = [m.cpu() for m in mems]
    return mems


def _restore_position(ckpt: dict, args, train_iter, state) -> bool:
    """The reference's ordered iterator resumes at row last_iter + tgt_len (from 0 before its first batch)."""
    current = train_iter.state_dict()
    epoch, batch, last_iter = ckpt.get("epoch"), ckpt.get("batch"), ckpt.get("last_iter")
    if current.get("type") != "ordered" or args.varlen or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, batch, last_iter)):
        return False
    position = {**current, "pos": last_iter + current["bptt"] if batch else 0, "batch": batch,
                "last_iter": last_iter}
    try:
        train_iter.load_state_dict(position)
    except UserError as exc:
        raise UserError(f"its data position does not fit this corpus ({exc})") from None
    state.epoch, state.batch, state.last_iter = max(1, epoch), batch, last_iter
    return True
