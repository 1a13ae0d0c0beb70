"""
bench.py: speed, memory and quality benchmarks for every nanozoo model, with plots.

    python bench.py              # every part below; ~10 minutes on a two-core CPU, bigger settings on a GPU
    python bench.py kernels      # each model's core, torch vs triton (and sdpa), forward and forward+backward
    python bench.py train        # training tokens/s, peak memory and MFU, per model and kernel
    python bench.py generate     # per-token latency and state memory against context length
    python bench.py compare      # every model at ~equal parameters, same data, same tokens: val loss curves
    python bench.py mqar         # multi-query associative recall: accuracy against pairs K and length L
    python bench.py kernels --models gpt --seq_lens 256,1024 --kernels torch,triton  # any default: a flag

Each part prints a table and writes bench_results/<device>/<part>.json (the numbers, with the device, the
versions, the date and every setting) and <part>.png. `python bench.py --help` lists the settings with their
CPU and GPU defaults. The models are reached only through the contract (Config, Model, prefill, step,
flops_per_token, param_groups), so a new model file needs no code here; the one exception is `kernels`,
which calls each core directly through the small table CORES.

Times are the median of --repeats runs after --warmup runs, each ended by a device synchronise. Memory is
peak CUDA memory (GPU only) and, for generation, the size of the state that prefill and step carry. On a CPU
the Triton kernels run only in Triton's interpreter, which times Python, not a kernel: there the defaults
time the torch paths alone (--kernels torch,triton forces the interpreter, for debugging).
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from train import (MODELS, ROOT, UsageError, autocast_for, build_model, configure_optimizer, default_settings,
                   estimate_loss, get_batch, get_lr, load_dataset, load_model_module, peak_flops, pick_device,
                   pick_dtype, pick_threads, str2bool, thread_counts, train_step, vocab_size_for)

PARTS = ("kernels", "train", "generate", "compare", "mqar", "threads")  # "all": the first five
cores = torch.get_num_threads()  # torch's default, one per core: what each part returns to
GPT2_SMALL = ("d_model=768,n_layer=12,n_head=12,n_kv_head=12,mlp_hidden=2048,ffn_hidden=1536,"
              "expert_hidden=1024,block_size=1024,vocab_size=50304")  # each model takes the fields it has

# name: (CPU default, GPU default, --quick default, help). The CPU column keeps `python bench.py` near 10
# minutes on two cores; --quick is seconds, for the tests. A list default takes a comma-separated flag.
SETTINGS = {
    "kernels": (["torch"], ["torch", "triton", "sdpa"], ["torch"],
                "kernels, train: paths to time (sdpa: attention)"),
    "seq_lens": ([256, 1024, 4096], [1024, 2048, 4096, 8192, 16384], [32, 64], "kernels: sequence lengths T"),
    "tokens": (4096, 16384, 64, "kernels: tokens per call; batch B = max(1, tokens // T)"),
    "width": (128, 1024, 64, "kernels: model width d (heads of 64; d_inner 2d for the scan)"),
    "warmup": (2, 3, 1, "kernels, train: untimed runs first"),
    "repeats": (5, 10, 2, "kernels, train: timed runs (the median is reported)"),
    "model_kernel": ("torch", "triton", "torch", "generate, compare, mqar: the kernel every model runs"),
    "size": ("", GPT2_SMALL, "n_layer=1,d_model=64,block_size=16",
             "train, generate, threads: Config fields, k=v,..."),
    "batch_size": (12, 16, 2, "train, compare: sequences per step"),
    "contexts": ([128, 512, 2048, 8192], [1024, 4096, 16384, 32768], [16, 48], "generate: context lengths"),
    "gen_steps": (16, 32, 3, "generate: decoding steps timed at each context"),
    "prefill_chunk": (1024, 4096, 32, "generate: tokens per prefill call (bounds attention's memory)"),
    "dataset": ("shakespeare_char", "shakespeare_char", "shakespeare_char", "compare: a dataset in data/"),
    "compare_size": ("", "n_layer=6,n_head=6,n_kv_head=6,mlp_hidden=1024,ffn_hidden=768,expert_hidden=512,"
                     "d_model=384,block_size=256", "n_layer=1,d_model=64,block_size=16",
                     "compare: Config fields; d_model is then refit per model to gpt's parameter count"),
    "iters": (250, 2000, 6, "compare: training steps per model (equal tokens)"),
    "seconds": (0.0, 0.0, 0.0, "compare: if > 0, train each model this long instead (equal wall time)"),
    "learning_rate": (1e-3, 1e-3, 1e-3, "compare: peak learning rate (warmup, then cosine to a tenth)"),
    "eval_every": (25, 250, 3, "compare: steps between val-loss evaluations"),
    "eval_iters": (4, 40, 2, "compare: batches per evaluation"),
    "mqar_seq_lens": ([32], [64, 256], [32], "mqar: sequence lengths L"),
    "mqar_pairs": ([4, 8], [4, 16, 64], [4], "mqar: key-value pairs K (4K <= L)"),
    "mqar_vocab": (64, 8192, 64, "mqar: vocabulary, keys in the lower half, values in the upper"),
    "mqar_d_model": (128, 128, 64, "mqar: model width"),
    "mqar_layers": (2, 2, 2, "mqar: layers (one attention layer cannot solve it)"),
    "mqar_config": ("qk_norm=true,n_kv_head=4", "qk_norm=true,n_kv_head=4", "qk_norm=true,n_kv_head=4",
                    "mqar: Config fields for every model that has them (attention with a kv head per query "
                    "head and QK-norm learns recall in fewer steps)"),
    "mqar_steps": (250, 1000, 10, "mqar: training steps, a fresh batch each"),
    "mqar_batch": (64, 256, 8, "mqar: examples per step"),
    "mqar_lrs": ([1e-3], [1e-3, 1e-2], [1e-3], "mqar: learning rates tried; the best is reported (in the "
                 "README's longer CPU runs mamba learned recall at 1e-2 only)"),
    "mqar_test": (256, 1000, 16, "mqar: held-out examples per (L, K)"),
    "threads_models": (["gpt", "mamba"], ["gpt", "mamba"], ["gpt"], "threads: the models train.py trains"),
    "threads_iters": (300, 300, 12, "threads: iterations of each timed train.py run"),
    "threads_rounds": (2, 2, 1, "threads: interleaved rounds of every setting (the median is reported)"),
}


# ---------------------------------------------------------------------------------------------------
# Shared helpers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_mb(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def failure(e):
    """One line for a row that could not be timed."""
    if isinstance(e, torch.OutOfMemoryError):
        return "out of memory"
    return f"{type(e).__name__}: {str(e).strip()[:200]}"


def fields(module, spec):
    """The Config fields of `spec` ("d_model=256,n_layer=8") that this model has, typed like their
    defaults."""
    types = {f.name: type(f.default) for f in dataclasses.fields(module.Config)}
    try:
        pairs = [item.split("=") for item in spec.split(",") if item]
        return {k: str2bool(v) if types[k] is bool else types[k](v) for k, v in pairs if k in types}
    except (ValueError, argparse.ArgumentTypeError):
        raise UsageError(f"bad Config settings {spec!r}; expected name=value,name=value,...")


def model_spec(name):
    """A model as bench.py names it: a model file, or a file and the Config fields that pick another model in
    it, "mamba:version=2" (more fields joined by ":"). Returns the module and those fields."""
    file, _, spec = name.partition(":")
    module = load_model_module(file)
    own = fields(module, spec.replace(":", ","))
    unknown = {item.split("=")[0] for item in spec.split(":") if item} - set(own)
    if unknown:
        raise UsageError(f"{file}.Config has no field {', '.join(sorted(unknown))} (in --models {name!r})")
    return module, own


def n_params(module, config):
    with torch.device("meta"):  # shapes only: no memory, no init
        return sum(p.numel() for p in module.Model(module.Config(**config)).parameters())


def tensors(state):
    """Every tensor in a model's state (a KV cache or a recurrent state), however it is nested."""
    if torch.is_tensor(state):
        yield state
    elif isinstance(state, (list, tuple, dict)):
        for s in state.values() if isinstance(state, dict) else state:
            yield from tensors(s)


