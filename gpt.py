"""
gpt.py: a Llama-style GPT in one file.

A decoder-only transformer (Radford et al. 2019, "GPT-2") with the changes Llama made standard
(Touvron et al. 2023): rotary position embeddings, RMSNorm pre-norm, a SwiGLU MLP, no biases,
and grouped-query attention. Each block is

    x = x + Attention(RMSNorm(x))
    x = x + MLP(RMSNorm(x))

with
    RMSNorm(x)   = x / sqrt(mean(x^2) + eps) * g
    RoPE(x, n)   rotates each channel pair (x_2j, x_2j+1) by the angle n * theta^(-2j/D), so q_m . k_n
                 depends only on the distance m - n (as complex numbers: a product with e^(i n theta_j))
    Attention    = softmax(Q K^T / sqrt(D) + M) V, M = -inf above the diagonal (causal);
                 H query heads share Hkv key/value heads (grouped-query attention, GQA)
    MLP(x)       = (SiLU(x W_gate) * (x W_up)) W_down                                (SwiGLU)

Notation: B batch, T sequence length (Tq queries after Tk keys when a KV cache is in play), C = d_model,
H query heads, Hkv key/value heads, D = C / H the head dim. In the kernels BLOCK_M, BLOCK_N and BLOCK_D
are the tiles of queries, keys and head dim.

The core is `attention(q, k, v, kernel=...)`:
    "torch"   `attention_ref`, the explicit masked softmax as the equation reads: the one to read, and
              the reference the tests hold the other two to
    "sdpa"    PyTorch's fused F.scaled_dot_product_attention, the same function in one op (the default:
              the fastest path wherever PyTorch runs, 10% of a training step on a CPU at the default size)
    "triton"  `attention_triton`, FlashAttention-2, forward and backward (below)

The Triton kernels are FlashAttention-2 (Dao 2023), after Triton's fused-attention tutorial
(triton-lang/triton, python/tutorials/06-fused-attention.py). A program holds a tile of queries and
streams tiles of keys and values past it, keeping each row's running max m_i, running sum l_i and an fp32
accumulator acc (the online softmax: old sums are rescaled when the max grows), so the (T, T) score matrix
is never stored, and it stops at the causal diagonal. The backward recomputes the probabilities tile by
tile from each row's saved log-sum-exp. It is `attention_ref`'s softmax, a tile at a time.

Layout: Config; the core in PyTorch (attention, attention_ref); the core in Triton (kernels,
AttentionTriton, attention_triton); the layers (RMSNorm, RoPE, Attention, MLP, Block); the Model
(forward, prefill/step with a KV cache, generate, from_pretrained); released checkpoints (Llama, SmolLM2,
Qwen2, Mistral, read from Hugging Face's layout into this file's names); a self-check, `python gpt.py`.
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
    kernel: str = "sdpa"  # attention core: "torch" (explicit softmax), "sdpa" or "triton"
    n_head: int = 4
    n_kv_head: int = 2  # < n_head for grouped-query attention (2 query heads per kv head); divides n_head
    mlp_hidden: int = 320  # SwiGLU width: about 8/3 * d_model (a 4*d MLP's parameters), a multiple of 64
    # RMSNorm on q and k per head: tames attention logits in big or long runs. Off by default: two more
    # norms per layer cost ~12% of a CPU training step, and the small model needs none.
    qk_norm: bool = False
    rope_theta: float = 10000.0
    tie_weights: bool = True  # lm_head shares the token embedding matrix
    norm_eps: float = 1e-6  # every RMSNorm's eps (released checkpoints: 1e-5 or 1e-6, in their config)
    qkv_bias: bool = False  # biases on W_Q, W_K, W_V (Qwen2 has them; Llama has none)

    def __post_init__(self):
        if self.kernel not in ("torch", "sdpa", "triton"):
            raise ValueError(f"kernel must be 'torch', 'sdpa' or 'triton', not {self.kernel!r}")
        check_fields(self, sizes=("vocab_size", "block_size", "n_layer", "d_model",
                                 "n_head", "n_kv_head", "mlp_hidden"),
                     floats=("rope_theta", "norm_eps"))
        if self.d_model % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head must divide d_model and be a multiple of n_kv_head, got "
                             f"d_model={self.d_model}, n_head={self.n_head}, n_kv_head={self.n_kv_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"n_head must leave an even head dim d_model // n_head for RoPE, got "
                             f"d_model={self.d_model}, n_head={self.n_head}")


# ---------------------------------------------------------------------------------------------------
# The core in PyTorch: causal softmax attention


def attention(q, k, v, kernel="torch"):
    """Causal attention. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with Tq <= Tk and H a multiple of Hkv.
    The queries are the last Tq of the Tk positions (Tq = Tk in training, Tq = 1 when decoding)."""
    if kernel == "torch":
        return attention_ref(q, k, v)
    if kernel == "sdpa":
        Tq, Tk = q.size(2), k.size(2)
        # is_causal aligns the mask top-left, which is wrong when Tq < Tk: pass the mask then.
        mask = None if Tq == Tk else causal_mask(Tq, Tk, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=Tq == Tk,
                                              enable_gqa=q.size(1) != k.size(1))
    if kernel == "triton":
        return attention_triton(q, k, v)
    raise ValueError(f"kernel must be 'torch', 'sdpa' or 'triton', not {kernel!r}")


# Exercise causal_attention: exercises/README.md#causal_attention
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


def causal_mask(Tq, Tk, device):
    """(Tq, Tk) bool, True where query i (at position Tk - Tq + i) may look at key j."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)


