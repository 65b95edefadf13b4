"""The attention implementations the model offers (ATTN_IMPLS), and the fused relative attention kernels:
FlexAttention (attn_impl 'flex') and a Triton kernel (attn_impl 'triton', utils/model/triton_rel_attention.py,
forward and backward); in both the Transformer-XL shift is done inside the kernel.

The position term is computed unshifted, bd[b, h, i, m] = q_pos[b, h, i] · r_pos[m] with
row m of r_pos holding distance klen-1-m, and the kernel reads bd[b, h, i, j + qlen-1-i] for query i and
key j (distance mlen + i - j): no shifted copy, no mask tensor in the score matrix, and blocks that the
causal mask hides entirely are skipped. Keys past the diagonal would read beyond the row; they are masked,
and the index is clamped so they never read outside it.

FlexAttention generates its kernels with torch.compile: the model uses this path only while being compiled
(`--compile`), for attention type 0 (Transformer-XL; the presets' type) and without attention dropout
(`--dropatt 0`); otherwise 'flex' falls back to 'sdpa'. Its backward pass runs on GPUs only (PyTorch has no
CPU backward for FlexAttention), so on the CPU only its forward pass is tested; in its backward the gradient
of the captured bd is the kernel's score gradient scattered to the shifted positions, which is what the
Triton kernel computes explicitly (tested on the CPU, forward and backward, under TRITON_INTERPRET=1).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from utils.io.errors import UserError

# MemTransformerLM.set_attn_impl: matmuls + softmax, scaled_dot_product_attention, FlexAttention
ATTN_IMPLS = ("math", "sdpa", "flex", "triton")


def check_attn_impl(impl: str) -> None:
    """UserError when `impl` is unknown or its library is missing."""
    if impl not in ATTN_IMPLS:
        raise UserError(f"attention implementation must be one of {', '.join(ATTN_IMPLS)}, got {impl!r}")
    if impl == "flex":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            raise UserError(f"--attn_impl flex needs FlexAttention (PyTorch >= 2.5, this is "
                            f"{torch.__version__}); use --attn_impl sdpa") from None
    if impl == "triton":
        from utils.model import triton_rel_attention
        if not triton_rel_attention.available():
            raise UserError("--attn_impl triton needs the triton package (pip install triton; CUDA builds of "
                            "PyTorch include it); use --attn_impl sdpa")


def fused_relative_attention(impl: str, q: Tensor, k: Tensor, v: Tensor, q_pos: Optional[Tensor],
                             r_pos: Optional[Tensor], band: Tuple[int, int], scale: float,
                             docs: Optional[Tensor] = None) -> Tensor:
    """relative_flex_attention or the Triton kernel (attention type 0: q_pos and r_pos given; no document
    mask: the model does not call it for 'triton' with docs)."""
    if impl == "triton" and q_pos is not None and r_pos is not None and docs is None:
        from utils.model.triton_rel_attention import relative_triton_attention
        return relative_triton_attention(q, k, v, q_pos, r_pos, band, scale)
    return relative_flex_attention(q, k, v, q_pos, r_pos, band, scale, docs)


def relative_flex_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Optional[Tensor], r_pos: Optional[Tensor],
                            band: Tuple[int, int], scale: float, docs: Optional[Tensor] = None) -> Tensor:
    """softmax(scale · q·kᵀ + shifted position term, over the keys of the band) · v.

    q [bsz, H, qlen, Dh] (not scaled), k, v [bsz, H, klen, Dh]; q_pos [bsz, H, qlen, Dh] (scaled) and
    r_pos [klen, H, Dh], or None for no position term; band (lo, hi): query i sees key j exactly when lo < j - i <= hi.
    docs [klen, bsz] int64 or None (--reset_mems_at_doc): the keys' document numbers; a query (key mlen + i) sees
    only keys of its own document: the score function makes the others -inf (the block mask stays the band's,
    shared by the batch). It reads the document numbers, not a [bsz, qlen, klen] mask: less to read, and the CPU
    kernel fails to compile with a captured mask computed element-wise in the same graph. -> [bsz, H, qlen, Dh]
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    qlen, klen = q.size(2), k.size(2)
    lo, hi = band

    def mask_mod(b, h, q_idx, kv_idx):
        offset = kv_idx - q_idx
        return (offset <= hi) & (offset > lo)

    block_mask = create_block_mask(mask_mod, None, None, qlen, klen, device=q.device)
    score_mod = None
    if q_pos is not None and r_pos is not None:
        bd = torch.matmul(q_pos, r_pos.permute(1, 2, 0))                       # [bsz, H, qlen, klen]
        shift = qlen - 1

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bd[b, h, q_idx, torch.clamp(kv_idx + shift - q_idx, max=klen - 1)]
    if docs is not None:
        position_mod, mlen = score_mod, klen - qlen

        def score_mod(score, b, h, q_idx, kv_idx):
            if position_mod is not None:
                score = position_mod(score, b, h, q_idx, kv_idx)
            return torch.where(docs[kv_idx, b] == docs[q_idx + mlen, b], score, float("-inf"))

    return flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), score_mod=score_mod,
                          block_mask=block_mask, scale=scale)
