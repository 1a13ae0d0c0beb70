"""
train.py: one training loop for every model in nanozoo.

    python train.py --model gpt                      # the default model on the default data: minutes on a CPU
    python train.py --model mamba --kernel triton    # every Config field of the model is a flag
    python train.py --model gpt --resume             # continue the run saved in --out_dir
    python train.py --init_from HuggingFaceTB/SmolLM2-135M --dataset shakespeare   # fine-tune a released one
    torchrun --standalone --nproc_per_node 2 train.py --model gpt    # data parallel (DDP)

nanoGPT's loop and flag names: AdamW with weight decay on matrices only, linear warmup then cosine decay,
gradient clipping and accumulation, bf16 autocast on GPUs that have it (fp16 with a grad scaler on those
that do not), periodic train/val evaluation, checkpoint and resume, optional torch.compile, DDP.
Each run writes into --out_dir (default out/<model>): ckpt.pt, config.json, log.jsonl, loss.png, sample.txt.
The model file is loaded by path and used only through its contract (Config, Model, param_groups, ...).

main() runs six phases, each a function defined above it in this order: the settings, the device, the
data, the model and optimizer, the log, then the training loop (inline, in main) and the finish (plot,
sample). bench.py trains with the same optimizer, schedule, evaluation and autocast (configure_optimizer,
get_lr, estimate_loss, autocast_for). --init_from starts from a released checkpoint instead of random weights
(its own section, after the data's: which model file, the weights, the tokenizer; sample.py uses it too).
"""

import argparse
import ast
import copy
import dataclasses
import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
MODELS = ("gpt", "mamba", "rwkv", "retnet", "moe")

# The training settings, nanoGPT's names; (default, help). Every model Config field is a flag as well.
SETTINGS = {
    "out_dir": (None, "where the run's files go (default: out/<model>)"),
    "dataset": ("shakespeare_char", "a dataset in data/ (prepared on first use), or a folder path"),
    "batch_size": (12, "sequences per micro-batch"),
    "gradient_accumulation_steps": (1, "micro-batches per optimizer step"),
    "max_iters": (2000, "optimizer steps"),
    "eval_interval": (250, "evaluate and checkpoint every this many steps"),
    "eval_iters": (20, "batches per split in each evaluation"),
    "log_interval": (50, "print and log every this many steps"),
    "learning_rate": (1e-3, "peak learning rate"),
    "min_lr": (None, "final learning rate (default: learning_rate / 10)"),
    "warmup_iters": (100, "linear warmup steps"),
    "lr_decay_iters": (None, "cosine decay ends here (default: max_iters)"),
    "decay_lr": (True, "warmup + cosine schedule; false: constant learning_rate"),
    "weight_decay": (0.1, "AdamW weight decay (matrices only)"),
    "beta1": (0.9, "AdamW beta1"),
    "beta2": (0.99, "AdamW beta2 (0.99: few tokens per step)"),
    "grad_clip": (1.0, "clip the gradient norm to this; 0 disables"),
    "seed": (1337, "random seed"),
    "device": ("auto", "auto, cpu, cuda, cuda:N or mps"),
    "dtype": ("auto", "auto, float32, bfloat16 or float16 (autocast); auto: bfloat16 on GPUs that have it"),
    "compile": (False, "torch.compile the model"),
    "sample_tokens": (500, "length of the sample written at the end; 0 skips it"),
    "threads": (0, "CPU threads for torch; 0: picked from the free cores as the run goes (timed probes)"),
    "init_from": (None, "fine-tune a released checkpoint: a Hugging Face hub id, a local folder or a .pth "
                        "file (README: Released models)"),
}


NONE_TYPES = {"min_lr": float, "lr_decay_iters": int, "init_from": str}  # the settings whose default is None

# --init_from: the settings not typed take nanoGPT's for fine-tuning (its config/finetune_shakespeare.py: a
# few steps at a small constant learning rate), with 20 eval batches and a context of 256 (for a CPU too;
# the checkpoint's, where shorter).
FINETUNE = {"learning_rate": 3e-5, "decay_lr": False, "max_iters": 20, "eval_interval": 5, "eval_iters": 20,
            "batch_size": 1, "gradient_accumulation_steps": 32}
FINETUNE_BLOCK_SIZE = 256
# The Config fields a fine-tuning run may set: they leave the checkpoint's function as it is.
FREE_FIELDS = ("kernel", "block_size", "chunk_size", "aux_loss_coef", "z_loss_coef", "bias_gamma")


# ---------------------------------------------------------------------------------------------------
# 1. Settings: the flags (or a checkpoint's), checked before anything is touched


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


