"""
mamba.py: Mamba-1, a selective state space model, in one file.

Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (arXiv 2312.00752).
A stack of Mamba blocks, x = x + Mixer(RMSNorm(x)) (no MLP), a final RMSNorm, and a head tied to the
token embedding. Each mixer widens d_model to Di = expand * d_model channels d, and every channel carries
N = d_state numbers n of state:

    x, z     = u W_in                          in_proj, split in two halves of Di
    x        = SiLU(conv(x))                   causal depthwise conv along time, K = 4 taps per channel
    dt, B, C = x W_x                           x_proj; B, C (N each) are per token, shared by all channels
    dt       = softplus(dt W_dt + b_dt)        the step size, per token and channel: how much to let in
    h_t      = exp(dt_t A) * h_{t-1} + dt_t B_t x_t    per (d, n); A = -exp(A_log) < 0: a decay in (0, 1]
    y_t      = C_t . h_t + D x_t               read the state out, plus a skip
    out      = (y * SiLU(z)) W_out             gate, out_proj

Notation: b batch (B is the paper's input matrix; mamba-minimal's b), T sequence length, d_model written
out (C is the paper's output matrix), Di = d_inner = expand * d_model, N = d_state, R = dt_rank, K = d_conv
taps, Q = chunk_size, the chunk length (the SSD paper's letter: L stays free for Mamba-2's mask); A, B, C,
D, dt the paper's (D the skip), h the state. Indices: t a step, d a channel, n a state, c a chunk. In the
kernels BLOCK_D and BLOCK_N are the tiles of channels and states. Model.step and Model.generate, copies of
gpt.py's, write B for the batch.

The h/y lines are the core, `selective_scan(x, dt, A, B, C, D, z, h0, kernel=...)`. "Selective" because
dt, B and C depend on the input: a large dt resets the state to the current token, a small one keeps the
past. A is per (channel, state), so unlike attention or Mamba-2 there is no matmul form: the scan is
elementwise work over a (b, T, Di, N) state, and the game is never to store that state.

    "torch"   `selective_scan_chunked`: the recurrence chunk by chunk over time, with a hand-written
              backward (SelectiveScanChunked). Only the state entering each chunk is saved; the backward
              recomputes a chunk's states and runs the adjoint recurrence in reverse. A step is one fused
              in-place op on a (b, N, Di) slab, and a chunk's (b, Q, N, Di) buffers stay in the CPU's
              cache: about 20 passes over the state per layer, forward and backward. Autograd through the
              plain loop instead runs a dozen small ops a step, and every x[:, t] in it sends a full-size
              gradient back (quadratic in T). `selective_scan_ref`, that plain loop, is the test oracle.
    "triton"  `selective_scan_triton`, the same algorithm as kernels. A program owns a (BLOCK_D channels,
              N) tile of the state, in registers, and walks time one step at a time (each step is
              BLOCK_D * N independent updates), with the D skip and the gate fused; it writes the state
              out only at chunk starts. The backward kernel takes the chunks in reverse: it recomputes a
              chunk's states from its entry state into a small scratch, then runs the adjoint recurrence
              back over them. dB and dC sum over channels: each program stores its partial sums and torch
              adds them up (deterministic, no atomics). (On a GPU, tl.associative_scan would also
              parallelise time inside a chunk; Triton's interpreter runs it one element at a time in
              Python, too slow for the CPU tests, so the loop stays.)

Layout: Config; the core in PyTorch (selective_scan, selective_scan_ref, selective_scan_chunked); the core
in Triton (kernels, SelectiveScanTriton, selective_scan_triton); the layers (RMSNorm, Mixer, Block); the
Model (forward, prefill/step with a recurrent state of (conv window, ssm state) per layer, generate,
from_pretrained); released checkpoints (Mamba-1, in state-spaces' layout and Hugging Face's, read into this
file's names); a self-check, `python mamba.py`.
"""

import json
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
    block_size: int = 64  # the training context; the model itself has no positional limit
    n_layer: int = 4
    d_model: int = 128
    kernel: str = "torch"  # the scan: "torch" or "triton"
    d_state: int = 16  # N, state numbers per channel
    expand: int = 2  # d_inner = expand * d_model
    d_conv: int = 4  # K, taps of the causal depthwise conv
    dt_rank: int = 0  # rank of the dt projection; 0 means ceil(d_model / 16)
    dt_min: float = 1e-3  # the initial step sizes are log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    chunk_size: int = 8  # Q, time steps per chunk of the scan: only the state entering each chunk is saved

    def __post_init__(self):
        if self.kernel not in ("torch", "triton"):
            raise ValueError(f"kernel must be 'torch' or 'triton', not {self.kernel!r}")
        check_fields(self, sizes=("vocab_size", "block_size", "n_layer", "d_model",
                                 "d_state", "expand", "d_conv", "chunk_size"),
                     floats=("dt_min", "dt_max"))
        if self.dt_rank < 0:
            raise ValueError(f"dt_rank must be 0 (ceil(d_model / 16)) or more, got {self.dt_rank}")
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min must be at most dt_max={self.dt_max}, got {self.dt_min}")
        self.dt_rank = self.dt_rank or math.ceil(self.d_model / 16)


