"""
The tests that grade the classroom exercises (exercises/README.md is the sheet). Each carries the marker of
its exercise, so a student runs one at a time:

    python -m pytest --models-dir handout -m ex_rope

Each test calls its exercise's own function, through load_model, and nothing else that an exercise blanks:
what it compares with is written here (an oracle in fp64, in plain loops or einsum) or is a property (the
same answer for every block size, lengths that are no multiple of a block, huge logits, gradients equal to
autograd's through the oracle, a sequence in two pieces equal to one). A failure names its property first.
On the reference files every test passes; tests/test_handout.py checks that each blanked exercise fails
all of its own tests and none of the others'.
"""
import math

import pytest
import torch

from conftest import seeded

ex = pytest.mark


def check(got, want, prop, atol=1e-6, rtol=1e-5):
    """Assert got == want within tolerance, naming the property that failed and by how much."""
    if isinstance(got, (tuple, list)):
        for i, (g, w) in enumerate(zip(got, want)):
            check(g, w, f"{prop} (output {i})", atol, rtol)
        return
    assert got is not None, f"{prop}: got None"
    assert got.shape == want.shape, f"{prop}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    got, want = got.detach().double(), want.detach().double()
    assert torch.isfinite(got).all(), f"{prop}: the result has inf or NaN"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    close = torch.allclose(got, want, atol=atol, rtol=rtol)  # a bool: pytest then prints no tensors
    assert close, f"{prop}: max |difference| {err:.2e}"


def randn(*shape, seed=0, dtype=torch.float64, scale=1.0):
    return torch.randn(*shape, generator=seeded(seed), dtype=dtype) * scale


def rand(*shape, seed=0, lo=0.0, hi=1.0, dtype=torch.float64):
    return lo + (hi - lo) * torch.rand(*shape, generator=seeded(seed), dtype=dtype)


def grads(f, *inputs, seed=99):
    """The output of f and the gradients of a fixed random weighting of it, for every input."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = f(*inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    loss = sum((o * randn(*o.shape, seed=seed + i).to(o.dtype)).sum() for i, o in enumerate(outs))
    gs = torch.autograd.grad(loss, inputs)
    return [o.detach() for o in outs], list(gs)


# ---------------------------------------------------------------------------------------------------
# gpt.py


def rope_oracle(x, positions, theta):
    """Rotate each channel pair (x_2j, x_2j+1) of x (..., T, D) by positions[t] * theta^(-2j/D), in fp64."""
    D = x.size(-1)
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = positions.double()[:, None] * freqs  # (T, D/2)
    x0, x1 = x.double()[..., 0::2], x.double()[..., 1::2]
    out = torch.stack([x0 * angle.cos() - x1 * angle.sin(), x0 * angle.sin() + x1 * angle.cos()], dim=-1)
    return out.flatten(-2)


def rope(gpt, x, positions, theta=10000.0):
    return gpt.apply_rope(x, gpt.rope_angles(positions, x.size(-1), theta))


@ex.ex_rope
def test_rope_rotates_pairs(load_model):
    gpt = load_model("gpt")
    x = randn(2, 3, 7, 16, dtype=torch.float32)
    for positions in (torch.arange(7), torch.tensor([0, 1, 5, 100, 999, 3000, 7])):
        check(rope(gpt, x, positions), rope_oracle(x, positions, 10000.0),
              "rotation: each pair (x_2j, x_2j+1) turns by n * theta^(-2j/D)", atol=2e-3, rtol=1e-3)
    check(rope(gpt, x, torch.arange(7), theta=500.0), rope_oracle(x, torch.arange(7), 500.0),
          "rotation with another theta", atol=1e-4, rtol=1e-4)


@ex.ex_rope
def test_rope_scores_depend_on_distance_only(load_model):
    gpt = load_model("gpt")
    q, k = randn(1, 2, 1, 32, seed=1, dtype=torch.float32), randn(1, 2, 1, 32, seed=2, dtype=torch.float32)
    score = lambda m, n: (rope(gpt, q, torch.tensor([m])) * rope(gpt, k, torch.tensor([n]))).sum(-1)
    for shift in (1, 17, 250):
        check(score(9 + shift, 4 + shift), score(9, 4),
              "relative position: q_m . k_n is unchanged when m and n move together", atol=1e-3, rtol=1e-3)
    assert not torch.allclose(score(9, 4), score(9, 5), atol=1e-3), \
        "relative position: q_m . k_n must change with the distance m - n"


@ex.ex_rope
def test_rope_keeps_norms_dtype_and_position_zero(load_model):
    gpt = load_model("gpt")
    x = randn(2, 2, 5, 8, seed=3, dtype=torch.float32)
    y = rope(gpt, x, torch.arange(5))
    pairs = lambda z: z.double().unflatten(-1, (-1, 2)).norm(dim=-1)
    check(pairs(y), pairs(x), "a rotation keeps each pair's length", atol=1e-5)
    check(rope(gpt, x, torch.zeros(5, dtype=torch.long)), x, "position 0 is no rotation")
    xb = x.bfloat16()
    assert rope(gpt, xb, torch.arange(5)).dtype == torch.bfloat16, "dtype: bf16 in, bf16 out"


def attention_oracle(q, k, v):
    """softmax(q k^T / sqrt(D)) v under the causal mask, the queries being the last Tq of Tk positions; kv
    heads repeated for grouped-query attention. fp64, max-subtracted."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    Tq, Tk = q.size(2), k.size(2)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    i, j = torch.arange(Tq)[:, None] + Tk - Tq, torch.arange(Tk)[None, :]
    s = s.masked_fill(j > i, -math.inf)
    p = (s - s.amax(-1, keepdim=True)).exp()
    return (p / p.sum(-1, keepdim=True)) @ v