def str2bool(s):
    if str(s).lower() in ("1", "true", "yes", "on"):
        return True
    if str(s).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, and no abbreviated flags: `--max_iter 3000` is an unknown flag, not
    --max_iters (a resumed run keeps the checkpoint's settings except those typed, by their full names)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(f"{message} (see: python {self.prog} --model MODEL --help)")


def add_flag(parser, name, default, help):
    """--name VALUE, typed like its default (bools also accept a bare --name)."""
    if isinstance(default, bool):
        parser.add_argument(f"--{name}", type=str2bool, nargs="?", const=True, default=default, help=help)
    else:
        kind = NONE_TYPES.get(name, str) if default is None else type(default)
        parser.add_argument(f"--{name}", type=kind, default=default, help=help)


def is_model_file(model):
    """--model names a model (gpt) or a model file by its path (handout/rwkv.py): a path ends in .py or has a
    folder in it."""
    return model.endswith(".py") or os.sep in model or "/" in model


def model_name(model):
    """The model's name for folders and checkpoints: gpt for gpt, rwkv for handout/rwkv.py."""
    return os.path.splitext(os.path.basename(model))[0] if is_model_file(model) else model


CONTRACT = ("forward", "step", "generate", "param_groups", "flops_per_token")  # Model's methods train.py uses


@functools.lru_cache(maxsize=None)
def load_model_module(name):
    """Import <name>.py from the repository by path (so `python train.py` works from any directory), or a
    model file given by its path (a student's copy, say), checked against the contract: a Config dataclass
    and a Model with the methods train.py and sample.py call. What fails is one line at the door."""
    if is_model_file(name):
        path = name
        if not os.path.isfile(path):
            raise UsageError(f"--model {name}: no such model file")
    elif name not in MODELS or not os.path.exists(os.path.join(ROOT, f"{name}.py")):
        have = [m for m in MODELS if os.path.exists(os.path.join(ROOT, f"{m}.py"))]
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(have)}, or give a model file's "
                         f"path (handout/rwkv.py)")
    else:
        path = os.path.join(ROOT, f"{name}.py")
    spec = importlib.util.spec_from_file_location(model_name(name), path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a student's file: a syntax error, an import it lacks, anything at import time
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
        detail = (str(e).splitlines() or [""])[0][:200]
        raise UsageError(f"--model {name} does not import: {type(e).__name__}: {detail}{where}") from None
    lacks = [] if dataclasses.is_dataclass(getattr(module, "Config", None)) else ["a Config dataclass"]
    model = getattr(module, "Model", None)
    if not isinstance(model, type):
        lacks.append("a Model class")
    else:
        lacks += [f"Model.{m}" for m in CONTRACT if not callable(getattr(model, m, None))]
    if lacks:
        raise UsageError(f"--model {name} does not follow the model contract (README: The model contract): "
                         f"it lacks {', '.join(lacks)}")
    return module


def build_parser(module, model_name):
    """The flags: --model, --resume, the settings, and every field of the model's Config."""
    parser = Parser(prog="train.py", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="gpt", help=f"one of {', '.join(MODELS)}, or the path of a model "
                        f"file (handout/rwkv.py)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out_dir from its ckpt.pt")
    for name, (default, help) in SETTINGS.items():
        add_flag(parser, name, default, help)
    model_group = parser.add_argument_group(f"{model_name}.Config (the model)")
    for f in dataclasses.fields(module.Config):
        add_flag(model_group, f.name, f.default, "model")
    return parser


def parse_args(argv):
    """Two passes: --model (or the checkpoint of --init_from) picks the model file, whose Config fields then
    become flags. Returns the parsed flags, the names of those typed on the command line, and the model's
    module."""
    pre = Parser(prog="train.py", add_help=False)
    pre.add_argument("--model", default=None)
    pre.add_argument("--kernel", default=None)
    pre.add_argument("--init_from", default=None)
    pre.add_argument("--resume", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.init_from and known.resume:
        raise UsageError("--init_from and --resume: a resumed run continues from its ckpt.pt; give one")
    pretrained = pretrained_source(known.init_from) if known.init_from else None
    if pretrained and known.model is not None and model_name(known.model) != pretrained[0]:
        raise UsageError(f"--init_from {known.init_from} is a checkpoint for {pretrained[0]}.py, not "
                         f"--model {known.model}")
    known.model = pretrained[0] if pretrained else "gpt" if known.model is None else known.model
    no_gpu = os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available()
    if known.kernel == "triton" and no_gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # must be set before the model file defines its kernels
        print("note: no CUDA GPU, so the Triton kernels run in Triton's interpreter: exact but very slow "
              "(for reading and debugging, not training)")
    module = load_model_module(known.model)
    if known.init_from == "":
        raise UsageError("--init_from is empty; give a Hugging Face hub id, a local folder or a .pth file")
    args = build_parser(module, known.model).parse_args(argv)
    args.model, args.pretrained = known.model, pretrained
    given = {a.split("=")[0][2:] for a in argv if a.startswith("--")}  # exact names: no abbreviations
    return args, given, module


# The valid values of the numeric settings: (test, a valid value in words). NaN fails every test.
CHECKS = {
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "at least 1"),
    "max_iters": (lambda v: v >= 0, "0 or more"),
    "eval_interval": (lambda v: v >= 1, "at least 1"),
    "eval_iters": (lambda v: v >= 1, "at least 1"),
    "log_interval": (lambda v: v >= 1, "at least 1"),
    "learning_rate": (lambda v: 0 < v < math.inf, "a positive number, e.g. 1e-3"),
    "min_lr": (lambda v: 0 <= v < math.inf, "a number from 0 up, e.g. 1e-4"),
    "warmup_iters": (lambda v: v >= 0, "0 or more"),
    "lr_decay_iters": (lambda v: v >= 0, "0 or more"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "a number from 0 up, e.g. 0.1"),
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.9"),
    "beta2": (lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.99"),
    "grad_clip": (lambda v: 0 <= v < math.inf, "a number from 0 up (0 disables), e.g. 1.0"),
    "seed": (lambda v: 0 <= v < 2**63, "a whole number from 0 to 2^63 - 1"),
    "sample_tokens": (lambda v: v >= 0, "0 or more"),
    "threads": (lambda v: 0 <= v <= 4096, "0 (pick them as the run goes) or a count, e.g. 2"),
}


def resolve_settings(s):
    """Check the numeric settings, then fill in those whose defaults follow from others (min_lr,
    lr_decay_iters)."""
    s = dict(s)
    for name, (ok, valid) in CHECKS.items():
        if s[name] is not None and not ok(s[name]):
            raise UsageError(f"--{name} must be {valid}, got {s[name]}")
    s["min_lr"] = s["learning_rate"] / 10 if s["min_lr"] is None else s["min_lr"]
    s["lr_decay_iters"] = s["max_iters"] if s["lr_decay_iters"] is None else s["lr_decay_iters"]
    return s


def default_settings(**overrides):
    """train.py's settings at their defaults, with `overrides` on top, resolved: what bench.py trains with."""
    return resolve_settings({**{name: default for name, (default, _) in SETTINGS.items()}, **overrides})


def read_settings(args, given, module):
    """The run's settings and model config: the flags, or on --resume the checkpoint's with the flags typed
    now on top. Returns (settings, model_config, ckpt or None)."""
    settings = {name: getattr(args, name) for name in SETTINGS}
    model_config = {f.name: getattr(args, f.name) for f in dataclasses.fields(module.Config)}
    if settings["out_dir"] == "":
        raise UsageError(f"--out_dir is empty; give a folder, e.g. --out_dir out/{model_name(args.model)}")
    settings["out_dir"] = settings["out_dir"] or os.path.join("out", model_name(args.model))
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(os.path.join(settings["out_dir"], "ckpt.pt"), model=model_name(args.model))
        typed = {k: v for k, v in settings.items() if k in given or k == "out_dir"}
        # the checkpoint's settings; one newer than the checkpoint takes its default
        settings = {**default_settings(), **ckpt["settings"], **typed}
        for k in model_config:
            if k in given and k != "kernel" and model_config[k] != ckpt["model_config"][k]:
                raise UsageError(f"--{k} {model_config[k]} differs from the checkpoint's "
                                 f"{k}={ckpt['model_config'][k]}; a resumed run keeps its model (only "
                                 f"--kernel may change)")
        model_config = {**ckpt["model_config"], "kernel": model_config["kernel"]}
    elif args.init_from:
        settings.update({k: v for k, v in FINETUNE.items() if k not in given})
        fixed = sorted(k for k in model_config if k in given and k not in FREE_FIELDS)
        if fixed:
            raise UsageError(f"--{fixed[0]} comes from the checkpoint of --init_from; a fine-tuning run may "
                             f"set only {', '.join('--' + k for k in FREE_FIELDS)}")
        model_config = {k: v for k, v in model_config.items() if k in given}  # the overrides
    if model_config.get("kernel", "torch") == "triton" and importlib.util.find_spec("triton") is None:
        raise UsageError("--kernel triton needs the triton package (Linux only): pip install triton, or use "
                         "--kernel torch")
    return resolve_settings(settings), model_config, ckpt


def check_out_dir(out_dir, resume):
    """Refuse an --out_dir that is a file, cannot be written, or holds a run that a fresh run would
    overwrite: nothing a user already has is ever overwritten or removed."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out_dir {out_dir} exists and is not a folder; choose another --out_dir "
                         f"(the file was left as it is)")
    parent = out_dir
    while not os.path.exists(parent):  # the nearest folder that exists is where it will be made
        parent = os.path.dirname(parent) or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out_dir {out_dir} cannot be written ({parent} is not a writable folder); "
                         f"choose another --out_dir")
    if not resume and os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        raise UsageError(f"{out_dir} already holds a run (ckpt.pt): --resume continues it; to start over, "
                         f"choose another --out_dir or delete that folder")


def memory_bytes(device):
    """The device's total memory in bytes (RAM for a CPU), or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # Windows
        return None


def check_model(module, model_config, s, device):
    """The model's Config refuses bad fields; a model and batch that cannot fit the device's memory are
    refused before anything is allocated. The memory counted is a floor, so that a refusal is certain:
    16 bytes a parameter (fp32 weights, gradients, AdamW's two moments) and 16 fp32 activations per width,
    layer and token of a micro-batch. First from the contract's fields alone (every layer holds a d_model x
    d_model matrix at least), then from the parameters of the model built on the meta device (shapes only)."""
    try:
        config = module.Config(**model_config)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--{e}" if str(e).split(" ")[0] in model_config else f"bad model config: {e}")
    have = memory_bytes(device)
    activations = 64 * s["batch_size"] * config.block_size * config.d_model * config.n_layer

    def refuse_above(need):
        if have is not None and need > have:
            raise UsageError(f"this model and batch need more than {need / 2**30:,.0f} GB and {device.type} "
                             f"has {have / 2**30:,.0f} GB: use a smaller --batch_size, --block_size, "
                             f"--d_model, --n_layer or the like")

    refuse_above(16 * config.d_model * (config.n_layer * config.d_model + config.vocab_size) + activations)
    try:
        with torch.device("meta"):
            n_params = sum(p.numel() for p in module.Model(config).parameters())
    except (RuntimeError, TypeError, OverflowError) as e:  # sizes whose tensors overflow before they exist
        raise UsageError(f"this model cannot be built ({str(e).splitlines()[0]}); use smaller sizes")
    refuse_above(16 * n_params + activations)


def validate(argv):
    """Phase 1, the door: every flag parsed and checked (settings, model config, device, dtype, dataset,
    --out_dir) before any model, data or folder is touched. Returns (args, given, module, settings,
    model_config, ckpt, device, dtype); raises UsageError for bad input."""
    args, given, module = parse_args(argv)
    s, model_config, ckpt = read_settings(args, given, module)
    ddp = int(os.environ.get("RANK", -1)) != -1
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = pick_device(s["device"] if not ddp or s["device"] != "auto" else auto)
    dtype = pick_dtype(s["dtype"], device)
    find_dataset(s["dataset"])
    check_out_dir(s["out_dir"], args.resume)
    if not args.pretrained:  # a released checkpoint's config is its own: from_pretrained checks it
        check_model(module, model_config, s, device)
    return args, given, module, s, model_config, ckpt, device, dtype


# ---------------------------------------------------------------------------------------------------
# 2. Device: DDP ranks, the device, the precision


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A10": 125e12,
                   "L4": 121e12, "4090": 165e12, "3090": 71e12}  # dense bf16 tensor-core peaks


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"bad --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps but MPS is not available; use --device cpu")
    return device


