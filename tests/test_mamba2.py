"""Mamba-2: the torch SSD equals the recurrence (fp64), the Triton kernels equal the torch SSD (forward and
every gradient, the initial state's too), the stable segment sum at 64k tokens, and the initialisation. The
model contract (causality, step == forward, prefill carries state, loss falls, the Triton model) is checked
in test_models.py, for Mamba-2 as ("mamba", {"version": 2})."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_all_close, run, seeded


@pytest.fixture(scope="session")
def mamba(load_model):
    return load_model("mamba")


NAMES = ["y", "h_last", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0"]


def inputs(b=2, T=37, H=4, P=3, G=2, N=5, dtype=torch.float32, seed=0):
    """x, dt, A, B, C, D, h0 with dt spread over [~0.01, ~3], A in [-3.5, -0.5], two groups of two heads."""
    g = seeded(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, dt = r(b, T, H, P), F.softplus(r(b, T, H) - 1)
    A, B, C, D, h0 = -3 * torch.rand(H, generator=g) - 0.5, r(b, T, G, N), r(b, T, G, N), r(H), r(b, H, P, N)
    return [t.to(dtype) for t in (x, dt, A, B, C, D, h0)]



@pytest.mark.parametrize("T", [1, 7, 16, 33, 48])  # below, at and across boundaries of 16-step chunks
@pytest.mark.parametrize("with_h0", [False, True])
def test_torch_ssd_matches_recurrence(mamba, T, with_h0):
    args = inputs(T=T, dtype=torch.float64)[:6 + with_h0]
    want = run(mamba.ssd_ref, args)
    got = run(lambda *a: mamba.ssd(*a, kernel="torch", chunk_size=16), args)
    assert_all_close(NAMES, got, want, rtol=1e-10, atol=1e-10)


def test_torch_ssd_in_pieces(mamba):
    """The last state carries a sequence across calls: [x1; x2] equals x1, then x2 from x1's state."""
    x, dt, A, B, C, D, _ = inputs(T=37, dtype=torch.float64)
    y, h = mamba.ssd(x, dt, A, B, C, D, chunk_size=16)
    y1, h1 = mamba.ssd(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], D, chunk_size=16)
    y2, h2 = mamba.ssd(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], D, h1, chunk_size=16)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h2, h, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T, P, N, chunk_size", [(37, 3, 5, 16),  # ragged T, P and N padded to 16
                                                 (16, 16, 16, 16),  # exactly one chunk, no padding
                                                 (40, 20, 8, 32)])  # a ragged second chunk
def test_triton_ssd_matches_torch(mamba, T, P, N, chunk_size):
    args = inputs(T=T, P=P, N=N)
    want = run(lambda *a: mamba.ssd(*a, kernel="torch", chunk_size=chunk_size), args)
    got = run(lambda *a: mamba.ssd(*a, kernel="triton", chunk_size=chunk_size), args)
    assert_all_close(NAMES, got, want, rtol=1e-4, atol=1e-4)


def test_triton_ssd_without_initial_state(mamba):
    args = inputs(T=21, G=1)[:6]
    want = run(lambda *a: mamba.ssd(*a, kernel="torch", chunk_size=16), args)
    got = run(lambda *a: mamba.ssd(*a, kernel="triton", chunk_size=16), args)
    assert_all_close(NAMES, got, want, rtol=1e-4, atol=1e-4)


def test_triton_ssd_refuses_a_chunk_its_tiles_cannot_take(mamba):
    with pytest.raises(ValueError, match="power of two"):
        mamba.ssd(*inputs(T=5), kernel="triton", chunk_size=24)
    with pytest.raises(ValueError, match="power of two"):
        mamba.Config(version=2, kernel="triton", chunk_size=8)
    with pytest.raises(ValueError, match="from 16 to 128"):
        mamba.Config(version=2, kernel="triton", chunk_size=256)  # the official chunk: past shared memory


