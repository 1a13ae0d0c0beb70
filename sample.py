"""
sample.py: generate text from a checkpoint written by train.py, for any model.

    python sample.py --out_dir out/gpt --start "ROMEO:" --num_samples 3 --max_new_tokens 300
    python sample.py --out_dir out/mamba --start FILE:prompt.txt --temperature 0.7 --top_k 50
    python sample.py --init_from HuggingFaceTB/SmolLM2-135M --start "The meaning of life is"

The checkpoint names its model file and config; the text goes through the model's generate(), which
prefills the prompt once and then steps one token at a time (a KV cache or a recurrent state). --init_from
samples a released checkpoint instead (a Hugging Face hub id, a local folder or a .pth file), through the
model file's from_pretrained and the checkpoint's own tokenizer.
"""

import argparse
import os
import sys

import torch

from train import (Parser, Tokenizer, UsageError, autocast_for, build_model, load_checkpoint,
                   load_model_module, load_pretrained, pick_device, pick_dtype, pretrained_source,
                   pretrained_tokenizer)


def main(argv):
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
    args = p.parse_args(argv)
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if args.temperature < 0 or args.top_k < 0:
        raise UsageError("--temperature and --top_k must not be negative")

    if args.kernel == "triton" and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before the model file defines its kernels
        print("note: no CUDA GPU, so the Triton kernels run in Triton's interpreter (slow)", file=sys.stderr)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.init_from:  # a released checkpoint: its model file, weights and tokenizer
        model_name, folder = pretrained_source(args.init_from)
        module = load_model_module(model_name)
        overrides = {} if args.kernel is None else {"kernel": args.kernel}
        model = load_pretrained(module, args.init_from, overrides).to(device)
        tok = Tokenizer(pretrained_tokenizer(model_name, folder))
    else:  # a checkpoint train.py wrote
        ckpt = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"))
        config = dict(ckpt["model_config"])
        if args.kernel is not None:
            config["kernel"] = args.kernel
        module = load_model_module(ckpt["model_name"])
        model = build_model(module, config, ckpt["model"]).to(device).eval()
        tok = Tokenizer(ckpt["meta"])

    start = args.start
    if start.startswith("FILE:"):
        try:
            start = open(start[5:], encoding="utf-8").read()
        except OSError as e:
            raise UsageError(f"cannot read the prompt file {start[5:]!r}: {e.strerror}")
    if not start:
        raise UsageError("the prompt is empty; give --start some text (the default is a newline)")
    idx = torch.tensor([tok.encode(start)] * args.num_samples, dtype=torch.long, device=device)

    torch.manual_seed(args.seed)
    autocast = autocast_for(device, dtype)
    try:
        with torch.no_grad(), autocast:
            out = model.generate(idx, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k or None)
    except ValueError as e:  # e.g. a prompt longer than the model's block_size
        raise UsageError(str(e))
    for row in out.tolist():
        print(tok.decode(row))
        print("---------------")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UsageError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
