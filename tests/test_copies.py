"""
Pieces that several model files need are written again in each file (one model, one file), each copy marked
where it stands with a line above it, the way Hugging Face marks and checks its copies:

    # Copied from gpt.py
    # Copied from gpt.py, with attention -> attend      (one name substituted, as a whole word)

These tests compare the source text: every marked copy equals its original, the shared pieces below are all
marked, and no definition is copied silently (identical in two files without a marker).
"""
import ast
import itertools
import os
import re

import pytest

from conftest import MODELS

MARKER = re.compile(r"# Copied from (\w+)\.py(?:, with (\w+) -> (\w+))?$")

# (name, the file with the original, the files that must carry a marked copy of it: at least these)
SHARED = [
    ("check_triton", "gpt", ("mamba", "rwkv", "retnet", "moe")),
    ("check_fields", "gpt", ("mamba", "rwkv", "retnet", "moe")),
    ("Model.generate", "gpt", ("mamba", "rwkv", "retnet", "moe")),
    ("Model.step", "gpt", ("mamba", "rwkv", "retnet", "moe")),
    ("RMSNorm", "gpt", ("mamba", "retnet", "moe")),
    ("rope_angles", "gpt", ("retnet", "moe")),
    ("apply_rope", "gpt", ("retnet", "moe")),
    ("causal_mask", "gpt", ("moe",)),
    ("attention_ref", "gpt", ("moe",)),
    ("Attention", "gpt", ("moe",)),
    ("Model.prefill", "gpt", ("moe",)),
    ("Model.__init__", "gpt", ("retnet",)),
    ("Model.param_groups", "gpt", ("retnet", "moe")),
    ("Model.read_prompt", "gpt", ("moe",)),  # attention's: a long prompt is cropped
    ("Model.read_prompt", "mamba", ("rwkv", "retnet")),  # a recurrent model's: any length, in pieces
]


def definitions(path):
    """Top-level functions and classes, and methods as Class.method: name -> (source text, marker match or
    None). The marker is the line just above the definition and its decorators (or its class's)."""
    source = open(path).read()
    lines = source.splitlines()
    found = {}

    def add(node, name, outer=None):
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        above = lines[first - 2].strip() if first >= 2 else ""
        found[name] = (ast.get_source_segment(source, node), MARKER.match(above) or outer)
        return found[name][1]

    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            marker = add(node, node.name)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):  # a marked class marks its methods
                    add(item, f"{node.name}.{item.name}", outer=marker)
    return found


@pytest.fixture(scope="module")
def files(models_dir):
    paths = {m: os.path.join(models_dir, f"{m}.py") for m in MODELS}
    return {m: definitions(p) for m, p in paths.items() if os.path.exists(p)}


@pytest.mark.parametrize("model", MODELS)
def test_marked_copies_equal_their_original(model, files):
    if model not in files:
        pytest.skip(f"no {model}.py")
    for name, (text, marker) in files[model].items():
        if marker is None:
            continue
        origin, old, new = marker.groups()
        where = f"{model}.py's {name} is marked as copied from {origin}.py"
        assert origin in files and origin != model, where
        assert name in files[origin], f"{where}, which has none"
        want = files[origin][name][0]
        if old:
            want = re.sub(rf"\b{old}\b", new, want)
        assert text == want, f"{model}.py's {name} has drifted from {origin}.py's: copy it again"


@pytest.mark.parametrize("name, origin, copies", SHARED, ids=[f"{o}.{n}" for n, o, _ in SHARED])
def test_shared_pieces_are_marked_copies(name, origin, copies, files):
    for model in copies:
        if model not in files:
            continue
        assert name in files[model], f"{model}.py has no copy of {origin}.py's {name}"
        marker = files[model][name][1]
        assert marker is not None and marker.group(1) == origin, \
            f"{model}.py's {name} needs the line '# Copied from {origin}.py' above it"


def test_no_silent_copies(files):
    """A definition whose text is the same in two files is a copy, and must say so."""
    for (a, defs_a), (b, defs_b) in itertools.combinations(files.items(), 2):
        for name in defs_a.keys() & defs_b.keys():
            (text_a, mark_a), (text_b, mark_b) = defs_a[name], defs_b[name]
            if text_a == text_b:
                assert mark_a is not None or mark_b is not None, \
                    f"{name} is the same in {a}.py and {b}.py: mark the copy '# Copied from {a}.py'"
