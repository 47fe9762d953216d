"""The autoencoder of latent diffusion: a diffusers AutoencoderKL trained on the world.

Introduced in `03_diffusion_decoders.ipynb`. Stable Diffusion does not denoise pixels: a VAE
squeezes each 512x512 picture into a 64x64x4 latent, diffusion runs there, and the VAE's decoder
turns the result back into pixels. The tiny course does the same at 32x32 -> 8x8x4, for pictures
(and video frames) and for log-mel spectrograms (AudioLDM's recipe for sound).

The VAE is trained like SD's: reconstruction error plus a very small KL term that keeps the
latent space smooth. `scaling_factor` (SD: 0.18215) is set so that latents have unit variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from mmlib import config as course_config
from mmlib.data import World
from mmlib.data.world import check_choice

# Log-mels span about [-13.8 (silence), 5]: this maps them to [-1, 1] like pixels (see `to_vae`).
MEL_CENTER, MEL_HALF_RANGE = -4.5, 9.5


@dataclass
class AutoencoderConfig:
    """A tiny AutoencoderKL (``configs/<scale>.yaml``, sections ``image_vae`` and ``audio_vae``)."""

    channels: int = 3  # 3 for pictures, 1 for log-mel spectrograms
    block_out_channels: tuple = (16, 32, 32)  # three blocks: two 2x downsamplings, 32x32 -> 8x8
    latent_channels: int = 4  # as Stable Diffusion
    norm_num_groups: int = 8  # GroupNorm groups; must divide every block's channels
    steps: int = 1000  # training steps: pictures reach about 29-30 dB PSNR, and fewer steps reach far less
    batch_size: int = 32  # the step count sets the PSNR: a batch of 64 is no sharper, at twice the cost
    lr: float = 3e-3
    kl_weight: float = 1e-6  # SD-like: reconstruction first, just enough KL to keep latents tame


@dataclass
class AudioAutoencoderConfig(AutoencoderConfig):
    """The log-mel VAE (section ``audio_vae``): one channel, the spectrogram as a 32x32 picture."""

    channels: int = 1
    steps: int = 600
    lr: float = 4e-3


def build_autoencoder(config: AutoencoderConfig, size: int = 32) -> AutoencoderKL:
    """An untrained diffusers AutoencoderKL of the given shape."""
    blocks = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=config.channels,
        out_channels=config.channels,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(config.block_out_channels),
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        layers_per_block=1,
        sample_size=size,
    )


def to_vae(modality: str, x: torch.Tensor) -> torch.Tensor:
    """World data -> the VAE's [-1, 1] range: pictures (B, 3, H, W) or log-mels (B, n_mels, T)."""
    check_choice("autoencoded modality", modality, ["image", "audio"])
    if modality == "image":
        return x * 2 - 1
    return ((x - MEL_CENTER) / MEL_HALF_RANGE).clamp(-1, 1).unsqueeze(1)  # (B, 1, n_mels, T)


def from_vae(modality: str, x: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_vae` (pictures clamped to [0, 1])."""
    check_choice("autoencoded modality", modality, ["image", "audio"])
    if modality == "image":
        return ((x + 1) / 2).clamp(0, 1)
    return x.squeeze(1).clamp(-1, 1) * MEL_HALF_RANGE + MEL_CENTER


def render_for_vae(world: World, modality: str, scenes) -> torch.Tensor:
    """Scenes rendered as the VAE sees them ([-1, 1], channels first)."""
    if modality == "image":
        return to_vae("image", torch.from_numpy(world.image(scenes)))
    return to_vae("audio", torch.from_numpy(world.log_mel(world.audio(scenes))))


def train_autoencoder(modality: str, config: AutoencoderConfig, world: World | None = None) -> AutoencoderKL:
    """Train an AutoencoderKL on freshly rendered pictures or log-mels; sets its scaling_factor."""
    world = world or World()
    course_config.seed_everything()
    vae = build_autoencoder(config, size=world.config.image_size)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = course_config.one_cycle(optimizer, config.steps, 0.1)
    vae.train()
    with course_config.on_training_device(vae) as device:
        for step in course_config.training_steps(config.steps, f"{modality} VAE"):
            scenes = world.scenes(world.split("train", config.batch_size, start=step * config.batch_size))
            x = render_for_vae(world, modality, scenes).to(device)
            posterior = vae.encode(x).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            loss = F.mse_loss(reconstruction, x) + config.kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    vae.eval()
    with torch.no_grad():  # unit-variance latents: what the diffusion noise schedule assumes
        x = render_for_vae(world, modality, world.scenes(world.split("val", 512)))
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


@torch.no_grad()
def encode(vae: AutoencoderKL, x: torch.Tensor, sample: bool = False, batch_size: int = 512) -> torch.Tensor:
    """Scaled latents of VAE-range inputs: the posterior mean, or a sample of the posterior."""
    parts = []
    for i in range(0, len(x), batch_size):
        posterior = vae.encode(x[i : i + batch_size]).latent_dist
        parts.append(posterior.sample() if sample else posterior.mean)
    return torch.cat(parts) * vae.config.scaling_factor


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """VAE-range outputs of scaled latents."""
    parts = [vae.decode(latents[i : i + batch_size] / vae.config.scaling_factor).sample
             for i in range(0, len(latents), batch_size)]
    return torch.cat(parts)


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over a batch (pictures in [0, 1]: peak 1)."""
    mse = F.mse_loss(reconstruction.float(), reference.float()).item()
    return 10 * math.log10(peak**2 / mse)
