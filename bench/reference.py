#!/usr/bin/env python3
"""The authors' LISA training step in PyTorch + diffusers, at exactly our model configuration.

This is the REFERENCE our Rust step is checked against (tests/parity.rs, through the golden tensors
this script writes) and timed against (--bench). It follows the authors' training script (a
modified diffusers `train_controlnet.py`, spec §3-§5):

    x_t       = DDPMScheduler.add_noise(x0, noise, t)              (diffusers' float32 schedule)
    ehs       = table[y].view(B, tokens, dim)                      (our label encoder, frozen)
    residuals = ControlNetModel(x_t, t, ehs, c)                    (trainable; hook = input of a zero conv)
    pred_full = UNet2DConditionModel(x_t, t, ehs, residuals)       (frozen)
    pred_main = UNet2DConditionModel(x_t, t, ehs)  under no_grad   (a FULL second forward, as the authors)
    r         = target - pred_main
    L         = mse(pred_full, target) + lambda * mse(D(h_hook, t), r)
    one AdamW over side network + decoder, clip_grad_norm_(..., 1.0)

Models:
- UNet2DConditionModel is built from the fields of our config.json (same names, same meaning:
  `attention_head_dim` is the number of heads in both).
- ControlNetModel.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=ours).
  ONE DELIBERATE DEVIATION from diffusers: diffusers' ControlNetConditioningEmbedding makes every
  stage transition (`blocks.{2j+1}`) a stride-2 convolution (SD: 512-px condition -> 64-px latent).
  Our model works in pixel space with the condition at the sample's resolution, so ours uses
  stride 2 only for the first log2(conditioning_downscale) transitions (none for downscale 1, our
  default). The reference reproduces that by setting `.stride = (1, 1)` on the other
  `controlnet_cond_embedding.blocks.{2j+1}` convolutions after construction; weights, names and
  everything else are diffusers'.
- LightweightDecoder: the authors' decoder (spec §4) exactly as our src/models/decoder.rs builds it;
  parameter names `lisa_decoder.{time_linear, blocks.i.conv, conv_refine, conv_out}`.
- Weights are exchanged as safetensors under OUR names (= diffusers' state_dict keys, plus
  `label_encoder.embedding.weight` and `lisa_decoder.*`), so both sides compute the same function.

Modes:
  --dump-golden DIR   tiny config, fp32, fixed seeds: writes DIR/config.json, main.safetensors,
                      side.safetensors, decoder.safetensors and step_epsilon.safetensors (inputs,
                      intermediate outputs, losses, named gradients, grad norm, parameters after
                      one AdamW step). Read by tests/parity.rs.
  --bench             times the baseline step and the authors' LISA step at our default config
                      (assets/main-network/config.json), batch 32; prints JSON (with the process's peak RSS).
  --real-size-variant NAME
                      one ControlNet step at a published UNet config's size (see real_size_variant()), as
                      `lisa bench --real-size` runs each variant of ours beside it.
  --bench --serve     the same arms, driven one step at a time over stdin/stdout (see serve()): how
                      `lisa bench` interleaves these steps with its own.

Run it with the venv that scripts/setup-reference.sh prepared, e.g.
  .venv/bin/python bench/reference.py --dump-golden tests/golden
torch's Python extension needs CUDA libraries that our lean install keeps outside site-packages
(<venv>/lisa-reference-cuda); this script puts them on LD_LIBRARY_PATH and re-executes itself once.
"""
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_libraries  # noqa: E402

torch_libraries.ensure()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import diffusers  # noqa: E402
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The fields of our UNetConfig (src/models/unet.rs), passed to diffusers under the same names.
UNET_FIELDS = [
    "sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
    "down_block_types", "up_block_types", "mid_block_type", "cross_attention_dim", "attention_head_dim",
    "transformer_layers_per_block", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift",
    "use_linear_projection",
]

DECODER_PREFIX = "lisa_decoder."
TIME_PROJ_DIM = 256  # the decoder's sinusoidal projection width (authors: 256)


# ----------------------------------------------------------------------------------------------
# Models


def build_unet(unet_cfg):
    kw = {k: unet_cfg[k] for k in UNET_FIELDS}
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        kw[k] = tuple(kw[k])
    return UNet2DConditionModel(**kw, act_fn="silu")


class LabelEncoder(nn.Module):
    """Our label encoder: `embedding.weight` [num_classes + 1, tokens * dim]; row y -> `tokens` tokens."""

    def __init__(self, num_classes, num_tokens, dim):
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, num_tokens * dim)  # N(0, 1) init, as ours
        self.num_tokens, self.dim = num_tokens, dim

    def forward(self, y):
        return self.embedding(y).view(y.shape[0], self.num_tokens, self.dim)


