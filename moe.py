"""
moe.py: a sparse Mixture-of-Experts transformer in one file.

gpt.py's Llama-style transformer (RoPE, RMSNorm, QK-norm, GQA attention; written again here so the file
stands alone) with each block's SwiGLU MLP replaced by a sparse MoE layer (Shazeer et al. 2017; Switch,
Fedus et al. 2021; Mixtral, Jiang et al. 2024): a router sends each token to k of E expert MLPs and the
layer returns their gate-weighted sum, so the model holds E experts' parameters but each token pays for k.

    x = x + Attention(RMSNorm(x))
    x = x + MoE(RMSNorm(x))

with, for a token x and router logits u = x W_r (one per expert),
    softmax router  p = softmax(u); the k largest p_i, renormalised to sum to 1, are the gates  (Mixtral)
    sigmoid router  s = sigmoid(u); pick the top k of s_i + b_i, gates = the picked s_i renormalised
                    (DeepSeek-V3). b is a per-expert bias used for selection only: after each optimizer
                    step b_i += gamma if expert i got less than its share of tokens, -= gamma if more
                    (auxiliary-loss-free balancing)
    MoE(x)          = sum over the k chosen experts e of gate_e * FFN_e(x)  (+ the shared experts' FFN(x))
    FFN_e(x)        = (SiLU(x W_gate,e) * (x W_up,e)) W_down,e               (SwiGLU, stacked over e)
    aux loss        = E * sum_i f_i P_i, f_i the fraction of routed slots sent to expert i and P_i the mean
                    router probability of expert i: 1 when balanced, E when collapsed onto one (Switch)
    z loss          = mean over tokens of logsumexp(u)^2: keeps router logits small (ST-MoE, Zoph et al. 2022)

Shared experts (always on) and fine-grained experts (more, smaller experts, more of them active, e.g.
n_expert=32, top_k=8, expert_hidden=44) are DeepSeekMoE's (Dai et al. 2024). Routing is dropless: every
token reaches its k experts, with no capacity limit.

The core is `experts(x, expert_ids, gates, weights, kernel=...)`. Both paths sort the N*k (token, slot)
pairs by expert once, so each expert's tokens form one contiguous run (offsets from per-expert counts):
    "torch"  gather the tokens in that order, a loop of two matmuls per expert over its run, then a
             gate-weighted index_add back to the tokens
    "triton" a grouped GEMM over the sorted runs, ScatterMoE's idea (Tan et al. 2024): the first matmul
             reads its rows straight from the unsorted tokens (gather fused) and the second writes
             gate * output straight to each slot's place (scatter fused), so the tokens are never copied
             into expert order nor the outputs back; the backward is the same kernel on transposed
             weights, plus a kernel for each expert's weight gradient
`kernel` picks the experts core; attention runs gpt.py's explicit softmax, or PyTorch's fused sdpa when
kernel="triton" (see `attention`).

Layout: Config, the experts core in PyTorch, the core in Triton, the layers (RMSNorm, RoPE, Attention,
the MoE layer, Block), the Model (forward with the auxiliary losses, prefill/step with a KV cache,
generate, and the hooks train.py calls: after_step for the bias update, metrics for the expert load).
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS / Windows: the torch path still works
    triton = None


@dataclass
class Config:
    vocab_size: int = 65
    block_size: int = 64  # the longest sequence the model attends over; the training context
    n_layer: int = 4
    d_model: int = 128
    kernel: str = "torch"  # experts core: "torch" (a loop over experts) or "triton" (grouped GEMM)
    n_head: int = 4
    n_kv_head: int = 4  # < n_head for grouped-query attention; must divide n_head
    qk_norm: bool = True  # RMSNorm on q and k per head: keeps attention logits tame
    rope_theta: float = 10000.0
    tie_weights: bool = True  # lm_head shares the token embedding matrix
    n_expert: int = 8  # routed experts per layer (Mixtral: 8)
    top_k: int = 2  # experts per token (Mixtral: 2)
    expert_hidden: int = 176  # one expert's SwiGLU width: gpt.py's 352 over top_k=2, so active params match gpt.py
    n_shared: int = 0  # always-on shared experts, each expert_hidden wide (DeepSeekMoE)
    router: str = "softmax"  # "softmax" (Mixtral) or "sigmoid" (DeepSeek-V3, with the aux-loss-free bias)
    bias_gamma: float = 1e-3  # sigmoid router: the bias step after each optimizer step (DeepSeek-V3's gamma)
    aux_loss_coef: float = 0.01  # Switch load-balancing loss, added to the training loss
    z_loss_coef: float = 1e-3  # router z-loss, added to the training loss

    def __post_init__(self):
        if self.kernel not in ("torch", "triton"):
            raise ValueError(f"kernel must be 'torch' or 'triton', not {self.kernel!r}")
        if self.router not in ("softmax", "sigmoid"):
            raise ValueError(f"router must be 'softmax' or 'sigmoid', not {self.router!r}")
        if not 1 <= self.top_k <= self.n_expert:
            raise ValueError(f"need 1 <= top_k <= n_expert, got top_k={self.top_k}, n_expert={self.n_expert}")
        if self.d_model % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"need d_model % n_head == 0 and n_head % n_kv_head == 0, got "
                             f"d_model={self.d_model}, n_head={self.n_head}, n_kv_head={self.n_kv_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("the head dimension d_model // n_head must be even for RoPE")


# ---------------------------------------------------------------------------------------------------
# The core in PyTorch: routed SwiGLU experts, dropless


def sort_by_expert(expert_ids, n_expert):
    """Order the N*k (token, slot) pairs by expert. Returns, for the sorted pairs, their flat slot ids
    n*k + s (N*k,) and their tokens (N*k,), and offsets (E+1,): expert e owns sorted rows offsets[e]:offsets[e+1]."""
    flat = expert_ids.flatten()  # (N*k,)
    slot = flat.argsort(stable=True)  # only indices are sorted, never the activations
    counts = flat.bincount(minlength=n_expert)  # (E,) slots per expert; 0 for an expert nobody picked
    offsets = F.pad(counts.cumsum(0), (1, 0))  # (E+1,)
    return slot, slot // expert_ids.size(1), offsets


def experts(x, expert_ids, gates, weights, kernel="torch"):
    """y[n] = sum_s gates[n, s] * FFN_e(x[n]) with e = expert_ids[n, s], FFN_e the SwiGLU of expert e.
    x: (N, d); expert_ids (int64), gates: (N, k); weights = (w_fc (E, d, 2h): W_gate | W_up, w_proj (E, h, d))."""
    w_fc, w_proj = weights
    slot, token, offsets = sort_by_expert(expert_ids, w_fc.size(0))
    if kernel == "triton" and x.is_cuda and torch.is_autocast_enabled("cuda"):
        x = x.to(torch.get_autocast_dtype("cuda"))  # autocast skips custom kernels: cast as it would a matmul
    gates = gates.flatten()[slot].to(x.dtype)  # (N*k,) the gate of each sorted pair
    if kernel == "triton":
        check_triton(x, w_fc, w_proj)
        return ExpertsTriton.apply(x, gates, w_fc.to(x.dtype), w_proj.to(x.dtype), slot, token, offsets)
    xs = x[token].split(offsets.diff().tolist())  # E runs (n_e, d): expert e's tokens, n_e of them
    ys = []
    for x_e, fc, proj in zip(xs, w_fc.unbind(), w_proj.unbind()):  # split, unbind: one gradient buffer each
        gate, up = (x_e @ fc).chunk(2, dim=-1)  # (n_e, h) each
        ys.append((F.silu(gate) * up) @ proj)  # (n_e, d)
    ys = torch.cat(ys) * gates[:, None]  # (N*k, d)
    return torch.zeros_like(x).index_add_(0, token, ys)  # each token sums its k slots


def experts_loop(x, expert_ids, gates, weights):
    """The same sum, one (token, slot) pair at a time: the plain reference the tests hold both paths to."""
    w_fc, w_proj = weights
    y = torch.zeros_like(x)
    for n in range(x.size(0)):
        for s in range(expert_ids.size(1)):
            e = expert_ids[n, s]
            gate, up = (x[n] @ w_fc[e]).chunk(2)
            y[n] += gates[n, s] * ((F.silu(gate) * up) @ w_proj[e])
    return y


def load_balancing_loss(probs, expert_ids):
    """Switch's E * sum_i f_i P_i. probs: (N, E) router probabilities; expert_ids: (N, k). f (the fraction of
    slots each expert got) is a count and has no gradient: the loss lowers P_i where f_i is high."""
    E = probs.size(-1)
    f = expert_ids.flatten().bincount(minlength=E).float() / expert_ids.numel()  # (E,)
    return E * (f * probs.mean(0)).sum()


def z_loss(logits):
    """ST-MoE's router z-loss, mean over tokens of logsumexp(u)^2 for router logits (N, E)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


