"""Adaptive input embedding and projected adaptive log-softmax, computing what the reference computes.

Vocabulary clusters: `bounds = [0] + cutoffs + [n_token]`; cluster i holds token ids [bounds[i], bounds[i+1]).
With `div_val > 1` cluster i has its own table of width `d_embed // div_val**i` and a projection to d_proj
(= d_model). With `div_val == 1` there is one table of width d_embed (projected only when d_embed != d_proj).

The output layer ("crit") scores a hidden state h [d_proj] against token v of cluster i as
    logit(v) = h · P_i · W_vᵀ + b_v            (P_i = None means no projection: h · W_vᵀ + b_v)
The head softmax covers the shortlist (cluster 0) plus one logit per tail cluster; tail cluster i uses head
column `head_size - i` (reversed order, as in the reference). log p(v in cluster i > 0) =
log p_head(cluster i) + log p_tail_i(v). Without cutoffs this is a plain full softmax.

Tied output weights (tie_weight) and tied projections (tie_projs[i]) are not separate parameters: the model
passes the embedding's weights and projections to the crit on every call, so they stay tied through
state_dict round trips, `.to()` and TorchScript.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.model import shared_table_grad
from utils.model.adaptive_nll import adaptive_nll, cluster_ids as _cluster_ids, shared_table_adaptive_nll


def normalize_tie_projs(tie_projs: Optional[List[bool]], n_clusters: int) -> List[bool]:
    """One flag per cluster (head first); missing flags mean untied, extra ones are ignored."""
    flags = [bool(t) for t in (tie_projs or [])][: n_clusters + 1]
    return flags + [False] * (n_clusters + 1 - len(flags))


def own_out_proj_clusters(d_embed: int, d_proj: int, div_val: int, tie_projs: List[bool]) -> List[int]:
    """Clusters (in order) whose output projection is a parameter of the crit itself.

    A cluster has an own projection when its projection is not tied and a projection exists at all
    (div_val > 1, or div_val == 1 with d_embed != d_proj). Shared by the crit and reference_compat.
    """
    if div_val == 1 and d_embed == d_proj:
        return []
    return [i for i, tied in enumerate(tie_projs) if not tied]


def _float_logits(x: Tensor) -> Tensor:
    """Half-precision logits go to float32 before any softmax (also under autocast); float64 stays."""
    if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        return x.float()
    return x


def _project(hidden: Tensor, proj: Optional[Tensor]) -> Tensor:
    return hidden if proj is None else torch.matmul(hidden, proj)


class AdaptiveEmbedding(nn.Module):
    """Token ids [*] -> embeddings [*, d_proj], scaled by sqrt(d_proj)."""

    bounds: List[int]

    def __init__(self, n_token: int, d_embed: int, d_proj: int, cutoffs: List[int], div_val: int = 1):
        super().__init__()
        self.n_token = n_token
        self.d_embed = d_embed
        self.d_proj = d_proj
        self.div_val = div_val
        self.bounds: List[int] = [0] + list(cutoffs) + [n_token]
        self.emb_scale = d_proj ** 0.5

        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterList()
        if div_val == 1:
            self.emb_layers.append(nn.Embedding(n_token, d_embed))
            if d_proj != d_embed:
                self.emb_projs.append(nn.Parameter(torch.zeros(d_proj, d_embed)))
        else:
            for i in range(len(self.bounds) - 1):
                d_emb_i = d_embed // (div_val ** i)
                self.emb_layers.append(nn.Embedding(self.bounds[i + 1] - self.bounds[i], d_emb_i))
                self.emb_projs.append(nn.Parameter(torch.zeros(d_proj, d_emb_i)))

    def weights(self) -> List[Tensor]:
        """The embedding tables, one per cluster (one in all when div_val == 1)."""
        out: List[Tensor] = []
        for layer in self.emb_layers:
            out.append(layer.weight)
        return out

    def projs(self) -> List[Tensor]:
        """The projections [d_proj, d_emb_i]: one per cluster, one in all, or none (div_val 1, d_embed == d_proj)."""
        out: List[Tensor] = []
        for p in self.emb_projs:
            out.append(p)
        return out

    @torch.jit.unused
    def _lookup(self, tokens: Tensor) -> Tensor:
        """The table lookup; with a tied output layer its gradient goes into that layer's table-sized buffer
        (utils/model/shared_table_grad.py)."""
        layer = self.emb_layers[0]
        if layer.padding_idx is not None or layer.max_norm is not None or layer.scale_grad_by_freq or layer.sparse:
            return layer(tokens)
        return shared_table_grad.lookup(layer.weight, tokens)

    def forward(self, tokens: Tensor) -> Tensor:
        shape = list(tokens.size()) + [self.d_proj]
        projs = self.projs()
        if self.div_val == 1:
            if torch.jit.is_scripting():
                embed = self.emb_layers[0](tokens)                               # [*, d_embed]
            else:
                embed = self._lookup(tokens)
            if len(projs) > 0:
                embed = F.linear(embed, projs[0])                                # [*, d_proj]
            return embed * self.emb_scale

        # Static shapes (no nonzero, no read-back, one compiled graph): every cluster embeds every token at
        # a valid row and keeps the tokens that are its own; the others add exact zeros.
        flat = tokens.reshape(-1)                                                # [N]
        out = torch.zeros(flat.size(0), self.d_proj, dtype=projs[0].dtype, device=flat.device)
        for i, layer in enumerate(self.emb_layers):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            inside = (flat >= lo) & (flat < hi)                                  # tokens of cluster i
            emb_i = F.linear(layer(torch.where(inside, flat - lo, 0)), projs[i])  # [N, d_proj]
            out = out + torch.where(inside.unsqueeze(1), emb_i.to(out.dtype), 0.0)
        return (out * self.emb_scale).view(shape)


class ProjectedAdaptiveLogSoftmax(nn.Module):
    """Log-probabilities and per-token NLL of the (projected, adaptive) output layer.

    Every method takes `emb_weights` / `emb_projs` (AdaptiveEmbedding.weights() / .projs()) for the tied parts.
    NLL and log-probabilities come out in float32 (float64 for a float64 model), in the original token order.
    """

    cutoffs: List[int]
    bounds: List[int]
    tie_projs: List[bool]
    own_proj_index: List[int]
    tail_capacity: Optional[float]

    def __init__(self, n_token: int, d_embed: int, d_proj: int, cutoffs: List[int], div_val: int = 1,
                 tie_projs: Optional[List[bool]] = None, tie_weight: bool = False):
        super().__init__()
        self.n_token = n_token
        self.d_embed = d_embed
        self.d_proj = d_proj
        self.div_val = div_val
        self.tie_weight = tie_weight
        self.cutoffs: List[int] = list(cutoffs)
        self.bounds: List[int] = [0] + list(cutoffs) + [n_token]
        self.n_clusters = len(cutoffs)
        self.shortlist_size = self.bounds[1]
        self.head_size = self.shortlist_size + self.n_clusters
        self.tie_projs: List[bool] = normalize_tie_projs(tie_projs, self.n_clusters)

        if self.n_clusters > 0:
            self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, d_embed))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
        else:
            self.cluster_weight = None
            self.cluster_bias = None

        # bf16 compute copies of output_parameters() during a bf16 training step (set and cleared by
        # utils/training/compute_weights.py, refreshed with the other weights): the NLL uses them instead of
        # casting the float32 parameters itself; gradients still go to the parameters
        self.compute_copies: Optional[List[Tensor]] = None

        # Own (untied) parameters. div_val == 1: one weight / bias over the whole vocabulary.
        self.out_layers_weights = nn.ParameterList()
        self.out_layers_biases = nn.ParameterList()
        if div_val == 1:
            self.out_layers_biases.append(nn.Parameter(torch.zeros(n_token)))
            if not tie_weight:
                self.out_layers_weights.append(nn.Parameter(torch.zeros(n_token, d_embed)))
        else:
            for i in range(self.n_clusters + 1):
                size_i, d_emb_i = self.bounds[i + 1] - self.bounds[i], d_embed // (div_val ** i)
                self.out_layers_biases.append(nn.Parameter(torch.zeros(size_i)))
                if not tie_weight:
                    self.out_layers_weights.append(nn.Parameter(torch.zeros(size_i, d_emb_i)))

        # Untied projections, stored densely; own_proj_index[i] = position in out_projs, or -1.
        own = own_out_proj_clusters(d_embed, d_proj, div_val, self.tie_projs)
        self.own_proj_index: List[int] = [own.index(i) if i in own else -1 for i in range(self.n_clusters + 1)]
        self.has_proj = not (div_val == 1 and d_embed == d_proj)
        self.out_projs = nn.ParameterList()
        for i in own:
            d_emb_i = d_embed if div_val == 1 else d_embed // (div_val ** i)
            self.out_projs.append(nn.Parameter(torch.zeros(d_proj, d_emb_i)))
        # rows per tail cluster as a fraction of the tokens (utils/model/adaptive_nll.py); None: exact sizes,
        # read back once per call (under torch.compile that part runs eagerly: one graph break)
        self.tail_capacity: Optional[float] = None

    # ---- parameters of each cluster -------------------------------------------------------------------
    def cluster_projs(self, emb_projs: List[Tensor]) -> List[Optional[Tensor]]:
        """Per cluster: the projection [d_proj, d_emb_i] or None."""
        own_p: List[Tensor] = []
        for p in self.out_projs:
            own_p.append(p)
        projs: List[Optional[Tensor]] = []
        for i in range(self.n_clusters + 1):
            proj_i: Optional[Tensor] = None
            if self.has_proj:
                if self.tie_projs[i]:
                    proj_i = emb_projs[0] if len(emb_projs) == 1 else emb_projs[i]
                else:
                    proj_i = own_p[self.own_proj_index[i]]
            projs.append(proj_i)
        return projs

    def cluster_params(self, emb_weights: List[Tensor], emb_projs: List[Tensor]
                       ) -> Tuple[List[Tensor], List[Tensor], List[Optional[Tensor]]]:
        """Per cluster: weight [size_i, d_emb_i], bias [size_i], projection [d_proj, d_emb_i] or None.

        Cluster 0 is the head: shortlist rows followed by the cluster rows (cluster_weight / cluster_bias).
        """
        own_w: List[Tensor] = []
        for p in self.out_layers_weights:
            own_w.append(p)
        own_b: List[Tensor] = []
        for p in self.out_layers_biases:
            own_b.append(p)
        all_w = emb_weights if self.tie_weight else own_w

        weights: List[Tensor] = []
        biases: List[Tensor] = []
        for i in range(self.n_clusters + 1):
            if self.div_val == 1:
                lo, hi = self.bounds[i], self.bounds[i + 1]
                w_i, b_i = all_w[0][lo:hi], own_b[0][lo:hi]
            else:
                w_i, b_i = all_w[i], own_b[i]
            weights.append(w_i)
            biases.append(b_i)
        projs = self.cluster_projs(emb_projs)

        cluster_weight, cluster_bias = self.cluster_weight, self.cluster_bias
        if cluster_weight is not None and cluster_bias is not None:
            weights[0] = torch.cat([weights[0], cluster_weight], 0)
            biases[0] = torch.cat([biases[0], cluster_bias], 0)
        return weights, biases, projs

    @staticmethod
    def _logits(hidden: Tensor, weight: Tensor, bias: Tensor, proj: Optional[Tensor]) -> Tensor:
        """hidden [N, d_proj] -> [N, V_i] = hidden · proj · weightᵀ + bias."""
        if proj is not None:
            hidden = torch.matmul(hidden, proj)                                  # [N, d_emb_i]
        return F.linear(hidden, weight, bias)

    # ---- outputs ----------------------------------------------------------------------------------------
    def forward(self, hidden: Tensor, target: Tensor, emb_weights: List[Tensor], emb_projs: List[Tensor]) -> Tensor:
        """hidden [N, d_proj], target [N] -> NLL [N] in the original order."""
        if not torch.jit.is_scripting():
            return self._nll(hidden, target, emb_weights, emb_projs)
        weights, biases, projs = self.cluster_params(emb_weights, emb_projs)
        # TorchScript: the same NLL with autograd's own ops
        head_logit = _float_logits(self._logits(hidden, weights[0], biases[0], projs[0]))   # [N, head_size]
        if self.n_clusters == 0:
            return F.cross_entropy(head_logit, target, reduction="none")

        # cluster id of every target, and the head column that scores it (shortlist id or head_size - i)
        cluster = _cluster_ids(target, self.cutoffs)
        head_col = torch.where(cluster == 0, target, self.head_size - cluster)
        logprob = F.log_softmax(head_logit, dim=1).gather(1, head_col.unsqueeze(1)).squeeze(1)   # [N]
        for i in range(1, self.n_clusters + 1):
            idx = (cluster == i).nonzero().squeeze(1)                            # positions in tail cluster i
            if idx.numel() == 0:
                continue
            tail_logit = _float_logits(self._logits(hidden.index_select(0, idx), weights[i], biases[i], projs[i]))
            tail_target = target.index_select(0, idx) - self.bounds[i]
            tail_lp = F.log_softmax(tail_logit, dim=1).gather(1, tail_target.unsqueeze(1)).squeeze(1)
            logprob = logprob.index_add(0, idx, tail_lp)
        return -logprob

    @torch.jit.unused
    def _nll(self, hidden: Tensor, target: Tensor, emb_weights: List[Tensor], emb_projs: List[Tensor]) -> Tensor:
        """The NLL (utils/model/adaptive_nll.py); with div_val 1 and clusters, one gradient buffer for the shared
        table. With a tail capacity: static shapes, no read-back, no graph break. Without (the default): exact
        cluster sizes, read back once; under torch.compile that part runs eagerly (a graph break), because a
        capacity of 1 (exact for any batch) would cost a tail cluster's logits for every token (for the
        WikiText-103 cutoffs, more than the rest of the model)."""
        if self.tail_capacity is None and self.cutoffs and torch.compiler.is_compiling():
            return _exact_nll_eagerly(self, hidden, target, emb_weights, emb_projs)
        return self._nll_with(hidden, target, emb_weights, emb_projs, self.tail_capacity)

    @torch.jit.unused
    def output_parameters(self, emb_weights: List[Tensor]) -> List[Tensor]:
        """The parameters the NLL casts whole to the matmul dtype (div_val 1: the table, its bias and the
        cluster rows; [] for div_val > 1), in the order of `compute_copies`."""
        if self.div_val != 1:
            return []
        table = emb_weights[0] if self.tie_weight else self.out_layers_weights[0]
        params = [table, self.out_layers_biases[0]]
        if self.cluster_weight is not None and self.cluster_bias is not None:
            params += [self.cluster_weight, self.cluster_bias]
        return params

    @torch.jit.unused
    def _nll_with(self, hidden: Tensor, target: Tensor, emb_weights: List[Tensor], emb_projs: List[Tensor],
                  capacity: Optional[float]) -> Tensor:
        cluster_weight, cluster_bias = self.cluster_weight, self.cluster_bias
        copies = self.compute_copies if self.div_val == 1 else None
        if self.div_val == 1 and cluster_weight is not None and cluster_bias is not None:
            table = emb_weights[0] if self.tie_weight else self.out_layers_weights[0]
            return shared_table_adaptive_nll(hidden, target, table, self.out_layers_biases[0], cluster_weight,
                                             cluster_bias, self.cluster_projs(emb_projs), self.cutoffs, capacity,
                                             copies)
        weights, biases, projs = self.cluster_params(emb_weights, emb_projs)
        return adaptive_nll(hidden, target, weights, biases, projs, self.cutoffs, self.head_size, capacity,
                            copies if not self.cutoffs else None)

    def log_probs(self, hidden: Tensor, emb_weights: List[Tensor], emb_projs: List[Tensor]) -> Tensor:
        """hidden [N, d_proj] -> log-probabilities [N, n_token], built cluster by cluster."""
        weights, biases, projs = self.cluster_params(emb_weights, emb_projs)
        head_lp = F.log_softmax(_float_logits(self._logits(hidden, weights[0], biases[0], projs[0])), dim=1)
        if self.n_clusters == 0:
            return head_lp
        parts: List[Tensor] = [head_lp[:, : self.shortlist_size]]
        for i in range(1, self.n_clusters + 1):
            tail_lp = F.log_softmax(_float_logits(self._logits(hidden, weights[i], biases[i], projs[i])), dim=1)
            parts.append(head_lp[:, self.head_size - i].unsqueeze(1) + tail_lp)
        return torch.cat(parts, dim=1)


@torch.compiler.disable
def _exact_nll_eagerly(crit: ProjectedAdaptiveLogSoftmax, hidden: Tensor, target: Tensor, emb_weights: List[Tensor],
                       emb_projs: List[Tensor]) -> Tensor:
    """The exact-size NLL outside the compiled graph (its shapes depend on the data)."""
    return crit._nll_with(hidden, target, emb_weights, emb_projs, None)