def build_controlnet(unet, cn_cfg):
    ch = tuple(cn_cfg["conditioning_embedding_out_channels"])
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=ch, conditioning_channels=cn_cfg["conditioning_channels"]
    )
    # Our conditioning_downscale (see the module docstring): stride 2 only for the first
    # log2(downscale) stage transitions, stride 1 for the others (all of them for downscale 1).
    d = cn_cfg.get("conditioning_downscale", 1)
    n_stride2 = int(round(math.log2(d)))
    for j in range(len(ch) - 1):
        if j >= n_stride2:
            controlnet.controlnet_cond_embedding.blocks[2 * j + 1].stride = (1, 1)
    return controlnet


def sinusoidal(t, dim=TIME_PROJ_DIM, max_period=10000.0):
    """The decoder's timestep projection: [cos, sin] of t * 10000^(-i/half), i < half = dim/2."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DecoderBlock(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv


class LightweightDecoder(nn.Module):
    """The authors' LISA decoder D(h, t) (spec §4), as src/models/decoder.rs builds it:
    e = SiLU(time_linear(sinusoidal(t, 256))) added to h per channel; k = log2(out_res / feature_res)
    blocks of conv (1x1 for the first block if C >= 512, else 3x3) C -> max(C/2, floor), SiLU, nearest x2;
    for k = 0 one 3x3 conv_refine (C -> C when C <= floor, else max(C/2, floor)) and SiLU; a zero 3x3 conv_out."""

    def __init__(self, in_channels, feature_res, out_res, out_channels, channel_floor=64):
        super().__init__()
        ratio = out_res // feature_res
        assert ratio * feature_res == out_res and ratio & (ratio - 1) == 0, "out_res / feature_res must be 2^k"
        k = ratio.bit_length() - 1
        self.time_linear = nn.Linear(TIME_PROJ_DIM, in_channels)
        c = in_channels
        blocks = []
        for i in range(k):
            cout = max(c // 2, channel_floor)
            if i == 0 and c >= 512:
                conv = nn.Conv2d(c, cout, 1)
            else:
                conv = nn.Conv2d(c, cout, 3, padding=1)
            blocks.append(DecoderBlock(conv))
            c = cout
        self.blocks = nn.ModuleList(blocks)
        if k == 0:
            cout = c if c <= channel_floor else max(c // 2, channel_floor)
            self.conv_refine = nn.Conv2d(c, cout, 3, padding=1)
            c = cout
        else:
            self.conv_refine = None
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, h, t):
        e = F.silu(self.time_linear(sinusoidal(t).to(h.dtype)))
        x = h + e[:, :, None, None]
        for blk in self.blocks:
            x = F.interpolate(F.silu(blk.conv(x)), scale_factor=2, mode="nearest")
        if self.conv_refine is not None:
            x = F.silu(self.conv_refine(x))
        return self.conv_out(x)


def hook_shape(unet_cfg, hook, res):
    """(channels, resolution) of the hooked feature: `mid` or `down_i` (the input of that zero conv)."""
    ch = unet_cfg["block_out_channels"]
    n, lpb = len(ch), unet_cfg["layers_per_block"]
    shapes = [(ch[0], res)]
    r = res
    for i, c in enumerate(ch):
        shapes += [(c, r)] * lpb
        if i + 1 < n:
            r = (r - 1) // 2 + 1
            shapes.append((c, r))
    if hook == "mid":
        return ch[-1], shapes[-1][1]
    return shapes[int(hook.split("_")[1])]


class Hook:
    """Captures the INPUT of one zero conv of the ControlNet (not detached), as the authors hook it."""

    def __init__(self, controlnet, hook):
        module = controlnet.controlnet_mid_block if hook == "mid" else controlnet.controlnet_down_blocks[int(hook.split("_")[1])]
        self.value = None
        module.register_forward_hook(self._grab)

    def _grab(self, module, inputs, output):
        self.value = inputs[0]


class Setup:
    """Main network (UNet + label encoder, frozen), side network, decoder, scheduler."""

    def __init__(self, cfg, lisa=True):
        main, cn, lc = cfg["main"], cfg["controlnet"], cfg["lisa"]
        u, le, obj = main["unet"], main["label_encoder"], main["objective"]
        assert obj["kind"] == "ddpm" and obj["prediction"] == "epsilon", "the reference implements epsilon-prediction only"
        self.unet = build_unet(u)
        self.labels = LabelEncoder(le["num_classes"], le["num_tokens"], u["cross_attention_dim"])
        self.controlnet = build_controlnet(self.unet, cn)
        self.lam = lc["lambda"]
        self.lisa = lisa
        if lisa:
            c, r = hook_shape(u, lc["hook"], u["sample_size"])
            self.decoder = LightweightDecoder(c, r, u["sample_size"], u["out_channels"], lc["decoder_channel_floor"])
            self.hook = Hook(self.controlnet, lc["hook"])
        else:
            self.decoder, self.hook = None, None
        self.scheduler = DDPMScheduler(
            num_train_timesteps=obj["num_train_timesteps"], beta_start=obj["beta_start"], beta_end=obj["beta_end"],
            beta_schedule=obj["beta_schedule"], prediction_type="epsilon",
        )
        self.unet.requires_grad_(False)
        self.labels.requires_grad_(False)
        self.unet.eval()
        self.controlnet.train()

    def main_state(self):
        sd = dict(self.unet.state_dict())
        sd["label_encoder.embedding.weight"] = self.labels.embedding.weight
        return sd

    def side_state(self):
        return dict(self.controlnet.state_dict())

    def decoder_state(self):
        return {DECODER_PREFIX + k: v for k, v in self.decoder.state_dict().items()}

    def trainable(self):
        """(name, parameter) of side network + decoder, named as our checkpoints name them."""
        out = list(self.controlnet.named_parameters())
        if self.decoder is not None:
            out += [(DECODER_PREFIX + k, p) for k, p in self.decoder.named_parameters()]
        return out

    def load(self, main_sd, side_sd=None, decoder_sd=None):
        with torch.no_grad():
            labels = {"embedding.weight": main_sd["label_encoder.embedding.weight"]}
            self.labels.load_state_dict(labels, strict=True)
            self.unet.load_state_dict({k: v for k, v in main_sd.items() if not k.startswith("label_encoder.")}, strict=True)
            if side_sd is not None:
                self.controlnet.load_state_dict(side_sd, strict=True)
            if decoder_sd is not None and self.decoder is not None:
                self.decoder.load_state_dict({k[len(DECODER_PREFIX):]: v for k, v in decoder_sd.items()}, strict=True)

    def step_forward(self, x0, noise, t, y, cond):
        """The authors' forward: returns a dict of every intermediate and the losses."""
        x_t = self.scheduler.add_noise(x0, noise, t)
        return self.step_forward_on(x_t, t, noise, y, cond)

    def step_forward_on(self, x_t, t, target, y, cond):
        """The forward from a noised input `x_t`, the network timesteps `t` and the training `target` (any
        objective: the networks and LISA's residual do not depend on how x_t and the target were formed)."""
        with torch.no_grad():
            ehs = self.labels(y)
        down, mid = self.controlnet(x_t, t, encoder_hidden_states=ehs, controlnet_cond=cond, return_dict=False)
        pred_full = self.unet(
            x_t, t, encoder_hidden_states=ehs, down_block_additional_residuals=down, mid_block_additional_residual=mid,
        ).sample
        l_main = F.mse_loss(pred_full.float(), target.float(), reduction="mean")
        out = {"x_t": x_t, "target": target, "pred_full": pred_full, "mid_residual": mid, "l_main": l_main}
        if not self.lisa:
            out["loss"] = l_main
            return out
        with torch.no_grad():
            pred_main = self.unet(x_t, t, encoder_hidden_states=ehs).sample  # a full second forward
        r = target - pred_main
        hooked = self.hook.value
        decoded = self.decoder(hooked, t)
        l_lisa = F.mse_loss(decoded.float(), r.float(), reduction="mean")
        out.update(pred_main=pred_main, r=r, hooked=hooked, decoded=decoded, l_lisa=l_lisa, loss=l_main + self.lam * l_lisa)
        return out