def qkv(B, H, Hkv, Tq, Tk, D, seed=0, dtype=torch.float64, scale=1.0):
    return (randn(B, H, Tq, D, seed=seed, dtype=dtype, scale=scale), randn(B, Hkv, Tk, D, seed=seed + 1,
            dtype=dtype), randn(B, Hkv, Tk, D, seed=seed + 2, dtype=dtype))


@ex.ex_causal_attention
def test_causal_attention_matches_softmax(load_model):
    gpt = load_model("gpt")
    for shape in [(2, 2, 2, 9, 9, 8), (1, 4, 2, 9, 9, 8), (1, 4, 1, 3, 11, 8), (1, 2, 2, 1, 6, 8)]:
        q, k, v = qkv(*shape)
        check(gpt.attention_ref(q, k, v), attention_oracle(q, k, v),
              f"causal softmax attention, (B, H, Hkv, Tq, Tk, D) = {shape} (GQA; Tq < Tk: the last queries)")


@ex.ex_causal_attention
def test_causal_attention_ignores_the_future(load_model):
    gpt = load_model("gpt")
    q, k, v = qkv(1, 2, 2, 10, 10, 8)
    y = gpt.attention_ref(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 6:] += 5 * randn(1, 2, 4, 8, seed=7)
    v2[:, :, 6:] += 5 * randn(1, 2, 4, 8, seed=8)
    check(gpt.attention_ref(q, k2, v2)[:, :, :6], y[:, :, :6],
          "causality: keys and values after position t never change output t")


@ex.ex_causal_attention
def test_causal_attention_large_logits_and_gradients(load_model):
    gpt = load_model("gpt")
    q, k, v = qkv(1, 2, 1, 7, 7, 8, scale=300.0, dtype=torch.float32)  # logits in the thousands
    check(gpt.attention_ref(q, k, v), attention_oracle(q, k, v), "large logits: no overflow", atol=1e-4)
    q, k, v = qkv(1, 4, 2, 6, 6, 8, seed=3)
    got = grads(gpt.attention_ref, q, k, v)
    want = grads(attention_oracle, q, k, v)
    check(got[1], want[1], "gradients equal autograd's through the softmax")


def attention_triton(gpt, q, k, v):
    return gpt.attention(q, k, v, kernel="triton")


@ex.ex_attention_kernel
def test_attention_kernel_forward(load_model):
    gpt = load_model("gpt")
    for shape in [(1, 2, 1, 70, 70, 16), (1, 2, 2, 3, 70, 16), (1, 2, 1, 5, 5, 24)]:
        q, k, v = qkv(*shape, dtype=torch.float32)
        check(attention_triton(gpt, q, k, v), attention_oracle(q, k, v),
              f"forward equals softmax attention, (B, H, Hkv, Tq, Tk, D) = {shape} (ragged: 70 keys are two "
              f"tiles of 64, the last one partly masked; D = 24 padded to 32)", atol=1e-4, rtol=1e-4)


