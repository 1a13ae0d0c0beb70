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
                    (DeepSeek-V3). b (selection_bias) is a per-expert bias for selection only: after each
                    optimizer step b_i += gamma if expert i got less than its share of tokens, -= gamma if
                    more (auxiliary-loss-free balancing). Here it also gets the z loss on u and, unless
                    aux_loss_coef=0, the aux loss below on p = s / sum(s) over the whole batch, where
                    DeepSeek-V3 adds a per-sequence balance loss with a tiny weight (1e-4) instead
    MoE(x)          = sum over the k chosen experts e of gate_e * FFN_e(x)  (+ the shared experts' FFN(x))
    FFN_e(x)        = (SiLU(x W_gate,e) * (x W_up,e)) W_down,e               (SwiGLU, stacked over e)
    aux loss        = E * sum_i f_i P_i, f_i the fraction of routed slots sent to expert i and P_i the mean
                    router probability of expert i (Switch): 1 when balanced, and at most E / k, when
                    every token's k slots go to the same k experts (f_i = 1/k on those) and they hold all
                    the probability (a token picks an expert at most once, so f_i <= 1/k)
    z loss          = mean over tokens of logsumexp(u)^2: keeps router logits small (ST-MoE, Zoph et al. 2022)

Shared experts (always on) and fine-grained experts (more, smaller experts, more of them active, e.g.
n_expert=32, top_k=8, expert_hidden=44) are DeepSeekMoE's (Dai et al. 2024). Routing is dropless: every
token reaches its k experts, with no capacity limit.

Notation: B batch, T sequence length (Tq queries after Tk keys when a KV cache is in play), C = d_model,
H query heads, Hkv key/value heads, D = C / H the head dim (gpt.py's letters); M = B * T tokens, E experts
(n_expert), k experts per token (top_k), h = expert_hidden (one expert's SwiGLU width). Each token has k
slots, so M * k (token, slot) pairs. The grouped GEMM multiplies rows (n_rows, K) by a weight (K, N), as
Triton's matmul tutorial names them, in tiles of BLOCK_M rows, BLOCK_N columns and BLOCK_K deep.

The core is `experts(x, expert_ids, gates, weights, kernel=...)`. Both paths sort the M * k (token, slot)
pairs by expert once, so each expert's tokens form one contiguous run (offsets from per-expert counts):
    "torch"  `experts_sorted`: gather the tokens in that order, a loop of two matmuls per expert over its
             run, then a gate-weighted index_add back to the tokens
    "triton" `experts_triton`, a grouped GEMM over the sorted runs, ScatterMoE's idea (Tan et al. 2024):
             the first matmul reads its rows straight from the unsorted tokens (gather fused) and the
             second writes gate * output straight to each slot's place (scatter fused), so the tokens are
             never copied into expert order nor the outputs back; the backward is the same kernel on
             transposed weights, plus a kernel for each expert's weight gradient
and `experts_ref` is the same sum one (token, slot) pair at a time: the reference the tests hold both to.
`kernel` picks the experts core; attention runs gpt.py's `attention_ref` under "torch" and PyTorch's fused
sdpa under "triton" (see `attend`).

Layout: Config; the core in PyTorch (experts, experts_ref, experts_sorted); the core in Triton (kernels,
ExpertsTriton, experts_triton); the layers (attend, RMSNorm, RoPE, Attention, MLP, the router losses, the
MoE layer, Block); the Model (forward with the router losses, prefill/step with a KV cache, generate, and
the hooks train.py calls: after_step for the selection bias, metrics for the expert load; from_pretrained);
released checkpoints (Mixtral, read from Hugging Face's layout into this file's names); a self-check,
`python moe.py`.
"""

import json
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS / Windows: the torch path still works
    triton = None


# Copied from gpt.py
def check_fields(config, sizes=(), floats=()):
    """Raise one clear line for the first of these Config fields out of range: each size must be a whole
    number of at least 1, each float a finite number above 0 (NaN is neither)."""
    for name in sizes:
        if not getattr(config, name) >= 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    for name in floats:
        if not 0 < getattr(config, name) < math.inf:
            raise ValueError(f"{name} must be a positive number, got {getattr(config, name)}")


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
    norm_eps: float = 1e-6  # every RMSNorm's eps (Mixtral: 1e-5)
    qkv_bias: bool = False  # biases on W_Q, W_K, W_V (gpt.py's field; Mixtral has none)
    n_expert: int = 8  # routed experts per layer (Mixtral: 8)
    top_k: int = 2  # experts per token (Mixtral: 2)
    # One expert's SwiGLU width. The top_k=2 active experts are 2 * 176 = 352 wide: a 4x MLP's parameters
    # at d_model=128 (the 8/3 rule, rounded up), ~10% more active MLP parameters than gpt.py's 320-wide
    # MLP, which was narrowed for CPU speed.
    expert_hidden: int = 176
    n_shared: int = 0  # always-on shared experts, each expert_hidden wide (DeepSeekMoE)
    router: str = "softmax"  # "softmax" (Mixtral) or "sigmoid" (DeepSeek-V3, with the aux-loss-free bias)
    bias_gamma: float = 1e-3  # sigmoid router: selection_bias's step per optimizer step (DeepSeek-V3's gamma)
    aux_loss_coef: float = 0.01  # Switch load-balancing loss, added to the training loss
    z_loss_coef: float = 1e-3  # router z-loss, added to the training loss

    def __post_init__(self):
        if self.kernel not in ("torch", "triton"):
            raise ValueError(f"kernel must be 'torch' or 'triton', not {self.kernel!r}")
        if self.router not in ("softmax", "sigmoid"):
            raise ValueError(f"router must be 'softmax' or 'sigmoid', not {self.router!r}")
        check_fields(self, sizes=("vocab_size", "block_size", "n_layer", "d_model",
                                 "n_head", "n_kv_head", "n_expert", "expert_hidden"),
                     floats=("rope_theta", "norm_eps"))
        for name in ("n_shared", "bias_gamma", "aux_loss_coef", "z_loss_coef"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not 1 <= self.top_k <= self.n_expert:
            raise ValueError(f"top_k must be 1 to n_expert={self.n_expert}, got {self.top_k}")
        if self.d_model % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head must divide d_model and be a multiple of n_kv_head, got "
                             f"d_model={self.d_model}, n_head={self.n_head}, n_kv_head={self.n_kv_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"n_head must leave an even head dim d_model // n_head for RoPE, got "
                             f"d_model={self.d_model}, n_head={self.n_head}")


# ---------------------------------------------------------------------------------------------------
# The core in PyTorch: routed SwiGLU experts, dropless


def experts(x, expert_ids, gates, weights, kernel="torch"):
    """y[m] = sum_s gates[m, s] * FFN_e(x[m]) with e = expert_ids[m, s], FFN_e the SwiGLU of expert e.
    x: (M, C) float; expert_ids: (M, k) int64; gates: (M, k) float; weights = (w_fc, w_proj), w_fc (E, C, 2h)
    holding W_gate | W_up and w_proj (E, h, C) W_down, float. Returns y: (M, C)."""
    if kernel == "torch":
        return experts_sorted(x, expert_ids, gates, weights)
    if kernel == "triton":
        return experts_triton(x, expert_ids, gates, weights)
    raise ValueError(f"kernel must be 'torch' or 'triton', not {kernel!r}")


def experts_ref(x, expert_ids, gates, weights):
    """The same sum, one (token, slot) pair at a time: the plain reference the tests hold both paths to."""
    w_fc, w_proj = weights
    y = torch.zeros_like(x)
    for m in range(x.size(0)):
        for s in range(expert_ids.size(1)):
            e = expert_ids[m, s]
            gate, up = (x[m] @ w_fc[e]).chunk(2)
            y[m] += gates[m, s] * ((F.silu(gate) * up) @ w_proj[e])
    return y


# Exercise experts: exercises/README.md#experts
def experts_sorted(x, expert_ids, gates, weights):
    """experts(..., kernel="torch"): the pairs sorted by expert, then one SwiGLU (two matmuls) per expert
    over its contiguous run of rows."""
    w_fc, w_proj = weights

    # 1. Sort the pairs by expert: expert e owns the sorted rows offsets[e]:offsets[e+1].
    slot, token, offsets = sort_by_expert(expert_ids, w_fc.size(0))
    gates = gates.flatten()[slot].to(x.dtype)  # (M*k,) the gate of each sorted pair

    # 2. Gather each expert's tokens and run its SwiGLU on them.
    xs = x[token].split(offsets.diff().tolist())  # E runs (n_e, C): expert e's tokens, n_e of them
    ys = []
    for x_e, fc, proj in zip(xs, w_fc.unbind(), w_proj.unbind()):  # split, unbind: one gradient buffer each
        gate, up = (x_e @ fc).chunk(2, dim=-1)  # (n_e, h) each
        ys.append((F.silu(gate) * up) @ proj)  # (n_e, C)

    # 3. Weigh each pair by its gate and add it back to its token.
    ys = torch.cat(ys) * gates[:, None]  # (M*k, C)
    return torch.zeros_like(x).index_add_(0, token, ys)  # each token sums its k slots


def sort_by_expert(expert_ids, n_expert):
    """Order the M*k (token, slot) pairs by expert. Returns, for the sorted pairs, their flat slot ids
    m*k + s (M*k,) and their tokens (M*k,), and offsets (E+1,): expert e owns the sorted rows
    offsets[e]:offsets[e+1]."""
    flat = expert_ids.flatten()  # (M*k,)
    slot = flat.argsort(stable=True)  # only indices are sorted, never the activations
    counts = flat.bincount(minlength=n_expert)  # (E,) slots per expert; 0 for an expert nobody picked
    offsets = F.pad(counts.cumsum(0), (1, 0))  # (E+1,)
    return slot, slot // expert_ids.size(1), offsets


# ---------------------------------------------------------------------------------------------------
# The core in Triton: a grouped GEMM over the sorted (token, slot) pairs (ScatterMoE's scheme)


# Copied from gpt.py
def check_triton(*tensors):
    """Raise one clear line if the Triton path cannot run on these tensors."""
    if triton is None:
        raise RuntimeError("kernel='triton' needs the triton package (Linux only): pip install triton, "
                           "or use kernel='torch'")
    if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernel='triton' on CPU tensors needs TRITON_INTERPRET=1 set before this file is "
                           "imported (slow; for reading and debugging)")


# The sorted pairs are cut into blocks of BLOCK_M rows that never straddle two experts (an expert's last
# block is masked), so each program multiplies rows of one expert by that expert's weight. The rows are
# read through an index (the gather) and written through an index (the scatter), each optional:
#     forward   gate | up = x[token] @ W_fc[e]               gather fused into the first matmul
#               a  = SiLU(gate) * up                         (PyTorch; elementwise)
#               ys[slot] = g * (a @ W_proj[e])               g-weighted scatter fused into the second
#               y  = ys summed over each token's k slots     (g: the pair's gate)
#     backward  da_ = dy[token] @ W_proj[e]^T                the same kernel on a transposed view
#               dg = rowsum(da_ * a);  da = g * da_;  d(gate | up) from da through SwiGLU
#               dx[slot] = d(gate | up) @ W_fc[e]^T, then summed per token
#               dW_proj[e] = a^T (g * dy[token]),  dW_fc[e] = x[token]^T d(gate | up)    (the dw kernel)
# Blocks: 64 rows x 64 columns x 32 deep fits an H100's shared memory many times over and keeps every
# tl.dot dimension >= 16; row indices and expert offsets are int64 so row * stride cannot overflow.
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32

if triton is not None:

    @triton.jit
    def experts_mm_kernel(x_ptr, w_ptr, y_ptr, x_rows_ptr, y_rows_ptr, scale_ptr, block_expert_ptr,
                          block_start_ptr, offsets_ptr, K, N, stride_xm, stride_we, stride_wk, stride_wn,
                          stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[y_rows[i]] = scale[i] * x[x_rows[i]] @ w[e] for the sorted rows i of one block of expert e, a
        (BLOCK_M, BLOCK_N) tile per program. x_rows / y_rows None: x / y are already in sorted order; scale
        None: no scaling. It serves both passes: the forward's two matmuls, the backward's da and dx."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)

        # 1. This block's expert and its sorted rows.
        e = tl.load(block_expert_ptr + pid_m)  # int64
        start, end = tl.load(block_start_ptr + pid_m), tl.load(offsets_ptr + e + 1)
        if start >= end:  # a padding block: the grid is sized without knowing the counts
            return
        offs_m = start + tl.arange(0, BLOCK_M)  # sorted rows, int64
        mask_m = offs_m < end  # the expert's last block is ragged
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

        # 2. Multiply, reading the rows through x_rows (the gather).
        rows = offs_m
        if x_rows_ptr is not None:
            rows = tl.load(x_rows_ptr + offs_m, mask=mask_m, other=0)  # the gather
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
            w = tl.load(w_ptr + e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)  # (BLOCK_K, BLOCK_N)
            acc += tl.dot(x, w)

        # 3. Scale, and write the rows through y_rows (the scatter).
        if scale_ptr is not None:
            acc *= tl.load(scale_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        rows = offs_m
        if y_rows_ptr is not None:
            rows = tl.load(y_rows_ptr + offs_m, mask=mask_m, other=0)  # the scatter: each slot its own row
        tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_n[None, :] < N))

    @triton.jit
    def experts_mm_dw_kernel(x_ptr, dy_ptr, dw_ptr, x_rows_ptr, dy_rows_ptr, scale_ptr, offsets_ptr, K, N,
                             stride_xm, stride_dym,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """dw[e] = sum over expert e's sorted rows i of x[x_rows[i]]^T (scale[i] * dy[dy_rows[i]]): one
        (BLOCK_K, BLOCK_N) tile of one expert's weight gradient per program, zero for an expert with no
        rows. The backward's dW_proj and dW_fc."""
        e = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_n = tl.program_id(2)
        start, end = tl.load(offsets_ptr + e), tl.load(offsets_ptr + e + 1)  # int64
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):  # the expert's rows, a block at a time
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < end
            xr = offs_m
            dyr = offs_m
            if x_rows_ptr is not None:
                xr = tl.load(x_rows_ptr + offs_m, mask=mask_m, other=0)
            if dy_rows_ptr is not None:
                dyr = tl.load(dy_rows_ptr + offs_m, mask=mask_m, other=0)
            x = tl.load(x_ptr + xr[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
            dy = tl.load(dy_ptr + dyr[:, None] * stride_dym + offs_n[None, :],
                         mask=mask_m[:, None] & (offs_n[None, :] < N), other=0.0)  # (BLOCK_M, BLOCK_N)
            if scale_ptr is not None:
                dy = (dy * tl.load(scale_ptr + offs_m, mask=mask_m, other=0.0)[:, None]).to(x.dtype)
            acc += tl.dot(tl.trans(x), dy)
        tl.store(dw_ptr + e.to(tl.int64) * K * N + offs_k[:, None] * N + offs_n[None, :],
                 acc.to(dw_ptr.dtype.element_ty), mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


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


def experts_mm(x, w, schedule, offsets, n_rows, x_rows=None, y_rows=None, scale=None):
    """The (n_rows, N) output of experts_mm_kernel; w: (E, K, N) with any strides, so transposes are free."""
    K, N = w.shape[1:]
    y = x.new_empty(n_rows, N)
    grid = (schedule[0].numel(), triton.cdiv(N, BLOCK_N))
    experts_mm_kernel[grid](x, w, y, x_rows, y_rows, scale, *schedule, offsets, K, N, x.stride(0),
                            *w.stride(), y.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y


def experts_mm_dw(x, dy, offsets, x_rows=None, dy_rows=None, scale=None):
    """The (E, K, N) per-expert weight gradient of experts_mm_dw_kernel; x: (., K), dy: (., N)."""
    E, K, N = offsets.numel() - 1, x.size(1), dy.size(1)
    dw = x.new_empty(E, K, N)
    grid = (E, triton.cdiv(K, BLOCK_K), triton.cdiv(N, BLOCK_N))
    experts_mm_dw_kernel[grid](x, dy, dw, x_rows, dy_rows, scale, offsets, K, N, x.stride(0), dy.stride(0),
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return dw


class ExpertsTriton(torch.autograd.Function):
    """The kernels above joined for autograd, on the pairs sorted by expert. Between forward and backward
    it keeps the inputs and the first matmul's output (M*k, 2h); the SwiGLU is recomputed from it."""

    @staticmethod
    def forward(ctx, x, gates, w_fc, w_proj, slot, token, offsets):
        """x (M, C), gates (M*k,) in sorted order, slot / token (M*k,) of the sorted pairs."""
        x = x.contiguous()
        n_rows = slot.numel()
        schedule = block_schedule(offsets, n_rows)

        # 1. gate | up = x[token] @ W_fc[e], the gather fused; then the SwiGLU.
        gate_up = experts_mm(x, w_fc, schedule, offsets, n_rows, x_rows=token)  # (M*k, 2h), sorted
        gate, up = gate_up.chunk(2, dim=-1)
        a = (F.silu(gate) * up).contiguous()  # (M*k, h), sorted

        # 2. ys[slot] = g * (a @ W_proj[e]), the gate-weighted scatter fused; then each token sums its slots.
        ys = experts_mm(a, w_proj, schedule, offsets, n_rows, y_rows=slot, scale=gates)  # (M*k, C), by slot
        ctx.save_for_backward(x, gates, w_fc, w_proj, slot, token, offsets, gate_up)
        return ys.view(x.size(0), -1, x.size(1)).sum(1, dtype=x.dtype)  # (M, C); autocast would make it fp32

    @staticmethod
    def backward(ctx, dy):
        x, gates, w_fc, w_proj, slot, token, offsets, gate_up = ctx.saved_tensors
        dy = dy.contiguous()
        n_rows = slot.numel()
        schedule = block_schedule(offsets, n_rows)

        # 1. Recompute the SwiGLU's output a from the saved gate | up.
        gate, up = gate_up.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        a = gate * sig * up  # (M*k, h), recomputed rather than saved

        # 2. Back through the second matmul: the gates' gradient, and a's.
        da = experts_mm(dy, w_proj.transpose(1, 2), schedule, offsets, n_rows, x_rows=token)  # (M*k, h)
        dgates = (da * a).sum(-1)  # (M*k,) = dy . (a @ W_proj[e]), the slot's expert output, never stored
        da = da * gates[:, None]

        # 3. Back through the SwiGLU.
        dgate_up = torch.cat([da * up * sig * (1 + gate * (1 - sig)), da * gate * sig], dim=-1)  # (M*k, 2h)

        # 4. The weight gradients, one expert's per program.
        dw_proj = experts_mm_dw(a, dy, offsets, dy_rows=token, scale=gates)  # (E, h, C)
        dw_fc = experts_mm_dw(x, dgate_up, offsets, x_rows=token)  # (E, C, 2h)

        # 5. Back through the first matmul, scattered by slot, and each token sums its slots.
        dxs = experts_mm(dgate_up, w_fc.transpose(1, 2), schedule, offsets, n_rows, y_rows=slot)  # (M*k, C)
        dx = dxs.view(x.size(0), -1, x.size(1)).sum(1)
        return dx, dgates, dw_fc, dw_proj, None, None, None


def experts_triton(x, expert_ids, gates, weights):
    """experts(..., kernel="triton"): ExpertsTriton on the pairs sorted by expert, in one dtype for x, the
    gates and the weights (x's, or under CUDA autocast the autocast dtype, as a matmul would take)."""
    w_fc, w_proj = weights
    check_triton(x, w_fc, w_proj)
    slot, token, offsets = sort_by_expert(expert_ids, w_fc.size(0))
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        x = x.to(torch.get_autocast_dtype("cuda"))  # autocast skips custom kernels: cast as it would a matmul
    gates = gates.flatten()[slot].to(x.dtype)  # (M*k,) the gate of each sorted pair
    return ExpertsTriton.apply(x, gates, w_fc.to(x.dtype), w_proj.to(x.dtype), slot, token, offsets)


# ---------------------------------------------------------------------------------------------------
# Layers


def attend(q, k, v, kernel="torch"):
    """Causal attention, for this file's Attention. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D), the queries
    the last Tq of the Tk positions. Here `kernel` picks the experts core, not an attention kernel: attention
    runs attention_ref (gpt.py's explicit softmax) under "torch" and PyTorch's fused
    scaled_dot_product_attention under "triton" (gpt.py holds the attention kernel)."""
    if kernel == "torch":
        return attention_ref(q, k, v)
    if kernel == "triton":
        Tq, Tk = q.size(2), k.size(2)
        # is_causal aligns the mask top-left, which is wrong when Tq < Tk: pass the mask then.
        mask = None if Tq == Tk else causal_mask(Tq, Tk, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=Tq == Tk,
                                              enable_gqa=q.size(1) != k.size(1))
    raise ValueError(f"kernel must be 'torch' or 'triton', not {kernel!r}")


# Copied from gpt.py
def attention_ref(q, k, v):
    """softmax(Q K^T / sqrt(D)) V under the causal mask, written out: the definition, and the tests'
    reference."""
    Tq, Tk = q.size(2), k.size(2)
    group = q.size(1) // k.size(1)  # query heads per kv head
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, Tk, D)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    att = att.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
    att = F.softmax(att.float(), dim=-1).to(q.dtype)  # softmax in fp32 even under autocast
    return att @ v  # (B, H, Tq, D)


# Copied from gpt.py
def causal_mask(Tq, Tk, device):
    """(Tq, Tk) bool, True where query i (at position Tk - Tq + i) may look at key j."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)


# Copied from gpt.py
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean subtraction and the bias."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


# Copied from gpt.py
def rope_angles(positions, head_dim, theta):
    """The rotations e^(i n theta_j), theta_j = theta^(-2j/D), as complex numbers (T, D/2), for the
    positions n (T,)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * freqs[None, :]  # (T, D/2)
    return torch.polar(torch.ones_like(angles), angles)


# Copied from gpt.py
def apply_rope(x, rope):
    """Rotate x (B, H, T, D) by rope (T, D/2): each pair (x_2j, x_2j+1) is read as the complex number
    x_2j + i x_2j+1, and a rotation is a product with e^(i angle): one op, where cos and sin take six."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, H, T, D/2), complex
    return torch.view_as_real(pairs * rope).flatten(-2).type_as(x)


# Copied from gpt.py, with attention -> attend
class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.d_model // config.n_head
        self.kernel = config.kernel
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(config.d_model, qkv_dim, bias=config.qkv_bias)  # W_Q, W_K, W_V, fused
        if config.qkv_bias:
            nn.init.zeros_(self.c_attn.bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=False)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)

    def forward(self, x, rope, cache=None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qk, v = self.c_attn(x).split([(H + Hkv) * D, Hkv * D], dim=-1)
        qk = qk.view(B, T, H + Hkv, D).transpose(1, 2)  # (B, H + Hkv, T, D): query heads, then key heads
        if self.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])], dim=1)
        q, k = apply_rope(qk, rope).split([H, Hkv], dim=1)  # (B, H, T, D), (B, Hkv, T, D): one rotation
        v = v.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        if cache is not None:  # keys and values of the earlier positions, already rotated
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # (B, Hkv, Tk, D)
        y = attend(q, k, v, self.kernel)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    """A SwiGLU MLP of a given width, the shared experts' (n_shared * expert_hidden wide). W_gate and W_up
    are one fused layer, c_fc, laid out as each routed expert's c_fc is; gpt.py's MLP keeps them as two
    layers (w_gate, w_up) of width mlp_hidden."""

    def __init__(self, d_model, hidden):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 2 * hidden, bias=False)  # W_gate and W_up, fused
        self.c_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)


# Exercise balance_loss: exercises/README.md#balance_loss
def load_balancing_loss(probs, expert_ids):
    """Switch's E * sum_i f_i P_i. probs: (M, E) router probabilities; expert_ids: (M, k). f (the fraction
    of slots each expert got) is a count and has no gradient: the loss lowers P_i where f_i is high."""
    E = probs.size(-1)
    f = expert_ids.flatten().bincount(minlength=E).float() / expert_ids.numel()  # (E,)
    return E * (f * probs.mean(0)).sum()


def z_loss(logits):
    """ST-MoE's router z-loss, mean over tokens of logsumexp(u)^2 for router logits (M, E)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoE(nn.Module):
    """Each token to top_k of n_expert SwiGLU experts (plus the shared ones). A training forward keeps its
    router losses and per-expert counts on the module, for Model.forward, metrics() and after_step()."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        E, C, h = config.n_expert, config.d_model, config.expert_hidden
        self.router = nn.Linear(C, E, bias=False)
        self.c_fc = nn.Parameter(torch.empty(E, C, 2 * h))  # W_gate | W_up of each expert, stacked
        self.c_proj = nn.Parameter(torch.empty(E, h, C))  # W_down of each expert
        self.shared = MLP(C, config.n_shared * h) if config.n_shared else None
        # The sigmoid router's selection bias: a buffer, not a parameter, moved by after_step alone.
        self.register_buffer("selection_bias", torch.zeros(E))
        self.register_buffer("load", torch.zeros(E), persistent=False)  # slots per expert since after_step
        # Set by each training forward: the router losses and the slots per expert (E,).
        self.aux_loss = None
        self.z_loss = None
        self.counts = None

    # Exercise routing: exercises/README.md#routing
    def forward(self, x):
        B, T, C = x.shape
        x = x.view(B * T, C)

        # 1. Route: router logits (in fp32: top-k is brittle in bf16), each token's top_k experts and gates.
        u = F.linear(x.float(), self.router.weight.float())  # (M, E)
        if self.config.router == "softmax":
            probs = F.softmax(u, dim=-1)
            gates, expert_ids = probs.topk(self.config.top_k, dim=-1)  # (M, k) each
        else:
            scores = torch.sigmoid(u)
            picked = (scores + self.selection_bias).topk(self.config.top_k, dim=-1)  # the bias picks...
            expert_ids = picked.indices
            gates = scores.gather(1, expert_ids)  # ...but never weighs
            probs = scores / scores.sum(-1, keepdim=True)  # for the balance loss
        gates = gates / gates.sum(-1, keepdim=True)

        # 2. The routed experts, and the shared ones.
        y = experts(x, expert_ids, gates, (self.c_fc, self.c_proj), self.config.kernel)
        if self.shared is not None:
            y = y + self.shared(x)

        # 3. In training, keep the router losses and the load.
        if self.training:
            self.aux_loss = load_balancing_loss(probs, expert_ids)
            self.z_loss = z_loss(u)
            self.counts = expert_ids.flatten().bincount(minlength=self.config.n_expert)  # (E,)
            self.load += self.counts
        return y.view(B, T, C)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1, self.attn = RMSNorm(config.d_model, config.norm_eps), Attention(config)
        self.norm2, self.moe = RMSNorm(config.d_model, config.norm_eps), MoE(config)

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
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        # GPT-2 init: N(0, 0.02), and the projections into the residual stream (attention's, each expert's
        # and the shared experts') scaled by 1/sqrt(2 * n_layer) so the stream's variance does not grow with
        # depth.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("c_proj", "c_proj.weight"))
                std = 0.02 / math.sqrt(2 * config.n_layer) if residual else 0.02
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

    # Copied from gpt.py
    def prefill(self, idx, state=None):
        """Run the tokens idx (B, T) in parallel after the KV cache `state` (None: a new sequence).
        Returns the logits (B, T, vocab_size) and the cache extended by these T positions."""
        T = idx.size(1)
        start = 0 if state is None else state["pos"]
        cached = 0 if state is None else state["kv"][0][0].size(2)
        if T > 1 and cached + T > self.config.block_size:
            raise ValueError(f"{cached} cached + {T} new tokens is longer than "
                             f"block_size={self.config.block_size}; feed the rest token by token with step()")
        head_dim = self.config.d_model // self.config.n_head
        positions = torch.arange(start, start + T, device=idx.device)
        rope = rope_angles(positions, head_dim, self.config.rope_theta)

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

    # Copied from gpt.py
    def step(self, token, state=None):
        """Feed one token (B,) after `state`; returns logits (B, vocab_size) and the new state."""
        logits, state = self.prefill(token[:, None], state)
        return logits[:, 0], state

    # Copied from gpt.py
    def read_prompt(self, idx):
        """The next token's logits (B, vocab_size) and the KV cache after the prompt idx (B, T). Attention
        sees at most block_size tokens: a longer prompt is cropped to its last block_size, as nanoGPT does,
        with a warning; from there the cache slides."""
        T = self.config.block_size
        if idx.size(1) > T:
            warnings.warn(f"the prompt has {idx.size(1)} tokens; attention reads its last block_size={T}")
        logits, state = self.prefill(idx[:, -T:])
        return logits[:, -1], state

    # Copied from gpt.py
    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Append max_new_tokens sampled tokens to idx (B, T): the prompt is read once (read_prompt), then
        one step per new token, so it is never recomputed. temperature=0 picks the most likely token."""
        logits, state = self.read_prompt(idx)  # (B, vocab_size): the next token's logits
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
                moe.selection_bias += self.config.bias_gamma * torch.sign(moe.load.mean() - moe.load)
            moe.load.zero_()

    def metrics(self):
        """For train.py's log, from the last training forward: the router losses (before their coefficients,
        averaged over layers) and, per layer, the fraction of routed slots each expert got: 1/n_expert each
        is balance; collapse is a few experts near 1/top_k (a token picks an expert at most once) and the
        rest near 0."""
        moes = [block.moe for block in self.blocks]
        if moes[0].counts is None:
            return {}
        out = {"aux_loss": sum(m.aux_loss.item() for m in moes) / len(moes),
               "z_loss": sum(m.z_loss.item() for m in moes) / len(moes)}
        for i, m in enumerate(moes):
            out[f"expert_load[{i}]"] = (m.counts / m.counts.sum()).tolist()
        return out

    # Copied from gpt.py
    def param_groups(self, weight_decay):
        """AdamW groups: weight decay on the matrices (every parameter of two or more dimensions), none on
        the vectors (norm gains, biases)."""
        params = list(self.parameters())
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward) at context T, after PaLM's appendix B: 6 per ACTIVE
        matmul parameter (a token uses top_k of the n_expert routed experts), plus 12 * n_layer * d_model * T
        for the attention scores and the weighted sum."""
        c = self.config
        n_matmul = sum(p.numel() for p in self.parameters() if p.dim() >= 2)  # a tied matrix counts once
        if not c.tie_weights:
            n_matmul -= self.wte.weight.numel()  # an embedding lookup is not a matmul
        routed = sum(b.moe.c_fc.numel() + b.moe.c_proj.numel() for b in self.blocks)
        n_matmul -= routed * (1 - c.top_k / c.n_expert)  # the inactive share of the routed experts
        return 6 * n_matmul + 12 * c.n_layer * c.d_model * T

    @classmethod
    def from_pretrained(cls, path_or_id, **overrides):
        """A released Mixtral from a Hugging Face hub id, e.g. "mistralai/Mixtral-8x7B-v0.1" (fetched once
        into the hub's cache), or from a local folder in that layout; in fp32, in eval mode, with the softmax
        router, top_k of n_expert experts and no shared ones. overrides set the Config fields a checkpoint
        does not fix (kernel, block_size). What moe.py cannot represent is a ValueError naming it.
        The section "Released checkpoints" below does the reading."""
        hf_config, tensors = read_checkpoint(download(path_or_id))
        model = cls(mixtral_config(hf_config, **overrides))
        load_weights(model, *mixtral_state_dict(tensors, model.config))
        return model.eval()


# ---------------------------------------------------------------------------------------------------
# Released checkpoints: Mixtral in Hugging Face's layout, read into this file's names. huggingface_hub and
# safetensors are imported here, only when one is loaded. The readers are gpt.py's.


# Copied from gpt.py
def download(path_or_id):
    """path_or_id as it is where it exists on disk; else a Hugging Face hub id, "owner/name" (its .json files
    and its weights: model.safetensors where it has them, else pytorch_model.bin) or "owner/name/file" (that
    file), fetched once into the hub's cache. Returns the local folder or file."""
    if os.path.exists(path_or_id):
        return path_or_id
    parts = path_or_id.split("/")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"{path_or_id!r} is neither a local folder or file nor a Hugging Face hub id "
                         f"(owner/name)")
    try:
        import huggingface_hub
    except ImportError:
        raise RuntimeError(f"{path_or_id!r} is not on disk, and fetching it from the Hugging Face hub needs "
                           f"huggingface_hub: pip install huggingface_hub safetensors tokenizers") from None
    repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        if file:
            return huggingface_hub.hf_hub_download(repo, file)
        # model*.safetensors: whole or in shards, and not the copy some repos keep in their own format
        folder = huggingface_hub.snapshot_download(repo, allow_patterns=["*.json", "model*.safetensors"])
        if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
            folder = huggingface_hub.snapshot_download(repo, allow_patterns=["*.json", "pytorch_model*.bin"])
        return folder
    except Exception as e:  # offline, no such repository, a gated model: one line for each
        raise RuntimeError(f"cannot fetch {path_or_id!r} from the Hugging Face hub ({type(e).__name__}: is "
                           f"the hub reachable, the name right?); download it where the hub is reachable and "
                           f"pass its local path") from None


# Copied from gpt.py
def read_checkpoint(folder):
    """A Hugging Face checkpoint folder: its config.json as a dict, and its tensors by name, from
    model.safetensors or pytorch_model.bin, whole or in shards (listed by their index.json)."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder} has no config.json: pass a Hugging Face checkpoint's folder")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(folder, name + ".index.json")):
            with open(os.path.join(folder, name + ".index.json")) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(folder, name)):
            files = [name]
        else:
            continue
        tensors = {}
        for file in files:
            if file.endswith(".safetensors"):
                try:
                    from safetensors.torch import load_file
                except ImportError:
                    raise RuntimeError("reading .safetensors files needs safetensors: pip install "
                                       "safetensors") from None
                tensors.update(load_file(os.path.join(folder, file)))
            else:
                tensors.update(torch.load(os.path.join(folder, file), map_location="cpu", weights_only=True))
        return config, tensors
    raise ValueError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


# Copied from gpt.py
def take(tensors, name):
    """Remove the checkpoint's tensor `name` from tensors and return it; what is never taken is left over."""
    if name not in tensors:
        raise ValueError(f"the checkpoint has no tensor {name!r}")
    return tensors.pop(name)


# Copied from gpt.py
def head_weight(tensors, embedding, tied, name="lm_head.weight"):
    """The output head: the embedding itself when tied (a saved copy, if any, must equal it), else its own."""
    if not tied:
        return take(tensors, name)
    if name in tensors and not torch.equal(take(tensors, name), embedding):
        raise ValueError(f"the config ties the head to the embedding, but {name} differs from it")
    return embedding


# Copied from gpt.py
def load_weights(model, state_dict, leftover):
    """Copy state_dict, in this file's names, into model. A tensor of the checkpoint that no name took
    (leftover) is a part this file does not have: an error naming it, never a silent drop."""
    if leftover:
        names = sorted(leftover)
        raise ValueError(f"the checkpoint has {len(names)} tensor(s) this file has no place for: "
                         f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    own = model.state_dict()
    for name, tensor in state_dict.items():
        if tensor.shape != own[name].shape:
            raise ValueError(f"the checkpoint's tensor for {name} is {tuple(tensor.shape)}, where its config "
                             f"makes {tuple(own[name].shape)}")
    model.load_state_dict(state_dict)


def mixtral_config(hf, **overrides):
    """This file's Config from a Mixtral config.json (a dict): every field it fixes, read from it; anything
    moe.py cannot represent, a ValueError naming it. overrides: the fields it leaves (kernel, block_size)."""
    kind = hf.get("model_type")
    if kind != "mixtral":
        raise ValueError(f"moe.py loads Mixtral checkpoints (model_type 'mixtral'), not model_type {kind!r}")
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    context = hf.get("max_position_embeddings", 32768)
    rope = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta")}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    window = hf.get("sliding_window")

    lacks = []
    if hf.get("hidden_act", "silu") != "silu":
        lacks.append(f"hidden_act {hf['hidden_act']!r} (the experts gate with SiLU)")
    if rope_type != "default":
        lacks.append(f"rope scaling {rope_type!r} (moe.py has plain RoPE)")
    if hf.get("head_dim") not in (None, C // H):
        lacks.append(f"head_dim {hf['head_dim']} apart from hidden_size / num_attention_heads = {C // H}")
    if window is not None and window < context:
        lacks.append(f"sliding-window attention over {window} tokens (moe.py attends over all of block_size)")
    if lacks:
        raise ValueError(f"this mixtral checkpoint has what moe.py cannot represent: {'; '.join(lacks)}")
    # router_jitter_noise, if any, is training noise on the router's input: it changes no output here
    fields = dict(vocab_size=hf["vocab_size"], block_size=context, n_layer=hf["num_hidden_layers"], d_model=C,
                  n_head=H, n_kv_head=hf.get("num_key_value_heads") or H, qk_norm=False,
                  rope_theta=float(rope.get("rope_theta") or 1e6),
                  tie_weights=hf.get("tie_word_embeddings", False), norm_eps=hf["rms_norm_eps"],
                  n_expert=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                  expert_hidden=hf["intermediate_size"], n_shared=0, router="softmax",
                  aux_loss_coef=hf.get("router_aux_loss_coef", 0.02), z_loss_coef=0.0)
    return Config(**{**fields, **overrides})


# Copied from gpt.py
def rope_pairs(w, n_heads):
    """Reorder the rows of each head of a q or k projection (weight or bias) from Hugging Face's half-split
    RoPE layout to gpt.py's pairs: Hugging Face rotates dimension j with j + D/2 (rotate_half), gpt.py
    rotates 2j with 2j + 1, both by the angle n * theta^(-2j/D). So row j goes to 2j and row j + D/2 to
    2j + 1; q.k is a sum over the dimensions, the same in any order shared by q and k."""
    return w.unflatten(0, (n_heads, 2, -1)).transpose(1, 2).flatten(0, 2)


def mixtral_state_dict(tensors, config):
    """This file's state_dict from the tensors of a Mixtral checkpoint (Hugging Face's names), and the tensors
    left over. Each expert's w1 (W_gate), w3 (W_up) and w2 (W_down), (h, C), (h, C) and (C, h) as nn.Linear
    keeps them, go transposed into the stacks c_fc[e] = [W_gate | W_up] (C, 2h) and c_proj[e] (h, C)."""
    H, Hkv, E = config.n_head, config.n_kv_head, config.n_expert
    sd = {"wte.weight": take(tensors, "model.embed_tokens.weight")}
    for i in range(config.n_layer):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        q, k, v = (take(tensors, f"{hf}self_attn.{x}_proj.weight") for x in "qkv")
        sd[ours + "attn.c_attn.weight"] = torch.cat([rope_pairs(q, H), rope_pairs(k, Hkv), v])  # fused
        sd[ours + "attn.c_proj.weight"] = take(tensors, hf + "self_attn.o_proj.weight")
        moe = hf + "block_sparse_moe."
        sd[ours + "moe.router.weight"] = take(tensors, moe + "gate.weight")  # (E, C)
        w1, w2, w3 = ([take(tensors, f"{moe}experts.{e}.{w}.weight") for e in range(E)]
                      for w in ("w1", "w2", "w3"))  # W_gate, W_down, W_up of each expert
        sd[ours + "moe.c_fc"] = torch.stack([torch.cat([g.t(), u.t()], dim=1) for g, u in zip(w1, w3)])
        sd[ours + "moe.c_proj"] = torch.stack([d.t() for d in w2])
        sd[ours + "moe.selection_bias"] = torch.zeros(E)  # the sigmoid router's; the softmax router has none
        sd[ours + "norm1.weight"] = take(tensors, hf + "input_layernorm.weight")
        sd[ours + "norm2.weight"] = take(tensors, hf + "post_attention_layernorm.weight")
        tensors.pop(hf + "self_attn.rotary_emb.inv_freq", None)  # a buffer old files kept: from rope_theta
    sd["norm_f.weight"] = take(tensors, "model.norm.weight")
    sd["lm_head.weight"] = head_weight(tensors, sd["wte.weight"], config.tie_weights)
    return sd, tensors


# ---------------------------------------------------------------------------------------------------
# Self-check: `python moe.py` holds each fast path of the experts core to experts_ref, output and
# gradients, on ragged shapes (no multiple of any tile) and a lopsided routing: expert 0 takes nearly every
# token, so its run spans two row blocks, and expert 2 none. `TRITON_INTERPRET=1 python moe.py` adds the
# Triton path on a CPU.

if __name__ == "__main__":
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    M, k, E, C, h = 77, 2, 5, 48, 40
    scores = torch.randn(M, E, device=device)
    scores[:, 0] += 3
    scores[:, 2] = -math.inf
    expert_ids = scores.topk(k, dim=-1).indices  # (M, k)
    x, dy = torch.randn(M, C, device=device), torch.randn(M, C, device=device)
    gates = torch.rand(M, k, device=device)
    w_fc = torch.randn(E, C, 2 * h, device=device) / math.sqrt(C)
    w_proj = torch.randn(E, h, C, device=device) / math.sqrt(h)

    def run(kernel, *inputs):
        inputs = [t.detach().clone().requires_grad_() for t in inputs]  # x, gates, w_fc, w_proj
        f = experts_ref if kernel == "ref" else lambda *args: experts(*args, kernel=kernel)
        y = f(inputs[0], expert_ids, inputs[1], (inputs[2], inputs[3]))
        y.backward(dy.to(y.dtype))
        return [y] + [t.grad for t in inputs]

    want = run("ref", x.double(), gates.double(), w_fc.double(), w_proj.double())
    has_triton = triton is not None and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    for kernel in ["torch"] + ["triton"] * has_triton:
        got = run(kernel, x, gates, w_fc, w_proj)
        error = max((a.double() - b).abs().max().item() for a, b in zip(got, want))
        print(f"experts(kernel={kernel!r}) vs experts_ref, output and gradients: max |difference| "
              f"{error:.1e}")