# ---------------------------------------------------------------------------------------------------
# The core in PyTorch: the selective scan, a recurrence over time


def selective_scan(x, dt, A, B, C, D, z=None, h0=None, kernel="torch", chunk_size=8):
    """y_t = (C_t . h_t + D x_t) * SiLU(z_t) with h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t and h_{-1} = h0
    (or 0). x, dt, z: (b, T, Di); A: (Di, N); B, C: (b, T, N); D: (Di,); h0: (b, Di, N). Returns y
    (b, T, Di) in x's dtype and the last state h (b, Di, N) in fp32; the scan itself runs in fp32. Both
    kernels save only the state entering each chunk of chunk_size steps."""
    if kernel == "torch":
        return selective_scan_chunked(x, dt, A, B, C, D, z, h0, chunk_size)
    if kernel == "triton":
        return selective_scan_triton(x, dt, A, B, C, D, z, h0, chunk_size)
    raise ValueError(f"kernel must be 'torch' or 'triton', not {kernel!r}")


# Exercise selective_scan: exercises/README.md#selective_scan
def selective_scan_ref(x, dt, A, B, C, D, z=None, h0=None):
    """The recurrence as the paper writes it, one step at a time: the test oracle. The official
    `selective_scan_ref` (state-spaces/mamba, mamba_ssm/ops/selective_scan_interface.py) is this loop with
    time last. Autograd stores every h_t, (b, T, Di, N) floats, and runs a dozen small ops per step:
    correct and slow."""
    b, T, Di = x.shape
    h = x.new_zeros(b, Di, A.size(1)) if h0 is None else h0  # (b, Di, N)
    ys = []
    for t in range(T):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h @ C[:, t, :, None]).squeeze(-1) + D * x[:, t])  # (b, Di)
    y = torch.stack(ys, dim=1)  # (b, T, Di)
    return (y if z is None else y * F.silu(z)), h


def selective_scan_chunked(x, dt, A, B, C, D, z=None, h0=None, chunk_size=8):
    """selective_scan(..., kernel="torch"): SelectiveScanChunked's C_t . h_t in fp32, even under autocast,
    then the D skip and the gate."""
    with torch.autocast(x.device.type, enabled=False):  # keep the state and its matmuls in fp32
        xf = x.float()
        B, C = B.float().contiguous(), C.float().contiguous()  # slices of x_proj's output: make them rows
        y, h = SelectiveScanChunked.apply(xf, dt.float(), A.float(), B, C, h0, chunk_size)
        y = y + D * xf
        if z is not None:
            y = y * F.silu(z.float())
    return y.to(x.dtype), h


def chunk_states(buf, dt, dtx, At, B, h_in):
    """The decays a_t = exp(dt_t A) and states h_t of one chunk of Q steps, both (b, Q, N, Di), written into
    buf. dt, dtx = dt * x: (b, Q, Di); At = A transposed: (N, Di); B: (b, Q, N); h_in: (b, N, Di), the state
    before the chunk."""
    Q = dt.size(1)  # chunk_size, or fewer steps in the last chunk
    a = torch.mul(dt[:, :, None, :], At, out=buf[0, :, :Q]).exp_()  # dt >= 0 and A < 0: exp of a number <= 0
    h = torch.mul(B[..., None], dtx[:, :, None, :], out=buf[1, :, :Q])  # dt_t B_t x_t
    hs, as_ = h.unbind(1), a.unbind(1)  # views of the steps, made once
    hs[0].addcmul_(as_[0], h_in)
    for t in range(1, Q):  # one fused op per step, in place: h_t = a_t h_{t-1} + dt_t B_t x_t
        hs[t].addcmul_(as_[t], hs[t - 1])
    return a, h


