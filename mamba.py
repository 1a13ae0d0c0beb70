"""
mamba.py: Mamba-1 (a selective state space model) and Mamba-2 (its state space duality, SSD), in one file.

Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (arXiv 2312.00752), and
Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State
Space Duality" (arXiv 2405.21060). A stack of blocks, x = x + Mixer(RMSNorm(x)) (no MLP), a final RMSNorm,
and a head tied to the token embedding. Config.version picks the mixer. Mamba-1's (`Mixer`) widens d_model to
Di = expand * d_model channels d, and every channel carries N = d_state numbers n of state:

    x, z     = u W_in                          in_proj, split in two halves of Di
    x        = SiLU(conv(x))                   causal depthwise conv along time, K = 4 taps per channel
    dt, B, C = x W_x                           x_proj; B, C (N each) are per token, shared by all channels
    dt       = softplus(dt W_dt + b_dt)        the step size, per token and channel: how much to let in
    h_t      = exp(dt_t A) * h_{t-1} + dt_t B_t x_t    per (d, n); A = -exp(A_log) < 0: a decay in (0, 1]
    y_t      = C_t . h_t + D x_t               read the state out, plus a skip
    out      = (y * SiLU(z)) W_out             gate, out_proj

Mamba-2's (`Mixer2`) cuts the Di channels into H heads of P = headdim, and gives each head one scalar A:

    z, xBC, dt = u W_in                        in_proj, all at once: gate, conv input [x, B, C], dt per head
    x, B, C    = SiLU(conv(xBC))               the conv runs over B and C too; B, C: G groups of N
    dt         = softplus(dt + dt_bias)        per token and head
    h_t        = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T    per head a (P, N) matrix, decayed by ONE number
    y_t        = h_t C_t + D x_t               D per head
    out        = RMSNorm(y * SiLU(z)) W_out    the gated norm (grouped like B, C), out_proj

The duality. Unroll Mamba-2's recurrence: y_t = sum_{s <= t} (C_t . B_s) exp(a_{s+1} + ... + a_t) dt_s x_s
(+ D x_t), with a_t = dt_t A. Over a whole sequence that is one matrix product,

    y = (L o C B^T) (dt x),   L[t, s] = exp(a_{s+1} + ... + a_t) for s <= t, 0 above,

masked linear attention with C as the query, B as the key, dt x as the value, and L, the 1-semiseparable mask
of cumulative decays, in place of softmax's causal mask. The mask can come out of the sum because a head's
decay is one scalar per step, the same for all its P x N state numbers, so L[t, s] multiplies the whole
(C_t . B_s) term. Mamba-1's A is per (channel, state): each of the N state numbers has its own decay, so the
mask would differ for every n inside the dot product C_t . B_s, which then no longer factors as C B^T: no
matmul form, only the elementwise scan. SSD runs the product chunk by chunk: inside a chunk of Q steps the
quadratic (attention) form, as matmuls, between chunks the recurrence on one state per chunk.

Notation: b batch (B is the paper's input matrix; mamba-minimal's b), T sequence length, d_model written
out (C is the paper's output matrix), Di = d_inner = expand * d_model, N = d_state, R = dt_rank, K = d_conv
taps, Q = chunk_size, the chunk length (the SSD paper's letter: L is its mask); Mamba-2's H heads of P =
headdim channels, G = ngroups groups of B and C (the paper's letters); A, B, C, D, dt the paper's (D the
skip), h the state, a = dt A the log-decays, x~ = dt x. Indices: t (or l) a step, s an earlier one, d a
channel, n a state, p a channel of a head, c a chunk. In the kernels BLOCK_D, BLOCK_N, BLOCK_P and BLOCK_Q
are the tiles of channels, states, head channels and steps. Model.step and Model.generate, copies of
gpt.py's, write B for the batch.

Mamba-1's core is the h/y lines, `selective_scan(x, dt, A, B, C, D, z, h0, kernel=...)`. "Selective"
because dt, B and C depend on the input: a large dt resets the state to the current token, a small one keeps
the past. The scan is elementwise work over a (b, T, Di, N) state, and the game is never to store that state.

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

Mamba-2's core is `ssd(x, dt, A, B, C, D, h0, kernel=...)`, in four steps over chunks (the paper's Listing 1):
(1) inside each chunk the masked matmul (L o C B^T) x~; (2) each chunk's final state from its own inputs;
(3) the states passed from chunk to chunk, h_in[c + 1] = exp(sum of chunk c's a) h_in[c] + state[c];
(4) the state entering each chunk read out by C. Work per token O(Q (N + P) + N P) per head, all in matmuls.

    "torch"   `ssd_chunked`, the four steps as batched matmuls, differentiated by autograd; `segsum` builds
              L's exponents stably, each entry summed from the a's it spans. `ssd_ref`, the recurrence a
              token at a time (Mamba-2's step), is the test oracle.
    "triton"  `ssd_triton` (SSDTriton), the official kernel split: chunk cumsum, chunk state, state
              passing, C B^T per chunk, chunk scan, each a kernel whose every product is a tl.dot; the
              backward runs the chunk states' gradients, the passing in reverse, then one kernel for every
              other gradient of a chunk.

Layout: Config; Mamba-1's core in PyTorch (selective_scan, selective_scan_ref, selective_scan_chunked) and in
Triton (kernels, SelectiveScanTriton, selective_scan_triton); Mamba-2's core in PyTorch (ssd, ssd_ref,
segsum, ssd_chunked) and in Triton (kernels, SSDTriton, ssd_triton); the layers (RMSNorm, Mixer,
RMSNormGated, Mixer2, Block); the Model (forward, prefill/step with a recurrent state of (conv window, ssm
state) per layer, generate, from_pretrained); released checkpoints (Mamba-1 and Mamba-2, in state-spaces'
layout and Hugging Face's, read into this file's names); a self-check, `python mamba.py`.
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


def check_ssd_chunk(Q):
    """The Triton SSD's chunk is its BLOCK_Q: a power of two (a tile), at least 16 (tl.dot's least), and at
    most 128, since a program holds a whole chunk's (Q, Q) tiles on chip: at the official 256 one fp32 tile
    alone is 256 KB, past an H100's shared memory."""
    if not (16 <= Q <= 128 and Q & (Q - 1) == 0):
        raise ValueError(f"chunk_size must be a power of two from 16 to 128 for the Triton SSD (its tiles), "
                         f"got {Q}")


