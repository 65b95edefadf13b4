"""Transformer-XL language model (`MemTransformerLM`), computing what the reference (NVIDIA DLE) computes.

Shapes (time-major, as everywhere in the project):
    data [qlen, bsz] int64 with qlen = ext_len + tgt_len, target [tgt_len, bsz]
    hidden [len, bsz, d_model]; memory `mems` [n_layer, mlen, bsz, d_model], mems[i] = the input of layer i
    inside attention: q [bsz, n_head, qlen, d_head], k / v [bsz, n_head, klen, d_head], klen = mlen + qlen,
    scores [bsz, n_head, qlen, klen]; key j < mlen is memory, key mlen + i is query i.

Attention types (attn_type):
    0  Transformer-XL: sinusoid of the distance mlen + i - j projected per layer (r_net), biases r_w_bias
       (content) and r_r_bias (position) shared by all layers.
    1  Shaw et al.: learned per-layer tables r_emb [max_klen, H, Dh] and r_bias [max_klen, H] of distances,
       per-layer r_w_bias.
    2  Vaswani et al.: sinusoid added once to the input; positions count down from the end of the window.
    3  Al-Rfou et al.: learned absolute embeddings r_emb [max_klen, d_model] added to every layer's input.
Unlike the reference, memory is never modified in place: for types 2 and 3 mems[i] holds the layer input
*without* its position embedding (for type 2, layer 0: the word embedding before dropout), and the
positions of the current window are added when the memory is used. With pre_lnorm, types 2 and 3 also take
their queries from the normalized input (the reference used the raw one).
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch.utils.checkpoint import checkpoint

from utils.io.errors import UserError
from utils.model.adaptive_softmax import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax, normalize_tie_projs
from utils.model.attention import ATTN_IMPLS, check_attn_impl, fused_relative_attention
from utils.model.autocast_input import autocast_input
from utils.model.documents import document_mask, document_numbers, memory_flags, with_memory_flags
from utils.model.log_uniform_sampler import LogUniformSampler, sample_logits
from utils.model.shared_table_grad import embed_outside_the_graph
from utils.model.varlen_padding import padded_memory


# ---- positions ------------------------------------------------------------------------------------------
def sinusoid_embedding(pos_seq: Tensor, d_model: int) -> Tensor:
    """pos_seq [L] -> [L, d_model] = [sin(pos * inv_freq), cos(pos * inv_freq)] (sin block, then cos block)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0, dtype=pos_seq.dtype, device=pos_seq.device)
                                / d_model))                                     # [d_model / 2]
    angles = torch.outer(pos_seq, inv_freq)                                     # [L, d_model / 2]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def last_rows(table: Tensor, n: int) -> Tensor:
    """The last n rows of a learned position table; when it is shorter, its first row repeats in front."""
    if table.size(0) >= n:
        return table[table.size(0) - n:]
    pad = table[:1].expand([n - table.size(0)] + list(table.shape[1:]))
    return torch.cat([pad, table], 0)


# ---- attention scores (one function per term; `attn_impl` picks the kernel that combines them) ---------
def rel_position_scores(q: Tensor, r: Tensor, r_bias: Optional[Tensor]) -> Tensor:
    """Relative-position term: out[b, h, i, j] = q[b, h, i] · r[klen-1-d] (+ r_bias[klen-1-d, h]), d = mlen+i-j.

    q [bsz, H, qlen, Dh]; r [klen, H, Dh] holds the keys of distances klen-1 .. 0 (row m: distance klen-1-m);
    r_bias [klen, H] or None. Entries with j > mlen + i (future keys) are arbitrary: the causal mask hides them.
    A zero row in front of r makes column 0 of the product zero; viewing [qlen, klen+1] as [klen+1, qlen] and
    dropping its first row then shifts row i left by qlen-1-i (Transformer-XL's relative shift).
    """
    bsz, n_head, qlen = q.size(0), q.size(1), q.size(2)
    klen = r.size(0)
    r = F.pad(r, [0, 0, 0, 0, 1, 0])                                            # [klen+1, H, Dh]
    x = torch.matmul(q, r.permute(1, 2, 0))                                     # [bsz, H, qlen, klen+1]
    if r_bias is not None:
        x = x + F.pad(r_bias, [0, 0, 1, 0]).t().unsqueeze(1)                    # + [H, 1, klen+1]
    return x.view(bsz, n_head, klen + 1, qlen)[:, :, 1:].reshape(bsz, n_head, qlen, klen)