def pick_dtype(name, device):
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU and MPS: full precision is the safe default
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UsageError(f"bad --dtype {name!r}; use auto, float32, bfloat16 or float16")
    if dtypes[name] == torch.float16 and device.type == "cpu":
        raise UsageError("--dtype float16 is not supported on CPU; use bfloat16 or float32")
    return dtypes[name]


def autocast_for(device, dtype):
    """Mixed precision: autocast to dtype, or nothing for float32."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def start_device(device):
    """The process's place in a torchrun (rank, local_rank, world size; (0, 0, 1) alone) and its device:
    under DDP, its own GPU, and the process group joined."""
    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun
    rank, local_rank, world = 0, 0, 1
    if ddp:
        import torch.distributed as dist
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if device.type == "cuda":
            device = torch.device(f"cuda:{local_rank}")
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ddp, rank, local_rank, world, device


class ThreadPicker:
    """torch's CPU thread count, picked as the run goes. On a laptop other programs come and go, and one
    busy core slows every op of an n-thread team to the pace of the thread that shares it (each op ends at
    a barrier), where n - 1 threads would lose only a share of the speed. So every `every` steps, and at
    once when steps slow down by half, it times `trials` steps at each candidate count (one, where that is
    plainly slower, twice the current) and keeps the fastest; the first step after a switch is not timed
    (the new team starts up in it).

    PyTorch splits some CPU reductions by thread count (LayerNorm's parameter gradients, index_add_), and
    their sums then round differently: `candidates` must be only counts that give the same numbers
    (same_numbers finds them), so that what is chosen never changes the loss curve."""

    def __init__(self, candidates, log, every=200, trials=2):
        self.candidates, self.log, self.every, self.trials = candidates, log, every, trials
        self.current = candidates[0]
        self.plan = []  # the counts the coming steps run at while probing, with a flag: time this step?
        self.times = {n: [] for n in candidates}
        self.next_probe, self.expected, self.slow = 0, None, 0

    def before_step(self, it):
        if not self.plan and len(self.candidates) > 1 and it >= self.next_probe:
            order = [self.current] + [n for n in self.candidates if n != self.current]
            self.plan = [(n, k > 0 or n == self.current) for n in order for k in range(self.trials + 1)]
            self.times = {n: [] for n in self.candidates}
        n = self.plan[0][0] if self.plan else self.current
        if torch.get_num_threads() != n:  # a call only when the count changes, not on every step
            torch.set_num_threads(n)

    def after_step(self, it, seconds):
        if self.plan:
            n, timed = self.plan.pop(0)
            if timed:
                self.times[n].append(seconds)
                if self.expected is not None and seconds > 2 * self.expected:  # plainly slower: enough
                    self.plan = [(m, t) for m, t in self.plan if m != n]
            if not self.plan:  # the probe is done: keep the fastest
                speed = {n: min(t) for n, t in self.times.items() if t}
                best = min(speed, key=speed.get)
                if best != self.current:
                    timings = ", ".join(f"{n}: {1e3 * t:.1f} ms/step" for n, t in sorted(speed.items()))
                    self.log(f"threads: {self.current} -> {best} at iteration {it + 1} ({timings})")
                self.current, self.expected, self.slow = best, speed[best], 0
                self.next_probe = it + 1 + self.every
        elif self.expected is not None:  # steps that slow down by half: the load changed, probe now
            self.slow = self.slow + 1 if seconds > 1.5 * self.expected else 0
            if self.slow >= 3:
                self.next_probe = it + 1


def same_numbers(model, optimizer, step, counts):
    """The counts among `counts` under which one training step, step(), leaves exactly the parameters that
    counts[0] leaves. Model and optimizer are put back as they were (buffers too), and nothing is drawn
    from a random generator."""
    saved = copy.deepcopy((model.state_dict(), dict(model.named_buffers()), optimizer.state_dict()))
    after = {}
    for n in counts:
        torch.set_num_threads(n)
        step()
        after[n] = [p.detach().clone() for p in model.parameters()]
        model.load_state_dict(saved[0])
        for name, buffer in model.named_buffers():
            buffer.copy_(saved[1][name])
        optimizer.load_state_dict(saved[2])
    torch.set_num_threads(counts[0])
    return [n for n in counts if all(torch.equal(a, b) for a, b in zip(after[n], after[counts[0]]))]


def thread_counts():
    """The counts the picker may choose from: the cores' count (torch's default) and up to three below it,
    down to half of them: 2 cores: [2, 1]; 8 cores: [8, 7, 6, 5]."""
    cores = torch.get_num_threads()
    return list(range(cores, max(1, cores // 2) - 1, -1))[:4]


def pick_threads(threads, device, model, optimizer, step, log):
    """The ThreadPicker of a CPU run, or None: a GPU does the work itself, and --threads N fixes the
    count. Its candidates: thread_counts(), kept only where a step gives the same numbers as at the cores'
    count."""
    if device.type != "cpu":
        return None
    if threads:
        torch.set_num_threads(threads)
        log(f"threads: {threads} (--threads)")
        return None
    counts = thread_counts()
    candidates = same_numbers(model, optimizer, step, counts) if len(counts) > 1 else counts
    dropped = [n for n in counts if n not in candidates]
    note = f"; not {dropped}, which round some sums differently here" if dropped else ""
    log(f"threads: {counts[0]}, re-picked from {candidates} by timed steps as the load changes{note}")
    return ThreadPicker(candidates, log)


# ---------------------------------------------------------------------------------------------------
# 3. Data


DATA_FILES = ("train.bin", "val.bin", "meta.pkl")


def find_dataset(name):
    """The folder of a dataset, data/<name>/ or a folder path, checked at the door: it must exist and hold
    train.bin, val.bin and meta.pkl, or have a prepare.py that makes them. Returns (folder, missing files)."""
    if not name:
        raise UsageError("--dataset is empty; give a dataset of data/ (e.g. shakespeare_char) or a folder")
    folder = name if os.sep in name or "/" in name else os.path.join(ROOT, "data", name)
    missing = [f for f in DATA_FILES if not os.path.exists(os.path.join(folder, f))]
    if os.path.exists(os.path.join(folder, "prepare.py")) or not missing:
        return folder, missing
    if os.path.isdir(folder) and len(missing) < len(DATA_FILES):
        raise UsageError(f"dataset folder {folder} has no {' and no '.join(missing)}; a dataset needs "
                         f"{', '.join(DATA_FILES)} (nanoGPT's format)")
    have = sorted(d for d in os.listdir(os.path.join(ROOT, "data"))
                  if os.path.exists(os.path.join(ROOT, "data", d, "prepare.py")))
    raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(have)}, or a folder with "
                     f"{', '.join(DATA_FILES)}")


def load_dataset(name, prepare=True):
    """The dataset's folder and meta.pkl; a data/<name>/ whose files are missing runs its prepare.py first
    (on first use)."""
    folder, missing = find_dataset(name)
    if missing:
        if not prepare:
            raise UsageError(f"dataset {name!r} is not prepared: run python data/{name}/prepare.py")
        print(f"preparing dataset {name} (first use): python data/{name}/prepare.py")
        if subprocess.run([sys.executable, os.path.join(folder, "prepare.py")]).returncode != 0:
            raise SystemExit(f"error: preparing dataset {name!r} failed (see above)")
    with open(os.path.join(folder, "meta.pkl"), "rb") as f:
        meta = pickle.load(f)
    return folder, meta


def vocab_size_for(meta):
    """The model's vocabulary for a dataset: its own size, or GPT-2's 50257 padded to 50304 (a multiple of
    64, faster matmuls)."""
    return 50304 if meta.get("tokenizer") == "gpt2" else meta["vocab_size"]


@functools.lru_cache(maxsize=None)
def token_dtype(folder):
    """The dtype of a dataset's token files: nanoGPT's uint16, or the uint32 its meta.pkl names (a released
    checkpoint's vocabulary over 65,536, e.g. Qwen2's 151,936)."""
    with open(os.path.join(folder, "meta.pkl"), "rb") as f:
        return np.dtype(pickle.load(f).get("dtype", "uint16"))


def get_batch(folder, split, batch_size, block_size, generator, device):
    # A new memmap each call: a long-lived one leaks memory (as nanoGPT notes).
    data = np.memmap(os.path.join(folder, f"{split}.bin"), dtype=token_dtype(folder), mode="r")
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class Tokenizer:
    """encode/decode for a dataset or a checkpoint, from its meta: a character vocabulary, GPT-2's BPE, a
    released checkpoint's own Hugging Face tokenizer.json (through the tokenizers package), or the RWKV World
    vocabulary (WorldTokenizer)."""

    def __init__(self, meta):
        self.meta = meta
        self.kind = meta.get("tokenizer")
        if self.kind == "gpt2":
            path = os.path.join(ROOT, "data", "shakespeare", "prepare.py")
            spec = importlib.util.spec_from_file_location("shakespeare_prepare", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self.enc = module.gpt2_encoding()
        elif self.kind == "hf":
            try:
                import tokenizers
            except ImportError:
                raise UsageError("a released checkpoint's tokenizer.json needs the tokenizers package: pip "
                                 "install tokenizers") from None
            self.enc = tokenizers.Tokenizer.from_str(meta["tokenizer_json"])
        elif self.kind == "rwkv_world":
            self.enc = WorldTokenizer(meta["vocab"])

    def encode(self, text, special=True):
        """Token ids of text. special: with the tokens a checkpoint's tokenizer adds around a text (e.g.
        Llama's <s> in front), as for a prompt; a dataset is encoded without them."""
        if self.kind == "gpt2":
            return self.enc.encode(text, allowed_special={"<|endoftext|>"})
        if self.kind == "hf":
            return self.enc.encode(text, add_special_tokens=special).ids
        if self.kind == "rwkv_world":
            return self.enc.encode(text)
        missing = sorted(set(text) - set(self.meta["stoi"]))
        if missing:
            raise UsageError(f"the prompt has characters outside the model's vocabulary: "
                             f"{''.join(missing)!r}; remove them")
        return [self.meta["stoi"][c] for c in text]

    def decode(self, ids):
        if self.kind in ("gpt2", "rwkv_world"):
            return self.enc.decode(ids)
        if self.kind == "hf":
            return self.enc.decode(ids, skip_special_tokens=True)
        return "".join(self.meta["itos"][i] for i in ids)