class SelectiveScanChunked(torch.autograd.Function):
    """C_t . h_t (no D, no gate) and the last state, with a hand-written backward. Inside, the state is laid
    out (b, T, N, Di), channels last, so that every op runs along contiguous rows of Di."""

    # Exercise chunked_scan: exercises/README.md#chunked_scan
    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, chunk_size):
        b, T, Di = x.shape
        N = A.size(1)
        At = A.t().contiguous()  # (N, Di)
        dtx = dt * x  # (b, T, Di)

        # 1. Room for the state entering each chunk, and one chunk's buffers, reused by every chunk: a
        # working set that stays in cache.
        starts = range(0, T, chunk_size)
        h_in = x.new_empty(b, len(starts) + 1, N, Di)  # the state entering each chunk (and the last state)
        h_in[:, 0] = 0 if h0 is None else h0.transpose(1, 2)
        buf = x.new_empty(2, b, min(chunk_size, T), N, Di)
        y = x.new_empty(b, T, 1, Di)

        # 2. Walk the chunks in order: each chunk's states from the one entering it, read out by C.
        for c, t0 in enumerate(starts):
            s = slice(t0, t0 + chunk_size)
            a, h = chunk_states(buf, dt[:, s], dtx[:, s], At, B[:, s], h_in[:, c])
            torch.matmul(C[:, s, None, :], h, out=y[:, s])  # y_t = C_t . h_t: (b, Q, 1, N) @ (b, Q, N, Di)
            h_in[:, c + 1] = h[:, -1]

        # 3. Keep the inputs and the chunks' entry states for the backward: nothing of size T * N.
        ctx.save_for_backward(x, dt, At, B, C, h_in)
        ctx.chunk_size = chunk_size
        ctx.has_h0 = h0 is not None
        return y[:, :, 0], h_in[:, -1].transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, dy, dh_last):
        # With g_t = dL/dh_t (the adjoint state), the chain rule through h_t = a_t h_{t-1} + dt_t B_t x_t:
        #   g_t = C_t dy_t + a_{t+1} g_{t+1}          the same recurrence, backwards in time
        #   dL/dB_t = sum_d g_t dt_t x_t,  dL/dx_t = dt_t sum_n g_t B_t,  dL/dC_t = sum_d dy_t h_t
        #   dL/d(dt_t A) = q_t = g_t a_t h_{t-1}  -> into dt (times A) and A (times dt)
        x, dt, At, B, C, h_in = ctx.saved_tensors
        b, T, Di = x.shape
        N = At.size(0)
        chunk_size = ctx.chunk_size
        dB, dC, dAt = torch.empty_like(B), torch.empty_like(C), torch.zeros_like(At)
        gB, qA = torch.empty_like(x), torch.empty_like(x)  # sum_n B_t g_t and sum_n A q_t, per step
        dtx = dt * x
        buf = x.new_empty(3, b, min(chunk_size, T), N, Di)
        carry = dh_last.transpose(1, 2)  # dL/dh flowing into the chunk's last step from after it
        with torch.autocast(x.device.type, enabled=False):
            for c, t0 in reversed(list(enumerate(range(0, T, chunk_size)))):
                s = slice(t0, t0 + chunk_size)

                # 1. Recompute the chunk's decays and states from the state entering it.
                a, h = chunk_states(buf, dt[:, s], dtx[:, s], At, B[:, s], h_in[:, c])

                # 2. The adjoint recurrence, back over the chunk.
                g = torch.mul(C[:, s, :, None], dy[:, s, None, :], out=buf[2, :, :a.size(1)])  # (b, Q, N, Di)
                g[:, -1] += carry
                gs, as_ = g.unbind(1), a.unbind(1)
                for t in range(len(gs) - 2, -1, -1):
                    gs[t].addcmul_(as_[t + 1], gs[t + 1])
                carry = a[:, 0] * g[:, 0]  # into the previous chunk's last state (or into h0)

                # 3. dC, dB and gB: the sums over channels as (1, Di) @ (Di, N) products, the one over
                # states as (1, N) @ (N, Di).
                torch.matmul(dy[:, s, None, :], h.transpose(2, 3), out=dC[:, s, None, :])
                torch.matmul(dtx[:, s, None, :], g.transpose(2, 3), out=dB[:, s, None, :])
                torch.matmul(B[:, s, None, :], g, out=gB[:, s, None, :])

                # 4. q_t = g_t a_t h_{t-1}, summed over states into qA and over batch and time into dAt.
                a[:, 1:] *= h[:, :-1]  # a_t h_{t-1}, in place: a is not needed any more
                a[:, 0] *= h_in[:, c]
                q = a.mul_(g)  # dL/d(dt_t A): (b, Q, N, Di)
                torch.sum(torch.mul(q, At, out=h), 2, out=qA[:, s])  # h is spent too: its memory takes these
                dAt += torch.mul(q, dt[:, s, None, :], out=h).sum((0, 1))

        # dx = dt gB and ddt = x gB + qA; h0 gets what flowed out of the first chunk.
        dh0 = carry.transpose(1, 2) if ctx.has_h0 else None
        return gB * dt, gB * x + qA, dAt.t(), dB, dC, dh0, None


# ---------------------------------------------------------------------------------------------------
# The core in Triton: the selective scan a step at a time, states saved per chunk, forward and backward


# Copied from gpt.py
def check_triton(*tensors):
    """Raise one clear line if the Triton path cannot run on these tensors."""
    if triton is None:
        raise RuntimeError("kernel='triton' needs the triton package (Linux only): pip install triton, "
                           "or use kernel='torch'")
    if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernel='triton' on CPU tensors needs TRITON_INTERPRET=1 set before this file is "
                           "imported (slow; for reading and debugging)")


