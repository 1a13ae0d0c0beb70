"""
retnet.py: RetNet in one file.

Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language Models"
(arXiv 2307.08621). RetNet swaps softmax attention for *retention*: causal linear attention whose weights
decay by a fixed factor gamma per step back in time. Per head, with rows q_n, k_n (size dk) and v_n
(size dv = 2 dk):

    parallel    O = (Q K^T * D) V,                D_nm = gamma^(n-m) if n >= m else 0
    recurrent   S_n = gamma S_{n-1} + k_n^T v_n,  o_n = q_n S_n     (S is dk x dv: all the memory there is)
    chunkwise   cut T into chunks of length L; j = 0..L-1 is the position inside chunk i, R_i the state
                after it:
                O_[i] = (Q_[i] K_[i]^T * D) V_[i]  +  (Q_[i] R_{i-1}) * xi_j       inner + cross-chunk
                R_i   = K_[i]^T (V_[i] * zeta_j)  +  gamma^L R_{i-1}
                with xi_j = gamma^(j+1) and zeta_j = gamma^(L-1-j)

The three compute one function, and the tests check that they agree in fp64. Training uses the chunkwise form
(big matmuls, T/L sequential steps); decoding uses the recurrent one (constant memory and time per token).
Before retention, q and k are rotated by their position (RoPE: the paper's Theta_n = e^(i n theta), i.e.
xPos with the decay gamma in place of xPos's length scale), so q_n . k_m depends only on n - m; and q is
scaled by dk^-1/2. Multi-scale retention (MSR) gives each head h = 0..H-1 its own gamma_h = 1 - 2^(-5-h),
so some heads remember ~32 tokens and others hundreds:

    Y       = GroupNorm_h(concat_h Retention(X, gamma_h))      normalised per head
    MSR(X)  = (swish(X W_G) * Y) W_O                            a swish gate, then back to d_model
    block   X = X + MSR(RMSNorm(X));  X = X + FFN(RMSNorm(X)),  FFN(X) = gelu(X W_1) W_2 of width 2C

with W_Q, W_K: C x C, and W_V, W_G: C x 2C (a value head is twice a key head).

Notation: B batch, T sequence length, C = d_model, H heads, dk = C / H the key head dim, dv = 2 dk the
value head dim; L the chunk length (chunk_size; the paper's B, but B is the batch here; a sequence's
last chunk may be shorter); D the decay mask, gamma the decay, xi and zeta the in-chunk decays, S the
recurrent state and R the chunkwise one (all the paper's); n, m positions, j a position inside a chunk.
In the Triton code, where dq, dk, dv are gradients, the head dims are DK and DV, and BLOCK_T, BLOCK_DK
and BLOCK_DV the tiles of a chunk, the key dim and the value dim. The copies from gpt.py (RMSNorm, RoPE)
keep gpt's D for the head dim.

The core is `retention(q, k, v, gamma, state=None, kernel=...)`:
    "torch"   `retention_chunkwise`, the chunkwise form in PyTorch (the default)
    "triton"  `retention_triton`, the chunkwise form in Triton, forward and backward (below)
and a single token (decoding) takes `retention_ref`, the recurrent form, under either. `retention_ref` is
also the definition the tests hold the others to; `retention_parallel` is the paper's training form.

Choices, where the paper and its code (torchscale) part ways:
- Per-head norm: GroupNorm, as in the paper (PyTorch's nn.GroupNorm, one group per head, eps = 1e-5, with a
  learned gain and bias: affine=True). torchscale later moved to an RMSNorm without gain. Both divide out
  a per-head scale, up to their eps, which is what lets the heads with gamma near 1 (sums over hundreds of
  tokens) share W_O with the fast-forgetting ones.
- FFN: the paper's GELU FFN of width 2C. With the doubled value and gate widths, an MSR layer holds 8 C^2
  weights and the FFN 4 C^2: the 12 C^2 of a transformer layer, which is how the paper compares them at
  equal size. (torchscale moved to a SwiGLU; gpt.py already shows one.) Block norms are RMSNorm, as in the
  other nanozoo files and in torchscale today (the paper used LayerNorm).
- No score normalisation. The paper (its paragraph "Retention Score Normalization") and torchscale, for
  fp16's range, divide each row of D by the square root of its sum, and the scores Q K^T * D by
  max(|row sum|, 1). Each multiplies a head's output at a position by one positive number c, and the
  per-head GroupNorm divides such a number out only up to its eps: GroupNorm(c y) is GroupNorm(y) computed
  with eps / c^2 in place of eps = 1e-5, which is added to the variance of y (the learned gain and bias
  act after the division and change nothing here). So the two agree where c^2 var(y) is large against
  1e-5; leaving the normalisation out keeps the three forms exactly equal.

kernel="triton" runs the chunkwise form, after fla's chunk_retention (fla-org/flash-linear-attention,
fla/ops/retention/chunk.py, which now calls fla/ops/simple_gla/chunk.py): one kernel walks the chunks of
each (batch, head) in order and stores the state entering each chunk; a second computes every chunk's
output in parallel from its inputs and that state. The backward recomputes those states rather than
keeping them, runs the state's gradient backwards over the chunks, then computes dq, dk, dv of all chunks
in parallel. All matmuls are on (L x dk) and (L x L) tiles, which is what tensor cores want; only T/L
steps are sequential.

Layout: Config; the core in PyTorch (retention, retention_ref, retention_chunkwise, retention_parallel);
the core in Triton (kernels, RetentionTriton, retention_triton); the layers (RMSNorm, RoPE,
MultiScaleRetention, FFN, Block); the Model (forward, prefill/step with the recurrent state, generate);
a self-check, `python retnet.py`.
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
    block_size: int = 64  # the training context; retention itself has no length limit
    n_layer: int = 4
    d_model: int = 128
    kernel: str = "torch"  # retention core: "torch" (chunkwise form in PyTorch) or "triton"
    n_head: int = 4  # key head dim dk = d_model / n_head; value head dim dv = 2 dk
    chunk_size: int = 64  # chunk length L of the chunkwise form (16, 32 or 64 for triton)
    ffn_hidden: int = 256  # the paper's 2 * d_model
    rope_theta: float = 10000.0
    tie_weights: bool = True  # lm_head shares the token embedding matrix
    norm_eps: float = 1e-6  # the block norms' eps (a field because Model.__init__ is gpt.py's)

    def __post_init__(self):
        if self.kernel not in ("torch", "triton"):
            raise ValueError(f"kernel must be 'torch' or 'triton', not {self.kernel!r}")
        check_fields(self, sizes=("vocab_size", "block_size", "n_layer", "d_model",
                                 "n_head", "chunk_size", "ffn_hidden"), floats=("rope_theta", "norm_eps"))
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"n_head must split d_model into heads of even size (RoPE), got "
                             f"d_model={self.d_model}, n_head={self.n_head}")
        L = self.chunk_size
        if L < 1 or (self.kernel == "triton" and L not in (16, 32, 64)):
            raise ValueError(f"chunk_size={L} must be >= 1, and 16, 32 or 64 for kernel='triton'")


# ---------------------------------------------------------------------------------------------------
# The core in PyTorch: retention in its three forms


def retention(q, k, v, gamma, state=None, kernel="torch", chunk_size=64):
    """Retention of every head, continuing from `state` (None: zeros). q, k: (B, H, T, dk); v: (B, H, T, dv);
    gamma: (H,); state: (B, H, dk, dv). No 1/sqrt(dk) here: the caller scales q. Returns o (B, H, T, dv) and
    the state after T (B, H, dk, dv), in the inputs' dtype (under autocast the matmuls run in the autocast
    dtype); kernel="triton" keeps the state in fp32. A single token (decoding) takes the recurrent form
    under either kernel: two small matmuls, where a chunk would only add overhead."""
    if q.size(2) == 1 and kernel in ("torch", "triton"):
        return retention_ref(q, k, v, gamma, state)
    if kernel == "torch":
        return retention_chunkwise(q, k, v, gamma, state, chunk_size)
    if kernel == "triton":
        return retention_triton(q, k, v, gamma, state, chunk_size)
    raise ValueError(f"kernel must be 'torch' or 'triton', not {kernel!r}")


# Exercise retention_recurrent: exercises/README.md#retention_recurrent
def retention_ref(q, k, v, gamma, state=None):
    """S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n, one position at a time: the recurrent form, the
    definition, the tests' reference, and decoding's path. Returns (o, S_T)."""
    B, H, T, dk = q.shape
    S = q.new_zeros(B, H, dk, v.size(-1)) if state is None else state  # (B, H, dk, dv)
    g = gamma.view(H, 1, 1)
    out = []
    for n in range(T):
        S = g * S + k[:, :, n, :, None] @ v[:, :, n, None, :]  # k_n^T v_n: an outer product, (B, H, dk, dv)
        out.append(q[:, :, n, None, :] @ S)  # (B, H, 1, dv)
    return torch.cat(out, dim=2), S


# Exercise retention_chunkwise: exercises/README.md#retention_chunkwise
def retention_chunkwise(q, k, v, gamma, state=None, chunk_size=64):
    """Inside a chunk the parallel form, across chunks the recurrent one, carried by the state R. Returns
    (o, R_T). The last chunk may be shorter than chunk_size (any T works)."""
    H, T = q.size(1), q.size(2)
    R = state  # (B, H, dk, dv); None until something is retained, which spares a fresh sequence's first chunk
    g = gamma.view(H, 1, 1)
    D = decay_mask(gamma, min(T, chunk_size))  # (H, L, L) for a full chunk, cut for a short last one
    out = []
    for i in range(0, T, chunk_size):
        # 1. The chunk: L positions, j = 0..L-1 inside it.
        qc, kc, vc = (x[:, :, i:i + chunk_size] for x in (q, k, v))  # (B, H, L, dk) for q and k, dv for v
        L = qc.size(2)
        j = torch.arange(L, device=q.device, dtype=gamma.dtype)[:, None]  # (L, 1)

        # 2. Its output: the parallel form inside it, plus what earlier chunks left in R, decayed to j (xi).
        inner = (qc @ kc.transpose(-2, -1) * D[:, :L, :L]) @ vc  # (B, H, L, dv)
        cross = 0 if R is None else (qc @ R) * g ** (j + 1)
        out.append(inner + cross)

        # 3. The state after it: this chunk's part, decayed to its end (zeta), plus R decayed across it.
        kv = kc.transpose(-2, -1) @ (vc * g ** (L - 1 - j))
        R = kv if R is None else g ** L * R + kv  # (B, H, dk, dv)
    return torch.cat(out, dim=2), R


def retention_parallel(q, k, v, gamma):
    """(Q K^T * D) V: the paper's training form, O(T^2) like attention. From a fresh state only."""
    return (q @ k.transpose(-2, -1) * decay_mask(gamma, q.size(2))) @ v  # (B, H, T, dv)