class WorldTokenizer:
    """The RWKV World tokenizer, RWKV-7's: a vocabulary of byte strings (rwkv_vocab_v20230424.txt, one
    "id repr(token) length" a line, ids 1 ... 65529; 0 is the end of a text), and RWKV's own rule for
    encoding (its TRIE_TOKENIZER): at each position the longest token that matches the bytes there. A trie
    of dicts finds it in one walk; every single byte is a token, so there is always a match."""

    def __init__(self, vocab):
        self.tokens = {}  # id -> bytes
        self.trie = {}  # byte -> subtrie; the key None holds the id of the token that ends there
        for line in vocab.splitlines():
            i, token = int(line[:line.index(" ")]), ast.literal_eval(line[line.index(" "):line.rindex(" ")])
            self.tokens[i] = token.encode("utf-8") if isinstance(token, str) else token
            node = self.trie
            for byte in self.tokens[i]:
                node = node.setdefault(byte, {})
            node[None] = i

    def encode(self, text):
        data, ids, start = text.encode("utf-8"), [], 0
        while start < len(data):
            node, end = self.trie, start
            for pos in range(start, len(data)):
                node = node.get(data[pos])
                if node is None:
                    break
                if None in node:
                    match, end = node[None], pos + 1
            ids.append(match)
            start = end
        return ids

    def decode(self, ids):
        return b"".join(self.tokens.get(i, b"") for i in ids).decode("utf-8", errors="replace")


