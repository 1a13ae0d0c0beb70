"""The model contract (../shared/DESIGN.md), checked the same way on every model file."""
import functools
import math
import sys
import warnings

import pytest
import torch

from conftest import DEVICE, MODELS, ROOT

sys.path.insert(0, ROOT)  # bench.py (and the train.py it imports) from the repository
import bench  # noqa: E402

V, T = 50, 32  # a small vocabulary and context for every model


# Every model: a model file, and the Config fields that pick another model in the same file
VARIANTS = [(name, {}) for name in MODELS] + [("mamba", {"version": 2})]


class Variant:
    """A model file whose Config takes `fields` unless told otherwise: the file's other model (mamba.py's
    Mamba-2) through the same contract."""

    def __init__(self, module, fields):
        self.module, self.Config = module, functools.partial(module.Config, **fields)

    def __getattr__(self, name):
        return getattr(self.module, name)


@pytest.fixture(params=VARIANTS, ids=lambda v: ":".join([v[0]] + [f"{k}={x}" for k, x in v[1].items()]))
def mod(request, load_model):
    name, fields = request.param
    return Variant(load_model(name), fields) if fields else load_model(name)


def tiny(mod, **overrides):
    """The model's own defaults, shrunk where the contract names the field."""
    torch.manual_seed(0)
    return mod.Model(mod.Config(vocab_size=V, block_size=T, n_layer=2, **overrides))


def trained_looking(mod):
    """A tiny model with noise on every weight: some inits zero the output projections (RWKV's), which makes
    every block the identity and would let the sequence-mixing tests below pass without mixing anything."""
    model = tiny(mod)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_config_defaults(mod):
    c = mod.Config()
    assert (c.vocab_size, c.block_size, c.n_layer, c.d_model) == (65, 64, 4, 128)
    assert c.kernel == ("sdpa" if mod.__name__.endswith("gpt") else "torch")  # gpt.py: its fused torch op
    with pytest.raises(ValueError):
        mod.Config(kernel="cuda")


def test_forward_shapes_and_initial_loss(mod):
    model = tiny(mod)
    idx = torch.randint(V, (3, T))
    logits, loss = model(idx)
    assert logits.shape == (3, T, V) and loss is None
    logits, loss = model(idx, torch.randint(V, (3, T)))
    assert loss.shape == () and torch.isfinite(loss)
    assert abs(loss.item() - math.log(V)) < 0.5, "a fresh model should predict close to uniform"
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_ignore_index(mod):
    model = tiny(mod).eval()  # in training mode a model may add auxiliary losses (moe's router losses)
    idx = torch.randint(V, (2, T))
    targets = idx.clone()
    targets[:, : T // 2] = -1  # positions the loss must skip
    logits, loss = model(idx, targets)
    kept = slice(T // 2, None)
    expected = torch.nn.functional.cross_entropy(logits[:, kept].reshape(-1, V), idx[:, kept].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_too_long_sequence_raises(mod):
    model = tiny(mod)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, T + 1, dtype=torch.long))


def test_causality(mod):
    model = trained_looking(mod)
    idx = torch.randint(V, (2, T))
    changed = idx.clone()
    t = 13
    changed[:, t] = (changed[:, t] + 1) % V
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-5)  # the past never sees the future
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4  # but the change does reach the later positions


def test_step_equals_forward(mod):
    model = trained_looking(mod)
    idx = torch.randint(V, (2, T))
    with torch.no_grad():
        full = model(idx)[0]
        state, steps = None, []
        for t in range(T):
            logits, state = model.step(idx[:, t], state)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_prefill_carries_state(mod):
    model = trained_looking(mod)
    idx = torch.randint(V, (2, T))
    split = 13  # not a multiple of any chunk size
    with torch.no_grad():
        full = model(idx)[0]
        first, state = model.prefill(idx[:, :split])
        second, state = model.prefill(idx[:, split:], state)
        after, _ = model.step(idx[:, 0], state)  # the state is still usable afterwards
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=1e-4, atol=1e-4)
    assert after.shape == (2, V)


def test_generate_greedy_matches_forward(mod):
    model = trained_looking(mod)
    prompt = torch.randint(V, (2, 5))
    out = model.generate(prompt, 8, temperature=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):  # the slow way: rerun the whole sequence for every token
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def state_numbers(state):
    return sum(t.numel() for t in bench.tensors(state))