# Both kernels run on a grid of (batch, channel block) programs, on contiguous tensors: x, dt, z, y are
# (b, T, Di), B and C (b, T, N), A (Di, N), states (Di, N) each; `row` = b * T is a sequence's first step.
if triton is not None:

    @triton.jit
    def scan_step(x_ptr, dt_ptr, B_ptr, row, t, d, n, Di, N, A, h):
        """Step t of the recurrence for a (BLOCK_D, BLOCK_N) tile of the state h. Channels past Di and
        states past N load zeros: a = 1 and no input there, so they stay 0."""
        x = tl.load(x_ptr + (row + t) * Di + d, mask=d < Di, other=0.0).to(tl.float32)  # (BLOCK_D,)
        dt = tl.load(dt_ptr + (row + t) * Di + d, mask=d < Di, other=0.0).to(tl.float32)  # (BLOCK_D,)
        Bt = tl.load(B_ptr + (row + t) * N + n, mask=n < N, other=0.0).to(tl.float32)  # (BLOCK_N,)
        a = tl.exp(dt[:, None] * A)  # (BLOCK_D, BLOCK_N)
        return x, dt, Bt, a, a * h + (dt * x)[:, None] * Bt[None, :]

    # Exercise scan_kernel: exercises/README.md#scan_kernel
    @triton.jit
    def selective_scan_fwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, h0_ptr, y_ptr, hs_ptr,
                                  T, Di, N, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr,
                                  CHUNK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        """y = (C . h + D x) * SiLU(z) for BLOCK_D channels of one sequence, a step at a time, the state in
        registers. hs gets the state entering each chunk of CHUNK_SIZE steps, and the last state."""
        pid_b = tl.program_id(0).to(tl.int64)  # int64: offsets like b * T * Di pass 2^31 at long T
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        mask_dn = (d[:, None] < Di) & (n[None, :] < N)

        # 1. Load this program's A and D, and the state before the first step.
        A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0)  # (BLOCK_D, BLOCK_N)
        D = tl.load(D_ptr + d, mask=d < Di, other=0.0)  # (BLOCK_D,)
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # the state: it lives in registers
        if HAS_H0:
            h = tl.load(h0_ptr + (pid_b * Di + d[:, None]) * N + n[None, :], mask=mask_dn, other=0.0)

        # 2. Walk the chunks in order, and the steps of each.
        n_chunks = tl.cdiv(T, CHUNK_SIZE)
        row = pid_b * T
        for c in range(n_chunks):
            # the only state that goes to memory: the one entering each chunk, for the backward
            tl.store(hs_ptr + ((pid_b * (n_chunks + 1) + c) * Di + d[:, None]) * N + n[None, :], h,
                     mask=mask_dn)
            for t in range(c * CHUNK_SIZE, tl.minimum(c * CHUNK_SIZE + CHUNK_SIZE, T)):
                x, dt, Bt, a, h = scan_step(x_ptr, dt_ptr, B_ptr, row, t, d, n, Di, N, A, h)
                Ct = tl.load(C_ptr + (row + t) * N + n, mask=n < N, other=0.0).to(tl.float32)
                y = tl.sum(h * Ct[None, :], axis=1) + D * x  # (BLOCK_D,): C_t . h_t + D x_t
                if HAS_Z:  # the gate, fused: y * SiLU(z)
                    z = tl.load(z_ptr + (row + t) * Di + d, mask=d < Di, other=0.0).to(tl.float32)
                    y = y * z * tl.sigmoid(z)
                tl.store(y_ptr + (row + t) * Di + d, y.to(y_ptr.dtype.element_ty), mask=d < Di)

        # 3. The last state.
        tl.store(hs_ptr + ((pid_b * (n_chunks + 1) + n_chunks) * Di + d[:, None]) * N + n[None, :], h,
                 mask=mask_dn)

    @triton.jit
    def selective_scan_bwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, hs_ptr, dy_ptr, dhT_ptr,
                                  buf_ptr, dx_ptr, ddt_ptr, dz_ptr, dA_ptr, dD_ptr, dB_ptr, dC_ptr, dh0_ptr,
                                  T, Di, N, HAS_Z: tl.constexpr, CHUNK_SIZE: tl.constexpr,
                                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        """Every gradient for BLOCK_D channels of one sequence, SelectiveScanChunked.backward's chain rule:
        the chunks in reverse, each recomputed from its saved entry state, then walked back step by step.
        dA and dD come out per sequence, dB and dC per channel block: the host sums them."""
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        mask_dn = (d[:, None] < Di) & (n[None, :] < N)
        tile = d[:, None] * N + n[None, :]  # offsets of a (BLOCK_D, BLOCK_N) state tile within one (Di, N)

        # 1. Load A and D, and start the adjoint from dL/dh of the last state.
        A = tl.load(A_ptr + tile, mask=mask_dn, other=0.0)
        D = tl.load(D_ptr + d, mask=d < Di, other=0.0)
        # g_t = dL/dh_t runs backwards: g_t = C_t dy_t + a_{t+1} g_{t+1}. `carry` holds a_{t+1} g_{t+1}.
        carry = tl.load(dhT_ptr + pid_b * Di * N + tile, mask=mask_dn, other=0.0)
        dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
        n_chunks = tl.cdiv(T, CHUNK_SIZE)
        row = pid_b * T
        buf = buf_ptr + pid_b * (CHUNK_SIZE + 1) * Di * N + tile  # this program's scratch: the chunk's states
        for j in range(n_chunks):
            c = n_chunks - 1 - j
            t0, t1 = c * CHUNK_SIZE, tl.minimum(c * CHUNK_SIZE + CHUNK_SIZE, T)

            # 2. Recompute the chunk forward from its saved entry state: buf row t - t0 + 1 holds h_t.
            h = tl.load(hs_ptr + (pid_b * (n_chunks + 1) + c) * Di * N + tile, mask=mask_dn, other=0.0)
            tl.store(buf, h, mask=mask_dn)
            for t in range(t0, t1):
                _, _, _, _, h = scan_step(x_ptr, dt_ptr, B_ptr, row, t, d, n, Di, N, A, h)
                tl.store(buf + (t - t0 + 1) * Di * N, h, mask=mask_dn)

            # 3. Walk it backwards: the gate, then g_t, and every input's share of it.
            for i in range(t1 - t0):
                t = t1 - 1 - i
                h_prev = tl.load(buf + (t - t0) * Di * N, mask=mask_dn, other=0.0)  # h_{t-1}
                x, dt, Bt, a, h = scan_step(x_ptr, dt_ptr, B_ptr, row, t, d, n, Di, N, A, h_prev)
                mask = d < Di
                Ct = tl.load(C_ptr + (row + t) * N + n, mask=n < N, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + (row + t) * Di + d, mask=mask, other=0.0).to(tl.float32)
                if HAS_Z:  # through the gate y_out = y * SiLU(z)
                    z = tl.load(z_ptr + (row + t) * Di + d, mask=mask, other=0.0).to(tl.float32)
                    sig = tl.sigmoid(z)
                    y = tl.sum(h * Ct[None, :], axis=1) + D * x
                    tl.store(dz_ptr + (row + t) * Di + d, dy * y * sig * (1 + z * (1 - sig)), mask=mask)
                    dy = dy * z * sig
                g = Ct[None, :] * dy[:, None] + carry  # (BLOCK_D, BLOCK_N)
                q = g * a * h_prev  # dL/d(dt_t A)
                gB = tl.sum(g * Bt[None, :], axis=1)  # (BLOCK_D,)
                tl.store(dx_ptr + (row + t) * Di + d, gB * dt + D * dy, mask=mask)
                tl.store(ddt_ptr + (row + t) * Di + d, gB * x + tl.sum(q * A, axis=1), mask=mask)
                dA += q * dt[:, None]
                dD += dy * x
                # dB, dC sum over all channels: store this block's partial sums; the host adds the blocks
                part = ((pid_b * tl.num_programs(1) + pid_d) * T + t) * N + n
                tl.store(dB_ptr + part, tl.sum(g * (dt * x)[:, None], axis=0), mask=n < N)
                tl.store(dC_ptr + part, tl.sum(h * dy[:, None], axis=0), mask=n < N)
                carry = a * g

        # 4. What sums over time: dA and dD, and the adjoint of the initial state.
        tl.store(dA_ptr + pid_b * Di * N + tile, dA, mask=mask_dn)
        tl.store(dD_ptr + pid_b * Di + d, dD, mask=d < Di)
        tl.store(dh0_ptr + pid_b * Di * N + tile, carry, mask=mask_dn)