def attention(q: Tensor, k: Tensor, v: Tensor, pos_scores: Optional[Tensor], mask: Tensor,
              dropatt: float, training: bool) -> Tensor:
    """softmax(q·kᵀ + pos_scores, hidden where mask) · v.

    q [bsz, H, qlen, Dh] (already scaled by 1/sqrt(Dh)); k, v [bsz, H, klen, Dh]; pos_scores
    [bsz, H, qlen, klen] (scaled) or None; mask [qlen, klen] (or per column
    [bsz, 1, qlen, klen], --reset_mems_at_doc) bool, True = not visible. -> [bsz, H, qlen, Dh]
    """
    scores = torch.matmul(q, k.transpose(-1, -2))                               # [bsz, H, qlen, klen]
    if pos_scores is not None:
        scores = scores + pos_scores
    scores = scores.masked_fill(mask, float("-inf"))
    prob = F.dropout(torch.softmax(scores, dim=-1), dropatt, training)
    return torch.matmul(prob, v)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, pos_scores: Optional[Tensor], mask: Tensor,
                   dropatt: float, training: bool, scale: float) -> Tensor:
    """`attention` by F.scaled_dot_product_attention, q *not* scaled (scale is passed to the kernel).

    The position term and the mask become one additive bias (a single pass over [bsz, H, qlen, klen]; the
    relative shift is a view); the kernel fuses q·kᵀ, the bias, softmax, dropout and ·v (on a GPU: the
    memory-efficient kernel, which also returns the bias gradient). Without a position term the mask is
    passed as a boolean mask (True = visible).
    """
    if pos_scores is None:
        attn_mask = torch.logical_not(mask)
    else:
        attn_mask = pos_scores.masked_fill(mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropatt if training else 0.0,
                                          scale=scale)