def open_data(s, model_config, given, ckpt, ddp, master, tokenizer=None):
    """The dataset's folder and vocabulary (rank 0 prepares it on first use); sets the model's vocab_size
    from it on a fresh run. tokenizer: a released checkpoint's (its meta), the one a fine-tuning run's
    dataset is encoded with (tokenized_dataset); the model's vocab_size is then the checkpoint's."""
    load = functools.partial(tokenized_dataset, meta=tokenizer) if tokenizer else load_dataset
    if master:
        load(s["dataset"])
    if ddp:
        import torch.distributed as dist
        dist.barrier()  # rank 0 prepares the data once
    folder, meta = load(s["dataset"], prepare=False)
    if tokenizer:
        if meta["vocab_size"] > model_config["vocab_size"]:
            raise UsageError(f"the dataset's vocabulary ({meta['vocab_size']}) is larger than the model's "
                             f"({model_config['vocab_size']})")
        return folder, meta
    if ckpt is not None and ckpt["meta"] != meta:
        dataset = ckpt["settings"]["dataset"]
        raise UsageError(f"{os.path.join(s['out_dir'], 'ckpt.pt')} was trained on another vocabulary "
                         f"(dataset {dataset!r}); resume with --dataset {dataset}")
    if "vocab_size" in given and model_config["vocab_size"] < meta["vocab_size"]:
        raise UsageError(f"--vocab_size {model_config['vocab_size']} is smaller than the dataset's "
                         f"{meta['vocab_size']}")
    if "vocab_size" not in given and ckpt is None:
        model_config["vocab_size"] = vocab_size_for(meta)
    return folder, meta


# ---------------------------------------------------------------------------------------------------
# --init_from: a released checkpoint's model file, weights and tokenizer (phases 1, 3 and 4; and sample.py)


# Hugging Face's model types, and the file that loads each (its from_pretrained checks the rest)
PRETRAINED = {"llama": "gpt", "mistral": "gpt", "qwen2": "gpt", "mamba": "mamba", "mamba2": "mamba",
              "mixtral": "moe"}
RWKV_VOCAB = "rwkv_vocab_v20230424.txt"  # the RWKV World vocabulary: in the rwkv package, sha256 below
RWKV_VOCAB_SHA256 = "8324476023347dec2964625ccb2075c864d250a9c6d9a74f36daba628de8c008"
RWKV_PACKAGE = "rwkv==0.8.32"


def hub_fetch(name, patterns):
    """A Hugging Face hub repository's files matching patterns, fetched once into the hub's cache: their
    local folder. An unreachable hub is one line that says how to pass a local path instead."""
    try:
        import huggingface_hub
    except ImportError:
        raise UsageError(f"{name!r} is not a local path, and fetching it from the Hugging Face hub needs "
                         f"huggingface_hub: pip install huggingface_hub safetensors tokenizers") from None
    try:
        return huggingface_hub.snapshot_download(name, allow_patterns=patterns)
    except Exception as e:  # offline, no such repository, a gated model
        raise UsageError(f"cannot fetch {name!r} from the Hugging Face hub ({type(e).__name__}: is the hub "
                         f"reachable, the name right?); download it where the hub is reachable and pass its "
                         f"local folder: --init_from path/to/folder") from None


def pretrained_source(init_from):
    """(model file, local folder or None) of a released checkpoint: a .pth is RWKV-7's (rwkv.py); a Hugging
    Face folder (local, or a hub id whose .json files are fetched: config and tokenizer; the model file's
    from_pretrained fetches the weights) goes by its config.json's model_type, state-spaces' Mamba by its
    d_model and ssm_cfg."""
    if init_from.endswith(".pth"):
        return "rwkv", os.path.dirname(init_from) if os.path.exists(init_from) else None
    folder = init_from if os.path.isdir(init_from) else None
    if folder is None and (os.path.exists(init_from) or len(init_from.strip("/").split("/")) != 2):
        raise UsageError(f"--init_from {init_from}: neither a checkpoint folder, a .pth file nor a Hugging "
                         f"Face hub id (owner/name)")
    folder = folder or hub_fetch(init_from, ["*.json"])
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        raise UsageError(f"--init_from {init_from}: no readable config.json in {folder}") from None
    kind = config.get("model_type")
    if kind is None and "d_model" in config and "ssm_cfg" in config:
        return "mamba", folder  # state-spaces' own layout
    if kind not in PRETRAINED:
        raise UsageError(f"--init_from {init_from} is a {kind!r} checkpoint; nanozoo loads "
                         f"{', '.join(k for k in PRETRAINED if PRETRAINED[k] == 'gpt')} (gpt.py), mamba "
                         f"(mamba.py), mixtral (moe.py) and RWKV-7 .pth files (rwkv.py)")
    return PRETRAINED[kind], folder


def load_pretrained(module, init_from, overrides):
    """The model file's from_pretrained, its one-line errors as a UsageError."""
    try:
        return module.Model.from_pretrained(init_from, **overrides)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--init_from {init_from}: {e}") from None


def pretrained_tokenizer(model, folder):
    """The meta (tokenizer_meta) of a released checkpoint's own tokenizer: the tokenizer.json in its folder;
    for state-spaces' Mamba, which ship none, GPT-NeoX's (EleutherAI/gpt-neox-20b), which they were trained
    with; for RWKV-7, the World vocabulary (rwkv_world_vocab)."""
    if model == "rwkv":
        return tokenizer_meta(rwkv_world_vocab(folder))
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path) and model == "mamba":
        path = os.path.join(hub_fetch("EleutherAI/gpt-neox-20b", ["tokenizer.json"]), "tokenizer.json")
    if not os.path.exists(path):
        raise UsageError(f"{folder} has no tokenizer.json (the checkpoint's tokenizer, which --init_from "
                         f"needs; a sentencepiece tokenizer.model alone is not read)")
    return tokenizer_meta(path)