def block_sizes(Di, N, is_cuda):
    """(BLOCK_D, BLOCK_N): channels per program and the state size padded to a power of two (and masked),
    for both kernels. On a GPU 64 channels: a (64, 16) fp32 state tile is 8 registers a thread (4 warps).
    Under the interpreter every program costs Python time: fewer, wider ones, up to 256 channels."""
    BLOCK_D = 64 if is_cuda else min(256, triton.next_power_of_2(Di))
    return BLOCK_D, triton.next_power_of_2(N)


class SelectiveScanTriton(torch.autograd.Function):
    """The kernels above joined for autograd. Between forward and backward it keeps the inputs and the state
    entering each chunk, (b, T / Q + 1, Di, N): nothing of size T * N."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, h0, chunk_size):
        x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
        z = z.contiguous() if z is not None else None
        b, T, Di = x.shape
        N = A.size(1)
        A, D = A.float().contiguous(), D.float().contiguous()
        h0f = h0.float().contiguous() if h0 is not None else None
        y = torch.empty_like(x)
        hs = x.new_empty(b, triton.cdiv(T, chunk_size) + 1, Di, N, dtype=torch.float32)  # entry states + last
        BLOCK_D, BLOCK_N = block_sizes(Di, N, x.is_cuda)
        grid = (b, triton.cdiv(Di, BLOCK_D))
        selective_scan_fwd_kernel[grid](
            x, dt, A, B, C, D, z, h0f, y, hs, T, Di, N, HAS_Z=z is not None, HAS_H0=h0 is not None,
            CHUNK_SIZE=chunk_size, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N)
        ctx.save_for_backward(x, dt, A, B, C, D, z, hs)
        ctx.chunk_size = chunk_size
        ctx.has_h0 = h0 is not None
        return y, hs[:, -1].clone()

    @staticmethod
    def backward(ctx, dy, dh_last):
        x, dt, A, B, C, D, z, hs = ctx.saved_tensors
        b, T, Di = x.shape
        N = A.size(1)
        BLOCK_D, BLOCK_N = block_sizes(Di, N, x.is_cuda)
        grid = (b, triton.cdiv(Di, BLOCK_D))
        f32 = dict(dtype=torch.float32, device=x.device)
        dx, ddt, dz = (torch.empty(b, T, Di, **f32) for _ in range(3))
        dA, dh0, dD = torch.empty(b, Di, N, **f32), torch.empty(b, Di, N, **f32), torch.empty(b, Di, **f32)
        buf = torch.empty(b, ctx.chunk_size + 1, Di, N, **f32)  # the kernel's scratch: one chunk's states
        dB, dC = torch.empty(b, grid[1], T, N, **f32), torch.empty(b, grid[1], T, N, **f32)  # per block
        selective_scan_bwd_kernel[grid](
            x, dt, A, B, C, D, z, hs, dy.contiguous(), dh_last.float().contiguous(), buf,
            dx, ddt, dz, dA, dD, dB, dC, dh0, T, Di, N,
            HAS_Z=z is not None, CHUNK_SIZE=ctx.chunk_size, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N)
        # dA and dD summed over the batch, dB and dC over the channel blocks
        return (dx.to(x.dtype), ddt.to(dt.dtype), dA.sum(0), dB.sum(1).to(B.dtype), dC.sum(1).to(C.dtype),
                dD.sum(0), dz.to(z.dtype) if z is not None else None, dh0 if ctx.has_h0 else None, None)


def selective_scan_triton(x, dt, A, B, C, D, z=None, h0=None, chunk_size=8):
    """selective_scan(..., kernel="triton"): SelectiveScanTriton. The kernels read x, dt, B, C and z in
    their own dtypes (A, D and h0 go in as fp32) and compute in fp32; y comes back in x's dtype, the last
    state in fp32."""
    check_triton(x, dt, A, B, C, D)
    return SelectiveScanTriton.apply(x, dt, A, B, C, D, z, h0, chunk_size)


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


class Mixer(nn.Module):
    """The Mamba block between the norm and the residual add: the official `Mamba` module (state-spaces/mamba,
    mamba_ssm/modules/mamba_simple.py), its scan as selective_scan."""

    def __init__(self, config):
        super().__init__()
        Di = config.expand * config.d_model  # d_inner
        N = config.d_state
        R = config.dt_rank
        K = config.d_conv
        self.config = config
        self.in_proj = nn.Linear(config.d_model, 2 * Di, bias=False)

        # the depthwise conv's taps, (K, Di) so that a tap is a contiguous row, and bias, both initialised as
        # nn.Conv1d would: U(+-1/sqrt(K))
        self.conv_weight = nn.Parameter(torch.empty(K, Di).uniform_(-K ** -0.5, K ** -0.5))
        self.conv_bias = nn.Parameter(torch.empty(Di).uniform_(-K ** -0.5, K ** -0.5))

        self.x_proj = nn.Linear(Di, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, Di, bias=False)  # its bias is dt_bias below, kept apart to stay fp32
        nn.init.uniform_(self.dt_proj.weight, -R ** -0.5, R ** -0.5)
        # dt_bias = softplus^-1(dt) for dt log-uniform in [dt_min, dt_max], so every channel starts at its
        # own time scale. softplus^-1(dt) = log(e^dt - 1) = dt + log(1 - e^-dt), the expm1 form exact for
        # small dt.
        log_dt = torch.empty(Di).uniform_(math.log(config.dt_min), math.log(config.dt_max))
        dt = torch.exp(log_dt).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))

        # S4D-real: A = -(1, 2, ..., N) in every channel, (Di, N), stored as its log so that A stays negative
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(Di, 1))
        self.D = nn.Parameter(torch.ones(Di))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.out_proj = nn.Linear(Di, config.d_model, bias=False)

    def forward(self, u, state=None):
        """u (b, T, d_model) after the tokens that left `state` = (conv window, ssm state), or None for a new
        sequence. Returns (b, T, d_model) and the state after the last token."""
        b, T, _ = u.shape
        K = self.config.d_conv
        N = self.config.d_state
        R = self.config.dt_rank

        # 1. Project up: the scan's input x and the gate z.
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (b, T, Di) each

        # 2. The causal depthwise conv, over the K - 1 inputs before these T and these.
        if state is None:  # a new sequence: no inputs before it, and h0 = 0
            state = (x.new_zeros(b, K - 1, x.size(-1)), None)
        window, h = state  # window: (b, K-1, Di)
        xw = torch.cat([window.to(x.dtype), x], dim=1)  # (b, K-1+T, Di): the inputs the conv sees
        x = F.silu(self.conv_bias + sum(xw[:, k:k + T] * self.conv_weight[k] for k in range(K)))  # (b, T, Di)

        # 3. The selection: dt, B and C from x.
        dt, B, C = self.x_proj(x).split([R, N, N], dim=-1)  # (b, T, R), (b, T, N), (b, T, N)
        dt = F.softplus(self.dt_proj(dt).float() + self.dt_bias)  # (b, T, Di), fp32
        A = -torch.exp(self.A_log)  # (Di, N), fp32

        # 4. The scan, with the D skip and the gate, then project down.
        y, h = selective_scan(x, dt, A, B, C, self.D, z, h, self.config.kernel, self.config.chunk_size)
        return self.out_proj(y), (xw[:, T:], h)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm, self.mixer = RMSNorm(config.d_model, eps=1e-5), Mixer(config)

    def forward(self, x, state=None):
        y, state = self.mixer(self.norm(x), state)
        return x + y, state


# ---------------------------------------------------------------------------------------------------
# The model


class Model(nn.Module):
    """After the official MambaLMHeadModel (state-spaces/mamba, mamba_ssm/models/mixer_seq_simple.py)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=1e-5)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in the official model
        # The official init (its _init_weights): embedding N(0, 0.02); the linear layers keep PyTorch's
        # default; out_proj, which writes into the residual stream, scaled down by sqrt(n_layer) so the stream
        # does not grow with depth.
        nn.init.normal_(self.wte.weight, std=0.02)
        for block in self.blocks:
            block.mixer.out_proj.weight.data /= math.sqrt(config.n_layer)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} is longer than block_size={self.config.block_size}; use a "
                             f"shorter sequence, a larger block_size, or prefill/step (no length limit)")
        logits, _ = self.prefill(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def prefill(self, idx, state=None):
        """Run the tokens idx (b, T) in parallel after `state` (None: a new sequence). Returns the logits
        (b, T, vocab_size) and the state after the last token: per layer (the last K-1 conv inputs
        (b, K-1, Di), the ssm state (b, Di, N)), the same size however long the sequence."""
        x = self.wte(idx)  # (b, T, d_model)
        states = []
        for block, s in zip(self.blocks, state or [None] * len(self.blocks)):
            x, s = block(x, s)
            states.append(s)
        return self.lm_head(self.norm_f(x)), states

    # Copied from gpt.py
    def step(self, token, state=None):
        """Feed one token (B,) after `state`; returns logits (B, vocab_size) and the new state."""
        logits, state = self.prefill(token[:, None], state)
        return logits[:, 0], state

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
        """AdamW groups: weight decay on the matrices (linear layers, conv taps, embedding); none on A_log, D,
        dt_bias (the official model flags them _no_weight_decay), the norm gains and the conv bias."""
        decay = lambda p: p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)  # noqa: E731
        params = list(self.parameters())
        return [{"params": [p for p in params if decay(p)], "weight_decay": weight_decay},
                {"params": [p for p in params if not decay(p)], "weight_decay": 0.0}]

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward): 6 per matmul (and conv tap) parameter, plus the
        scan's ~7 per (channel, state) forward (exp(dt A), dt B x, a h + b, C . h) and twice that backward.
        No T term: the cost of a token does not grow with the context."""
        n_matmul = sum(p.numel() for p in self.parameters()
                       if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False))
        config = self.config
        return 6 * n_matmul + 21 * config.n_layer * config.expand * config.d_model * config.d_state

    @classmethod
    def from_pretrained(cls, path_or_id, **overrides):
        """A released Mamba-1 from a Hugging Face hub id, e.g. "state-spaces/mamba-130m" (state-spaces' own
        layout) or "state-spaces/mamba-130m-hf" (Hugging Face's), fetched once into the hub's cache, or from a
        local folder in either layout; in fp32, in eval mode. overrides set the Config
        fields a checkpoint does not fix (kernel, block_size, chunk_size). What mamba.py cannot represent is
        a ValueError naming it. The section "Released checkpoints" below does the reading."""
        hf_config, tensors = read_checkpoint(download(path_or_id))
        model = cls(mamba_config(hf_config, tensors, **overrides))
        load_weights(model, *mamba_state_dict(tensors, model.config))
        return model.eval()


# ---------------------------------------------------------------------------------------------------
# Released checkpoints: Mamba-1 in state-spaces' layout (state-spaces/mamba-130m ... 2.8b) and in Hugging
# Face's (the -hf repos), read into this file's names. huggingface_hub and safetensors are imported here, only
# when one is loaded. The readers are gpt.py's.


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


def mamba_config(hf, tensors, **overrides):
    """This file's Config from a Mamba-1 checkpoint: its config.json (a dict: state-spaces' own, d_model and
    ssm_cfg, or Hugging Face's MambaConfig, model_type "mamba") and its tensors, whose shapes give the sizes
    in both layouts; the config gives what shapes cannot (the norm, the biases, the tie). Anything mamba.py
    cannot represent is a ValueError naming it. overrides: the fields it leaves (kernel, block_size)."""
    ssm = hf.get("ssm_cfg") or {}
    if hf.get("model_type") == "mamba2" or ssm.get("layer") == "Mamba2":
        raise ValueError("a Mamba-2 checkpoint: mamba.py loads Mamba-1 (model_type 'mamba', or state-spaces' "
                         "ssm_cfg without layer 'Mamba2')")
    state_spaces = hf.get("model_type") is None and "d_model" in hf
    if hf.get("model_type") != "mamba" and not state_spaces:
        raise ValueError(f"mamba.py loads Mamba-1 checkpoints, not model_type {hf.get('model_type')!r}")

    def size(name, dim):  # a size from a tensor's shape
        if name not in tensors:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        return tensors[name].size(dim)

    mixer = "backbone.layers.0.mixer."  # the same names in both layouts
    Di, C = size(mixer + "in_proj.weight", 0) // 2, size(mixer + "in_proj.weight", 1)  # (2 Di, d_model)
    eps = hf.get("norm_epsilon", 1e-5) if state_spaces else hf.get("layer_norm_epsilon", 1e-5)

    lacks = []
    if state_spaces and not hf.get("rms_norm", True):
        lacks.append("LayerNorm (mamba.py's norms are RMSNorm)")
    if state_spaces and (hf.get("attn_layer_idx") or hf.get("d_intermediate", 0)):
        lacks.append("attention or MLP layers between the Mamba layers (mamba.py stacks Mamba layers only)")
    if hf.get("hidden_act", "silu") != "silu":
        lacks.append(f"hidden_act {hf['hidden_act']!r} (mamba.py uses SiLU)")
    if ssm.get("bias") or hf.get("use_bias"):
        lacks.append("biases on in_proj and out_proj (mamba.py has none)")
    if eps != 1e-5:
        lacks.append(f"norm eps {eps} (mamba.py's RMSNorms use 1e-5, as every released Mamba)")
    if not hf.get("tie_embeddings" if state_spaces else "tie_word_embeddings", True):
        lacks.append("an untied output head (mamba.py ties it to the embedding)")
    if Di % C:
        lacks.append(f"an inner width {Di} that is no multiple of d_model {C}")
    if lacks:
        raise ValueError(f"this Mamba checkpoint has what mamba.py cannot represent: {'; '.join(lacks)}")
    fields = dict(
        vocab_size=size(mamba_embedding(tensors), 0),  # state-spaces pads the vocabulary to a multiple of 8
        block_size=2048,  # the context the state-spaces models trained at; mamba itself has no limit
        n_layer=hf["n_layer"] if state_spaces else hf["num_hidden_layers"], d_model=C, expand=Di // C,
        d_state=size(mixer + "A_log", 1), d_conv=size(mixer + "conv1d.weight", 2),  # (Di, N), (Di, 1, K)
        dt_rank=size(mixer + "dt_proj.weight", 1))  # (Di, R)
    return Config(**{**fields, **overrides})


def mamba_embedding(tensors):
    """The embedding's name: Hugging Face's layout says embeddings, state-spaces' embedding."""
    hf = "backbone.embeddings.weight"
    return hf if hf in tensors else "backbone.embedding.weight"


def mamba_state_dict(tensors, config):
    """This file's state_dict from the tensors of a Mamba-1 checkpoint (state-spaces' or Hugging Face's names,
    the same but for the embedding), and the tensors left over. The conv's taps come as nn.Conv1d keeps them,
    (Di, 1, K), and go in as (K, Di); dt_proj's bias is dt_bias here."""
    Di = config.expand * config.d_model
    sd = {"wte.weight": take(tensors, mamba_embedding(tensors))}
    for i in range(config.n_layer):
        hf, ours = f"backbone.layers.{i}.", f"blocks.{i}."
        sd[ours + "norm.weight"] = take(tensors, hf + "norm.weight")
        for name in ("in_proj.weight", "x_proj.weight", "dt_proj.weight", "A_log", "D", "out_proj.weight"):
            sd[ours + "mixer." + name] = take(tensors, hf + "mixer." + name)
        sd[ours + "mixer.conv_weight"] = take(tensors, hf + "mixer.conv1d.weight")[:, 0].t()  # (K, Di)
        bias = hf + "mixer.conv1d.bias"  # use_conv_bias=False saves none: the same as zeros
        sd[ours + "mixer.conv_bias"] = take(tensors, bias) if bias in tensors else torch.zeros(Di)
        sd[ours + "mixer.dt_bias"] = take(tensors, hf + "mixer.dt_proj.bias")
    sd["norm_f.weight"] = take(tensors, "backbone.norm_f.weight")
    sd["lm_head.weight"] = head_weight(tensors, sd["wte.weight"], tied=True)
    return sd, tensors


# ---------------------------------------------------------------------------------------------------
# Self-check: `python mamba.py` holds each fast path to selective_scan_ref, output, last state and every
# gradient, on ragged shapes (37 steps: no multiple of the chunk; 40 channels and 5 states: no power of
# two). `TRITON_INTERPRET=1 python mamba.py` adds the Triton path on a CPU.

if __name__ == "__main__":
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, dt, z, dy = (torch.randn(2, 37, 40, device=device) for _ in range(4))  # (b, T, Di)
    B, C = (torch.randn(2, 37, 5, device=device) for _ in range(2))  # (b, T, N)
    h0, dh = (torch.randn(2, 40, 5, device=device) for _ in range(2))  # (b, Di, N)
    inputs = [x, F.softplus(dt - 1), -4 * torch.rand(40, 5, device=device) - 0.5, B, C,  # dt ~ 0.3, A < 0
              torch.randn(40, device=device), z, h0]

    def run(scan, *inputs):
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        y, h = scan(*inputs)
        torch.autograd.backward([y, h], [dy.to(y.dtype), dh.to(h.dtype)])
        return [y, h] + [t.grad for t in inputs]

    want = run(selective_scan_ref, *(t.double() for t in inputs))
    has_triton = triton is not None and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    for kernel in ["torch"] + ["triton"] * has_triton:
        got = run(lambda *a: selective_scan(*a, kernel=kernel), *inputs)
        error = max((g.double() - w).abs().max().item() for g, w in zip(got, want))
        print(f"selective_scan(kernel={kernel!r}) vs selective_scan_ref, output, state and gradients: "
              f"max |difference| {error:.1e}")