def build(module, config, device):
    """The model on device, or None, with a note, where its Config refuses these settings."""
    try:
        return build_model(module, config).to(device)
    except UsageError as e:
        print(f"{module.__name__}: skipped ({e})")


def schedule(lr, steps, **settings):
    """train.py's settings for a run of `steps` at peak learning rate lr: warmup over the first 5% of the
    steps, then cosine decay to lr / 10, as `python train.py --max_iters steps --warmup_iters steps // 20`
    would take it. get_lr(it, schedule(...)) is the learning rate at step it."""
    return default_settings(learning_rate=lr, max_iters=steps, warmup_iters=steps // 20, **settings)


class Table:
    """Prints a header, then each row as it comes. Columns are (key, format, width); None prints as '-'."""

    def __init__(self, columns):
        self.columns = columns
        print(" ".join(f"{k:>{w}}" for k, _, w in columns))

    def row(self, r):
        cells = ("-" if r.get(k) is None else format(r[k], f) for k, f, _ in self.columns)
        print(" ".join(f"{c:>{w}}" for c, (_, _, w) in zip(cells, self.columns)), flush=True)


def log_x(ax, ticks, label):
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(ticks)), [str(t) for t in sorted(set(ticks))])
    ax.minorticks_off()
    ax.set_xlabel(label)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def environment(device, dtype):
    triton = importlib.util.find_spec("triton")
    cpu = platform.processor() or platform.machine()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"{device.type} ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
            "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
            "triton": __import__("triton").__version__ if triton else None, "cuda": torch.version.cuda,
            "python": platform.python_version(), "platform": platform.platform(), "commit": commit,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def save(out, part, env, settings, results, plot):
    """<out>/<part>.json with everything, and <out>/<part>.png drawn by plot(plt, results)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{part}.json"), "w") as f:
        json.dump({"part": part, **env, "settings": settings, "results": results}, f, indent=1)
    plt = pyplot()
    fig = plot(plt, results)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{part}.png"), dpi=110)
    plt.close(fig)
    print(f"wrote {out}/{part}.json and {part}.png")


# ---------------------------------------------------------------------------------------------------
# 1. kernels. The one per-model table in bench.py: for each core, its model file, function, the kernels it
# takes, and how to call it on random inputs shaped as its model makes them (batch B, length T, width d).
# Each case returns (call(kernel) -> output, the inputs to differentiate, forward FLOPs). FLOPs count a
# multiply-add as 2; bytes (computed generically) are the inputs read once plus the output written once.
# Forward+backward counts 3x both, the usual 1 + 2.


def attention_case(f, B, T, d, device, dtype):
    H, D = d // 64, 64
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype) for _ in range(3))
    return lambda kernel: f(q, k, v, kernel), [q, k, v], 2 * B * H * T * T * D  # QK^T and PV, half causal


def scan_case(f, B, T, d, device, dtype):
    Di, N = 2 * d, 16
    x, z = (torch.randn(B, T, Di, device=device, dtype=dtype) for _ in range(2))
    Bm, C = (torch.randn(B, T, N, device=device, dtype=dtype) for _ in range(2))
    dt = F.softplus(torch.randn(B, T, Di, device=device) - 4)  # ~0.02, as Mamba's dt init
    A = -torch.arange(1, N + 1, device=device, dtype=torch.float32).repeat(Di, 1)  # S4D-real, (Di, N)
    D = torch.ones(Di, device=device)
    return (lambda kernel: f(x, dt, A, Bm, C, D, z, kernel=kernel)[0], [x, dt, A, Bm, C, D, z],
            7 * B * T * Di * N)  # exp(dt A), dt B x, a h + b, C . h per (channel, state), as mamba.py counts


def ssd_case(f, B, T, d, device, dtype):
    # heads of 64 (official), one group of B and C, and N = 16: a layer's state H P N = Di * 16 is scan_case's
    # (the paper's comparison is at equal state size)
    Di, P, N, Q = 2 * d, 64, 16, 64
    H = Di // P
    x = torch.randn(B, T, H, P, device=device, dtype=dtype)
    Bm, C = (torch.randn(B, T, 1, N, device=device, dtype=dtype) for _ in range(2))
    dt = F.softplus(torch.randn(B, T, H, device=device) - 4)  # ~0.02, as Mamba-2's dt init
    A = -torch.empty(H, device=device).uniform_(1, 16)  # A_init_range
    D = torch.ones(H, device=device)
    return (lambda kernel: f(x, dt, A, Bm, C, D, kernel=kernel, chunk_size=Q)[0], [x, dt, A, Bm, C, D],
            B * T * (2 * min(Q, T) * (N + Di) + 4 * Di * N))  # C B^T and its mask times x~, states in and out


def wkv7_case(f, B, T, d, device, dtype):
    H, N = d // 64, 64
    r, k, v = (torch.randn(B, T, H, N, device=device, dtype=dtype) for _ in range(3))
    w = torch.exp(-math.exp(-0.5) * torch.sigmoid(torch.randn(B, T, H, N, device=device)))  # in (0.545, 1)
    kk = F.normalize(torch.randn(B, T, H, N, device=device), dim=-1)  # w, a, b in fp32, as TimeMix makes them
    a, b = -kk, kk * torch.rand(B, T, H, N, device=device)  # -kk, kk * alpha
    log_w = w.log().detach()  # for fla, which takes the log of the decay

    def call(kernel):
        if kernel == "fla":  # flash-linear-attention's chunked WKV-7 (a GPU reference, not a dependency)
            from fla.ops.rwkv7 import chunk_rwkv7
            log_w.grad = None
            log_w.requires_grad_(w.requires_grad)  # its gradient in place of w's
            return chunk_rwkv7(*(x.to(r.dtype) for x in (r, log_w, k, v, a, b)))[0]
        return f(r, w, k, v, a, b, kernel=kernel)[0]
    return call, [r, w, k, v, a, b], 10 * B * T * H * N * N  # ~5 multiply-adds per state element per token


def retention_case(f, B, T, d, device, dtype):
    H, dk, dv, C = d // 64, 64, 128, 64
    q, k = (torch.randn(B, H, T, dk, device=device, dtype=dtype) * dk ** -0.5 for _ in range(2))
    v = torch.randn(B, H, T, dv, device=device, dtype=dtype)
    gamma = 1 - 2.0 ** (-5 - torch.arange(H, device=device, dtype=torch.float32))
    return (lambda kernel: f(q, k, v, gamma, kernel=kernel, chunk_size=C)[0], [q, k, v],
            B * H * T * (2 * min(T, C) * (dk + dv) + 4 * dk * dv))  # in-chunk scores and sum, state i/o


def experts_case(f, B, T, d, device, dtype):
    E, k, h, N = 8, 2, 11 * d // 8, B * T  # moe.py's defaults: 8 experts, top-2, hidden 176 at d = 128
    x = torch.randn(N, d, device=device, dtype=dtype)
    gates, ids = torch.randn(N, E, device=device).softmax(-1).topk(k, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    w_fc = torch.randn(E, d, 2 * h, device=device, dtype=dtype) * d ** -0.5
    w_proj = torch.randn(E, h, d, device=device, dtype=dtype) * h ** -0.5
    return (lambda kernel: f(x, ids, gates, (w_fc, w_proj), kernel=kernel), [x, gates, w_fc, w_proj],
            6 * N * k * d * h)  # three d x h matmuls per routed token


CORES = {  # core: (model file, function, kernels it takes, case)
    "attention": ("gpt", "attention", ("torch", "sdpa", "triton"), attention_case),
    "selective_scan": ("mamba", "selective_scan", ("torch", "triton"), scan_case),
    "ssd": ("mamba", "ssd", ("torch", "triton"), ssd_case),  # Mamba-2's core
    "wkv7": ("rwkv", "wkv7", ("torch", "triton", "fla"), wkv7_case),  # fla: only where it is installed
    "retention": ("retnet", "retention", ("torch", "triton"), retention_case),
    "experts": ("moe", "experts", ("torch", "triton"), experts_case),
}


def time_call(run, device, warmup, repeats):
    """Median seconds of run() over `repeats` calls after `warmup`, the peak CUDA memory (MB) meanwhile, and
    run()'s last result."""
    for _ in range(warmup):
        run()
    sync(device)
    reset_peak(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak_mb(device), out


def bench_kernels(s, models, device, dtype):
    autocast = autocast_for(device, dtype)
    table = Table([("core", "", 14), ("kernel", "", 6), ("T", "d", 6), ("B", "d", 4), ("pass", "", 7),
                   ("ms", ".3f", 9), ("TFLOP/s", ".3g", 8), ("GB/s", ".3g", 7), ("peak_MB", ".0f", 7),
                   ("speedup", ".2f", 7)])
    rows = []
    have_fla = importlib.util.find_spec("fla") is not None
    if "fla" in s["kernels"] and not have_fla:
        print("note: fla (flash-linear-attention) is not installed: no fla timings")
    for core, (name, fn_name, takes, case) in CORES.items():
        if name not in {m.partition(":")[0] for m in models}:
            continue
        fn = getattr(load_model_module(name), fn_name, None)
        if fn is None:
            print(f"{core}: skipped ({name}.py has no {fn_name}() yet)")
            continue
        for T in s["seq_lens"]:
            B = max(1, s["tokens"] // T)
            torch.manual_seed(0)
            call, inputs, flops = case(fn, B, T, s["width"], device, dtype)
            for backward in (False, True):
                for t in inputs:
                    t.requires_grad_(backward and t.is_floating_point())
                group = []
                for kernel in [k for k in s["kernels"] if k in takes and (k != "fla" or have_fla)]:
                    def run():
                        for t in inputs:
                            t.grad = None
                        with autocast, torch.set_grad_enabled(backward):
                            out = call(kernel)
                        if backward:
                            out.backward(torch.ones_like(out))
                        return out

                    row = {"core": core, "kernel": kernel, "T": T, "B": B, "d": s["width"],
                           "pass": "fwd+bwd" if backward else "fwd"}
                    try:
                        sec, peak, out = time_call(run, device, s["warmup"], s["repeats"])
                    except Exception as e:  # out of memory, or a path that fails here: note it, go on
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        row["error"] = failure(e)
                        print(f"{core} {kernel} T={T}: {row['error']}")
                    else:
                        n = 3 if backward else 1
                        nbytes = n * sum(t.numel() * t.element_size() for t in inputs + [out])
                        row.update({"ms": 1e3 * sec, "flops": n * flops, "bytes": nbytes, "peak_MB": peak,
                                    "TFLOP/s": n * flops / sec / 1e12, "GB/s": nbytes / sec / 1e9})
                    group.append(row)
                base = next((r["ms"] for r in group if r["kernel"] == "torch" and "ms" in r), None)
                for r in group:
                    if base and "ms" in r and r["kernel"] != "torch":
                        r["speedup"] = base / r["ms"]  # > 1: faster than the torch path
                    table.row(r)
                rows += group
    return rows


def plot_kernels(plt, rows):
    cores = list(dict.fromkeys(r["core"] for r in rows))
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(cores)), figsize=(3.8 * max(1, len(cores)), 3.6), squeeze=False)
    for ax, core in zip(axes[0], cores):
        for kernel in kernels:
            for pass_, style in (("fwd", "o-"), ("fwd+bwd", "s--")):
                pts = [(r["T"], r["ms"] / r["B"]) for r in rows if "ms" in r and
                       (r["core"], r["kernel"], r["pass"]) == (core, kernel, pass_)]
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{kernels.index(kernel)}", label=f"{kernel} {pass_}")
        log_x(ax, [r["T"] for r in rows], "sequence length T")
        ax.set(yscale="log", ylabel="ms per sequence", title=core)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return fig