def rwkv_world_vocab(folder=None):
    """The RWKV World vocabulary's path: beside the checkpoint, in the installed rwkv package, in data/, or
    else taken from the rwkv package on the Python package index (the way data/shakespeare's GPT-2 ranks
    come), its sha256 checked."""
    here = [os.path.join(folder, RWKV_VOCAB)] if folder else []
    # the installed package, found without importing it, and past this repository's own rwkv.py
    elsewhere = [p for p in sys.path if os.path.abspath(p) != ROOT]
    spec = importlib.machinery.PathFinder.find_spec("rwkv", elsewhere)
    if spec is not None and spec.submodule_search_locations:
        here.append(os.path.join(list(spec.submodule_search_locations)[0], RWKV_VOCAB))
    cached = os.path.join(ROOT, "data", RWKV_VOCAB)
    for path in here + [cached]:
        if os.path.exists(path):
            return path
    import tempfile
    import zipfile
    print(f"fetching the RWKV World vocabulary from {RWKV_PACKAGE} on the Python package index...")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "-d", tmp, RWKV_PACKAGE]
        if subprocess.run(cmd).returncode != 0:
            raise UsageError(f"could not download {RWKV_PACKAGE} for its vocabulary; put {RWKV_VOCAB} beside "
                             f"the .pth")
        (wheel,) = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
        data = zipfile.ZipFile(wheel).read(f"rwkv/{RWKV_VOCAB}")
    if hashlib.sha256(data).hexdigest() != RWKV_VOCAB_SHA256:
        raise UsageError(f"{RWKV_VOCAB} from {RWKV_PACKAGE} does not have the expected sha256")
    with open(cached + ".tmp", "wb") as f:
        f.write(data)
    os.replace(cached + ".tmp", cached)
    return cached


