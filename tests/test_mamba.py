"""Mamba-1: the selective scan's torch path equals the plain time loop, the Triton kernels equal the torch
path (forward and every gradient), known answers, long sequences, and the initialisation. The model contract
(causality, step == forward, prefill, loss falls, the Triton model) is checked in test_models.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_all_close, run, seeded


@pytest.fixture(scope="session")
def mamba(load_model):
    return load_model("mamba")


NAMES = ["y", "h_last", "dx", "ddt", "dA", "dB", "dC", "dD", "dz", "dh0"]


def inputs(b=2, T=37, Di=24, N=16, dtype=torch.float32, seed=0):
    """x, dt, A, B, C, D, z, h0 with dt spread over [~0.01, ~3] and A in [-4.5, -0.5]."""
    g = seeded(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, dt, z = r(b, T, Di), F.softplus(r(b, T, Di) - 1), r(b, T, Di)
    A, B, C, D, h0 = -4 * torch.rand(Di, N, generator=g) - 0.5, r(b, T, N), r(b, T, N), r(Di), r(b, Di, N)
    return [t.to(dtype) for t in (x, dt, A, B, C, D, z, h0)]



@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])  # 64 > T: one chunk
def test_torch_scan_matches_time_loop(mamba, chunk_size):
    args = inputs()
    want = run(mamba.selective_scan_ref, [a.double() for a in args])  # the oracle, in fp64
    got = run(lambda *a: mamba.selective_scan(*a, kernel="torch", chunk_size=chunk_size), args)
    assert_all_close(NAMES, got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T, Di, N, chunk_size",
                         [(21, 40, 16, 4),  # Di not a multiple of BLOCK_D, T of chunk_size
                          (21, 24, 5, 16),  # N not a power of two
                          (7, 24, 16, 1),
                          (9, 300, 16, 4)])  # two channel blocks of 256 under the interpreter
def test_triton_scan_matches_torch(mamba, T, Di, N, chunk_size):
    args = inputs(T=T, Di=Di, N=N)
    want = run(lambda *a: mamba.selective_scan(*a, kernel="torch"), args)
    got = run(lambda *a: mamba.selective_scan(*a, kernel="triton", chunk_size=chunk_size), args)
    assert_all_close(NAMES, got, want, rtol=1e-4, atol=1e-4)


def test_triton_scan_without_gate_and_initial_state(mamba):
    x, dt, A, B, C, D, _, _ = inputs(T=19)
    scan = lambda kernel: lambda *a: mamba.selective_scan(*a, kernel=kernel, chunk_size=8)  # noqa: E731
    want = run(scan("torch"), [x, dt, A, B, C, D])
    got = run(scan("triton"), [x, dt, A, B, C, D])
    assert_all_close(NAMES, got, want, rtol=1e-4, atol=1e-4)  # y, h_last, dx, ddt, dA, dB, dC, dD


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_bf16_inputs(mamba, kernel):
    """bf16 activations (what autocast feeds the scan): the scan runs in fp32, y comes back in bf16."""
    args = inputs(T=19)
    x, dt, A, B, C, D, z, h0 = args
    low = [x.bfloat16(), dt.bfloat16(), A, B.bfloat16(), C.bfloat16(), D, z.bfloat16(), h0]
    want = run(mamba.selective_scan_ref, [a.double() for a in low])
    got = run(lambda *a: mamba.selective_scan(*a, kernel=kernel, chunk_size=8), low)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert_all_close(NAMES, got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_dt_to_zero_leaves_only_the_skip(mamba, kernel):
    """dt -> 0: nothing enters the state and nothing decays, so y = D x (then gated) and h stays h0."""
    x, dt, A, B, C, D, z, h0 = inputs(T=9)
    y, h = mamba.selective_scan(x, torch.zeros_like(dt), A, B, C, D, z, kernel=kernel)
    torch.testing.assert_close(y, D * x * F.silu(z))
    assert torch.equal(h, torch.zeros_like(h))
    y, h = mamba.selective_scan(x, torch.full_like(dt, 1e-9), A, B, C, D, None, h0, kernel=kernel)
    torch.testing.assert_close(h, h0)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_impulse_response_decays_as_exp_dt_A(mamba, kernel):
    """x = 1 at t = 0 only, B = C = 1, constant dt: y_t = dt * sum_n exp(t dt A_n), the SSM's kernel."""
    T, Di, N, dt0 = 12, 3, 4, 0.3
    x = torch.zeros(1, T, Di)
    x[:, 0] = 1
    A = -torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4], [5.0, 1.0, 0.5, 0.0]])
    y, _ = mamba.selective_scan(x, torch.full((1, T, Di), dt0), A, torch.ones(1, T, N), torch.ones(1, T, N),
                                torch.zeros(Di), kernel=kernel, chunk_size=5)
    t = torch.arange(T, dtype=torch.float32)[:, None, None]
    torch.testing.assert_close(y[0], dt0 * torch.exp(t * dt0 * A).sum(-1), rtol=1e-5, atol=1e-6)