# ---------------------------------------------------------------------------------------------------
# The core in Triton: a grouped GEMM over the sorted (token, slot) pairs (ScatterMoE's scheme)
#
# The sorted pairs are cut into blocks of BLOCK_M rows that never straddle two experts (an expert's last
# block is masked), so each program multiplies rows of one expert by that expert's weight. The rows are
# read through an index (the gather) and written through an index (the scatter), each optional:
#     forward   h  = x[token] @ W_fc[e]                      gather fused into the first matmul
#               a  = SiLU(h_gate) * h_up                     (PyTorch; elementwise)
#               ys[slot] = gate * (a @ W_proj[e])            gate-weighted scatter fused into the second
#               y  = ys summed over each token's k slots
#     backward  da_ = dy[token] @ W_proj[e]^T                the same kernel on a transposed view
#               dgate = rowsum(da_ * a);  da = gate * da_;  dh from da through SwiGLU
#               dx[slot] = dh @ W_fc[e]^T, then summed per token
#               dW_proj[e] = a^T (gate * dy[token]),  dW_fc[e] = x[token]^T dh     (the per-expert kernel)
# Blocks: 64 rows x 64 columns x 32 deep fits an H100's shared memory many times over and keeps every
# tl.dot dimension >= 16; row indices and expert offsets are int64 so row * stride cannot overflow.

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32