# ---------------------------------------------------------------------------------------------------
# 2. train: tokens/s, peak memory and MFU of a full training step (forward, backward, AdamW), per model and
# kernel


def bench_train(s, models, device, dtype):
    autocast = autocast_for(device, dtype)
    table = Table([("model", "", 6), ("kernel", "", 6), ("params", ",d", 11), ("ms/iter", ".1f", 8),
                   ("tokens/s", ",.0f", 9), ("TFLOP/s", ".3g", 8), ("mfu", ".1%", 6), ("peak_MB", ".0f", 7)])
    rows = []
    for name in models:
        module, own = model_spec(name)
        for kernel in s["kernels"]:
            torch.manual_seed(0)
            model = build(module, {**fields(module, s["size"]), **own, "kernel": kernel}, device)
            if model is None:  # e.g. kernel="sdpa", which only gpt has
                continue
            c, B = model.config, s["batch_size"]
            x = torch.randint(c.vocab_size, (B, c.block_size), device=device)
            y = torch.randint(c.vocab_size, (B, c.block_size), device=device)
            optimizer = configure_optimizer(model, default_settings(), device)
            row = {"model": name, "kernel": kernel, "params": sum(p.numel() for p in model.parameters()),
                   "config": dataclasses.asdict(c), "batch_size": B}
            try:  # on a CPU at each thread count train.py may pick (thread_counts), keeping the fastest
                timed = []
                for n in thread_counts() if device.type == "cpu" else [None]:
                    if n is not None:
                        torch.set_num_threads(n)
                    step = lambda: train_step(model, optimizer, x, y, autocast)
                    timed.append((*time_call(step, device, s["warmup"], s["repeats"])[:2], n))
                sec, peak, row["threads"] = min(timed, key=lambda t: t[0])
            except Exception as e:
                row["error"] = failure(e)
                print(f"{name} {kernel}: {row['error']}")
            else:
                flops = model.flops_per_token(c.block_size) * B * c.block_size / sec
                peak_f = peak_flops(device)
                row.update({"ms/iter": 1e3 * sec, "tokens/s": B * c.block_size / sec, "TFLOP/s": flops / 1e12,
                            "mfu": flops / peak_f if peak_f else None, "peak_MB": peak})
            finally:
                torch.set_num_threads(cores)
            table.row(row)
            rows.append(row)
            model = optimizer = None  # free it before the next one is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def plot_train(plt, rows):
    rows = [r for r in rows if "tokens/s" in r]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.barh([f"{r['model']} ({r['kernel']})" for r in rows], [r["tokens/s"] for r in rows])
    ax.invert_yaxis()
    ax.set(xlabel="training tokens/s (forward + backward + AdamW)", title="training throughput")
    ax.grid(alpha=0.3, axis="x")
    return fig