def decay_mask(gamma, T):
    """D (H, T, T): D[h, n, m] = gamma_h^(n-m) for n >= m, else 0."""
    n = torch.arange(T, device=gamma.device)
    exponent = (n[:, None] - n[None, :]).to(gamma.dtype)  # (T, T)
    return torch.where(exponent >= 0, gamma[:, None, None] ** exponent.clamp(min=0), 0.0)


# ---------------------------------------------------------------------------------------------------
# The core in Triton: the chunkwise form, forward and backward


# Copied from gpt.py
def check_triton(*tensors):
    """Raise one clear line if the Triton path cannot run on these tensors."""
    if triton is None:
        raise RuntimeError("kernel='triton' needs the triton package (Linux only): pip install triton, "
                           "or use kernel='torch'")
    if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernel='triton' on CPU tensors needs TRITON_INTERPRET=1 set before this file is "
                           "imported (slow; for reading and debugging)")


# Every kernel runs on (B, H, T, DK) and (B, H, T, DV) tensors laid out contiguously (row t of head bh of
# q starts at (bh * T + t) * DK), with one program per (batch, head) and tile of the value dim (the state's
# columns are independent of each other), or per chunk of one (batch, head). h holds the state entering
# each chunk, (B, H, n_chunks, DK, DV) in fp32, and dh the gradient of the state leaving it; h0 and ht are
# the states before and after the sequence. Every tile is at least 16 wide for tl.dot; rows past T and
# columns past DK or DV are masked to zero, which makes them contribute nothing. Decays are computed as
# exp2(n * log2(gamma)).
if triton is not None:

    @triton.jit
    def load_tile(ptr, rows, cols, n_rows, n_cols):
        """The (rows, cols) tile of a row-major (n_rows, n_cols) matrix, in fp32, zero outside the matrix."""
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def store_tile(ptr, x, rows, cols, n_rows, n_cols):
        """Store x as the (rows, cols) tile of a row-major (n_rows, n_cols) matrix, where it is inside it."""
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        tl.store(ptr + rows[:, None] * n_cols + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def retention_fwd_states_kernel(k_ptr, v_ptr, h0_ptr, h_ptr, ht_ptr, log2_gamma_ptr, T, H, n_chunks,
                                    DK: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr,
                                    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
        """Walk the chunks in order: store the state entering chunk i in h[i], then
        R <- gamma^L R + K_[i]^T (V_[i] * gamma^(L-1-j)), L the chunk's length.
        Grid (DV / BLOCK_DV, B * H)."""
        start_dv = tl.program_id(0)
        off_bh = tl.program_id(1).to(tl.int64)
        lg = tl.load(log2_gamma_ptr + off_bh % H)  # this head's log2(gamma)
        j = tl.arange(0, BLOCK_T)
        offs_dk = tl.arange(0, BLOCK_DK)
        offs_dv = start_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)

        # 1. Load the state the sequence starts from: this program's columns of it.
        R = load_tile(h0_ptr + off_bh * DK * DV, offs_dk, offs_dv, DK, DV)  # (BLOCK_DK, BLOCK_DV)

        # 2. Walk the chunks: keep the state entering each, then fold the chunk into it.
        for i in range(n_chunks):
            store_tile(h_ptr + (off_bh * n_chunks + i) * DK * DV, R, offs_dk, offs_dv, DK, DV)
            L = tl.minimum(T - i * BLOCK_T, BLOCK_T)
            kc = load_tile(k_ptr + off_bh * T * DK, i * BLOCK_T + j, offs_dk, T, DK)  # (BLOCK_T, BLOCK_DK)
            vc = load_tile(v_ptr + off_bh * T * DV, i * BLOCK_T + j, offs_dv, T, DV)  # (BLOCK_T, BLOCK_DV)
            zeta = tl.where(j < L, tl.exp2(lg * (L - 1 - j)), 0.0)
            R = R * tl.exp2(lg * L) + tl.dot(tl.trans(kc), vc * zeta[:, None])

        # 3. Store the state after the last chunk.
        store_tile(ht_ptr + off_bh * DK * DV, R, offs_dk, offs_dv, DK, DV)

    @triton.jit
    def decay_tile(log2_gamma, j):
        """(BLOCK_T, BLOCK_T) in-chunk decay mask D[n, m] = gamma^(n-m) for n >= m, else 0."""
        return tl.where(j[:, None] >= j[None, :], tl.exp2(log2_gamma * (j[:, None] - j[None, :])), 0.0)

    # Exercise retention_kernel: exercises/README.md#retention_kernel
    @triton.jit
    def retention_fwd_output_kernel(q_ptr, k_ptr, v_ptr, h_ptr, o_ptr, log2_gamma_ptr, T, H, n_chunks,
                                    DK: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr,
                                    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
        """O_[i] = (Q_[i] K_[i]^T * D) V_[i] + (Q_[i] R) * gamma^(j+1), R the state entering the chunk.
        Grid (DV / BLOCK_DV, n_chunks, B * H): every chunk at once."""
        start_dv = tl.program_id(0)
        i = tl.program_id(1)
        off_bh = tl.program_id(2).to(tl.int64)
        lg = tl.load(log2_gamma_ptr + off_bh % H)
        j = tl.arange(0, BLOCK_T)
        offs_dk = tl.arange(0, BLOCK_DK)
        offs_dv = start_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)

        # 1. Load the chunk and the state entering it.
        qc = load_tile(q_ptr + off_bh * T * DK, i * BLOCK_T + j, offs_dk, T, DK)  # (BLOCK_T, BLOCK_DK)
        kc = load_tile(k_ptr + off_bh * T * DK, i * BLOCK_T + j, offs_dk, T, DK)  # (BLOCK_T, BLOCK_DK)
        vc = load_tile(v_ptr + off_bh * T * DV, i * BLOCK_T + j, offs_dv, T, DV)  # (BLOCK_T, BLOCK_DV)
        h_base = (off_bh * n_chunks + i) * DK * DV  # chunk i's state in h
        R = load_tile(h_ptr + h_base, offs_dk, offs_dv, DK, DV)  # (BLOCK_DK, BLOCK_DV)

        # 2. The output: the parallel form inside the chunk, plus the state decayed to each position (xi).
        inner = tl.dot(tl.dot(qc, tl.trans(kc)) * decay_tile(lg, j), vc)
        cross = tl.dot(qc, R) * tl.exp2(lg * (j + 1))[:, None]
        store_tile(o_ptr + off_bh * T * DV, inner + cross, i * BLOCK_T + j, offs_dv, T, DV)

    @triton.jit
    def retention_bwd_states_kernel(q_ptr, do_ptr, dht_ptr, dh_ptr, dh0_ptr, log2_gamma_ptr, T, H, n_chunks,
                                    DK: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr,
                                    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
        """Walk the chunks backwards: store dR, the gradient of the state leaving chunk i, in dh[i]; the state
        entering it gets gamma^L dR + (Q_[i] * gamma^(j+1))^T dO_[i]. Grid (DV / BLOCK_DV, B * H)."""
        start_dv = tl.program_id(0)
        off_bh = tl.program_id(1).to(tl.int64)
        lg = tl.load(log2_gamma_ptr + off_bh % H)
        j = tl.arange(0, BLOCK_T)
        offs_dk = tl.arange(0, BLOCK_DK)
        offs_dv = start_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)

        # 1. Load the gradient of the final state.
        dR = load_tile(dht_ptr + off_bh * DK * DV, offs_dk, offs_dv, DK, DV)  # (BLOCK_DK, BLOCK_DV)

        # 2. Walk the chunks from the last: keep dR leaving each, then carry it to the state entering it.
        for r in range(n_chunks):
            i = n_chunks - 1 - r
            store_tile(dh_ptr + (off_bh * n_chunks + i) * DK * DV, dR, offs_dk, offs_dv, DK, DV)
            L = tl.minimum(T - i * BLOCK_T, BLOCK_T)
            qc = load_tile(q_ptr + off_bh * T * DK, i * BLOCK_T + j, offs_dk, T, DK)  # (BLOCK_T, BLOCK_DK)
            doc = load_tile(do_ptr + off_bh * T * DV, i * BLOCK_T + j, offs_dv, T, DV)  # (BLOCK_T, BLOCK_DV)
            dR = dR * tl.exp2(lg * L) + tl.dot(tl.trans(qc * tl.exp2(lg * (j + 1))[:, None]), doc)

        # 3. Store the gradient of the state the sequence started from.
        store_tile(dh0_ptr + off_bh * DK * DV, dR, offs_dk, offs_dv, DK, DV)

    @triton.jit
    def retention_bwd_qkv_kernel(q_ptr, k_ptr, v_ptr, h_ptr, do_ptr, dh_ptr, dq_ptr, dk_ptr, dv_ptr,
                                 log2_gamma_ptr, T, H, n_chunks, DK: tl.constexpr, DV: tl.constexpr,
                                 BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
        """dq, dk, dv of one chunk, from its inputs, the state R entering it and the gradient dR of the state
        leaving it. With A = Q K^T * D and dA = dO V^T * D:
            dQ = dA K + (dO R^T) * xi,  dK = dA^T Q + (V dR^T) * zeta,  dV = A^T dO + (K dR) * zeta
        Grid (n_chunks, B * H); the value dim is summed over in a loop of BLOCK_DV-wide tiles."""
        i = tl.program_id(0)
        off_bh = tl.program_id(1).to(tl.int64)
        lg = tl.load(log2_gamma_ptr + off_bh % H)
        j = tl.arange(0, BLOCK_T)
        offs_dk = tl.arange(0, BLOCK_DK)
        L = tl.minimum(T - i * BLOCK_T, BLOCK_T)
        h_base = (off_bh * n_chunks + i) * DK * DV  # chunk i's state in h, its gradient in dh

        # 1. The chunk's decays, and A = Q K^T * D, which every value tile needs.
        xi = tl.exp2(lg * (j + 1))
        zeta = tl.where(j < L, tl.exp2(lg * (L - 1 - j)), 0.0)
        D = decay_tile(lg, j)
        qc = load_tile(q_ptr + off_bh * T * DK, i * BLOCK_T + j, offs_dk, T, DK)  # (BLOCK_T, BLOCK_DK)
        kc = load_tile(k_ptr + off_bh * T * DK, i * BLOCK_T + j, offs_dk, T, DK)  # (BLOCK_T, BLOCK_DK)
        A = tl.dot(qc, tl.trans(kc)) * D  # (BLOCK_T, BLOCK_T)
        dqc = tl.zeros((BLOCK_T, BLOCK_DK), dtype=tl.float32)
        dkc = tl.zeros((BLOCK_T, BLOCK_DK), dtype=tl.float32)

        # 2. Walk the value tiles: sum dq and dk over them, and store each tile of dv.
        for start_dv in range(tl.cdiv(DV, BLOCK_DV)):
            offs_dv = start_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
            vc = load_tile(v_ptr + off_bh * T * DV, i * BLOCK_T + j, offs_dv, T, DV)  # (BLOCK_T, BLOCK_DV)
            doc = load_tile(do_ptr + off_bh * T * DV, i * BLOCK_T + j, offs_dv, T, DV)  # (BLOCK_T, BLOCK_DV)
            R = load_tile(h_ptr + h_base, offs_dk, offs_dv, DK, DV)  # (BLOCK_DK, BLOCK_DV)
            dR = load_tile(dh_ptr + h_base, offs_dk, offs_dv, DK, DV)  # (BLOCK_DK, BLOCK_DV)
            dA = tl.dot(doc, tl.trans(vc)) * D  # (BLOCK_T, BLOCK_T)
            dqc += tl.dot(dA, kc) + tl.dot(doc, tl.trans(R)) * xi[:, None]
            dkc += tl.dot(tl.trans(dA), qc) + tl.dot(vc, tl.trans(dR)) * zeta[:, None]
            dvc = tl.dot(tl.trans(A), doc) + tl.dot(kc, dR) * zeta[:, None]
            store_tile(dv_ptr + off_bh * T * DV, dvc, i * BLOCK_T + j, offs_dv, T, DV)

        # 3. Store dq and dk.
        store_tile(dq_ptr + off_bh * T * DK, dqc, i * BLOCK_T + j, offs_dk, T, DK)
        store_tile(dk_ptr + off_bh * T * DK, dkc, i * BLOCK_T + j, offs_dk, T, DK)


def block_sizes(q, v, BLOCK_T):
    """(n_chunks, BLOCK_DK, BLOCK_DV): the number of chunks of BLOCK_T positions, the key tile (the whole
    key dim) and the value tile, for every kernel above; tiles are powers of two >= 16 (tl.dot's smallest)."""
    DK, DV = q.size(-1), v.size(-1)
    BLOCK_DK = max(16, triton.next_power_of_2(DK))
    BLOCK_DV = min(64, max(16, triton.next_power_of_2(DV)))
    return triton.cdiv(q.size(2), BLOCK_T), BLOCK_DK, BLOCK_DV


def chunk_states(k, v, log2_gamma, state, BLOCK_T):
    """Run retention_fwd_states_kernel: the states entering each chunk (B, H, n_chunks, DK, DV) and the final
    state, in fp32."""
    B, H, T, DK = k.shape
    DV = v.size(-1)
    n_chunks, BLOCK_DK, BLOCK_DV = block_sizes(k, v, BLOCK_T)
    h = k.new_empty(B, H, n_chunks, DK, DV, dtype=torch.float32)
    ht = torch.empty_like(state)
    retention_fwd_states_kernel[(triton.cdiv(DV, BLOCK_DV), B * H)](
        k, v, state, h, ht, log2_gamma, T, H, n_chunks, DK, DV, BLOCK_T, BLOCK_DK, BLOCK_DV)
    return h, ht


class RetentionTriton(torch.autograd.Function):
    """The kernels above joined for autograd, after fla's chunk_retention (fla-org/flash-linear-attention,
    fla/ops/retention/chunk.py). Between forward and backward it keeps q, k, v, log2(gamma) and the initial
    state: not the chunk states h, which the backward recomputes."""

    @staticmethod
    def forward(ctx, q, k, v, log2_gamma, state, BLOCK_T):
        B, H, T, DK = q.shape
        DV = v.size(-1)
        n_chunks, BLOCK_DK, BLOCK_DV = block_sizes(q, v, BLOCK_T)
        h, ht = chunk_states(k, v, log2_gamma, state, BLOCK_T)
        o = torch.empty_like(v)
        retention_fwd_output_kernel[(triton.cdiv(DV, BLOCK_DV), n_chunks, B * H)](
            q, k, v, h, o, log2_gamma, T, H, n_chunks, DK, DV, BLOCK_T, BLOCK_DK, BLOCK_DV)
        ctx.save_for_backward(q, k, v, log2_gamma, state)  # not h: the backward recomputes it
        ctx.BLOCK_T = BLOCK_T
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, log2_gamma, state = ctx.saved_tensors
        B, H, T, DK = q.shape
        DV = v.size(-1)
        BLOCK_T = ctx.BLOCK_T
        n_chunks, BLOCK_DK, BLOCK_DV = block_sizes(q, v, BLOCK_T)

        # 1. Recompute the states entering each chunk.
        h, _ = chunk_states(k, v, log2_gamma, state, BLOCK_T)

        # 2. The gradient of the state leaving each chunk, walking backwards, and of the initial state.
        do, dht = do.contiguous(), dht.float().contiguous()
        dh, dstate = torch.empty_like(h), torch.empty_like(state)
        retention_bwd_states_kernel[(triton.cdiv(DV, BLOCK_DV), B * H)](
            q, do, dht, dh, dstate, log2_gamma, T, H, n_chunks, DK, DV, BLOCK_T, BLOCK_DK, BLOCK_DV)

        # 3. dq, dk, dv of every chunk at once.
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        retention_bwd_qkv_kernel[(n_chunks, B * H)](
            q, k, v, h, do, dh, dq, dk, dv, log2_gamma, T, H, n_chunks, DK, DV, BLOCK_T, BLOCK_DK, BLOCK_DV)
        return dq, dk, dv, None, dstate, None


def retention_triton(q, k, v, gamma, state=None, chunk_size=64):
    """retention(q, k, v, gamma, state, "triton"): RetentionTriton, the chunkwise form forward and backward,
    with chunks of chunk_size = BLOCK_T positions. The state is kept in fp32."""
    check_triton(q, k, v)
    if chunk_size not in (16, 32, 64) or q.size(-1) > 128:  # tiles of (L x L) and (L x dk) in fp32
        raise ValueError(f"kernel='triton' needs chunk_size 16, 32 or 64 (got {chunk_size}) and a key head "
                         f"dim <= 128 (got {q.size(-1)}), so that a chunk's tiles fit in a GPU's shared "
                         f"memory")
    B, H, _, DK = q.shape
    state = q.new_zeros(B, H, DK, v.size(-1), dtype=torch.float32) if state is None else state.float()
    log2_gamma = torch.log2(gamma.float())
    return RetentionTriton.apply(q.contiguous(), k.contiguous(), v.contiguous(), log2_gamma,
                                 state.contiguous(), chunk_size)


# ---------------------------------------------------------------------------------------------------
# Layers


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


class MultiScaleRetention(nn.Module):
    """The paper's gated multi-scale retention, after torchscale's (microsoft/torchscale,
    torchscale/component/multiscale_retention.py) without its score normalisation and with the paper's
    GroupNorm: retention per head, each head with its own gamma, a per-head norm, a swish gate and W_O."""

    def __init__(self, config):
        super().__init__()
        C = config.d_model
        H = config.n_head
        self.n_head = H
        self.head_dim = C // H  # dk; the value head dim dv is twice it
        self.kernel = config.kernel
        self.chunk_size = config.chunk_size
        self.c_qkvg = nn.Linear(C, 6 * C, bias=False)  # W_Q, W_K (C x C) and W_V, W_G (C x 2C), fused
        self.c_proj = nn.Linear(2 * C, C, bias=False)  # W_O
        self.group_norm = nn.GroupNorm(H, 2 * C)  # one group per head: each head's dv channels
        gamma = 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float32))  # gamma_h = 1 - 2^(-5-h), (H,)
        self.register_buffer("gamma", gamma, persistent=False)

    def forward(self, x, rope, state=None):
        B, T, C = x.shape
        H, dk = self.n_head, self.head_dim
        dv = 2 * dk
        q, k, v, gate = self.c_qkvg(x).split([C, C, 2 * C, 2 * C], dim=-1)
        q = q.view(B, T, H, dk).transpose(1, 2)  # (B, H, T, dk)
        k = k.view(B, T, H, dk).transpose(1, 2)  # (B, H, T, dk)
        v = v.view(B, T, H, dv).transpose(1, 2)  # (B, H, T, dv)
        q, k = apply_rope(q, rope) * dk ** -0.5, apply_rope(k, rope)
        y, state = retention(q, k, v, self.gamma, state, self.kernel, self.chunk_size)  # (B, H, T, dv)
        y = self.group_norm(y.transpose(1, 2).reshape(B * T, 2 * C)).view(B, T, 2 * C)
        return self.c_proj(F.silu(gate) * y), state


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
        self.norm1, self.msr = RMSNorm(config.d_model, config.norm_eps), MultiScaleRetention(config)
        self.norm2, self.ffn = RMSNorm(config.d_model, config.norm_eps), FFN(config)

    def forward(self, x, rope, state=None):
        y, state = self.msr(self.norm1(x), rope, state)
        x = x + y
        x = x + self.ffn(self.norm2(x))
        return x, state


