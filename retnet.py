"""
retnet.py: RetNet in one file.

Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language Models" (arXiv 2307.08621).
RetNet swaps softmax attention for *retention*: causal linear attention whose weights decay by a fixed
factor gamma per step back in time. Per head, with rows q_n, k_n (size d) and v_n (size 2d):

    parallel    O = (Q K^T * D) V,           D_nm = gamma^(n-m) if n >= m else 0
    recurrent   S_n = gamma S_{n-1} + k_n^T v_n,   o_n = q_n S_n       (S is d x 2d: all the memory there is)
    chunkwise   cut T into chunks of length C; j = 0..C-1 is the position inside chunk i, R_i the state after it:
                O_[i] = (Q_[i] K_[i]^T * D) V_[i]  +  (Q_[i] R_{i-1}) * gamma^(j+1)      inner + cross-chunk
                R_i   = K_[i]^T (V_[i] * gamma^(C-1-j))  +  gamma^C R_{i-1}

The three are one function, and the tests check that they agree in fp64. Training uses the chunkwise form (big
matmuls, T/C sequential steps); decoding uses the recurrent one (constant memory and time per token).
Before retention, q and k are rotated by their position (RoPE: the paper's Theta_n = e^(i n theta), i.e. xPos
with the decay gamma in place of xPos's length scale), so q_n . k_m depends only on n - m; and q is scaled by
d^-1/2. Multi-scale retention (MSR) gives each of the h heads its own gamma_h = 1 - 2^(-5-h), so some heads
remember ~32 tokens and others hundreds:

    Y       = GroupNorm_h(concat_h Retention(X, gamma_h))      normalised per head
    MSR(X)  = (swish(X W_G) * Y) W_O                            a swish gate, then back to d_model
    block   X = X + MSR(RMSNorm(X));  X = X + FFN(RMSNorm(X)),  FFN(X) = gelu(X W_1) W_2 of width 2 d_model

with W_Q, W_K: d_model x d_model, and W_V, W_G: d_model x 2 d_model (a value head is twice a key head).

Choices, where the paper and its code (torchscale) part ways:
- Per-head norm: GroupNorm, as in the paper. torchscale later moved to an RMSNorm without gain; both divide out
  any per-head scale, which is what lets the heads with gamma near 1 (sums over hundreds of tokens) share W_O
  with the fast-forgetting ones.
- FFN: the paper's GELU FFN of width 2 d_model. With the doubled value and gate widths, an MSR layer holds 8 d^2
  weights and the FFN 4 d^2: the 12 d^2 of a transformer layer, which is how the paper compares them at equal
  size. (torchscale moved to a SwiGLU; gpt.py already shows one.) Block norms are RMSNorm, as in the other
  nanozoo files and in torchscale today (the paper used LayerNorm).
- No score normalisation: torchscale divides D by its row sums and the scores by their sums, for fp16's range.
  The per-head GroupNorm would undo any such per-row scale anyway; leaving it out keeps the forms exactly equal.

kernel="triton" runs the chunkwise form (the algorithm of fla's chunk_retention): one kernel walks the chunks
of each (batch, head) in order and stores the state entering each chunk; a second computes every chunk's
output in parallel from its inputs and that state. The backward recomputes those states rather than keeping
them, runs the state's gradient backwards over the chunks, then computes dq, dk, dv of all chunks in parallel.
All matmuls are (C x d) tiles, which is what tensor cores want; only T/C steps are sequential.

Layout: Config; retention in PyTorch (parallel, recurrent, chunkwise); retention in Triton; layers (RMSNorm,
RoPE, MultiScaleRetention, FFN, Block); Model (forward, prefill/step with the recurrent state, generate).
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
    block_size: int = 64  # the training context; retention itself has no length limit
    n_layer: int = 4
    d_model: int = 128
    kernel: str = "torch"  # retention core: "torch" (chunkwise form in PyTorch) or "triton"
    n_head: int = 4  # key head dim d = d_model / n_head; value head dim 2d
    chunk_size: int = 64  # chunk length C of the chunkwise form (16, 32 or 64 for triton)
    ffn_hidden: int = 256  # the paper's 2 * d_model
    rope_theta: float = 10000.0
    tie_weights: bool = True  # lm_head shares the token embedding matrix

    def __post_init__(self):
        if self.kernel not in ("torch", "triton"):
            raise ValueError(f"kernel must be 'torch' or 'triton', not {self.kernel!r}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model={self.d_model} must split into n_head={self.n_head} heads of even size (RoPE)")
        C = self.chunk_size
        if C < 1 or (self.kernel == "triton" and C not in (16, 32, 64)):
            raise ValueError(f"chunk_size={C} must be >= 1, and 16, 32 or 64 for kernel='triton'")


# ---------------------------------------------------------------------------------------------------
# Retention in PyTorch: the three forms. Shapes: q, k (B, H, T, dk); v (B, H, T, dv); gamma (H,);
# state (B, H, dk, dv). No 1/sqrt(d) here: the caller scales q.


def decay_mask(gamma, T):
    """D (H, T, T): D[h, n, m] = gamma_h^(n-m) for n >= m, else 0."""
    n = torch.arange(T, device=gamma.device)
    exponent = (n[:, None] - n[None, :]).to(gamma.dtype)  # (T, T)
    return torch.where(exponent >= 0, gamma[:, None, None] ** exponent.clamp(min=0), 0.0)


def retention_parallel(q, k, v, gamma):
    """(Q K^T * D) V: the paper's training form, O(T^2) like attention. From a fresh state only."""
    return (q @ k.transpose(-2, -1) * decay_mask(gamma, q.size(2))) @ v  # (B, H, T, dv)


