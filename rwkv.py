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
    w     = exp(-e^-0.5 * sigmoid(w0 + tanh(x^w A_w) B_w))    decay, kept in (0.545, 1)
    alpha = sigmoid(a0 + x^a A_a B_a)                        in-context learning rate
    v     = v + (v_first - v) * sigmoid(v0 + x^v A_v B_v)    value residual: towards layer 0's v
    g     = sigmoid(x^g A_g) B_g                             output gate
    kk    = normalize(k * k_k) per head;  k = k * (1 + (alpha - 1) * k_a)
    y     = wkv7(r, w, k, v, -kk, kk * alpha)
    out   = W_o((GroupNorm(y) + sum(r * k * r_k) v) * g)    per-head norm, then the "bonus" r.k v
ChannelMix:  out = W_v relu(W_k x^k)^2,  x^k mixed by its own token shift.
(A_*, B_* are low-rank "LoRA" pairs.)

The core is `wkv7(r, w, k, v, a, b, state, kernel=...)`:
    "torch"   the chunked form. Inside a chunk of up to 64 tokens the recurrence becomes a few matmuls and
              one unit-triangular solve (forward substitution: the WY form of the delta rule); only the
              state is carried from chunk to chunk, by a short loop. All in fp32. `wkv7_loop`, the
              recurrence token by token, is kept as the definition and the tests' oracle.
    "triton"  a fused recurrent kernel, like the official CUDA one: one program per (batch, head) holds S
              in registers and walks the tokens, saving S every 16 tokens. The backward walks back,
              undoing one step at a time, S_{t-1} = (S_t - v k^T - (S_{t-1} a) b^T) / w (the official
              "backstepping"; dividing by w >= 0.545 is safe), and restarts from the saved S every 16
              tokens so rounding never grows by more than 1/0.545^15. Why this and not the chunked form:
              at head size 64 the official recurrent kernel is faster than fla's chunked one on an H100
              (17 vs 64 ms in the wind_rwkv benchmarks), and its backward is the chain rule of one step,
              30 lines, where a chunked backward takes hundreds. Its cost: only B*H programs run at once.
              Ragged lengths need no masks: the kernels walk the tokens one at a time.

Layout: Config, WKV-7 in PyTorch, WKV-7 in Triton, the layers (TimeMix, ChannelMix, Block), the Model
(forward, prefill/step with a recurrent state whose size does not grow with the context, generate).
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

CHUNK = 64  # torch: tokens per chunk. Its rescaled keys reach 1/w^64 <= 7e16: fine in fp32, not in bf16
CKPT = 16  # triton: tokens between saved states. Undoing steps amplifies rounding by 1/w^15 <= 9e3 at most


@dataclass
class Config:
    vocab_size: int = 65
    block_size: int = 64  # the training context; the model itself has no limit (it is an RNN)
    n_layer: int = 4
    d_model: int = 128
    kernel: str = "torch"  # WKV-7 core: "torch" (chunked) or "triton"
    head_size: int = 64  # N, the official size: each head's state is N x N (smaller heads are no faster on a CPU)
    ffn_mult: int = 4  # ChannelMix width = ffn_mult * d_model

    def __post_init__(self):
        if self.kernel not in ("torch", "triton"):
            raise ValueError(f"kernel must be 'torch' or 'triton', not {self.kernel!r}")
        if self.d_model % self.head_size or self.head_size & (self.head_size - 1):
            raise ValueError(f"head_size must be a power of two dividing d_model, got "
                             f"head_size={self.head_size}, d_model={self.d_model}")


def lora_rank(factor, C):
    """The official rule for the LoRA ranks: factor * sqrt(C), rounded to a multiple of 32, at least 32."""
    return max(32, 32 * round(factor * math.sqrt(C) / 32))


# ---------------------------------------------------------------------------------------------------
# WKV-7 in PyTorch. r, w, k, a, b: (B, T, H, N) indexed by key channel, v and y: (B, T, H, N) indexed by
# value channel, state: (B, H, N, N) as S[value, key], fp32.