def tokenizer_meta(path):
    """A dataset's meta for a checkpoint's tokenizer file, its whole text inside (so that a checkpoint
    carries its tokenizer): a Hugging Face tokenizer.json, or the RWKV World vocabulary (a .txt)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        meta = {"tokenizer": "hf", "tokenizer_json": text}
        meta["vocab_size"] = Tokenizer(meta).enc.get_vocab_size()
    else:
        meta = {"tokenizer": "rwkv_world", "vocab": text}
        meta["vocab_size"] = 1 + max(int(line.split(" ", 1)[0]) for line in text.splitlines())
    return meta


def tokenized_dataset(name, meta, prepare=True):
    """A dataset encoded with a released checkpoint's tokenizer (its meta): data/<name>/<kind>-<sha256>/,
    prepared on first use by data/<name>/prepare.py --tokenizer FILE, FILE the tokenizer written there from
    meta; or a folder path whose meta.pkl has that tokenizer."""
    text = meta["tokenizer_json"] if meta["tokenizer"] == "hf" else meta["vocab"]
    if os.sep in name or "/" in name:
        folder, data_meta = load_dataset(name, prepare)
        if data_meta.get("tokenizer") != meta["tokenizer"] or data_meta.get(
                "tokenizer_json", data_meta.get("vocab")) != text:
            raise UsageError(f"{name} was not encoded with the checkpoint's tokenizer; pass a dataset of "
                             f"data/ (e.g. --dataset shakespeare), which is then encoded with it")
        return folder, data_meta
    prepare_py = os.path.join(ROOT, "data", name, "prepare.py")
    if not os.path.exists(prepare_py):
        load_dataset(name)  # says which datasets there are
    with open(prepare_py) as f:
        if "--tokenizer" not in f.read():
            raise UsageError(f"dataset {name!r} cannot be encoded with a checkpoint's tokenizer (its "
                             f"prepare.py takes no --tokenizer: it is character-level); use --dataset "
                             f"shakespeare")
    sha = hashlib.sha256(text.encode()).hexdigest()[:12]
    folder = os.path.join(ROOT, "data", name, f"{meta['tokenizer']}-{sha}")
    if not os.path.exists(os.path.join(folder, "val.bin")):
        if not prepare:
            raise UsageError(f"dataset {name!r} is not prepared for this tokenizer")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "tokenizer.json" if meta["tokenizer"] == "hf" else RWKV_VOCAB)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"preparing dataset {name} with the checkpoint's tokenizer (first use): python "
              f"data/{name}/prepare.py --tokenizer {os.path.relpath(path, ROOT)}")
        if subprocess.run([sys.executable, prepare_py, "--tokenizer", path]).returncode != 0:
            raise SystemExit(f"error: preparing dataset {name!r} failed (see above)")
    with open(os.path.join(folder, "meta.pkl"), "rb") as f:
        return folder, pickle.load(f)


# ---------------------------------------------------------------------------------------------------
# 4. Model and optimizer (checkpoints are written atomically and loaded with weights_only=True)


def save_checkpoint(path, ckpt):
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a kill at any moment leaves the old file or the new one


def load_checkpoint(path, model=None):
    """The checkpoint dict; `model` (a name) checks that it holds that model. Bad files are a UsageError."""
    if not os.path.exists(path):
        raise UsageError(f"no checkpoint at {path}; train one first (python train.py --model MODEL) "
                         f"or point --out_dir at its folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} is not a readable nanozoo checkpoint ({type(e).__name__}); delete it or "
                         f"point --out_dir elsewhere")
    if model is not None and ckpt.get("model_name") != model:
        raise UsageError(f"{path} holds a {ckpt.get('model_name')!r} model, not {model!r}; use "
                         f"--model {ckpt.get('model_name')} or another --out_dir")
    return ckpt


def build_model(module, model_config, state_dict=None):
    try:
        config = module.Config(**model_config)
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad model config: {e}")
    model = module.Model(config)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def configure_optimizer(model, s, device):
    """AdamW over the model's own parameter groups (each may carry an lr_scale), at s's learning rate,
    betas and weight decay; fused where PyTorch has a fused kernel."""
    groups = model.param_groups(s["weight_decay"])
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    return torch.optim.AdamW(groups, lr=s["learning_rate"], betas=(s["beta1"], s["beta2"]),
                             fused=device.type in ("cuda", "cpu"))


def get_lr(it, s):
    """Linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr (nanoGPT's schedule)."""
    if not s["decay_lr"]:
        return s["learning_rate"]
    if it < s["warmup_iters"]:
        return s["learning_rate"] * (it + 1) / (s["warmup_iters"] + 1)
    if it > s["lr_decay_iters"]:
        return s["min_lr"]
    ratio = (it - s["warmup_iters"]) / max(1, s["lr_decay_iters"] - s["warmup_iters"])
    return s["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (s["learning_rate"] - s["min_lr"])


def train_step(model, optimizer, x, y, autocast, grad_clip=1.0, lr=None):
    """One step on one micro-batch as the loop below takes it (no accumulation, no DDP, no grad scaler):
    forward, backward, clip, AdamW, the model's after_step hook. bench.py trains with it, and the thread
    picker checks its numbers with it. Returns the loss tensor."""
    if lr is not None:
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
    with autocast:
        _, loss = model(x, y)
    loss.backward()
    if grad_clip > 0:
        foreach = x.device.type in ("cpu", "cuda")  # one fused pass over all the gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=foreach)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(model, "after_step"):
        model.after_step()
    return loss


@torch.no_grad()
def estimate_loss(model, folder, batch_size, block_size, eval_iters, device, autocast,
                  splits=("train", "val")):
    """The mean loss over eval_iters batches of each split: the same batches every time (a fixed seed), so
    that evaluations compare."""
    out = {}
    model.eval()
    for split in splits:
        gen = torch.Generator().manual_seed(0)
        with autocast:
            losses = [model(*get_batch(folder, split, batch_size, block_size, gen, device))[1]
                      for _ in range(eval_iters)]
        out[split] = torch.stack(losses).float().mean().item()
    model.train()
    return out


def build_training(module, model_config, s, ckpt, device, dtype, rank, ddp, local_rank, log, weights=None):
    """The model (from the checkpoint on --resume; from `weights`, a released checkpoint's, on --init_from),
    its compiled / DDP wrapper, the optimizer, the grad scaler and the training batches' own random generator
    (resumable)."""
    torch.manual_seed(s["seed"] + rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    raw_model = build_model(module, model_config, ckpt["model"] if ckpt else weights).to(device)
    train_gen = torch.Generator().manual_seed(s["seed"] + rank)
    optimizer = configure_optimizer(raw_model, s, device)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        train_gen.set_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16 and device.type == "cuda")
    model = raw_model
    if s["compile"]:
        log("compiling the model with torch.compile (takes a minute)...")
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    return model, raw_model, optimizer, scaler, train_gen


# ---------------------------------------------------------------------------------------------------
# 5. Log: config.json, log.jsonl (continued from the checkpoint's iteration on --resume)


def open_log(s, resolved, ckpt, master):
    """Write config.json and start log.jsonl; returns a function that appends a row (rank 0 only)."""
    os.makedirs(s["out_dir"], exist_ok=True)
    log_path = os.path.join(s["out_dir"], "log.jsonl")
    if master:
        with open(os.path.join(s["out_dir"], "config.json"), "w") as f:
            json.dump(resolved, f, indent=1)
        start = ckpt["iter_num"] if ckpt else 0
        old = [json.loads(line) for line in open(log_path)] if ckpt and os.path.exists(log_path) else []
        kept = [r for r in old if r["iter"] < start or (r["iter"] == start and "val_loss" in r)]
        with open(log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write_log(row):
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
    return log_path, write_log


def gather_rng(state, ddp, world):
    """Every rank's training-batch RNG state, so a resumed DDP run draws the same batches."""
    if not ddp:
        return [state]
    import torch.distributed as dist
    states = [torch.empty_like(state) for _ in range(world)]
    dist.all_gather(states, state)
    return states


# ---------------------------------------------------------------------------------------------------
# 6. Finish: the loss plot, the model's own metrics, a sample


def plot_log(log_path, png_path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(log_path)]
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    ax.plot([r["iter"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.6, label="train (batch)")
    ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
    ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=100)
    os.replace(png_path + ".tmp.png", png_path)
    plt.close(fig)


def format_metrics(metrics):
    """A model's extra numbers, lists as a small table (e.g. moe's per-expert load)."""
    lines = []
    for k, v in metrics.items():
        if isinstance(v, (list, tuple)):
            lines.append(f"{k}: " + " ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v))
        else:
            lines.append(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return "\n".join(lines)


def interrupted(model_name, s, iter_num, kept, log_path, master):
    """After Ctrl-C: the loss plot so far, two lines on where the run stands and how to go on, exit 130."""
    if master:
        plot_log(log_path, os.path.join(s["out_dir"], "loss.png"), f"{model_name} on {s['dataset']}")
    ckpt_path = os.path.join(s["out_dir"], "ckpt.pt")
    if kept is None:
        print(f"stopped at iteration {iter_num} (Ctrl-C), before the first checkpoint (iteration "
              f"{s['eval_interval']}): nothing to resume", file=sys.stderr)
    else:
        print(f"stopped at iteration {iter_num} (Ctrl-C); {ckpt_path} holds iteration {kept}, and "
              f"{os.path.join(s['out_dir'], 'loss.png')} the losses so far", file=sys.stderr)
        print(f"continue with: python train.py --model {model_name} --out_dir {s['out_dir']} --resume",
              file=sys.stderr)
    sys.exit(130)


def finish(model_name, raw_model, s, meta, log_path, device, autocast, log):
    """Plot the losses, print the model's metrics, write a sample. Returns the names of the files written."""
    plot_log(log_path, os.path.join(s["out_dir"], "loss.png"), f"{model_name} on {s['dataset']}")
    if hasattr(raw_model, "metrics"):
        log(format_metrics(raw_model.metrics()))
    if s["sample_tokens"] <= 0:
        return ["loss.png"]
    tok = Tokenizer(meta)
    torch.manual_seed(s["seed"])
    newline = "stoi" not in meta or "\n" in meta["stoi"]  # every BPE has a newline
    start_ids = torch.tensor([tok.encode("\n") if newline else [0]], device=device)
    raw_model.eval()
    with autocast:
        ids = raw_model.generate(start_ids, s["sample_tokens"], temperature=0.8, top_k=200)[0].tolist()
    text = tok.decode(ids)
    with open(os.path.join(s["out_dir"], "sample.txt"), "w") as f:
        f.write(text)
    log(f"---------- sample ----------\n{text}\n----------------------------")
    return ["loss.png", "sample.txt"]


# ---------------------------------------------------------------------------------------------------
# The run


def main(argv):
    # 1. Settings, checked at the door, 2. device, 3. data
    args, given, module, s, model_config, ckpt, device, dtype = validate(argv)
    ckpt_path = os.path.join(s["out_dir"], "ckpt.pt")
    ddp, rank, local_rank, world, device = start_device(device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    weights, tokenizer = None, None
    if args.pretrained:  # --init_from: the checkpoint's config, weights and tokenizer (its dataset's)
        log(f"loading {s['init_from']} into {args.model}.py")
        pretrained = load_pretrained(module, s["init_from"], model_config)  # model_config: the overrides
        model_config, weights = dataclasses.asdict(pretrained.config), pretrained.state_dict()
        if "block_size" not in given:  # a short context for fine-tuning, within the checkpoint's
            model_config["block_size"] = min(FINETUNE_BLOCK_SIZE, model_config["block_size"])
        tokenizer = pretrained_tokenizer(model_name(args.model), args.pretrained[1])
    elif ckpt is not None and ckpt["meta"].get("tokenizer") in ("hf", "rwkv_world"):
        tokenizer = ckpt["meta"]  # a fine-tuning run, resumed: its data is in its checkpoint's tokenizer
    folder, meta = open_data(s, model_config, given, ckpt, ddp, master, tokenizer)

    # 4. Model and optimizer
    model, raw_model, optimizer, scaler, train_gen = build_training(
        module, model_config, s, ckpt, device, dtype, rank, ddp, local_rank, log, weights)
    config = raw_model.config
    autocast = autocast_for(device, dtype)

    # 5. Log
    tokens_per_iter = s["gradient_accumulation_steps"] * world * s["batch_size"] * config.block_size
    n_params = sum(p.numel() for p in raw_model.parameters())
    resolved = {"model": args.model, "model_config": dataclasses.asdict(config), "settings": s,
                "device": str(device), "dtype": str(dtype).replace("torch.", ""), "world_size": world,
                "parameters": n_params, "tokens_per_iter": tokens_per_iter}
    log(json.dumps(resolved, indent=1))
    log(f"{args.model}: {n_params / 1e6:.2f}M parameters, {tokens_per_iter:,} tokens per iteration")
    log_path, write_log = open_log(s, resolved, ckpt, master)

    # The training loop: evaluate and checkpoint every eval_interval steps, log every log_interval
    batch = get_batch(folder, "train", s["batch_size"], config.block_size, torch.Generator().manual_seed(0),
                      device)  # for the thread picker's check, from its own generator: train_gen is untouched
    check_step = lambda: train_step(raw_model, optimizer, *batch, autocast, s["grad_clip"])
    picker = None if ddp else pick_threads(s["threads"], device, raw_model, optimizer, check_step, log)
    stop = []  # Ctrl-C asks the run to stop: the step under way ends, then it stops cleanly

    def ask_to_stop(*_):
        stop.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
    if not ddp:
        signal.signal(signal.SIGINT, ask_to_stop)
    iter_num = ckpt["iter_num"] if ckpt else 0
    kept = ckpt["iter_num"] if ckpt else None  # the iteration ckpt.pt holds
    best_val = ckpt["best_val_loss"] if ckpt else float("inf")
    peak = peak_flops(device)
    t_start, t_last, elapsed0 = time.time(), time.time(), ckpt["elapsed"] if ckpt else 0.0
    fresh = True  # the iteration a resumed run starts at was evaluated and saved already
    saved = False  # whether this run wrote ckpt.pt
    pending_rng = train_gen.get_state()  # the RNG state that draws the pending batch: what a checkpoint saves
    x, y = get_batch(folder, "train", s["batch_size"], config.block_size, train_gen, device)
    while True:
        lr = get_lr(iter_num, s)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]

        if (iter_num % s["eval_interval"] == 0 or iter_num == s["max_iters"]) and not (ckpt and fresh):
            losses = estimate_loss(raw_model, folder, s["batch_size"], config.block_size, s["eval_iters"],
                                   device, autocast)
            elapsed = elapsed0 + time.time() - t_start
            log(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            write_log({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                       "elapsed": elapsed})
            if not math.isfinite(losses["val"]):
                raise SystemExit(f"error: the val loss is {losses['val']} at iteration {iter_num}; stopping. "
                                 f"The last good checkpoint is {ckpt_path}")
            best_val = min(best_val, losses["val"])
            t_last = time.time()  # tokens/s measures training, not evaluation
            rng = gather_rng(pending_rng, ddp, world)  # every rank takes part
            if iter_num > 0 and master:
                save_checkpoint(ckpt_path, {
                    "model_name": model_name(args.model), "model_config": dataclasses.asdict(config),
                    # a model file given by its path: sample.py and --resume load the same file
                    "model_file": os.path.abspath(args.model) if is_model_file(args.model) else None,
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "iter_num": iter_num, "best_val_loss": best_val, "settings": s, "meta": meta,
                    "elapsed": elapsed, "rng": rng})
                saved, kept = True, iter_num
        fresh = False
        if iter_num >= s["max_iters"]:
            break
        if stop:
            interrupted(args.model, s, iter_num, kept, log_path, master)

        # forward, backward and the optimizer step; the loss stays on the device until it is logged
        if picker:
            picker.before_step(iter_num)
        t_step = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(s["gradient_accumulation_steps"]):
            if ddp:  # all-reduce the gradients only on the last micro-step
                model.require_backward_grad_sync = micro == s["gradient_accumulation_steps"] - 1
            with autocast:
                _, loss = model(x, y)
                loss = loss / s["gradient_accumulation_steps"]
            pending_rng = train_gen.get_state()
            # draw the next batch now, so that it is ready (pinned, on its way to a GPU) for the next step
            x, y = get_batch(folder, "train", s["batch_size"], config.block_size, train_gen, device)
            scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        if s["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            # foreach: one fused pass over all the gradients, where the default loops over them on a CPU
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), s["grad_clip"],
                                           foreach=device.type in ("cpu", "cuda"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(raw_model, "after_step"):
            raw_model.after_step()
        if picker:
            picker.after_step(iter_num, time.perf_counter() - t_step)
        iter_num += 1

        if iter_num % s["log_interval"] == 0 or iter_num == s["max_iters"]:
            loss_value = loss_sum.item()  # the one sync with the device per logged step
            if not math.isfinite(loss_value):
                raise SystemExit(f"error: the training loss is {loss_value} at iteration {iter_num - 1}; "
                                 f"stopping. The last good checkpoint is {ckpt_path} (try a lower "
                                 f"--learning_rate)")
            dt = (time.time() - t_last) / (iter_num % s["log_interval"] or s["log_interval"])
            t_last = time.time()
            tok_s = tokens_per_iter / dt
            row = {"iter": iter_num, "loss": loss_value, "lr": lr, "tokens_per_sec": tok_s,
                   "elapsed": elapsed0 + time.time() - t_start}
            mfu = ""
            if peak:
                row["mfu"] = raw_model.flops_per_token(config.block_size) * tok_s / peak
                mfu = f", mfu {100 * row['mfu']:.1f}%"
            if hasattr(raw_model, "metrics"):
                row.update(raw_model.metrics())
            log(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                f"{tok_s:,.0f} tokens/s{mfu}")
            write_log(row)

    # 6. Finish, at the cores' thread count: the sample does not depend on the load
    if picker:
        torch.set_num_threads(picker.candidates[0])
    if master:
        written = ["config.json", "log.jsonl"] + ["ckpt.pt"] * saved
        written += finish(args.model, raw_model, s, meta, log_path, device, autocast, log)
        note = "" if saved else " (no ckpt.pt: this run trained no step past its start)"
        log(f"done in {time.time() - t_start:.0f}s: {s['out_dir']}/ has {', '.join(written)}{note}")
    if ddp:
        import torch.distributed as dist
        dist.barrier()  # leave together: a rank that tears gloo down while rank 0 still writes can abort
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before the training loop, or a second Ctrl-C
        print("train.py: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