# ---------------------------------------------------------------------------------------------------
# 3. generate: prefill a context, then time single decoding steps; memory is the state that step carries


@torch.no_grad()
def bench_generate(s, models, device, dtype):
    autocast = autocast_for(device, dtype)
    table = Table([("model", "", 6), ("context", "d", 7), ("prefill_s", ".2f", 9), ("ms/token", ".2f", 8),
                   ("state_MB", ".3f", 9), ("peak_MB", ".0f", 7)])
    rows = []
    for name in models:
        module, own = model_spec(name)
        torch.manual_seed(0)
        size = {**fields(module, s["size"]), **own,
                "block_size": max(s["contexts"]) + s["gen_steps"], "kernel": s["model_kernel"]}  # no sliding
        model = build(module, size, device)
        if model is None:
            continue
        model.eval()
        V = model.config.vocab_size
        for context in s["contexts"]:
            row = {"model": name, "context": context}
            try:
                with autocast:
                    t0, state = time.perf_counter(), None
                    prompt = torch.randint(V, (1, context), device=device)
                    for chunk in prompt.split(s["prefill_chunk"], dim=1):
                        _, state = model.prefill(chunk, state)  # in pieces: the contract makes it exact
                    sync(device)
                    row["prefill_s"] = time.perf_counter() - t0
                    row["state_MB"] = sum(t.numel() * t.element_size() for t in tensors(state)) / 2**20
                    reset_peak(device)
                    token, times = torch.randint(V, (1,), device=device), []
                    for _ in range(s["gen_steps"]):
                        t0 = time.perf_counter()
                        _, state = model.step(token, state)
                        sync(device)
                        times.append(time.perf_counter() - t0)
                row.update({"ms/token": 1e3 * statistics.median(times), "peak_MB": peak_mb(device)})
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            table.row(row)
            rows.append(row)
            del state
        del model
    return rows


