"""RetNet: the three forms of retention agree, the Triton kernels match them, and the decay and rotation do
what the paper says. Model-level contract tests (causality, step == forward, ...) are in test_models.py."""
import pytest
import torch

from conftest import seeded


@pytest.fixture(scope="session")
def retnet(load_model):
    return load_model("retnet")


def inputs(B=2, H=3, T=37, dk=8, dv=16, dtype=torch.float64, seed=0):
    """Random q, k, v and the paper's per-head decays gamma_h = 1 - 2^(-5-h)."""
    g = seeded(seed)
    q, k = (torch.randn(B, H, T, dk, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g, dtype=dtype)
    return q, k, v, 1 - 2.0 ** (-5 - torch.arange(H, dtype=dtype))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37])  # 1 and T are the recurrent and parallel extremes
def test_three_forms_agree(retnet, chunk_size):
    q, k, v, gamma = inputs()
    parallel = retnet.retention_parallel(q, k, v, gamma)
    recurrent, S_rec = retnet.retention_ref(q, k, v, gamma)
    chunkwise, S_chunk = retnet.retention_chunkwise(q, k, v, gamma, chunk_size=chunk_size)
    torch.testing.assert_close(recurrent, parallel, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunkwise, parallel, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S_chunk, S_rec, rtol=1e-12, atol=1e-12)


def test_chunk_states_equal_recurrent_states(retnet):
    """The state at every chunk boundary, from the torch chunkwise form and from the Triton forward kernel
    (which stores the state entering each chunk), equals the recurrent state after that many tokens."""
    q, k, v, gamma = inputs(T=37, dk=16, dv=32)
    S0 = torch.randn(2, 3, 16, 32, dtype=torch.float64)
    C = 16
    for n in (C, 2 * C):
        _, S_rec = retnet.retention_ref(q[:, :, :n], k[:, :, :n], v[:, :, :n], gamma, S0)
        _, S_chunk = retnet.retention_chunkwise(q[:, :, :n], k[:, :, :n], v[:, :, :n], gamma, S0,
                                                chunk_size=C)
        torch.testing.assert_close(S_chunk, S_rec, rtol=1e-12, atol=1e-12)
    # (B, H, n_chunks, dk, dv)
    h, _ = retnet.chunk_states(k.float(), v.float(), torch.log2(gamma.float()), S0.float(), C)
    assert h.size(2) == 3 and rel_err(h[:, :, 0], S0) < 1e-6
    for i in (1, 2):
        _, S_rec = retnet.retention_ref(q[:, :, :i * C], k[:, :, :i * C], v[:, :, :i * C], gamma, S0)
        assert rel_err(h[:, :, i], S_rec) < 1e-5, f"state entering chunk {i}"


@pytest.mark.parametrize("form", ["ref", "chunkwise"])  # ref: the recurrent form
def test_two_calls_with_carried_state_equal_one_call(retnet, form):
    q, k, v, gamma = inputs()
    f = getattr(retnet, f"retention_{form}")
    o, S = f(q, k, v, gamma)
    split = 13  # not a multiple of the chunk size
    o1, S1 = f(q[:, :, :split], k[:, :, :split], v[:, :, :split], gamma)
    o2, S2 = f(q[:, :, split:], k[:, :, split:], v[:, :, split:], gamma, S1)
    torch.testing.assert_close(torch.cat([o1, o2], dim=2), o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S2, S, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T, dk, dv", [(37, 16, 32), (5, 8, 20)])  # ragged T; head dims below / off the tile
def test_triton_matches_torch(retnet, T, dk, dv):
    """Forward output and final state, and gradients of q, k, v and the initial state, in fp32 through the
    interpreter, against the fp64 recurrent loop. Relative error < 1e-5 (fp32 rounding)."""
    q, k, v, gamma = inputs(B=2, H=2, T=T, dk=dk, dv=dv)
    S0 = torch.randn(2, 2, dk, dv, dtype=torch.float64)
    do, dS = torch.randn_like(v), torch.randn_like(S0)
    ref = [t.clone().requires_grad_() for t in (q, k, v, S0)]
    tri = [t.float().requires_grad_() for t in (q, k, v, S0)]
    o_ref, S_ref = retnet.retention_ref(*ref[:3], gamma, ref[3])
    o_tri, S_tri = retnet.retention(*tri[:3], gamma.float(), tri[3], kernel="triton", chunk_size=16)
    assert rel_err(o_tri, o_ref) < 1e-5 and rel_err(S_tri, S_ref) < 1e-5
    ((o_ref * do).sum() + (S_ref * dS).sum()).backward()
    ((o_tri * do.float()).sum() + (S_tri * dS.float()).sum()).backward()
    for name, a, b in zip("q k v S0".split(), tri, ref):
        assert rel_err(a.grad, b.grad) < 1e-5, f"d{name}"


def test_decay(retnet):
    """q = k = a constant vector and v one-hot at position m: the output at n is (q.k) gamma^(n-m) for n >= m
    and 0 before, with each head's own gamma = 1 - 2^(-5-h)."""
    msr = retnet.MultiScaleRetention(retnet.Config(n_head=4))
    torch.testing.assert_close(msr.gamma, torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256]))
    gamma = msr.gamma.double()
    T, m = 40, 7
    q = k = torch.full((1, 4, T, 8), 0.5, dtype=torch.float64)  # q.k = 2
    v = torch.zeros(1, 4, T, 16, dtype=torch.float64)
    v[:, :, m, 0] = 1
    o, _ = retnet.retention(q, k, v, gamma, chunk_size=16)
    n = torch.arange(T, dtype=torch.float64)
    expected = torch.where(n >= m, 2 * gamma[:, None] ** (n - m), 0.0)  # (H, T)
    torch.testing.assert_close(o[0, :, :, 0], expected, rtol=1e-12, atol=1e-12)
    assert o[..., 1:].abs().max() == 0