# ---------------------------------------------------------------------------------------------------
# The model


class Model(nn.Module):
    # Copied from gpt.py
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
        T = idx.size(1)
        start = 0 if state is None else state["pos"]
        head_dim = self.config.d_model // self.config.n_head
        positions = torch.arange(start, start + T, device=idx.device)
        rope = rope_angles(positions, head_dim, self.config.rope_theta)

        x = self.wte(idx)  # (B, T, d_model)
        states = [None] * len(self.blocks) if state is None else state["S"]
        new_states = []
        for block, S in zip(self.blocks, states):
            x, S = block(x, rope, S)  # S (B, H, dk, dv)
            new_states.append(S)

        logits = self.lm_head(self.norm_f(x))  # (B, T, vocab_size)
        return logits, {"pos": start + T, "S": new_states}

    # Copied from gpt.py
    def step(self, token, state=None):
        """Feed one token (B,) after `state`; returns logits (B, vocab_size) and the new state."""
        logits, state = self.prefill(token[:, None], state)
        return logits[:, 0], state

    # Copied from mamba.py
    def read_prompt(self, idx):
        """The next token's logits (B, vocab_size) and the state after the prompt idx (B, T), of any length:
        prefilled block_size tokens at a time, the state carried from piece to piece, so that memory stays
        that of one block_size prefill."""
        state = None
        for piece in idx.split(self.config.block_size, dim=1):
            logits, state = self.prefill(piece, state)
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

    # Copied from gpt.py
    def param_groups(self, weight_decay):
        """AdamW groups: weight decay on the matrices (every parameter of two or more dimensions), none on
        the vectors (norm gains, biases)."""
        params = list(self.parameters())
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward) at context T: 6 per matmul parameter (PaLM appendix
        B), plus retention's own matmuls, per head and token forward: in-chunk scores and sum 2L(dk + dv) with
        L = min(T, chunk_size), the state read and write 4 dk dv; the backward is twice the forward."""
        n_matmul = sum(p.numel() for p in self.parameters() if p.dim() >= 2)  # a tied matrix counts once
        if not self.config.tie_weights:
            n_matmul -= self.wte.weight.numel()  # an embedding lookup is not a matmul
        H = self.config.n_head
        L = min(T, self.config.chunk_size)
        dk = self.config.d_model // H
        dv = 2 * dk
        return 6 * n_matmul + 3 * self.config.n_layer * H * (2 * L * (dk + dv) + 4 * dk * dv)


# ---------------------------------------------------------------------------------------------------
# Self-check: `python retnet.py` holds each fast path to retention_ref, output, final state and gradients,
# on ragged shapes (37 tokens: no multiple of the 16-token chunk) from a random state.
# `TRITON_INTERPRET=1 python retnet.py` adds the Triton path on a CPU.

if __name__ == "__main__":
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = (torch.randn(2, 3, 37, 16, device=device) * 16 ** -0.5 for _ in range(2))  # 3 heads, dk = 16
    v, state = torch.randn(2, 3, 37, 32, device=device), torch.randn(2, 3, 16, 32, device=device)
    gamma = 1 - 2.0 ** (-5 - torch.arange(3.0, device=device))  # the paper's decays
    do, dstate = torch.randn_like(v), torch.randn_like(state)

    def run(kernel, *inputs):  # kernel None: retention_ref
        inputs = [x.detach().clone().requires_grad_() for x in inputs]
        q, k, v, S0 = inputs
        g = gamma.to(q.dtype)
        o, S = retention_ref(q, k, v, g, S0) if kernel is None else retention(q, k, v, g, S0, kernel, 16)
        ((o * do.to(o.dtype)).sum() + (S * dstate.to(S.dtype)).sum()).backward()
        return [o, S] + [x.grad for x in inputs]

    want = run(None, q.double(), k.double(), v.double(), state.double())
    has_triton = triton is not None and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    for kernel in ["torch"] + ["triton"] * has_triton:
        error = max((a.double() - b).abs().max().item() for a, b in zip(run(kernel, q, k, v, state), want))
        print(f"retention(kernel={kernel!r}) vs retention_ref, output, state and gradients: max |difference| "
              f"{error:.1e}")
