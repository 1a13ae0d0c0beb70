"""Released checkpoints: each model file's from_pretrained, proven against its family's own implementation on
tiny random checkpoints that the references themselves write, offline (nothing is downloaded):
transformers' LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, MambaForCausalLM and MixtralForCausalLM
(save_pretrained into a temporary folder), and for RWKV-7 an x070 .pth in the official layout, read by the
rwkv package's own model. Logits equal the reference's (fp32, to 1e-4 relative) on random tokens, and greedy
generation is identical. Every parameter is moved off its initial value first, so that any two tensors
differ: a loader that put one where another belongs, or left one out, fails these tests. What a file cannot
represent is a one-line error. Then --init_from end to end: sample.py and train.py with the checkpoint's own
tokenizer."""
import importlib
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import DEVICE, ROOT

DEV = "a test dependency: pip install -r requirements-dev.txt"
transformers = pytest.importorskip("transformers", reason=DEV)
pytestmark = [pytest.mark.skipif(DEVICE != "cpu", reason="the references run on the CPU"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")]  # the rwkv package's

V = 97  # the tiny vocabulary
T = 33  # random tokens per sequence
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # HF_HUB_OFFLINE: the hub is never asked
ENV.pop("TRITON_INTERPRET", None)


def randomize(model, seed=0):
    """Move every parameter (norm gains, biases, A_log, D included) by N(0, 0.2^2) noise, so that no two
    tensors are alike; tied ones stay tied. In eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def rel_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_greedy(ref, prompt, n):
    ref.generation_config.eos_token_id = None  # never stop early
    # every token attended: else a prompt token equal to pad_token_id (here <s>) would be masked out
    return ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                        pad_token_id=0)


def check_against(ours, ref, seed=1):
    """Logits on random tokens to 1e-4 relative, and 20 greedy tokens after a 5-token prompt identical."""
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = ref(idx).logits
        got, _ = ours(idx)
    assert got.shape == want.shape
    assert rel_error(got, want) < 1e-4, rel_error(got, want)
    assert torch.equal(ours.generate(idx[:1, :5], 20, temperature=0), hf_greedy(ref, idx[:1, :5], 20))


def released_config(folder):
    """Rewrite a transformers-5 config.json as the released checkpoints have theirs (transformers 4):
    rope_theta and rope_scaling at the top, no rope_parameters."""
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], rope_scaling=None)
    json.dump(config, open(path, "w"))


# ---------------------------------------------------------------------------------------------------
# gpt.py: Llama-style checkpoints

SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, initializer_range=0.2)
LLAMA_STYLE = {  # model class, its config, and whether config.json is rewritten in the released form
    "llama GQA, untied, rope_theta 5e5, released config": ("LlamaForCausalLM", "LlamaConfig", dict(
        num_key_value_heads=2, rope_theta=5e5, tie_word_embeddings=False, rms_norm_eps=1e-5), True),
    "llama tied, transformers-5 config": ("LlamaForCausalLM", "LlamaConfig", dict(
        num_key_value_heads=4, tie_word_embeddings=True), False),
    "qwen2 QKV bias, GQA, tied": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True), False),
    "mistral MQA, untied": ("MistralForCausalLM", "MistralConfig", dict(
        num_key_value_heads=1, sliding_window=None, tie_word_embeddings=False), True),
}


def save_llama_style(folder, case):
    cls, config_cls, kwargs, released = LLAMA_STYLE[case]
    torch.manual_seed(0)
    ref = randomize(getattr(transformers, cls)(getattr(transformers, config_cls)(**SMALL, **kwargs)))
    ref.save_pretrained(folder)
    if released:
        released_config(folder)
    return ref


@pytest.mark.parametrize("case", LLAMA_STYLE)
def test_llama_style_matches_transformers(case, load_model, tmp_path):
    ref = save_llama_style(tmp_path, case)
    model = load_model("gpt").Model.from_pretrained(str(tmp_path))
    assert model.config.qkv_bias == case.startswith("qwen2")
    assert model.config.rope_theta == ref.config.rope_parameters["rope_theta"]
    check_against(model, ref)


# ---------------------------------------------------------------------------------------------------
# mamba.py: Mamba-1, Hugging Face's layout (-hf) and state-spaces' own


def save_mamba(folder, layout):
    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=104 if layout == "state-spaces" else V, hidden_size=64,
                                      state_size=8, conv_kernel=3, expand=2, time_step_rank=5,
                                      num_hidden_layers=2, use_conv_bias=layout != "hf, no conv bias")
    ref = randomize(transformers.MambaForCausalLM(config))
    if layout != "state-spaces":
        ref.save_pretrained(folder)
        return ref
    # state-spaces' layout (mamba_ssm's MambaLMHeadModel): backbone.embedding, lm_head saved though tied, a
    # pytorch_model.bin, and its own config.json with the vocabulary before its padding to a multiple of 8
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in ref.state_dict().items()}
    assert "lm_head.weight" in sd
    torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    json.dump({"d_model": 64, "n_layer": 2, "vocab_size": V, "rms_norm": True, "residual_in_fp32": True,
               "fused_add_norm": True, "pad_vocab_size_multiple": 8,
               "ssm_cfg": {"d_state": 8, "d_conv": 3, "expand": 2, "dt_rank": 5}},
              open(os.path.join(folder, "config.json"), "w"))
    return ref


@pytest.mark.parametrize("layout", ["hf", "hf, no conv bias", "state-spaces"])
def test_mamba_matches_transformers(layout, load_model, tmp_path):
    ref = save_mamba(tmp_path, layout)
    model = load_model("mamba").Model.from_pretrained(str(tmp_path))
    c = model.config
    assert (c.d_state, c.d_conv, c.dt_rank, c.expand) == (8, 3, 5, 2)
    check_against(model, ref)


# ---------------------------------------------------------------------------------------------------
# mamba.py: Mamba-2, Hugging Face's layout (Mamba2ForCausalLM) and state-spaces' own


def save_mamba2(folder, layout):
    torch.manual_seed(0)
    config = transformers.Mamba2Config(vocab_size=V, hidden_size=64, state_size=16, num_heads=8, head_dim=16,
                                       expand=2, n_groups=2, conv_kernel=4, num_hidden_layers=2, chunk_size=8,
                                       tie_word_embeddings=True)
    ref = randomize(transformers.Mamba2ForCausalLM(config))
    if layout == "hf":
        ref.save_pretrained(folder)
        return ref
    # state-spaces' layout (mamba_ssm's MambaLMHeadModel with ssm_cfg layer "Mamba2"): backbone.embedding,
    # lm_head saved though tied, a pytorch_model.bin, and its own config.json
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in ref.state_dict().items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    json.dump({"d_model": 64, "n_layer": 2, "vocab_size": V, "rms_norm": True, "residual_in_fp32": True,
               "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True,
               "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "expand": 2}},
              open(os.path.join(folder, "config.json"), "w"))
    return ref


@pytest.mark.parametrize("layout", ["hf", "state-spaces"])
def test_mamba2_matches_transformers(layout, load_model, tmp_path):
    ref = save_mamba2(tmp_path, layout)
    model = load_model("mamba").Model.from_pretrained(str(tmp_path))
    c = model.config
    assert (c.version, c.d_state, c.headdim, c.ngroups, c.expand, c.d_conv) == (2, 16, 16, 2, 2, 4)
    check_against(model, ref)


# ---------------------------------------------------------------------------------------------------
# moe.py: Mixtral


def save_mixtral(folder):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**{**SMALL, "intermediate_size": 48}, num_key_value_heads=2,
                                        num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    ref = randomize(transformers.MixtralForCausalLM(config))
    ref.save_pretrained(folder)
    return ref


def test_mixtral_matches_transformers(load_model, tmp_path):
    ref = save_mixtral(tmp_path)
    model = load_model("moe").Model.from_pretrained(str(tmp_path))
    assert (model.config.n_expert, model.config.top_k, model.config.router) == (4, 2, "softmax")
    check_against(model, ref)


# ---------------------------------------------------------------------------------------------------
# rwkv.py: the official x070 .pth, against the rwkv package


def rwkv_package():
    """The rwkv package's model module and tokenizer module. Its RWKV-7 is defined at import only under
    RWKV_V7_ON=1; and `python -m pytest` puts the repository first on sys.path, where rwkv.py is ours."""
    os.environ["RWKV_V7_ON"] = "1"
    pytest.importorskip("rwkv", reason=DEV)
    path, shadow = sys.path[:], sys.modules.pop("rwkv", None)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != ROOT]
    try:
        package = importlib.import_module("rwkv.model"), importlib.import_module("rwkv.rwkv_tokenizer")
    finally:
        sys.path[:] = path
        if shadow is not None and not hasattr(shadow, "__path__"):
            sys.modules["rwkv"] = shadow
    assert hasattr(package[0], "RWKV_x070"), "rwkv.model was imported before without RWKV_V7_ON=1"
    return package


def write_rwkv7(path, vocab=V, C=64, H=2, n_layer=3, ranks=(32, 16, 8, 24)):
    """An x070 .pth in the official layout (BlinkDL/RWKV-LM, RWKV-v7/train_temp/src/model.py's names and
    shapes), random, in bf16 as released. LoRA ranks (decay, a, v, gate) all different."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=0.2, mean=0.0):
        return (mean + scale * torch.randn(*shape, generator=g)).to(torch.bfloat16)

    t = {"emb.weight": rnd(vocab, C, scale=1.0), "blocks.0.ln0.weight": rnd(C, mean=1),
         "blocks.0.ln0.bias": rnd(C)}
    for i in range(n_layer):
        b = f"blocks.{i}."
        for n in ("ln1", "ln2"):
            t[f"{b}{n}.weight"], t[f"{b}{n}.bias"] = rnd(C, mean=1), rnd(C)
        for c in "rwkvag":  # the token-shift mixes, in [0, 1]
            t[f"{b}att.x_{c}"] = torch.rand(1, 1, C, generator=g).to(torch.bfloat16)
        t[b + "att.w0"], t[b + "att.a0"], t[b + "att.v0"] = rnd(1, 1, C, mean=-1), rnd(1, 1, C), rnd(1, 1, C)
        for c, r in zip("wavg", ranks):
            t[f"{b}att.{c}1"], t[f"{b}att.{c}2"] = rnd(C, r, scale=0.3), rnd(r, C, scale=0.3)
        t[b + "att.k_k"], t[b + "att.k_a"] = rnd(1, 1, C, mean=0.7), rnd(1, 1, C, mean=1)
        t[b + "att.r_k"] = rnd(H, C // H, scale=0.3)
        for n in ("receptance", "key", "value", "output"):
            t[f"{b}att.{n}.weight"] = rnd(C, C, scale=C ** -0.5)
        t[b + "att.ln_x.weight"], t[b + "att.ln_x.bias"] = rnd(C, mean=1), rnd(C)
        t[b + "ffn.x_k"] = torch.rand(1, 1, C, generator=g).to(torch.bfloat16)
        t[b + "ffn.key.weight"], t[b + "ffn.value.weight"] = rnd(4 * C, C, scale=C ** -0.5), rnd(C, 4 * C)
    t["ln_out.weight"], t["ln_out.bias"], t["head.weight"] = rnd(C, mean=1), rnd(C), rnd(vocab, C)
    torch.save(t, path)
    return t


def test_rwkv7_matches_the_rwkv_package(load_model, tmp_path):
    path = str(tmp_path / "tiny.pth")
    write_rwkv7(path)
    reference, _ = rwkv_package()
    ref = reference.RWKV(model=path[:-len(".pth")], strategy="cpu fp32")
    model = load_model("rwkv").Model.from_pretrained(path)
    c = model.config
    assert (c.head_size, c.decay_lora, c.aaa_lora, c.mv_lora, c.gate_lora) == (32, 32, 16, 8, 24)
    tokens = torch.randint(0, V, (77,), generator=torch.Generator().manual_seed(1)).tolist()  # two chunks
    want, _ = ref.forward(tokens, None, full_output=True)  # (T, V)
    with torch.no_grad():
        got, _ = model(torch.tensor([tokens]))
    assert rel_error(got[0], want) < 1e-4, rel_error(got[0], want)
    out, state, greedy = *ref.forward(tokens[:5], None), tokens[:5]
    for _ in range(20):  # the package has no generate: its own forward, a token at a time
        greedy.append(int(out.argmax()))
        out, state = ref.forward(greedy[-1:], state)
    assert model.generate(torch.tensor([tokens[:5]]), 20, temperature=0)[0].tolist() == greedy


# ---------------------------------------------------------------------------------------------------
# What a file cannot represent: a one-line error naming it


def edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    config = {**json.load(open(path)), **changes}
    json.dump({k: v for k, v in config.items() if v != "drop"}, open(path, "w"))


def add_tensor(folder, name, tensor):
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    save_file({**load_file(path), name: tensor}, path)


LLAMA_ERRORS = {  # an edit of a saved Llama, and the words of the error
    "llama3 rope scaling": (lambda f: edit_config(f, rope_parameters="drop", rope_theta=5e5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0}), ["rope scaling 'llama3'"]),
    "linear rope scaling, transformers-5 config": (lambda f: edit_config(f, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), ["rope scaling 'linear'"]),
    "mistral's sliding window": (lambda f: edit_config(f, model_type="mistral", sliding_window=16),
                                 ["sliding-window", "16 tokens"]),
    "qwen2's sliding window": (lambda f: edit_config(f, model_type="qwen2", use_sliding_window=True,
                                                     sliding_window=16, max_window_layers=1),
                               ["sliding-window"]),
    "another architecture": (lambda f: edit_config(f, model_type="gemma"), ["model_type 'gemma'"]),
    "head_dim apart": (lambda f: edit_config(f, head_dim=32), ["head_dim 32"]),
    "o_proj bias": (lambda f: edit_config(f, attention_bias=True), ["attention_bias"]),
    "gelu": (lambda f: edit_config(f, hidden_act="gelu"), ["hidden_act 'gelu'"]),
    "QK-norm tensors (Qwen3's)": (lambda f: add_tensor(f, "model.layers.0.self_attn.q_norm.weight",
                                                       torch.ones(16)), ["no place for", "q_norm"]),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny checkpoint of each family, saved once; tests copy it before editing."""
    root = tmp_path_factory.mktemp("released")
    save_llama_style(root / "llama", "llama GQA, untied, rope_theta 5e5, released config")
    save_mamba(root / "mamba", "hf")
    os.makedirs(root / "state-spaces")
    save_mamba(root / "state-spaces", "state-spaces")
    save_mamba2(root / "mamba2", "hf")
    save_mixtral(root / "mixtral")
    write_rwkv7(str(root / "rwkv7.pth"))
    return root


def assert_one_line_error(load, words):
    with pytest.raises(ValueError) as e:
        load()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message


@pytest.mark.parametrize("case", LLAMA_ERRORS)
def test_gpt_refuses_what_it_cannot_represent(case, saved, load_model, tmp_path):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(saved / "llama", folder)
    edit, words = LLAMA_ERRORS[case]
    edit(folder)
    assert_one_line_error(lambda: load_model("gpt").Model.from_pretrained(folder), words)


@pytest.mark.parametrize("layout, changes, words", [
    ("mamba2", dict(time_step_limit=[0.0, 0.1]), ["dt limit"]),
    ("mamba2", dict(tie_word_embeddings=False), ["untied"]),
    ("mamba2", dict(model_type="jamba"), ["model_type 'jamba'"]),
    ("mamba", dict(layer_norm_epsilon=1e-6), ["norm eps"]),
    ("mamba", dict(tie_word_embeddings=False), ["untied"]),
    ("state-spaces", dict(rms_norm=False), ["LayerNorm"]),
    ("state-spaces", dict(attn_layer_idx=[1]), ["attention or MLP layers"]),
    ("mixtral", dict(sliding_window=16), ["sliding-window"]),
    ("mixtral", dict(model_type="qwen2_moe"), ["model_type 'qwen2_moe'"]),
])
def test_mamba_and_moe_refuse_what_they_cannot_represent(layout, changes, words, saved, load_model, tmp_path):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(saved / layout, folder)
    edit_config(folder, **changes)
    module = load_model("moe" if layout == "mixtral" else "mamba")
    assert_one_line_error(lambda: module.Model.from_pretrained(folder), words)


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.pop("blocks.0.att.k_a"), ["not an RWKV-7"]),  # as RWKV-4, 5 and 6 files have no k_a
    (lambda t: t.update({"blocks.0.ffn.s_emb.weight": torch.zeros(V, 1024)}),  # DeepEmbed's
     ["no place for", "s_emb"]),
    (lambda t: t.update({"blocks.1.ffn.key.weight": torch.zeros(4 * 64 + 32, 64)}), ["blocks.1.ffn.key"]),
])
def test_rwkv_refuses_what_it_cannot_represent(edit, words, saved, load_model, tmp_path):
    tensors = torch.load(saved / "rwkv7.pth", weights_only=True)
    edit(tensors)
    torch.save(tensors, tmp_path / "edited.pth")
    path = str(tmp_path / "edited.pth")
    assert_one_line_error(lambda: load_model("rwkv").Model.from_pretrained(path), words)


# ---------------------------------------------------------------------------------------------------
# Tokenizers: the checkpoint's own


def load_train():
    spec = importlib.util.spec_from_file_location("nanozoo_train", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n") * 40


def tiny_tokenizer(path, vocab_size=V):
    """A byte-level BPE tokenizer.json (GPT-2's and SmolLM2's kind) with a <s> that it puts in front of a
    text, as Llama's does, trained on TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(path))
    return tok


def test_hf_tokenizer_is_the_checkpoints(tmp_path):
    train = load_train()
    tok = tiny_tokenizer(tmp_path / "tokenizer.json", vocab_size=300)
    ours = train.Tokenizer(train.tokenizer_meta(str(tmp_path / "tokenizer.json")))
    text = "Speak, speak! Zebra\u00e9 \u4e2d\n"
    assert ours.encode(text) == tok.encode(text).ids and ours.encode(text)[0] == 0  # <s> in front
    assert ours.encode(text, special=False) == tok.encode(text, add_special_tokens=False).ids
    assert ours.decode(ours.encode(text)) == text


def test_world_tokenizer_is_rwkvs(tmp_path):
    """train.py's WorldTokenizer against the rwkv package's own TRIE_TOKENIZER, on its vocabulary."""
    train = load_train()
    _, rwkv_tokenizer = rwkv_package()
    path = train.rwkv_world_vocab()  # the installed package's copy
    ref = rwkv_tokenizer.TRIE_TOKENIZER(path)
    ours = train.Tokenizer(train.tokenizer_meta(path))
    text = TEXT[:3000] + "\u4e2d\u6587\u5b57\u7b26 \U0001f916 caf\u00e9\r\n\t  spaces   \x00 end"
    assert ours.encode(text) == ref.encode(text)
    assert ours.decode(ours.encode(text)) == text and ours.meta["vocab_size"] == 65530


# ---------------------------------------------------------------------------------------------------
# --init_from end to end


def printed(text):
    """text as a subprocess's stdout reads back in text mode: universal newlines."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def run(script, *args, check=True):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny Llama with its own tokenizer.json, as a released checkpoint's folder."""
    folder = tmp_path_factory.mktemp("tinyllama")
    tok = tiny_tokenizer(folder / "tokenizer.json")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**SMALL, "vocab_size": tok.get_vocab_size()}, num_key_value_heads=2)
    ref = randomize(transformers.LlamaForCausalLM(config))
    ref.save_pretrained(folder)
    return folder, ref, tok


def test_sample_and_finetune_a_released_checkpoint(llama_folder, tmp_path):
    folder, ref, tok = llama_folder
    # sample.py --init_from: the prompt through the checkpoint's tokenizer, greedy as transformers'
    p = run("sample.py", "--init_from", str(folder), "--start", "First Citizen:", "--temperature", "0",
            "--max_new_tokens", "12", "--num_samples", "1", "--device", "cpu")
    want = tok.decode(hf_greedy(ref, torch.tensor([tok.encode("First Citizen:").ids]), 12)[0].tolist())
    assert p.stdout.split("\n---------------\n")[0] == printed(want) and want.startswith("First Citizen:")

    # a dataset in its tokenizer, as data/shakespeare/prepare.py --tokenizer writes one
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(folder / "tokenizer.json", data / "tokenizer.json")
    spec = importlib.util.spec_from_file_location("bpe_prepare", os.path.join(ROOT, "data", "shakespeare",
                                                                              "prepare.py"))
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    n_train, n_val = prepare.prepare_with_tokenizer(str(data / "tokenizer.json"), text=TEXT)
    assert n_train > 500 and n_val > 50

    # train.py --init_from fine-tunes it, with nanoGPT's fine-tuning settings where none are typed
    out = tmp_path / "out"
    run("train.py", "--init_from", str(folder), "--dataset", str(data), "--out_dir", str(out),
        "--max_iters", "4", "--eval_interval", "2", "--eval_iters", "2", "--gradient_accumulation_steps", "2",
        "--sample_tokens", "8", "--device", "cpu")
    config = json.load(open(out / "config.json"))
    assert config["model"] == "gpt" and config["settings"]["learning_rate"] == 3e-5
    assert config["model_config"]["block_size"] == 64  # min(256, the checkpoint's context)
    assert config["model_config"]["n_kv_head"] == 2 and config["settings"]["batch_size"] == 1
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 4 and ckpt["meta"]["tokenizer"] == "hf"
    start = ref.model.embed_tokens.weight
    assert not torch.equal(ckpt["model"]["wte.weight"], start) and torch.allclose(ckpt["model"]["wte.weight"],
                                                                                  start, atol=1e-2)
    # and sample.py reads what it wrote, with the tokenizer it carries
    p = run("sample.py", "--out_dir", str(out), "--start", "All:", "--max_new_tokens", "8", "--num_samples",
            "1")
    assert p.stdout.startswith("All:")


def test_sample_a_released_rwkv7_with_the_world_vocabulary(tmp_path):
    """A .pth of the World vocabulary's size (65,536), sampled greedily through sample.py: the text equals the
    rwkv package's own greedy continuation, decoded by its own tokenizer."""
    path = str(tmp_path / "world.pth")
    write_rwkv7(path, vocab=65536, C=32, H=1, n_layer=1, ranks=(32, 32, 32, 32))
    reference, rwkv_tokenizer = rwkv_package()
    ref = reference.RWKV(model=path[:-len(".pth")], strategy="cpu fp32")
    tok = rwkv_tokenizer.TRIE_TOKENIZER(load_train().rwkv_world_vocab())
    ids = tok.encode("Hello world")
    out, state = ref.forward(ids, None)
    for _ in range(6):
        ids.append(int(out.argmax()))
        out, state = ref.forward(ids[-1:], state)
    p = run("sample.py", "--init_from", path, "--start", "Hello world", "--temperature", "0",
            "--max_new_tokens", "6", "--num_samples", "1")
    want = tok.decodeBytes(ids).decode("utf-8", errors="replace")  # random tokens: not always whole chars
    assert p.stdout.split("\n---------------\n")[0] == printed(want)


def assert_usage_error(p, *words):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_init_from_bad_input_is_one_line(llama_folder, saved, tmp_path):
    folder = str(llama_folder[0])
    assert_usage_error(run("sample.py", "--init_from", "HuggingFaceTB/SmolLM2-135M", check=False),
                       "cannot fetch", "Hugging Face hub", "--init_from path/to/folder")
    assert_usage_error(run("train.py", "--init_from", folder, "--dataset", "shakespeare_char", check=False),
                       "character-level", "--dataset shakespeare")
    assert_usage_error(run("train.py", "--init_from", folder, "--n_layer", "3", check=False),
                       "--n_layer comes from the checkpoint")
    assert_usage_error(run("train.py", "--init_from", folder, "--model", "mamba", check=False),
                       "checkpoint for gpt.py")
    rwkv6 = torch.load(saved / "rwkv7.pth", weights_only=True)
    rwkv6.pop("blocks.0.att.k_a")
    torch.save(rwkv6, tmp_path / "rwkv6.pth")
    assert_usage_error(run("sample.py", "--init_from", str(tmp_path / "rwkv6.pth"), check=False),
                       "not an RWKV-7")
    (tmp_path / "chars").mkdir()
    pickle.dump({"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "c"}, "stoi": {"a": 0, "b": 1, "c": 2}},
                open(tmp_path / "chars" / "meta.pkl", "wb"))
    for split in ("train", "val"):
        (tmp_path / "chars" / f"{split}.bin").write_bytes(b"\0\0" * 100)
    p = run("train.py", "--init_from", folder, "--dataset", str(tmp_path / "chars"), check=False)
    assert_usage_error(p, "not encoded with the checkpoint's tokenizer")
