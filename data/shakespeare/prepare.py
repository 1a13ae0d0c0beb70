"""
Shakespeare's works with the GPT-2 BPE: the same text as shakespeare_char, tokenised by tiktoken.

tiktoken.get_encoding("gpt2") downloads its two files from the internet the first time. Where that fails
(a machine that reaches only the Python package index), we build the same encoding from the GPT-2 ranks
that ship as whisper/assets/gpt2.tiktoken in the openai-whisper source distribution, with tiktoken's own
GPT-2 split pattern and <|endoftext|> = 50256. "Hello world" is [15496, 995] either way.

Writes train.bin, val.bin (uint16) and meta.pkl ({"vocab_size": 50257, "tokenizer": "gpt2"}).

    python data/shakespeare/prepare.py --tokenizer path/to/tokenizer.json

encodes the same text with a released checkpoint's own tokenizer instead (a Hugging Face tokenizer.json, or
the RWKV World vocabulary, rwkv_vocab_v20230424.txt): what train.py --init_from runs on first use, into a
folder of its own beside this file. Its train.bin, val.bin and meta.pkl go into the tokenizer file's folder;
the files are uint16, or uint32 (meta.pkl says "dtype") for vocabularies over 65,536.
"""
import argparse
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


def write_dataset(folder, meta, train_ids, val_ids):
    """meta.pkl, train.bin and val.bin (uint16, or uint32 past 65,536 tokens) into folder; val.bin last: it
    marks completion."""
    dtype = np.uint16 if meta["vocab_size"] <= 1 << 16 else np.uint32
    if dtype == np.uint32:
        meta = {**meta, "dtype": "uint32"}
    with open(os.path.join(folder, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)
    for ids, name in ((train_ids, "train.bin"), (val_ids, "val.bin")):
        np.array(ids, dtype=dtype).tofile(os.path.join(folder, name + ".tmp"))
        os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))


def prepare_with_tokenizer(path, text=None):
    """The text (default: the corpus) in the tokenizer of the file at path, through train.py's Tokenizer, into
    path's folder. Returns the train and val token counts."""
    spec = importlib.util.spec_from_file_location("nanozoo_train", os.path.join(HERE, "..", "..", "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    meta = train.tokenizer_meta(path)
    tok = train.Tokenizer(meta)
    text = load_char_prepare().load_text() if text is None else text
    n = int(0.9 * len(text))
    train_ids, val_ids = tok.encode(text[:n], special=False), tok.encode(text[n:], special=False)
    write_dataset(os.path.dirname(os.path.abspath(path)), meta, train_ids, val_ids)
    return len(train_ids), len(val_ids)


def main():
    text = load_char_prepare().load_text()
    enc = gpt2_encoding()
    n = int(0.9 * len(text))
    train_ids, val_ids = enc.encode_ordinary(text[:n]), enc.encode_ordinary(text[n:])
    write_dataset(HERE, {"vocab_size": enc.n_vocab, "tokenizer": "gpt2"}, train_ids, val_ids)
    print(f"shakespeare: {len(text):,} characters, GPT-2 BPE (vocabulary {enc.n_vocab}), "
          f"train {len(train_ids):,} tokens, val {len(val_ids):,} tokens")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Shakespeare's works as BPE tokens")
    parser.add_argument("--tokenizer", help="a checkpoint's tokenizer.json or RWKV World vocabulary (.txt): "
                        "encode with it, into its folder")
    tokenizer = parser.parse_args().tokenizer
    if tokenizer is None:
        main()
    else:
        n_train, n_val = prepare_with_tokenizer(tokenizer)
        print(f"shakespeare: the checkpoint's tokenizer ({os.path.basename(tokenizer)}), train {n_train:,} "
              f"tokens, val {n_val:,} tokens")
