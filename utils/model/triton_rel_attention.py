"""Relative attention (Transformer-XL, attention type 0) as one fused Triton kernel, forward and backward
(attn_impl 'triton'): FlashAttention's tiling and online softmax, with the position term read inside the
kernel at its shifted position.

    score[b, h, i, j] = scale · q[b, h, i] · k[b, h, j] + bd[b, h, i, j + qlen-1-i],   visible iff lo < j - i <= hi
    out = softmax over the visible keys (score) · v

bd = q_pos · r_posᵀ [bsz, H, qlen, klen] is the *unshifted* position term (row m of r_pos: distance
klen-1-m), computed by one matmul outside the kernel. Compared with the math / sdpa paths:
- cheaper: no relative-shift copy of bd, no masked_fill into a float bias, no [bsz, H, qlen, klen] score,
  probability or mask tensor, and tiles outside the band are skipped; the kernel does not need an additive
  bias input, so nothing in it is a dense bias requiring grad in SDPA's sense;
- still dense: bd itself (one [bsz, H, qlen, klen] tensor forward, and its gradient dbd backward, which the
  kernel writes at the shifted positions; dq_pos = dbd · r_pos and dr_pos = dbdᵀ · q_pos are matmuls outside).
FlexAttention's `score_mod` path (utils/model/attention.py) reads the same bd the same way.

On a GPU the kernel is compiled by Triton; on the CPU it runs only under Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported), which is how tests/test_triton_rel_attention.py checks
it against the math path in float64. No attention dropout (the model falls back to sdpa with --dropatt > 0).
"""
import os
from typing import Tuple

import torch
from torch import Tensor

from utils.io.errors import UserError

try:
    import triton
    import triton.language as tl
except ImportError:                                                            # optional dependency
    triton = None
    tl = None

BLOCK_M = 16            # queries per tile (tl.dot needs >= 16)
BLOCK_N = 16            # keys per tile


def available() -> bool:
    return triton is not None


