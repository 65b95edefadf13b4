"""A key/value cache of the memory for token-by-token generation (issue 18).

Without it every generation step feeds one token and MemTransformerLM recomputes, in every layer, the keys
and values of the whole memory (mem_len rows through qkv_net) and the position keys (klen rows through
r_net): the cost of a step grows with mem_len. With the cache a step computes only the new token's own
projections:

    memory keys / values   K_i, V_i [bsz, H, mlen, Dh] per layer: those of the memory rows, kept from the steps
                           before (memory row j is layer i's input at that position; its key does not depend on
                           where it sits in the window for relative attention)
    position keys          r_net(sinusoid of the distances klen-1..0): the same every step once the memory is
                           full (klen = mem_len + 1), computed once per klen
    new token              its query, key and value (one row through qkv_net), then attention over [K_i; k]

The memory tensor (layer inputs) is updated exactly as the model updates it, and the cache drops the same
rows. Attention types 0 (Transformer-XL) and 1 (Shaw) only: types 2 and 3 add absolute positions counted
from the window's end to the memory, so every key changes when the window slides (`supports` says False;
generation then recomputes).

The math is the model's own (the attention functions of mem_transformer.py for one query); tests check it
against the model's recomputation (tests/test_kv_cache.py).
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mem_transformer import MemTransformerLM, attention, last_rows, rel_position_scores


def supports(model) -> bool:
    """Whether `model` can generate with the cache (an eager MemTransformerLM with relative attention)."""
    return (isinstance(model, MemTransformerLM) and model.attn_type in (0, 1) and model.ext_len == 0
            and model.eod_index < 0)                  # no document masks (--reset_mems_at_doc) in the cache


class MemoryKVCache:
    """Per-layer keys and values of the memory rows; `step(tokens, mems)` is next_token_logprobs for one
    new token per sample ([1, bsz]), returning (log-probabilities [bsz, n_token], new mems)."""

    def __init__(self, model: MemTransformerLM):
        self.model = model
        self.keys: Optional[List[Tensor]] = None       # per layer [bsz, H, mlen, Dh]
        self.values: Optional[List[Tensor]] = None
        self._r_pos: Dict[Tuple[int, int], Tensor] = {}  # (layer, klen) -> r_net of the distances (type 0)

    def _project_kv(self, layer_idx: int, rows: Tensor) -> Tuple[Tensor, Tensor]:
        """rows [len, bsz, d_model] (layer inputs) -> keys, values [bsz, H, len, Dh]."""
        attn = self.model.layers[layer_idx].attn
        hd = attn.n_head * attn.d_head
        x = attn.layer_norm(rows) if attn.pre_lnorm else rows
        kv = F.linear(x, attn.qkv_net.weight[hd:]).view(rows.size(0), rows.size(1), 2, attn.n_head, attn.d_head)
        return kv[:, :, 0].permute(1, 2, 0, 3), kv[:, :, 1].permute(1, 2, 0, 3)

    def fill(self, mems: Tensor) -> None:
        """Keys and values of a memory [n_layer, mlen, bsz, d_model] (once, after the prompt)."""
        self.keys, self.values = [], []
        for i in range(self.model.n_layer):
            k, v = self._project_kv(i, mems[i])
            self.keys.append(k)
            self.values.append(v)

    def _position_keys(self, layer_idx: int, klen: int, pos_emb: Tensor) -> Tensor:
        key = (layer_idx, klen)
        if key not in self._r_pos:
            attn = self.model.layers[layer_idx].attn
            self._r_pos[key] = attn.r_net(pos_emb).view(klen, attn.n_head, attn.d_head)
        return self._r_pos[key]

    @torch.no_grad()
    def step(self, tokens: Tensor, mems: Tensor) -> Tuple[Tensor, Tensor]:
        model = self.model
        if self.keys is None:
            self.fill(mems)
        qlen, mlen = tokens.size(0), mems.size(1)
        if qlen != 1:
            raise ValueError("the cached step feeds one token per sample")
        klen = mlen + 1
        word_emb = model.word_emb(tokens)                                       # [1, bsz, d_model]
        mask = model._attn_mask(1, mlen, tokens.device)                        # [1, klen]
        pos_emb = model.drop(model._sinusoid_of_distances(klen, word_emb)) if model.attn_type == 0 else None
        core_out = model.drop(word_emb)
        hids: List[Tensor] = []
        new_keys, new_values = [], []
        for i, layer in enumerate(model.layers):
            hids.append(core_out)
            attn = layer.attn
            n_head, d_head = attn.n_head, attn.d_head
            hd = n_head * d_head
            bsz = core_out.size(1)
            x = attn.layer_norm(core_out) if attn.pre_lnorm else core_out
            qkv = F.linear(x, attn.qkv_net.weight).view(1, bsz, 3, n_head, d_head)
            q = qkv[:, :, 0].permute(1, 2, 0, 3)                                # [bsz, H, 1, Dh]
            k = torch.cat([self.keys[i], qkv[:, :, 1].permute(1, 2, 0, 3)], 2)  # [bsz, H, klen, Dh]
            v = torch.cat([self.values[i], qkv[:, :, 2].permute(1, 2, 0, 3)], 2)
            new_keys.append(k)
            new_values.append(v)
            pos_bias = None
            if model.attn_type == 0:
                r_pos = self._position_keys(i, klen, pos_emb)
                q_pos = (q + model.r_r_bias.unsqueeze(1)) * attn.scale
                q = q + model.r_w_bias.unsqueeze(1)
            else:                                                               # type 1
                r_emb, r_bias = model.r_emb[i], model.r_bias[i]
                if model.clamp_len > 0:
                    r_emb, r_bias = r_emb[-model.clamp_len:], r_bias[-model.clamp_len:]
                r_pos, pos_bias = last_rows(r_emb, klen), last_rows(r_bias, klen) * attn.scale
                q_pos = q * attn.scale
                q = q + model.r_w_bias[i].unsqueeze(1)
            pos_scores = rel_position_scores(q_pos, r_pos, pos_bias)
            vec = attention(q * attn.scale, k, v, pos_scores, mask, 0.0, False)  # [bsz, H, 1, Dh]
            vec = vec.permute(2, 0, 1, 3).reshape(1, bsz, hd)
            out = attn.drop(attn.o_net(vec))
            h = core_out + out if attn.pre_lnorm else attn.layer_norm(core_out + out)
            core_out = layer.ff(h)
        hidden = model.drop(core_out)
        new_mems = model._update_mems(hids, mems, 1, mlen)
        # the cache keeps the rows the memory keeps: the last new_mems.size(1) of the klen
        keep = new_mems.size(1)
        self.keys = [k[:, :, klen - keep:] for k in new_keys]
        self.values = [v[:, :, klen - keep:] for v in new_values]
        logp = model.crit.log_probs(hidden[-1], model.word_emb.weights(), model.word_emb.projs())
        return logp, new_mems
