#!/usr/bin/env python3
"""Builds a tiny Stable-Diffusion-layout model folder with random weights, and golden tensors.

No model is downloaded: every component is constructed locally from a small config with fixed seeds,
so the Rust side can be checked against diffusers and transformers without a hub. The folder has the
layout of a real SD1.5/SD2.1 checkpoint folder:

    <out>/model_index.json
    <out>/unet/{config.json, diffusion_pytorch_model.safetensors}        UNet2DConditionModel (cross-attention)
    <out>/vae/{config.json, diffusion_pytorch_model.safetensors}         AutoencoderKL
    <out>/text_encoder/{config.json, model.safetensors}                  CLIPTextModel
    <out>/tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json}
    <out>/scheduler/scheduler_config.json                                DDPMScheduler
    <out>/controlnet/{config.json, diffusion_pytorch_model.safetensors}  ControlNetModel.from_unet(unet)
    <out>/unet-sd21/{config.json, diffusion_pytorch_model.safetensors}   SD2.1-style UNet variant
    <out>/golden/*.safetensors, tokens.json                              inputs and outputs of each forward

Weights are stored as float16 (as many real checkpoints are; the loaders must convert), and the
golden outputs are computed in float32 from exactly those float16 values. The text encoder's weights
are written under the `text_model.` prefix that real SD checkpoints (saved by transformers 4) use.

The tokenizer is a CLIP byte-level BPE whose vocabulary and merges are learned here from a fixed
corpus of a few sentences (deterministic), with CLIP's special tokens.

Modes:
  make-tiny-diffusers.py OUT                       write the folder and the golden tensors (default
                                                   OUT: tests/golden-diffusers)
  make-tiny-diffusers.py --check-controlnet DIR --inputs IN --output OUT
                                                   load DIR (e.g. a ControlNet exported by lisa) with
                                                   diffusers' ControlNetModel.from_pretrained, run it
                                                   on the tensors in IN (sample, timesteps,
                                                   encoder_hidden_states, controlnet_cond,
                                                   conditioning_scale) and write its residuals to OUT
                                                   (down_0 .. down_N, mid). Exit code 3: diffusers
                                                   or torch cannot be imported here.

Run it with the venv prepared by scripts/setup-reference.sh (torch, diffusers, transformers):
  <venv>/bin/python scripts/make-tiny-diffusers.py tests/golden-diffusers
torch's Python extension needs CUDA libraries that the lean install keeps outside site-packages
(<venv>/lisa-reference-cuda); like bench/reference.py, this script puts them on LD_LIBRARY_PATH and
re-executes itself once.
"""
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import torch_libraries  # noqa: E402

torch_libraries.ensure()

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

try:
    import torch  # noqa: E402
    from safetensors.torch import load_file, save_file  # noqa: E402
    import diffusers  # noqa: E402
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel  # noqa: E402
except Exception as e:  # noqa: BLE001 -- any import failure: the Rust test skips on exit code 3
    print(f"make-tiny-diffusers: cannot import torch/diffusers: {e}", file=sys.stderr)
    sys.exit(3)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------
# Configs (tiny, SD1.5-shaped: 4 latent channels, VAE ×2 per level, ControlNet condition ×8 the latent)

UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,  # = number of heads in diffusers' UNet2DConditionModel (SD1.5: 8)
    norm_num_groups=8,
)
# SD2.1's differences: per-block head counts, linear proj_in/proj_out, upcast attention.
UNET_SD21 = dict(UNET, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)
CONTROLNET = dict(conditioning_embedding_out_channels=(8, 8, 16, 16), conditioning_channels=3)
MAX_LENGTH = 16  # tokenizer model_max_length = text encoder max_position_embeddings (SD: 77)
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=32,
)
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
)
CORPUS = [
    "a photo of a cat sitting on a red chair",
    "a photo of a dog running on the grass",
    "an edge map of a house with a red door",
    "a painting of the sea at night, with stars",
    "the cat and the dog are friends",
]
PROMPTS = [
    "a photo of a cat",
    "A  Painting of the SEA, at night!",
    "a red house with a door and a dog sitting on the grass near the sea at night with stars",
    "zebra's café 42",
    "",
]
BATCH = 2

# ----------------------------------------------------------------------------------------------
# Tokenizer: CLIP byte-level BPE learned on CORPUS


