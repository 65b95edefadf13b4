"""Sampling text from a Transformer-XL that carries its memory: the prompt in segments, then one token per step.

    for step in generate(model, prompt_ids, n_tokens=100, n_samples=2, temperature=0.8, top_p=0.9,
                         generator=torch.Generator().manual_seed(1)):
        step.tokens      # [n_samples] the tokens drawn at this step
        step.logprobs    # [n_samples] their log-probabilities under the model (before temperature / top-k / top-p)

The prompt is fed in segments of `segment_len` tokens carrying the memory, as in evaluation; from then on
each forward step feeds only the newest token of every sample, which attends to itself and to the memory
(each layer's input at the last `mem_len` positions). A step therefore costs the same whether 10 or 10,000
tokens came before. Each token sees at most the `mem_len` tokens before it, layer by layer: the context of
a step is what evaluation with `--same_length` gives a token, not the whole text.

With `kv_cache=True` (generate.py's default) the keys and values of the memory are kept from step to step
(inference/kv_cache.py): a step computes only the new token's own projections, so its cost no longer grows
with mem_len's projections (attention types 0 and 1, eager model; otherwise generation recomputes).

Works with the eager model, a scripted one and a loaded TorchScript file (reset_length, init_mems and
next_token_logprobs are exported).
"""
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from inference.kv_cache import MemoryKVCache, supports as kv_cache_supports
from utils.io.errors import UserError


@dataclass
class Step:
    index: int          # 0 for the first generated token
    tokens: Tensor      # [n_samples] int64
    logprobs: Tensor    # [n_samples] log-probability of each token under the model


def filter_logits(logprobs: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """[n, V] log-probabilities -> [n, V] logits to sample from: divided by the temperature, then only the
    top_k most likely tokens (0: all) and the smallest set of most likely tokens whose probability reaches
    top_p (1: all) stay; the others are -inf. At least the most likely token always stays."""
    logits = logprobs if logprobs.dtype == torch.float64 else logprobs.float()
    logits = logits / temperature
    vocab = logits.size(-1)
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs          # probability of the more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logprobs: Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> Tensor:
    """One token per row of [n, V] log-probabilities -> [n] int64; temperature 0 picks the most likely."""
    if temperature == 0:
        return logprobs.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logprobs, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0: always the most likely token), got {temperature}")
    if top_k < 0:
        raise UserError(f"--top_k must be >= 0 (0: no limit), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be within (0, 1] (1: no limit), got {top_p}")


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: Sequence[int], n_tokens: int, n_samples: int = 1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, mem_len: Optional[int] = None,
             segment_len: Optional[int] = None, generator: Optional[torch.Generator] = None,
             device: Optional[torch.device] = None, kv_cache: bool = False) -> Iterator[Step]:
    """Yield `n_tokens` steps of `n_samples` continuations of `prompt_ids` (see the module docstring).

    mem_len: memory length during generation (default: the model's); segment_len: the prompt is fed in
    segments of this length (default: the model's tgt_len). The model's lengths are restored at the end.
    kv_cache: keep the memory's keys and values between steps (see the module docstring).
    """
    check_sampling(temperature, top_k, top_p)
    if len(prompt_ids) == 0:
        raise UserError("the prompt is empty: generation needs at least one token to start from")
    if n_tokens < 1 or n_samples < 1:
        raise UserError(f"the number of tokens and of samples must be >= 1, got {n_tokens} and {n_samples}")
    saved = (int(model.tgt_len), int(model.ext_len), int(model.mem_len))
    mem_len = saved[2] if mem_len is None else mem_len
    segment_len = saved[0] if segment_len is None else segment_len
    if mem_len < 1:
        raise UserError("generation carries the memory from step to step: --mem_len must be >= 1")
    if segment_len < 1:
        raise UserError(f"--tgt_len (the prompt's segment length) must be >= 1, got {segment_len}")
    if device is None:
        device = next(model.parameters()).device
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=device)
    try:
        # the prompt, once, in segments; its memory and last log-probabilities are then shared by all samples
        model.reset_length(segment_len, 0, mem_len)
        mems = model.init_mems(1)
        for start in range(0, prompt.numel(), segment_len):
            logprobs, mems = model.next_token_logprobs(prompt[start:start + segment_len].unsqueeze(1), mems)
        mems = mems.expand(-1, -1, n_samples, -1).contiguous()           # [n_layer, mlen, n_samples, d_model]
        logprobs = logprobs.expand(n_samples, -1)                        # [n_samples, n_token]
        # one token per step
        model.reset_length(1, 0, mem_len)
        cache = MemoryKVCache(model) if kv_cache and kv_cache_supports(model) else None
        for index in range(n_tokens):
            tokens = sample_next(logprobs, temperature, top_k, top_p, generator)
            yield Step(index, tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1))
            if index + 1 < n_tokens:
                if cache is not None:
                    logprobs, mems = cache.step(tokens.unsqueeze(0), mems)
                else:
                    logprobs, mems = model.next_token_logprobs(tokens.unsqueeze(0), mems)
    finally:
        model.reset_length(*saved)
