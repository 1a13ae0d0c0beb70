"""
Shared fixtures. Tests reach a model file only through `load_model(name)`, which imports <name>.py by path
from the models directory: the repository by default, or `--models-dir DIR` (env NANOZOO_MODELS_DIR), so
the same tests can grade another copy of a file, a student's.
"""
import importlib.util
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any model file defines its kernels: Triton runs on the CPU here

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("gpt", "mamba", "rwkv", "retnet", "moe")


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