def make_optimizer(setup, opt_cfg):
    params = [p for _, p in setup.trainable()]
    return params, torch.optim.AdamW(
        params, lr=opt_cfg["lr"], betas=(opt_cfg["beta1"], opt_cfg["beta2"]), eps=opt_cfg["eps"],
        weight_decay=opt_cfg["weight_decay"],
    )


# ----------------------------------------------------------------------------------------------
# Golden tensors


TINY = {
    "main": {
        "unet": {
            "sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16, 16],
            "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "cross_attention_dim": 8, "attention_head_dim": 2,
            "transformer_layers_per_block": 1, "norm_num_groups": 4, "norm_eps": 1e-5, "flip_sin_to_cos": True,
            "freq_shift": 0.0, "use_linear_projection": False,
        },
        "label_encoder": {"num_classes": 10, "num_tokens": 2},
        "objective": {"kind": "ddpm", "prediction": "epsilon", "beta_schedule": "linear", "num_train_timesteps": 1000,
                      "beta_start": 0.0001, "beta_end": 0.02},
    },
    "controlnet": {"conditioning_channels": 1, "conditioning_embedding_out_channels": [4, 8], "conditioning_downscale": 1},
    "lisa": {"enabled": True, "lambda": 0.2, "hook": "mid", "decoder_channel_floor": 8, "reference_pass": "full"},
    # max_grad_norm: the authors clip at 1.0, but this state's gradient norm is about 0.3, where a clip at 1.0
    # is a no-op; 0.1 makes the clipping act (coefficient about 0.35) so that it is checked too.
    "optimizer": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2, "max_grad_norm": 0.1},
    "batch": 4,
    "timesteps": [0, 317, 642, 999],
    "labels": [0, 3, 7, 10],  # 10 = the null label
    "seed": 20260628,
}