# ---- layers ---------------------------------------------------------------------------------------------
class QKVInput(nn.Module):
    """The input of the q/k/v projection and its fused weight, passed through unchanged. Tensor parallelism
    (utils/distributed/tensor_parallel.py) replaces it with the weight rows of this rank's heads and the
    all-reduce of the input's gradient (and sets MultiHeadAttn.n_head to the heads of this rank)."""

    def forward(self, x: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
        return x, weight


class MultiHeadAttn(nn.Module):
    """Attention of the current segment over [memory; segment], residual and LayerNorm (post- or pre-LN).

    forward(h, mem, mask, r, r_w_bias, r_bias, band), by attn_type:
      0: r = sinusoid of distances [klen, d_model], r_w_bias / r_bias = the shared u / v biases [H, Dh]
      1: r = learned distance table [T, H, Dh], r_w_bias [H, Dh], r_bias = table [T, H]
      2, 3: positions are already in h and mem; r, r_w_bias, r_bias are unused.
    band = (lo, hi) describes the mask as offsets (key j visible to query i iff lo < j - i <= hi, see
    MemTransformerLM._mask_band); attn_impl 'flex' needs it, the other implementations read the mask. docs
    [klen, bsz]: the keys' document numbers with --reset_mems_at_doc (then the mask is per column,
    [bsz, 1, qlen, klen]); 'flex' reads them instead of that mask.
    """

    attn_impl: str

    def __init__(self, attn_type: int, n_head: int, d_model: int, d_head: int, dropout: float,
                 dropatt: float, pre_lnorm: bool):
        super().__init__()
        self.attn_type = attn_type
        self.attn_impl = "math"                                                  # see ATTN_IMPLS
        self.n_head = n_head
        self.d_head = d_head
        self.scale = 1.0 / math.sqrt(d_head)
        self.pre_lnorm = pre_lnorm
        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False)   # rows: q, k, v
        self.qkv_input = QKVInput()
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False) if attn_type == 0 else None
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.layer_norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.dropatt = nn.Dropout(dropatt)

    def forward(self, h: Tensor, mem: Optional[Tensor], mask: Tensor, r: Tensor, r_w_bias: Tensor,
                r_bias: Tensor, band: Optional[Tuple[int, int]] = None, docs: Optional[Tensor] = None) -> Tensor:
        qlen, bsz = h.size(0), h.size(1)
        n_head, d_head = self.n_head, self.d_head
        hd = n_head * d_head
        cat = h if mem is None else torch.cat([mem, h], 0)                      # [klen, bsz, d_model]
        klen = cat.size(0)
        if self.pre_lnorm:
            cat = self.layer_norm(cat)
        if not torch.jit.is_scripting():
            cat = autocast_input(cat)                                           # one cast for q and k/v
        cat, w = self.qkv_input(cat, self.qkv_net.weight)
        w_q, w_kv = w.split([hd, 2 * hd])       # one split: its backward is one cat, not two zero-filled grads
        q = F.linear(cat[klen - qlen:], w_q).view(qlen, bsz, n_head, d_head)    # queries: current only
        kv = F.linear(cat, w_kv).view(klen, bsz, 2, n_head, d_head)
        q = q.permute(1, 2, 0, 3)                                               # [bsz, H, qlen, Dh]
        k, v = kv.unbind(2)                     # one unbind: its backward is one stack, not two zero-filled
        k = k.permute(1, 2, 0, 3)               # select gradients and an add            # [bsz, H, klen, Dh]
        v = v.permute(1, 2, 0, 3)                                               # [bsz, H, klen, Dh]

        # the position term: q_pos · r_pos (+ pos_bias) for the keys of distances klen-1 .. 0
        q_pos: Optional[Tensor] = None
        r_pos: Optional[Tensor] = None
        pos_bias: Optional[Tensor] = None
        if self.r_net is not None:                                              # type 0
            r_pos = self.r_net(r).view(klen, n_head, d_head)                    # [klen, H, Dh]
            q_pos = (q + r_bias.unsqueeze(1)) * self.scale
            q = q + r_w_bias.unsqueeze(1)
        elif self.attn_type == 1:
            r_pos, pos_bias = last_rows(r, klen), last_rows(r_bias, klen) * self.scale
            q_pos = q * self.scale
            q = q + r_w_bias.unsqueeze(1)

        dropatt = self.dropatt.p
        if not torch.jit.is_scripting() and band is not None and self._fused_applies(docs):
            vec = fused_relative_attention(self.attn_impl, q, k, v, q_pos, r_pos, band, self.scale, docs)
        else:
            pos_scores: Optional[Tensor] = None
            if q_pos is not None and r_pos is not None:
                pos_scores = rel_position_scores(q_pos, r_pos, pos_bias)
            if self.attn_impl == "math":
                vec = attention(q * self.scale, k, v, pos_scores, mask, dropatt, self.training)
            else:
                vec = sdpa_attention(q, k, v, pos_scores, mask, dropatt, self.training, self.scale)
        vec = vec.permute(2, 0, 1, 3).reshape(qlen, bsz, hd)                    # [qlen, bsz, H*Dh]
        out = self.drop(self.o_net(vec))
        if self.pre_lnorm:
            return h + out
        return self.layer_norm(h + out)

    @torch.jit.unused
    def _fused_applies(self, docs: Optional[Tensor] = None) -> bool:
        """The fused relative kernels (utils/model/attention.py) serve attention type 0 without attention
        dropout: 'flex' inside torch.compile only (eagerly it is a slow reference implementation), 'triton'
        always but without document masks (--reset_mems_at_doc); elsewhere they fall back to 'sdpa'."""
        if self.attn_type != 0 or (self.training and self.dropatt.p > 0):
            return False
        return (self.attn_impl == "triton" and docs is None) or (self.attn_impl == "flex"
                                                                 and torch.compiler.is_compiling())


