"""
Pieces that several model files need are written again in each file (one model, one file) and kept
identical, the way Hugging Face guards its "Copied from" blocks. This test compares their source text.
"""
import ast
import os

import pytest

from conftest import MODELS

# name -> the files that must carry an identical copy of gpt.py's version
SHARED = {
    "check_triton": MODELS,
    "Model.generate": MODELS,
    "RMSNorm": ("gpt", "mamba", "retnet", "moe"),
    "rope_angles": ("gpt", "retnet", "moe"),
    "apply_rope": ("gpt", "retnet", "moe"),
    "causal_mask": ("gpt", "moe"),
    "Attention": ("gpt", "moe"),
    "Model.step": ("gpt", "moe"),
}


def definitions(path):
    """Top-level functions and classes, and methods as Class.method, mapped to their source text."""
    source = open(path).read()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = ast.get_source_segment(source, node)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = ast.get_source_segment(source, item)
    return found


@pytest.mark.parametrize("name", sorted(SHARED))
def test_copies_are_identical(name, models_dir):
    reference = definitions(os.path.join(models_dir, "gpt.py"))
    assert name in reference, f"gpt.py lost {name}"
    for model in SHARED[name][1:]:
        path = os.path.join(models_dir, f"{model}.py")
        if not os.path.exists(path):
            continue
        copy = definitions(path).get(name)
        assert copy is not None, f"{model}.py has no copy of {name}"
        assert copy == reference[name], f"{model}.py's {name} has drifted from gpt.py's: copy it again"