def runs_on(device: torch.device) -> bool:
    """Triton compiles for GPUs; on the CPU only its interpreter runs kernels."""
    return available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
    @triton.jit
    def _tile_scores(q, k_ptrs, bd_base, offs_m, offs_n, d_mask, qlen, klen, lo, hi, scale,
                     stride_bd, ACC: tl.constexpr, PREC: tl.constexpr):
        """Scores of a [BLOCK_M queries, BLOCK_N keys] tile (-inf where not visible) and the visibility."""
        k = tl.load(k_ptrs, mask=(offs_n[:, None] < klen) & d_mask[None, :], other=0.0).to(ACC)
        rel = offs_n[None, :] - offs_m[:, None]                                # j - i
        visible = (rel > lo) & (rel <= hi) & (offs_m[:, None] < qlen) & (offs_n[None, :] < klen)
        shifted = tl.where(visible, rel + qlen - 1, 0)                          # column of bd, in range when visible
        bd = tl.load(bd_base + offs_m[:, None] * stride_bd + shifted, mask=visible, other=0.0).to(ACC)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale + bd
        return tl.where(visible, s, float("-inf")), visible

    @triton.jit
    def _fwd_kernel(Q, K, V, BD, O, LSE, qlen, klen, d_head, lo, hi, scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                    PREC: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < d_head
        q_mask = (offs_m[:, None] < qlen) & d_mask[None, :]
        q = tl.load(Q + bh * qlen * d_head + offs_m[:, None] * d_head + offs_d[None, :], mask=q_mask,
                    other=0.0).to(ACC)
        bd_base = BD + bh * qlen * klen
        m_i = tl.full([BLOCK_M], -1e30, ACC)                                    # running max (finite: no inf-inf)
        l_i = tl.zeros([BLOCK_M], ACC)                                          # running sum of exp
        acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        # only the key tiles that meet the band of this query tile: lo < j - i <= hi
        start = tl.maximum(pid_m * BLOCK_M + lo + 1, 0) // BLOCK_N * BLOCK_N
        end = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1 + hi + 1, klen)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kv_off = bh * klen * d_head + offs_n[:, None] * d_head + offs_d[None, :]
            s, visible = _tile_scores(q, K + kv_off, bd_base, offs_m, offs_n, d_mask, qlen, klen, lo, hi,
                                      scale, klen, ACC, PREC)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(V + kv_off, mask=(offs_n[:, None] < klen) & d_mask[None, :], other=0.0).to(ACC)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        l_i = tl.where(l_i > 0, l_i, 1.0)                                       # rows past qlen (not stored)
        out = acc / l_i[:, None]
        tl.store(O + bh * qlen * d_head + offs_m[:, None] * d_head + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=q_mask)
        tl.store(LSE + bh * qlen + offs_m, m_i + tl.log(l_i), mask=offs_m < qlen)

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, BD, DO, LSE, DELTA, DK, DV, qlen, klen, d_head, lo, hi, scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         ACC: tl.constexpr, PREC: tl.constexpr):
        """One key tile: dv = Σ_i pᵀ·do, dk = scale Σ_i dsᵀ·q over the query tiles that see it."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < d_head
        kv_mask = (offs_n[:, None] < klen) & d_mask[None, :]
        kv_off = bh * klen * d_head + offs_n[:, None] * d_head + offs_d[None, :]
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0).to(ACC)
        bd_base = BD + bh * qlen * klen
        dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        # query tiles meeting the band: j - hi <= i < j - lo
        start = tl.maximum(pid_n * BLOCK_N - hi, 0) // BLOCK_M * BLOCK_M
        end = tl.minimum(pid_n * BLOCK_N + BLOCK_N - 1 - lo, qlen)
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q_mask = (offs_m[:, None] < qlen) & d_mask[None, :]
            q_off = bh * qlen * d_head + offs_m[:, None] * d_head + offs_d[None, :]
            q = tl.load(Q + q_off, mask=q_mask, other=0.0).to(ACC)
            do = tl.load(DO + q_off, mask=q_mask, other=0.0).to(ACC)
            lse = tl.load(LSE + bh * qlen + offs_m, mask=offs_m < qlen, other=0.0)
            delta = tl.load(DELTA + bh * qlen + offs_m, mask=offs_m < qlen, other=0.0)
            s, visible = _tile_scores(q, K + kv_off, bd_base, offs_m, offs_n, d_mask, qlen, klen, lo, hi,
                                      scale, klen, ACC, PREC)
            p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds), q, input_precision=PREC) * scale
        tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, BD, DO, LSE, DELTA, DQ, DBD, qlen, klen, d_head, lo, hi, scale,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                    PREC: tl.constexpr):
        """One query tile: dq = scale Σ_j ds·k, and dbd[i, j + qlen-1-i] = ds[i, j] (each entry written by one
        key at most: dbd starts zeroed)."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < d_head
        q_mask = (offs_m[:, None] < qlen) & d_mask[None, :]
        q_off = bh * qlen * d_head + offs_m[:, None] * d_head + offs_d[None, :]
        q = tl.load(Q + q_off, mask=q_mask, other=0.0).to(ACC)
        do = tl.load(DO + q_off, mask=q_mask, other=0.0).to(ACC)
        lse = tl.load(LSE + bh * qlen + offs_m, mask=offs_m < qlen, other=0.0)
        delta = tl.load(DELTA + bh * qlen + offs_m, mask=offs_m < qlen, other=0.0)
        bd_base = BD + bh * qlen * klen
        dbd_base = DBD + bh * qlen * klen
        dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        start = tl.maximum(pid_m * BLOCK_M + lo + 1, 0) // BLOCK_N * BLOCK_N
        end = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1 + hi + 1, klen)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kv_mask = (offs_n[:, None] < klen) & d_mask[None, :]
            kv_off = bh * klen * d_head + offs_n[:, None] * d_head + offs_d[None, :]
            s, visible = _tile_scores(q, K + kv_off, bd_base, offs_m, offs_n, d_mask, qlen, klen, lo, hi,
                                      scale, klen, ACC, PREC)
            p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0).to(ACC)
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0).to(ACC)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
            dq += tl.dot(ds, k, input_precision=PREC) * scale
            shifted = tl.where(visible, offs_n[None, :] - offs_m[:, None] + qlen - 1, 0)
            tl.store(dbd_base + offs_m[:, None] * klen + shifted, ds.to(DBD.dtype.element_ty), mask=visible)
        tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=q_mask)


