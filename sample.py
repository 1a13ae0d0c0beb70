"""
sample.py: generate text from a checkpoint written by train.py, for any model.

    python sample.py --out_dir out/gpt --start "ROMEO:" --num_samples 3 --max_new_tokens 300
    python sample.py --out_dir out/mamba --start FILE:prompt.txt --temperature 0.7 --top_k 50
    python sample.py --init_from HuggingFaceTB/SmolLM2-135M --start "The meaning of life is"

The checkpoint names its model file and config; the text goes through the model's generate(), which
prefills the prompt once and then steps one token at a time (a KV cache or a recurrent state). A prompt may
be of any length: the attention models (gpt, moe) keep its last block_size tokens, as nanoGPT does, and say
so; the recurrent ones (mamba, rwkv, retnet) read all of it, block_size tokens at a time. --init_from
samples a released checkpoint instead (a Hugging Face hub id, a local folder or a .pth file), through the
model file's from_pretrained and the checkpoint's own tokenizer.
"""

import argparse
import math
import os
import sys
import warnings

import torch

from train import (Parser, Tokenizer, UsageError, autocast_for, build_model, load_checkpoint,
                   load_model_module, load_pretrained, memory_bytes, pick_device, pick_dtype,
                   pretrained_source, pretrained_tokenizer)


def build_parser():
    p = Parser(prog="sample.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="out/gpt", help="the run folder holding ckpt.pt")
    p.add_argument("--init_from", default=None, help="a released checkpoint instead: a Hugging Face hub id, "
                   "a local folder or a .pth file (README: Released models)")
    p.add_argument("--start", default="\n", help="the prompt, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens; 0: all")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kernel", default=None, help="override the checkpoint's kernel (torch, triton, ...)")
    return p


def validate(argv):
    """The door: the flags, the checkpoint, the model's config and the prompt, checked before any model is
    built. Returns (args, a function that builds the model, device, dtype, tokenizer, the prompt's ids)."""
    args = build_parser().parse_args(argv)
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.temperature < math.inf:
        raise UsageError(f"--temperature must be a number from 0 up (0: the most likely token), got "
                         f"{args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top_k must be 0 (all tokens) or more, got {args.top_k}")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be a whole number from 0 to 2^63 - 1, got {args.seed}")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)

    if args.kernel == "triton" and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before the model file defines its kernels
        print("note: no CUDA GPU, so the Triton kernels run in Triton's interpreter (slow)", file=sys.stderr)
    if args.init_from is not None:  # a released checkpoint: its model file, weights and tokenizer
        if not args.init_from:
            raise UsageError("--init_from is empty; give a Hugging Face hub id, a local folder or a .pth")
        model_name, folder = pretrained_source(args.init_from)
        module = load_model_module(model_name)
        overrides = {} if args.kernel is None else {"kernel": args.kernel}
        tok = Tokenizer(pretrained_tokenizer(model_name, folder))
        build = lambda: load_pretrained(module, args.init_from, overrides)
    else:  # a checkpoint train.py wrote
        ckpt = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"))
        config = dict(ckpt["model_config"])
        if args.kernel is not None:
            config["kernel"] = args.kernel
        module = load_model_module(ckpt.get("model_file") or ckpt["model_name"])  # a file: its path
        try:
            module.Config(**config)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--{e}" if str(e).split(" ")[0] in config else f"bad model config: {e}")
        tok = Tokenizer(ckpt["meta"])
        build = lambda: build_model(module, config, ckpt["model"])

    start = args.start
    if start.startswith("FILE:"):
        try:
            start = open(start[5:], encoding="utf-8").read()
        except OSError as e:
            raise UsageError(f"cannot read the prompt file {start[5:]!r}: {e.strerror}")
    if not start:
        raise UsageError("the prompt is empty; give --start some text (the default is a newline)")
    ids = tok.encode(start)
    # the samples, each prompt + new tokens as int64, and the logits of one step, must fit in memory
    need = args.num_samples * (8 * (len(ids) + args.max_new_tokens) + 4 * tok.meta["vocab_size"])
    have = memory_bytes(device)
    if have is not None and need > have:
        raise UsageError(f"{args.num_samples} samples of {len(ids)} + {args.max_new_tokens} tokens need "
                         f"more than {need / 2**30:,.0f} GB; {device.type} has {have / 2**30:,.0f} GB: ask "
                         f"for fewer")
    return args, build, device, dtype, tok, ids


def main(argv):
    args, build, device, dtype, tok, ids = validate(argv)
    model = build().to(device).eval()
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    torch.manual_seed(args.seed)
    # generate() warns once when it crops a long prompt (attention models): one line, as a note
    warnings.formatwarning = lambda message, *_, **__: f"note: {message}\n"
    with torch.no_grad(), autocast_for(device, dtype):
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None)
    for row in out.tolist():
        print(tok.decode(row))
        print("---------------")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UsageError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("sample.py: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
