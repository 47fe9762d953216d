"""Latent diffusion: the conditional latent denoising loss and the loop that minimises it. L(Decoder).

Introduced in `03_diffusion_decoders.ipynb`; `denoising_loss` is reused by lesson 5 as the third
term of L(LLM-Decoder). Training takes clean latents z_0 (from the VAE), a random time t, noise
eps, and the noised latents z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps (the forward process);
the UNet sees z_t, t and the text's token states c, and is trained to predict

    L(Decoder) = E || target - UNet(z_t, t, c) ||^2

where the target is z_0 itself ("sample"), the noise eps ("epsilon", DDPM's and SD v1's choice),
or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0 ("v_prediction"). At this tiny size predicting
z_0 learns several times faster (lesson 3 measures it). Classifier-free guidance needs the UNet
to also know the unconditional case, so 10% of captions are replaced by the empty prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       UNet2DConditionModel, UNet3DConditionModel)
from diffusers.models.attention_processor import Attention

from mmlib import config as course_config
from mmlib.data.world import check_choice

PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")
# Samplers a trained model can use (all read the training scheduler's betas and prediction type).
SAMPLERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
            "ddpm": DDPMScheduler}


@dataclass
class DiffusionConfig:
    """A tiny conditional UNet and how it trains (sections ``image_decoder``, ``audio_decoder``, ...)."""

    block_out_channels: tuple = (32, 64)  # two resolutions of the 8x8 latent: 8x8 and 4x4
    attention_head_dim: int = 8  # channels per attention head: 4 heads at 32 channels, 8 at 64
    norm_num_groups: int = 8
    prediction_type: str = "sample"  # predict z_0: fastest to learn at this size (see the module)
    steps: int = 1200  # optimizer steps
    batch_size: int = 64
    lr: float = 1e-3
    condition_dropout: float = 0.1  # share of captions replaced by "" (for classifier-free guidance)
    full_caption_fraction: float = 0.75  # share of captions stating every attribute
    training_scenes: int = 16384  # scenes encoded to latents once; their captions change every step


def build_unet(config: DiffusionConfig, latent_channels: int, sample_size: int, cross_attention_dim: int,
               video: bool = False):
    """A diffusers UNet2DConditionModel (or UNet3DConditionModel for clips) attending to text."""
    blocks = len(config.block_out_channels)
    common = dict(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        layers_per_block=1,
        block_out_channels=tuple(config.block_out_channels),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
    )
    if not video:  # UNet2D's attention_head_dim is, for historical reasons, the number of heads per block
        common["attention_head_dim"] = tuple(channels // config.attention_head_dim for channels in config.block_out_channels)
    if video:  # Zeroscope's UNet3D: the same spatial layers per frame, plus temporal convolutions and attention
        return UNet3DConditionModel(
            down_block_types=("CrossAttnDownBlock3D",) * blocks,
            up_block_types=("CrossAttnUpBlock3D",) * blocks,
            **common,
        )
    return UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D",) * blocks,
        up_block_types=("CrossAttnUpBlock2D",) * blocks,
        **common,
    )


def inflate(image_unet: UNet2DConditionModel, temporal_text: bool = False) -> UNet3DConditionModel:
    """A video UNet whose spatial layers start as a trained image UNet's (ModelScope/Zeroscope's recipe).

    Every weight of `image_unet` is copied into the UNet3D (the 1x1 convolutions that project
    into attention become the equivalent linear layers). The new temporal layers start as the
    identity: temporal convolutions are zero-initialised by diffusers, and the output projections
    of the temporal attentions are zeroed here. So, before training, the video UNet is exactly the
    image UNet applied to every frame; training then only has to learn how frames relate.
    With `temporal_text`, the temporal layers also read the prompt (`attend_to_text`).
    """
    shape = image_unet.config
    heads = shape.attention_head_dim[0] if isinstance(shape.attention_head_dim, (tuple, list)) else shape.attention_head_dim
    config = DiffusionConfig(block_out_channels=tuple(shape.block_out_channels), norm_num_groups=shape.norm_num_groups,
                             attention_head_dim=shape.block_out_channels[0] // heads)
    video = build_unet(config, shape.in_channels, shape.sample_size, shape.cross_attention_dim, video=True)
    target = video.state_dict()
    weights = {name: value.reshape(target[name].shape) for name, value in image_unet.state_dict().items()}
    missing, unexpected = video.load_state_dict(weights, strict=False)
    if unexpected or any("temp" not in name and "transformer_in" not in name for name in missing):
        raise ValueError(f"image UNet does not match the video UNet's spatial layers: unexpected {unexpected[:3]}, "
                         f"missing {[n for n in missing if 'temp' not in n][:3]}")
    for name, module in video.named_modules():
        if type(module).__name__ == "TransformerTemporalModel":
            torch.nn.init.zeros_(module.proj_out.weight)
            torch.nn.init.zeros_(module.proj_out.bias)
    return attend_to_text(video) if temporal_text else video


def attend_to_text(unet: UNet3DConditionModel) -> UNet3DConditionModel:
    """Let the temporal layers of a UNet3D read the prompt, not only the frames (in place).

    In diffusers' UNet3DConditionModel (ModelScope's, Zeroscope's) only the spatial layers
    cross-attend to the text. Each temporal block attends over the frames twice, its second
    attention being a self-attention too, and never sees a word; yet motion is what those layers
    make, and "standing still" against "moving up" is said only in words. Here the second
    attention of every temporal block in the down, mid and up blocks becomes a cross-attention to
    the prompt states, its output zeroed so that the UNet computes what it did before.

    The UNet's blocks call their temporal layers without the prompt, so two forward pre-hooks
    carry it: the UNet's keeps the `encoder_hidden_states` of the call, and each temporal layer's
    hands them on repeated for every spatial position, (B, tokens, dim) -> (B*H*W, tokens, dim),
    since a temporal layer attends over the frames of one position at a time. A saved UNet is
    rebuilt with this function before its weights are loaded (`Decoder.load`).
    """
    prompt = {}

    def keep_prompt(module, args, kwargs):
        prompt["states"] = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]

    def hand_on_prompt(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # (B*frames, C, H, W)
        kwargs["encoder_hidden_states"] = prompt["states"].repeat_interleave(hidden.shape[-2] * hidden.shape[-1], dim=0)
        return args, kwargs

    unet.register_forward_pre_hook(keep_prompt, with_kwargs=True)
    for name, module in unet.named_modules():
        if type(module).__name__ == "TransformerTemporalModel" and "temp_attentions" in name:
            for block in module.transformer_blocks:
                frames = block.attn2  # the second self-attention over frames
                block.attn2 = Attention(query_dim=frames.query_dim, cross_attention_dim=unet.config.cross_attention_dim,
                                        heads=frames.heads, dim_head=frames.inner_dim // frames.heads,
                                        out_bias=True)
                torch.nn.init.zeros_(block.attn2.to_out[0].weight)
                torch.nn.init.zeros_(block.attn2.to_out[0].bias)
            module.register_forward_pre_hook(hand_on_prompt, with_kwargs=True)
    return unet


def noise_scheduler(prediction_type: str = "sample") -> DDPMScheduler:
    """The training scheduler: 1,000 steps of Stable Diffusion's scaled-linear betas."""
    check_choice("prediction type", prediction_type, list(PREDICTION_TYPES))
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type, clip_sample=False)  # latents are not in [-1, 1]


