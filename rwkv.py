"""
rwkv.py: RWKV-7 "Goose" (x070) in one file.

An RNN that trains in parallel like a transformer (Peng et al. 2025, "RWKV-7 Goose with Expressive Dynamic
State Evolution", arXiv 2503.14456; reference code: github.com/BlinkDL/RWKV-LM, RWKV-v7/train_temp).
Each head keeps an N x N matrix S, a fast-weight memory that maps keys to values, and updates it per token:

    S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T        the WKV-7 state update
    y_t = S_t r_t

S is indexed S[value, key] throughout this file (the official layout; fla stores the transpose). w_t in
(0.545, 1) decays each key channel. With a = -kk and b = kk * alpha (kk a unit "removal key", alpha the
in-context learning rate) the rank-one term subtracts (S kk)(kk * alpha)^T, what S recalls for kk, before
v k^T is written: the delta rule, with a learning rate per channel. Around that core, a block is

    x = x + TimeMix(LayerNorm(x)),   x = x + ChannelMix(LayerNorm(x))         (ln0 on the embeddings)

TimeMix (x_{t-1} is the previous token's input; the "token shift"):
    x^c   = x_t + (x_{t-1} - x_t) * mu_c              for c in r, w, k, v, a, g (six learned mixes)
    r, k, v = W_r x^r, W_k x^k, W_v x^v
    w     = exp(-e^-0.5 * sigmoid(w0 + tanh(x^w w1) w2))     decay, kept in (0.545, 1)
    alpha = sigmoid(a0 + x^a a1 a2)                          in-context learning rate
    v     = v + (v_first - v) * sigmoid(v0 + x^v v1 v2)      value residual: towards layer 0's v
    g     = sigmoid(x^g g1) g2                               output gate
    kk    = normalize(k * k_k) per head;  k = k * (1 + (alpha - 1) * k_a)
    y     = wkv7(r, w, k, v, -kk, kk * alpha)
    out   = W_o((GroupNorm(y) + sum(r * k * r_k) v) * g)    per-head norm, then the "bonus" r.k v
ChannelMix:  out = W_v relu(W_k x^k)^2,  x^k mixed by its own token shift.
(w1 w2, a1 a2, v1 v2, g1 g2 are low-rank "LoRA" pairs, under their official names.)

Notation: B batch, T sequence length, C = d_model, H heads, N = head_size (each head's state is N x N: the
official name), V = vocab_size; L the chunk length of wkv7_chunked (at most chunk_size) and n_chunks the
number of chunks; r, w, k, v, a, b the paper's vectors (receptance, decay, key, value, and the two vectors
of the rank-one term), S the state. In the kernels a program holds a whole head, so N is its only tile.

The core is `wkv7(r, w, k, v, a, b, state, kernel=..., chunk_size=64)`:
    "torch"   `wkv7_chunked`, the chunked form. Inside a chunk of up to chunk_size tokens the recurrence
              becomes a few matmuls and one unit-triangular solve (forward substitution: the WY form of the
              delta rule); only the state is carried from chunk to chunk, by a short loop. All in fp32.
              `wkv7_ref`, the recurrence token by token, is the definition and the tests' reference.
    "triton"  `wkv7_triton`, a fused recurrent kernel, like the official CUDA one: one program per
              (batch, head) holds S in registers and walks the tokens, saving S every SAVE_EVERY = 16
              tokens. The backward walks back, undoing one step at a time,
              S_{t-1} = (S_t - v k^T - (S_{t-1} a) b^T) / w (the official "backstepping"; dividing by
              w >= 0.545 is safe), and restarts from the saved S every 16 tokens so rounding never grows by
              more than 1/0.545^15. Why this and not the chunked form: at head size 64 the official recurrent
              kernel is faster than fla's chunked one on an H100 (17 vs 64 ms in the wind_rwkv benchmarks),
              and its backward is the chain rule of one step, 30 lines, where a chunked backward takes
              hundreds. Its cost: only B*H programs run at once. Ragged lengths need no masks: the kernels
              walk the tokens one at a time.

Layout: Config; the core in PyTorch (wkv7, wkv7_ref, wkv7_chunked); the core in Triton (kernels,
WKV7Triton, wkv7_triton); the layers (TimeMix, ChannelMix, Block); the Model (forward, prefill/step with a
recurrent state whose size does not grow with the context, generate, from_pretrained); released checkpoints
(the official RWKV-7 .pth, read into this file's names); a self-check, `python rwkv.py`.
Not here: the official trainer's L2Wrap (an extra gradient on the largest logit); the loss is plain
cross-entropy as in every nanozoo model.
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
    block_size: int = 64  # the training context; the model itself has no limit (it is an RNN)
    n_layer: int = 4
    d_model: int = 128
    kernel: str = "torch"  # WKV-7 core: "torch" (chunked) or "triton"
    # N, the official size: each head's state is N x N (smaller heads are no faster on a CPU)
    head_size: int = 64
    chunk_size: int = 64  # L, tokens per chunk of the torch core, 1..64 (see __post_init__)
    ffn_mult: int = 4  # ChannelMix width = ffn_mult * d_model
    # The LoRA ranks of the decay, the in-context learning rate, the value residual and the gate (the official
    # D_DECAY_LORA, D_AAA_LORA, D_MV_LORA, D_GATE_LORA); 0: the official rule from d_model (lora_rank). The
    # released models fix their own (the 1.5B's decay rank is 96 where the rule gives 128).
    decay_lora: int = 0
    aaa_lora: int = 0
    mv_lora: int = 0
    gate_lora: int = 0

    def __post_init__(self):
        if self.kernel not in ("torch", "triton"):
            raise ValueError(f"kernel must be 'torch' or 'triton', not {self.kernel!r}")
        check_fields(self, sizes=("vocab_size", "block_size", "n_layer", "d_model", "head_size", "ffn_mult"))
        for name in ("decay_lora", "aaa_lora", "mv_lora", "gate_lora"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (the official rule from d_model) or more, got "
                                 f"{getattr(self, name)}")
        if self.d_model % self.head_size or self.head_size & (self.head_size - 1):
            raise ValueError(f"head_size must be a power of two dividing d_model, got "
                             f"head_size={self.head_size}, d_model={self.d_model}")
        if not 1 <= self.chunk_size <= 64:
            raise ValueError(f"chunk_size must be 1..64, not {self.chunk_size}: the torch core rescales the "
                             f"keys by up to 1/w^chunk_size (w >= 0.545), 7e16 at 64, inside fp32's range "
                             f"(3e38) with room to spare")


# ---------------------------------------------------------------------------------------------------
# The core in PyTorch: WKV-7, token by token and a chunk at a time


def wkv7(r, w, k, v, a, b, state=None, kernel="torch", chunk_size=64):
    """WKV-7 over a sequence, from `state` (None: zeros). r, w, k, a, b: (B, T, H, N), indexed by key
    channel; v: (B, T, H, N), indexed by value channel; state: (B, H, N, N) as S[value, key]. w must lie in
    [0.545, 1], as TimeMix makes it. Computes in fp32; returns y (B, T, H, N) in v's dtype, indexed by value
    channel, and the final state (B, H, N, N), fp32. chunk_size: the torch form's chunk length, 1..64."""
    if kernel == "torch":
        args = [x.float() for x in (r, w, k, v, a, b)]
        y, state = wkv7_chunked(*args, None if state is None else state.float(), chunk_size=chunk_size)
        return y.to(v.dtype), state
    if kernel == "triton":
        return wkv7_triton(r, w, k, v, a, b, state)
    raise ValueError(f"kernel must be 'torch' or 'triton', not {kernel!r}")


