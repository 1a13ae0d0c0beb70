"""bench.py end to end on tiny settings (--quick), and its MQAR task: right by construction, learnable by
gpt."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import MODELS, ROOT

sys.path.insert(0, ROOT)  # bench.py imports train.py from the repository
import bench  # noqa: E402

HAVE = [m for m in MODELS if os.path.exists(os.path.join(ROOT, f"{m}.py"))]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops gain nothing from threads, and on a busy machine spinning threads cost a lot; one thread also
    makes the MQAR training run the same on every machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_part(part, out, *args):
    bench.main([part, "--quick", "--out", str(out), *args])
    record = json.load(open(out / f"{part}.json"))
    with open(out / f"{part}.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{part}.png is not a PNG"
    for key in ("device", "torch", "triton", "date", "settings", "results"):
        assert key in record, key
    assert record["part"] == part
    assert record["results"] and not any("error" in r for r in record["results"])
    return record["results"]


def test_kernels(tmp_path):
    rows = run_part("kernels", tmp_path)
    cores = {core for core, (name, *_) in bench.CORES.items() if name in HAVE}
    assert {r["core"] for r in rows} == cores
    assert len(rows) == len(cores) * 2 * 2  # two lengths, forward and forward+backward, torch only on a CPU
    assert all(r["ms"] > 0 and r["TFLOP/s"] > 0 and r["GB/s"] > 0 for r in rows)


def test_kernels_triton_in_the_interpreter(tmp_path):
    rows = run_part("kernels", tmp_path, "--models", "gpt", "--kernels", "torch,triton,sdpa",
                    "--seq_lens", "32")
    assert [(r["kernel"], r["pass"]) for r in rows] == [(k, p) for p in ("fwd", "fwd+bwd") for k in
                                                        ("torch", "triton", "sdpa")]
    assert all(r["speedup"] > 0 for r in rows if r["kernel"] != "torch")


def test_train(tmp_path):
    rows = run_part("train", tmp_path)
    assert [r["model"] for r in rows] == HAVE
    assert all(r["tokens/s"] > 0 and r["params"] > 0 and r["config"]["d_model"] == 64 for r in rows)


def test_generate(tmp_path):
    rows = run_part("generate", tmp_path)
    state = {(r["model"], r["context"]): r["state_MB"] for r in rows}
    assert all(r["ms/token"] > 0 for r in rows)
    assert state["gpt", 48] > 2.5 * state["gpt", 16]  # a KV cache grows with the context...
    for m in {"mamba", "rwkv", "retnet"} & set(HAVE):
        assert state[m, 48] == state[m, 16] > 0  # ...a recurrent state does not


def test_compare(tmp_path):
    rows = run_part("compare", tmp_path)
    gpt = next(r for r in rows if r["model"] == "gpt")
    for r in rows:
        assert [c["iter"] for c in r["curve"]] == [0, 3, 6] and r["tokens"] == gpt["tokens"]
        assert all(0 < c["val_loss"] < 10 for c in r["curve"]) and r["seconds"] > 0
        assert abs(r["params"] / gpt["params"] - 1) < 0.5, (r["model"], r["params"], gpt["params"])


def test_compare_trains_with_train_pys_schedule(tmp_path):
    """bench.py's compare takes train.py's learning rate at each step: the schedule it records is the settings
    `python train.py --max_iters N --warmup_iters N // 20` resolves, and train.py's get_lr on them gives the
    learning rate it used after each evaluation."""
    import train
    rows = run_part("compare", tmp_path, "--models", "gpt", "--iters", "40", "--eval_every", "7")
    row = rows[0]
    flags = ["--max_iters", "40", "--warmup_iters", "2", "--learning_rate", "1e-3"]
    args, given, module = train.parse_args(flags)
    settings = train.read_settings(args, given, module)[0]
    assert row["schedule"] == {**settings, "out_dir": None}  # the same settings train.py would run with
    lrs = {c["iter"]: c["lr"] for c in row["curve"] if "lr" in c}
    assert sorted(lrs) == [0, 7, 14, 21, 28, 35]
    for it, lr in lrs.items():
        assert lr == train.get_lr(it, settings), (it, lr)
    assert lrs[0] < lrs[7] and lrs[35] < lrs[7]  # warmup, then decay


def test_mqar_part(tmp_path):
    rows = run_part("mqar", tmp_path)
    assert [r["model"] for r in rows] == HAVE
    assert all(0 <= r["accuracy"] <= 1 and r["state"] > 0 for r in rows)
    gpt = next(r for r in rows if r["model"] == "gpt")
    assert gpt["state"] == 2 * 2 * 64 * 32  # the KV cache: keys and values, 2 layers, d_model 64, L = 32


def test_script_and_bad_input(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *a], capture_output=True,
                                    text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    p = run("generate", "--quick", "--models", "gpt")
    assert p.returncode == 0, p.stderr
    assert os.path.exists(tmp_path / "bench_results" / "cpu" / "generate.json")  # the default --out
    p = run("--models", "nope")
    want = f"bench.py: error: unknown model 'nope'; choose from: {', '.join(HAVE)} (or e.g. mamba:version=2)"
    assert p.returncode == 2 and p.stderr.strip() == want, p.stderr
    for args, message in ((["--seq_lens", "a,b"], "bad --seq_lens"),
                          (["train", "--size", "d_model"], "bad Config settings"),
                          (["mqar", "--mqar_vocab", "30"], "4K <= L < vocab_size")):
        with pytest.raises(bench.UsageError, match=message):
            bench.main([*args, "--quick", "--out", str(tmp_path)])


@pytest.mark.skipif("mamba" not in HAVE, reason="no mamba.py")
@pytest.mark.parametrize("part", ["train", "generate", "compare", "mqar"])
def test_another_model_in_a_file(part, tmp_path):
    """A model file's other model by its Config fields, mamba:version=2 (Mamba-2), beside the default."""
    rows = run_part(part, tmp_path, "--models", "mamba,mamba:version=2")
    assert {r["model"] for r in rows} == {"mamba", "mamba:version=2"}
    if part == "train":
        assert [r["config"]["version"] for r in rows] == [1, 2]
    with pytest.raises(bench.UsageError, match="no field nope"):
        bench.main([part, "--quick", "--out", str(tmp_path), "--models", "mamba:nope=1"])