class PositionwiseFF(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear -> Dropout, with residual and LayerNorm (post- or pre-LN)."""

    def __init__(self, d_model: int, d_inner: int, dropout: float, pre_lnorm: bool):
        super().__init__()
        self.pre_lnorm = pre_lnorm
        self.fc1 = nn.Linear(d_model, d_inner)
        self.fc2 = nn.Linear(d_inner, d_model)
        self.drop = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_lnorm:
            return x + self.drop(self.fc2(self.drop(F.relu(self.fc1(self.layer_norm(x))))))
        return self.layer_norm(x + self.drop(self.fc2(self.drop(F.relu(self.fc1(x))))))


class DecoderLayer(nn.Module):
    """Attention, then feed-forward. With checkpoint_activations (training only) the layer keeps only its
    inputs for the backward pass and recomputes the rest there (same dropout masks)."""

    checkpoint_activations: bool

    def __init__(self, attn_type: int, n_head: int, d_model: int, d_head: int, d_inner: int, dropout: float,
                 dropatt: float, pre_lnorm: bool):
        super().__init__()
        self.attn = MultiHeadAttn(attn_type, n_head, d_model, d_head, dropout, dropatt, pre_lnorm)
        self.ff = PositionwiseFF(d_model, d_inner, dropout, pre_lnorm)
        self.checkpoint_activations = False

    def forward(self, h: Tensor, mem: Optional[Tensor], mask: Tensor, r: Tensor, r_w_bias: Tensor,
                r_bias: Tensor, band: Optional[Tuple[int, int]] = None, docs: Optional[Tensor] = None) -> Tensor:
        if not torch.jit.is_scripting() and self.checkpoint_activations and self.training \
                and torch.is_grad_enabled():
            return checkpoint(self.layer, h, mem, mask, r, r_w_bias, r_bias, band, docs, use_reentrant=False)
        return self.layer(h, mem, mask, r, r_w_bias, r_bias, band, docs)

    def layer(self, h: Tensor, mem: Optional[Tensor], mask: Tensor, r: Tensor, r_w_bias: Tensor,
              r_bias: Tensor, band: Optional[Tuple[int, int]] = None, docs: Optional[Tensor] = None) -> Tensor:
        return self.ff(self.attn(h, mem, mask, r, r_w_bias, r_bias, band, docs))


# ---- the model ------------------------------------------------------------------------------------------
class MemTransformerLM(nn.Module):
    """Transformer-XL LM. Constructor arguments and names are the reference's (`MemTransformerLM(**model_config)`);
    `dtype` and `adapt_inp` are accepted and ignored."""

    cutoffs: List[int]
    tie_projs: List[bool]
    varlen_padding: bool
    eod_index: int

    def __init__(self, n_token: int, n_layer: int, n_head: int, d_model: int, d_head: int, d_inner: int,
                 dropout: float, dropatt: float, dtype=None, tie_weight: bool = True, d_embed: Optional[int] = None,
                 div_val: int = 1, tie_projs: List[bool] = [False], pre_lnorm: bool = False,  # noqa: B006
                 tgt_len: Optional[int] = None, ext_len: Optional[int] = None, mem_len: Optional[int] = None,
                 cutoffs: List[int] = [], adapt_inp: bool = False, same_length: bool = False,  # noqa: B006
                 attn_type: int = 0, clamp_len: int = -1, sample_softmax: int = -1):
        super().__init__()
        cutoffs = list(cutoffs or [])                        # copies: the list defaults are never modified
        d_embed = d_model if d_embed is None else d_embed
        tgt_len, ext_len, mem_len = tgt_len or 0, ext_len or 0, mem_len or 0
        if attn_type not in (0, 1, 2, 3):
            raise UserError(f"attn_type must be 0, 1, 2 or 3, got {attn_type}")
        if attn_type in (0, 2) and d_model % 2:
            raise UserError(f"attn_type {attn_type} needs an even d_model for its sinusoid, got {d_model}")
        if attn_type in (1, 3) and tgt_len + ext_len + mem_len < 1:
            raise UserError(f"attn_type {attn_type} needs tgt_len + ext_len + mem_len >= 1 (size of its tables)")
        if sorted(set(cutoffs)) != cutoffs or (cutoffs and (cutoffs[0] < 1 or cutoffs[-1] >= n_token)):
            raise UserError(f"cutoffs must increase strictly within (0, n_token={n_token}), got {cutoffs}")
        if div_val < 1 or (div_val > 1 and d_embed // div_val ** len(cutoffs) < 1):
            raise UserError(f"div_val {div_val} with d_embed {d_embed} leaves a cluster without embedding width")
        if sample_softmax > 0 and cutoffs:
            raise UserError("sample_softmax needs the full softmax: drop the cutoffs (--adaptive)")

        self.n_token = n_token
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_model = d_model
        self.d_head = d_head
        self.d_inner = d_inner
        self.d_embed = d_embed
        self.div_val = div_val
        self.cutoffs: List[int] = cutoffs
        self.tie_weight = tie_weight
        self.tie_projs: List[bool] = normalize_tie_projs(tie_projs or [False], len(cutoffs))
        self.pre_lnorm = pre_lnorm
        self.attn_type = attn_type
        self.tgt_len = tgt_len
        self.ext_len = ext_len
        self.mem_len = mem_len
        self.max_klen = tgt_len + ext_len + mem_len
        self.same_length = same_length
        self.clamp_len = clamp_len
        self.sample_softmax = sample_softmax
        self.varlen_padding = False          # target -1 marks padding (--varlen --compile, utils/model/varlen_padding.py)
        self.dropout = dropout
        self.dropatt = dropatt

        self.word_emb = AdaptiveEmbedding(n_token, d_embed, d_model, cutoffs, div_val=div_val)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList([
            DecoderLayer(attn_type, n_head, d_model, d_head, d_inner, dropout, dropatt, pre_lnorm)
            for _ in range(n_layer)])

        # Positional parameters; those a type does not use are None (TorchScript then drops their branches).
        self.r_w_bias = None
        self.r_r_bias = None
        self.r_emb = None
        self.r_bias = None
        if attn_type == 0:
            self.r_w_bias = nn.Parameter(torch.zeros(n_head, d_head))
            self.r_r_bias = nn.Parameter(torch.zeros(n_head, d_head))
        elif attn_type == 1:
            self.r_emb = nn.Parameter(torch.zeros(n_layer, self.max_klen, n_head, d_head))
            self.r_w_bias = nn.Parameter(torch.zeros(n_layer, n_head, d_head))
            self.r_bias = nn.Parameter(torch.zeros(n_layer, self.max_klen, n_head))
        elif attn_type == 3:
            self.r_emb = nn.Parameter(torch.zeros(n_layer, self.max_klen, d_model))

        self.crit = ProjectedAdaptiveLogSoftmax(n_token, d_embed, d_model, cutoffs, div_val=div_val,
                                                tie_projs=self.tie_projs, tie_weight=tie_weight)
        self.sampler = LogUniformSampler(n_token, sample_softmax) if sample_softmax > 0 else None
        self.eod_index = -1                                   # set_reset_mems_at_doc: -1 = off

    # ---- settings -------------------------------------------------------------------------------------
    @torch.jit.export
    def reset_length(self, tgt_len: int, ext_len: int, mem_len: int):
        if tgt_len < 1:
            raise ValueError(f"tgt_len should be >= 1, but got {tgt_len}")
        if ext_len < 0:
            raise ValueError(f"ext_len should be >= 0, but got {ext_len}")
        if mem_len < 0:
            raise ValueError(f"mem_len should be >= 0, but got {mem_len}")
        self.tgt_len = tgt_len
        self.ext_len = ext_len
        self.mem_len = mem_len

    def update_dropout(self, p: float):
        """Set every dropout except the one on attention probabilities (see update_dropatt)."""
        self.dropout = p
        for name, module in self.named_modules():
            if isinstance(module, nn.Dropout) and not name.endswith("dropatt"):
                module.p = p

    def update_dropatt(self, p: float):
        self.dropatt = p
        for module in self.modules():
            if isinstance(module, MultiHeadAttn):
                module.dropatt.p = p

    def set_attn_impl(self, impl: str):
        """How attention is computed (same results, different kernels): 'math' (explicit matmuls and
        softmax), 'sdpa' (F.scaled_dot_product_attention with the position term as an additive bias),
        'flex' (FlexAttention under torch.compile, the shift done inside the kernel; 'sdpa' elsewhere) or
        'triton' (one fused Triton kernel forward and backward, utils/model/triton_rel_attention.py)."""
        check_attn_impl(impl)
        for layer in self.layers:
            layer.attn.attn_impl = impl

    def set_reset_mems_at_doc(self, eod_index: Optional[int]):
        """--reset_mems_at_doc: tokens attend only within their article, articles closed by the symbol
        `eod_index` (None: off). The memory then carries an extra row of flags (utils/model/documents.py)."""
        if eod_index is not None and not 0 <= eod_index < self.n_token:
            raise UserError(f"the end-of-document id {eod_index} is outside the vocabulary (n_token {self.n_token})")
        self.eod_index = -1 if eod_index is None else int(eod_index)

    def set_checkpoint_activations(self, enabled: bool):
        """Recompute each layer's activations in the backward pass instead of keeping them (training only)."""
        for layer in self.layers:
            layer.checkpoint_activations = bool(enabled)

    @torch.jit.export
    def init_mems(self, bsz: int) -> Optional[Tensor]:
        """Empty memory [n_layer, 0, bsz, d_model], or None when mem_len == 0."""
        if self.mem_len == 0:
            return None
        like = self.word_emb.emb_layers[0].weight
        return torch.zeros(self.n_layer, 0, bsz, self.d_model, dtype=like.dtype, device=like.device)

    # ---- core -----------------------------------------------------------------------------------------
    def _mask_band(self, qlen: int, mlen: int) -> Tuple[int, int]:
        """(lo, hi): query i sees key j exactly when lo < j - i <= hi. Causal over [memory; segment]
        (hi = mlen); with same_length every query sees at most mem_len + 1 keys (the mem_len before it and
        itself); otherwise lo is below every j - i."""
        klen = mlen + qlen
        if not self.same_length:
            return -klen, mlen
        mask_len = klen - self.mem_len - 1
        return -(qlen - mask_len if mask_len > 0 else qlen), mlen

    def _attn_mask(self, qlen: int, mlen: int, device: torch.device) -> Tensor:
        """[qlen, klen] bool, True = key not visible (outside the band of _mask_band)."""
        lo, hi = self._mask_band(qlen, mlen)
        ones = torch.ones(qlen, mlen + qlen, dtype=torch.bool, device=device)
        return torch.triu(ones, diagonal=1 + hi) | torch.tril(ones, diagonal=lo)

    def _sinusoid_of_distances(self, klen: int, like: Tensor) -> Tensor:
        """Sinusoid of the distances klen-1 .. 0 (clamped to clamp_len) -> [klen, d_model], like's dtype."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        pos_seq = torch.arange(klen - 1, -1, -1.0, dtype=dtype, device=like.device)
        if self.clamp_len > 0:
            pos_seq = pos_seq.clamp(max=self.clamp_len)
        return sinusoid_embedding(pos_seq, self.d_model).to(like.dtype)

    @torch.jit.unused
    def _embed(self, data: Tensor) -> Tensor:
        """The embedding; compiled for the CPU with a tied table whose output layer runs eagerly (the exact-size
        adaptive softmax), outside the graph too, so that the table still gets one gradient buffer
        (utils/model/shared_table_grad.py)."""
        crit = self.crit
        if (torch.compiler.is_compiling() and self.tie_weight and self.div_val == 1 and len(crit.cutoffs) > 0
                and crit.tail_capacity is None and torch.is_grad_enabled()
                and self.word_emb.emb_layers[0].weight.device.type == "cpu"
                and not hasattr(self.word_emb.emb_layers[0].weight, "device_mesh")):
            return embed_outside_the_graph(self.word_emb, data)
        return self.word_emb(data)

    def _forward(self, data: Tensor, mems: Optional[Tensor], n_pad: Optional[Tensor] = None
                 ) -> Tuple[Tensor, Optional[Tensor]]:
        """data [qlen, bsz] -> final hidden states [qlen, bsz, d_model] (after dropout), new memory; with n_pad
        (a tensor) the last n_pad positions are padding and the memory is taken before them."""
        qlen = data.size(0)
        mlen = 0 if mems is None else mems.size(1)
        klen = mlen + qlen
        word_emb = self.word_emb(data) if torch.jit.is_scripting() else self._embed(data)  # [qlen, bsz, d_model]
        mask = self._attn_mask(qlen, mlen, data.device)                         # [qlen, klen]
        docs: Optional[Tensor] = None
        if self.eod_index >= 0:                  # --reset_mems_at_doc: also hide the keys of other articles
            docs = document_numbers(data, self.eod_index, mlen, memory_flags(mems, self.n_layer))
            mask = mask | document_mask(docs, qlen)                             # [bsz, 1, qlen, klen]
        if mems is not None and mems.size(0) > self.n_layer:                    # without its row of flags
            mems = mems[:self.n_layer]
        band = self._mask_band(qlen, mlen)
        unused = word_emb.new_empty(0)
        mem_list: List[Optional[Tensor]] = []
        for i in range(self.n_layer):
            mem_list.append(mems[i] if mems is not None and mlen > 0 else None)  # [mlen, bsz, d_model]
        hids: List[Tensor] = []                                                 # each layer's input

        if self.r_r_bias is not None and self.r_w_bias is not None:             # type 0
            # the reference's order of dropout draws: the embeddings' mask, then the positions' (same masks for
            # the same random state: scripts/compare_reference_train.py)
            core_out = self.drop(word_emb)
            pos_emb = self.drop(self._sinusoid_of_distances(klen, word_emb))   # [klen, d_model]
            if not torch.jit.is_scripting():
                pos_emb = autocast_input(pos_emb)                               # cast once, not per layer
            for i, layer in enumerate(self.layers):
                hids.append(core_out.detach())
                core_out = layer(core_out, mem_list[i], mask, pos_emb, self.r_w_bias, self.r_r_bias, band, docs)
        elif self.r_bias is not None and self.r_emb is not None and self.r_w_bias is not None:   # type 1
            core_out = self.drop(word_emb)
            for i, layer in enumerate(self.layers):
                hids.append(core_out.detach())
                r_emb, r_bias = self.r_emb[i], self.r_bias[i]                   # [max_klen, H, Dh], [max_klen, H]
                if self.clamp_len > 0:
                    r_emb, r_bias = r_emb[-self.clamp_len:], r_bias[-self.clamp_len:]
                core_out = layer(core_out, mem_list[i], mask, r_emb, self.r_w_bias[i], r_bias, band)
        elif self.r_emb is not None:                                            # type 3
            core_out = self.drop(word_emb)
            for i, layer in enumerate(self.layers):
                hids.append(core_out.detach())
                pos = last_rows(self.r_emb[i], klen).unsqueeze(1)               # [klen, 1, d_model]
                mem_i = mem_list[i]
                if mem_i is not None:
                    mem_i = mem_i + pos[:mlen]
                core_out = layer(core_out + pos[mlen:], mem_i, mask, unused, unused, unused, band)
        else:                                                                   # type 2
            pos_emb = self._sinusoid_of_distances(klen, word_emb).unsqueeze(1)   # [klen, 1, d_model]
            core_out = self.drop(word_emb + pos_emb[mlen:])
            for i, layer in enumerate(self.layers):
                mem_i = mem_list[i]
                if i == 0:
                    hids.append(word_emb.detach())                              # position-free input
                    if mem_i is not None:
                        mem_i = self.drop(mem_i + pos_emb[:mlen])
                else:
                    hids.append(core_out.detach())
                core_out = layer(core_out, mem_i, mask, unused, unused, unused, band)

        core_out = self.drop(core_out)
        if n_pad is not None and mems is not None:                             # (never with document flags)
            return core_out, padded_memory(hids, mems, n_pad, self.ext_len, self.mem_len)
        new_mems = self._update_mems(hids, mems, qlen, mlen)
        if docs is not None and new_mems is not None:
            new_mems = with_memory_flags(new_mems, docs, data, self.eod_index, max(0, qlen - self.ext_len))
        return core_out, new_mems

    def _update_mems(self, hids: List[Tensor], mems: Optional[Tensor], qlen: int, mlen: int) -> Optional[Tensor]:
        """Keep the last mem_len of the mlen + qlen positions, leaving out the last ext_len (re-fed next time)."""
        if self.mem_len == 0:
            return None
        end = mlen + max(0, qlen - self.ext_len)
        beg = max(0, end - self.mem_len)
        new = torch.stack([h[max(0, beg - mlen):end - mlen] for h in hids])     # [n_layer, *, bsz, d_model]
        if beg < mlen and mems is not None:
            new = torch.cat([mems[:, beg:], new], 1)
        return new.detach()

    # ---- outputs --------------------------------------------------------------------------------------
    def forward(self, data: Tensor, target: Optional[Tensor], mems: Optional[Tensor]
                ) -> Tuple[Tensor, Optional[Tensor]]:
        """-> (NLL [tgt_len, bsz] in token order, new mems). Without a target: (hidden [qlen, bsz, d_model], mems).

        NLL is float32 (float64 for a float64 model). In training mode with sample_softmax > 0 it is the
        sampled-softmax loss; otherwise the exact (adaptive) softmax.
        """
        n_pad: Optional[Tensor] = None
        if self.varlen_padding and self.eod_index < 0 and target is not None and mems is not None \
                and mems.size(1) == self.mem_len:
            n_pad = (target[:, 0] < 0).sum()                                   # padded positions at the end
            target = target.clamp(min=0)
        hidden, new_mems = self._forward(data, mems, n_pad)
        if target is None:
            return hidden, new_mems
        tgt_len = target.size(0)
        pred_hid = hidden[hidden.size(0) - tgt_len:]                            # [tgt_len, bsz, d_model]
        if not torch.jit.is_scripting():
            pred_hid = autocast_input(pred_hid)                                 # once, not per softmax cluster
        emb_weights, emb_projs = self.word_emb.weights(), self.word_emb.projs()
        if self.sampler is not None and self.training:
            weights, biases, projs = self.crit.cluster_params(emb_weights, emb_projs)
            true_log_q, samp_log_q, samples = self.sampler.sample(target)
            logits = sample_logits(weights[0], biases[0], projs[0], pred_hid, target,
                                   true_log_q, samp_log_q, samples)             # [tgt_len, bsz, 1 + S]
            if logits.dtype == torch.float16 or logits.dtype == torch.bfloat16:
                logits = logits.float()
            return -F.log_softmax(logits, dim=-1)[:, :, 0], new_mems
        nll = self.crit(pred_hid.reshape(-1, self.d_model), target.reshape(-1), emb_weights, emb_projs)
        return nll.view(tgt_len, -1), new_mems

    @torch.jit.export
    def next_token_logprobs(self, data: Tensor, mems: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """Log-probabilities [bsz, n_token] of the token after the last position of data, and the new mems."""
        hidden, new_mems = self._forward(data, mems)
        logp = self.crit.log_probs(hidden[-1], self.word_emb.weights(), self.word_emb.projs())
        return logp, new_mems