# Exercise wkv7_step: exercises/README.md#wkv7_step
def wkv7_ref(r, w, k, v, a, b, state):
    """The definition, one token at a time: the reference the tests compare everything with. The state
    update of the official numpy RWKV-7 (BlinkDL/RWKV-LM, RWKV-v7/rwkv_v7_numpy.py), batched."""
    ys = []
    for t in range(r.size(1)):
        sa = state @ a[:, t, :, :, None]  # (B, H, N, 1): S a
        state = (state * w[:, t, :, None, :] + sa @ b[:, t, :, None, :]
                 + v[:, t, :, :, None] @ k[:, t, :, None, :])
        ys.append((state @ r[:, t, :, :, None])[..., 0])  # (B, H, N)
    return torch.stack(ys, dim=1), state


# Exercise wkv7_chunked: exercises/README.md#wkv7_chunked
def wkv7_chunked(r, w, k, v, a, b, state=None, chunk_size=64):
    """The same recurrence, a chunk of L tokens at a time. In a chunk that starts from S_0, let
    P_t = w_1 * ... * w_t (per key channel) and rescale r^ = r P_t, a^ = a P_{t-1}, k^ = k / P_t,
    b^ = b / P_t. Then S_t = S^_t diag(P_t) with S^_t = S_0 + sum_{s<=t} (u_s b^_s^T + v_s k^_s^T), where
    u_t = S_{t-1} a_t. Stacking the u_t as rows, U = A^ S_0^T + A_ab U + A_ak V, a unit-lower-triangular
    system, and Y = R^ S_0^T + A_rb U + A_rk V. The rescaled keys reach 1/P_L <= 1/0.545^L, 7e16 at
    L = 64: fine in fp32, not in bf16."""
    B, T, H, N = r.shape

    # 1. Cut the sequence into n_chunks chunks of L tokens, as even as they come.
    n_chunks = -(-T // chunk_size)
    L = -(-T // n_chunks)  # tokens per chunk, <= chunk_size, so that little padding is needed
    pad = n_chunks * L - T
    if pad:  # pad steps with w = 1 and all else 0 leave the state untouched
        r, k, v, a, b = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (r, k, v, a, b))
        w = F.pad(w, (0, 0, 0, 0, 0, pad), value=1.0)
    # (B, n_chunks, H, L, N), contiguous: the matmuls below would otherwise copy their operands each time
    r, w, k, v, a, b = (x.view(B, n_chunks, L, H, N).transpose(2, 3).contiguous() for x in (r, w, k, v, a, b))

    # 2. Rescale by the running decay P_t.
    logw = torch.log(w)
    logP = logw.cumsum(dim=3)  # log P_t
    invP = torch.exp(-logP)
    r_, a_, k_, b_ = r * logP.exp(), a * (logP - logw).exp(), k * invP, b * invP

    # 3. Entry [t, s] pairs token t with token s: a sum of terms scaled by P_t / P_s <= 1 for s <= t (s < t
    # for A_ab and A_ak: u_t reads S_{t-1}). Above the diagonal the scales grow (to 7e16); tril drops them.
    A_ab = torch.tril(a_ @ b_.mT, -1)  # (B, n_chunks, H, L, L)
    A_ak = torch.tril(a_ @ k_.mT, -1)
    A_rb = torch.tril(r_ @ b_.mT)
    A_rk = torch.tril(r_ @ k_.mT)

    # 4. U = Wa S_0^T + Uv: one triangular solve (forward substitution) for both right-hand sides. From an
    # empty state in one chunk (training at T <= chunk_size) S_0 = 0, so Wa, M and the S_0 terms drop: a
    # quarter of the work.
    I_A = torch.eye(L, dtype=r.dtype, device=r.device) - A_ab
    empty = state is None and n_chunks == 1
    if empty:
        Uv = torch.linalg.solve_triangular(I_A, A_ak @ v, upper=False, unitriangular=True)
    else:
        Wa, Uv = torch.linalg.solve_triangular(I_A, torch.cat([a_, A_ak @ v], -1), upper=False,
                                               unitriangular=True).split(N, dim=-1)  # (B, n_chunks, H, L, N)
    y = A_rk @ v + A_rb @ Uv  # (B, n_chunks, H, L, N): what the chunk itself writes

    # 5. The chunk maps its start state affinely, S_L = S_0 M + S_chunk, with S_chunk what it writes from an
    # empty state; only the loop below is sequential.
    PL = logP[..., -1:, :].exp()  # (B, n_chunks, H, 1, N): the whole chunk's decay
    S_chunk = v.mT @ (k_ * PL) + Uv.mT @ (b_ * PL)  # (B, n_chunks, H, N, N)
    if empty:
        return y.transpose(2, 3).reshape(B, L, H, N)[:, :T], S_chunk[:, 0]  # n_chunks = 1
    if state is None:
        state = r.new_zeros(B, H, N, N)
    M = torch.diag_embed(PL[..., 0, :]) + Wa.mT @ (b_ * PL)  # (B, n_chunks, H, N, N)

    # 6. Carry the state from chunk to chunk.
    starts = []
    for M_c, S_c in zip(M.unbind(1), S_chunk.unbind(1)):  # unbind: one backward op, not one zeros(M) a chunk
        starts.append(state)
        state = state @ M_c + S_c
    S0 = torch.stack(starts, dim=1)  # (B, n_chunks, H, N, N): the state entering each chunk

    # 7. Add what each chunk reads from the state it starts from.
    y = y + (r_ + A_rb @ Wa) @ S0.mT
    return y.transpose(2, 3).reshape(B, n_chunks * L, H, N)[:, :T], state


# ---------------------------------------------------------------------------------------------------
# The core in Triton: WKV-7, a fused recurrent kernel, forward and backward


# Copied from gpt.py
def check_triton(*tensors):
    """Raise one clear line if the Triton path cannot run on these tensors."""
    if triton is None:
        raise RuntimeError("kernel='triton' needs the triton package (Linux only): pip install triton, "
                           "or use kernel='torch'")
    if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernel='triton' on CPU tensors needs TRITON_INTERPRET=1 set before this file is "
                           "imported (slow; for reading and debugging)")


