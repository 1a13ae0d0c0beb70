"""
Shakespeare's works with the GPT-2 BPE: the same text as shakespeare_char, tokenised by tiktoken.

tiktoken.get_encoding("gpt2") downloads its two files from the internet the first time. Where that fails
(a machine that reaches only the Python package index), we build the same encoding from the GPT-2 ranks
that ship as whisper/assets/gpt2.tiktoken in the openai-whisper source distribution, with tiktoken's own
GPT-2 split pattern and <|endoftext|> = 50256. "Hello world" is [15496, 995] either way.

Writes train.bin, val.bin (uint16) and meta.pkl ({"vocab_size": 50257, "tokenizer": "gpt2"}).
"""
import base64
import hashlib
import importlib.util
import os
import pickle
import tarfile
import tempfile

import numpy as np
import tiktoken

HERE = os.path.dirname(os.path.abspath(__file__))
WHISPER = "openai-whisper==20250625"
WHISPER_SHA256 = "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96"


def load_char_prepare():
    """data/shakespeare_char/prepare.py, imported by path: it owns the corpus and the download helper."""
    path = os.path.join(HERE, "..", "shakespeare_char", "prepare.py")
    spec = importlib.util.spec_from_file_location("shakespeare_char_prepare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpt2_encoding():
    """tiktoken's GPT-2 encoding, by the normal route if it works, else from the whisper sdist's ranks."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:
        pass
    ranks_path = os.path.join(HERE, "gpt2.tiktoken")
    if not os.path.exists(ranks_path):
        print(f"tiktoken could not download GPT-2's files; taking them from {WHISPER} on the package "
              f"index...")
        with tempfile.TemporaryDirectory() as tmp:
            sdist = load_char_prepare().pip_download_sdist(WHISPER, tmp)
            with open(sdist, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != WHISPER_SHA256:
                    raise SystemExit(f"error: {os.path.basename(sdist)} does not have the expected sha256")
            with tarfile.open(sdist) as tar:
                (member,) = [m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken")]
                data = tar.extractfile(member).read()
        with open(ranks_path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(ranks_path + ".tmp", ranks_path)
    ranks = {}
    with open(ranks_path, "rb") as f:
        for line in f.read().splitlines():  # each line: base64(token bytes) rank
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's split pattern, as tiktoken defines it
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def main():
    char_prepare = load_char_prepare()
    text = char_prepare.load_text()
    enc = gpt2_encoding()
    n = int(0.9 * len(text))
    train_ids, val_ids = enc.encode_ordinary(text[:n]), enc.encode_ordinary(text[n:])
    with open(os.path.join(HERE, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": enc.n_vocab, "tokenizer": "gpt2"}, f)
    for ids, name in ((train_ids, "train.bin"), (val_ids, "val.bin")):  # val.bin last: it marks completion
        np.array(ids, dtype=np.uint16).tofile(os.path.join(HERE, name + ".tmp"))
        os.replace(os.path.join(HERE, name + ".tmp"), os.path.join(HERE, name))
    print(f"shakespeare: {len(text):,} characters, GPT-2 BPE (vocabulary {enc.n_vocab}), "
          f"train {len(train_ids):,} tokens, val {len(val_ids):,} tokens")


if __name__ == "__main__":
    main()