def test_threads(tmp_path):
    rows = run_part("threads", tmp_path)
    fixed = {r["threads"] for r in rows if r["load"] == "idle"} - {"picked"}
    assert fixed == {str(n) for n in bench.thread_counts()}
    picked = [r for r in rows if r["threads"] == "picked" and "vs_best_fixed" in r]
    assert [r["load"] for r in picked] == ["idle", "one core busy"] and all(r["tokens/s"] > 0 for r in picked)
    changing = next(r for r in rows if r["load"] == "comes and goes")
    assert any("load starts" in line for line in changing["switches"]), changing["switches"]


@pytest.mark.parametrize("L,K,V", [(64, 8, 256), (32, 4, 64), (16, 4, 17)])
def test_mqar_is_right_by_construction(L, K, V):
    x, y = bench.mqar(200, L, K, V, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (200, L) and x.dtype == y.dtype == torch.int64
    for xr, yr in zip(x.tolist(), y.tolist()):
        keys, values = xr[0:2 * K:2], xr[1:2 * K:2]
        assert len(set(keys)) == K and all(1 <= k < V // 2 for k in keys)
        assert len(set(values)) == K and all(V // 2 <= v < V for v in values)
        asked = [t for t in range(L) if yr[t] != -1]
        assert len(asked) == K and all(t >= 2 * K and t % 2 == 0 for t in asked)
        assert sorted(xr[t] for t in asked) == sorted(keys)  # every key is asked exactly once
        for t in asked:
            assert yr[t] == values[keys.index(xr[t])]  # the answer is the value paired with the key
        assert all(xr[t] == 0 for t in range(2 * K, L) if t not in asked)


def test_mqar_is_seeded_and_front_loaded():
    a = bench.mqar(500, 256, 16, 1024, torch.Generator().manual_seed(1))
    b = bench.mqar(500, 256, 16, 1024, torch.Generator().manual_seed(1))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], bench.mqar(500, 256, 16, 1024, torch.Generator().manual_seed(2))[0])
    slot = ((a[1] != -1).nonzero()[:, 1] - 2 * 16) // 2  # the query slots, 0 .. 111
    assert (slot < 28).float().mean() > 0.5  # power law: most queries in the first quarter of the slots
    with pytest.raises(bench.UsageError):
        bench.mqar(1, 32, 9, 64, torch.Generator())  # 4K > L


def test_gpt_learns_mqar(load_model):
    # as bench.py's mqar runs it, QK-norm on and a kv head per query head: without, two layers need more steps
    acc, state, loss = bench.train_mqar(load_model("gpt"), L=32, K=4, vocab_size=64, steps=150, batch_size=64,
                                        lr=1e-3, device=torch.device("cpu"), n_test=128, seed=0, n_layer=2,
                                        qk_norm=True, n_kv_head=4)
    assert acc >= 0.9, (acc, loss)
    assert state == 2 * 2 * 128 * 32  # keys and values of 32 positions, d_model 128, 2 layers
