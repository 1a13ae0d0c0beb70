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


def pytest_addoption(parser):
    parser.addoption("--models-dir", default=os.environ.get("NANOZOO_MODELS_DIR", ROOT),
                     help="the folder whose model files the tests import (default: the repository)")


@pytest.fixture(scope="session")
def models_dir(request):
    return os.path.abspath(request.config.getoption("--models-dir"))


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