def plot_generate(plt, rows):
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = [r for r in rows if r["model"] == name and "ms/token" in r]
        a.plot([r["context"] for r in pts], [r["ms/token"] for r in pts], "o-", label=name)
        b.plot([r["context"] for r in pts], [r["state_MB"] for r in pts], "o-", label=name)
    a.set(yscale="log", ylabel="ms per generated token", title="decoding latency (batch 1)")
    b.set(yscale="log", ylabel="MB", title="state carried by step()")
    for ax in (a, b):
        log_x(ax, [r["context"] for r in rows], "context length")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------------
# 4a. compare: every model at about gpt's parameter count, trained on the same batches for the same tokens
# (or the same wall time), with val loss along the way


def fit_d_model(module, config, target, d0):
    """The d_model, a multiple of 16 up to 2 * d0, whose parameter count is nearest target."""
    best = None
    for d in range(16, 2 * d0 + 1, 16):
        try:
            n = n_params(module, {**config, "d_model": d})
        except ValueError:  # a width this model's Config refuses (e.g. not a multiple of its head size)
            continue
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (d, n)
    if best is None:
        raise UsageError(f"no d_model up to {2 * d0} suits {module.__name__}.Config; set --compare_size")
    return best


def bench_compare(s, models, device, dtype):
    autocast = autocast_for(device, dtype)
    folder, meta = load_dataset(s["dataset"])
    vocab = vocab_size_for(meta)
    gpt = load_model_module("gpt")
    reference = gpt.Config(**fields(gpt, s["compare_size"]), vocab_size=vocab)
    target = n_params(gpt, dataclasses.asdict(reference))
    print(f"every model gets the d_model that brings it nearest gpt's {target:,} parameters")
    table = Table([("model", "", 6), ("d_model", "d", 7), ("params", ",d", 9), ("iters", "d", 5),
                   ("tokens", ",d", 9), ("seconds", ".1f", 7), ("tokens/s", ",.0f", 8),
                   ("val_loss", ".4f", 8)])
    rows = []
    for name in models:
        module, own = model_spec(name)
        config = {**fields(module, s["compare_size"]), **own, "vocab_size": vocab,
                  "kernel": s["model_kernel"]}
        config["d_model"], params = fit_d_model(module, config, target, reference.d_model)
        torch.manual_seed(s["seed"])
        model = build_model(module, config).to(device)
        T, B = model.config.block_size, s["batch_size"]
        # train.py's schedule over the run's steps; by wall time (--seconds), over 1000 steps of the clock
        steps = s["iters"] if s["seconds"] <= 0 else 1000
        sched = schedule(s["learning_rate"], steps)
        optimizer = configure_optimizer(model, sched, device)
        batches = torch.Generator().manual_seed(s["seed"])  # the same batches for every model
        probe = get_batch(folder, "train", B, T, torch.Generator().manual_seed(0), device)
        check = lambda: train_step(model, optimizer, *probe, autocast)
        picker = pick_threads(0, device, model, optimizer, check, print)  # as train.py's
        curve, it, seconds = [], 0, 0.0
        while True:
            done = seconds >= s["seconds"] if s["seconds"] > 0 else it >= s["iters"]
            if it % s["eval_every"] == 0 or done:
                val = estimate_loss(model, folder, B, T, s["eval_iters"], device, autocast, splits=("val",))
                curve.append({"iter": it, "tokens": it * B * T, "seconds": seconds, "val_loss": val["val"]})
            if done:
                break
            t0 = time.perf_counter()
            lr = get_lr(it if s["seconds"] <= 0 else round(steps * seconds / s["seconds"]), sched)
            curve[-1].setdefault("lr", lr)  # the learning rate of the first step after each evaluation
            x, y = get_batch(folder, "train", B, T, batches, device)
            if picker:
                picker.before_step(it)
            train_step(model, optimizer, x, y, autocast, lr=lr)
            sync(device)
            if picker:
                picker.after_step(it, time.perf_counter() - t0)
            seconds += time.perf_counter() - t0  # training time only: evaluation is not counted
            it += 1
        torch.set_num_threads(cores)
        row = {"model": name, "d_model": config["d_model"], "params": params, "iters": it,
               "tokens": it * B * T, "seconds": seconds, "tokens/s": it * B * T / seconds,
               "val_loss": curve[-1]["val_loss"],
               "flops_per_token": model.flops_per_token(T), "config": dataclasses.asdict(model.config),
               "schedule": sched, "curve": curve}
        table.row(row)
        rows.append(row)
    return rows


