"""The judge: classifiers that read a scene's attributes back from pictures, sounds and clips.

Introduced in `03_diffusion_decoders.ipynb`; every later lesson grades what it generates with it.
A decoder asked for "a small red circle in the top left" is right if the judge, looking at the
output alone, reads back small, red, circle and top left.

Each judge is a CNN tower (the same towers as the encoders) with one classification head per
attribute its modality reveals, trained with cross-entropy on freshly rendered scenes. Training
adds mild noise and blur, so that slightly imperfect generated outputs are read as a person would
read them, not rejected for looking unlike a perfect render.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mmlib import config as course_config
from mmlib import zoo
from mmlib.data import ATTRIBUTES, REVEALS, World
from mmlib.data.world import check_choice
from mmlib.encoders import AudioEncoder, ConvEncoder, ConvEncoderConfig

# What each judge reads: images and sounds all they reveal; clips only their motion.
JUDGED = {"image": REVEALS["image"], "audio": REVEALS["audio"], "video": ("motion",)}


@dataclass
class JudgeConfig:
    """How the judges are built and trained (``configs/<scale>.yaml``, section ``judge``)."""

    image: ConvEncoderConfig = field(default_factory=lambda: ConvEncoderConfig(width=32, embed_dim=128))
    audio: ConvEncoderConfig = field(default_factory=lambda: ConvEncoderConfig(in_channels=1, embed_dim=128))
    video: ConvEncoderConfig = field(default_factory=lambda: ConvEncoderConfig(frames=8, embed_dim=128))
    steps: dict = field(default_factory=lambda: {"image": 600, "audio": 300, "video": 300})  # ~45, 25, 30 s
    batch_size: int = 128
    lr: float = 2e-3
    noise: float = 0.04  # largest std of the Gaussian noise added to training inputs


course_config.register_section("judge", JudgeConfig)


class AttributeClassifier(nn.Module):
    """A tower and one linear head per attribute: inputs -> {attribute: logits (B, values)}."""

    def __init__(self, modality: str, config: ConvEncoderConfig) -> None:
        super().__init__()
        check_choice("judged modality", modality, list(JUDGED))
        self.modality, self.config = modality, config
        self.tower = AudioEncoder(config) if modality == "audio" else ConvEncoder(config)
        self.heads = nn.ModuleDict({name: nn.Linear(config.embed_dim, len(ATTRIBUTES[name]))
                                    for name in JUDGED[modality]})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = F.gelu(self.tower(x))
        return {name: head(features) for name, head in self.heads.items()}


def _augment(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Mild noise and, for half the batch, a 3x3 blur: the defects generated outputs have."""
    if x.ndim == 2:  # waveforms: noise only
        return x + strength * torch.rand(len(x), 1, generator=generator) * torch.randn(x.shape, generator=generator)
    flat = x.flatten(0, x.ndim - 4)  # (N, C, H, W), clips' frames included
    blurred = F.avg_pool2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(len(flat), 1, 1, 1, generator=generator) < 0.5).to(flat.dtype)
    flat = pick * blurred + (1 - pick) * flat
    sigma = strength * torch.rand(len(flat), 1, 1, 1, generator=generator)
    return (flat + sigma * torch.randn(flat.shape, generator=generator)).reshape(x.shape)


def train_classifier(modality: str, config: JudgeConfig, world: World, steps: int | None = None) -> AttributeClassifier:
    """Train one judge on freshly rendered scenes (a new batch every step)."""
    check_choice("judged modality", modality, list(JUDGED))
    course_config.seed_everything()
    model = AttributeClassifier(modality, getattr(config, modality))
    steps = steps or config.steps[modality]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = course_config.one_cycle(optimizer, steps, 0.1)
    generator = torch.Generator().manual_seed(world.seed)
    model.train()
    with course_config.on_training_device(model) as device:
        for step in course_config.training_steps(steps, f"{modality} judge"):
            scenes = world.scenes(world.split("train", config.batch_size, start=step * config.batch_size))
            x = _augment(torch.from_numpy(world.render(modality, scenes)), config.noise, generator)
            logits = model(x.to(device))
            loss = sum(F.cross_entropy(logits[name], torch.from_numpy(scenes.attributes[name]).to(device))
                       for name in logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


class Judge:
    """Reads attributes back from outputs and grades them against the scenes they should show."""

    def __init__(self, classifiers: dict[str, AttributeClassifier]) -> None:
        self.classifiers = classifiers

    @torch.no_grad()
    def read(self, modality: str, batch: torch.Tensor) -> dict[str, np.ndarray]:
        """Predicted value ids per attribute, e.g. ``{"color": array([0, 4, ...]), ...}``."""
        if modality not in self.classifiers:
            raise ValueError(f"the judge reads {', '.join(self.classifiers)}; not {modality!r}")
        batch = torch.as_tensor(batch).float()
        parts = [self.classifiers[modality](batch[i : i + 256]) for i in range(0, len(batch), 256)]
        return {name: torch.cat([p[name] for p in parts]).argmax(dim=1).numpy() for name in parts[0]}

    def grade(self, modality: str, batch: torch.Tensor, attributes: dict[str, np.ndarray]) -> dict[str, float]:
        """Share of outputs whose attribute the judge reads as the requested value, per attribute."""
        read = self.read(modality, batch)
        return {name: float((read[name] == np.asarray(attributes[name])).mean()) for name in read}

    def save(self, folder: Path, config: JudgeConfig) -> None:
        for modality, model in self.classifiers.items():
            save_file(model.state_dict(), Path(folder) / f"{modality}.safetensors")
        (Path(folder) / "judge.json").write_text(json.dumps(asdict(config)))

    @classmethod
    def load(cls, folder: Path) -> "Judge":
        config = course_config.make_config(JudgeConfig, json.loads((Path(folder) / "judge.json").read_text()))
        classifiers = {}
        for modality in JUDGED:
            model = AttributeClassifier(modality, getattr(config, modality))
            model.load_state_dict(load_file(Path(folder) / f"{modality}.safetensors"))
            classifiers[modality] = model.eval()
        return cls(classifiers)


def train_judge(config: JudgeConfig | None = None, world: World | None = None) -> Judge:
    """Train the image, audio and video judges."""
    config = config or course_config.scale_config("judge", JudgeConfig)
    world = world or World()
    return Judge({modality: train_classifier(modality, config, world) for modality in JUDGED})


@zoo.entry("judge", load=Judge.load, description="attribute classifiers for images, sounds and clips",
           lesson="03_diffusion_decoders.ipynb", sections=("judge",))
def _train_zoo_judge(folder: Path) -> None:
    config = course_config.scale_config("judge", JudgeConfig)
    train_judge(config).save(folder, config)
