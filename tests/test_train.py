"""train.py and sample.py end to end, in subprocesses, on a tiny character dataset."""
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT

TINY = ["--n_layer", "1", "--d_model", "32", "--n_head", "2", "--n_kv_head", "2", "--mlp_hidden", "64",
        "--block_size", "16", "--batch_size", "4", "--eval_iters", "2", "--log_interval", "5",
        "--sample_tokens", "20"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("TRITON_INTERPRET", None)  # as a user's shell has it


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny character-level dataset in nanoGPT's format."""
    folder = tmp_path_factory.mktemp("tinydata")
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 60
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    ids[:n].tofile(folder / "train.bin")
    ids[n:].tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return str(folder)


def run(script, *args, check=True):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def train(data, out, *args, check=True):
    return run("train.py", "--dataset", data, "--out_dir", str(out), *TINY, *args, check=check)


def last_val(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return [r for r in rows if "val_loss" in r][-1]


def test_train_end_to_end(data, tmp_path):
    p = train(data, tmp_path, "--max_iters", "30", "--eval_interval", "10")
    for name in ("ckpt.pt", "config.json", "log.jsonl", "loss.png", "sample.txt"):
        assert os.path.getsize(tmp_path / name) > 0, name
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert all(r["tokens_per_sec"] > 0 for r in rows if "loss" in r)
    config = json.load(open(tmp_path / "config.json"))
    assert config["model_config"]["n_layer"] == 1 and config["settings"]["max_iters"] == 30
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 30 and ckpt["model_name"] == "gpt"
    assert "sample ----------" in p.stdout


def test_resume_continues_the_same_run(data, tmp_path):
    common = ["--eval_interval", "10", "--lr_decay_iters", "30", "--warmup_iters", "5"]
    train(data, tmp_path / "straight", "--max_iters", "30", *common)
    train(data, tmp_path / "split", "--max_iters", "20", *common)
    train(data, tmp_path / "split", "--max_iters", "30", "--resume")  # the other settings come from ckpt.pt
    a, b = last_val(tmp_path / "straight"), last_val(tmp_path / "split")
    assert a["iter"] == b["iter"] == 30
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-6
    wa = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_sigkill_leaves_a_loadable_checkpoint(data, tmp_path):
    rng = random.Random(0)
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", data, "--out_dir", str(tmp_path),
            *TINY, "--max_iters", "100000", "--eval_interval", "1", "--eval_iters", "1"]
    iters = []
    for attempt in range(4):  # kill it at random moments, mostly mid-save
        p = subprocess.Popen(args + (["--resume"] if attempt else []), env=ENV, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        saved = os.path.getmtime(tmp_path / "ckpt.pt") if attempt else 0
        deadline = time.time() + 120
        while time.time() < deadline and (not os.path.exists(tmp_path / "ckpt.pt") or
                                          os.path.getmtime(tmp_path / "ckpt.pt") == saved):
            time.sleep(0.02)  # until this run has saved a checkpoint of its own
        time.sleep(rng.uniform(0.0, 1.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        iters.append(ckpt["iter_num"])
    assert iters == sorted(iters) and iters[-1] > iters[0], f"resumed runs should move on: {iters}"
    train(data, tmp_path, "--resume", "--max_iters", str(iters[-1] + 3))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == iters[-1] + 3


def test_non_finite_loss_stops_and_keeps_the_checkpoint(data, tmp_path):
    train(data, tmp_path, "--max_iters", "4", "--eval_interval", "4")
    before = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    p = train(data, tmp_path, "--resume", "--max_iters", "50", "--learning_rate", "1e30", check=False)
    assert p.returncode == 1 and ("loss is nan" in p.stderr or "loss is inf" in p.stderr), p.stderr
    after = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert after["iter_num"] == before["iter_num"] == 4
    assert all(torch.isfinite(v).all() for v in after["model"].values())


def assert_usage_error(p, *words):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("args, words", [
    (["--model", "transformerxl"], ["unknown model", "gpt"]),
    (["--dataset", "nosuchdata"], ["unknown dataset", "shakespeare_char"]),
    (["--no_such_flag", "1"], ["unrecognized arguments", "--no_such_flag"]),
    (["--batch_size", "many"], ["--batch_size", "invalid int"]),
    (["--kernel", "cuda"], ["kernel"]),
    (["--n_head", "3"], ["n_head"]),
    (["--device", "cuda"], ["no CUDA GPU"]),
    (["--max_iters", "-5"], ["--max_iters"]),
    (["--max_iter", "5"], ["unrecognized arguments", "--max_iter"]),  # no abbreviations: see the next test
    (["--resume"], ["no checkpoint"]),
])
def test_bad_input_is_one_line(data, tmp_path, args, words):
    cmd = ["--dataset", data, "--out_dir", str(tmp_path / "run"), *args]
    assert_usage_error(run("train.py", *cmd, check=False), *words)


def test_resume_refuses_an_abbreviated_flag(data, tmp_path):
    """--resume keeps the checkpoint's settings except the flags typed; an abbreviation would be parsed but
    not seen as typed, so the checkpoint's value would silently win. Abbreviations are refused instead."""
    train(data, tmp_path, "--max_iters", "2", "--eval_interval", "2", "--sample_tokens", "0")
    p = run("train.py", "--out_dir", str(tmp_path), "--resume", "--max_iter", "4", check=False)
    assert_usage_error(p, "unrecognized arguments: --max_iter")
    train(data, tmp_path, "--resume", "--max_iters", "4")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 4


def test_zero_iterations_says_what_it_wrote(data, tmp_path):
    p = train(data, tmp_path, "--max_iters", "0")
    done = p.stdout.strip().splitlines()[-1]
    assert "config.json, log.jsonl, loss.png, sample.txt" in done and "no ckpt.pt" in done, done
    assert not (tmp_path / "ckpt.pt").exists() and (tmp_path / "sample.txt").exists()


def test_bad_checkpoints_for_resume(data, tmp_path):
    train(data, tmp_path, "--max_iters", "2", "--eval_interval", "2", "--sample_tokens", "0")
    assert_usage_error(run("train.py", "--model", "mamba", "--dataset", data, "--out_dir", str(tmp_path),
                           "--resume", check=False), "holds a 'gpt' model")
    other = os.path.join(os.path.dirname(data), "otherdata")
    shutil.copytree(data, other, dirs_exist_ok=True)
    with open(os.path.join(other, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "c"}, "stoi": {"a": 0, "b": 1, "c": 2}}, f)
    resume = ["--out_dir", str(tmp_path), "--resume"]
    assert_usage_error(run("train.py", "--dataset", other, *resume, check=False), "another vocabulary")
    assert_usage_error(run("train.py", "--dataset", data, *resume, "--n_layer", "3", check=False),
                       "--n_layer")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert_usage_error(run("sample.py", "--out_dir", str(tmp_path / "junk"), check=False), "not a readable")


def test_sample(data, tmp_path):
    train(data, tmp_path, "--max_iters", "10", "--eval_interval", "10", "--sample_tokens", "0")
    p = run("sample.py", "--out_dir", str(tmp_path), "--start", "All:", "--num_samples", "2",
            "--max_new_tokens", "30", "--device", "cpu")
    samples = p.stdout.split("---------------\n")
    assert len(samples) == 3 and all(s.startswith("All:") and len(s) >= 34 for s in samples[:2])
    greedy = [run("sample.py", "--out_dir", str(tmp_path), "--temperature", "0", "--max_new_tokens", "20",
                  "--seed", str(seed)).stdout for seed in (1, 2)]
    assert greedy[0] == greedy[1]  # temperature 0 does not depend on the seed
    assert_usage_error(run("sample.py", "--out_dir", str(tmp_path), "--start", "Zebra\u00e9", check=False),
                       "outside the model's vocabulary")
    # a prompt longer than the context: gpt keeps its last block_size tokens, as nanoGPT does, and says so
    p = run("sample.py", "--out_dir", str(tmp_path), "--start", "speak " * 10, "--num_samples", "2",
            "--max_new_tokens", "5")  # 60 characters; gpt's block_size here is 16
    note = "note: the prompt has 60 tokens; attention reads its last block_size=16"
    assert p.stderr.strip() == note, p.stderr
    assert all(s.startswith("speak " * 10) for s in p.stdout.split("---------------\n")[:2])
    assert_usage_error(run("sample.py", "--out_dir", str(tmp_path / "nothing"), check=False), "no checkpoint")


def test_ctrl_c_stops_cleanly(data, tmp_path):
    """SIGINT (Ctrl-C) during training: two lines on where the run stands and the command that continues
    it, the loss plot so far, exit 130; the checkpoint is the last one saved, and --resume goes on."""
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", data, "--out_dir", str(tmp_path),
            *TINY, "--max_iters", "100000", "--eval_interval", "5"]
    p = subprocess.Popen(args, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(tmp_path / "ckpt.pt"):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert p.returncode == 130 and len(lines) == 2 and "Traceback" not in err, err
    assert lines[0].startswith("stopped at iteration ") and "(Ctrl-C)" in lines[0], lines[0]
    kept = torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"]
    assert f"holds iteration {kept}" in lines[0], (lines[0], kept)
    assert lines[1] == f"continue with: python train.py --model gpt --out_dir {tmp_path} --resume", lines[1]
    assert os.path.getsize(tmp_path / "loss.png") > 0
    train(data, tmp_path, "--resume", "--max_iters", str(kept + 2))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == kept + 2


def test_threads_never_change_the_numbers(data, tmp_path):
    """train.py picks its CPU thread count as it goes (by timed steps, the first ones at every candidate):
    the loss curve is the same, bit for bit, as with the count fixed at the cores' (--threads N)."""
    cores = torch.get_num_threads()
    common = ["--max_iters", "12", "--eval_interval", "6", "--log_interval", "1"]
    auto = train(data, tmp_path / "auto", *common)
    train(data, tmp_path / "fixed", *common, "--threads", str(cores))
    assert "re-picked from" in auto.stdout
    rows = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("auto", "fixed")]
    numbers = [[(r["iter"], r.get("loss"), r.get("val_loss")) for r in log] for log in rows]
    assert numbers[0] == numbers[1]


def test_thread_picker_follows_the_load():
    """ThreadPicker on made-up step times: idle, 2 threads are fastest; a busy core makes them 4x slower,
    which it notices within a few steps and probes again; once the load is gone, the next probe goes back."""
    sys.path.insert(0, ROOT)
    import train
    threads = torch.get_num_threads()
    lines = []
    picker = train.ThreadPicker([2, 1], lines.append, every=50)
    load = {"busy": False}
    cost = lambda n: {2: 4.0, 1: 1.6}[n] if load["busy"] else {2: 1.0, 1: 1.6}[n]  # noqa: E731
    chosen = []
    try:
        for it in range(200):
            load["busy"] = 60 <= it < 120
            picker.before_step(it)
            n = torch.get_num_threads()
            picker.after_step(it, cost(n))
            chosen.append(picker.current)  # the count it runs at between probes
    finally:
        torch.set_num_threads(threads)
    assert set(chosen[10:60]) == {2}, "idle: 2 threads"
    assert set(chosen[70:120]) == {1}, "a busy core: 1 thread, found within a few steps"
    assert set(chosen[190:]) == {2}, "the load gone: back to 2 at the next probe"
    assert len(lines) == 2 and lines[0].startswith("threads: 2 -> 1 at iteration"), lines
    assert lines[1].startswith("threads: 1 -> 2"), lines


def test_same_numbers_drops_a_count_that_rounds_differently():
    sys.path.insert(0, ROOT)
    import train
    threads = torch.get_num_threads()
    model = torch.nn.Linear(3, 1)
    model.register_buffer("seen", torch.zeros(1), persistent=False)  # a non-persistent buffer comes back too
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]

    def step():  # a step whose numbers depend on the thread count, as LayerNorm's gradient can
        model.seen += 1
        model(torch.full((1, 3), float(torch.get_num_threads() % 2))).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    try:
        assert train.same_numbers(model, optimizer, step, [2, 4, 1]) == [2, 4]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before)) and model.seen.item() == 0
    assert not optimizer.state, "the optimizer's state is put back as it was (empty)"


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU is tested on Linux")
def test_ddp_two_processes_on_cpu(data, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    p = subprocess.run([*torchrun, os.path.join(ROOT, "train.py"), "--dataset", data, "--out_dir",
                        str(tmp_path), *TINY, "--max_iters", "6", "--eval_interval", "3", "--device", "cpu"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 6 and len(ckpt["rng"]) == 2
    assert "tokens per iteration" in p.stdout and "128 tokens per iteration" in p.stdout  # 2 x 4 x 16


def test_train_and_sample_a_model_file(data, tmp_path):
    """--model takes a model file's path (a student's copy): train.py trains it, the checkpoint names the
    file, sample.py --out_dir loads the same file back."""
    student = tmp_path / "handout"
    student.mkdir()
    shutil.copyfile(os.path.join(ROOT, "gpt.py"), student / "gpt.py")
    out = tmp_path / "run"
    train(data, out, "--model", str(student / "gpt.py"), "--max_iters", "3", "--eval_interval", "3")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_name"] == "gpt" and ckpt["model_file"] == str(student / "gpt.py")
    p = run("sample.py", "--out_dir", str(out), "--num_samples", "1", "--max_new_tokens", "5")
    assert p.stdout.strip()


def test_a_model_file_off_the_contract_stops_at_the_door(tmp_path):
    sys.path.insert(0, ROOT)
    import train as train_py
    config = "import dataclasses\n@dataclasses.dataclass\nclass Config:\n    n: int = 1\n"
    files = {"no_model.py": config, "broken.py": "def f(:\n",
             "no_step.py": config + "class Model:\n    def forward(self): pass\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cases = {"no_model.py": "lacks a Model class", "broken.py": "does not import: SyntaxError",
             "no_step.py": "lacks Model.step", "missing.py": "no such model file"}
    for name, want in cases.items():
        with pytest.raises(train_py.UsageError) as e:
            train_py.validate(["--model", str(tmp_path / name)])
        assert want in str(e.value) and "\n" not in str(e.value), str(e.value)