def bytes_to_unicode():
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def learn_bpe(corpus, num_merges):
    """A plain BPE learner: words as byte-level symbols with `</w>` on the last one; the most frequent
    pair is merged each round (ties broken by the pair itself, so the result is deterministic)."""
    import re

    b2u = bytes_to_unicode()
    words = {}
    for line in corpus:
        for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", line.lower()):
            sym = [b2u[b] for b in w.encode("utf-8")]
            sym[-1] += "</w>"
            words[tuple(sym)] = words.get(tuple(sym), 0) + 1
    merges = []
    for _ in range(num_merges):
        pairs = {}
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] = c
        words = new
    return merges


def write_tokenizer(dir):
    """CLIP's vocabulary layout: 256 byte symbols, the same with `</w>`, one token per merge, then
    `<|startoftext|>` and `<|endoftext|>` (as openai/clip-vit-large-patch14, in miniature)."""
    os.makedirs(dir, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = learn_bpe(CORPUS, 60)
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ids = {t: i for i, t in enumerate(vocab)}
    assert len(ids) == len(vocab), "duplicate vocabulary entries"
    with open(os.path.join(dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(ids, f, ensure_ascii=False)
    with open(os.path.join(dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    with open(os.path.join(dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(dir, "tokenizer_config.json"), "w") as f:
        json.dump(dict(special, tokenizer_class="CLIPTokenizer", model_max_length=MAX_LENGTH, do_lower_case=True), f, indent=2)
    return ids


# ----------------------------------------------------------------------------------------------
# Helpers


def perturb_(model, seed, zero_scale=0.05):
    """Makes the random init non-degenerate and exactly representable in float16: norm weights and
    biases away from 1/0, zero-initialised convs (ControlNet's) small and non-zero, then every
    parameter rounded to float16."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif bool((p == 0).all()):
                p.copy_(zero_scale * torch.randn(p.shape, generator=g))
            p.copy_(p.half().float())


def save_f16(model, dir):
    """`save_pretrained` with float16 weights (the float32 model stays as it is)."""
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    model.save_config(dir)
    save_file(state, os.path.join(dir, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def save_tensors(tensors, path):
    """`save_file` of contiguous float32/int64 copies (views such as a chunk of `moments` are not allowed)."""
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path)


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Build


def make(out):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    import transformers

    # Replace what this script writes; keep anything else (the folder's README.md).
    for name in ("unet", "unet-sd21", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler", "golden"):
        if os.path.isdir(os.path.join(out, name)):
            shutil.rmtree(os.path.join(out, name))
    if os.path.exists(os.path.join(out, "model_index.json")):
        os.remove(os.path.join(out, "model_index.json"))
    gold = os.path.join(out, "golden")
    os.makedirs(gold)

    # Tokenizer: ids by transformers' CLIPTokenizer from the files we wrote, padded as SD pipelines pad.
    ids = write_tokenizer(os.path.join(out, "tokenizer"))
    tok = CLIPTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    enc = tok(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    tokens = {"prompts": PROMPTS, "max_length": MAX_LENGTH, "input_ids": enc["input_ids"]}
    unpadded = tok(PROMPTS)["input_ids"]
    tokens["input_ids_unpadded"] = unpadded
    with open(os.path.join(gold, "tokens.json"), "w", encoding="utf-8") as f:
        json.dump(tokens, f, ensure_ascii=False)

    # Text encoder.
    torch.manual_seed(1)
    tcfg = CLIPTextConfig(
        vocab_size=len(ids),
        bos_token_id=ids["<|startoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        **TEXT,
    )
    text = CLIPTextModel(tcfg).eval()
    perturb_(text, 11)
    tdir = os.path.join(out, "text_encoder")
    text.save_pretrained(tdir)
    # Real SD checkpoints (transformers 4) prefix every key with `text_model.`; write that layout.
    state = {("text_model." + k if not k.startswith("text_model.") else k): v.detach().half().contiguous()
             for k, v in text.state_dict().items()}
    for f in os.listdir(tdir):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(tdir, f))
    save_file(state, os.path.join(tdir, "model.safetensors"), metadata={"format": "pt"})
    input_ids = torch.tensor(enc["input_ids"][:BATCH])
    with torch.no_grad():
        to = text(input_ids=input_ids)
    ehs = to.last_hidden_state
    save_tensors({"input_ids": input_ids, "last_hidden_state": ehs, "pooler_output": to.pooler_output},
              os.path.join(gold, "text_encoder.safetensors"))

    # VAE.
    torch.manual_seed(2)
    vae = AutoencoderKL(**VAE).eval()
    perturb_(vae, 12)
    save_f16(vae, os.path.join(out, "vae"))
    image = torch.tanh(randn((BATCH, 3, 16, 16), 100))
    with torch.no_grad():
        moments = vae.quant_conv(vae.encoder(image))
        dist = vae.encode(image).latent_dist
        latents = randn((BATCH, 4, 8, 8), 101)
        decoded = vae.decode(latents).sample
    save_tensors(
        {"image": image, "moments": moments, "mean": dist.mean, "logvar": dist.logvar, "latents": latents, "decoded": decoded},
        os.path.join(gold, "vae.safetensors"),
    )

    # UNet (SD1.5-shaped) and its ControlNet.
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**UNET).eval()
    perturb_(unet, 13)
    save_f16(unet, os.path.join(out, "unet"))
    torch.manual_seed(4)
    controlnet = ControlNetModel.from_unet(unet, **CONTROLNET).eval()
    # A trained ControlNet differs from its UNet: move every weight a little, zero convs included.
    with torch.no_grad():
        g = torch.Generator().manual_seed(14)
        for p in controlnet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    perturb_(controlnet, 15)
    save_f16(controlnet, os.path.join(out, "controlnet"))

    sample = randn((BATCH, 4, 8, 8), 102)
    timesteps = torch.tensor([10, 731])
    cond = torch.rand((BATCH, 3, 64, 64), generator=torch.Generator().manual_seed(103))
    scale = 0.7
    with torch.no_grad():
        out_plain = unet(sample, timesteps, encoder_hidden_states=ehs).sample
        down, mid = controlnet(sample, timesteps, encoder_hidden_states=ehs, controlnet_cond=cond,
                               conditioning_scale=scale, return_dict=False)
        out_ctrl = unet(sample, timesteps, encoder_hidden_states=ehs, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
    t = {"sample": sample, "timesteps": timesteps, "encoder_hidden_states": ehs.contiguous(), "out": out_plain,
         "controlnet_cond": cond, "conditioning_scale": torch.tensor(scale), "out_controlled": out_ctrl,
         "mid": mid}
    for i, d in enumerate(down):
        t[f"down_{i}"] = d.contiguous()
    save_tensors(t, os.path.join(gold, "unet.safetensors"))

    # SD2.1-style UNet variant on the same inputs.
    torch.manual_seed(5)
    unet21 = UNet2DConditionModel(**UNET_SD21).eval()
    perturb_(unet21, 16)
    save_f16(unet21, os.path.join(out, "unet-sd21"))
    with torch.no_grad():
        out21 = unet21(sample, timesteps, encoder_hidden_states=ehs).sample
    save_tensors({"out": out21}, os.path.join(gold, "unet-sd21.safetensors"))

    # Scheduler and model index.
    sched = DDPMScheduler(**SCHEDULER)
    sched.save_config(os.path.join(out, "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(gold, "provenance.json"), "w") as f:
        json.dump({"torch": torch.__version__, "diffusers": diffusers.__version__,
                   "transformers": transformers.__version__, "script": "scripts/make-tiny-diffusers.py"}, f, indent=2)

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"make-tiny-diffusers: wrote {out} ({total / 1e6:.2f} MB)")


def check_controlnet(dir, inputs, out):
    """Runs diffusers' ControlNetModel loaded from `dir` on the tensors in `inputs`."""
    torch.set_num_threads(1)
    model = ControlNetModel.from_pretrained(dir, torch_dtype=torch.float32).eval()
    x = load_file(inputs)
    with torch.no_grad():
        down, mid = model(x["sample"], x["timesteps"], encoder_hidden_states=x["encoder_hidden_states"],
                          controlnet_cond=x["controlnet_cond"], conditioning_scale=float(x["conditioning_scale"]),
                          return_dict=False)
    t = {"mid": mid.contiguous()}
    for i, d in enumerate(down):
        t[f"down_{i}"] = d.contiguous()
    save_tensors(t, out)
    print(f"make-tiny-diffusers: diffusers ControlNetModel ran {dir}; wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=os.path.join(REPO, "tests", "golden-diffusers"))
    ap.add_argument("--check-controlnet", metavar="DIR", help="run diffusers' ControlNetModel from DIR instead")
    ap.add_argument("--inputs", help="with --check-controlnet: the input tensors (safetensors)")
    ap.add_argument("--output", help="with --check-controlnet: where to write the residuals (safetensors)")
    args = ap.parse_args()
    if args.check_controlnet:
        if not args.inputs or not args.output:
            ap.error("--check-controlnet needs --inputs and --output")
        check_controlnet(args.check_controlnet, args.inputs, args.output)
    else:
        make(args.out)


if __name__ == "__main__":
    main()