def test_segsum_stays_finite_at_64k_tokens(mamba):
    """Strong decay over 64k tokens in fp32: the cumulative sum of a reaches ~-3e5, where fp32's spacing is
    ~0.03, so the naive difference cs_t - cs_s of one whole-sequence cumsum gets short segments wrong, and
    exp(cs_t) / exp(cs_s) is 0 / 0. The stable segsum sums each segment from its own terms; SSD keeps
    cumsums within a chunk and passes the state across chunks one decay at a time: all finite."""
    T = 65536
    g = seeded(0)
    a = -5 * torch.rand(T, generator=g)  # log-decays, 2.5 a step on average
    cs = a.cumsum(0)
    assert cs[-1] < -1e5
    i = torch.arange(T - 64, T)
    naive = cs[i, None] - cs[None, i]  # the last 64 steps' segment sums by the naive difference
    stable = mamba.segsum(a[-64:])
    exact = mamba.segsum(a[-64:].double())
    lower = torch.ones(64, 64, dtype=torch.bool).tril()
    assert torch.isfinite(stable[lower]).all() and (stable[~lower] == -math.inf).all()
    assert (stable[lower].double() - exact[lower]).abs().max() < 1e-3
    assert (naive[lower].double() - exact[lower]).abs().max() > 1e-2, "the naive difference should cancel"
    assert torch.isnan(torch.exp(cs[-1]) / torch.exp(cs[-2])), "the ratio of tiny decays should be 0 / 0"
    # and SSD itself, one head, over all 64k steps
    x, B, C = torch.randn(1, T, 1, 2, generator=g), torch.randn(1, T, 1, 2, generator=g), \
        torch.randn(1, T, 1, 2, generator=g)
    y, h = mamba.ssd(x, (-a / 5)[None, :, None], torch.tensor([-5.0]), B, C, torch.ones(1), chunk_size=64)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()


def test_init(mamba):
    torch.manual_seed(0)
    config = mamba.Config(version=2)
    mixer = mamba.Model(config).blocks[0].mixer
    H = config.expand * config.d_model // config.headdim
    assert isinstance(mixer, mamba.Mixer2)
    assert mixer.A_log.shape == mixer.D.shape == mixer.dt_bias.shape == (H,)
    dt = F.softplus(mixer.dt_bias)
    assert (dt >= 1e-4 - 1e-9).all() and (dt <= 0.1 + 1e-6).all()  # log-uniform in [dt_min, dt_max]
    A = torch.exp(mixer.A_log)
    assert (A >= 1).all() and (A <= 16).all()  # A_init_range
    assert torch.equal(mixer.D, torch.ones(H))
    assert all(p._no_weight_decay for p in (mixer.A_log, mixer.D, mixer.dt_bias))
    Di, G, N = config.expand * config.d_model, config.ngroups, config.d_state
    assert mixer.in_proj.weight.shape == (2 * Di + 2 * G * N + H, config.d_model)  # [z, x, B, C, dt]
    assert mixer.conv_weight.shape == (config.d_conv, Di + 2 * G * N)  # over x, B and C


def test_version_1_is_unchanged(mamba):
    """The default model is Mamba-1, its fields resolved as before Mamba-2 came."""
    c = mamba.Config()
    assert (c.version, c.d_state, c.chunk_size, c.dt_rank) == (1, 16, 8, 8)
    assert isinstance(mamba.Model(c).blocks[0].mixer, mamba.Mixer)
    c2 = mamba.Config(version=2)
    assert (c2.d_state, c2.headdim, c2.chunk_size) == (16, 128, 32)


@pytest.mark.parametrize("fields, words", [(dict(version=3), "version"),
                                           (dict(version=2, headdim=48), "headdim"),
                                           (dict(version=2, ngroups=3), "ngroups"),
                                           (dict(d_state=0), "d_state")])
def test_config_refuses(mamba, fields, words):
    with pytest.raises(ValueError, match=words):
        mamba.Config(**fields)