def test_long_prompt(mod):
    """A prompt 3x block_size long generates. A model whose state does not grow with the context (recurrent)
    reads all of it, exactly as stepping through it token by token; one whose state grows (a KV cache)
    reads its last block_size tokens, as nanoGPT crops, and warns."""
    model = trained_looking(mod)
    prompt = torch.randint(V, (2, 3 * T))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 3 * T + 6) and torch.equal(out[:, :3 * T], prompt)
    with torch.no_grad():
        half, whole = (state_numbers(model.prefill(prompt[:, :n])[1]) for n in (T // 2, T))
        recurrent = half == whole
        if recurrent:
            state = None
            for t in range(3 * T):
                logits, state = model.step(prompt[:, t], state)
            seq = prompt
            for _ in range(6):
                seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
                logits, state = model.step(seq[:, -1], state)
            assert torch.equal(out, seq), "generate on a long prompt differs from stepping through it"
            assert not caught
        else:
            cropped = model.generate(prompt[:, -T:], 6, temperature=0)
            assert torch.equal(out[:, -6:], cropped[:, -6:]), "a long prompt is not read as its last T"
            assert any("block_size" in str(w.message) for w in caught), "cropping a prompt says so"


def test_generate_samples_within_top_k(mod):
    model = tiny(mod).eval()
    torch.manual_seed(1)
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), 10, temperature=1.0, top_k=1)
    greedy = model.generate(torch.zeros(4, 1, dtype=torch.long), 10, temperature=0)
    assert torch.equal(out, greedy)  # top_k=1 leaves one choice


def test_param_groups_cover_every_parameter_once(mod):
    model = tiny(mod)
    groups = model.param_groups(0.1)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    for g in groups:
        if g["weight_decay"] > 0:
            assert all(p.dim() >= 2 for p in g["params"]), "weight decay only on matrices"


def test_flops_per_token(mod):
    """The estimate against torch's FLOP counter: a training step is about 3 forward passes of matmuls."""
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny(mod).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(V, (2, T)))
    measured = 3 * counter.get_total_flops() / (2 * T)
    estimate = model.flops_per_token(T)
    assert 0.7 * measured <= estimate <= 1.5 * measured, (estimate, measured)
    assert model.flops_per_token(2 * T) >= estimate


def test_core_rejects_an_unknown_kernel(mod):
    """Every core (called as bench.py's kernels table calls it) refuses a kernel it does not have, the same
    way: a ValueError that names the kernels it takes."""
    cores = [(fn, case) for file, fn, _, case in bench.CORES.values() if mod.__name__.endswith(file)]
    assert cores, f"bench.CORES has no entry for {mod.__name__}"
    for fn, case in cores:
        call, _, _ = case(getattr(mod, fn), 1, 16, 64, torch.device(DEVICE), torch.float32)
        with pytest.raises(ValueError, match="kernel must be 'torch'.* or 'triton', not 'cuda'"):
            call("cuda")


def test_triton_needs_interpreter_or_gpu(mod, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mod.check_triton(torch.zeros(1, device="cpu"))


def test_triton_model_matches_torch(mod):
    """The whole model on its Triton path (in the interpreter) against its torch path, logits and grads."""
    ref, tri = tiny(mod, kernel="torch"), tiny(mod, kernel="triton")
    tri.load_state_dict(ref.state_dict())
    idx = torch.randint(V, (2, 19))
    loss_ref, loss_tri = ref(idx, idx)[1], tri(idx, idx)[1]
    loss_ref.backward()
    loss_tri.backward()
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(ref.named_parameters(), tri.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_loss_falls(mod):
    """A couple of hundred AdamW steps on a tiny repeating text bring the loss far down."""
    model = tiny(mod)
    torch.manual_seed(0)
    text = torch.randint(V, (23,)).repeat(40)  # a 23-token phrase, over and over
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3)
    losses = []
    for it in range(150):
        i = torch.randint(len(text) - T - 1, (8,))
        x = torch.stack([text[j:j + T] for j in i])
        y = torch.stack([text[j + 1:j + T + 1] for j in i])
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hasattr(model, "after_step"):
            model.after_step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 and losses[-1] < losses[0] / 5, f"loss went {losses[0]:.2f} -> {losses[-1]:.2f}"