# Optimizer steps of the golden trajectory (trajectory_epsilon.safetensors), the single step included.
TRAJECTORY_STEPS = 6

# Parameters whose gradient and post-step value are dumped.
NAMED = [
    "conv_in.weight",
    "time_embedding.linear_1.weight",
    "controlnet_cond_embedding.conv_in.weight",
    "controlnet_cond_embedding.conv_out.weight",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "down_blocks.2.attentions.0.proj_in.weight",
    "mid_block.resnets.0.conv1.weight",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.bias",
    "controlnet_down_blocks.0.weight",
    "controlnet_mid_block.weight",
    "controlnet_mid_block.bias",
    "lisa_decoder.time_linear.bias",
    "lisa_decoder.blocks.0.conv.weight",
    "lisa_decoder.conv_out.weight",
    "lisa_decoder.conv_out.bias",
]


def perturb_(gen, setup):
    """Makes the initial state non-degenerate so that every part of the step is exercised:
    - main network: GroupNorm/LayerNorm weights 1 + 0.1 N(0,1), biases 0.1 N(0,1) (a fresh model has 1/0);
    - side network: every tensor copied from the UNet moved by 0.02 N(0,1) times its std, so that the side
      and main encoders differ (as after some training); the zero convs and the conditioning embedding's
      conv_out get U(-0.1, 0.1) weights and biases instead of zeros;
    - decoder: conv_out weight and bias U(-0.1, 0.1) instead of zeros."""
    def randn_like(p):
        return torch.randn(p.shape, generator=gen, dtype=p.dtype)

    def uniform_like(p, a):
        return (torch.rand(p.shape, generator=gen, dtype=p.dtype) * 2 - 1) * a

    with torch.no_grad():
        for name, m in setup.unet.named_modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.copy_(1 + 0.1 * randn_like(m.weight))
                m.bias.copy_(0.1 * randn_like(m.bias))
        # from_unet ran before the perturbation of the norms: copy the encoder again so the side network
        # starts as an exact copy of this main network, then move it.
        setup.controlnet.load_state_dict(
            {k: v for k, v in setup.unet.state_dict().items() if k.split(".")[0] in ("conv_in", "time_embedding", "down_blocks", "mid_block")},
            strict=False,
        )
        for name, p in setup.controlnet.named_parameters():
            if name.split(".")[0] in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
                p.add_(0.02 * float(p.std()) * randn_like(p) if p.numel() > 1 else 0.0)
            elif name.startswith(("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")):
                p.copy_(uniform_like(p, 0.1))
        setup.decoder.conv_out.weight.copy_(uniform_like(setup.decoder.conv_out.weight, 0.1))
        setup.decoder.conv_out.bias.copy_(uniform_like(setup.decoder.conv_out.bias, 0.1))
        # Round every initial weight to a float16 value: the golden files store them as float16 (half the
        # size) and both sides compute in float32 from exactly these values.
        for module in (setup.unet, setup.labels, setup.controlnet, setup.decoder):
            for p in module.parameters():
                p.copy_(p.half().float())


# Our flow objective's network timesteps: s in [0, 1] times this (SD3's convention).
FLOW_TIME_SCALE = 1000.0


def objective_inputs_v(setup, x0, noise, t):
    """v-prediction at the golden timesteps: diffusers' x_t and velocity (float32 ᾱ)."""
    return setup.scheduler.add_noise(x0, noise, t), t, setup.scheduler.get_velocity(x0, noise, t), {}


def objective_inputs_flow(gen, x0, noise):
    """Rectified flow at times drawn from `gen` (after every other draw): x_t, network timesteps, target, and the
    unit times `s` (stored as `unit_t`)."""
    s = torch.rand((x0.shape[0],), generator=gen)
    sb = s.view(-1, 1, 1, 1)
    return (1 - sb) * x0 + sb * noise, s * FLOW_TIME_SCALE, noise - x0, {"unit_t": s}


