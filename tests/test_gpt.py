"""gpt.py's Triton FlashAttention-2 against its PyTorch attention, forward and gradients, through Triton's
interpreter on the CPU. Shapes are tiny but ragged (lengths that are not multiples of the tiles), with GQA,
head dims 16 to 128, and fewer queries than keys (a chunk after a KV cache, and decode's single query)."""
import numpy as np
import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture(scope="session")
def gpt(load_model):
    return load_model("gpt")


@pytest.fixture
def poison(monkeypatch):
    """Every float buffer made by torch.empty(_like) during the test starts as NaN, so an output or gradient
    element that no kernel program wrote fails the comparison instead of passing on leftover memory."""
    empty, empty_like = torch.empty, torch.empty_like
    nan = lambda t: t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: nan(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: nan(empty_like(*args, **kwargs)))


@pytest.fixture
def bf16_dot(monkeypatch):
    """Triton 3.9's interpreter keeps bf16 as uint16 bits and its tl.dot multiplies those bits as integers
    (triton-lang/triton#11584; gpt.py runs bf16 as fp32 under the interpreter because of it). Decode them to
    fp32 first, as a GPU's tensor cores do, so that the bf16 kernels themselves can be tested here."""
    import triton.language as tl
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot
    def decode(x):  # bf16 bits, as the fp32 numbers they are
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, a, b, *rest: dot(self, decode(a), decode(b), *rest))


def run(attention, q, k, v, do):
    """(o, dq, dk, dv) of o = attention(q, k, v) for the upstream gradient do."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = attention(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def check(gpt, B, H, Hkv, Tq, Tk, D, dtype, attention, atol, rtol):
    torch.manual_seed(0)
    q = torch.randn(B, H, Tq, D).to(dtype)
    k, v = torch.randn(B, Hkv, Tk, D).to(dtype), torch.randn(B, Hkv, Tk, D).to(dtype)
    do = torch.randn(B, H, Tq, D).to(dtype)
    got = run(attention, q, k, v, do)
    # the reference: the torch path in fp32 on the very same (rounded) inputs
    want = run(lambda q, k, v: gpt.attention(q, k, v, kernel="torch"), q.float(), k.float(), v.float(),
               do.float())
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name}: {(~torch.isfinite(a)).sum()} elements never written"
        torch.testing.assert_close(a.float(), b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


SHAPES = [  # (B, H, Hkv, Tq, Tk, D): the queries are the last Tq of Tk positions
    (2, 2, 2, 17, 17, 32),  # ragged single tile, batch 2
    (1, 4, 2, 100, 100, 16),  # GQA 2, two query tiles (64 + 36)
    (1, 2, 1, 257, 257, 16),  # GQA 2, longer than 128: five tiles, the last holding one row
    (1, 4, 1, 70, 130, 32),  # GQA 4, a chunk after 60 cached keys: the diagonal crosses tiles off-grid
    (1, 2, 2, 20, 90, 48),  # head dim 48 runs as a masked 64
    (2, 4, 1, 1, 37, 64),  # decode: one query, GQA 4
    (1, 1, 1, 33, 33, 128),  # head dim 128 (32-key tiles in fp32)
    (1, 1, 1, 1, 1, 16),  # length 1
]


@pytest.mark.parametrize("B, H, Hkv, Tq, Tk, D", SHAPES)
def test_attention_fp32(gpt, poison, B, H, Hkv, Tq, Tk, D):
    # fp32: the same sums in a different order, so a few ulps apart
    check(gpt, B, H, Hkv, Tq, Tk, D, torch.float32, lambda q, k, v: gpt.attention(q, k, v, kernel="triton"),
          atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, H, Hkv, Tq, Tk, D", [(2, 4, 2, 100, 100, 32), (1, 4, 1, 1, 50, 64)])
def test_attention_half(gpt, poison, bf16_dot, dtype, B, H, Hkv, Tq, Tk, D):
    # 16-bit inputs and P, fp32 accumulation: the Triton tutorial's 1e-2 for fp16; 2e-2 for bf16, whose 8-bit
    # mantissa the interpreter rounds P and dS to by truncation (twice the error of the torch path in bf16).
    # First the kernels themselves (AttentionTriton.apply), then the public path (fp32 for bf16 here).
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-2
    for attention in (gpt.AttentionTriton.apply, lambda q, k, v: gpt.attention(q, k, v, kernel="triton")):
        check(gpt, B, H, Hkv, Tq, Tk, D, dtype, attention, atol=tol, rtol=tol)


def test_head_dim_too_large(gpt):
    q = torch.randn(1, 1, 4, 256)
    with pytest.raises(RuntimeError, match="head dims up to 128"):
        gpt.attention(q, q, q, kernel="triton")


def models(gpt):
    """The same small GQA model with the torch core and with the Triton core."""
    torch.manual_seed(0)
    config = dict(vocab_size=37, block_size=24, n_layer=2, d_model=64, n_head=4, n_kv_head=2)
    ref = gpt.Model(gpt.Config(**config, kernel="torch"))
    model = gpt.Model(gpt.Config(**config, kernel="triton"))
    model.load_state_dict(ref.state_dict())
    return model, ref


def test_model_matches_torch(gpt):
    model, ref = models(gpt)
    idx, targets = torch.randint(0, 37, (2, 21)), torch.randint(0, 37, (2, 21))
    logits, loss = model(idx, targets)
    logits_ref, loss_ref = ref(idx, targets)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    loss_ref.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@torch.no_grad()
def test_model_decodes(gpt):
    # A 5-token prefill, then one step per token past block_size, so the cache fills and then slides.
    model, ref = models(gpt)
    block_size = model.config.block_size
    idx = torch.randint(0, 37, (2, block_size + 4))
    logits_forward, _ = ref(idx[:, :block_size])
    logits, state = model.prefill(idx[:, :5])
    logits_ref, state_ref = ref.prefill(idx[:, :5])
    torch.testing.assert_close(logits, logits_forward[:, :5], atol=1e-5, rtol=1e-5)
    for t in range(5, idx.size(1)):
        logits, state = model.step(idx[:, t], state)
        logits_ref, state_ref = ref.step(idx[:, t], state_ref)
        torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {t}: {m}")
        if t < block_size:
            torch.testing.assert_close(logits, logits_forward[:, t], atol=1e-5, rtol=1e-5)