def retention_recurrent(q, k, v, gamma, state=None):
    """S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n, one position at a time. Returns (o, S_T)."""
    B, H, T, dk = q.shape
    S = q.new_zeros(B, H, dk, v.size(-1)) if state is None else state  # (B, H, dk, dv)
    g = gamma.view(H, 1, 1)
    out = []
    for n in range(T):
        S = g * S + k[:, :, n, :, None] @ v[:, :, n, None, :]  # k_n^T v_n: an outer product, (B, H, dk, dv)
        out.append(q[:, :, n, None, :] @ S)  # (B, H, 1, dv)
    return torch.cat(out, dim=2), S


def retention_chunkwise(q, k, v, gamma, state=None, chunk_size=64):
    """Inside a chunk the parallel form, across chunks the recurrent one, carried by the state R. Returns (o, R_T).
    The last chunk may be shorter than chunk_size (any T works)."""
    H, T = q.size(1), q.size(2)
    R = state  # (B, H, dk, dv); None until something is retained, which spares a fresh sequence's first chunk
    g = gamma.view(H, 1, 1)
    D = decay_mask(gamma, min(T, chunk_size))  # (H, C, C), cut to L x L for a short last chunk
    out = []
    for i in range(0, T, chunk_size):
        qc, kc, vc = q[:, :, i:i + chunk_size], k[:, :, i:i + chunk_size], v[:, :, i:i + chunk_size]  # (B, H, L, d)
        L = qc.size(2)
        j = torch.arange(L, device=q.device, dtype=gamma.dtype)[:, None]  # (L, 1)
        inner = (qc @ kc.transpose(-2, -1) * D[:, :L, :L]) @ vc  # (B, H, L, dv)
        cross = 0 if R is None else (qc @ R) * g ** (j + 1)  # what earlier chunks left in R, decayed to j
        out.append(inner + cross)
        kv = kc.transpose(-2, -1) @ (vc * g ** (L - 1 - j))  # this chunk's contribution, decayed to its end
        R = kv if R is None else g ** L * R + kv  # (B, H, dk, dv)
    return torch.cat(out, dim=2), R


def retention(q, k, v, gamma, state=None, kernel="torch", chunk_size=64):
    """Retention of every head, continuing from `state` (None: zeros). Returns (o (B, H, T, dv), state after T).
    kernel="torch": the chunkwise form above; "triton": the chunkwise kernels below. A single token (decoding)
    takes the recurrent form: two small matmuls, where a chunk would only add overhead."""
    if q.size(2) == 1:
        return retention_recurrent(q, k, v, gamma, state)
    if kernel == "triton":
        return retention_triton(q, k, v, gamma, state, chunk_size)
    return retention_chunkwise(q, k, v, gamma, state, chunk_size)


# ---------------------------------------------------------------------------------------------------
# Retention in Triton: the chunkwise form. One program owns a (batch, head) pair and a tile of the value
# dimension (state columns are independent), or one chunk of one (batch, head). Every tile is at least
# 16 wide for tl.dot; rows past T and columns past d are masked to zero, which makes them contribute nothing.
# Decays are computed as exp2(n * log2(gamma)).


def check_triton(*tensors):
    """Raise one clear line if the Triton path cannot run on these tensors."""
    if triton is None:
        raise RuntimeError("kernel='triton' needs the triton package (Linux only): pip install triton, or use kernel='torch'")
    if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernel='triton' on CPU tensors needs TRITON_INTERPRET=1 set before this file is imported (slow; for reading and debugging)")