def wkv7_loop(r, w, k, v, a, b, state):
    """The definition, one token at a time: the oracle the tests compare everything with."""
    ys = []
    for t in range(r.size(1)):
        sa = state @ a[:, t, :, :, None]  # (B, H, N, 1): S a
        state = state * w[:, t, :, None, :] + sa @ b[:, t, :, None, :] + v[:, t, :, :, None] @ k[:, t, :, None, :]
        ys.append((state @ r[:, t, :, :, None])[..., 0])  # (B, H, N)
    return torch.stack(ys, dim=1), state


def wkv7_chunked(r, w, k, v, a, b, state=None):
    """The same recurrence, a chunk at a time. In a chunk that starts from S_0, let P_t = w_1 * ... * w_t (per
    key channel) and rescale r^ = r P_t, a^ = a P_{t-1}, k^ = k / P_t, b^ = b / P_t. Then S_t = S^_t diag(P_t)
    with S^_t = S_0 + sum_{s<=t} (u_s b^_s^T + v_s k^_s^T), where u_t = S_{t-1} a_t. Stacking the u_t as rows,
    U = A^ S_0^T + A_ab U + A_ak V, a unit-lower-triangular system, and Y = R^ S_0^T + A_rb U + A_rk V."""
    B, T, H, N = r.shape
    n = -(-T // CHUNK)  # chunks
    L = -(-T // n)  # tokens per chunk, <= CHUNK, so that little padding is needed
    pad = n * L - T
    if pad:  # pad steps with w = 1 and all else 0 leave the state untouched
        r, k, v, a, b = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (r, k, v, a, b))
        w = F.pad(w, (0, 0, 0, 0, 0, pad), value=1.0)
    # (B, n, H, L, N), contiguous: the matmuls below would otherwise copy their operands each time
    r, w, k, v, a, b = (x.view(B, n, L, H, N).transpose(2, 3).contiguous() for x in (r, w, k, v, a, b))
    logw = torch.log(w)
    logP = logw.cumsum(dim=3)  # log P_t
    invP = torch.exp(-logP)
    r_, a_, k_, b_ = r * logP.exp(), a * (logP - logw).exp(), k * invP, b * invP
    # Entry [t, s] pairs token t with token s: a sum of terms scaled by P_t / P_s <= 1 for s <= t (s < t for
    # A_ab and A_ak: u_t reads S_{t-1}). Above the diagonal the scales grow (to 7e16); tril drops them.
    A_ab = torch.tril(a_ @ b_.mT, -1)  # (B, n, H, L, L)
    A_ak = torch.tril(a_ @ k_.mT, -1)
    A_rb = torch.tril(r_ @ b_.mT)
    A_rk = torch.tril(r_ @ k_.mT)
    # U = Wa S_0^T + Uv: one triangular solve (forward substitution) for both right-hand sides. From an empty
    # state in one chunk (training at T <= CHUNK) S_0 = 0, so Wa, M and the S_0 terms drop: a quarter of the work.
    I_A = torch.eye(L, dtype=r.dtype, device=r.device) - A_ab
    empty = state is None and n == 1
    if empty:
        Uv = torch.linalg.solve_triangular(I_A, A_ak @ v, upper=False, unitriangular=True)
    else:
        Wa, Uv = torch.linalg.solve_triangular(I_A, torch.cat([a_, A_ak @ v], -1), upper=False,
                                               unitriangular=True).split(N, dim=-1)  # (B, n, H, L, N) each
    y = A_rk @ v + A_rb @ Uv  # (B, n, H, L, N): what the chunk itself writes
    # The chunk maps its start state affinely, S_L = S_0 M + D; only the loop below is sequential.
    PL = logP[..., -1:, :].exp()  # (B, n, H, 1, N): the whole chunk's decay
    D = v.mT @ (k_ * PL) + Uv.mT @ (b_ * PL)  # (B, n, H, N, N)
    if empty:
        return y.transpose(2, 3).reshape(B, L, H, N)[:, :T], D[:, 0]  # n = 1
    if state is None:
        state = r.new_zeros(B, H, N, N)
    M = torch.diag_embed(PL[..., 0, :]) + Wa.mT @ (b_ * PL)  # (B, n, H, N, N)
    starts = []
    for M_c, D_c in zip(M.unbind(1), D.unbind(1)):  # unbind: one backward op, not one zeros(M) per chunk
        starts.append(state)
        state = state @ M_c + D_c
    S0 = torch.stack(starts, dim=1)  # (B, n, H, N, N): the state entering each chunk
    y = y + (r_ + A_rb @ Wa) @ S0.mT  # and what it reads from the state it starts from
    return y.transpose(2, 3).reshape(B, n * L, H, N)[:, :T], state


def wkv7(r, w, k, v, a, b, state=None, kernel="torch"):
    """WKV-7 over a sequence, from `state` (None: zeros). Shapes as above; w must lie in [0.545, 1], as
    TimeMix makes it. Computes in fp32; returns y in v's dtype and the final state (B, H, N, N), fp32."""
    B, T, H, N = r.shape
    args = [x.float() for x in (r, w, k, v, a, b)]
    if kernel == "triton":
        state = torch.zeros(B, H, N, N, device=r.device) if state is None else state.float()
        check_triton(*args, state)
        y, state = WKV7Triton.apply(*args, state)
    elif kernel == "torch":
        y, state = wkv7_chunked(*args, None if state is None else state.float())
    else:
        raise ValueError(f"kernel must be 'torch' or 'triton', not {kernel!r}")
    return y.to(v.dtype), state


# ---------------------------------------------------------------------------------------------------
# WKV-7 in Triton


def check_triton(*tensors):
    """Raise one clear line if the Triton path cannot run on these tensors."""
    if triton is None:
        raise RuntimeError("kernel='triton' needs the triton package (Linux only): pip install triton, or use kernel='torch'")
    if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernel='triton' on CPU tensors needs TRITON_INTERPRET=1 set before this file is imported (slow; for reading and debugging)")


if triton is not None:

    @triton.jit
    def wkv7_fwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, y_ptr, sa_ptr, ckpt_ptr, sT_ptr,
                        T, H, N: tl.constexpr, CKPT: tl.constexpr):
        # One program per (batch, head). S (N x N, [value i, key j]) stays in registers for all T tokens.
        bh = tl.program_id(0).to(tl.int64)
        bi, h = bh // H, bh % H
        n = tl.arange(0, N)
        ij = n[:, None] * N + n[None, :]
        S = tl.load(s0_ptr + bh * N * N + ij)
        ckpt_ptr += bh * tl.cdiv(T, CKPT) * N * N
        for t in range(T):
            if t % CKPT == 0:  # save the state before every CKPT-th token for the backward pass
                tl.store(ckpt_ptr + (t // CKPT) * N * N + ij, S)
            off = ((bi * T + t) * H + h) * N + n
            r, w, k = tl.load(r_ptr + off), tl.load(w_ptr + off), tl.load(k_ptr + off)
            v, a, b = tl.load(v_ptr + off), tl.load(a_ptr + off), tl.load(b_ptr + off)
            sa = tl.sum(S * a[None, :], axis=1)  # (N,) over values: S a, kept for the backward pass
            S = S * w[None, :] + sa[:, None] * b[None, :] + v[:, None] * k[None, :]
            tl.store(y_ptr + off, tl.sum(S * r[None, :], axis=1))
            tl.store(sa_ptr + off, sa)
        tl.store(sT_ptr + bh * N * N + ij, S)

    @triton.jit
    def wkv7_bwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, sa_ptr, ckpt_ptr, sT_ptr, dy_ptr, dsT_ptr,
                        dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, ds0_ptr,
                        T, H, N: tl.constexpr, CKPT: tl.constexpr):
        # Walk the tokens backwards holding S_t and dS = dLoss/dS_t; one step of the chain rule per token.
        bh = tl.program_id(0).to(tl.int64)
        bi, h = bh // H, bh % H
        n = tl.arange(0, N)
        ij = n[:, None] * N + n[None, :]
        S = tl.load(sT_ptr + bh * N * N + ij)
        dS = tl.load(dsT_ptr + bh * N * N + ij)  # the final state's own gradient (zeros if unused)
        ckpt_ptr += bh * tl.cdiv(T, CKPT) * N * N
        for tt in range(T):
            t = T - 1 - tt
            off = ((bi * T + t) * H + h) * N + n
            r, w, k = tl.load(r_ptr + off), tl.load(w_ptr + off), tl.load(k_ptr + off)
            v, a, b = tl.load(v_ptr + off), tl.load(a_ptr + off), tl.load(b_ptr + off)
            sa, dy = tl.load(sa_ptr + off), tl.load(dy_ptr + off)
            tl.store(dr_ptr + off, tl.sum(S * dy[:, None], axis=0))  # y = S r
            dS += dy[:, None] * r[None, :]
            if t % CKPT == 0:  # the saved state S_{t-1}, exact
                S = tl.load(ckpt_ptr + (t // CKPT) * N * N + ij)
            else:  # undo the step: S_{t-1} = (S_t - v k^T - sa b^T) / w
                S = (S - v[:, None] * k[None, :] - sa[:, None] * b[None, :]) / w[None, :]
            # S_t = S_{t-1} diag(w) + sa b^T + v k^T with sa = S_{t-1} a; S now holds S_{t-1}
            dsa = tl.sum(dS * b[None, :], axis=1)
            tl.store(dw_ptr + off, tl.sum(dS * S, axis=0))
            tl.store(dk_ptr + off, tl.sum(dS * v[:, None], axis=0))
            tl.store(dv_ptr + off, tl.sum(dS * k[None, :], axis=1))
            tl.store(db_ptr + off, tl.sum(dS * sa[:, None], axis=0))
            tl.store(da_ptr + off, tl.sum(S * dsa[:, None], axis=0))
            dS = dS * w[None, :] + dsa[:, None] * a[None, :]
        tl.store(ds0_ptr + bh * N * N + ij, dS)


class WKV7Triton(torch.autograd.Function):
    """wkv7 on the kernels above; fp32 contiguous inputs (wkv7 makes them so)."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0):
        B, T, H, N = r.shape
        r, w, k, v, a, b, s0 = (x.contiguous() for x in (r, w, k, v, a, b, s0))
        y, sa, sT = torch.empty_like(v), torch.empty_like(v), torch.empty_like(s0)
        ckpt = s0.new_empty(B, H, triton.cdiv(T, CKPT), N, N)
        wkv7_fwd_kernel[(B * H,)](r, w, k, v, a, b, s0, y, sa, ckpt, sT, T, H, N=N, CKPT=CKPT)
        ctx.save_for_backward(r, w, k, v, a, b, sa, ckpt, sT)
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, sa, ckpt, sT = ctx.saved_tensors
        B, T, H, N = r.shape
        grads = [torch.empty_like(x) for x in (r, w, k, v, a, b, sT)]
        wkv7_bwd_kernel[(B * H,)](r, w, k, v, a, b, sa, ckpt, sT, dy.contiguous(), dsT.contiguous(), *grads,
                                  T, H, N=N, CKPT=CKPT)
        return tuple(grads)


# ---------------------------------------------------------------------------------------------------
# Layers. Each keeps its part of the recurrent state: the last token's input (token shift) and, in
# TimeMix, the WKV matrices. Initialisation follows the official code (train_temp, 2025-05 onward).


def orthogonal(rows, cols, gain):
    return nn.init.orthogonal_(torch.empty(rows, cols), gain=gain)


def lora(C, rank):
    """A low-rank pair (A, B): A zeros, B orthogonal with gain 0.1 (more when B is tall)."""
    gain = 0.1 * (math.sqrt(rank / C) if rank > C else 1.0)
    return nn.Parameter(torch.zeros(C, rank)), nn.Parameter(orthogonal(rank, C, gain))


def token_shift(x, x_prev):
    """x_{t-1} - x_t for x (B, T, C), where x_prev (B, C) is the token before this call's first one."""
    return torch.cat([x_prev[:, None], x[:, :-1]], dim=1) - x


class TimeMix(nn.Module):
    def __init__(self, config, layer_id):
        super().__init__()
        C, N, L = config.d_model, config.head_size, config.n_layer
        self.layer_id, self.n_head, self.head_size, self.kernel = layer_id, C // N, N, config.kernel
        r01, r10 = layer_id / max(L - 1, 1), 1 - layer_id / L  # 0 -> 1 and 1 -> ~0 across the layers
        c = torch.arange(C, dtype=torch.float32)
        ddd = c / C
        linear = c / (C - 1) - 0.5
        zigzag = ((c % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()  # -1 ... 1 within every head
        # mu_r, mu_w, mu_k, mu_v, mu_a, mu_g (official x_r ... x_g), (6, C): early layers and channels lean
        # more on x_{t-1}
        self.mu = nn.Parameter(1 - ddd ** (torch.tensor([0.2, 0.9, 0.7, 0.7, 0.9, 0.2])[:, None] * r10))
        self.w0 = nn.Parameter(-6 + 6 * (c / (C - 1)) ** (1 + r01 ** 0.3) + 0.5 + 2.5 * zigzag)
        self.w1, self.w2 = lora(C, lora_rank(2.5, C))
        self.a0 = nn.Parameter(-0.19 + 0.3 * zigzag + 0.4 * linear)
        self.a1, self.a2 = lora(C, lora_rank(2.5, C))
        if layer_id > 0:  # layer 0's v is v_first itself
            self.v0 = nn.Parameter(0.73 - 0.4 * linear)
            self.v1, self.v2 = lora(C, lora_rank(1.7, C))
        self.g1, self.g2 = lora(C, lora_rank(5.0, C))
        self.k_k = nn.Parameter(0.71 - 0.1 * linear)  # xi: scales k into the removal key
        self.k_a = nn.Parameter(torch.full((C,), 1.02))  # how much alpha also scales the written key
        self.r_k = nn.Parameter(torch.full((C // N, N), -0.04))  # the bonus weights, per head
        self.receptance, self.key, self.value, self.output = (nn.Linear(C, C, bias=False) for _ in range(4))
        self.ln_x = nn.GroupNorm(C // N, C, eps=64e-5)  # eps = N * 1e-5, as official
        with torch.no_grad():
            self.receptance.weight.copy_(orthogonal(C, C, 1.0))
            self.key.weight.copy_(orthogonal(C, C, 0.1))
            self.value.weight.copy_(orthogonal(C, C, 1.0))
            self.output.weight.zero_()  # every block starts as the identity
            self.ln_x.weight.fill_(((1 + layer_id) / L) ** 0.7)

    def forward(self, x, x_prev, S, v_first):
        """x (B, T, C) after LN1; x_prev (B, C), S (B, H, N, N): this layer's state. v_first: layer 0's v."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, x_prev)
        xr, xw, xk, xv, xa, xg = (x + xx * mu for mu in self.mu)  # each (B, T, C)
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        d = (self.w0 + torch.tanh(xw @ self.w1) @ self.w2).float()  # fp32 under autocast too: bf16 has no 0.999
        w = torch.exp(-math.exp(-0.5) * torch.sigmoid(d))  # the decay, in (0.545, 1)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        alpha = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1)  # unit removal key per head
        k = k * (1 + (alpha - 1) * self.k_a)
        r, w, k, v, alpha = (z.view(B, T, H, N) for z in (r, w, k, v, alpha))
        y, S = wkv7(r, w, k, v, -kk, kk * alpha, S, kernel=self.kernel)  # y: (B, T, H, N)
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
        v_first, new_state = None, []
        for block, s in zip(self.blocks, state):
            x, s, v_first = block(x, s, v_first)
            new_state.append(s)
        return self.head(self.ln_out(x)), new_state

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
        n = sum(p.numel() for name, p in self.named_parameters() if name.split(".")[-1] in low_rank
                or (name.endswith(".weight") and p.dim() == 2 and name != "emb.weight"))
        return 6 * n + 30 * self.config.n_layer * self.config.d_model * self.config.head_size
