"""
Bad input never reaches a traceback. Every flag train.py and sample.py accept (read from their parsers, so
a new flag is covered without editing this file) is tried with bad values of its type: each is refused at
the door (train.validate / sample.validate, the first thing main() does) with one line, which the scripts
print as `error: ...` and exit status 2, and nothing is written. The values a flag legitimately accepts are
in ACCEPTED. A few whole commands then run as a user would type them.
"""
import dataclasses
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from conftest import MODELS, ROOT

sys.path.insert(0, ROOT)
import sample  # noqa: E402
import train  # noqa: E402

HUGE_INT, HUGE_FLOAT = "99999999999999999999", "1e300"
BAD = {  # the values tried, by the flag's type
    int: ["0", "-1", "nan", "inf", HUGE_INT, "many", ""],
    float: ["0", "-1", "nan", "inf", HUGE_FLOAT, "many", ""],
    str: ["", "0", "-1", "nan", "many"],
    bool: ["maybe", "", "2"],
}
# flag (or model.flag, train.flag, sample.flag): the values of BAD it legitimately accepts, and why
ACCEPTED = {
    "max_iters": {"0", HUGE_INT},  # 0: evaluate and sample an untrained model; huge: train on and on
    "eval_interval": {HUGE_INT}, "log_interval": {HUGE_INT},  # huge: never after the first
    "eval_iters": {HUGE_INT}, "gradient_accumulation_steps": {HUGE_INT},  # slow, but each step fits
    "warmup_iters": {"0", HUGE_INT}, "lr_decay_iters": {"0", HUGE_INT},  # no warmup / no decay
    "learning_rate": {HUGE_FLOAT},  # finite: the run stops at the first non-finite loss, with a message
    "min_lr": {"0", HUGE_FLOAT}, "weight_decay": {"0", HUGE_FLOAT}, "grad_clip": {"0", HUGE_FLOAT},
    "beta1": {"0"}, "beta2": {"0"},  # AdamW without momentum / without a second-moment average
    "seed": {"0"}, "sample_tokens": {"0", HUGE_INT}, "threads": {"0"},  # 0 threads: picked as the run goes
    "train.out_dir": {"0", "-1", "nan", "many"},  # folder names (sample.py's must hold a checkpoint)
    "dt_rank": {"0"}, "dt_max": {HUGE_FLOAT},  # mamba: 0 is ceil(d_model / 16); any finite step size
    "n_shared": {"0"}, "aux_loss_coef": {"0", HUGE_FLOAT}, "z_loss_coef": {"0", HUGE_FLOAT},  # moe
    "bias_gamma": {"0", HUGE_FLOAT},
    "rope_theta": {HUGE_FLOAT}, "norm_eps": {HUGE_FLOAT},  # any positive base; any positive eps
    "decay_lora": {"0"}, "aaa_lora": {"0"}, "mv_lora": {"0"}, "gate_lora": {"0"},  # rwkv: 0 is the rule
    "mamba.chunk_size": {"0", HUGE_INT}, "retnet.chunk_size": {HUGE_INT},  # huge: one chunk; mamba's 0: below
    "headdim": {HUGE_INT}, "ngroups": {HUGE_INT},  # mamba: Mamba-2's fields; the default Mamba-1 reads none
    "sample.start": {"0", "-1", "nan", "many"},  # prompts
    "sample.top_k": {"0", HUGE_INT},  # 0: all tokens; more than the vocabulary: all tokens
    "sample.temperature": {"0", HUGE_FLOAT},  # 0: greedy; huge: uniform
}
SKIP = {"help", "resume"}  # flags without a value