if triton is not None:

    @triton.jit
    def _load(ptr, rows, cols, n_rows, n_cols):
        """The (rows, cols) tile of a row-major (n_rows, n_cols) matrix, in fp32, zero outside the matrix."""
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _store(ptr, x, rows, cols, n_rows, n_cols):
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        tl.store(ptr + rows[:, None] * n_cols + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _decay(log2_gamma, j):
        """(BT, BT) in-chunk decay mask D[n, m] = gamma^(n-m) for n >= m."""
        return tl.where(j[:, None] >= j[None, :], tl.exp2(log2_gamma * (j[:, None] - j[None, :])), 0.0)

    @triton.jit
    def _states_fwd(k, v, h0, h, ht, log2_gamma, T, H, NT, K: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """Walk the chunks in order: store the state entering chunk i in h[i], then
        R <- gamma^L R + K_c^T (V_c * gamma^(L-1-j)), L = the chunk's length. Grid (V / BV, B * H)."""
        i_v, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        lg = tl.load(log2_gamma + bh % H)
        j, dk, dv = tl.arange(0, BT), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
        R = _load(h0 + bh * K * V, dk, dv, K, V)  # (BK, BV)
        for i in range(NT):
            _store(h + (bh * NT + i) * K * V, R, dk, dv, K, V)
            L = tl.minimum(T - i * BT, BT)
            kc = _load(k + bh * T * K, i * BT + j, dk, T, K)  # (BT, BK)
            vc = _load(v + bh * T * V, i * BT + j, dv, T, V)  # (BT, BV)
            zeta = tl.where(j < L, tl.exp2(lg * (L - 1 - j)), 0.0)
            R = R * tl.exp2(lg * L) + tl.dot(tl.trans(kc), vc * zeta[:, None])
        _store(ht + bh * K * V, R, dk, dv, K, V)

    @triton.jit
    def _output_fwd(q, k, v, h, o, log2_gamma, T, H, NT, K: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """O_c = (Q_c K_c^T * D) V_c + (Q_c R) * gamma^(j+1), R the state entering the chunk.
        Grid (V / BV, NT, B * H): every chunk at once."""
        i_v, i, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        lg = tl.load(log2_gamma + bh % H)
        j, dk, dv = tl.arange(0, BT), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
        qc = _load(q + bh * T * K, i * BT + j, dk, T, K)  # (BT, BK)
        kc = _load(k + bh * T * K, i * BT + j, dk, T, K)  # (BT, BK)
        vc = _load(v + bh * T * V, i * BT + j, dv, T, V)  # (BT, BV)
        R = _load(h + (bh * NT + i) * K * V, dk, dv, K, V)  # (BK, BV)
        oc = tl.dot(tl.dot(qc, tl.trans(kc)) * _decay(lg, j), vc) + tl.dot(qc, R) * tl.exp2(lg * (j + 1))[:, None]
        _store(o + bh * T * V, oc, i * BT + j, dv, T, V)

    @triton.jit
    def _states_bwd(q, do, dht, dh, dh0, log2_gamma, T, H, NT, K: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """Walk the chunks backwards: store dR, the gradient of the state leaving chunk i, in dh[i]; the state
        entering it gets gamma^L dR + (Q_c * gamma^(j+1))^T dO_c. Grid (V / BV, B * H)."""
        i_v, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        lg = tl.load(log2_gamma + bh % H)
        j, dk, dv = tl.arange(0, BT), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
        dR = _load(dht + bh * K * V, dk, dv, K, V)  # (BK, BV)
        for r in range(NT):
            i = NT - 1 - r
            _store(dh + (bh * NT + i) * K * V, dR, dk, dv, K, V)
            L = tl.minimum(T - i * BT, BT)
            qc = _load(q + bh * T * K, i * BT + j, dk, T, K)  # (BT, BK)
            doc = _load(do + bh * T * V, i * BT + j, dv, T, V)  # (BT, BV)
            dR = dR * tl.exp2(lg * L) + tl.dot(tl.trans(qc * tl.exp2(lg * (j + 1))[:, None]), doc)
        _store(dh0 + bh * K * V, dR, dk, dv, K, V)

    @triton.jit
    def _qkv_bwd(q, k, v, h, do, dh, dq, dk, dv, log2_gamma, T, H, NT, K: tl.constexpr, V: tl.constexpr,
                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """dq, dk, dv of one chunk, from its inputs, the state R entering it and the gradient dR of the state
        leaving it. With A = Q K^T * D and dA = dO V^T * D:
            dQ = dA K + (dO R^T) * gamma^(j+1),  dK = dA^T Q + (V dR^T) * zeta,  dV = A^T dO + (K dR) * zeta
        Grid (NT, B * H); the value dimension is summed over in a loop of BV-wide tiles."""
        i, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        lg = tl.load(log2_gamma + bh % H)
        j, d = tl.arange(0, BT), tl.arange(0, BK)
        L = tl.minimum(T - i * BT, BT)
        xi = tl.exp2(lg * (j + 1))
        zeta = tl.where(j < L, tl.exp2(lg * (L - 1 - j)), 0.0)
        D = _decay(lg, j)
        qc = _load(q + bh * T * K, i * BT + j, d, T, K)  # (BT, BK)
        kc = _load(k + bh * T * K, i * BT + j, d, T, K)  # (BT, BK)
        A = tl.dot(qc, tl.trans(kc)) * D  # (BT, BT)
        dqc = tl.zeros((BT, BK), dtype=tl.float32)
        dkc = tl.zeros((BT, BK), dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            e = i_v * BV + tl.arange(0, BV)
            vc = _load(v + bh * T * V, i * BT + j, e, T, V)  # (BT, BV)
            doc = _load(do + bh * T * V, i * BT + j, e, T, V)  # (BT, BV)
            R = _load(h + (bh * NT + i) * K * V, d, e, K, V)  # (BK, BV)
            dR = _load(dh + (bh * NT + i) * K * V, d, e, K, V)  # (BK, BV)
            dA = tl.dot(doc, tl.trans(vc)) * D  # (BT, BT)
            dqc += tl.dot(dA, kc) + tl.dot(doc, tl.trans(R)) * xi[:, None]
            dkc += tl.dot(tl.trans(dA), qc) + tl.dot(vc, tl.trans(dR)) * zeta[:, None]
            dvc = tl.dot(tl.trans(A), doc) + tl.dot(kc, dR) * zeta[:, None]
            _store(dv + bh * T * V, dvc, i * BT + j, e, T, V)
        _store(dq + bh * T * K, dqc, i * BT + j, d, T, K)
        _store(dk + bh * T * K, dkc, i * BT + j, d, T, K)


def _blocks(q, v, BT):
    """Launch geometry: chunks NT, key tile BK (the whole key dim), value tile BV; all powers of two >= 16."""
    K, V = q.size(-1), v.size(-1)
    return triton.cdiv(q.size(2), BT), max(16, triton.next_power_of_2(K)), min(64, max(16, triton.next_power_of_2(V)))


def _states(k, v, log2_gamma, state, BT):
    """Run _states_fwd: the states entering each chunk (B, H, NT, dk, dv) and the final state, in fp32."""
    B, H, T, K = k.shape
    V = v.size(-1)
    NT, BK, BV = _blocks(k, v, BT)
    h = k.new_empty(B, H, NT, K, V, dtype=torch.float32)
    ht = torch.empty_like(state)
    _states_fwd[(triton.cdiv(V, BV), B * H)](k, v, state, h, ht, log2_gamma, T, H, NT, K, V, BT, BK, BV)
    return h, ht


class _RetentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log2_gamma, state, BT):
        B, H, T, K = q.shape
        V = v.size(-1)
        NT, BK, BV = _blocks(q, v, BT)
        h, ht = _states(k, v, log2_gamma, state, BT)
        o = torch.empty_like(v)
        _output_fwd[(triton.cdiv(V, BV), NT, B * H)](q, k, v, h, o, log2_gamma, T, H, NT, K, V, BT, BK, BV)
        ctx.save_for_backward(q, k, v, log2_gamma, state)  # not h: the backward recomputes it
        ctx.BT = BT
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, log2_gamma, state = ctx.saved_tensors
        B, H, T, K = q.shape
        V, BT = v.size(-1), ctx.BT
        NT, BK, BV = _blocks(q, v, BT)
        h, _ = _states(k, v, log2_gamma, state, BT)
        do, dht = do.contiguous(), dht.float().contiguous()
        dh, dstate = torch.empty_like(h), torch.empty_like(state)
        _states_bwd[(triton.cdiv(V, BV), B * H)](q, do, dht, dh, dstate, log2_gamma, T, H, NT, K, V, BT, BK, BV)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _qkv_bwd[(NT, B * H)](q, k, v, h, do, dh, dq, dk, dv, log2_gamma, T, H, NT, K, V, BT, BK, BV)
        return dq, dk, dv, None, dstate, None


def retention_triton(q, k, v, gamma, state=None, chunk_size=64):
    """The chunkwise form in Triton, forward and backward. The state is kept in fp32."""
    check_triton(q, k, v)
    if chunk_size not in (16, 32, 64) or q.size(-1) > 128:  # tiles of (chunk x chunk) and (chunk x dk) in fp32
        raise ValueError(f"kernel='triton' needs chunk_size 16, 32 or 64 (got {chunk_size}) and a key head dim "
                         f"<= 128 (got {q.size(-1)}), so that a chunk's tiles fit in a GPU's shared memory")
    B, H, _, K = q.shape
    state = q.new_zeros(B, H, K, v.size(-1), dtype=torch.float32) if state is None else state.float()
    log2_gamma = torch.log2(gamma.float())
    return _RetentionTriton.apply(q.contiguous(), k.contiguous(), v.contiguous(), log2_gamma, state.contiguous(),
                                  chunk_size)


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


class MultiScaleRetention(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, H = config.d_model, config.n_head
        self.n_head, self.head_dim = H, d // H  # key head dim; the value head dim is twice it
        self.kernel, self.chunk_size = config.kernel, config.chunk_size
        self.c_qkvg = nn.Linear(d, 6 * d, bias=False)  # W_Q, W_K (d x d) and W_V, W_G (d x 2d), fused
        self.c_proj = nn.Linear(2 * d, d, bias=False)  # W_O
        self.group_norm = nn.GroupNorm(H, 2 * d)  # one group per head: each head's 2*head_dim channels
        self.register_buffer("gamma", 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float32)), persistent=False)

    def forward(self, x, rope, state=None):
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim
        q, k, v, g = self.c_qkvg(x).split([C, C, 2 * C, 2 * C], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, H, 2 * D).transpose(1, 2)  # (B, H, T, 2D)
        q, k = apply_rope(q, rope) * D ** -0.5, apply_rope(k, rope)
        y, state = retention(q, k, v, self.gamma, state, self.kernel, self.chunk_size)  # (B, H, T, 2D)
        y = self.group_norm(y.transpose(1, 2).reshape(B * T, 2 * C)).view(B, T, 2 * C)
        return self.c_proj(F.silu(g) * y), state


class FFN(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.ffn_hidden, bias=False)  # W_1
        self.c_proj = nn.Linear(config.ffn_hidden, config.d_model, bias=False)  # W_2

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1, self.msr = RMSNorm(config.d_model), MultiScaleRetention(config)
        self.norm2, self.ffn = RMSNorm(config.d_model), FFN(config)

    def forward(self, x, rope, state=None):
        y, state = self.msr(self.norm1(x), rope, state)
        x = x + y
        x = x + self.ffn(self.norm2(x))
        return x, state


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
                             f"use a shorter sequence, or prefill() it in pieces (the state carries over)")
        logits, _ = self.prefill(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def prefill(self, idx, state=None):
        """Run the tokens idx (B, T) in parallel (chunkwise) after `state` (None: a new sequence). Returns the
        logits (B, T, vocab_size) and the state after them: one (B, H, dk, dv) matrix per layer, plus the
        position, so that RoPE continues where the last call stopped. Its size does not grow with T."""
        B, T = idx.shape
        start = 0 if state is None else state["pos"]
        rope = rope_angles(torch.arange(start, start + T, device=idx.device),
                           self.config.d_model // self.config.n_head, self.config.rope_theta)
        x = self.wte(idx)  # (B, T, d_model)
        states = [None] * len(self.blocks) if state is None else state["S"]
        new_states = []
        for block, S in zip(self.blocks, states):
            x, S = block(x, rope, S)
            new_states.append(S)
        logits = self.lm_head(self.norm_f(x))  # (B, T, vocab_size)
        return logits, {"pos": start + T, "S": new_states}

    def step(self, token, state=None):
        """Feed one token (B,) after `state` through the recurrent form; returns logits (B, vocab_size), new state."""
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

    def param_groups(self, weight_decay):
        """AdamW groups: weight decay on the matrices (linear layers, embedding), none on norm gains and biases."""
        params = list(self.parameters())
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward) at context T: 6 per matmul parameter (PaLM appendix B),
        plus retention's own matmuls, per head and token forward: in-chunk scores and sum 2C(dk + dv) with
        C = min(T, chunk_size), the state read and write 4 dk dv; the backward is twice the forward."""
        N = sum(p.numel() for p in self.parameters() if p.dim() >= 2)  # a tied matrix counts once: as lm_head
        if not self.config.tie_weights:
            N -= self.wte.weight.numel()  # an embedding lookup is not a matmul
        H, C = self.config.n_head, min(T, self.config.chunk_size)
        dk = self.config.d_model // H
        return 6 * N + 3 * self.config.n_layer * H * (2 * C * 3 * dk + 4 * dk * 2 * dk)
