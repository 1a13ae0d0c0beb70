"""
--models-dir, registered here at the repository's root as well as in tests/conftest.py: pytest reads the
options of the conftest files it finds beside its arguments before it parses the command line, and in
`python -m pytest --models-dir handout -m ex_rope` it takes `handout` for such an argument, so the option
must be known from a conftest above it. tests/conftest.py has the fixtures, and the default.
"""


def pytest_addoption(parser):
    parser.addoption("--models-dir", default=None, help="the folder whose model files the tests import "
                     "(default: $NANOZOO_MODELS_DIR, else the folder the tests belong to)")
