"""Reading what the reference trainer (NVIDIA DLE Transformer-XL) wrote: its state-dict names mapped to ours.

    reference                                         ours
    layers.L.dec_attn.{qkv_net,r_net,o_net,layer_norm}.*   layers.L.attn.{same}.*
    layers.L.dec_attn.q_net.weight + kv_net.weight    layers.L.attn.qkv_net.weight (rows q, then k, v)
    layers.L.pos_ff.CoreNet.0.* / CoreNet.3.*          layers.L.ff.fc1.* / ff.fc2.*
    layers.L.pos_ff.layer_norm.*                      layers.L.ff.layer_norm.*
    crit.out_projs.I (I = cluster, untied only)       crit.out_projs.K (K = rank of I among untied clusters)
    pos_emb.inv_freq (buffer)                         -- (computed on the fly)
    crit.shared_out_projs.I (same tensors as word_emb.emb_projs.I)   -- (ties are implicit)
    crit.out_layers_weights.I when tie_weight         -- (the embedding tables are used)
    word_emb.*, r_w_bias, r_r_bias, r_emb, r_bias, crit.cluster_*, crit.out_layers_*   unchanged
"""
import re

import torch

from utils.model.adaptive_softmax import normalize_tie_projs, own_out_proj_clusters
from utils.io.errors import UserError

_UNCHANGED = re.compile(r"word_emb\.emb_layers\.\d+\.weight|word_emb\.emb_projs\.\d+|r_w_bias|r_r_bias|r_emb|r_bias"
                        r"|crit\.cluster_weight|crit\.cluster_bias|crit\.out_layers_biases\.\d+")
_ATTN = re.compile(r"layers\.(\d+)\.dec_attn\.(qkv_net|r_net|o_net|layer_norm)\.(weight|bias)")
_ATTN_SPLIT = re.compile(r"layers\.(\d+)\.dec_attn\.(q_net|kv_net)\.weight")
_FF = re.compile(r"layers\.(\d+)\.pos_ff\.(CoreNet\.0|CoreNet\.3|layer_norm)\.(weight|bias)")
_FF_NAMES = {"CoreNet.0": "fc1", "CoreNet.3": "fc2", "layer_norm": "layer_norm"}
_DROPPED = re.compile(r"pos_emb\.inv_freq|crit\.shared_out_projs\.\d+")


def reference_state_dict_to_ours(ref_state: dict, model_config: dict) -> dict:
    """Map a reference `model_state` to a state dict that `MemTransformerLM(**model_config)` loads strictly.

    Raises UserError for names the reference never writes for this configuration.
    """
    if ref_state and all(k.startswith("module.") for k in ref_state):      # saved from a DDP/DP wrapper
        ref_state = {k[len("module."):]: v for k, v in ref_state.items()}
    cutoffs = list(model_config.get("cutoffs") or [])
    d_model = model_config["d_model"]
    d_embed = model_config.get("d_embed") or d_model
    div_val = model_config.get("div_val", 1)
    tie_weight = model_config.get("tie_weight", True)
    tie_projs = normalize_tie_projs(model_config.get("tie_projs") or [False], len(cutoffs))
    own_projs = own_out_proj_clusters(d_embed, d_model, div_val, tie_projs)

    ours = {}
    split_qkv = {}                                                          # layer -> {q_net, kv_net}
    for key, value in ref_state.items():
        if _DROPPED.fullmatch(key):
            continue
        if _UNCHANGED.fullmatch(key):
            ours[key] = value
        elif m := _ATTN.fullmatch(key):
            ours[f"layers.{m[1]}.attn.{m[2]}.{m[3]}"] = value
        elif m := _ATTN_SPLIT.fullmatch(key):
            split_qkv.setdefault(m[1], {})[m[2]] = value
        elif m := _FF.fullmatch(key):
            ours[f"layers.{m[1]}.ff.{_FF_NAMES[m[2]]}.{m[3]}"] = value
        elif m := re.fullmatch(r"crit\.out_projs\.(\d+)", key):
            cluster = int(m[1])
            if cluster not in own_projs:
                raise UserError(f"reference state has {key}, but cluster {cluster}'s output projection is tied or "
                                "absent in its model_config (tie_projs / div_val / d_embed): the checkpoint and "
                                "its model_config disagree")
            ours[f"crit.out_projs.{own_projs.index(cluster)}"] = value
        elif m := re.fullmatch(r"crit\.out_layers_weights\.(\d+)", key):
            if not tie_weight:
                ours[key] = value
        elif key.startswith("out_layer."):
            raise UserError("this reference checkpoint was trained with --sample_softmax, whose output layer the "
                            "reference could not evaluate; it cannot be loaded: retrain with our train.py")
        else:
            raise UserError(f"unknown parameter {key!r} in the reference state dict: not a checkpoint of the "
                            "reference's MemTransformerLM")
    for layer, parts in split_qkv.items():
        if set(parts) != {"q_net", "kv_net"}:
            raise UserError(f"reference layer {layer} has only {sorted(parts)} of q_net / kv_net")
        ours[f"layers.{layer}.attn.qkv_net.weight"] = torch.cat([parts["q_net"], parts["kv_net"]], 0)
    return ours