def dump_golden(out_dir, threads):
    torch.set_num_threads(threads)
    cfg = TINY
    torch.manual_seed(cfg["seed"])  # parameter initialisation (PyTorch defaults)
    setup = Setup(cfg)
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)  # perturbations and inputs
    perturb_(gen, setup)

    u = cfg["main"]["unet"]
    b, res = cfg["batch"], u["sample_size"]
    x0 = torch.rand((b, u["in_channels"], res, res), generator=gen) * 2 - 1
    noise = torch.randn((b, u["in_channels"], res, res), generator=gen)
    cond = torch.rand((b, cfg["controlnet"]["conditioning_channels"], res, res), generator=gen)
    t = torch.tensor(cfg["timesteps"], dtype=torch.int64)
    y = torch.tensor(cfg["labels"], dtype=torch.int64)

    os.makedirs(out_dir, exist_ok=True)
    # float16 storage is exact: perturb_() rounded every weight to a float16 value.
    clone = lambda sd: {k: v.detach().half().contiguous() for k, v in sd.items()}  # noqa: E731
    save_file(clone(setup.main_state()), os.path.join(out_dir, "main.safetensors"))
    save_file(clone(setup.side_state()), os.path.join(out_dir, "side.safetensors"))
    save_file(clone(setup.decoder_state()), os.path.join(out_dir, "decoder.safetensors"))

    initial = {k: {n: v.detach().clone() for n, v in sd.items()}
               for k, sd in (("main", setup.main_state()), ("side", setup.side_state()), ("decoder", setup.decoder_state()))}
    params, opt = make_optimizer(setup, cfg["optimizer"])
    out = setup.step_forward(x0, noise, t, y, cond)
    out["loss"].backward()
    named = dict(setup.trainable())
    missing = [n for n in NAMED if n not in named]
    assert not missing, f"unknown parameter names {missing}"
    grads = {f"grad.{n}": named[n].grad.detach().clone() for n in NAMED}
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["optimizer"]["max_grad_norm"])
    clipped = {f"clipped_grad.{n}": named[n].grad.detach().clone() for n in NAMED}
    opt.step()
    after = {f"after_step.{n}": named[n].detach().clone() for n in NAMED}

    step = {
        "x0": x0, "noise": noise, "timesteps": t, "labels": y, "condition": cond,
        "x_t": out["x_t"], "target": out["target"], "pred_main": out["pred_main"], "pred_full": out["pred_full"],
        "mid_residual": out["mid_residual"], "hooked": out["hooked"], "r": out["r"], "decoded": out["decoded"],
        "l_main": out["l_main"], "l_lisa": out["l_lisa"], "loss": out["loss"], "grad_norm": grad_norm,
    }
    step.update(grads)
    step.update(clipped)
    step.update(after)
    save_file({k: v.detach().clone().contiguous() for k, v in step.items()}, os.path.join(out_dir, "step_epsilon.safetensors"))

    # A short trajectory on from that step, as training runs it: TRAJECTORY_STEPS - 1 more steps, each on inputs
    # of its own (drawn after everything above, so the single step's tensors are unchanged), with AdamW's moments
    # and bias correction carried across steps. Per step its inputs, losses and gradient norm; at the end the
    # named parameters.
    traj = {}
    classes = cfg["main"]["label_encoder"]["num_classes"]
    steps_total = cfg["main"]["objective"]["num_train_timesteps"]
    for k in range(1, TRAJECTORY_STEPS):
        xk = torch.rand((b, u["in_channels"], res, res), generator=gen) * 2 - 1
        nk = torch.randn((b, u["in_channels"], res, res), generator=gen)
        ck = torch.rand((b, cfg["controlnet"]["conditioning_channels"], res, res), generator=gen)
        tk = torch.randint(0, steps_total, (b,), generator=gen, dtype=torch.int64)
        yk = torch.randint(0, classes + 1, (b,), generator=gen, dtype=torch.int64)  # classes = the null label
        opt.zero_grad()
        outk = setup.step_forward(xk, nk, tk, yk, ck)
        outk["loss"].backward()
        gk = torch.nn.utils.clip_grad_norm_(params, cfg["optimizer"]["max_grad_norm"])
        opt.step()
        traj.update({
            f"{k}.x0": xk, f"{k}.noise": nk, f"{k}.condition": ck, f"{k}.timesteps": tk, f"{k}.labels": yk,
            f"{k}.x_t": outk["x_t"], f"{k}.l_main": outk["l_main"], f"{k}.l_lisa": outk["l_lisa"],
            f"{k}.loss": outk["loss"], f"{k}.grad_norm": gk,
        })
    traj.update({f"final.{n}": named[n].detach().clone() for n in NAMED})
    save_file({k: v.detach().clone().contiguous() for k, v in traj.items()},
              os.path.join(out_dir, "trajectory_epsilon.safetensors"))

    # The same initial state under the other objectives (one forward and backward each, no optimizer step):
    # v-prediction (x_t as above, target = α·ε − σ·x0 from the scheduler's float32 ᾱ) and rectified flow (x_t =
    # (1 − s)·x0 + s·ε for s in [0, 1], target ε − x0, network timesteps s · FLOW_TIME_SCALE).
    for name, make in (("v_prediction", lambda: objective_inputs_v(setup, x0, noise, t)),
                       ("flow", lambda: objective_inputs_flow(gen, x0, noise))):
        setup.load(initial["main"], initial["side"], initial["decoder"])
        for p in params:
            p.grad = None
        x_t_o, t_o, target_o, extra = make()
        out_o = setup.step_forward_on(x_t_o, t_o, target_o, y, cond)
        out_o["loss"].backward()
        tensors = {
            "x0": x0, "noise": noise, "labels": y, "condition": cond, "x_t": out_o["x_t"], "timesteps": t_o,
            "target": out_o["target"], "pred_main": out_o["pred_main"], "pred_full": out_o["pred_full"],
            "r": out_o["r"], "decoded": out_o["decoded"], "l_main": out_o["l_main"], "l_lisa": out_o["l_lisa"],
            "loss": out_o["loss"],
        }
        tensors.update(extra)
        tensors.update({f"grad.{n}": named[n].grad.detach().clone() for n in NAMED})
        save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()},
                  os.path.join(out_dir, f"step_{name}.safetensors"))

    meta = {k: v for k, v in cfg.items() if k in ("main", "controlnet", "lisa", "optimizer", "timesteps", "labels", "seed", "batch")}
    meta["named_parameters"] = NAMED
    meta["trajectory_steps"] = TRAJECTORY_STEPS
    meta["provenance"] = {
        "generator": "bench/reference.py --dump-golden",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": threads, "dtype": "float32",
        "note": "controlnet_cond_embedding.blocks.{2j+1} run with stride 1 (our conditioning_downscale 1); "
                "state perturbed as described in perturb_(); initial weights stored as float16 (exact: they were "
                "rounded to float16 values), everything else float32",
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    n_side = sum(p.numel() for p in setup.controlnet.parameters())
    n_dec = sum(p.numel() for p in setup.decoder.parameters())
    n_main = sum(p.numel() for p in setup.unet.parameters())
    print(json.dumps({
        "golden": out_dir, "params": {"main_unet": n_main, "side": n_side, "decoder": n_dec},
        "l_main": out["l_main"].item(), "l_lisa": out["l_lisa"].item(), "loss": out["loss"].item(),
        "grad_norm": float(grad_norm), "diffusers": diffusers.__version__, "torch": torch.__version__,
    }, indent=2))


# ----------------------------------------------------------------------------------------------
# Timing


def bench_setup(args):
    """The baseline and LISA arms of --bench at our main network's config: {arm: (setup, params, optimizer)},
    and the config they were built from."""
    torch.set_num_threads(args.threads)
    with open(args.config) as f:
        main_cfg = json.load(f)
    cfg = {
        "main": main_cfg,
        "controlnet": {"conditioning_channels": 1, "conditioning_embedding_out_channels": [16, 32], "conditioning_downscale": 1},
        "lisa": {"lambda": 0.2, "hook": args.hook, "decoder_channel_floor": args.decoder_channel_floor},
        "optimizer": {"lr": 1e-5, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2, "max_grad_norm": 1.0},
    }
    weights = os.path.join(os.path.dirname(os.path.abspath(args.config)), "model.safetensors")
    arms = {}
    for arm in ("baseline", "lisa"):
        torch.manual_seed(args.seed)
        setup = Setup(cfg, lisa=(arm == "lisa"))
        if os.path.isfile(weights):
            setup.load(load_file(weights))
            setup.controlnet = build_controlnet(setup.unet, cfg["controlnet"])  # from_unet on the loaded weights
            if setup.lisa:
                setup.hook = Hook(setup.controlnet, cfg["lisa"]["hook"])
            setup.controlnet.train()
        params, opt = make_optimizer(setup, cfg["optimizer"])
        arms[arm] = (setup, params, opt)
    return cfg, arms, os.path.isfile(weights)


def bench_inputs(args, cfg, gen):
    """One batch of random inputs: x0 ~ U(-1, 1), condition ~ U(0, 1), labels uniform over the classes."""
    u = cfg["main"]["unet"]
    res, nc = u["sample_size"], cfg["main"]["label_encoder"]["num_classes"]
    x0 = torch.rand((args.batch, u["in_channels"], res, res), generator=gen) * 2 - 1
    cond = torch.rand((args.batch, 1, res, res), generator=gen)
    y = torch.randint(0, nc, (args.batch,), generator=gen)
    return x0, cond, y


def bench_step(cfg, setup, params, opt, x0, cond, y):
    """One full training step (noise and timesteps, forward, backward, clip, AdamW, zero_grad); its seconds."""
    t0 = time.perf_counter()
    noise = torch.randn_like(x0)
    t = torch.randint(0, setup.scheduler.config.num_train_timesteps, (x0.shape[0],))
    out = setup.step_forward(x0, noise, t, y, cond)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(params, cfg["optimizer"]["max_grad_norm"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def max_rss_kib():
    """Peak resident set size of this process, KiB (getrusage's ru_maxrss, which Linux reports in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bench_header(args, cfg, arms, weights_loaded):
    return {
        "reference": "PyTorch + diffusers, authors' LISA step (full second forward for pred_main)",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": args.threads,
        "batch": args.batch, "config": args.config, "weights_loaded": weights_loaded,
        "hook": args.hook, "decoder_channel_floor": args.decoder_channel_floor,
        "main_unet_params": sum(p.numel() for p in arms["baseline"][0].unet.parameters()),
        "trainable_params": {arm: sum(p.numel() for p in params) for arm, (_, params, _) in arms.items()},
    }


def bench(args):
    cfg, arms, weights_loaded = bench_setup(args)
    times = {arm: [] for arm in arms}
    gen = torch.Generator().manual_seed(args.seed)
    # The arms alternate, repetition by repetition, so that a change in machine load hits both alike.
    for rep in range(args.warmup + args.reps):
        x0, cond, y = bench_inputs(args, cfg, gen)
        for arm, (setup, params, opt) in arms.items():
            dt = bench_step(cfg, setup, params, opt, x0, cond, y)
            if rep >= args.warmup:
                times[arm].append(dt)
    results = {}
    for arm, (setup, params, _) in arms.items():
        ts = times[arm]
        results[arm] = {
            "mean_s": statistics.mean(ts), "median_s": statistics.median(ts),
            "min_s": min(ts), "max_s": max(ts), "times_s": ts,
            "trainable_params": sum(p.numel() for p in params),
        }
    results["lisa_over_baseline_median"] = results["lisa"]["median_s"] / results["baseline"]["median_s"]
    results["lisa_over_baseline_mean"] = results["lisa"]["mean_s"] / results["baseline"]["mean_s"]
    report = bench_header(args, cfg, arms, weights_loaded)
    report.update(warmup=args.warmup, reps=args.reps, **results, maxrss_kib=max_rss_kib())
    print(json.dumps(report, indent=2))


def serve(args):
    """--bench --serve: the arms are built once, then driven step by step over stdin/stdout so that a
    benchmark in another process (`lisa bench`) can interleave its own steps with these. Protocol, one
    JSON object per stdout line:
      after setup         -> {"ready": true, ...bench_header...}
      stdin `step ARM`    -> {"arm": ARM, "seconds": s}   (one training step of ARM = baseline | lisa, fresh inputs)
      stdin `quit` or EOF -> {"done": true, "maxrss_kib": k}
    Anything else on stdin -> {"error": "..."}. Warnings and tracebacks go to stderr only."""
    cfg, arms, weights_loaded = bench_setup(args)
    gen = torch.Generator().manual_seed(args.seed)
    print(json.dumps({"ready": True, **bench_header(args, cfg, arms, weights_loaded)}), flush=True)
    while True:
        line = sys.stdin.readline()
        words = line.split()
        if not line or words == ["quit"]:
            break
        if len(words) == 2 and words[0] == "step" and words[1] in arms:
            setup, params, opt = arms[words[1]]
            x0, cond, y = bench_inputs(args, cfg, gen)
            dt = bench_step(cfg, setup, params, opt, x0, cond, y)
            print(json.dumps({"arm": words[1], "seconds": dt}), flush=True)
        else:
            print(json.dumps({"error": f"unknown command {line.strip()!r}; expected `step baseline`, `step lisa` or `quit`"}), flush=True)
    print(json.dumps({"done": True, "maxrss_kib": max_rss_kib()}), flush=True)


# ----------------------------------------------------------------------------------------------
# Real size


def real_size_variant(args):
    """--real-size-variant NAME: one ControlNet training step at a published UNet config's size, as diffusers'
    train_controlnet.py takes it, timed; prints one JSON line shaped as `lisa bench --real-size-variant` prints.

    NAME is `baseline` or `lisa`, then optionally `-recompute` (controlnet.enable_gradient_checkpointing(), the
    script's --gradient_checkpointing) and `-bf16` (the frozen UNet in bfloat16, the script's weight_dtype, and the
    step under autocast, as accelerate's --mixed_precision bf16 runs it). The UNet is UNet2DConditionModel.from_config
    of --unet-config with random weights, frozen; the ControlNet is ControlNetModel.from_unet of it (SD's
    conditioning embedding, 3-channel condition at 8x the latents). The text encoder's states are stood in for by a
    frozen table of 77 tokens of the cross-attention width, as in ours. LISA is the authors' step: hook at the mid
    block's zero conv, the decoder, and a full second no-grad UNet forward for the reference prediction."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = args.real_size_variant
    parts = name.split("-")
    if parts[0] not in ("baseline", "lisa") or any(p not in ("recompute", "bf16") for p in parts[1:]):
        sys.exit(f"unknown real-size variant {name!r}: baseline or lisa, then -recompute and/or -bf16")
    lisa, recompute, bf16 = parts[0] == "lisa", "recompute" in parts, "bf16" in parts
    weight_dtype = torch.bfloat16 if bf16 else torch.float32
    with open(args.unet_config) as f:
        unet_cfg = json.load(f)
    torch.manual_seed(args.seed)
    log = lambda m: print(f"{name} (diffusers): {m}", file=sys.stderr, flush=True)  # noqa: E731
    log("building the UNet and the ControlNet")
    unet = UNet2DConditionModel.from_config(unet_cfg)
    controlnet = ControlNetModel.from_unet(unet)
    unet.requires_grad_(False)
    unet.eval()
    controlnet.train()
    if recompute:
        controlnet.enable_gradient_checkpointing()
    unet.to(device, dtype=weight_dtype)
    controlnet.to(device)
    dim = unet.config.cross_attention_dim
    table = nn.Embedding(1, 77 * dim).requires_grad_(False).to(device, dtype=weight_dtype)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    params = list(controlnet.parameters())
    trainable = sum(p.numel() for p in params)
    decoder, hook = None, None
    if lisa:
        s = args.latent_size
        c, r = hook_shape(unet_cfg, "mid", s)
        decoder = LightweightDecoder(c, r, s, unet_cfg["out_channels"], args.decoder_channel_floor).to(device)
        hook = Hook(controlnet, "mid")
        params += list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    n, s = args.batch, args.latent_size
    gen = torch.Generator().manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(args.warmup + args.reps):
        latents = (torch.rand((n, unet_cfg["in_channels"], s, s), generator=gen) * 2 - 1).to(device, weight_dtype)
        cond = torch.rand((n, 3, 8 * s, 8 * s), generator=gen).to(device)
        sync()
        t0 = time.perf_counter()
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (n,), device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        ehs = table(torch.zeros(n, dtype=torch.long, device=device)).view(n, 77, dim)
        with autocast:
            down, mid = controlnet(noisy, t, encoder_hidden_states=ehs, controlnet_cond=cond, return_dict=False)
            pred = unet(
                noisy, t, encoder_hidden_states=ehs,
                down_block_additional_residuals=[d.to(dtype=weight_dtype) for d in down],
                mid_block_additional_residual=mid.to(dtype=weight_dtype),
            ).sample
            loss = F.mse_loss(pred.float(), noise.float())
            if lisa:
                with torch.no_grad():
                    pred_main = unet(noisy, t, encoder_hidden_states=ehs).sample
                decoded = decoder(hook.value, t)
                loss = loss + 0.2 * F.mse_loss(decoded.float(), (noise - pred_main).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        log(f"step {step + 1} {dt:.2f} s" + (" (warm-up)" if step < args.warmup else ""))
        if step >= args.warmup:
            times.append(dt)
    stats = {"median_s": statistics.median(times), "mean_s": statistics.mean(times), "min_s": min(times), "max_s": max(times), "times_s": times}
    print(json.dumps({
        "variant": name, "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "controlnet_parameters": trainable, "stats": stats, "peak_rss_kib": max_rss_kib(),
    }), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dump-golden", metavar="DIR", help="write the golden tensors of the tiny config to DIR")
    mode.add_argument("--bench", action="store_true", help="time the baseline and LISA steps; print JSON")
    mode.add_argument("--real-size-variant", metavar="NAME",
                      help="one real-size ControlNet step (see real_size_variant()); print one JSON line")
    ap.add_argument("--serve", action="store_true",
                    help="with --bench: build the arms, then run one step per `step ARM` line of stdin (see serve())")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--config", default=os.path.join(REPO, "assets", "main-network", "config.json"),
                    help="--bench: our main-network config.json (its model.safetensors is loaded when present)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5, help="--bench: timed repetitions per arm")
    ap.add_argument("--warmup", type=int, default=1, help="--bench: untimed repetitions per arm")
    ap.add_argument("--hook", default="mid")
    ap.add_argument("--decoder-channel-floor", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unet-config", help="--real-size-variant: a diffusers UNet config.json")
    ap.add_argument("--latent-size", type=int, default=64, help="--real-size-variant: the latents' side")
    ap.add_argument("--device", default="cpu", help="--real-size-variant: cpu, cuda or cuda:N")
    args = ap.parse_args()
    if args.serve and not args.bench:
        ap.error("--serve needs --bench")
    if args.real_size_variant:
        if not args.unet_config:
            ap.error("--real-size-variant needs --unet-config")
        real_size_variant(args)
    elif args.dump_golden:
        dump_golden(args.dump_golden, args.threads)
    elif args.serve:
        serve(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
