"""Sampled softmax for training (`--sample_softmax N`): log-uniform candidate sampler and sampled logits.

P(k) = (log(k + 2) - log(k + 1)) / log(V + 1) over ids 0..V-1 (frequent words first). Each call draws 2N ids
with replacement and keeps the distinct ones; every logit is corrected by log Q(k) = log(1 - (1 - P(k))^(2N)),
the log expected number of times k is drawn. The loss is -log_softmax([true, samples])[0].

Unlike the reference, sampled logits use the same output weights, bias and projection as the exact softmax
(so evaluation with the exact softmax measures what training optimized), and accidental hits are masked
with -inf (the reference's -1e30 overflows float16).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LogUniformSampler(nn.Module):
    def __init__(self, range_max: int, n_sample: int):
        super().__init__()
        self.range_max = range_max
        self.n_sample = n_sample
        k = torch.arange(range_max, dtype=torch.float64)
        dist = ((k + 2).log() - (k + 1).log()) / math.log(range_max + 1)          # [V], sums to 1
        log_q = torch.log(-torch.expm1(2 * n_sample * torch.log1p(-dist)))       # log expected count
        self.register_buffer("dist", dist.float(), persistent=False)
        self.register_buffer("log_q", log_q.float(), persistent=False)

    def sample(self, labels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """labels [*] -> (log Q(labels) [*], log Q(samples) [S], samples [S]) with S <= 2 * n_sample."""
        with torch.no_grad():
            samples = torch.multinomial(self.dist.float(), 2 * self.n_sample, replacement=True).unique()
            samples = samples.to(labels.device)
            return self.log_q[labels], self.log_q[samples], samples


def sample_logits(weight: Tensor, bias: Tensor, proj: Optional[Tensor], hidden: Tensor, labels: Tensor,
                  true_log_q: Tensor, samp_log_q: Tensor, samples: Tensor) -> Tensor:
    """Logits [T, B, 1 + S]: column 0 the true token, then the sampled ones, each minus its log Q.

    weight [V, d_e], bias [V], proj [d_proj, d_e] or None, hidden [T, B, d_proj], labels [T, B].
    A sampled id equal to the row's label gets -inf, so it cannot compete with the true token.
    """
    if proj is not None:
        hidden = torch.matmul(hidden, proj)                                       # [T, B, d_e]
    true_logit = (F.embedding(labels, weight) * hidden).sum(-1) + bias[labels] - true_log_q.to(hidden.dtype)
    samp_logit = F.linear(hidden, F.embedding(samples, weight), bias[samples]) - samp_log_q.to(hidden.dtype)
    hit = labels.unsqueeze(-1) == samples                                         # [T, B, S]
    samp_logit = samp_logit.masked_fill(hit, float("-inf"))
    return torch.cat([true_logit.unsqueeze(-1), samp_logit], -1)