# Tokens between the states the forward saves for the backward. Undoing steps amplifies rounding by
# 1/w^(SAVE_EVERY - 1) <= 1/0.545^15 ~ 9e3 at most; the official kernel saves as often (its CHUNK_LEN).
SAVE_EVERY = 16

# Both kernels run one program per (batch, head) on (B, T, H, N) tensors laid out contiguously: token t of
# head h in batch bi starts at ((bi * T + t) * H + h) * N. S[i, j] sits at i * N + j.
if triton is not None:

    # Exercise wkv7_kernel: exercises/README.md#wkv7_kernel
    @triton.jit
    def wkv7_fwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, y_ptr, sa_ptr, ckpt_ptr, sT_ptr,
                        T, H, N: tl.constexpr, SAVE_EVERY: tl.constexpr):
        """S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T and y_t = S_t r_t for every token of one
        (batch, head). S (N x N, [value i, key j]) stays in registers for all T tokens."""
        bh = tl.program_id(0).to(tl.int64)
        bi, h = bh // H, bh % H
        offs_n = tl.arange(0, N)
        ij = offs_n[:, None] * N + offs_n[None, :]

        # 1. Load the start state.
        S = tl.load(s0_ptr + bh * N * N + ij)
        ckpt_ptr += bh * tl.cdiv(T, SAVE_EVERY) * N * N

        # 2. Walk the tokens, saving the state before every SAVE_EVERY-th one for the backward.
        for t in range(T):
            if t % SAVE_EVERY == 0:
                tl.store(ckpt_ptr + (t // SAVE_EVERY) * N * N + ij, S)
            off = ((bi * T + t) * H + h) * N + offs_n
            r, w, k = tl.load(r_ptr + off), tl.load(w_ptr + off), tl.load(k_ptr + off)
            v, a, b = tl.load(v_ptr + off), tl.load(a_ptr + off), tl.load(b_ptr + off)
            sa = tl.sum(S * a[None, :], axis=1)  # (N,) over values: S a, kept for the backward pass
            S = S * w[None, :] + sa[:, None] * b[None, :] + v[:, None] * k[None, :]
            tl.store(y_ptr + off, tl.sum(S * r[None, :], axis=1))
            tl.store(sa_ptr + off, sa)

        # 3. Store the final state.
        tl.store(sT_ptr + bh * N * N + ij, S)

    @triton.jit
    def wkv7_bwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, sa_ptr, ckpt_ptr, sT_ptr, dy_ptr, dsT_ptr,
                        dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, ds0_ptr,
                        T, H, N: tl.constexpr, SAVE_EVERY: tl.constexpr):
        """The gradients of one (batch, head): walk the tokens backwards holding S_t and dS = dLoss/dS_t,
        one step of the chain rule per token. Each S_{t-1} is the step undone (the official backstepping),
        or at every SAVE_EVERY-th token the state the forward saved, exact."""
        bh = tl.program_id(0).to(tl.int64)
        bi, h = bh // H, bh % H
        offs_n = tl.arange(0, N)
        ij = offs_n[:, None] * N + offs_n[None, :]

        # 1. Load the final state and its own gradient (zeros if unused).
        S = tl.load(sT_ptr + bh * N * N + ij)
        dS = tl.load(dsT_ptr + bh * N * N + ij)
        ckpt_ptr += bh * tl.cdiv(T, SAVE_EVERY) * N * N
        for tt in range(T):
            t = T - 1 - tt
            off = ((bi * T + t) * H + h) * N + offs_n
            r, w, k = tl.load(r_ptr + off), tl.load(w_ptr + off), tl.load(k_ptr + off)
            v, a, b = tl.load(v_ptr + off), tl.load(a_ptr + off), tl.load(b_ptr + off)
            sa = tl.load(sa_ptr + off)
            dy = tl.load(dy_ptr + off)

            # 2. The output: y = S r.
            tl.store(dr_ptr + off, tl.sum(S * dy[:, None], axis=0))
            dS += dy[:, None] * r[None, :]

            # 3. Step back to S_{t-1}.
            if t % SAVE_EVERY == 0:  # the saved state S_{t-1}, exact
                S = tl.load(ckpt_ptr + (t // SAVE_EVERY) * N * N + ij)
            else:  # undo the step: S_{t-1} = (S_t - v k^T - sa b^T) / w
                S = (S - v[:, None] * k[None, :] - sa[:, None] * b[None, :]) / w[None, :]

            # 4. The step: S_t = S_{t-1} diag(w) + sa b^T + v k^T with sa = S_{t-1} a; S now holds S_{t-1}.
            dsa = tl.sum(dS * b[None, :], axis=1)
            tl.store(dw_ptr + off, tl.sum(dS * S, axis=0))
            tl.store(dk_ptr + off, tl.sum(dS * v[:, None], axis=0))
            tl.store(dv_ptr + off, tl.sum(dS * k[None, :], axis=1))
            tl.store(db_ptr + off, tl.sum(dS * sa[:, None], axis=0))
            tl.store(da_ptr + off, tl.sum(S * dsa[:, None], axis=0))
            dS = dS * w[None, :] + dsa[:, None] * a[None, :]

        # 5. What is left is the start state's gradient.
        tl.store(ds0_ptr + bh * N * N + ij, dS)


class WKV7Triton(torch.autograd.Function):
    """The kernels above joined for autograd; fp32 inputs (wkv7_triton makes them so). Between forward and
    backward it keeps the inputs, S a for every token, the state every SAVE_EVERY tokens and the final one."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0):
        B, T, H, N = r.shape
        r, w, k, v, a, b, s0 = (x.contiguous() for x in (r, w, k, v, a, b, s0))  # the kernels' layout
        y, sa, sT = torch.empty_like(v), torch.empty_like(v), torch.empty_like(s0)
        ckpt = s0.new_empty(B, H, triton.cdiv(T, SAVE_EVERY), N, N)  # the saved states
        wkv7_fwd_kernel[(B * H,)](r, w, k, v, a, b, s0, y, sa, ckpt, sT, T, H, N=N, SAVE_EVERY=SAVE_EVERY)
        ctx.save_for_backward(r, w, k, v, a, b, sa, ckpt, sT)
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, sa, ckpt, sT = ctx.saved_tensors
        B, T, H, N = r.shape
        grads = [torch.empty_like(x) for x in (r, w, k, v, a, b, sT)]
        wkv7_bwd_kernel[(B * H,)](r, w, k, v, a, b, sa, ckpt, sT, dy.contiguous(), dsT.contiguous(), *grads,
                                  T, H, N=N, SAVE_EVERY=SAVE_EVERY)
        return tuple(grads)


def wkv7_triton(r, w, k, v, a, b, state=None):
    """wkv7(..., kernel="triton"): WKV7Triton on fp32 copies of the inputs, from zeros where state is None.
    Returns y in v's dtype and the final state, fp32. The kernels follow the official CUDA kernel
    (BlinkDL/RWKV-LM, RWKV-v7/train_temp/cuda/rwkv7_clampw.cu), which takes w's logit where these take w."""
    B, T, H, N = r.shape
    args = [x.float() for x in (r, w, k, v, a, b)]
    state = torch.zeros(B, H, N, N, device=r.device) if state is None else state.float()
    check_triton(*args, state)
    y, state = WKV7Triton.apply(*args, state)
    return y.to(v.dtype), state


# ---------------------------------------------------------------------------------------------------
# Layers: each keeps its part of the recurrent state, the last token's input (token shift) and, in TimeMix,
# the WKV matrices. Initialisation follows the official code (train_temp, 2025-05 onward).


def orthogonal(rows, cols, gain):
    """A (rows, cols) matrix with orthogonal rows or columns, times gain: nn.init.orthogonal_'s."""
    return nn.init.orthogonal_(torch.empty(rows, cols), gain=gain)


def lora_rank(factor, C):
    """The official rule for the LoRA ranks: factor * sqrt(C), rounded to a multiple of 32, at least 32."""
    return max(32, 32 * round(factor * math.sqrt(C) / 32))


def lora(C, rank):
    """A low-rank pair, (C, rank) zeros and (rank, C) orthogonal with gain 0.1 (more when it is tall)."""
    gain = 0.1 * (math.sqrt(rank / C) if rank > C else 1.0)
    return nn.Parameter(torch.zeros(C, rank)), nn.Parameter(orthogonal(rank, C, gain))


def token_shift(x, x_prev):
    """x_{t-1} - x_t for x (B, T, C), where x_prev (B, C) is the token before this call's first one."""
    return torch.cat([x_prev[:, None], x[:, :-1]], dim=1) - x


class TimeMix(nn.Module):
    """After the official RWKV_Tmix_x070 (BlinkDL/RWKV-LM, RWKV-v7/train_temp/src/model.py)."""

    def __init__(self, config, layer_id):
        super().__init__()
        C, N = config.d_model, config.head_size
        n_layer = config.n_layer
        self.layer_id = layer_id
        self.n_head = C // N
        self.head_size = N
        self.kernel = config.kernel
        self.chunk_size = config.chunk_size

        # 1. The official ramps, across the layers (0 -> 1 and 1 -> ~0) and across the channels.
        r01, r10 = layer_id / max(n_layer - 1, 1), 1 - layer_id / n_layer
        c = torch.arange(C, dtype=torch.float32)
        ddd = c / C
        linear = c / (C - 1) - 0.5
        zigzag = ((c % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()  # -1 ... 1 within every head

        # 2. mu_r, mu_w, mu_k, mu_v, mu_a, mu_g (official x_r ... x_g), (6, C): early layers and channels lean
        # more on x_{t-1}.
        self.mu = nn.Parameter(1 - ddd ** (torch.tensor([0.2, 0.9, 0.7, 0.7, 0.9, 0.2])[:, None] * r10))

        # 3. The decay, the in-context learning rate, the value residual and the gate: a bias and a LoRA pair.
        self.w0 = nn.Parameter(-6 + 6 * (c / (C - 1)) ** (1 + r01 ** 0.3) + 0.5 + 2.5 * zigzag)
        self.w1, self.w2 = lora(C, config.decay_lora or lora_rank(2.5, C))
        self.a0 = nn.Parameter(-0.19 + 0.3 * zigzag + 0.4 * linear)
        self.a1, self.a2 = lora(C, config.aaa_lora or lora_rank(2.5, C))
        if layer_id > 0:  # layer 0's v is v_first itself
            self.v0 = nn.Parameter(0.73 - 0.4 * linear)
            self.v1, self.v2 = lora(C, config.mv_lora or lora_rank(1.7, C))
        self.g1, self.g2 = lora(C, config.gate_lora or lora_rank(5.0, C))

        # 4. The keys' scales and the bonus.
        self.k_k = nn.Parameter(0.71 - 0.1 * linear)  # xi: scales k into the removal key
        self.k_a = nn.Parameter(torch.full((C,), 1.02))  # how much alpha also scales the written key
        self.r_k = nn.Parameter(torch.full((C // N, N), -0.04))  # the bonus weights, per head

        # 5. The projections and the per-head norm.
        self.receptance, self.key, self.value, self.output = (nn.Linear(C, C, bias=False) for _ in range(4))
        self.ln_x = nn.GroupNorm(C // N, C, eps=64e-5)  # eps = N * 1e-5, as official
        with torch.no_grad():
            self.receptance.weight.copy_(orthogonal(C, C, 1.0))
            self.key.weight.copy_(orthogonal(C, C, 0.1))
            self.value.weight.copy_(orthogonal(C, C, 1.0))
            self.output.weight.zero_()  # every block starts as the identity
            self.ln_x.weight.fill_(((1 + layer_id) / n_layer) ** 0.7)

    def forward(self, x, x_prev, S, v_first):
        """x (B, T, C) after ln1; x_prev (B, C), S (B, H, N, N): this layer's state. v_first: layer 0's v."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size

        # 1. The token shift: six mixes of x_t and x_{t-1}.
        xx = token_shift(x, x_prev)
        xr, xw, xk, xv, xa, xg = (x + xx * mu for mu in self.mu)  # each (B, T, C)

        # 2. Receptance, key and value, and the decay: in fp32 even under autocast (bf16 has no 0.999).
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        w_logit = (self.w0 + torch.tanh(xw @ self.w1) @ self.w2).float()
        w = torch.exp(-math.exp(-0.5) * torch.sigmoid(w_logit))  # the decay, in (0.545, 1)

        # 3. The value residual, the in-context learning rate and the gate.
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        alpha = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        # 4. The removal key, and the written key scaled by alpha.
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1)  # unit removal key per head
        k = k * (1 + (alpha - 1) * self.k_a)

        # 5. WKV-7, with a = -kk and b = kk * alpha.
        r, w, k, v, alpha = (z.view(B, T, H, N) for z in (r, w, k, v, alpha))
        y, S = wkv7(r, w, k, v, -kk, kk * alpha, S, kernel=self.kernel, chunk_size=self.chunk_size)

        # 6. The per-head norm, the bonus, the gate and the output projection.
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, H, N)
        y = y + (r * k * self.r_k).sum(dim=-1, keepdim=True) * v  # bonus: the current token's own r.k v
        return self.output(y.reshape(B, T, C) * g), x[:, -1], S, v_first


class ChannelMix(nn.Module):
    def __init__(self, config, layer_id):
        super().__init__()
        C = config.d_model
        self.mu_k = nn.Parameter(1 - (torch.arange(C) / C) ** ((1 - layer_id / config.n_layer) ** 4))
        self.key = nn.Linear(C, config.ffn_mult * C, bias=False)
        self.value = nn.Linear(config.ffn_mult * C, C, bias=False)
        with torch.no_grad():
            self.key.weight.copy_(orthogonal(config.ffn_mult * C, C, 1.0))
            self.value.weight.zero_()

    def forward(self, x, x_prev):
        k = x + token_shift(x, x_prev) * self.mu_k
        return self.value(torch.relu(self.key(k)) ** 2), x[:, -1]


class Block(nn.Module):
    def __init__(self, config, layer_id):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.att, self.ffn = TimeMix(config, layer_id), ChannelMix(config, layer_id)

    def forward(self, x, state, v_first):
        att_x, S, ffn_x = state  # the layer's state: (B, C), (B, H, N, N) fp32, (B, C)
        h, att_x, S, v_first = self.att(self.ln1(x), att_x, S, v_first)
        x = x + h
        h, ffn_x = self.ffn(self.ln2(x), ffn_x)
        return x + h, (att_x, S, ffn_x), v_first


# ---------------------------------------------------------------------------------------------------
# The model


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        C, V = config.d_model, config.vocab_size
        self.emb = nn.Embedding(V, C)
        self.ln0 = nn.LayerNorm(C)  # normalises the embeddings, so they can start tiny
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(C)
        self.head = nn.Linear(C, V, bias=False)
        with torch.no_grad():
            nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
            self.head.weight.copy_(orthogonal(V, C, 0.5 * math.sqrt(V / C) if V > C else 0.5))

    def forward(self, idx, targets=None):
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} is longer than block_size={self.config.block_size}; "
                             f"use a shorter sequence, or prefill() to run longer ones in pieces")
        logits, _ = self.prefill(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def prefill(self, idx, state=None):
        """Run the tokens idx (B, T) in parallel after `state` (None: a new sequence). Returns the logits
        (B, T, vocab_size) and the state after the last token: per layer (att_x, S, ffn_x), the inputs of
        the two token shifts (B, C) and the WKV matrices (B, H, N, N) as S[value, key] in fp32. Its size
        does not depend on the length of the sequence."""
        B, T = idx.shape
        C = self.config.d_model
        if state is None:
            z = torch.zeros(B, C, device=idx.device, dtype=self.emb.weight.dtype)
            state = [(z, None, z) for _ in self.blocks]  # S = None: empty, a case wkv7 takes a shortcut on
        x = self.ln0(self.emb(idx))  # (B, T, C)
        v_first = None
        new_state = []
        for block, s in zip(self.blocks, state):
            x, s, v_first = block(x, s, v_first)
            new_state.append(s)
        return self.head(self.ln_out(x)), new_state

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

    def param_groups(self, weight_decay):
        """The official groups: weight decay on the weight matrices of the linear layers and the embedding
        only (not on the LoRA pairs or r_k), w0 at twice the learning rate, everything else plain."""
        decay, plain, w0 = [], [], []
        for name, p in self.named_parameters():
            if name.endswith("att.w0"):
                w0.append(p)
            elif p.dim() >= 2 and name.endswith(".weight"):
                decay.append(p)
            else:
                plain.append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": plain, "weight_decay": 0.0},
                {"params": w0, "weight_decay": 0.0, "lr_scale": 2.0}]

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward): 6 per matmul parameter (the embedding is a lookup,
        not a matmul), plus the WKV-7 recurrence, ~5 multiply-adds per state element per token forward and
        twice that backward, i.e. 30 * N per channel per layer. No term grows with T: it is an RNN."""
        low_rank = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
        n_matmul = sum(p.numel() for name, p in self.named_parameters() if name.split(".")[-1] in low_rank
                       or (name.endswith(".weight") and p.dim() == 2 and name != "emb.weight"))
        return 6 * n_matmul + 30 * self.config.n_layer * self.config.d_model * self.config.head_size

    @classmethod
    def from_pretrained(cls, path_or_id, **overrides):
        """A released RWKV-7 from its official .pth file: a local path, or one on the Hugging Face hub named
        owner/name/file, e.g. "BlinkDL/rwkv-7-world/RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth" (fetched
        once into the hub's cache); in fp32, in eval mode. overrides set the Config fields a checkpoint does
        not fix (kernel, block_size, chunk_size). What rwkv.py cannot represent is a ValueError naming it. The
        section "Released checkpoints" below does the reading."""
        path = download(path_or_id)
        if not (os.path.isfile(path) and path.endswith(".pth")):
            raise ValueError(f"{path_or_id!r} is no .pth file: rwkv.py loads an official RWKV-7 .pth (a "
                             f"local path, or owner/name/file.pth on the hub)")
        tensors = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(rwkv7_config(tensors, **overrides))
        load_weights(model, *rwkv7_state_dict(tensors, model.config))
        return model.eval()


# ---------------------------------------------------------------------------------------------------
# Released checkpoints: the official RWKV-7 (x070) .pth files (BlinkDL/rwkv-7-world, RWKV-7 G1, ...), read
# into this file's names. huggingface_hub is imported here, only when one is fetched from the hub. The readers
# are gpt.py's.


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
def take(tensors, name):
    """Remove the checkpoint's tensor `name` from tensors and return it; what is never taken is left over."""
    if name not in tensors:
        raise ValueError(f"the checkpoint has no tensor {name!r}")
    return tensors.pop(name)


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


def rwkv7_config(tensors, **overrides):
    """This file's Config from the tensors of an official x070 .pth (it has no config: the shapes are it).
    Anything rwkv.py cannot represent is a ValueError naming it. overrides: the fields it leaves (kernel,
    block_size, chunk_size)."""
    if "blocks.0.att.k_a" not in tensors or "blocks.0.att.r_k" not in tensors:
        raise ValueError("not an RWKV-7 (x070) checkpoint: it has no blocks.0.att.k_a and r_k (RWKV-4, 5 and "
                         "6 have other tensors; rwkv.py is RWKV-7)")

    def size(name, dim):  # a size from a tensor's shape
        if name not in tensors:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        return tensors[name].size(dim)

    C = size("emb.weight", 1)
    ffn = size("blocks.0.ffn.key.weight", 0)  # (ffn_mult * C, C)
    if ffn % C:
        raise ValueError(f"a ChannelMix width {ffn} that is no multiple of d_model {C} (rwkv.py's is "
                         f"ffn_mult * d_model)")
    n_layer = 1 + max(int(name.split(".")[1]) for name in tensors if name.startswith("blocks."))
    last = f"blocks.{n_layer - 1}.att."  # the LoRA ranks from the last layer (layer 0 has no value residual)
    fields = dict(vocab_size=size("emb.weight", 0), d_model=C, n_layer=n_layer,
                  block_size=4096,  # the context the RWKV-7 World models trained at; an RNN has no limit
                  head_size=size("blocks.0.att.r_k", 1), ffn_mult=ffn // C,  # r_k: (H, N)
                  decay_lora=size(last + "w1", 1), aaa_lora=size(last + "a1", 1),  # w1, a1, v1, g1: (C, rank)
                  mv_lora=size(last + "v1", 1) if n_layer > 1 else 0, gate_lora=size(last + "g1", 1))
    return Config(**{**fields, **overrides})


def rwkv7_state_dict(tensors, config):
    """This file's state_dict from the tensors of an official x070 .pth, and the tensors left over. The
    official file keeps each mix and bias as (1, 1, C), the six token-shift mixes x_r ... x_g apart (here one
    (6, C) mu), ChannelMix's as x_k (here mu_k), and ln0 in block 0 (here the model's)."""
    tensors = dict(tensors)
    sd = {"emb.weight": take(tensors, "emb.weight"),
          "ln0.weight": take(tensors, "blocks.0.ln0.weight"), "ln0.bias": take(tensors, "blocks.0.ln0.bias")}
    same = ["ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "ffn.key.weight", "ffn.value.weight"]
    same += [f"att.{name}.weight" for name in ("receptance", "key", "value", "output", "ln_x")]
    same += ["att.ln_x.bias", "att.w1", "att.w2", "att.a1", "att.a2", "att.g1", "att.g2", "att.r_k"]
    for i in range(config.n_layer):
        b = f"blocks.{i}."
        for name in same:
            sd[b + name] = take(tensors, b + name)
        for name in ("att.w0", "att.a0", "att.k_k", "att.k_a"):
            sd[b + name] = take(tensors, b + name).flatten()  # (1, 1, C) -> (C,)
        sd[b + "att.mu"] = torch.cat([take(tensors, f"{b}att.x_{c}").view(1, -1) for c in "rwkvag"])  # (6, C)
        sd[b + "ffn.mu_k"] = take(tensors, b + "ffn.x_k").flatten()
        if i == 0:  # layer 0's v is v_first itself: its v0, v1, v2 (files have them) go unused, as officially
            for name in ("att.v0", "att.v1", "att.v2"):
                tensors.pop(b + name, None)
        else:
            sd[b + "att.v0"] = take(tensors, b + "att.v0").flatten()
            sd[b + "att.v1"] = take(tensors, b + "att.v1")
            sd[b + "att.v2"] = take(tensors, b + "att.v2")
    for name in ("ln_out.weight", "ln_out.bias", "head.weight"):
        sd[name] = take(tensors, name)
    return sd, tensors


# ---------------------------------------------------------------------------------------------------
# Self-check: `python rwkv.py` holds each fast path to wkv7_ref (in fp64), output, final state and
# gradients, from a random state over 77 tokens (two uneven chunks; no multiple of SAVE_EVERY).
# `TRITON_INTERPRET=1 python rwkv.py` adds the Triton path on a CPU.

if __name__ == "__main__":
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    r, k, v, kk, alpha = (torch.randn(2, 77, 2, 16, device=device) for _ in range(5))  # B, T, H, N
    dy = torch.randn_like(r)
    w = torch.exp(-math.exp(-0.5) * torch.sigmoid(4 * torch.randn_like(r)))  # in (0.545, 1), as TimeMix's
    kk = F.normalize(kk, dim=-1)
    state, dstate = (torch.randn(2, 2, 16, 16, device=device) for _ in range(2))
    inputs = [r, w, k, v, -kk, kk * torch.sigmoid(alpha), state]

    def run(core, *inputs):
        inputs = [x.detach().clone().requires_grad_() for x in inputs]
        y, s = core(*inputs)
        ((y * dy.to(y.dtype)).sum() + (s * dstate.to(s.dtype)).sum()).backward()
        return [y, s] + [x.grad for x in inputs]

    want = run(wkv7_ref, *(x.double() for x in inputs))
    has_triton = triton is not None and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    for kernel in ["torch"] + ["triton"] * has_triton:
        got = run(lambda *x: wkv7(*x, kernel=kernel), *inputs)
        error = max((x.double() - ref).abs().max().item() for x, ref in zip(got, want))
        print(f"wkv7(kernel={kernel!r}) vs wkv7_ref, output, state and gradients: max |difference| "
              f"{error:.1e}")