def plot_compare(plt, rows):
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in rows:
        label = f"{r['model']} ({r['params'] / 1e6:.2f}M)"
        a.plot([c["tokens"] for c in r["curve"]], [c["val_loss"] for c in r["curve"]], "-", label=label)
        b.plot([c["seconds"] for c in r["curve"]], [c["val_loss"] for c in r["curve"]], "-", label=label)
    a.set(xlabel="training tokens", ylabel="val loss", title="equal parameters, same data")
    b.set(xlabel="training seconds", ylabel="val loss", title="against wall time (this device)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------------
# 4b. mqar: multi-query associative recall, the task where a fixed-size state falls behind attention's KV
# cache


def mqar(batch_size, L, K, vocab_size, generator, power_a=0.01):
    """Multi-query associative recall (Arora et al. 2023, "Zoology"), as zoology/data/multiquery_ar.py builds
    it (random_non_queries=False): K key-value pairs, keys from 1..V/2-1 and values from V/2..V-1 (so the id
    tells which), then each key once more as a query in the remaining L - 2K positions, at even offsets whose
    slot i is drawn with probability ~ i^(a-1) (a = 0.01: most queries come soon after the pairs, a few much
    later), and 0 elsewhere. The target at a query is the value its key was paired with (the next-token target
    at that position); -1, ignored by the loss, everywhere else. Returns x, y: (batch_size, L) int64."""
    if L % 2 or 4 * K > L or vocab_size <= L:
        raise UsageError(f"MQAR needs an even L with 4K <= L < vocab_size; got L={L}, K={K}, "
                         f"vocab_size={vocab_size}")
    half = vocab_size // 2
    keys = torch.rand(batch_size, half - 1, generator=generator).argsort(1)[:, :K] + 1  # (B, K), distinct
    values = torch.rand(batch_size, vocab_size - half, generator=generator).argsort(1)[:, :K] + half  # (B, K)
    x = torch.zeros(batch_size, L, dtype=torch.int64)
    x[:, 0:2 * K:2], x[:, 1:2 * K:2] = keys, values
    p = torch.arange(1, (L - 2 * K) // 2 + 1, dtype=torch.float64) ** (power_a - 1)  # query slots' weights
    slot = torch.multinomial(p.expand(batch_size, -1), K, generator=generator)  # (B, K), distinct slots
    where = 2 * K + 2 * slot  # key j is asked at where[:, j]
    x.scatter_(1, where, keys)
    return x, torch.full_like(x, -1).scatter_(1, where, values)


@torch.no_grad()
def mqar_accuracy(model, x, y, device, autocast, batch_size=64):
    """Fraction of all query positions (pooled over examples) whose argmax is the right value."""
    model.eval()
    right = 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        with autocast:
            logits, _ = model(xb.to(device))
        right += (logits.argmax(-1).cpu() == yb)[yb != -1].sum().item()
    model.train()
    return right / (y != -1).sum().item()


def train_mqar(module, L, K, vocab_size, steps, batch_size, lr, device, dtype=torch.float32, n_test=256,
               seed=0, **config):
    """A fresh model trained on fresh MQAR batches (train.py's AdamW with betas (0.9, 0.98), and its schedule:
    lr warmup over 5% of the steps, then cosine to a tenth).
    Returns the held-out accuracy, the state size (numbers in the state prefill returns after one example,
    summed over layers) and the last training loss."""
    autocast = autocast_for(device, dtype)
    torch.manual_seed(seed)
    model = build_model(module, {**config, "vocab_size": vocab_size, "block_size": L}).to(device)
    sched = schedule(lr, steps, weight_decay=0.1, beta2=0.98)
    optimizer = configure_optimizer(model, sched, device)
    gen = torch.Generator().manual_seed(seed)
    probe = [t.to(device) for t in mqar(batch_size, L, K, vocab_size, torch.Generator().manual_seed(1))]
    check = lambda: train_step(model, optimizer, *probe, autocast)
    picker = pick_threads(0, device, model, optimizer, check, lambda *a: None)  # as train.py's, quietly
    for it in range(steps):
        x, y = mqar(batch_size, L, K, vocab_size, gen)
        if picker:
            picker.before_step(it)
        t0 = time.perf_counter()
        loss = train_step(model, optimizer, x.to(device), y.to(device), autocast, lr=get_lr(it, sched))
        if picker:
            picker.after_step(it, time.perf_counter() - t0)
    torch.set_num_threads(cores)
    x, y = mqar(n_test, L, K, vocab_size, torch.Generator().manual_seed(1234))  # the same test set for all
    with torch.no_grad(), autocast:
        state = model.prefill(x[:1].to(device))[1]
    return mqar_accuracy(model, x, y, device, autocast), sum(t.numel() for t in tensors(state)), loss.item()


def bench_mqar(s, models, device, dtype):
    table = Table([("model", "", 6), ("L", "d", 4), ("K", "d", 3), ("lr", ".0e", 5), ("accuracy", ".3f", 8),
                   ("state", ",d", 9), ("seconds", ".1f", 7)])
    rows = []
    for name in models:
        module, own = model_spec(name)
        try:
            module.Config(d_model=s["mqar_d_model"], n_layer=s["mqar_layers"], **own)
        except ValueError as e:
            print(f"{name}: skipped ({e})")
            continue
        for L in s["mqar_seq_lens"]:
            for K in s["mqar_pairs"]:
                if 4 * K > L:
                    print(f"{name}: skipped L={L}, K={K} (MQAR needs 4K <= L)")
                    continue
                runs = []
                for lr in s["mqar_lrs"]:
                    t0 = time.perf_counter()
                    config = {**fields(module, s["mqar_config"]), **own, "d_model": s["mqar_d_model"],
                              "n_layer": s["mqar_layers"], "kernel": s["model_kernel"]}
                    acc, state, loss = train_mqar(module, L, K, s["mqar_vocab"], s["mqar_steps"],
                                                  s["mqar_batch"], lr, device, dtype, s["mqar_test"],
                                                  s["seed"], **config)
                    seconds = time.perf_counter() - t0
                    runs.append({"lr": lr, "accuracy": acc, "loss": loss, "seconds": seconds})
                best = max(runs, key=lambda r: r["accuracy"])
                row = {"model": name, "L": L, "K": K, **best, "state": state, "runs": runs}
                table.row(row)
                rows.append(row)
    return rows


def plot_mqar(plt, rows):
    Ls = list(dict.fromkeys(r["L"] for r in rows))
    fig, axes = plt.subplots(1, len(Ls) + 1, figsize=(4.2 * (len(Ls) + 1), 3.6), squeeze=False)
    for ax, L in zip(axes[0], Ls):
        for name in dict.fromkeys(r["model"] for r in rows):
            pts = [r for r in rows if r["model"] == name and r["L"] == L]
            ax.plot([r["K"] for r in pts], [r["accuracy"] for r in pts], "o-", label=name)
        log_x(ax, [r["K"] for r in rows], "key-value pairs K")
        ax.set(ylabel="accuracy", title=f"MQAR, L = {L}", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[0][-1]
    for i, name in enumerate(dict.fromkeys(r["model"] for r in rows)):
        pts = [r for r in rows if r["model"] == name]
        ax.scatter([r["state"] for r in pts], [r["accuracy"] for r in pts], marker="osD^v"[i % 5], label=name)
    ax.set(xscale="log", xlabel="state size (numbers, all layers)", ylabel="accuracy",
           title="accuracy vs state", ylim=(-0.02, 1.02))
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------------
# 5. threads: train.py's thread picker against fixed thread counts, on an idle CPU and with one core kept
# busy by another process (as a browser or a video call keeps one), interleaved; then a run during which
# that load starts and stops


def spinner():
    """Another program that keeps one core busy."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def train_command(model, iters, threads, out_dir, size):
    """python train.py for `iters` iterations at `threads` (0: picked), its Config fields from `size`."""
    log_every = max(1, iters // 10)
    module, own = model_spec(model)
    fields_ = [f"--{k}={v}" for k, v in {**fields(module, size), **own}.items()]
    return [sys.executable, "-u", os.path.join(ROOT, "train.py"), "--model", model.partition(":")[0],
            "--max_iters", str(iters),
            "--eval_interval", str(iters), "--eval_iters", "1", "--log_interval", str(log_every),
            "--sample_tokens", "0", "--threads", str(threads), "--out_dir", out_dir, *fields_]


def logged_speed(out_dir, first=0, last=math.inf):
    """Median training tokens/s of train.py's logged windows ending in (first, last], the first left out
    (it holds the start-up)."""
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    rows = [r for r in rows if "tokens_per_sec" in r][1:]
    return statistics.median(r["tokens_per_sec"] for r in rows if first < r["iter"] <= last)


def bench_threads(s, models, device, dtype):
    if device.type != "cpu":
        print("threads: a CPU part (on a GPU train.py leaves the threads alone); skipped")
        return []
    import tempfile
    counts = thread_counts()
    table = Table([("model", "", 6), ("load", "", 14), ("threads", "", 7), ("tokens/s", ",.0f", 9),
                   ("vs_best_fixed", ".2f", 13), ("vs_default", ".2f", 10)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n_run = iter(range(10**6))

        def timed(model, threads):
            out = os.path.join(tmp, str(next(n_run)))
            subprocess.run(train_command(model, s["threads_iters"], threads, out, s["size"]), cwd=ROOT,
                           check=True, capture_output=True)
            return logged_speed(out)

        for model in s["threads_models"]:
            for load in ("idle", "one core busy"):
                other = spinner() if load != "idle" else None
                try:  # each setting once per round, in turn: a drift in the machine hits them all alike
                    speeds = {n: [] for n in ["picked"] + counts}
                    for _ in range(s["threads_rounds"]):
                        for n in speeds:
                            speeds[n].append(timed(model, 0 if n == "picked" else n))
                finally:
                    if other:
                        other.kill()
                median = {n: statistics.median(v) for n, v in speeds.items()}
                best = max(median[n] for n in counts)
                for n, v in speeds.items():
                    row = {"model": model, "load": load, "threads": str(n), "tokens/s": median[n], "runs": v}
                    if n == "picked":
                        row["vs_best_fixed"] = median[n] / best
                        row["vs_default"] = median[n] / median[counts[0]]
                    table.row(row)
                    rows.append(row)

            # the load comes and goes: one core kept busy from the first third of a run to the second
            out, n = os.path.join(tmp, str(next(n_run))), s["threads_iters"]
            p = subprocess.Popen(train_command(model, 3 * n, 0, out, s["size"]), cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
            other, switches = None, []
            for line in p.stdout:
                if line.startswith("threads:"):
                    switches.append(line.strip())
                it = int(line.split()[1].rstrip(":")) if line.startswith("iter ") else 0
                if other is None and n <= it < 2 * n:
                    other = spinner()
                    switches.append(f"(load starts at iteration {it})")
                elif other is not None and other.returncode is None and it >= 2 * n:
                    other.kill()
                    other.wait()
                    switches.append(f"(load stops at iteration {it})")
            p.wait()
            if other is not None and other.poll() is None:
                other.kill()
            if p.returncode != 0:
                raise RuntimeError(f"threads: train.py {model} failed (exit {p.returncode})")
            thirds = enumerate(("before", "busy", "after"))
            phases = {k: logged_speed(out, a * n, (a + 1) * n) for a, k in thirds}
            row = {"model": model, "load": "comes and goes", "threads": "picked", "tokens/s": phases["busy"],
                   "phases": phases, "switches": switches}
            table.row(row)
            print("\n".join(f"    {line}" for line in switches))
            rows.append(row)
    return rows


def plot_threads(plt, rows):
    fig, ax = plt.subplots(figsize=(8, 3.8))
    rows = [r for r in rows if r["load"] != "comes and goes"]
    labels = [f"{r['model']}, {r['load']}, {r['threads']}" for r in rows]
    colors = ["C1" if r["threads"] == "picked" else "C0" for r in rows]
    ax.barh(labels, [r["tokens/s"] for r in rows], color=colors)
    ax.invert_yaxis()
    ax.set(xlabel="training tokens/s (train.py)", title="thread counts: fixed (blue) and picked (orange)")
    ax.grid(alpha=0.3, axis="x")
    return fig


# ---------------------------------------------------------------------------------------------------


BENCHES = {"kernels": (bench_kernels, plot_kernels), "train": (bench_train, plot_train),
           "generate": (bench_generate, plot_generate), "compare": (bench_compare, plot_compare),
           "mqar": (bench_mqar, plot_mqar), "threads": (bench_threads, plot_threads)}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="all", choices=("all",) + PARTS)
    parser.add_argument("--models", default=None,
                        help="comma-separated (default: every model file there is); a file's other model by "
                        "its Config fields, e.g. mamba:version=2")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bfloat16 autocast on GPUs that have it), float32, ...")
    parser.add_argument("--out", default=None, help="output folder (default: bench_results/<device>)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings, seconds per part (the tests use it)")
    parser.add_argument("--seed", type=int, default=0)
    show = lambda v: ",".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731
    for name, (cpu, gpu, quick, help) in SETTINGS.items():
        parser.add_argument(f"--{name}", default=None, help=f"{help} [CPU: {show(cpu)}; GPU: {show(gpu)}]")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    column = 2 if args.quick else 1 if device.type == "cuda" else 0
    s = {"seed": args.seed}
    for name, defaults in SETTINGS.items():
        given, default = getattr(args, name), defaults[column]
        try:
            if given is None:
                s[name] = list(default) if isinstance(default, list) else default
            elif isinstance(default, list):
                s[name] = [type(default[0])(v) for v in given.split(",")]
            else:
                s[name] = type(default)(given)
        except ValueError:
            raise UsageError(f"bad --{name} {given!r}; expected like {default}")
    return args, device, s


def main(argv):
    args, device, s = parse_args(argv)
    dtype = pick_dtype(args.dtype, device)
    have = [m for m in MODELS if os.path.exists(os.path.join(ROOT, f"{m}.py"))]
    models = args.models.split(",") if args.models else have
    for m in models:  # a file, or a file and the Config fields of another model in it: mamba:version=2
        if m.partition(":")[0] not in have:
            raise UsageError(f"unknown model {m!r}; choose from: {', '.join(have)} (or e.g. mamba:version=2)")
    if device.type != "cuda" and "triton" in s["kernels"]:
        os.environ["TRITON_INTERPRET"] = "1"  # before any model file is imported: it defines its kernels
        print("note: no CUDA GPU: the Triton kernels run in Triton's interpreter, exact but not a speed "
              "measurement")
    elif device.type != "cuda" and args.part in ("all", "kernels", "train"):
        print("note: on a CPU only the torch paths are timed; Triton timings need a GPU "
              "(--kernels torch,triton runs them in the interpreter, for debugging)")
    if "triton" in s["kernels"] and importlib.util.find_spec("triton") is None:
        print("note: no triton package (Linux only): skipping the Triton paths")
        s["kernels"].remove("triton")
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py: TF32 tensor cores for fp32 matmuls
    env = environment(device, dtype)
    slug = device.type
    if device.type == "cuda":
        slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    out = args.out or os.path.join("bench_results", slug)
    t_start = time.time()
    for part in PARTS[:5] if args.part == "all" else (args.part,):
        print(f"\n=== {part} ({env['device']}, {env['dtype']})")
        t0 = time.time()
        bench, plot = BENCHES[part]
        results = bench(s, models, device, dtype)
        env_part = {**env, "seconds": round(time.time() - t0, 1)}
        save(out, part, env_part, {**s, "models": models}, results, plot)
    print(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UsageError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