def check_triton(*tensors):
    """Raise one clear line if the Triton path cannot run on these tensors."""
    if triton is None:
        raise RuntimeError("kernel='triton' needs the triton package (Linux only): pip install triton, or use kernel='torch'")
    if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernel='triton' on CPU tensors needs TRITON_INTERPRET=1 set before this file is imported (slow; for reading and debugging)")


if triton is not None:

    @triton.jit
    def _grouped_mm(X, W, Y, x_rows, y_rows, scale, block_expert, block_start, offsets, K, N,
                    stride_xm, stride_we, stride_wk, stride_wn, stride_ym,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Y[y_rows[i]] = scale[i] * X[x_rows[i]] @ W[e] for the sorted rows i of one block of expert e.
        x_rows / y_rows None: X / Y are already in sorted order. scale None: no scaling."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        e = tl.load(block_expert + pid_m)  # int64
        start, end = tl.load(block_start + pid_m), tl.load(offsets + e + 1)
        if start >= end:  # a padding block: the grid is sized without knowing the counts
            return
        offs_m = start + tl.arange(0, BLOCK_M)  # sorted rows, int64
        mask_m = offs_m < end  # the expert's last block is ragged
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_m
        if x_rows is not None:
            rows = tl.load(x_rows + offs_m, mask=mask_m, other=0)  # the gather
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
            w = tl.load(W + e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)  # (BLOCK_K, BLOCK_N)
            acc += tl.dot(x, w)
        if scale is not None:
            acc *= tl.load(scale + offs_m, mask=mask_m, other=0.0)[:, None]
        rows = offs_m
        if y_rows is not None:
            rows = tl.load(y_rows + offs_m, mask=mask_m, other=0)  # the scatter: each slot has its own row
        tl.store(Y + rows[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_n[None, :] < N))

    @triton.jit
    def _grouped_mm_dw(X, DY, DW, x_rows, dy_rows, scale, offsets, K, N, stride_xm, stride_dym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """DW[e] = sum over expert e's sorted rows i of X[x_rows[i]]^T (scale[i] * DY[dy_rows[i]]): one
        (BLOCK_K, BLOCK_N) tile of one expert's weight gradient per program, zero for an expert with no rows."""
        e, pid_k, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start, end = tl.load(offsets + e), tl.load(offsets + e + 1)  # int64
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < end
            xr, dyr = offs_m, offs_m
            if x_rows is not None:
                xr = tl.load(x_rows + offs_m, mask=mask_m, other=0)
            if dy_rows is not None:
                dyr = tl.load(dy_rows + offs_m, mask=mask_m, other=0)
            x = tl.load(X + xr[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
            dy = tl.load(DY + dyr[:, None] * stride_dym + offs_n[None, :],
                         mask=mask_m[:, None] & (offs_n[None, :] < N), other=0.0)  # (BLOCK_M, BLOCK_N)
            if scale is not None:
                dy = (dy * tl.load(scale + offs_m, mask=mask_m, other=0.0)[:, None]).to(x.dtype)
            acc += tl.dot(tl.trans(x), dy)
        tl.store(DW + e.to(tl.int64) * K * N + offs_k[:, None] * N + offs_n[None, :], acc.to(DW.dtype.element_ty),
                 mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


def block_schedule(offsets, n_rows):
    """Cut each expert's run of sorted rows into BLOCK_M-row blocks: the expert and first row of each block.
    The count is padded to its bound, cdiv(n_rows, BLOCK_M) + E, so the host never waits for the counts;
    padding blocks start at or past their expert's end and do nothing."""
    E = offsets.numel() - 1
    blocks = (offsets.diff() + BLOCK_M - 1) // BLOCK_M  # (E,) blocks per expert, 0 for an idle expert
    ends = blocks.cumsum(0)  # (E,) one past each expert's last block
    b = torch.arange(triton.cdiv(n_rows, BLOCK_M) + E, device=offsets.device)
    expert = torch.searchsorted(ends, b, right=True).clamp(max=E - 1)  # the expert whose blocks contain b
    first = ends - blocks  # (E,) each expert's first block
    return expert, offsets[expert] + (b - first[expert]) * BLOCK_M


def grouped_mm(x, w, schedule, offsets, n_rows, x_rows=None, y_rows=None, scale=None):
    """The (n_rows, N) output of _grouped_mm; w: (E, K, N) with any strides, so transposes are free."""
    K, N = w.shape[1:]
    y = x.new_empty(n_rows, N)
    grid = (schedule[0].numel(), triton.cdiv(N, BLOCK_N))
    _grouped_mm[grid](x, w, y, x_rows, y_rows, scale, *schedule, offsets, K, N, x.stride(0), *w.stride(),
                      y.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y


def grouped_mm_dw(x, dy, offsets, x_rows=None, dy_rows=None, scale=None):
    """(E, K, N) per-expert weight gradient, x: (., K), dy: (., N)."""
    E, K, N = offsets.numel() - 1, x.size(1), dy.size(1)
    dw = x.new_empty(E, K, N)
    grid = (E, triton.cdiv(K, BLOCK_K), triton.cdiv(N, BLOCK_N))
    _grouped_mm_dw[grid](x, dy, dw, x_rows, dy_rows, scale, offsets, K, N, x.stride(0), dy.stride(0),
                         BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return dw


class ExpertsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gates, w_fc, w_proj, slot, token, offsets):
        """x (N, d), gates (N*k,) in sorted order, slot / token (N*k,) of the sorted pairs."""
        x = x.contiguous()
        n_rows = slot.numel()
        schedule = block_schedule(offsets, n_rows)
        h = grouped_mm(x, w_fc, schedule, offsets, n_rows, x_rows=token)  # (N*k, 2h), sorted
        gate, up = h.chunk(2, dim=-1)
        a = (F.silu(gate) * up).contiguous()  # (N*k, h), sorted
        ys = grouped_mm(a, w_proj, schedule, offsets, n_rows, y_rows=slot, scale=gates)  # (N*k, d), by slot
        ctx.save_for_backward(x, gates, w_fc, w_proj, slot, token, offsets, h)
        return ys.view(x.size(0), -1, x.size(1)).sum(1, dtype=x.dtype)  # (N, d); autocast would make it fp32

    @staticmethod
    def backward(ctx, dy):
        x, gates, w_fc, w_proj, slot, token, offsets, h = ctx.saved_tensors
        dy, n_rows = dy.contiguous(), slot.numel()
        schedule = block_schedule(offsets, n_rows)
        gate, up = h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        a = gate * sig * up  # (N*k, h), recomputed rather than saved
        da = grouped_mm(dy, w_proj.transpose(1, 2), schedule, offsets, n_rows, x_rows=token)  # (N*k, h), ungated
        dgates = (da * a).sum(-1)  # (N*k,) = dy . (a @ W_proj[e]), the slot's expert output, never stored
        da = da * gates[:, None]
        dh = torch.cat([da * up * sig * (1 + gate * (1 - sig)), da * gate * sig], dim=-1)  # through SwiGLU
        dw_proj = grouped_mm_dw(a, dy, offsets, dy_rows=token, scale=gates)  # (E, h, d)
        dw_fc = grouped_mm_dw(x, dh, offsets, x_rows=token)  # (E, d, 2h)
        dxs = grouped_mm(dh, w_fc.transpose(1, 2), schedule, offsets, n_rows, y_rows=slot)  # (N*k, d), by slot
        dx = dxs.view(x.size(0), -1, x.size(1)).sum(1)
        return dx, dgates, dw_fc, dw_proj, None, None, None


# ---------------------------------------------------------------------------------------------------
# Layers: gpt.py's attention, norm and RoPE, then the MoE layer


def attention(q, k, v, kernel="torch"):
    """Causal attention, gpt.py's. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D), the queries the last Tq of the Tk
    positions. Here `kernel` picks the experts core: attention runs gpt.py's explicit softmax under "torch"
    and PyTorch's fused scaled_dot_product_attention under "triton" (gpt.py holds the attention kernel)."""
    Tq, Tk = q.size(2), k.size(2)
    if kernel != "torch":
        # is_causal aligns the mask top-left, which is wrong when Tq < Tk: pass the mask then.
        mask = None if Tq == Tk else causal_mask(Tq, Tk, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=Tq == Tk,
                                              enable_gqa=q.size(1) != k.size(1))
    group = q.size(1) // k.size(1)  # query heads per kv head
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, Tk, D)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    att = att.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
    att = F.softmax(att.float(), dim=-1).to(q.dtype)  # softmax in fp32 even under autocast
    return att @ v  # (B, H, Tq, D)


def causal_mask(Tq, Tk, device):
    """(Tq, Tk) bool, True where query i (at position Tk - Tq + i) may look at key j."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean subtraction and the bias."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_angles(positions, head_dim, theta):
    """The rotations e^(i n theta_j), theta_j = theta^(-2j/D), as complex numbers (T, D/2), for positions n (T,)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * freqs[None, :]  # (T, D/2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x, rope):
    """Rotate x (B, H, T, D) by rope (T, D/2): each pair (x_2j, x_2j+1) is read as the complex number
    x_2j + i x_2j+1, and a rotation is a product with e^(i angle): one op, where cos and sin take six."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, H, T, D/2), complex
    return torch.view_as_real(pairs * rope).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.d_model // config.n_head
        self.kernel = config.kernel
        self.c_attn = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=False)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, x, rope, cache=None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qk, v = self.c_attn(x).split([(H + Hkv) * D, Hkv * D], dim=-1)
        qk = qk.view(B, T, H + Hkv, D).transpose(1, 2)  # (B, H + Hkv, T, D): the query heads, then the key heads
        if self.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])], dim=1)
        q, k = apply_rope(qk, rope).split([H, Hkv], dim=1)  # (B, H, T, D), (B, Hkv, T, D): one rotation for both
        v = v.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        if cache is not None:  # keys and values of the earlier positions, already rotated
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # (B, Hkv, Tk, D)
        y = attention(q, k, v, self.kernel)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    """A SwiGLU MLP, the shared experts' (gpt.py's MLP with its width as an argument)."""

    def __init__(self, d_model, hidden):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 2 * hidden, bias=False)  # W_gate and W_up, fused
        self.c_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)


class MoE(nn.Module):
    """Each token to top_k of n_expert SwiGLU experts (plus the shared ones). A training forward keeps its router
    losses and per-expert counts on the module, for Model.forward, metrics() and after_step()."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        E, d, h = config.n_expert, config.d_model, config.expert_hidden
        self.router = nn.Linear(d, E, bias=False)
        self.c_fc = nn.Parameter(torch.empty(E, d, 2 * h))  # W_gate | W_up of each expert, stacked
        self.c_proj = nn.Parameter(torch.empty(E, h, d))  # W_down of each expert
        self.shared = MLP(d, config.n_shared * h) if config.n_shared else None
        # The sigmoid router's selection bias: a buffer, not a parameter, moved by after_step alone.
        self.register_buffer("bias", torch.zeros(E))
        self.register_buffer("load", torch.zeros(E), persistent=False)  # slots per expert since after_step

    def forward(self, x):
        B, T, d = x.shape
        x = x.view(B * T, d)
        u = F.linear(x.float(), self.router.weight.float())  # (N, E) router logits, fp32: top-k is brittle in bf16
        if self.config.router == "softmax":
            probs = F.softmax(u, dim=-1)
            gates, expert_ids = probs.topk(self.config.top_k, dim=-1)  # (N, k) each
        else:
            scores = torch.sigmoid(u)
            expert_ids = (scores + self.bias).topk(self.config.top_k, dim=-1).indices  # the bias picks...
            gates = scores.gather(1, expert_ids)  # ...but never weighs
            probs = scores / scores.sum(-1, keepdim=True)  # for the balance loss
        gates = gates / gates.sum(-1, keepdim=True)
        y = experts(x, expert_ids, gates, (self.c_fc, self.c_proj), self.config.kernel)
        if self.shared is not None:
            y = y + self.shared(x)
        if self.training:
            self.aux_loss, self.z_loss = load_balancing_loss(probs, expert_ids), z_loss(u)
            self.counts = expert_ids.flatten().bincount(minlength=self.config.n_expert)  # (E,)
            self.load += self.counts
        return y.view(B, T, d)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1, self.attn = RMSNorm(config.d_model), Attention(config)
        self.norm2, self.moe = RMSNorm(config.d_model), MoE(config)

    def forward(self, x, rope, cache=None):
        a, kv = self.attn(self.norm1(x), rope, cache)
        x = x + a
        x = x + self.moe(self.norm2(x))
        return x, kv


# ---------------------------------------------------------------------------------------------------
# The model


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        # GPT-2 init: N(0, 0.02), and the projections into the residual stream (attention's, each expert's and
        # the shared experts') scaled by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(("c_proj", "c_proj.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} is longer than block_size={self.config.block_size}; "
                             f"use a shorter sequence or a model with a larger block_size")
        logits, _ = self.prefill(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            if self.training:  # the router losses, averaged over layers; evaluation reports the bare loss
                moes = [block.moe for block in self.blocks]
                loss = loss + (self.config.aux_loss_coef * sum(m.aux_loss for m in moes) +
                               self.config.z_loss_coef * sum(m.z_loss for m in moes)) / len(moes)
        return logits, loss

    def prefill(self, idx, state=None):
        """Run the tokens idx (B, T) in parallel after the KV cache `state` (None: a new sequence).
        Returns the logits (B, T, vocab_size) and the cache extended by these T positions."""
        B, T = idx.shape
        start = 0 if state is None else state["pos"]
        cached = 0 if state is None else state["kv"][0][0].size(2)
        if T > 1 and cached + T > self.config.block_size:
            raise ValueError(f"{cached} cached + {T} new tokens is longer than block_size={self.config.block_size}; "
                             f"feed the rest token by token with step()")
        rope = rope_angles(torch.arange(start, start + T, device=idx.device), self.config.d_model //
                           self.config.n_head, self.config.rope_theta)
        x = self.wte(idx)  # (B, T, d_model)
        caches = [None] * len(self.blocks) if state is None else state["kv"]
        new_caches = []
        for block, cache in zip(self.blocks, caches):
            x, (k, v) = block(x, rope, cache)
            # A full cache slides: the oldest position drops out. RoPE encodes only distances, so the
            # positions kept are still scored exactly as before.
            new_caches.append((k[:, :, -self.config.block_size:], v[:, :, -self.config.block_size:]))
        logits = self.lm_head(self.norm_f(x))  # (B, T, vocab_size)
        return logits, {"pos": start + T, "kv": new_caches}

    def step(self, token, state=None):
        """Feed one token (B,) after `state`; returns logits (B, vocab_size) and the new state."""
        logits, state = self.prefill(token[:, None], state)
        return logits[:, 0], state

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Append max_new_tokens sampled tokens to idx (B, T): one parallel prefill of the prompt, then one
        step per new token, so the prompt is never recomputed. temperature=0 picks the most likely token."""
        logits, state = self.prefill(idx)
        logits = logits[:, -1]  # (B, vocab_size)
        for i in range(max_new_tokens):
            if i > 0:
                logits, state = self.step(idx[:, -1], state)
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits.float() / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat([idx, idx_next], dim=1)
        return idx

    @torch.no_grad()
    def after_step(self):
        """DeepSeek-V3's auxiliary-loss-free balancing, called by train.py after each optimizer step: each
        expert that got more than the mean load since the last call has its selection bias lowered by gamma,
        each that got less has it raised. The load counts training forwards only."""
        for block in self.blocks:
            moe = block.moe
            if self.config.router == "sigmoid":
                moe.bias += self.config.bias_gamma * torch.sign(moe.load.mean() - moe.load)
            moe.load.zero_()

    def metrics(self):
        """For train.py's log, from the last training forward: the router losses (before their coefficients,
        averaged over layers) and, per layer, the fraction of routed slots each expert got: 1/n_expert each is
        balance; collapse is a few experts near 1/top_k (a token picks an expert at most once) and the rest near 0."""
        moes = [block.moe for block in self.blocks]
        if not hasattr(moes[0], "counts"):
            return {}
        out = {"aux_loss": sum(m.aux_loss.item() for m in moes) / len(moes),
               "z_loss": sum(m.z_loss.item() for m in moes) / len(moes)}
        for i, m in enumerate(moes):
            out[f"expert_load[{i}]"] = (m.counts / m.counts.sum()).tolist()
        return out

    def param_groups(self, weight_decay):
        """AdamW groups: weight decay on the matrices (linear layers, embedding, experts), none on norm gains."""
        params = list(self.parameters())
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward) at context T, after PaLM's appendix B: 6 per ACTIVE
        matmul parameter (a token uses top_k of the n_expert routed experts), plus 12 * n_layer * d_model * T
        for the attention scores and the weighted sum."""
        c = self.config
        N = sum(p.numel() for p in self.parameters() if p.dim() >= 2)  # a tied matrix counts once: as lm_head
        if not c.tie_weights:
            N -= self.wte.weight.numel()  # an embedding lookup is not a matmul
        routed = sum(b.moe.c_fc.numel() + b.moe.c_proj.numel() for b in self.blocks)
        N -= routed * (1 - c.top_k / c.n_expert)
        return 6 * N + 12 * c.n_layer * c.d_model * T
