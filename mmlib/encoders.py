"""Encoders: every modality into one shared, L2-normalised embedding space. L(Encoder).

Introduced in `01_contrastive_encoders.ipynb` (image, text, audio) and extended in
`02_imagebind.ipynb` (depth, thermal, IMU, video). Each encoder is a tower (a small CNN, or a
transformer for text) with a projection head into the shared space; `EncoderSet.embed` is the
one interface for all of them:

    encoders.embed("image", images)   # (B, 3, 32, 32) in [0, 1]    -> (B, D), unit length
    encoders.embed("audio", sounds)   # (B, samples) or log-mel (B, 32, 32)
    encoders.embed("text", captions)  # list of strings

At full scale the same interface wraps pretrained CLIP and CLAP from transformers
(`PretrainedClip`, `PretrainedClap`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from mmlib.config import make_config
from mmlib.data import WorldConfig
from mmlib.data.sound import LogMel
from mmlib.data.world import check_choice


@dataclass
class ConvEncoderConfig:
    """A small CNN tower for anything shaped like a picture: images, spectrograms, depth, heat."""

    in_channels: int = 3  # 3 for RGB, 1 for a log-mel spectrogram, a depth or a thermal map
    frames: int = 1  # >1 for clips (B, T, C, H, W): frames are stacked as channels (early fusion)
    input_size: int = 32  # square input side; three 2x poolings leave 4x4
    width: int = 24  # channels after the first conv, doubled after each pooling
    hidden: int = 256  # width of the MLP head (0: a single linear layer)
    embed_dim: int = 64  # the shared embedding space


class ConvEncoder(nn.Module):
    """CNN tower: (B, C, H, W) -> (B, embed_dim). Flattening (not pooling) keeps *where* things are."""

    def __init__(self, config: ConvEncoderConfig) -> None:
        super().__init__()
        self.config = config
        c, w = config.in_channels * config.frames, config.width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.GELU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(
            nn.BatchNorm2d(c),  # learns the input's scale: pixels in [0, 1] and log-mels around -6 alike
            *block(c, w), *block(w, 2 * w), *block(2 * w, 4 * w),
            nn.Flatten(),  # (B, 4w * (size / 8)^2)
        )
        flat = 4 * w * (config.input_size // 8) ** 2
        if config.hidden:
            self.head = nn.Sequential(nn.Linear(flat, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.embed_dim))
        else:
            self.head = nn.Linear(flat, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.frames > 1:
            x = x.flatten(1, 2)  # (B, T, C, H, W) -> (B, T*C, H, W): motion becomes a channel pattern
        return self.head(self.features(x))


@dataclass
class ImuEncoderConfig:
    """A small 1-D CNN over IMU traces (channels x time)."""

    channels: int = 6  # accelerometer x, y, z and gyroscope x, y, z
    steps: int = 32  # samples per trace
    width: int = 32  # channels after the first convolution
    embed_dim: int = 64  # the shared embedding space


class ImuEncoder(nn.Module):
    """1-D CNN tower: (B, channels, steps) -> (B, embed_dim)."""

    def __init__(self, config: ImuEncoderConfig) -> None:
        super().__init__()
        self.config = config
        c, w = config.channels, config.width
        self.features = nn.Sequential(
            nn.BatchNorm1d(c),  # gravity (~1 g) and rotation rates (~0.3 rad/s) live on different scales
            nn.Conv1d(c, w, 5, padding=2), nn.BatchNorm1d(w), nn.GELU(),
            nn.Conv1d(w, 2 * w, 5, stride=2, padding=2), nn.BatchNorm1d(2 * w), nn.GELU(),
            nn.Conv1d(2 * w, 2 * w, 5, stride=2, padding=2), nn.BatchNorm1d(2 * w), nn.GELU(),
            nn.Flatten(),  # (B, 2w * steps / 4): keeps *when* things happen
        )
        self.head = nn.Linear(2 * w * ((config.steps + 3) // 4), config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class TextEncoderConfig:
    """A small transformers CLIPTextModel plus a projection head."""

    hidden_size: int = 64  # width of the token states (what a diffusion decoder attends to)
    layers: int = 2  # transformer blocks
    heads: int = 4  # attention heads
    intermediate_size: int = 256  # MLP width inside each block
    max_length: int = 32  # longest tokenized text, <s> and </s> included
    embed_dim: int = 64  # the shared embedding space
    pooling: str = "mean"  # "mean" over token states, or "eos" (the end-of-text state, as CLIP)
    token_init_std: float = 1.0  # CLIP initialises token embeddings at 0.02; see TextEncoder


class TextEncoder(nn.Module):
    """Captions -> (B, embed_dim) through a CLIPTextModel and the course tokenizer.

    Two choices differ from CLIP, both measured in lesson 1: the embedding is the mean of the
    token states rather than the end-of-text state, and token embeddings start at std 1.0 rather
    than 0.02. Together they make the untrained model a bag of words that attention then
    refines, which learns this world's captions several times faster on a CPU.
    """

    def __init__(self, config: TextEncoderConfig, tokenizer: PreTrainedTokenizerFast) -> None:
        super().__init__()
        check_choice("pooling", config.pooling, ["mean", "eos"])
        self.config, self.tokenizer = config, tokenizer
        self.transformer = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size,
                num_hidden_layers=config.layers,
                num_attention_heads=config.heads,
                max_position_embeddings=config.max_length,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,  # CLIP pools here: must match the tokenizer
            )
        )
        nn.init.normal_(self.transformer.embeddings.token_embedding.weight, std=config.token_init_std)
        self.projection = nn.Linear(config.hidden_size, config.embed_dim, bias=False)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded to the longest text in the batch."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("the text encoder expects a list of strings")
        device = self.projection.weight.device
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.config.max_length,
                                return_tensors="pt")
        return {"input_ids": tokens["input_ids"].to(device), "attention_mask": tokens["attention_mask"].to(device)}

    def token_states(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token states (B, T, hidden_size) and the attention mask (B, T)."""
        tokens = self.tokenize(texts)
        return self.transformer(**tokens).last_hidden_state, tokens["attention_mask"]

    def forward(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        output = self.transformer(**tokens)
        if self.config.pooling == "eos":
            pooled = output.pooler_output  # (B, hidden): the state at </s>
        else:
            mask = tokens["attention_mask"].unsqueeze(-1).to(output.last_hidden_state.dtype)  # (B, T, 1)
            pooled = (output.last_hidden_state * mask).sum(1) / mask.sum(1)  # (B, hidden)
        return self.projection(pooled)


class AudioEncoder(nn.Module):
    """Sounds -> (B, embed_dim): a log-mel front end, then a one-channel ConvEncoder."""

    def __init__(self, config: ConvEncoderConfig, world: WorldConfig | None = None) -> None:
        super().__init__()
        self.world = world or WorldConfig()
        self.front_end = LogMel(self.world)
        self.tower = ConvEncoder(config)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        mel = self.front_end(audio) if audio.ndim == 2 else audio  # waveforms or log-mels
        return self.tower(mel.unsqueeze(1))  # (B, 1, n_mels, frames)


class EncoderSet(nn.Module):
    """Encoders for several modalities, one embedding space: ``embed(modality, batch) -> (B, D)``."""

    def __init__(self, towers: dict[str, nn.Module], configs: dict[str, dict] | None = None) -> None:
        super().__init__()
        self.towers = nn.ModuleDict(towers)
        self.configs = configs or {}  # what `save` writes so `load` can rebuild the towers

    @property
    def modalities(self) -> list[str]:
        return list(self.towers)

    def embed(self, modality: str, batch) -> torch.Tensor:
        """L2-normalised embeddings (B, D) of a batch of one modality."""
        if modality not in self.towers:
            raise ValueError(f"this encoder set has no {modality!r} encoder; it encodes: {', '.join(self.towers)}")
        tower = self.towers[modality]
        if modality == "text":
            texts = [batch] if isinstance(batch, str) else list(batch)
            return F.normalize(tower(texts), dim=-1)
        x = self._check_tensor(modality, batch, tower)
        return F.normalize(tower(x), dim=-1)

    def _check_tensor(self, modality: str, batch, tower: nn.Module) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"{modality} batch must be a torch.Tensor, got {type(batch).__name__}")
        if not batch.is_floating_point():
            raise TypeError(f"{modality} batch must hold floats, got {batch.dtype}")
        device = next(tower.parameters()).device
        if isinstance(tower, AudioEncoder):
            world = tower.world
            frames = 1 + int(world.sample_rate * world.audio_seconds) // world.hop_length
            samples = int(round(world.sample_rate * world.audio_seconds))
            ok = (batch.ndim == 2 and batch.shape[1] == samples) or (batch.ndim == 3 and batch.shape[1:] == (world.n_mels, frames))
            if not ok:
                raise ValueError(f"audio batch must be waveforms (batch, {samples}) or log-mel spectrograms "
                                 f"(batch, {world.n_mels}, {frames}); got {tuple(batch.shape)}")
            return batch.to(device)
        if isinstance(tower, ImuEncoder):
            expected = (tower.config.channels, tower.config.steps)
        else:
            side = tower.config.input_size
            expected = (tower.config.in_channels, side, side)
            if tower.config.frames > 1:
                expected = (tower.config.frames, *expected)
        if tuple(batch.shape[1:]) != expected:
            raise ValueError(f"{modality} batch must have shape (batch, {', '.join(map(str, expected))}); "
                             f"got {tuple(batch.shape)}")
        return batch.to(device)

    # -- saving and loading: safetensors weights, a JSON config, the tokenizer's own files -------

    def save(self, folder: Path) -> None:
        """Write ``encoders.safetensors``, ``encoders.json`` and (if there is text) the tokenizer."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {key: value.contiguous() for key, value in self.state_dict().items()}
        save_file(state, folder / "encoders.safetensors")
        (folder / "encoders.json").write_text(json.dumps(self.configs, indent=2))
        if "text" in self.towers:
            self.towers["text"].tokenizer.save_pretrained(folder / "tokenizer")

    @classmethod
    def load(cls, folder: Path) -> "EncoderSet":
        """Rebuild an encoder set written by `save` (no pickle: JSON and safetensors only)."""
        folder = Path(folder)
        configs = json.loads((folder / "encoders.json").read_text())
        tokenizer = None
        if (folder / "tokenizer").is_dir():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
        encoders = build_encoders(configs, tokenizer)
        encoders.load_state_dict(load_file(folder / "encoders.safetensors"))
        return encoders.eval()


@dataclass
class TowerSpec:
    """What `build_encoders` needs for one modality: which tower, and its config."""

    kind: str  # "conv", "audio", "imu" or "text"
    config: dict = field(default_factory=dict)


TOWER_CONFIGS = {"conv": ConvEncoderConfig, "audio": ConvEncoderConfig, "imu": ImuEncoderConfig,
                 "text": TextEncoderConfig}


def build_encoders(specs: dict[str, dict], tokenizer: PreTrainedTokenizerFast | None = None) -> EncoderSet:
    """An untrained EncoderSet from ``{modality: {"kind": ..., "config": {...}}}``."""
    towers = {}
    for modality, spec in specs.items():
        spec = make_config(TowerSpec, spec, path=modality)
        check_choice("tower kind", spec.kind, list(TOWER_CONFIGS))
        config = make_config(TOWER_CONFIGS[spec.kind], spec.config, path=f"{modality}.config")
        if spec.kind == "text":
            if tokenizer is None:
                raise ValueError("a text tower needs the course tokenizer (zoo.load('tokenizer'))")
            towers[modality] = TextEncoder(config, tokenizer)
        elif spec.kind == "audio":
            towers[modality] = AudioEncoder(config)
        elif spec.kind == "imu":
            towers[modality] = ImuEncoder(config)
        else:
            towers[modality] = ConvEncoder(config)
    return EncoderSet(towers, {m: {"kind": s["kind"], "config": s.get("config", {})} for m, s in specs.items()})


def tower_spec(kind: str, config) -> dict:
    """The JSON-able spec of one tower, for `build_encoders`."""
    return {"kind": kind, "config": asdict(config)}


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
