"""--reset_mems_at_doc: attention that stays inside each article of a stream whose articles end with an
end-of-document symbol (`<eod>` of scripts/prepare_corpus.py, `--dataset prepared`).

Document numbers: every position of a batch column gets the number of end-of-document symbols before it in
that column; the symbol itself belongs to the article it closes. A query sees a key exactly when the model's
mask allows it (causal, same_length) and both have the same document number. A token therefore sees only
earlier tokens of its own article, in memory or in the current segment; the memory of an article that ended
is, for that column, as good as gone (other columns keep theirs). Zeroing the memory instead would not do:
zero keys are still attended to.

What the memory carries: document numbers only grow along a column, so a memory position can only ever be
seen again if it belongs to the article still open at the memory's end (the article of the next token). The
memory keeps that one flag per position and column (1 = open article, 0 = an article that has ended) as one
extra row of the memory tensor: [n_layer + 1, mlen, bsz, d_model], row n_layer holding the flag repeated over
d_model. So the flags go wherever the memory goes (batch chunks, DDP ranks, checkpoints and exact resume,
--swap_mem) with no code of their own, at 1 / n_layer more memory; 0 and 1 are exact in every float dtype.
A memory without that row (written by a run without the flag) counts as the open article's.

Everything is tensor arithmetic on the ids (no host read-back, no data-dependent shapes), so it compiles
without graph breaks. Relative positions (attention types 0 and 1) make an article in the stream score
exactly as that article alone from an empty memory, as long as the model's window covers the article's
earlier tokens; types 2 and 3 keep their window positions (absolute within the window), so there the flag
guarantees only that nothing from another article is seen.
"""
from typing import Optional

import torch
from torch import Tensor


def memory_flags(mems: Optional[Tensor], n_layer: int) -> Optional[Tensor]:
    """The open-article flags [mlen, bsz] of a memory with the extra row, None without it (or no memory)."""
    if mems is None or mems.size(0) <= n_layer or mems.size(1) == 0:
        return None
    return mems[n_layer, :, :, 0]


def document_numbers(data: Tensor, eod: int, mlen: int, flags: Optional[Tensor]) -> Tensor:
    """[mlen + qlen, bsz] int64 document numbers of [memory; data], counted from the first token of data (0):
    memory positions of the open article 0, of an ended one -1 (all 0 when flags is None); data positions the
    number of end-of-document symbols before them in the segment."""
    is_eod = (data == eod).to(torch.int64)                                      # [qlen, bsz]
    docs = torch.cumsum(is_eod, 0) - is_eod
    if mlen == 0:
        return docs
    if flags is None:
        mem_docs = torch.zeros(mlen, data.size(1), dtype=torch.int64, device=data.device)
    else:
        mem_docs = (flags > 0.5).to(torch.int64) - 1                            # [mlen, bsz]: 0 or -1
    return torch.cat([mem_docs, docs], 0)


def document_mask(docs: Tensor, qlen: int) -> Tensor:
    """[bsz, 1, qlen, klen] bool, True where query i and key j belong to different documents (not visible);
    broadcasts over the heads of the attention scores [bsz, H, qlen, klen]."""
    keys = docs.t()                                                             # [bsz, klen]
    queries = keys[:, keys.size(1) - qlen:]                                     # [bsz, qlen]
    return (queries.unsqueeze(2) != keys.unsqueeze(1)).unsqueeze(1)


def with_memory_flags(new_mems: Tensor, docs: Tensor, data: Tensor, eod: int, kept: int) -> Tensor:
    """new_mems [n_layer, m, bsz, d_model] (the last m of the first mlen + kept positions of [memory; data])
    with the open-article flags of those positions as row n_layer: a position is open when its document is
    the one of the token after the kept part, i.e. after the segment's first `kept` tokens."""
    mlen = docs.size(0) - data.size(0)
    end = mlen + kept
    next_doc = (data[:kept] == eod).to(torch.int64).sum(0)                      # [bsz]
    flags = (docs[end - new_mems.size(1):end] == next_doc).to(new_mems.dtype)   # [m, bsz]
    row = flags.unsqueeze(-1).expand(-1, -1, new_mems.size(3))                  # [m, bsz, d_model]
    return torch.cat([new_mems, row.unsqueeze(0)], 0)