@ex.ex_attention_kernel
def test_attention_kernel_block_sizes_and_large_logits(load_model, monkeypatch):
    gpt = load_model("gpt")
    q, k, v = qkv(1, 2, 1, 40, 40, 16, seed=4, dtype=torch.float32, scale=30.0)  # logits in the hundreds
    want = attention_oracle(q, k, v)
    check(attention_triton(gpt, q, k, v), want, "large logits: the online softmax rescales, never overflows",
          atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(gpt, "block_sizes", lambda Tq, D, dtype: (16, 16, 16))
    check(attention_triton(gpt, q, k, v), want,
          "block-size invariance: 16 x 16 tiles (three key tiles, the last ragged) give the same answer",
          atol=1e-4, rtol=1e-4)


@ex.ex_attention_kernel
def test_attention_kernel_saves_the_logsumexp(load_model):
    gpt = load_model("gpt")
    q, k, v = qkv(1, 2, 1, 20, 20, 16, seed=5, dtype=torch.float32)
    got = grads(lambda *x: attention_triton(gpt, *x), q, k, v)
    want = grads(attention_oracle, q, k, v)
    check(got[1], want[1], "gradients: the backward kernels read the forward's log-sum-exp, which must be "
          "each row's m_i + log2(l_i)", atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# mamba.py


def scan_inputs(b=2, T=13, Di=6, N=4, seed=0, dtype=torch.float64):
    x = randn(b, T, Di, seed=seed, dtype=dtype)
    dt = rand(b, T, Di, seed=seed + 1, lo=0.01, hi=0.5, dtype=dtype)
    A = -rand(Di, N, seed=seed + 2, lo=0.5, hi=4.0, dtype=dtype)
    B, C = randn(b, T, N, seed=seed + 3, dtype=dtype), randn(b, T, N, seed=seed + 4, dtype=dtype)
    D = randn(Di, seed=seed + 5, dtype=dtype)
    z = randn(b, T, Di, seed=seed + 6, dtype=dtype)
    h0 = randn(b, Di, N, seed=seed + 7, dtype=dtype)
    return x, dt, A, B, C, D, z, h0


def scan_oracle(x, dt, A, B, C, D, z=None, h0=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t per (channel d, state n); y_t = C_t . h_t + D x_t, gated by
    SiLU(z). fp64, the state as an explicit (b, Di, N) einsum."""
    x, dt, A, B, C, D = (t.double() for t in (x, dt, A, B, C, D))
    b, T, Di = x.shape
    h = torch.zeros(b, Di, A.size(1), dtype=torch.float64) if h0 is None else h0.double()
    ys = []
    for t in range(T):
        h = torch.exp(torch.einsum("bd,dn->bdn", dt[:, t], A)) * h \
            + torch.einsum("bd,bn->bdn", dt[:, t] * x[:, t], B[:, t])
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]) + D * x[:, t])
    y = torch.stack(ys, 1)
    if z is not None:
        y = y * z.double() * torch.sigmoid(z.double())
    return y, h


@ex.ex_selective_scan
def test_selective_scan_recurrence(load_model):
    mamba = load_model("mamba")
    x, dt, A, B, C, D, z, h0 = scan_inputs()
    check(mamba.selective_scan_ref(x, dt, A, B, C, D), scan_oracle(x, dt, A, B, C, D),
          "recurrence h_t = exp(dt A) h_{t-1} + dt B x, y = C.h + D x: (y, last h) from h = 0")
    check(mamba.selective_scan_ref(x, dt, A, B, C, D, z, h0), scan_oracle(x, dt, A, B, C, D, z, h0),
          "the gate y * SiLU(z), from a given h0")


@ex.ex_selective_scan
def test_selective_scan_state_carries_over(load_model):
    mamba = load_model("mamba")
    x, dt, A, B, C, D, z, h0 = scan_inputs(seed=10)
    y, h = mamba.selective_scan_ref(x, dt, A, B, C, D, z, h0)
    y1, h1 = mamba.selective_scan_ref(x[:, :5], dt[:, :5], A, B[:, :5], C[:, :5], D, z[:, :5], h0)
    y2, h2 = mamba.selective_scan_ref(x[:, 5:], dt[:, 5:], A, B[:, 5:], C[:, 5:], D, z[:, 5:], h1)
    check((torch.cat([y1, y2], 1), h2), (y, h), "two pieces, the state carried, equal one sequence")


@ex.ex_selective_scan
def test_selective_scan_dt_zero_keeps_the_state(load_model):
    mamba = load_model("mamba")
    x, dt, A, B, C, D, z, h0 = scan_inputs(T=4, seed=20)
    dt = torch.zeros_like(dt)
    y, h = mamba.selective_scan_ref(x, dt, A, B, C, D, None, h0)
    check(h, h0, "selectivity: dt = 0 lets nothing in and forgets nothing")
    check(y, torch.einsum("bdn,btn->btd", h0, C) + D * x, "with dt = 0, y_t = C_t . h0 + D x_t")


@ex.ex_chunked_scan
def test_chunked_scan_every_chunk_size(load_model):
    mamba = load_model("mamba")
    x, dt, A, B, C, D, z, h0 = scan_inputs(T=13, seed=30, dtype=torch.float32)
    want = scan_oracle(x, dt, A, B, C, D, z, h0)
    for Q in (1, 3, 8, 13, 64):
        check(mamba.selective_scan(x, dt, A, B, C, D, z, h0, kernel="torch", chunk_size=Q), want,
              f"block-size invariance: chunk_size={Q} on 13 steps (a short last chunk) gives the recurrence",
              atol=1e-4, rtol=1e-4)
    check(mamba.selective_scan(x, dt, A, B, C, D, kernel="torch", chunk_size=4),
          scan_oracle(x, dt, A, B, C, D), "from h = 0, without a gate", atol=1e-4, rtol=1e-4)


@ex.ex_chunked_scan
def test_chunked_scan_gradients(load_model):
    mamba = load_model("mamba")
    x, dt, A, B, C, D, z, h0 = scan_inputs(T=11, seed=40, dtype=torch.float32)
    f = lambda x, dt, A, B, C, h0: mamba.selective_scan(x, dt, A, B, C, D, z, h0, kernel="torch",
                                                         chunk_size=4)
    g = lambda x, dt, A, B, C, h0: scan_oracle(x, dt, A, B, C, D, z, h0)
    got, want = grads(f, x, dt, A, B, C, h0), grads(g, x, dt, A, B, C, h0)
    for name, a, b in zip(["x", "dt", "A", "B", "C", "h0"], got[1], want[1]):
        check(a, b, f"gradients through the saved chunk states equal autograd's: d{name}", atol=1e-3,
              rtol=1e-3)


def triton_scan_inputs(seed):
    # Di = 24 and N = 12: no power of two, so the kernel's tiles (32, 16) are masked
    return scan_inputs(b=2, T=11, Di=24, N=12, seed=seed, dtype=torch.float32)


@ex.ex_scan_kernel
def test_scan_kernel_forward(load_model):
    mamba = load_model("mamba")
    x, dt, A, B, C, D, z, h0 = triton_scan_inputs(50)
    for Q in (4, 16):
        check(mamba.selective_scan(x, dt, A, B, C, D, z, h0, kernel="triton", chunk_size=Q),
              scan_oracle(x, dt, A, B, C, D, z, h0),
              f"forward equals the recurrence, chunk_size={Q} (11 steps: a short last chunk; Di = 24, N = 12 "
              f"masked in tiles of 32 x 16)", atol=1e-4, rtol=1e-4)
    check(mamba.selective_scan(x, dt, A, B, C, D, kernel="triton", chunk_size=4),
          scan_oracle(x, dt, A, B, C, D), "no gate, h0 = 0", atol=1e-4, rtol=1e-4)


@ex.ex_scan_kernel
def test_scan_kernel_saves_chunk_states(load_model):
    mamba = load_model("mamba")
    x, dt, A, B, C, D, z, h0 = triton_scan_inputs(60)
    f = lambda x, dt, B, C, h0: mamba.selective_scan(x, dt, A, B, C, D, z, h0, kernel="triton", chunk_size=4)
    g = lambda x, dt, B, C, h0: scan_oracle(x, dt, A, B, C, D, z, h0)
    got, want = grads(f, x, dt, B, C, h0), grads(g, x, dt, B, C, h0)
    for name, a, b in zip(["x", "dt", "B", "C", "h0"], got[1], want[1]):
        check(a, b, f"gradients: the backward kernel starts each chunk from the state the forward stored "
              f"in hs (and the last state after them): d{name}", atol=1e-3, rtol=1e-3)


def ssd_inputs(b=2, T=13, H=4, P=3, G=2, N=5, seed=0, dtype=torch.float64, a_lo=0.05, a_hi=1.5):
    """Mamba-2's SSD inputs: two groups of B and C, each read by two heads; dt A in [-a_hi, -a_lo] a step."""
    x = randn(b, T, H, P, seed=seed, dtype=dtype)
    dt = rand(b, T, H, seed=seed + 1, lo=0.1, hi=1.0, dtype=dtype)
    A = -rand(H, seed=seed + 2, lo=a_lo, hi=a_hi, dtype=dtype)
    B, C = randn(b, T, G, N, seed=seed + 3, dtype=dtype), randn(b, T, G, N, seed=seed + 4, dtype=dtype)
    D = randn(H, seed=seed + 5, dtype=dtype)
    h0 = randn(b, H, P, N, seed=seed + 6, dtype=dtype)
    return x, dt, A, B, C, D, h0


def ssd_oracle(mamba, *inputs):
    """mamba.ssd_ref (given, never a hole: the recurrence a token at a time) in fp64."""
    return mamba.ssd_ref(*(t.double() for t in inputs))


@ex.ex_ssd_chunked
def test_ssd_chunked_every_chunk_size(load_model):
    mamba = load_model("mamba")
    x, dt, A, B, C, D, h0 = ssd_inputs()
    want = ssd_oracle(mamba, x, dt, A, B, C, D, h0)
    for Q in (1, 4, 8, 13, 64):
        check(mamba.ssd(x, dt, A, B, C, D, h0, kernel="torch", chunk_size=Q), want,
              f"block-size invariance: chunk_size={Q} on 13 steps (a short last chunk) gives the recurrence",
              atol=1e-9, rtol=1e-9)
    check(mamba.ssd(x, dt, A, B, C, D, kernel="torch", chunk_size=4), ssd_oracle(mamba, x, dt, A, B, C, D),
          "from h0 = None, a zero state", atol=1e-9, rtol=1e-9)


@ex.ex_ssd_chunked
def test_ssd_chunked_state_carries_over(load_model):
    mamba = load_model("mamba")
    x, dt, A, B, C, D, h0 = ssd_inputs(seed=10)
    y, h = mamba.ssd(x, dt, A, B, C, D, h0, kernel="torch", chunk_size=4)
    y1, h1 = mamba.ssd(x[:, :6], dt[:, :6], A, B[:, :6], C[:, :6], D, h0, kernel="torch", chunk_size=4)
    y2, h2 = mamba.ssd(x[:, 6:], dt[:, 6:], A, B[:, 6:], C[:, 6:], D, h1, kernel="torch", chunk_size=4)
    check((torch.cat([y1, y2], 1), h2), (y, h), "two pieces, the last state carried, equal one sequence",
          atol=1e-9, rtol=1e-9)


@ex.ex_ssd_chunked
def test_ssd_chunked_gradients(load_model):
    mamba = load_model("mamba")
    inputs = ssd_inputs(T=11, seed=20)
    got = grads(lambda *a: mamba.ssd(*a, kernel="torch", chunk_size=4), *inputs)
    want = grads(lambda *a: ssd_oracle(mamba, *a), *inputs)
    for name, a, b in zip(["x", "dt", "A", "B", "C", "D", "h0"], got[1], want[1]):
        check(a, b, f"gradients equal autograd's through the recurrence: d{name}", atol=1e-8, rtol=1e-8)


@ex.ex_ssd_chunked
def test_ssd_chunked_strong_decay_stays_finite(load_model):
    """fp32, chunks of 64 steps decaying by up to e^-8 each: the decay across a chunk, about e^-200, is below
    fp32's smallest number, so a ratio of exps exp(a_cs_l) / exp(a_cs_s) is 0 / 0. Sums of the a's in the
    exponent (segsum) are not."""
    mamba = load_model("mamba")
    x, dt, A, B, C, D, h0 = ssd_inputs(b=1, T=200, G=1, H=2, seed=30, dtype=torch.float32, a_lo=4.0, a_hi=8.0)
    want = ssd_oracle(mamba, x, dt, A, B, C, D, h0)
    check(mamba.ssd(x, dt, A, B, C, D, h0, kernel="torch", chunk_size=64), want,
          "strong decay in fp32 (chunks of 64): finite, and the recurrence", atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# rwkv.py


def wkv_inputs(B=2, T=7, H=2, N=8, seed=0, dtype=torch.float64):
    """Inputs as TimeMix makes them: w in (0.545, 1), a = -kk and b = kk * alpha for a unit kk."""
    r, k, v = (randn(B, T, H, N, seed=seed + i, dtype=dtype) for i in range(3))
    w = rand(B, T, H, N, seed=seed + 3, lo=0.55, hi=1.0, dtype=dtype)
    kk = torch.nn.functional.normalize(randn(B, T, H, N, seed=seed + 4, dtype=dtype), dim=-1)
    alpha = rand(B, T, H, N, seed=seed + 5, dtype=dtype)
    S0 = randn(B, H, N, N, seed=seed + 6, dtype=dtype, scale=0.5)
    return r, w, k, v, -kk, kk * alpha, S0


def wkv_oracle(r, w, k, v, a, b, S):
    """S[i, j] <- S[i, j] w[j] + (sum_l S[i, l] a[l]) b[j] + v[i] k[j]; y[i] = sum_j S[i, j] r[j]. fp64."""
    r, w, k, v, a, b = (t.double() for t in (r, w, k, v, a, b))
    B, _, H, N = r.shape
    S = torch.zeros(B, H, N, N, dtype=torch.float64) if S is None else S.double()
    ys = []
    for t in range(r.size(1)):
        sa = torch.einsum("bhil,bhl->bhi", S, a[:, t])
        S = S * w[:, t, :, None, :] + torch.einsum("bhi,bhj->bhij", sa, b[:, t]) \
            + torch.einsum("bhi,bhj->bhij", v[:, t], k[:, t])
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
    return torch.stack(ys, 1), S


@ex.ex_wkv7_step
def test_wkv7_step_matches_the_update(load_model):
    rwkv = load_model("rwkv")
    r, w, k, v, a, b, S0 = wkv_inputs()
    check(rwkv.wkv7_ref(r, w, k, v, a, b, S0), wkv_oracle(r, w, k, v, a, b, S0),
          "S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T, y_t = S_t r_t: (y, final S)")
    zero = torch.zeros_like(S0)
    check(rwkv.wkv7_ref(r, w, k, v, a, b, zero), wkv_oracle(r, w, k, v, a, b, zero), "from an empty state")


@ex.ex_wkv7_step
def test_wkv7_step_without_the_delta_rule(load_model):
    rwkv = load_model("rwkv")
    r, w, k, v, a, b, S0 = wkv_inputs(seed=10)
    y, _ = rwkv.wkv7_ref(r, w, k, v, 0 * a, 0 * b, torch.zeros_like(S0))
    T = r.size(1)
    want = torch.zeros_like(y)
    for t in range(T):  # decayed linear attention: y_t = sum_s v_s (k_s * w_{s+1} ... w_t) . r_t
        for s in range(t + 1):
            decay = torch.prod(w[:, s + 1:t + 1], dim=1) if s < t else torch.ones_like(w[:, 0])
            want[:, t] += v[:, s] * (k[:, s] * decay * r[:, t]).sum(-1, keepdim=True)
    check(y, want, "a = b = 0: decayed linear attention, each key channel decayed by its w")


@ex.ex_wkv7_step
def test_wkv7_step_delta_rule_overwrites(load_model):
    rwkv = load_model("rwkv")
    B, H, N = 1, 1, 8
    kk = torch.nn.functional.normalize(randn(B, 1, H, N, seed=20), dim=-1)
    v_old, v_new = randn(B, 1, H, N, seed=21), randn(B, 1, H, N, seed=22)
    S0 = torch.einsum("bhi,bhj->bhij", v_old[:, 0], kk[:, 0])  # the state recalls v_old for the key kk
    ones = torch.ones_like(kk)
    y, S = rwkv.wkv7_ref(kk, ones, kk, v_new, -kk, kk, S0)  # w = 1, alpha = 1: write v_new under kk
    check(y, v_new, "the delta rule: writing v under a key kk that held v_old recalls v, not v_old + v")


@ex.ex_wkv7_step
def test_wkv7_step_state_carries_over(load_model):
    rwkv = load_model("rwkv")
    r, w, k, v, a, b, S0 = wkv_inputs(seed=30)
    y, S = rwkv.wkv7_ref(r, w, k, v, a, b, S0)
    y1, S1 = rwkv.wkv7_ref(*(t[:, :3] for t in (r, w, k, v, a, b)), S0)
    y2, S2 = rwkv.wkv7_ref(*(t[:, 3:] for t in (r, w, k, v, a, b)), S1)
    check((torch.cat([y1, y2], 1), S2), (y, S), "two pieces, the state carried, equal one sequence")


@ex.ex_wkv7_chunked
def test_wkv7_chunked_every_chunk_size(load_model):
    rwkv = load_model("rwkv")
    r, w, k, v, a, b, S0 = wkv_inputs(T=21, seed=40)
    want = wkv_oracle(r, w, k, v, a, b, S0)
    for L in (1, 4, 7, 16, 64):
        check(rwkv.wkv7_chunked(r, w, k, v, a, b, S0, chunk_size=L), want,
              f"block-size invariance: chunk_size={L} on 21 tokens (padded or short chunks) gives the "
              f"recurrence")


@ex.ex_wkv7_chunked
def test_wkv7_chunked_from_empty(load_model):
    rwkv = load_model("rwkv")
    r, w, k, v, a, b, _ = wkv_inputs(T=9, seed=50)
    want = wkv_oracle(r, w, k, v, a, b, None)
    for L in (16, 4):
        check(rwkv.wkv7_chunked(r, w, k, v, a, b, None, chunk_size=L), want,
              f"state=None (zeros), chunk_size={L}: one chunk and several")


@ex.ex_wkv7_chunked
def test_wkv7_chunked_gradients(load_model):
    rwkv = load_model("rwkv")
    r, w, k, v, a, b, S0 = wkv_inputs(T=10, seed=60)
    got = grads(lambda *x: rwkv.wkv7_chunked(*x, chunk_size=4), r, w, k, v, a, b, S0)
    want = grads(wkv_oracle, r, w, k, v, a, b, S0)
    for name, g, h in zip("r w k v a b S0".split(), got[1], want[1]):
        check(g, h, f"gradients equal autograd's through the recurrence: d{name}", atol=1e-6, rtol=1e-5)


@ex.ex_wkv7_kernel
def test_wkv7_kernel_forward(load_model):
    rwkv = load_model("rwkv")
    r, w, k, v, a, b, S0 = wkv_inputs(B=1, T=37, H=2, N=16, seed=70, dtype=torch.float32)
    check(rwkv.wkv7(r, w, k, v, a, b, S0, kernel="triton"), wkv_oracle(r, w, k, v, a, b, S0),
          "forward equals the recurrence: (y, final S), 37 tokens (no multiple of SAVE_EVERY = 16)",
          atol=1e-4, rtol=1e-4)
    check(rwkv.wkv7(r, w, k, v, a, b, None, kernel="triton"), wkv_oracle(r, w, k, v, a, b, None),
          "from state=None", atol=1e-4, rtol=1e-4)


@ex.ex_wkv7_kernel
def test_wkv7_kernel_saves_what_the_backward_reads(load_model):
    rwkv = load_model("rwkv")
    r, w, k, v, a, b, S0 = wkv_inputs(B=1, T=37, H=2, N=16, seed=80, dtype=torch.float32)
    got = grads(lambda *x: rwkv.wkv7(*x, kernel="triton"), r, w, k, v, a, b, S0)
    want = grads(wkv_oracle, r, w, k, v, a, b, S0)
    for name, g, h in zip("r w k v a b S0".split(), got[1], want[1]):
        check(g, h, f"gradients: the backward kernel reads S a of every token (sa) and the state before "
              f"every 16th token (ckpt) from the forward: d{name}", atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------
# retnet.py


def retention_inputs(B=2, H=3, T=19, dk=4, dv=8, seed=0, dtype=torch.float64):
    q, k = randn(B, H, T, dk, seed=seed, dtype=dtype), randn(B, H, T, dk, seed=seed + 1, dtype=dtype)
    v = randn(B, H, T, dv, seed=seed + 2, dtype=dtype)
    gamma = torch.tensor([0.97, 0.8, 0.5][:H] + [0.9] * max(0, H - 3), dtype=dtype)
    S0 = randn(B, H, dk, dv, seed=seed + 3, dtype=dtype)
    return q, k, v, gamma, S0


def retention_oracle(q, k, v, gamma, S0=None):
    """o_n = q_n (gamma^(n+1) S0 + sum_{m<=n} gamma^(n-m) k_m^T v_m) and the state after T, per head, from the
    closed form (no recurrence). fp64."""
    q, k, v, gamma = q.double(), k.double(), v.double(), gamma.double()
    T = q.size(2)
    n = torch.arange(T, dtype=torch.float64)
    g = gamma[:, None, None]
    Dm = torch.where(n[:, None] >= n[None, :], g ** (n[:, None] - n[None, :]).clamp(min=0), 0.0)  # (H, T, T)
    o = (q @ k.transpose(-1, -2) * Dm) @ v
    S = torch.einsum("hm,bhmk,bhmv->bhkv", gamma[:, None] ** (T - 1 - n), k, v)  # (B, H, dk, dv)
    if S0 is not None:
        S0 = S0.double()
        o = o + (q @ S0) * (gamma[:, None] ** (n + 1))[None, :, :, None]
        S = S + gamma[None, :, None, None] ** T * S0
    return o, S


@ex.ex_retention_recurrent
def test_retention_recurrent_matches_the_closed_form(load_model):
    retnet = load_model("retnet")
    q, k, v, gamma, S0 = retention_inputs()
    check(retnet.retention_ref(q, k, v, gamma), retention_oracle(q, k, v, gamma),
          "S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n: (o, S_T) from S = 0, a gamma per head")
    check(retnet.retention_ref(q, k, v, gamma, S0), retention_oracle(q, k, v, gamma, S0),
          "from a given state")


@ex.ex_retention_recurrent
def test_retention_recurrent_one_token_at_a_time(load_model):
    retnet = load_model("retnet")
    q, k, v, gamma, S0 = retention_inputs(T=6, seed=10)
    o, S = retnet.retention_ref(q, k, v, gamma, S0)
    outs, state = [], S0
    for n in range(6):  # decoding: one position per call, the state carried
        o_n, state = retnet.retention_ref(q[:, :, n:n + 1], k[:, :, n:n + 1], v[:, :, n:n + 1], gamma, state)
        outs.append(o_n)
    check((torch.cat(outs, 2), state), (o, S),
          "step by step (T = 1 each, the state carried) equals the whole")


@ex.ex_retention_chunkwise
def test_retention_chunkwise_every_chunk_size(load_model):
    retnet = load_model("retnet")
    q, k, v, gamma, S0 = retention_inputs(seed=20)
    for L in (1, 4, 7, 19, 64):
        check(retnet.retention_chunkwise(q, k, v, gamma, S0, chunk_size=L),
              retention_oracle(q, k, v, gamma, S0),
              f"block-size invariance: chunk_size={L} on 19 positions (a short last chunk), from a state")
    check(retnet.retention_chunkwise(q, k, v, gamma, None, chunk_size=5), retention_oracle(q, k, v, gamma),
          "state=None (zeros), chunk_size=5")


@ex.ex_retention_chunkwise
def test_retention_chunkwise_gradients(load_model):
    retnet = load_model("retnet")
    q, k, v, gamma, S0 = retention_inputs(T=11, seed=30)
    got = grads(lambda q, k, v, S0: retnet.retention_chunkwise(q, k, v, gamma, S0, chunk_size=4), q, k, v, S0)
    want = grads(lambda q, k, v, S0: retention_oracle(q, k, v, gamma, S0), q, k, v, S0)
    for name, g, h in zip(["q", "k", "v", "state"], got[1], want[1]):
        check(g, h, f"gradients equal autograd's through the closed form: d{name}")


@ex.ex_retention_kernel
def test_retention_kernel_forward(load_model):
    retnet = load_model("retnet")
    q, k, v, gamma, S0 = retention_inputs(B=1, H=2, T=37, dk=16, dv=32, seed=40, dtype=torch.float32)
    want = retention_oracle(q, k, v, gamma, S0)
    for L in (16, 32):
        check(retnet.retention(q, k, v, gamma, S0, kernel="triton", chunk_size=L), want,
              f"block-size invariance: the kernel's output with chunks of {L} (37 positions: a ragged last "
              f"chunk) equals the closed form", atol=1e-3, rtol=1e-4)
    check(retnet.retention(q, k, v, gamma, None, kernel="triton", chunk_size=16),
          retention_oracle(q, k, v, gamma), "from state=None", atol=1e-3, rtol=1e-4)


@ex.ex_retention_kernel
def test_retention_kernel_odd_value_dim(load_model):
    retnet = load_model("retnet")
    q, k, v, gamma, S0 = retention_inputs(B=1, H=1, T=20, dk=8, dv=24, seed=50, dtype=torch.float32)
    check(retnet.retention(q, k, v, gamma, S0, kernel="triton", chunk_size=16),
          retention_oracle(q, k, v, gamma, S0), "masks: dk = 8 and dv = 24 in tiles of 16 and 32",
          atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# moe.py


def experts_oracle(x, expert_ids, gates, weights):
    """Every expert on every token, weighted by a dense (M, E) gate matrix that is zero where the token did
    not pick the expert: the sparse sum, computed densely. fp64."""
    w_fc, w_proj = (w.double() for w in weights)
    x = x.double()
    E = w_fc.size(0)
    G = torch.zeros(x.size(0), E, dtype=torch.float64).scatter_add(1, expert_ids, gates.double())  # (M, E)
    h = torch.einsum("mc,ech->meh", x, w_fc)  # (M, E, 2h)
    gate, up = h.chunk(2, dim=-1)
    y = torch.einsum("meh,ehc->mec", torch.nn.functional.silu(gate) * up, w_proj)  # (M, E, C)
    return (G[..., None] * y).sum(1)


def expert_inputs(M=9, C=6, E=4, h=5, k=2, seed=0, ids=None):
    x = randn(M, C, seed=seed)
    logits = randn(M, E, seed=seed + 1)
    if ids is None:
        ids = logits.topk(k, dim=-1).indices
    gates = rand(M, ids.size(1), seed=seed + 2, lo=0.1, hi=1.0)
    weights = (randn(E, C, 2 * h, seed=seed + 3, scale=0.5), randn(E, h, C, seed=seed + 4, scale=0.5))
    return x, ids, gates, weights


@ex.ex_experts
def test_experts_match_the_dense_sum(load_model):
    moe = load_model("moe")
    x, ids, gates, weights = expert_inputs()
    check(moe.experts_sorted(x, ids, gates, weights), experts_oracle(x, ids, gates, weights),
          "sorted by expert, one SwiGLU per expert, weighted and added back: the dense sum (top-2 of 4)")
    x, ids, gates, weights = expert_inputs(k=1, seed=5)
    check(moe.experts_sorted(x, ids, gates, weights), experts_oracle(x, ids, gates, weights), "top-1")


@ex.ex_experts
def test_experts_idle_expert_and_gradients(load_model):
    moe = load_model("moe")
    ids = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 0], [2, 0]])  # experts 1 and 3 get no token
    x, ids, gates, weights = expert_inputs(M=5, ids=ids, seed=10)
    check(moe.experts_sorted(x, ids, gates, weights), experts_oracle(x, ids, gates, weights),
          "experts nobody picked (an empty run of rows)")
    f = lambda x, gates, w1, w2: moe.experts_sorted(x, ids, gates, (w1, w2))
    g = lambda x, gates, w1, w2: experts_oracle(x, ids, gates, (w1, w2))
    got, want = grads(f, x, gates, *weights), grads(g, x, gates, *weights)
    for name, a, b in zip(["x", "gates", "w_fc", "w_proj"], got[1], want[1]):
        check(a, b, f"gradients equal autograd's through the dense sum: d{name}")


def balance_oracle(probs, expert_ids):
    E = probs.size(-1)
    f = torch.zeros(E, dtype=torch.float64)
    for e in expert_ids.flatten().tolist():
        f[e] += 1 / expert_ids.numel()
    return E * (f * probs.double().mean(0)).sum(), f


@ex.ex_balance_loss
def test_balance_loss_uniform_and_collapsed(load_model):
    moe = load_model("moe")
    E, M = 4, 8
    uniform = moe.load_balancing_loss(torch.full((M, E), 1 / E), torch.arange(M)[:, None] % E)
    check(uniform, torch.tensor(1.0), "perfectly balanced routing gives 1")
    collapsed = torch.zeros(M, E)
    collapsed[:, 0] = 1
    check(moe.load_balancing_loss(collapsed, torch.zeros(M, 2, dtype=torch.long)), torch.tensor(float(E)),
          "every token to one expert, with all its probability there, gives E")


@ex.ex_balance_loss
def test_balance_loss_value_and_gradient(load_model):
    moe = load_model("moe")
    probs = torch.softmax(randn(10, 5, seed=1), -1)
    ids = probs.topk(2, -1).indices
    want, f = balance_oracle(probs, ids)
    p = probs.clone().requires_grad_()
    loss = moe.load_balancing_loss(p, ids)
    check(loss, want, "E * sum_i f_i P_i, f the fraction of slots, P the mean probability")
    loss.backward()
    check(p.grad, (5 * f / 10).expand(10, 5), "the gradient flows through P only (f is a count): E f_i / M")


def moe_layer(moe, router, seed=0):
    torch.manual_seed(seed)
    config = moe.Config(vocab_size=16, block_size=8, n_layer=1, d_model=8, n_head=2, n_kv_head=2,
                        n_expert=4, top_k=2, expert_hidden=6, n_shared=1, router=router)
    layer = moe.MoE(config).double()
    with torch.no_grad():
        for p in (layer.c_fc, layer.c_proj):
            p.normal_(0, 0.5)
    return layer


def routing_oracle(layer, x, probs_fn):
    """The routed output, written from the routing rule: each token's top_k experts by score (+ the
    selection bias for the sigmoid router), their gates renormalised to sum to 1, the dense expert sum,
    plus the shared experts."""
    M = x.size(0) * x.size(1)
    xf = x.reshape(M, -1)
    u = xf @ layer.router.weight.T
    scores = probs_fn(u)
    ids = (scores + (layer.selection_bias if layer.config.router == "sigmoid" else 0)).topk(2, -1).indices
    gates = scores.gather(1, ids)
    gates = gates / gates.sum(-1, keepdim=True)
    y = experts_oracle(xf, ids, gates, (layer.c_fc, layer.c_proj)) + layer.shared(xf)
    return y.view(x.shape), ids


@pytest.fixture
def dense_experts(monkeypatch):
    """Routing is graded alone: moe.experts and moe.load_balancing_loss (other exercises) are swapped for
    this file's oracles."""
    def patch(moe):
        monkeypatch.setattr(moe, "experts", lambda x, ids, gates, weights, kernel="torch":
                            experts_oracle(x, ids, gates, weights).to(x.dtype))
        monkeypatch.setattr(moe, "load_balancing_loss", lambda probs, ids: balance_oracle(probs, ids)[0])
        return moe
    return patch


@ex.ex_routing
def test_routing_softmax_top_k(load_model, dense_experts):
    moe = dense_experts(load_model("moe"))
    layer = moe_layer(moe, "softmax").eval()
    x = randn(2, 3, 8, seed=1)
    want, _ = routing_oracle(layer, x, lambda u: torch.softmax(u, -1))
    with torch.no_grad():
        check(layer(x), want, "softmax router: top-2 experts per token, gates renormalised, plus the shared")


@ex.ex_routing
def test_routing_sigmoid_bias_picks_but_never_weighs(load_model, dense_experts):
    moe = dense_experts(load_model("moe"))
    layer = moe_layer(moe, "sigmoid", seed=1).eval()
    layer.selection_bias[3] = 100.0  # expert 3 is picked by every token
    x = randn(1, 5, 8, seed=2)
    want, ids = routing_oracle(layer, x, torch.sigmoid)
    assert (ids == 3).any(-1).all()
    with torch.no_grad():
        check(layer(x), want,
              "sigmoid router: the selection bias picks the experts, the raw scores weigh them")


@ex.ex_routing
def test_routing_keeps_its_losses_in_training(load_model, dense_experts):
    moe = dense_experts(load_model("moe"))
    layer = moe_layer(moe, "softmax", seed=2).train()
    x = randn(2, 4, 8, seed=3)
    layer(x)
    u = x.reshape(8, 8) @ layer.router.weight.T
    probs = torch.softmax(u, -1)
    ids = probs.topk(2, -1).indices
    assert layer.aux_loss is not None and layer.z_loss is not None and layer.counts is not None, \
        "training: the forward keeps aux_loss, z_loss and counts on the module"
    counts = torch.bincount(ids.flatten(), minlength=4).double()
    check(layer.aux_loss, balance_oracle(probs, ids)[0], "training: aux_loss is this batch's balance loss")
    check(layer.z_loss, torch.logsumexp(u, -1).square().mean(), "training: z_loss of the router logits")
    check(layer.counts.double(), counts, "training: counts, the slots per expert")
    check(layer.load.double(), counts, "training: load adds the counts up")