@dataclass
class Config:
    vocab_size: int = 65
    block_size: int = 64  # the training context; the model itself has no positional limit
    n_layer: int = 4
    d_model: int = 128
    kernel: str = "torch"  # the core (the scan, or SSD for version 2): "torch" or "triton"
    version: int = 1  # 1: Mamba-1's Mixer (selective scan); 2: Mamba-2's Mixer2 (SSD)
    # N, states per channel (v1) or per head channel (v2): 16, v1's official. v2's official is 128; at 16 a
    # Mamba-2 layer carries H * P * N = d_inner * 16 numbers of state, as many as Mamba-1's (the paper's
    # comparisons are at equal state size)
    d_state: int = 16
    expand: int = 2  # d_inner = expand * d_model (both versions, official)
    d_conv: int = 4  # K, taps of the causal depthwise conv (both versions, official)
    dt_rank: int = 0  # v1: rank of the dt projection; 0 means ceil(d_model / 16)
    dt_min: float = 1e-3  # the initial step sizes are log-uniform in [dt_min, dt_max] (both, official)
    dt_max: float = 0.1
    # Q, time steps per chunk; 0 means the version's. v1: 8, the scan saves only the state entering each chunk
    # of 8 (a memory/recompute trade); v2: 32, SSD's Q x Q intra-chunk matmuls (official 256, sized for GPU
    # tensor cores; on a CPU the (Q, Q) masks cost more than they save past 32-64). The same word for the same
    # idea, chunked time, but sized for opposite reasons, so each version keeps its own default.
    chunk_size: int = 0
    # v2: P, channels per head; d_inner / headdim heads H, each its own A. Official 64; at d_model 128 that is
    # 4 heads, whose (Q, Q) masks made the CPU model up to 12% slower than 2 heads of 128
    headdim: int = 128
    ngroups: int = 1  # v2: G, groups of heads sharing one B and C (official 1)

    def __post_init__(self):
        if self.kernel not in ("torch", "triton"):
            raise ValueError(f"kernel must be 'torch' or 'triton', not {self.kernel!r}")
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 (Mamba-1) or 2 (Mamba-2), got {self.version}")
        for name in ("chunk_size", "dt_rank"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be 0 (the version's default) or more, got "
                                 f"{getattr(self, name)}")
        self.chunk_size = self.chunk_size or (8, 32)[self.version - 1]
        check_fields(self, sizes=("vocab_size", "block_size", "n_layer", "d_model",
                                 "d_state", "expand", "d_conv", "chunk_size", "headdim", "ngroups"),
                     floats=("dt_min", "dt_max"))
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min must be at most dt_max={self.dt_max}, got {self.dt_min}")
        self.dt_rank = self.dt_rank or math.ceil(self.d_model / 16)
        if self.version == 2:
            Di = self.expand * self.d_model
            if Di % self.headdim:
                raise ValueError(f"headdim must divide d_inner = expand * d_model = {Di}, got {self.headdim}")
            if (Di // self.headdim) % self.ngroups:
                raise ValueError(f"ngroups must divide the {Di // self.headdim} heads (d_inner / headdim), "
                                 f"got {self.ngroups}")
            if self.kernel == "triton":
                check_ssd_chunk(self.chunk_size)


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
# The core of Mamba-2 in PyTorch: SSD, the scan as masked matmuls chunk by chunk


def ssd(x, dt, A, B, C, D, h0=None, kernel="torch", chunk_size=64):
    """y_t = C_t h_t + D x_t with h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T and h_{-1} = h0 (or 0), per head.
    x: (b, T, H, P); dt: (b, T, H), after the softplus; A, D: (H,); B, C: (b, T, G, N), head h reading group
    h // (H / G); h0: (b, H, P, N). Returns y (b, T, H, P) in x's dtype and the last state (b, H, P, N) in
    fp32; the core itself runs in fp32."""
    if kernel == "torch":
        return ssd_chunked(x, dt, A, B, C, D, h0, chunk_size)
    if kernel == "triton":
        return ssd_triton(x, dt, A, B, C, D, h0, chunk_size)
    raise ValueError(f"kernel must be 'torch' or 'triton', not {kernel!r}")


def ssd_ref(x, dt, A, B, C, D, h0=None):
    """The recurrence a token at a time, as Mamba-2's step runs it: the tests' oracle. h is (b, H, P, N):
    every head a P x N matrix of state, decayed by one number exp(dt_t A) per step."""
    b, T, H, P = x.shape
    G, N = B.shape[2:]
    B, C = (M.repeat_interleave(H // G, dim=2) for M in (B, C))  # (b, T, H, N): each head its group's
    h = x.new_zeros(b, H, P, N) if h0 is None else h0
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (b, H, 1, 1): one scalar per head
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]  # + dt x B^T
        ys.append((h @ C[:, t, :, :, None]).squeeze(-1) + D[:, None] * x[:, t])  # (b, H, P)
    return torch.stack(ys, dim=1), h


def segsum(a):
    """S[..., i, j] = a_{j+1} + ... + a_i for j <= i and -inf above the diagonal, so that exp(S) is the
    1-semiseparable mask of decays (1 on the diagonal, 0 above it). a: (..., Q) -> (..., Q, Q). Stable: each
    entry is summed from the a's it spans (a cumsum down the columns of a masked copy), never a difference of
    two long cumulative sums, which in fp32 cancels once those grow large. (ssd_minimal.py's `segsum`.)"""
    Q = a.size(-1)
    strictly_lower = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(-1)
    S = a[..., :, None].expand(*a.shape, Q).masked_fill(~strictly_lower, 0).cumsum(-2)  # S[i, j] = sum_j<k<=i
    return S.masked_fill(~torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(), -math.inf)


# Exercise ssd_chunked: exercises/README.md#ssd_chunked
def ssd_chunked(x, dt, A, B, C, D, h0=None, chunk_size=64):
    """ssd(..., kernel="torch"): the chunked algorithm, four steps of batched matmuls (the paper's Listing 1,
    official mamba_ssm/modules/ssd_minimal.py), differentiated by plain autograd. With a_t = dt_t A and
    x~_t = dt_t x_t, over chunks of Q steps: (1) inside each chunk, the quadratic form (L o C B^T) x~;
    (2) each chunk's own final state, as if it started at 0; (3) the states passed across chunks, one decay
    per chunk; (4) the state entering each chunk, read out by C. Any T: a ragged last chunk is padded with
    dt = 0 (no decay, no input), which leaves the state unchanged. Inside, heads come first, (b, G, H/G, c,
    Q, .), so that every matmul is one batched matmul over (batch, head, chunk) and B, C broadcast over the
    heads of their group."""
    with torch.autocast(x.device.type, enabled=False):  # the state, decays and sums in fp32 (or fp64)
        out_dtype, dtype = x.dtype, torch.promote_types(x.dtype, torch.float32)
        x, dt, A, B, C, D = (t.to(dtype) for t in (x, dt, A, B, C, D))
        b, T, H, P = x.shape
        G, N = B.shape[2:]
        Q = min(chunk_size, T)
        pad = -T % Q
        c = (T + pad) // Q  # chunks
        chunks = lambda M: (F.pad(M, (0, 0) * (M.dim() - 2) + (0, pad)) if pad else M).unflatten(1, (c, Q))

        # 0. Into chunks, heads first, and the log-decays a = dt A per head: a_cs is their running sum from
        # each chunk's start.
        xt = chunks(x * dt[..., None]).view(b, c, Q, G, H // G, P)
        xt = xt.permute(0, 3, 4, 1, 2, 5).contiguous()  # x~ = dt x: (b, G, H/G, c, Q, P), laid out for bmm
        Bc, Cc = (chunks(M).view(b, c, Q, G, 1, N).permute(0, 3, 4, 1, 2, 5)
                  for M in (B, C))  # (b, G, 1, c, Q, N): one per group, broadcast over its heads
        a = chunks(dt * A).view(b, c, Q, G, H // G).permute(0, 3, 4, 1, 2)  # (b, G, H/G, c, Q)
        a_cs = a.cumsum(-1)

        # 1. Inside each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(a_{s+1} + ... + a_l) x~_s, the masked
        # attention-like form: C plays the query, B the key, x~ the value.
        L = torch.exp(segsum(a))  # (b, G, H/G, c, Q, Q): the decays, 0 above the diagonal
        y = (L * (Cc @ Bc.transpose(-1, -2))) @ xt  # (b, G, H/G, c, Q, P)

        # 2. Each chunk's final state from its own inputs: sum_s exp(a_{s+1} + ... + a_Q) x~_s B_s^T. The
        # decay goes on B, N wide, rather than on x~, P wide: the same product, less to scale.
        decay_out = torch.exp(a_cs[..., -1:] - a_cs)  # (b, G, H/G, c, Q), in (0, 1]
        states = xt.transpose(-1, -2) @ (Bc * decay_out[..., None])  # (b, G, H/G, c, P, N)

        # 3. Across chunks: h_in[c + 1] = exp(a summed over chunk c) h_in[c] + states[c], from h_in[0] = h0.
        # A short loop (T / Q steps) of (b, H, P, N) updates; the official kernel walks the chunks in turn.
        decay_chunk = torch.exp(a_cs[..., -1]).unbind(-1)  # per chunk: (b, G, H/G)
        h = x.new_zeros(b, G, H // G, P, N) if h0 is None else h0.to(dtype).view(b, G, H // G, P, N)
        h_in = []
        for k, s in enumerate(states.unbind(3)):
            h_in.append(h)
            h = decay_chunk[k][..., None, None] * h + s
        h_in = torch.stack(h_in, dim=3)  # (b, G, H/G, c, P, N): the state entering each chunk

        # 4. The state entering each chunk, read out at each step and decayed to it: exp(a_1 + ... + a_l),
        # again on the N-wide side, C.
        y = y + (Cc * torch.exp(a_cs)[..., None]) @ h_in.transpose(-1, -2)  # (b, G, H/G, c, Q, P)

        y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, c * Q, H, P)[:, :T] + D[:, None] * x
    return y.to(out_dtype), h.view(b, H, P, N)

# ---------------------------------------------------------------------------------------------------
# The core of Mamba-2 in Triton: SSD as the official kernels split it (mamba_ssm/ops/triton/ssd_*.py), forward
# and backward, every matmul a tl.dot


# The kernels read contiguous x (b, T, H, P), dt (b, T, H), B and C (b, T, G, N), and run on a grid of (batch,
# head, chunk) programs (or (batch, head) for the walk across chunks). A chunk is BLOCK_Q = chunk_size steps;
# steps past T load dt = 0 and x = B = C = 0, which neither decays nor feeds the state, so a ragged last
# chunk needs no other care. P and N are padded to powers of two of at least 16 (tl.dot's smallest) and
# masked. Inside a chunk the segment sums are differences of the chunk's own cumsum, clamped at 0 as the
# official kernels do: a chunk is short, so they do not cancel the way a cumsum over the whole sequence would.
# Offsets are int64 (the official kernels' int32 wrapped past ~61K tokens, state-spaces/mamba issue #1015).
if triton is not None:

    @triton.jit
    def ssd_rows(ptr, row, cols, width, mask_t):
        """The (BLOCK_Q, width) rows of a chunk's steps, padded columns and steps past T as 0, in fp32."""
        mask = mask_t[:, None] & (cols[None, :] < width)
        return tl.load(ptr + row[:, None] * width + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def ssd_state(ptr, pid_b, c, h, n_states, H, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """Pointers to state c of head h, (BLOCK_P, BLOCK_N), in a (b, n_states, H, P, N) tensor, and their
        mask. (A (b, H, P, N) tensor is n_states = 1, c = 0.)"""
        p, n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
        ptrs = ptr + ((pid_b * n_states + c) * H + h) * P * N + p[:, None] * N + n[None, :]
        return ptrs, (p[:, None] < P) & (n[None, :] < N)

    @triton.jit
    def ssd_load_state(ptr, pid_b, c, h, n_states, H, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        ptrs, mask = ssd_state(ptr, pid_b, c, h, n_states, H, P, N, BLOCK_P, BLOCK_N)
        return tl.load(ptrs, mask=mask, other=0.0)

    @triton.jit
    def ssd_store_state(ptr, value, pid_b, c, h, n_states, H, P, N, BLOCK_P: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        ptrs, mask = ssd_state(ptr, pid_b, c, h, n_states, H, P, N, BLOCK_P, BLOCK_N)
        tl.store(ptrs, value, mask=mask)

    @triton.jit
    def ssd_chunk(T, H, G, n_chunks, BLOCK_Q: tl.constexpr):
        """This program's (batch, head, chunk), its steps t (BLOCK_Q,) and their mask, the row offsets of its
        steps in (b, T, H, .) and in (b, T, G, .) (its group's), and where its cumsums start in a_cs."""
        pid_b, h, c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2)
        t = c * BLOCK_Q + tl.arange(0, BLOCK_Q)
        g = h // (H // G)
        return (pid_b, h, c, t, t < T, (pid_b * T + t) * H + h, (pid_b * T + t) * G + g,
                ((pid_b * H + h) * n_chunks + c) * BLOCK_Q)

    @triton.jit
    def ssd_fwd_cumsum_kernel(dt_ptr, A_ptr, a_cs_ptr, T, H, G, n_chunks, BLOCK_Q: tl.constexpr):
        """a_cs = the running sum of a_t = dt_t A within each chunk, (b, H, chunks, Q): the log of the decay
        from the chunk's start to each step."""
        pid_b, h, c, t, mask_t, row_h, row_g, a_row = ssd_chunk(T, H, G, n_chunks, BLOCK_Q)
        dt = tl.load(dt_ptr + row_h, mask=mask_t, other=0.0)
        tl.store(a_cs_ptr + a_row + tl.arange(0, BLOCK_Q), tl.cumsum(dt * tl.load(A_ptr + h), axis=0))

    @triton.jit
    def ssd_fwd_states_kernel(x_ptr, dt_ptr, B_ptr, a_cs_ptr, states_ptr, T, H, G, P, N, n_chunks,
                              BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """Each chunk's final state from its own inputs, as if it began at 0: sum_s exp(a_cs[Q] - a_cs[s])
        dt_s x_s B_s^T, one (P, Q) @ (Q, N) product. states: (b, chunks, H, P, N)."""
        pid_b, h, c, t, mask_t, row_h, row_g, a_row = ssd_chunk(T, H, G, n_chunks, BLOCK_Q)
        a_cs = tl.load(a_cs_ptr + a_row + tl.arange(0, BLOCK_Q))
        x = ssd_rows(x_ptr, row_h, tl.arange(0, BLOCK_P), P, mask_t)
        B = ssd_rows(B_ptr, row_g, tl.arange(0, BLOCK_N), N, mask_t)
        dt = tl.load(dt_ptr + row_h, mask=mask_t, other=0.0)
        w = tl.exp(tl.load(a_cs_ptr + a_row + BLOCK_Q - 1) - a_cs) * dt  # the decay to the chunk's end, x dt
        states = tl.dot(tl.trans(x * w[:, None]), B)  # (BLOCK_P, BLOCK_N)
        ssd_store_state(states_ptr, states, pid_b, c, h, n_chunks, H, P, N, BLOCK_P, BLOCK_N)

    @triton.jit
    def ssd_fwd_passing_kernel(states_ptr, a_cs_ptr, h0_ptr, hs_ptr, H, P, N, n_chunks, HAS_H0: tl.constexpr,
                               BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """The walk across chunks, one (batch, head) per program: hs[c] = the state entering chunk c,
        hs[c + 1] = exp(a_cs[c, Q]) hs[c] + states[c], from hs[0] = h0 (or 0); hs[chunks] is the last state.
        hs: (b, chunks + 1, H, P, N)."""
        pid_b, h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        if HAS_H0:
            state = ssd_load_state(h0_ptr, pid_b, 0, h, 1, H, P, N, BLOCK_P, BLOCK_N)
        for c in range(n_chunks):
            ssd_store_state(hs_ptr, state, pid_b, c, h, n_chunks + 1, H, P, N, BLOCK_P, BLOCK_N)
            decay = tl.exp(tl.load(a_cs_ptr + ((pid_b * H + h) * n_chunks + c) * BLOCK_Q + BLOCK_Q - 1))
            s = ssd_load_state(states_ptr, pid_b, c, h, n_chunks, H, P, N, BLOCK_P, BLOCK_N)
            state = decay * state + s
        ssd_store_state(hs_ptr, state, pid_b, n_chunks, h, n_chunks + 1, H, P, N, BLOCK_P, BLOCK_N)

    @triton.jit
    def ssd_scores(ptr, pid_b, c, g, G, n_chunks, BLOCK_Q: tl.constexpr):
        """Pointers to chunk c's (BLOCK_Q, BLOCK_Q) scores C B^T of group g in (b, chunks, G, Q, Q)."""
        q = tl.arange(0, BLOCK_Q)
        return ptr + ((pid_b * n_chunks + c) * G + g) * BLOCK_Q * BLOCK_Q + q[:, None] * BLOCK_Q + q[None, :]

    @triton.jit
    def ssd_fwd_bmm_kernel(B_ptr, C_ptr, CB_ptr, T, G, N, n_chunks, BLOCK_Q: tl.constexpr,
                           BLOCK_N: tl.constexpr):
        """C B^T within each chunk, one (Q, Q) per (batch, group, chunk), shared by the group's heads: the
        attention scores of the quadratic form. CB: (b, chunks, G, Q, Q)."""
        pid_b, g, c, t, mask_t, row_g, _, _ = ssd_chunk(T, G, G, n_chunks, BLOCK_Q)  # a program per group
        n = tl.arange(0, BLOCK_N)
        CB = tl.dot(ssd_rows(C_ptr, row_g, n, N, mask_t), tl.trans(ssd_rows(B_ptr, row_g, n, N, mask_t)))
        tl.store(ssd_scores(CB_ptr, pid_b, c, g, G, n_chunks, BLOCK_Q), CB)

    @triton.jit
    def ssd_decay_mask(a_cs, BLOCK_Q: tl.constexpr):
        """L[l, s] = exp(a_cs[l] - a_cs[s]) for s <= l, 0 above: the chunk's 1-semiseparable mask."""
        q = tl.arange(0, BLOCK_Q)
        return tl.where(q[:, None] >= q[None, :], tl.exp(tl.minimum(a_cs[:, None] - a_cs[None, :], 0.0)), 0.0)

    @triton.jit
    def ssd_fwd_scan_kernel(x_ptr, dt_ptr, C_ptr, D_ptr, a_cs_ptr, CB_ptr, hs_ptr, y_ptr, T, H, G, P, N,
                            n_chunks, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """y for one chunk of one head: (L o C B^T) @ (dt x), plus the entering state read out by C and
        decayed to each step, exp(a_cs) (C @ h_in^T), plus D x."""
        pid_b, h, c, t, mask_t, row_h, row_g, a_row = ssd_chunk(T, H, G, n_chunks, BLOCK_Q)
        p, q = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_Q)
        a_cs = tl.load(a_cs_ptr + a_row + q)
        x = ssd_rows(x_ptr, row_h, p, P, mask_t)
        dt = tl.load(dt_ptr + row_h, mask=mask_t, other=0.0)
        g = h // (H // G)
        CB = tl.load(ssd_scores(CB_ptr, pid_b, c, g, G, n_chunks, BLOCK_Q))

        # 1. Inside the chunk: the masked matmul.
        y = tl.dot(CB * ssd_decay_mask(a_cs, BLOCK_Q), x * dt[:, None])  # (BLOCK_Q, BLOCK_P)

        # 2. From the chunks before: C_l . h_in, decayed from the chunk's start to step l.
        C = ssd_rows(C_ptr, row_g, tl.arange(0, BLOCK_N), N, mask_t)
        h_in = ssd_load_state(hs_ptr, pid_b, c, h, n_chunks + 1, H, P, N, BLOCK_P, BLOCK_N)
        y += tl.exp(a_cs)[:, None] * tl.dot(C, tl.trans(h_in))
        y += tl.load(D_ptr + h) * x
        tl.store(y_ptr + row_h[:, None] * P + p[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mask_t[:, None] & (p[None, :] < P))

    @triton.jit
    def ssd_bwd_dstates_kernel(dy_ptr, C_ptr, a_cs_ptr, dh_in_ptr, T, H, G, P, N, n_chunks,
                               BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """dL/dh_in[c] through chunk c's own outputs alone: sum_l exp(a_cs[l]) dy_l C_l^T, (P, Q) @ (Q, N).
        dh_in: (b, chunks, H, P, N)."""
        pid_b, h, c, t, mask_t, row_h, row_g, a_row = ssd_chunk(T, H, G, n_chunks, BLOCK_Q)
        a_cs = tl.load(a_cs_ptr + a_row + tl.arange(0, BLOCK_Q))
        dy = ssd_rows(dy_ptr, row_h, tl.arange(0, BLOCK_P), P, mask_t)
        C = ssd_rows(C_ptr, row_g, tl.arange(0, BLOCK_N), N, mask_t)
        dh = tl.dot(tl.trans(dy * tl.exp(a_cs)[:, None]), C)
        ssd_store_state(dh_in_ptr, dh, pid_b, c, h, n_chunks, H, P, N, BLOCK_P, BLOCK_N)

    @triton.jit
    def ssd_bwd_passing_kernel(dh_in_ptr, hs_ptr, a_cs_ptr, dhT_ptr, dstates_ptr, da_last_ptr, dh0_ptr, H, P,
                               N, n_chunks, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                               BLOCK_N: tl.constexpr):
        """The walk across chunks, backwards: with g = dL/dh_in[c + 1] (from dL/d(last state) at the end),
        chunk c's own state gets g, its total decay a_cs[c, Q] gets sum(g exp(.) h_in[c]), and dL/dh_in[c]
        = dh_in[c] + exp(a_cs[c, Q]) g. What is left at the start is dL/dh0."""
        pid_b, h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        g = ssd_load_state(dhT_ptr, pid_b, 0, h, 1, H, P, N, BLOCK_P, BLOCK_N)
        for j in range(n_chunks):
            c = n_chunks - 1 - j
            ssd_store_state(dstates_ptr, g, pid_b, c, h, n_chunks, H, P, N, BLOCK_P, BLOCK_N)
            decay = tl.exp(tl.load(a_cs_ptr + ((pid_b * H + h) * n_chunks + c) * BLOCK_Q + BLOCK_Q - 1))
            h_in = ssd_load_state(hs_ptr, pid_b, c, h, n_chunks + 1, H, P, N, BLOCK_P, BLOCK_N)
            tl.store(da_last_ptr + (pid_b * H + h) * n_chunks + c, tl.sum(g * decay * h_in))
            g = ssd_load_state(dh_in_ptr, pid_b, c, h, n_chunks, H, P, N, BLOCK_P, BLOCK_N) + decay * g
        ssd_store_state(dh0_ptr, g, pid_b, 0, h, 1, H, P, N, BLOCK_P, BLOCK_N)

    @triton.jit
    def ssd_bwd_chunk_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, a_cs_ptr, hs_ptr, dy_ptr, dstates_ptr,
                             da_last_ptr, dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr,
                             T, H, G, P, N, n_chunks,
                             BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """Every gradient of one chunk of one head, the forward's three parts in reverse: (1) the entering
        state's readout, (2) the masked matmul, (3) the chunk's own state (its gradient from the walk). The
        log-decays collect dL/da_cs along the way, and a reverse cumsum turns that into dL/da, so into dt and
        A. dB and dC come out per head (the host sums a group's heads), dA and dD per chunk."""
        pid_b, h, c, t, mask_t, row_h, row_g, a_row = ssd_chunk(T, H, G, n_chunks, BLOCK_Q)
        p, n, q = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_Q)
        a_cs = tl.load(a_cs_ptr + a_row + q)
        x, dy = ssd_rows(x_ptr, row_h, p, P, mask_t), ssd_rows(dy_ptr, row_h, p, P, mask_t)
        B, C = ssd_rows(B_ptr, row_g, n, N, mask_t), ssd_rows(C_ptr, row_g, n, N, mask_t)
        dt = tl.load(dt_ptr + row_h, mask=mask_t, other=0.0)
        xt = x * dt[:, None]  # x~ = dt x: (BLOCK_Q, BLOCK_P)

        # 1. y_off = exp(a_cs) (C @ h_in^T): into C and a_cs.
        h_in = ssd_load_state(hs_ptr, pid_b, c, h, n_chunks + 1, H, P, N, BLOCK_P, BLOCK_N)
        decay_in = tl.exp(a_cs)
        dC = decay_in[:, None] * tl.dot(dy, h_in)  # (BLOCK_Q, BLOCK_N)
        da_cs = decay_in * tl.sum(dy * tl.dot(C, tl.trans(h_in)), axis=1)  # (BLOCK_Q,)

        # 2. y_diag = M @ x~ with M = C B^T o L: into x~, C, B, and through L into a_cs.
        L = ssd_decay_mask(a_cs, BLOCK_Q)
        M = tl.dot(C, tl.trans(B)) * L  # (BLOCK_Q, BLOCK_Q)
        dM = tl.where(q[:, None] >= q[None, :], tl.dot(dy, tl.trans(xt)), 0.0)
        dxt = tl.dot(tl.trans(M), dy)  # (BLOCK_Q, BLOCK_P)
        dCB = dM * L
        dC += tl.dot(dCB, B)
        dB = tl.dot(tl.trans(dCB), C)
        dS = dM * M  # dL/d(a_cs[l] - a_cs[s])
        da_cs += tl.sum(dS, axis=1) - tl.sum(dS, axis=0)

        # 3. states = (x~ o w)^T @ B with w = exp(a_cs[Q] - a_cs): into x~, B, a_cs and a_cs[Q].
        dstates = ssd_load_state(dstates_ptr, pid_b, c, h, n_chunks, H, P, N, BLOCK_P, BLOCK_N)
        w = tl.exp(tl.load(a_cs_ptr + a_row + BLOCK_Q - 1) - a_cs)
        Bds = tl.dot(B, tl.trans(dstates))  # (BLOCK_Q, BLOCK_P)
        dxt += w[:, None] * Bds
        dB += tl.dot(xt * w[:, None], dstates)
        dw = w * tl.sum(xt * Bds, axis=1)  # dL/d(a_cs[Q] - a_cs[l])
        da_last = tl.sum(dw) + tl.load(da_last_ptr + (pid_b * H + h) * n_chunks + c)  # and from the walk
        da_cs += tl.where(q == BLOCK_Q - 1, da_last, 0.0) - dw

        # 4. a_cs[l] = a_1 + ... + a_l, so dL/da_s = sum_{l >= s} dL/da_cs[l]; a = dt A, x~ = dt x.
        da = tl.cumsum(da_cs, axis=0, reverse=True)
        tl.store(ddt_ptr + row_h, da * tl.load(A_ptr + h) + tl.sum(dxt * x, axis=1), mask=mask_t)
        mask_tp, mask_tn = mask_t[:, None] & (p[None, :] < P), mask_t[:, None] & (n[None, :] < N)
        tl.store(dx_ptr + row_h[:, None] * P + p[None, :], dxt * dt[:, None] + tl.load(D_ptr + h) * dy,
                 mask=mask_tp)
        tl.store(dB_ptr + row_h[:, None] * N + n[None, :], dB, mask=mask_tn)
        tl.store(dC_ptr + row_h[:, None] * N + n[None, :], dC, mask=mask_tn)
        tl.store(dA_ptr + (pid_b * H + h) * n_chunks + c, tl.sum(da * dt))
        tl.store(dD_ptr + (pid_b * H + h) * n_chunks + c, tl.sum(dy * x))

def ssd_block_sizes(P, N):
    """BLOCK_P, BLOCK_N: head dim and state size padded to powers of two, at least 16 (tl.dot's least)."""
    return max(16, triton.next_power_of_2(P)), max(16, triton.next_power_of_2(N))


class SSDTriton(torch.autograd.Function):
    """The SSD kernels joined for autograd. Between forward and backward it keeps the inputs, the chunks'
    cumsums and the state entering each chunk, (b, T / Q + 1, H, P, N): no (T, T) and no per-step state."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, chunk_size):
        x, B, C = (t.contiguous() for t in (x, B, C))
        dt, A, D = (t.float().contiguous() for t in (dt, A, D))
        b, T, H, P = x.shape
        G, N = B.shape[2:]
        n_chunks = triton.cdiv(T, chunk_size)
        BLOCK_P, BLOCK_N = ssd_block_sizes(P, N)
        f32 = dict(dtype=torch.float32, device=x.device)
        a_cs = torch.empty(b, H, n_chunks, chunk_size, **f32)
        states = torch.empty(b, n_chunks, H, P, N, **f32)
        hs = torch.empty(b, n_chunks + 1, H, P, N, **f32)
        CB = torch.empty(b, n_chunks, G, chunk_size, chunk_size, **f32)
        y = torch.empty_like(x)
        sizes = dict(BLOCK_Q=chunk_size, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N)
        h0f = h0.float().contiguous() if h0 is not None else None

        # 1. chunk cumsum, 2. chunk states, 3. state passing, 4. C B^T per chunk, 5. chunk scan
        ssd_fwd_cumsum_kernel[(b, H, n_chunks)](dt, A, a_cs, T, H, G, n_chunks, BLOCK_Q=chunk_size)
        ssd_fwd_states_kernel[(b, H, n_chunks)](x, dt, B, a_cs, states, T, H, G, P, N, n_chunks, **sizes)
        ssd_fwd_passing_kernel[(b, H)](states, a_cs, h0f, hs, H, P, N, n_chunks, HAS_H0=h0 is not None,
                                       **sizes)
        ssd_fwd_bmm_kernel[(b, G, n_chunks)](B, C, CB, T, G, N, n_chunks, BLOCK_Q=chunk_size, BLOCK_N=BLOCK_N)
        ssd_fwd_scan_kernel[(b, H, n_chunks)](x, dt, C, D, a_cs, CB, hs, y, T, H, G, P, N, n_chunks, **sizes)
        ctx.save_for_backward(x, dt, A, B, C, D, a_cs, hs)
        ctx.chunk_size, ctx.has_h0 = chunk_size, h0 is not None
        return y, hs[:, -1].clone()

    @staticmethod
    def backward(ctx, dy, dh_last):
        x, dt, A, B, C, D, a_cs, hs = ctx.saved_tensors
        b, T, H, P = x.shape
        G, N = B.shape[2:]
        chunk_size = ctx.chunk_size
        n_chunks = triton.cdiv(T, chunk_size)
        BLOCK_P, BLOCK_N = ssd_block_sizes(P, N)
        sizes = dict(BLOCK_Q=chunk_size, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N)
        f32 = dict(dtype=torch.float32, device=x.device)
        dy = dy.contiguous()
        dh_last = torch.zeros(b, H, P, N, **f32) if dh_last is None else dh_last.float().contiguous()
        dh_in, dstates = torch.empty(b, n_chunks, H, P, N, **f32), torch.empty(b, n_chunks, H, P, N, **f32)
        da_last, dA, dD = (torch.empty(b, H, n_chunks, **f32) for _ in range(3))
        dh0 = torch.empty(b, H, P, N, **f32)
        dx, ddt = torch.empty(b, T, H, P, **f32), torch.empty(b, T, H, **f32)
        dB, dC = torch.empty(b, T, H, N, **f32), torch.empty(b, T, H, N, **f32)  # per head: summed below

        # 1. what each chunk's outputs send its entering state, 2. the walk back across chunks, 3. the rest
        ssd_bwd_dstates_kernel[(b, H, n_chunks)](dy, C, a_cs, dh_in, T, H, G, P, N, n_chunks, **sizes)
        ssd_bwd_passing_kernel[(b, H)](dh_in, hs, a_cs, dh_last, dstates, da_last, dh0, H, P, N, n_chunks,
                                       **sizes)
        ssd_bwd_chunk_kernel[(b, H, n_chunks)](x, dt, A, B, C, D, a_cs, hs, dy, dstates, da_last,
                                               dx, ddt, dB, dC, dA, dD, T, H, G, P, N, n_chunks, **sizes)
        dB, dC = (d.view(b, T, G, H // G, N).sum(3) for d in (dB, dC))  # a group's heads share its B, C
        return (dx.to(x.dtype), ddt, dA.sum((0, 2)), dB.to(B.dtype), dC.to(C.dtype), dD.sum((0, 2)),
                dh0 if ctx.has_h0 else None, None)


def ssd_triton(x, dt, A, B, C, D, h0=None, chunk_size=64):
    """ssd(..., kernel="triton"): SSDTriton. x, B, C are read in their own dtype, dt, A, D, h0 in fp32; the
    kernels compute in fp32; y comes back in x's dtype, the last state in fp32. chunk_size is the kernels'
    BLOCK_Q (check_ssd_chunk)."""
    check_triton(x, dt, A, B, C, D)
    check_ssd_chunk(chunk_size)
    return SSDTriton.apply(x, dt, A, B, C, D, h0, chunk_size)

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


class RMSNormGated(nn.Module):
    """RMSNorm(y * SiLU(z)) * weight, the RMS taken over each group of d_inner / G channels: Mamba-2's norm
    before out_proj (official RMSNormGated with norm_before_gate=False, mamba_ssm/ops/triton/
    layernorm_gated.py). Gating first lets z switch channels off before the norm rescales what is left."""

    def __init__(self, dim, group_size, eps=1e-5):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y, z):
        y = (y * F.silu(z)).unflatten(-1, (-1, self.group_size))  # (..., G, Di / G)
        return F.rms_norm(y, (self.group_size,), eps=self.eps).flatten(-2) * self.weight  # per group


class Mixer2(nn.Module):
    """The Mamba-2 block between the norm and the residual add: the official `Mamba2` module (state-spaces/
    mamba, mamba_ssm/modules/mamba2.py) without its optional MLP branch, its core as ssd. Every projection
    comes from u at once (Mamba-1 makes dt, B, C from the conv's output), and B, C go through the conv too."""

    def __init__(self, config):
        super().__init__()
        Di = config.expand * config.d_model  # d_inner
        N, G, K = config.d_state, config.ngroups, config.d_conv
        H = Di // config.headdim  # heads, each with its own scalar A
        self.config = config
        self.in_proj = nn.Linear(config.d_model, 2 * Di + 2 * G * N + H, bias=False)  # [z, x, B, C, dt]

        # the depthwise conv over x, B and C together, (K, Di + 2GN), initialised as nn.Conv1d would
        self.conv_weight = nn.Parameter(torch.empty(K, Di + 2 * G * N).uniform_(-K ** -0.5, K ** -0.5))
        self.conv_bias = nn.Parameter(torch.empty(Di + 2 * G * N).uniform_(-K ** -0.5, K ** -0.5))

        # dt_bias = softplus^-1(dt) for dt log-uniform in [dt_min, dt_max], one per head (Mixer's rule)
        log_dt = torch.empty(H).uniform_(math.log(config.dt_min), math.log(config.dt_max))
        dt = torch.exp(log_dt).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # A = -exp(A_log) per head, A drawn uniform in [1, 16] (A_init_range); D = 1 per head
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(H))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = RMSNormGated(Di, Di // G)
        self.out_proj = nn.Linear(Di, config.d_model, bias=False)

    def forward(self, u, state=None):
        """u (b, T, d_model) after the tokens that left `state` = (conv window (b, K-1, Di + 2GN), ssm state
        (b, H, P, N)), or None for a new sequence. Returns (b, T, d_model) and the state after the last
        token."""
        b, T, _ = u.shape
        config = self.config
        Di, N, G, K, P = config.expand * config.d_model, config.d_state, config.ngroups, config.d_conv, \
            config.headdim
        H = Di // P

        # 1. Project up, all at once: the gate z, the conv's input xBC = [x, B, C], and dt per head.
        z, xBC, dt = self.in_proj(u).split([Di, Di + 2 * G * N, H], dim=-1)

        # 2. The causal depthwise conv over x, B and C, after the K - 1 inputs before these T.
        if state is None:
            state = (xBC.new_zeros(b, K - 1, xBC.size(-1)), None)
        window, h = state
        xw = torch.cat([window.to(xBC.dtype), xBC], dim=1)  # (b, K-1+T, Di + 2GN)
        xBC = F.silu(self.conv_bias + sum(xw[:, k:k + T] * self.conv_weight[k] for k in range(K)))
        x, B, C = xBC.split([Di, G * N, G * N], dim=-1)

        # 3. The step size per head, A per head, and SSD over the heads.
        dt = F.softplus(dt.float() + self.dt_bias)  # (b, T, H), fp32
        A = -torch.exp(self.A_log)  # (H,), fp32
        B, C = B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N))
        y, h = ssd(x.unflatten(-1, (H, P)), dt, A, B, C, self.D, h, config.kernel,
                   config.chunk_size)  # (b, T, H, P), (b, H, P, N)

        # 4. Gate and norm, then project down.
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y), (xw[:, T:], h)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.d_model, eps=1e-5)
        self.mixer = (Mixer if config.version == 1 else Mixer2)(config)

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
        core's, three times its forward. Mamba-1's scan: ~7 per (channel, state) (exp(dt A), dt B x, a h + b,
        C . h); no T term, a token's cost does not grow with the context. Mamba-2's SSD, with Q = min(chunk,
        T): per token 2Q (GN + HP) for C B^T and its (Q, Q) mask times x~ inside the chunk, and 4 HPN for the
        chunk state and the readout; it grows with T up to Q, then stays flat."""
        n_matmul = sum(p.numel() for p in self.parameters()
                       if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False))
        config = self.config
        Di, N = config.expand * config.d_model, config.d_state
        if config.version == 1:
            return 6 * n_matmul + 21 * config.n_layer * Di * N
        Q = min(config.chunk_size, T)
        ssd = 2 * Q * (config.ngroups * N + Di) + 4 * Di * N  # H P = Di
        return 6 * n_matmul + 3 * config.n_layer * ssd

    @classmethod
    def from_pretrained(cls, path_or_id, **overrides):
        """A released Mamba-1 or Mamba-2 from a Hugging Face hub id, e.g. "state-spaces/mamba-130m" or
        "state-spaces/mamba2-130m" (state-spaces' own layout) or "state-spaces/mamba-130m-hf" (Hugging
        Face's), fetched once into the hub's cache, or from a local folder in either layout; in fp32, in eval
        mode. overrides set the Config fields a checkpoint does not fix (kernel, block_size, chunk_size).
        What mamba.py cannot represent is a ValueError naming it. The section "Released checkpoints"
        below does the reading."""
        hf_config, tensors = read_checkpoint(download(path_or_id))
        model = cls(mamba_config(hf_config, tensors, **overrides))
        load_weights(model, *mamba_state_dict(tensors, model.config))
        return model.eval()


# ---------------------------------------------------------------------------------------------------
# Released checkpoints: Mamba-1 and Mamba-2 in state-spaces' layout (state-spaces/mamba-130m ... 2.8b,
# mamba2-130m ... 2.7b) and in Hugging Face's (the -hf repos, transformers' Mamba2ForCausalLM), read into this
# file's names. huggingface_hub and safetensors are imported here, only when one is loaded. The readers are
# gpt.py's.


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
    """This file's Config from a Mamba checkpoint: its config.json (a dict: state-spaces' own, d_model and
    ssm_cfg, its ssm_cfg "layer" "Mamba2" for Mamba-2; or Hugging Face's MambaConfig / Mamba2Config,
    model_type "mamba" / "mamba2") and its tensors, whose shapes give the sizes in both layouts; the config
    gives what shapes cannot (the norm, the biases, the tie, Mamba-2's groups). Anything mamba.py cannot
    represent is a ValueError naming it. overrides: the fields it leaves (kernel, block_size, chunk_size)."""
    ssm = hf.get("ssm_cfg") or {}
    state_spaces = hf.get("model_type") is None and "d_model" in hf
    if hf.get("model_type") not in ("mamba", "mamba2") and not state_spaces:
        raise ValueError(f"mamba.py loads Mamba-1 and Mamba-2 checkpoints, not model_type "
                         f"{hf.get('model_type')!r}")
    version = 2 if hf.get("model_type") == "mamba2" or ssm.get("layer") == "Mamba2" else 1

    def size(name, dim):  # a size from a tensor's shape
        if name not in tensors:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        return tensors[name].size(dim)

    mixer = "backbone.layers.0.mixer."  # the same names in both layouts
    C = size(mixer + "in_proj.weight", 1)  # in_proj: (2 Di, d_model) or (2 Di + 2 G N + H, d_model)
    Di = size(mixer + "in_proj.weight", 0) // 2 if version == 1 else size(mixer + "norm.weight", 0)
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
    fields = dict(
        vocab_size=size(mamba_embedding(tensors), 0),  # state-spaces pads the vocabulary (to 8, Mamba-2 16)
        block_size=2048,  # the context the state-spaces models trained at; mamba itself has no limit
        n_layer=hf["n_layer"] if state_spaces else hf["num_hidden_layers"], d_model=C, expand=Di // C,
        d_conv=size(mixer + "conv1d.weight", 2), version=version)  # conv1d: (channels, 1, K)
    if version == 1:
        fields.update(d_state=size(mixer + "A_log", 1), dt_rank=size(mixer + "dt_proj.weight", 1))  # (Di, N)
    else:
        lacks += mamba2_lacks(hf, ssm, state_spaces)
        H = size(mixer + "A_log", 0)  # one A per head
        G = ssm.get("ngroups", 1) if state_spaces else hf.get("n_groups", 1)
        N = (size(mixer + "conv1d.weight", 0) - Di) // (2 * G)  # the conv runs over x, B and C: Di + 2GN
        if size(mixer + "in_proj.weight", 0) != 2 * Di + 2 * G * N + H:
            lacks.append("an in_proj wider than [z, x, B, C, dt] (the MLP branch of d_ssm < d_inner)")
        if size(mixer + "D", 0) != H:
            lacks.append("D per channel (D_has_hdim; mamba.py's Mamba-2 has one D per head)")
        fields.update(d_state=N, headdim=Di // H, ngroups=G)
    if lacks:
        raise ValueError(f"this Mamba checkpoint has what mamba.py cannot represent: {'; '.join(lacks)}")
    return Config(**{**fields, **overrides})


def mamba2_lacks(hf, ssm, state_spaces):
    """What a Mamba-2 config asks for beyond mamba.py's Mixer2 (defaults: the official Mamba2's)."""
    lacks = []
    limit = ssm.get("dt_limit", (0, math.inf)) if state_spaces else hf.get("time_step_limit", (0, math.inf))
    # transformers 5 writes infinity as {"__float__": "Infinity"}
    limit = tuple(float(v["__float__"]) if isinstance(v, dict) else float(v) for v in limit)
    if limit != (0.0, math.inf):
        lacks.append(f"a dt limit {limit} (mamba.py's Mamba-2 does not clamp dt)")
    if not ssm.get("rmsnorm", True) or ssm.get("norm_before_gate") or hf.get("norm_before_gate"):
        lacks.append("no gated RMSNorm, or the norm before the gate (mamba.py's: RMSNorm(y * SiLU(z)))")
    return lacks


def mamba_embedding(tensors):
    """The embedding's name: Hugging Face's layout says embeddings, state-spaces' embedding."""
    hf = "backbone.embeddings.weight"
    return hf if hf in tensors else "backbone.embedding.weight"


def mamba_state_dict(tensors, config):
    """This file's state_dict from the tensors of a Mamba checkpoint (state-spaces' or Hugging Face's names,
    the same but for the embedding), and the tensors left over. The conv's taps come as nn.Conv1d keeps them,
    (channels, 1, K), and go in as (K, channels); Mamba-1's dt_proj bias is dt_bias here."""
    Di = config.expand * config.d_model
    channels = Di if config.version == 1 else Di + 2 * config.ngroups * config.d_state
    own = ("in_proj.weight", "A_log", "D", "out_proj.weight") + \
        (("x_proj.weight", "dt_proj.weight") if config.version == 1 else ("dt_bias", "norm.weight"))
    sd = {"wte.weight": take(tensors, mamba_embedding(tensors))}
    for i in range(config.n_layer):
        hf, ours = f"backbone.layers.{i}.", f"blocks.{i}."
        sd[ours + "norm.weight"] = take(tensors, hf + "norm.weight")
        for name in own:
            sd[ours + "mixer." + name] = take(tensors, hf + "mixer." + name)
        sd[ours + "mixer.conv_weight"] = take(tensors, hf + "mixer.conv1d.weight")[:, 0].t()  # (K, channels)
        bias = hf + "mixer.conv1d.bias"  # use_conv_bias=False saves none: the same as zeros
        sd[ours + "mixer.conv_bias"] = take(tensors, bias) if bias in tensors else torch.zeros(channels)
        if config.version == 1:
            sd[ours + "mixer.dt_bias"] = take(tensors, hf + "mixer.dt_proj.bias")
    sd["norm_f.weight"] = take(tensors, "backbone.norm_f.weight")
    sd["lm_head.weight"] = head_weight(tensors, sd["wte.weight"], tied=True)
    return sd, tensors

# ---------------------------------------------------------------------------------------------------
# Self-check: `python mamba.py` holds each fast path to its reference (selective_scan_ref, ssd_ref), output,
# last state and every gradient, on ragged shapes (37 steps: no multiple of the chunk; 40 channels, 5 states,
# heads of 3: no power of two). `TRITON_INTERPRET=1 python mamba.py` adds the Triton paths on a CPU.

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

    # Mamba-2: 4 heads of 3 channels in 2 groups of B, C with 5 states; a state going in and coming out
    x, dy = (torch.randn(2, 37, 4, 3, device=device) for _ in range(2))  # (b, T, H, P)
    B, C = (torch.randn(2, 37, 2, 5, device=device) for _ in range(2))  # (b, T, G, N)
    h0, dh = (torch.randn(2, 4, 3, 5, device=device) for _ in range(2))  # (b, H, P, N)
    dt = F.softplus(torch.randn(2, 37, 4, device=device) - 1)  # (b, T, H)
    inputs = [x, dt, -3 * torch.rand(4, device=device) - 0.5, B, C, torch.randn(4, device=device), h0]
    want = run(ssd_ref, *(t.double() for t in inputs))
    for kernel in ["torch"] + ["triton"] * has_triton:
        got = run(lambda *a: ssd(*a, kernel=kernel, chunk_size=16), *inputs)
        error = max((g.double() - w).abs().max().item() for g, w in zip(got, want))
        print(f"ssd(kernel={kernel!r}) vs ssd_ref, output, state and gradients: max |difference| {error:.1e}")