def test_long_sequence_stays_finite(mamba):
    """64k steps on the torch training path, with steps that forget at once and steps that barely move."""
    T, Di, N = 65536, 4, 4
    g = seeded(0)
    x = torch.randn(1, T, Di, generator=g)
    B, C = torch.randn(1, T, N, generator=g), torch.randn(1, T, N, generator=g)
    # a huge dt * |A|: exp underflows to 0
    dt = torch.where(torch.rand(1, T, Di, generator=g) < 0.5, 1e-4, 50.0)
    A = -torch.tensor([1.0, 16.0, 1e-3, 100.0]).repeat(Di, 1)
    y, h = mamba.selective_scan(x, dt, A, B, C, torch.ones(Di))
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert y.abs().max() < 1e4  # the state is a decaying sum: it stays the size of its inputs


def test_init(mamba):
    torch.manual_seed(0)
    c = mamba.Config()
    model = mamba.Model(c)
    Di = c.expand * c.d_model
    assert c.dt_rank == math.ceil(c.d_model / 16)
    for block in model.blocks:
        m = block.mixer
        dt = F.softplus(m.dt_bias)
        assert dt.shape == (Di,) and dt.min() >= 1e-4 and dt.max() <= 0.1
        assert dt.log().std() > 1.0, "log-uniform over two decades, not a constant"
        torch.testing.assert_close(-torch.exp(m.A_log), -torch.arange(1.0, c.d_state + 1).repeat(Di, 1))
        assert torch.equal(m.D, torch.ones(Di))
    assert model.lm_head.weight is model.wte.weight
    no_decay = {id(p) for g in model.param_groups(0.1) if g["weight_decay"] == 0 for p in g["params"]}
    for m in (b.mixer for b in model.blocks):
        assert {id(m.A_log), id(m.D), id(m.dt_bias)} <= no_decay


def test_fp32_state_under_autocast(mamba):
    torch.manual_seed(0)
    model = mamba.Model(mamba.Config(n_layer=1, d_model=32))
    with torch.autocast(torch.get_default_device().type, dtype=torch.bfloat16):
        logits, state = model.prefill(torch.randint(65, (2, 10)))
    assert logits.dtype == torch.bfloat16 and state[0][1].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("split", [1, 2, 3, 4])  # around the conv window of K - 1 = 3 inputs
def test_prefill_shorter_than_conv_window(mamba, split):
    torch.manual_seed(0)
    model = mamba.Model(mamba.Config(n_layer=2, d_model=32)).eval()
    idx = torch.randint(65, (2, 9))
    with torch.no_grad():
        full = model(idx)[0]
        first, state = model.prefill(idx[:, :split])
        second, state = model.prefill(idx[:, split:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=1e-5, atol=1e-5)


def test_state_size_does_not_grow(mamba):
    torch.manual_seed(0)
    model = mamba.Model(mamba.Config(n_layer=2, d_model=32)).eval()
    size = lambda state: sum(t.numel() for layer in state for t in layer)  # noqa: E731
    with torch.no_grad():
        _, short = model.prefill(torch.randint(65, (1, 5)))
        _, long = model.prefill(torch.randint(65, (1, 500)))
        _, stepped = model.step(torch.zeros(1, dtype=torch.long), long)
    assert size(short) == size(long) == size(stepped)