def test_rotary_scores_depend_only_on_distance(retnet):
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=torch.float64).unbind(0)  # one q and one k vector, (1, 1, 1, 16)
    theta = 10000.0

    def score(n, m):  # q rotated to position n, k to position m
        rq = retnet.rope_angles(torch.tensor([n]), 16, theta)
        rk = retnet.rope_angles(torch.tensor([m]), 16, theta)
        return (retnet.apply_rope(q, rq) * retnet.apply_rope(k, rk)).sum().item()

    for n, m in [(5, 2), (9, 9), (30, 1)]:
        assert score(n, m) == pytest.approx(score(n + 1000, m + 1000), rel=1e-4, abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)  # the distance does matter

    # so a whole model started at position 1000 from the empty state gives what it gives at position 0
    model = retnet.Model(retnet.Config(n_layer=2, block_size=32)).eval()
    idx = torch.randint(65, (2, 20))
    with torch.no_grad():
        at0, state = model.prefill(idx)
        shifted = {"pos": 1000, "S": [torch.zeros_like(S) for S in state["S"]]}
        at1000, _ = model.prefill(idx, shifted)
    torch.testing.assert_close(at1000, at0, rtol=1e-4, atol=1e-4)


def test_per_head_norm_removes_any_per_row_scale(retnet):
    """Why no score normalisation is needed: scaling each head's output at each position by any positive
    number (what torchscale's normalisations amount to) leaves GroupNorm's output unchanged (eps = 0)."""
    torch.manual_seed(0)
    msr = retnet.MultiScaleRetention(retnet.Config(n_head=4))
    msr.group_norm.eps = 0.0
    y = torch.randn(2, 4, 10, 64)  # (B, H, T, 2D), retention's output
    scale = torch.rand(2, 4, 10, 1) * 100 + 0.01

    def normed(y):
        return msr.group_norm(y.transpose(1, 2).reshape(20, 256))

    torch.testing.assert_close(normed(y * scale), normed(y), rtol=1e-4, atol=1e-4)


def test_paper_shapes_and_constant_state(retnet):
    """Value and gate are twice as wide as query and key, and a layer holds 12 d^2 weights like a transformer
    layer's; the recurrent state has the same size after 5 tokens as after 60."""
    config = retnet.Config(n_layer=1, d_model=64, ffn_hidden=128, block_size=64)
    model = retnet.Model(config)
    d = config.d_model
    assert model.blocks[0].msr.c_qkvg.weight.shape == (d + d + 2 * d + 2 * d, d)
    assert sum(p.numel() for p in model.blocks[0].parameters() if p.dim() >= 2) == 12 * d * d
    with torch.no_grad():
        _, short = model.prefill(torch.zeros(1, 5, dtype=torch.long))
        _, long = model.prefill(torch.zeros(1, 60, dtype=torch.long))
    assert [S.shape for S in short["S"]] == [S.shape for S in long["S"]] == [(1, 4, d // 4, d // 2)]