# ---------------------------------------------------------------------------------------------------
# The core in Triton: FlashAttention-2, forward and backward


def check_triton(*tensors):
    """Raise one clear line if the Triton path cannot run on these tensors."""
    if triton is None:
        raise RuntimeError("kernel='triton' needs the triton package (Linux only): pip install triton, "
                           "or use kernel='torch'")
    if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernel='triton' on CPU tensors needs TRITON_INTERPRET=1 set before this file is "
                           "imported (slow; for reading and debugging)")


# Every kernel runs on a grid of (tile, batch * head) programs, on (B, H, T, D) tensors laid out
# contiguously: row t of head bh starts at (bh * T + t) * D. Query row i of Tq sits at position Tk - Tq + i,
# so it sees the keys j <= i + Tk - Tq; loops stop at the diagonal, so the tiles above it are never visited.
if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)), and exp2 is the GPU's instruction

    # Exercise attention_kernel: exercises/README.md#attention_kernel
    @triton.jit
    def attention_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, H, Hkv, Tq, Tk, D, sm_scale,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """O = softmax(Q K^T / sqrt(D) + causal mask) V for BLOCK_M queries of one (batch, head). On a GPU,
        fp32 inputs multiply in TF32 on the tensor cores (tl.dot's default), as torch's do with allow_tf32."""
        start_m = tl.program_id(0)
        off_bh = tl.program_id(1)
        qk_scale = sm_scale * LOG2E
        off_bkv = off_bh // H * Hkv + off_bh % H // (H // Hkv)  # GQA: b * Hkv + h // group, h's kv head
        kv_base = off_bkv.to(tl.int64) * Tk * D  # int64: B * H * T * D can pass 2^31

        # 1. Load this program's tile of queries; it stays put while the keys stream past.
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_q = off_bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :]
        q_mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
        q = tl.load(q_ptr + offs_q, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of each row's scores
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(score - m_i) * v

        # 2. Walk the key tiles up to the diagonal, folding each into the online softmax.
        hi = tl.minimum(Tk, (start_m + 1) * BLOCK_M + Tk - Tq)  # one past the last row's diagonal
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            offs_kv = kv_base + offs_n[:, None] * D + offs_d[None, :]
            kv_mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
            k = tl.load(k_ptr + offs_kv, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
            v = tl.load(v_ptr + offs_kv, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N) scores in fp32, times log2(e) for exp2
            # The causal mask; for the rows we store it also hides the padding keys >= Tk.
            s = tl.where(offs_m[:, None] + Tk - Tq >= offs_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is in the first tile and every row sees it
            alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old max
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new

        # 3. Normalise, and keep each row's log-sum-exp (base 2) for the backward.
        tl.store(o_ptr + offs_q, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=q_mask)
        tl.store(lse_ptr + off_bh.to(tl.int64) * Tq + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < Tq)

    @triton.jit
    def attention_bwd_preprocess_kernel(o_ptr, do_ptr, delta_ptr, Tq, D,
                                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """delta_i = sum_d dO_id * O_id (= sum_j P_ij dP_ij), the row term of the softmax's gradient."""
        start_m = tl.program_id(0)
        off_bh = tl.program_id(1)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_q = off_bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :]
        mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
        o = tl.load(o_ptr + offs_q, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + offs_q, mask=mask, other=0.0).to(tl.float32)
        tl.store(delta_ptr + off_bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)

    @triton.jit
    def attention_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                                  H, Hkv, Tq, Tk, D, sm_scale,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """dK and dV for BLOCK_N keys of one kv head: K and V stay put while the query tiles of every query
        head that reads this kv head stream past. One program sums all of its GQA group in a fixed order, so
        dK and dV come out the same on every run (atomic adds from several programs would not)."""
        start_n = tl.program_id(0)
        off_bkv = tl.program_id(1)
        qk_scale = sm_scale * LOG2E

        # 1. Load this program's keys and values.
        offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_kv = off_bkv.to(tl.int64) * Tk * D + offs_n[:, None] * D + offs_d[None, :]
        kv_mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
        k = tl.load(k_ptr + offs_kv, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptr + offs_kv, mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

        # 2. For each query head of the group, walk the query tiles from the first that sees these keys.
        lo = tl.maximum(start_n * BLOCK_N - (Tk - Tq), 0) // BLOCK_M * BLOCK_M  # rows above lo see none
        for g in range(H // Hkv):
            off_bh = off_bkv * (H // Hkv) + g  # = b * H + h for the group's g-th query head h
            for start_m in range(lo, Tq, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                offs_q = off_bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :]
                q_mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
                q = tl.load(q_ptr + offs_q, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
                do = tl.load(do_ptr + offs_q, mask=q_mask, other=0.0)
                offs_row = off_bh.to(tl.int64) * Tq + offs_m  # lse and delta: one fp32 per query row
                lse = tl.load(lse_ptr + offs_row, mask=offs_m < Tq, other=0.0)
                delta = tl.load(delta_ptr + offs_row, mask=offs_m < Tq, other=0.0)

                # 3. P^T, keys along the rows so that dK and dV accumulate in place; recomputed from the
                # lse, not stored.
                pT = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
                causal = offs_m[None, :] + Tk - Tq >= offs_n[:, None]
                pT = tl.where((offs_m[None, :] < Tq) & causal, pT, 0.0)

                # 4. The chain rule through O = P V and P = softmax(S).
                dv = tl.dot(pT.to(do.dtype), do, dv)  # dV = P^T dO
                dpT = tl.dot(v, tl.trans(do))  # dP^T = V dO^T
                dsT = pT * (dpT - delta[None, :])  # dS = P * (dP - delta)
                dk = tl.dot(dsT.to(q.dtype), q, dk)  # dK = dS^T Q / sqrt(D); the 1/sqrt(D) once, at the end

        tl.store(dk_ptr + offs_kv, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + offs_kv, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def attention_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                                H, Hkv, Tq, Tk, D, sm_scale,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """dQ for BLOCK_M queries of one head: the forward's walk over key tiles again, now summing dS K."""
        start_m = tl.program_id(0)
        off_bh = tl.program_id(1)
        qk_scale = sm_scale * LOG2E
        off_bkv = off_bh // H * Hkv + off_bh % H // (H // Hkv)
        kv_base = off_bkv.to(tl.int64) * Tk * D

        # 1. Load this program's queries, their output gradients and per-row terms.
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_q = off_bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :]
        q_mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
        q = tl.load(q_ptr + offs_q, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(do_ptr + offs_q, mask=q_mask, other=0.0)
        offs_row = off_bh.to(tl.int64) * Tq + offs_m  # lse and delta: one fp32 per query row
        lse = tl.load(lse_ptr + offs_row, mask=offs_m < Tq, other=0.0)
        delta = tl.load(delta_ptr + offs_row, mask=offs_m < Tq, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # 2. Walk the key tiles up to the diagonal: recompute P, then dS, and sum dS K.
        hi = tl.minimum(Tk, (start_m + 1) * BLOCK_M + Tk - Tq)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            offs_kv = kv_base + offs_n[:, None] * D + offs_d[None, :]
            kv_mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
            k = tl.load(k_ptr + offs_kv, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
            v = tl.load(v_ptr + offs_kv, mask=kv_mask, other=0.0)
            p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
            p = tl.where(offs_m[:, None] + Tk - Tq >= offs_n[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v))  # dP = dO V^T
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq)  # dQ = dS K / sqrt(D); the 1/sqrt(D) once, at the end

        tl.store(dq_ptr + offs_q, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


def block_sizes(Tq, D, dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_D): query tile, key tile and padded head dim, for every kernel above.
    64 x 64 tiles are FlashAttention-2's size for head dims up to 128: big enough to keep the tensor cores
    busy, small enough that what a program holds (its Q or K/V tile, plus the streamed tiles,
    triple-buffered) fits the 227 KB of shared memory an H100 gives a program. Where a row of K is wider
    than 256 bytes (fp32 at head dim 128) the key tile halves to 32 rows: 64 would need 224 KB. A short
    chunk of queries (decode: Tq = 1) gets tl.dot's smallest tile, 16 rows, not 64 mostly empty ones. The
    head dim is padded to a power of two (>= 16, tl.dot's smallest) and masked, so 48 runs as a masked 64."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_M = min(64, max(16, triton.next_power_of_2(Tq)))
    BLOCK_N = 64 if BLOCK_D * dtype.itemsize <= 256 else 32
    return BLOCK_M, BLOCK_N, BLOCK_D


class AttentionTriton(torch.autograd.Function):
    """The kernels above joined for autograd. Between forward and backward it keeps q, k, v, the output
    and one log-sum-exp per query row: nothing of size T^2."""

    @staticmethod
    def forward(ctx, q, k, v):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the kernels' layout (see above)
        B, H, Tq, D = q.shape
        Hkv, Tk = k.size(1), k.size(2)
        BLOCK_M, BLOCK_N, BLOCK_D = block_sizes(Tq, D, q.dtype)
        o = torch.empty_like(q)
        lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)  # each row's log-sum-exp, base 2
        grid = (triton.cdiv(Tq, BLOCK_M), B * H)
        attention_fwd_kernel[grid](q, k, v, o, lse, H, Hkv, Tq, Tk, D, 1 / math.sqrt(D),
                                   BLOCK_M, BLOCK_N, BLOCK_D)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        B, H, Tq, D = q.shape
        Hkv, Tk = k.size(1), k.size(2)
        BLOCK_M, BLOCK_N, BLOCK_D = block_sizes(Tq, D, q.dtype)
        sm_scale = 1 / math.sqrt(D)

        # delta, then dK/dV and dQ in two kernels where the tutorial fuses them in one: with GQA their
        # grids differ (a program per key tile of a kv head, a program per query tile of a query head).
        delta = torch.empty_like(lse)
        attention_bwd_preprocess_kernel[(triton.cdiv(Tq, BLOCK_M), B * H)](o, do, delta, Tq, D,
                                                                            BLOCK_M, BLOCK_D)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        attention_bwd_dkdv_kernel[(triton.cdiv(Tk, BLOCK_N), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, H, Hkv, Tq, Tk, D, sm_scale, BLOCK_M, BLOCK_N, BLOCK_D)
        attention_bwd_dq_kernel[(triton.cdiv(Tq, BLOCK_M), B * H)](
            q, k, v, do, lse, delta, dq, H, Hkv, Tq, Tk, D, sm_scale, BLOCK_M, BLOCK_N, BLOCK_D)
        return dq, dk, dv


def attention_triton(q, k, v):
    """attention(q, k, v, "triton"): AttentionTriton, in one dtype for all three (under autocast the
    autocast dtype, as a matmul would take)."""
    check_triton(q, k, v)
    if q.size(-1) > 128:
        raise RuntimeError(f"kernel='triton' takes head dims up to 128, not {q.size(-1)}: its tiles are "
                           f"sized for an H100's shared memory; use kernel='sdpa'")
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        # Triton's interpreter multiplies the raw bits of bf16 in tl.dot (triton-lang/triton#11584): use fp32
        return AttentionTriton.apply(q.float(), k.float(), v.float()).to(dtype)
    return AttentionTriton.apply(q.to(dtype), k.to(dtype), v.to(dtype))


# ---------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean subtraction and the bias."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


# Exercise rope: exercises/README.md#rope
def rope_angles(positions, head_dim, theta):
    """The rotations e^(i n theta_j), theta_j = theta^(-2j/D), as complex numbers (T, D/2), for the
    positions n (T,)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * freqs[None, :]  # (T, D/2)
    return torch.polar(torch.ones_like(angles), angles)


# Exercise rope: exercises/README.md#rope
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
        y = attention(q, k, v, self.kernel)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        # W_gate and W_up as two layers, not one fused: the halves of a fused output are strided views, on
        # which SiLU and its backward run at half speed on a CPU
        self.w_gate = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.w_up = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(config.mlp_hidden, config.d_model, bias=False)

    def forward(self, x):
        return self.c_proj(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1, self.attn = RMSNorm(config.d_model, config.norm_eps), Attention(config)
        self.norm2, self.mlp = RMSNorm(config.d_model, config.norm_eps), MLP(config)

    def forward(self, x, rope, cache=None):
        a, kv = self.attn(self.norm1(x), rope, cache)
        x = x + a
        x = x + self.mlp(self.norm2(x))
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
        # GPT-2 init: N(0, 0.02), and the projections into the residual stream scaled by 1/sqrt(2 * n_layer)
        # so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
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
        return logits, loss

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

    def step(self, token, state=None):
        """Feed one token (B,) after `state`; returns logits (B, vocab_size) and the new state."""
        logits, state = self.prefill(token[:, None], state)
        return logits[:, 0], state

    def read_prompt(self, idx):
        """The next token's logits (B, vocab_size) and the KV cache after the prompt idx (B, T). Attention
        sees at most block_size tokens: a longer prompt is cropped to its last block_size, as nanoGPT does,
        with a warning; from there the cache slides."""
        T = self.config.block_size
        if idx.size(1) > T:
            warnings.warn(f"the prompt has {idx.size(1)} tokens; attention reads its last block_size={T}")
        logits, state = self.prefill(idx[:, -T:])
        return logits[:, -1], state

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

    def param_groups(self, weight_decay):
        """AdamW groups: weight decay on the matrices (every parameter of two or more dimensions), none on
        the vectors (norm gains, biases)."""
        params = list(self.parameters())
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward) at context T, after PaLM's appendix B: 6 per matmul
        parameter, plus 12 * n_layer * d_model * T for the attention scores and the weighted sum."""
        n_matmul = sum(p.numel() for p in self.parameters() if p.dim() >= 2)  # a tied matrix counts once
        if not self.config.tie_weights:
            n_matmul -= self.wte.weight.numel()  # an embedding lookup is not a matmul
        return 6 * n_matmul + 12 * self.config.n_layer * self.config.d_model * T

    @classmethod
    def from_pretrained(cls, path_or_id, **overrides):
        """A released Llama-style model (Llama, SmolLM2, Qwen2, Mistral) from a Hugging Face hub id, e.g.
        Model.from_pretrained("HuggingFaceTB/SmolLM2-135M") (fetched once into the hub's cache), or from a
        local folder in that layout (config.json and the weights); in fp32, in eval mode. overrides set the
        Config fields a checkpoint does not fix (kernel, block_size). What gpt.py cannot represent (a rope
        scaling, a sliding window, a bias it lacks, a tensor it has no place for) is a ValueError naming it:
        never wrong numbers. The section "Released checkpoints" below does the reading."""
        hf_config, tensors = read_checkpoint(download(path_or_id))
        model = cls(llama_config(hf_config, **overrides))
        load_weights(model, *llama_state_dict(tensors, model.config))
        return model.eval()


# ---------------------------------------------------------------------------------------------------
# Released checkpoints: Llama-style models in Hugging Face's layout (Llama, SmolLM2, Qwen2, Mistral), read
# into gpt.py's own names. huggingface_hub and safetensors are imported here, only when one is loaded.


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


def take(tensors, name):
    """Remove the checkpoint's tensor `name` from tensors and return it; what is never taken is left over."""
    if name not in tensors:
        raise ValueError(f"the checkpoint has no tensor {name!r}")
    return tensors.pop(name)


def head_weight(tensors, embedding, tied, name="lm_head.weight"):
    """The output head: the embedding itself when tied (a saved copy, if any, must equal it), else its own."""
    if not tied:
        return take(tensors, name)
    if name in tensors and not torch.equal(take(tensors, name), embedding):
        raise ValueError(f"the config ties the head to the embedding, but {name} differs from it")
    return embedding


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
    model.load_state_dict(state_dict)  # strict: every parameter is filled


LLAMA_STYLE = ("llama", "mistral", "qwen2")  # Hugging Face model types with gpt.py's architecture


def llama_config(hf, **overrides):
    """gpt.py's Config from a Llama-style config.json (a dict): every field it fixes, read from it; anything
    gpt.py cannot represent, a ValueError naming it. overrides: the fields it leaves (kernel, block_size)."""
    kind = hf.get("model_type")
    if kind not in LLAMA_STYLE:
        raise ValueError(f"gpt.py loads Llama-style checkpoints (model_type {', '.join(LLAMA_STYLE)}), not "
                         f"model_type {kind!r}")
    C, H, n_layer = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    context = hf.get("max_position_embeddings", 2048)
    # RoPE: transformers 5 writes rope_parameters; older configs, as released, rope_theta and rope_scaling.
    rope = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta")}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    # Sliding-window attention: Mistral's on every layer; Qwen2's only with use_sliding_window, on the layers
    # from max_window_layers on; transformers 5 names each layer's kind in layer_types.
    window = hf.get("sliding_window")
    if "layer_types" in hf:
        window = window if "sliding_attention" in hf["layer_types"] else None
    elif kind == "qwen2" and not (hf.get("use_sliding_window") and hf.get("max_window_layers", 28) < n_layer):
        window = None

    lacks = []
    if hf.get("hidden_act", "silu") != "silu":
        lacks.append(f"hidden_act {hf['hidden_act']!r} (gpt.py's MLP gates with SiLU)")
    if rope_type != "default":
        lacks.append(f"rope scaling {rope_type!r} (gpt.py has plain RoPE)")
    if hf.get("head_dim") not in (None, C // H):
        lacks.append(f"head_dim {hf['head_dim']} apart from hidden_size / num_attention_heads = {C // H} "
                     f"(gpt.py derives it)")
    if hf.get("attention_bias"):
        lacks.append("attention_bias, a bias on o_proj too (gpt.py has qkv_bias only)")
    if hf.get("mlp_bias"):
        lacks.append("mlp_bias (gpt.py's MLP has no biases)")
    if window is not None and window < context:
        lacks.append(f"sliding-window attention over {window} tokens (gpt.py attends over all of block_size)")
    if lacks:
        raise ValueError(f"this {kind} checkpoint has what gpt.py cannot represent: {'; '.join(lacks)}")
    fields = dict(vocab_size=hf["vocab_size"], block_size=context, n_layer=n_layer, d_model=C, n_head=H,
                  n_kv_head=hf.get("num_key_value_heads") or H, mlp_hidden=hf["intermediate_size"],
                  qk_norm=False,
                  rope_theta=float(rope.get("rope_theta") or 10000.0),
                  tie_weights=hf.get("tie_word_embeddings", False), norm_eps=hf["rms_norm_eps"],
                  qkv_bias=kind == "qwen2")
    return Config(**{**fields, **overrides})


def rope_pairs(w, n_heads):
    """Reorder the rows of each head of a q or k projection (weight or bias) from Hugging Face's half-split
    RoPE layout to gpt.py's pairs: Hugging Face rotates dimension j with j + D/2 (rotate_half), gpt.py
    rotates 2j with 2j + 1, both by the angle n * theta^(-2j/D). So row j goes to 2j and row j + D/2 to
    2j + 1; q.k is a sum over the dimensions, the same in any order shared by q and k."""
    return w.unflatten(0, (n_heads, 2, -1)).transpose(1, 2).flatten(0, 2)


def llama_state_dict(tensors, config):
    """gpt.py's state_dict from the tensors of a Llama-style checkpoint (Hugging Face's names), and the
    tensors left over."""
    H, Hkv = config.n_head, config.n_kv_head
    sd = {"wte.weight": take(tensors, "model.embed_tokens.weight")}
    for i in range(config.n_layer):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        q, k, v = (take(tensors, f"{hf}self_attn.{x}_proj.weight") for x in "qkv")
        sd[ours + "attn.c_attn.weight"] = torch.cat([rope_pairs(q, H), rope_pairs(k, Hkv), v])  # fused
        if config.qkv_bias:
            q, k, v = (take(tensors, f"{hf}self_attn.{x}_proj.bias") for x in "qkv")
            sd[ours + "attn.c_attn.bias"] = torch.cat([rope_pairs(q, H), rope_pairs(k, Hkv), v])
        sd[ours + "attn.c_proj.weight"] = take(tensors, hf + "self_attn.o_proj.weight")
        sd[ours + "mlp.w_gate.weight"] = take(tensors, hf + "mlp.gate_proj.weight")
        sd[ours + "mlp.w_up.weight"] = take(tensors, hf + "mlp.up_proj.weight")
        sd[ours + "mlp.c_proj.weight"] = take(tensors, hf + "mlp.down_proj.weight")
        sd[ours + "norm1.weight"] = take(tensors, hf + "input_layernorm.weight")
        sd[ours + "norm2.weight"] = take(tensors, hf + "post_attention_layernorm.weight")
        tensors.pop(hf + "self_attn.rotary_emb.inv_freq", None)  # a buffer old files kept: from rope_theta
    sd["norm_f.weight"] = take(tensors, "model.norm.weight")
    sd["lm_head.weight"] = head_weight(tensors, sd["wte.weight"], config.tie_weights)
    return sd, tensors


# ---------------------------------------------------------------------------------------------------
# Self-check: `python gpt.py` holds each fast path to attention_ref, output and gradients, on ragged
# shapes (77 tokens: no multiple of any tile) with GQA. `TRITON_INTERPRET=1 python gpt.py` adds the Triton
# path on a CPU.

if __name__ == "__main__":
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(2, H, 77, 32, device=device) for H in (4, 2, 2))  # 4 query heads, 2 kv heads
    dy = torch.randn(2, 4, 77, 32, device=device)

    def run(kernel, *inputs):
        inputs = [x.detach().clone().requires_grad_() for x in inputs]
        y = attention(*inputs, kernel=kernel)
        y.backward(dy.to(y.dtype))
        return [y] + [x.grad for x in inputs]

    want = run("torch", q.double(), k.double(), v.double())
    has_triton = triton is not None and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    for kernel in ["sdpa"] + ["triton"] * has_triton:
        error = max((a.double() - b).abs().max().item() for a, b in zip(run(kernel, q, k, v), want))
        print(f"attention(kernel={kernel!r}) vs attention_ref, output and gradients: max |difference| "
              f"{error:.1e}")
