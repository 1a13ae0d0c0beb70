"""moe.py: the experts core (torch == a per-pair loop, Triton == torch, forward and gradients), the router,
its losses against hand-computed values, and the auxiliary-loss-free bias. Triton runs in the interpreter."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import seeded


@pytest.fixture(scope="session")
def moe(load_model):
    return load_model("moe")


def routed(N, k, E, d, h, dtype, seed=0):
    """Random inputs to experts() with a lopsided routing: expert 0 is picked by nearly every token (so its
    run spans several row blocks), expert E-2 by none, and every count is ragged."""
    g = seeded(seed)
    scores = torch.randn(N, E, generator=g)
    scores[:, 0] += 3
    scores[:, E - 2] = -math.inf
    expert_ids = scores.topk(k, dim=-1).indices  # (N, k), distinct experts per token
    x = torch.randn(N, d, generator=g, dtype=dtype)
    gates = torch.rand(N, k, generator=g, dtype=dtype)
    w_fc = torch.randn(E, d, 2 * h, generator=g, dtype=dtype) / math.sqrt(d)
    w_proj = torch.randn(E, h, d, generator=g, dtype=dtype) / math.sqrt(h)
    return x, expert_ids, gates, w_fc, w_proj


def value_and_grads(f, x, expert_ids, gates, w_fc, w_proj):
    inputs = [t.clone().requires_grad_() for t in (x, gates, w_fc, w_proj)]
    y = f(inputs[0], expert_ids, inputs[1], (inputs[2], inputs[3]))
    dy = torch.randn(y.shape, generator=seeded(1), dtype=y.dtype)
    return [y, *torch.autograd.grad(y, inputs, dy)]  # y, dx, dgates, dw_fc, dw_proj


CASES = [(90, 2, 6, 24, 20), (7, 3, 4, 16, 40), (33, 1, 3, 40, 16)]  # (N, k, E, d, h): none a block multiple


@pytest.mark.parametrize("N,k,E,d,h", CASES)
def test_experts_torch_matches_loop(moe, N, k, E, d, h):
    args = routed(N, k, E, d, h, torch.float64)
    assert args[1].flatten().bincount(minlength=E)[E - 2] == 0  # an idle expert is part of the test
    want = value_and_grads(moe.experts_ref, *args)
    got = value_and_grads(lambda *a: moe.experts(*a, kernel="torch"), *args)
    for name, a, b in zip(["y", "dx", "dgates", "dw_fc", "dw_proj"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")  # fp64


@pytest.mark.parametrize("N,k,E,d,h", CASES)
def test_experts_triton_matches_torch(moe, N, k, E, d, h):
    args = routed(N, k, E, d, h, torch.float32)
    want = value_and_grads(lambda *a: moe.experts(*a, kernel="torch"), *args)
    got = value_and_grads(lambda *a: moe.experts(*a, kernel="triton"), *args)
    for name, a, b in zip(["y", "dx", "dgates", "dw_fc", "dw_proj"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")  # fp32
    assert got[4][E - 2].abs().max() == 0  # the idle expert's weight gradient is written, as zeros


def test_block_schedule_covers_each_row_once(moe):
    counts = torch.tensor([0, 130, 1, 0, 64, 5])
    offsets = F.pad(counts.cumsum(0), (1, 0))
    expert, start = moe.block_schedule(offsets, int(counts.sum()))
    rows = [r for e, s in zip(expert.tolist(), start.tolist())
            for r in range(s, min(s + moe.BLOCK_M, offsets[e + 1]))]
    assert sorted(rows) == list(range(int(counts.sum())))
    for e, s in zip(expert.tolist(), start.tolist()):
        if s < offsets[e + 1]:  # a block with rows: they are its own expert's
            assert s >= offsets[e]


def test_load_balancing_loss_hand_values(moe):
    E, N = 4, 8
    uniform = torch.full((N, E), 1 / E)
    round_robin = torch.arange(N * 2).view(N, 2) % E  # every expert gets N*2/E slots
    assert moe.load_balancing_loss(uniform, round_robin).item() == pytest.approx(1.0)  # balanced: 1
    collapsed = F.softmax(torch.tensor([20.0, 0, 0, 0]).expand(N, E), dim=-1)
    assert moe.load_balancing_loss(collapsed, torch.zeros(N, 1, dtype=torch.long)).item() == pytest.approx(
        E, rel=1e-6)
    # E=2: f = (1, 0), P = ((0.75 + 0.5) / 2, (0.25 + 0.5) / 2), so 2 * (1 * 0.625 + 0 * 0.375) = 1.25
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    assert moe.load_balancing_loss(probs, torch.tensor([[0], [0]])).item() == pytest.approx(1.25)


def test_z_loss_hand_values(moe):
    assert moe.z_loss(torch.zeros(5, 8)).item() == pytest.approx(math.log(8) ** 2)
    assert moe.z_loss(torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])).item() == pytest.approx(
        (math.log(4) ** 2 + math.log(2) ** 2) / 2)


def tiny(moe, **overrides):
    torch.manual_seed(0)
    return moe.Model(moe.Config(vocab_size=50, block_size=16, n_layer=2, d_model=32, n_head=2, n_kv_head=2,
                                n_expert=4, expert_hidden=24, **overrides))


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_router_gates(moe, router):
    """Softmax: the top-k of softmax(u), renormalised (Mixtral's softmax over the chosen logits). Sigmoid: the
    bias picks the experts, the unbiased scores weigh them."""
    layer = tiny(moe, router=router).blocks[0].moe
    layer.selection_bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))  # the sigmoid router always picks expert 1
    x = torch.randn(1, 9, 32)
    u = x[0] @ layer.router.weight.T  # (9, E)
    if router == "softmax":
        top = u.topk(2, dim=-1)
        ids, gates = top.indices, F.softmax(top.values, dim=-1)
    else:
        ids = (torch.sigmoid(u) + layer.selection_bias).topk(2, dim=-1).indices
        assert (ids == 1).any(-1).all()
        s = torch.sigmoid(u).gather(1, ids)
        gates = s / s.sum(-1, keepdim=True)
    want = moe.experts_ref(x[0], ids, gates, (layer.c_fc, layer.c_proj))
    torch.testing.assert_close(layer(x)[0], want, rtol=1e-5, atol=1e-6)


def test_shared_expert_is_always_on(moe):
    layer = tiny(moe, n_shared=2).blocks[0].moe
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        layer.c_proj.zero_()  # silence the routed experts: what is left is the shared MLP
    torch.testing.assert_close(layer(x), layer.shared(x))
    assert layer.shared.c_proj.in_features == 2 * 24


def test_fine_grained_keeps_active_parameters(moe):
    coarse, fine = moe.Model(moe.Config()), moe.Model(moe.Config(n_expert=32, top_k=8, expert_hidden=44))
    routers = 6 * 4 * (32 - 8) * 128  # the only active difference: 4 layers of wider routers
    assert fine.flops_per_token(64) - coarse.flops_per_token(64) == routers
    total = [sum(p.numel() for p in m.parameters()) for m in (coarse, fine)]
    assert total[1] - total[0] == 4 * (32 - 8) * 128  # and the same total but for the routers


def test_router_losses_enter_training_loss_only(moe):
    model = tiny(moe, aux_loss_coef=0.5, z_loss_coef=0.1)
    idx = torch.randint(50, (2, 16))
    logits, loss = model(idx, idx)
    m = model.metrics()
    ce = F.cross_entropy(logits.view(-1, 50), idx.view(-1))
    torch.testing.assert_close(loss, ce + 0.5 * m["aux_loss"] + 0.1 * m["z_loss"])
    assert 0.5 < m["aux_loss"] < 4 and m["z_loss"] > 0
    loads = [m[f"expert_load[{i}]"] for i in range(2)]
    assert all(len(load) == 4 and sum(load) == pytest.approx(1.0) for load in loads)
    model.eval()
    logits, loss = model(idx, idx)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 50), idx.view(-1)))


def test_aux_free_bias_moves_against_the_load(moe):
    model = tiny(moe, router="sigmoid", bias_gamma=0.01)
    for block in model.blocks:
        block.moe.selection_bias[2] = 5.0  # expert 2 gets every token: overloaded
    idx = torch.randint(50, (2, 16))
    model.eval()
    model(idx)
    model.after_step()  # evaluation forwards are not counted: nothing moves
    assert all(b.moe.selection_bias.tolist() == [0, 0, 5, 0] for b in model.blocks)
    model.train()
    model(idx)
    loads = model.metrics()
    model.after_step()
    for i, block in enumerate(model.blocks):
        load = torch.tensor(loads[f"expert_load[{i}]"])
        assert load[2] == 0.5  # top-2: every token's first pick
        # above the mean load down, below up
        want = torch.tensor([0.0, 0, 5, 0]) + 0.01 * torch.sign(1 / 4 - load)
        torch.testing.assert_close(block.moe.selection_bias, want)
        assert block.moe.selection_bias[2] < 5 and block.moe.load.sum() == 0  # the counts start again
    softmax = tiny(moe)
    softmax(idx)
    softmax.after_step()
    assert all((b.moe.selection_bias == 0).all() for b in softmax.blocks)  # the softmax router's never moves
