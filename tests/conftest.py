"""
Shared fixtures. Tests reach a model file only through `load_model(name)`, which imports <name>.py by path
from the models directory: the repository by default, or `--models-dir DIR` (env NANOZOO_MODELS_DIR), so
the same tests can grade another copy of a file, a student's.

NANOZOO_TEST_DEVICE=cuda runs the model and kernel tests on a GPU instead, with the Triton kernels compiled
for real (test_gpt, test_mamba, test_rwkv, test_retnet, test_moe, test_models; the others are CPU
tests). Tensors are then born on the GPU, and fp32 tl.dot runs in full precision (TRITON_F32_DEFAULT=ieee)
rather than TF32, so that the fp32 tolerances, written for exact arithmetic, still hold.
"""
import importlib.util
import os
import re

DEVICE = os.environ.get("NANOZOO_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before any model file defines its kernels: Triton runs on the CPU
else:
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("gpt", "mamba", "rwkv", "retnet", "moe")


@pytest.fixture(autouse=True)
def default_device():
    """Every test starts with tensors born on DEVICE (set per test: some torch modes reset it on exit)."""
    torch.set_default_device(DEVICE)


def seeded(seed):
    """A random generator on the device the tests run on."""
    return torch.Generator(DEVICE).manual_seed(seed)


def pytest_configure(config):
    """A marker ex_<id> for every exercise on the sheet (exercises/README.md, or README.md in a handout that
    exercises/make.py made), so that `-m ex_rope` picks one exercise's tests and --strict-markers (pytest.ini)
    refuses a marker with no sheet entry."""
    for sheet in (os.path.join(ROOT, "exercises", "README.md"), os.path.join(ROOT, "README.md")):
        if os.path.exists(sheet):
            for ex in re.findall(r'^### <a id="(\w+)"></a>', open(sheet).read(), flags=re.M):
                config.addinivalue_line("markers", f"ex_{ex}: the tests that grade exercise {ex}")
            break


def pytest_addoption(parser):
    try:
        parser.addoption("--models-dir", default=None, help="the folder whose model files the tests import "
                         "(default: $NANOZOO_MODELS_DIR, else the folder the tests belong to)")
    except ValueError:  # already there: the repository's own conftest.py registers it too (see there)
        pass


@pytest.fixture(scope="session")
def models_dir(request):
    # the repository for its tests/, a handout for its grading/ (make.py copies this file there)
    return os.path.abspath(request.config.getoption("--models-dir") or os.environ.get("NANOZOO_MODELS_DIR")
                           or ROOT)


@pytest.fixture(scope="session")
def load_model(models_dir):
    cache = {}

    def load(name):
        path = os.path.join(models_dir, f"{name}.py")
        if not os.path.exists(path):
            pytest.skip(f"{path} does not exist")
        if name not in cache:
            spec = importlib.util.spec_from_file_location(f"nanozoo_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            cache[name] = module
        return cache[name]

    return load


def run(core, args, seed=1):
    """A core's outputs (y, the last state) and the gradients of every input, for a fixed random projection
    of (y, h_last): the scan tests of mamba.py's two cores compare these."""
    args = [a.detach().clone().requires_grad_() for a in args]
    y, h = core(*args)
    g = seeded(seed)
    loss = (y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64)).sum() + \
        (h.double() * torch.randn(h.shape, generator=g, dtype=torch.float64)).sum()
    loss.backward()
    return [y, h] + [a.grad for a in args]


def assert_all_close(names, got, want, rtol, atol):
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