def sampling_scheduler(training, name: str = "ddim"):
    """A fast sampler for a trained model (25 steps instead of 1,000), from its training schedule."""
    check_choice("sampler", name, list(SAMPLERS))
    if name == "ddim":
        return DDIMScheduler.from_config(training.config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return SAMPLERS[name].from_config(training.config)


def prompt_states(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token states (B, max_length, hidden) exactly as Stable Diffusion's pipeline computes them."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(text_encoder.device))[0]


def denoising_loss(unet, scheduler: DDPMScheduler, latents: torch.Tensor, conditioning: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The conditional latent denoising loss: noise clean latents at a random time, predict the target.

    latents: (B, C, H, W) or (B, C, frames, H, W) scaled latents; conditioning: (B, T, D) token
    states (or whatever the UNet cross-attends to). Gradients flow into the UNet and the
    conditioning (lesson 5 trains an output projector through a frozen UNet with it).
    """
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    times = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, times)
    prediction = unet(noisy, times, encoder_hidden_states=conditioning).sample
    kind = scheduler.config.prediction_type
    if kind == "sample":
        target = latents
    elif kind == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, times)
    return F.mse_loss(prediction, target)


def drop_conditions(texts: list[str], fraction: float, generator: torch.Generator) -> list[str]:
    """Blank a random `fraction` of the captions to "": the unconditional branch classifier-free guidance subtracts."""
    drop = torch.rand(len(texts), generator=generator) < fraction
    return ["" if dropped else text for text, dropped in zip(texts, drop.tolist())]


def train_denoiser(unet, scheduler: DDPMScheduler, latents: torch.Tensor, captions: Callable[[torch.Tensor, int], list[str]],
                   encode: Callable[[list[str]], torch.Tensor], config: DiffusionConfig, description: str = "diffusion",
                   latent_std: torch.Tensor | None = None,
                   callback: Callable[[int, object], None] | None = None, parameters=None) -> list[float]:
    """Train `unet` on pre-encoded `latents` (N, ...) with `captions(rows, step)` as conditions.

    Each step draws a batch of rows, captions them anew, blanks ``condition_dropout`` of the
    captions, and takes one step on `denoising_loss`. With `latent_std` (N, ...), latents are
    drawn from the VAE posterior instead of its mean, as Stable Diffusion trains. `callback(step,
    unet)` runs after every step (e.g. to sample snapshots). `parameters` limits what the optimizer
    updates (default: all of the UNet's). Returns the loss of every step.
    """
    course_config.seed_everything()
    generator = torch.Generator().manual_seed(course_config.seed())
    optimizer = torch.optim.AdamW(list(parameters or unet.parameters()), lr=config.lr, weight_decay=0.01)
    schedule = course_config.one_cycle(optimizer, config.steps, 0.05)
    losses = []
    unet.train()
    with course_config.on_training_device(unet) as device:
        for step in course_config.training_steps(config.steps, description):
            rows = torch.randint(len(latents), (config.batch_size,), generator=generator)
            batch = latents[rows]
            if latent_std is not None:
                batch = batch + latent_std[rows] * torch.randn(batch.shape, generator=generator)
            texts = drop_conditions(captions(rows, step), config.condition_dropout, generator)
            loss = denoising_loss(unet, scheduler, batch.to(device), encode(texts).to(device), generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if callback is not None:
                callback(step + 1, unet)
    return losses