def _input_precision(q: Tensor) -> str:
    """tl.dot's input precision: Triton's default for float32 on NVIDIA GPUs is TF32, which would make
    `--attn_impl triton` less exact than the other implementations under --no_tf32 (full float32); 'tf32'
    only where PyTorch's float32 matmuls may use it (--tf32) and for 16-bit inputs (their values are exact in
    TF32; the probabilities are rounded as a 16-bit kernel would round them)."""
    if q.dtype == torch.float64:
        return "ieee"
    if q.dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def _launch_shape(q: Tensor, k: Tensor):
    bsz, n_head, qlen, d_head = q.shape
    klen = k.size(2)
    block_d = max(16, triton.next_power_of_2(d_head))
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    return bsz * n_head, qlen, klen, d_head, block_d, acc


# The kernels are wrapped as custom operators (opaque to torch.compile: dynamo and inductor keep them as one
# call each, with the fake implementations giving the output shapes) with a registered backward.
@torch.library.custom_op("txl::relative_attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, bd: Tensor, lo: int, hi: int,
                   scale: float) -> Tuple[Tensor, Tensor]:
    q, k, v, bd = q.contiguous(), k.contiguous(), v.contiguous(), bd.contiguous()
    bh, qlen, klen, d_head, block_d, acc = _launch_shape(q, k)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=_lse_dtype(q), device=q.device)
    _fwd_kernel[(triton.cdiv(qlen, BLOCK_M), bh)](
        q, k, v, bd, out, lse, qlen, klen, d_head, lo, hi, scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d, ACC=acc, PREC=_input_precision(q))
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, bd, lo, hi, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


@torch.library.custom_op("txl::relative_attention_bwd", mutates_args=())
def _attention_bwd(q: Tensor, k: Tensor, v: Tensor, bd: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                   lo: int, hi: int, scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    q, k, v, bd, dout = q.contiguous(), k.contiguous(), v.contiguous(), bd.contiguous(), dout.contiguous()
    bh, qlen, klen, d_head, block_d, acc = _launch_shape(q, k)
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1).contiguous()    # Σ_d do·o per query
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbd = torch.zeros_like(bd)                                                  # entries no key reaches stay 0
    _bwd_dkdv_kernel[(triton.cdiv(klen, BLOCK_N), bh)](
        q, k, v, bd, dout, lse, delta, dk, dv, qlen, klen, d_head, lo, hi, scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d, ACC=acc, PREC=_input_precision(q))
    _bwd_dq_kernel[(triton.cdiv(qlen, BLOCK_M), bh)](
        q, k, v, bd, dout, lse, delta, dq, dbd, qlen, klen, d_head, lo, hi, scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d, ACC=acc, PREC=_input_precision(q))
    return dq, dk, dv, dbd


@_attention_bwd.register_fake
def _(q, k, v, bd, out, lse, dout, lo, hi, scale):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)   # noqa: E731
    return like(q), like(k), like(v), like(bd)


def _setup_context(ctx, inputs, output):
    q, k, v, bd, lo, hi, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bd, out, lse)
    ctx.band_scale = (lo, hi, scale)


def _backward(ctx, dout, dlse):
    q, k, v, bd, out, lse = ctx.saved_tensors
    dq, dk, dv, dbd = _attention_bwd(q, k, v, bd, out, lse, dout, *ctx.band_scale)
    return dq, dk, dv, dbd, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def relative_triton_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, r_pos: Tensor,
                              band: Tuple[int, int], scale: float) -> Tensor:
    """Same contract as attention.relative_flex_attention with a position term: q [bsz, H, qlen, Dh] (not
    scaled), k, v [bsz, H, klen, Dh], q_pos [bsz, H, qlen, Dh] (scaled), r_pos [klen, H, Dh]; query i sees key
    j exactly when lo < j - i <= hi (hi <= klen - qlen, so every visible key has its bd column). -> like q."""
    if not runs_on(q.device):
        raise UserError("--attn_impl triton needs the triton package and a GPU (on the CPU: TRITON_INTERPRET=1, "
                        "a slow reference); use --attn_impl sdpa or math")
    lo, hi = band
    if hi > k.size(2) - q.size(2):
        raise ValueError(f"band {band}: keys after the diagonal have no position term")
    bd = torch.matmul(q_pos, r_pos.permute(1, 2, 0))                             # [bsz, H, qlen, klen], unshifted
    return _attention_fwd(q, k, v, bd, int(lo), int(hi), float(scale))[0]