def flags(parser):
    """(name, type) of every flag that takes a value."""
    for action in parser._actions:
        name = action.dest
        if not action.option_strings or name in SKIP:
            continue
        kind = {train.str2bool: bool, None: str}.get(action.type, action.type)
        yield name, kind


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny character dataset whose vocabulary covers the prompts tried."""
    folder = tmp_path_factory.mktemp("fuzzdata")
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    ids = np.arange(3000, dtype=np.uint16) % len(chars)
    ids.tofile(folder / "train.bin")
    ids.tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    return str(folder)


@pytest.fixture(scope="module")
def ckpt_dir(data, tmp_path_factory):
    """A checkpoint of a tiny gpt, written as train.py writes one, for sample.py."""
    folder = tmp_path_factory.mktemp("fuzzckpt")
    gpt = train.load_model_module("gpt")
    config = dict(vocab_size=96, block_size=16, n_layer=1, d_model=32, n_head=2, n_kv_head=2, mlp_hidden=64)
    model = gpt.Model(gpt.Config(**config))
    meta = pickle.load(open(os.path.join(data, "meta.pkl"), "rb"))
    train.save_checkpoint(str(folder / "ckpt.pt"), {"model_name": "gpt", "model": model.state_dict(),
                                                   "model_config": dataclasses.asdict(model.config),
                                                   "meta": meta})
    return str(folder)


def cases(script):
    if script == "sample":
        yield from ((None, name, kind) for name, kind in flags(sample.build_parser()))
        return
    for model in MODELS:
        module = train.load_model_module(model)
        for name, kind in flags(train.build_parser(module, model)):
            if model == "gpt" or name in {f.name for f in dataclasses.fields(module.Config)}:
                yield model, name, kind  # the settings once (with gpt), each model's own fields


def tried(script):
    return [(model, name, value) for model, name, kind in cases(script) for value in BAD[kind]]


def check(validate, argv, accepted, where):
    """validate(argv) refuses with one line, or accepts, as the table says; nothing is written."""
    before = sorted(os.listdir(where))
    if accepted:
        validate(argv)
    else:
        with pytest.raises(train.UsageError) as e:
            validate(argv)
        message = str(e.value)
        assert message and "\n" not in message and len(message) < 400, message
    assert sorted(os.listdir(where)) == before, "a refused or checked flag wrote a file"


def test_every_train_flag(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a file written anywhere relative would show up here
    for model, name, value in tried("train"):
        argv = ["--model", model, "--dataset", data, "--out_dir", str(tmp_path / "run"), f"--{name}", value]
        if name == "model":
            argv = ["--model", value, "--dataset", data, "--out_dir", str(tmp_path / "run")]
        try:
            accepted = value in set().union(*(ACCEPTED.get(k, set()) for k in (name, f"{model}.{name}",
                                                                                   f"train.{name}")))
            check(train.validate, argv, accepted, tmp_path)
        except BaseException as e:  # name the case
            raise AssertionError(f"train.py --model {model} --{name} {value!r}: {type(e).__name__}: {e}")
    assert not os.path.exists(tmp_path / "run")


def test_every_sample_flag(ckpt_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _, name, value in tried("sample"):
        argv = ["--out_dir", ckpt_dir, f"--{name}", value]
        try:
            accepted = value in ACCEPTED.get(name, set()) | ACCEPTED.get(f"sample.{name}", set())
            check(sample.validate, argv, accepted, tmp_path)
        except BaseException as e:
            raise AssertionError(f"sample.py --{name} {value!r}: {type(e).__name__}: {e}")


def test_accepted_table_is_not_stale():
    """Every flag the table names exists: a renamed flag must not leave a dead entry behind."""
    known = {name for _, name, _ in cases("train")} | {name for _, name, _ in cases("sample")}
    known |= {f"{model}.{name}" for model, name, _ in cases("train")}
    known |= {f"sample.{name}" for _, name, _ in cases("sample")}
    known |= {f"train.{name}" for _, name, _ in cases("train")}
    assert set(ACCEPTED) <= known, set(ACCEPTED) - known


def run(script, *args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("args, words", [
    (["--learning_rate", "nan"], ["--learning_rate"]),
    (["--n_layer", "0"], ["--n_layer must be at least 1"]),
    (["--out_dir", "a_file"], ["exists and is not a folder"]),
])
def test_the_commands_a_user_types(data, tmp_path, args, words):
    (tmp_path / "a_file").write_text("keep me")
    p = run("train.py", "--model", "gpt", "--dataset", data, *args, cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert sorted(os.listdir(tmp_path)) == ["a_file"] and (tmp_path / "a_file").read_text() == "keep me"


def test_a_fresh_run_never_overwrites_a_checkpoint(data, ckpt_dir, tmp_path):
    before = open(os.path.join(ckpt_dir, "ckpt.pt"), "rb").read()
    p = run("train.py", "--dataset", data, "--out_dir", ckpt_dir, cwd=tmp_path)
    assert p.returncode == 2 and "already holds a run" in p.stderr and "--resume" in p.stderr, p.stderr
    assert open(os.path.join(ckpt_dir, "ckpt.pt"), "rb").read() == before


def test_dataset_folder_names_the_missing_file(data, tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    for name in ("train.bin", "meta.pkl"):
        (folder / name).write_bytes(open(os.path.join(data, name), "rb").read())
    with pytest.raises(train.UsageError, match="has no val.bin"):
        train.find_dataset(str(folder))
    (folder / "train.bin").unlink()
    with pytest.raises(train.UsageError, match="has no train.bin and no val.bin"):
        train.find_dataset(str(folder))
    with pytest.raises(train.UsageError, match="unknown dataset"):
        train.find_dataset(str(tmp_path / "nothing_here"))
