"""CLIP and CLAP recipes: train image-text and audio-text encoders on the world, or load real ones.

Introduced in `01_contrastive_encoders.ipynb`. At tiny and small scale these functions train the
towers of `mmlib.encoders` with `mmlib.contrastive`; the zoo entries ``clip`` and ``clap`` cache
the result. At full scale, `PretrainedClip` and `PretrainedClap` load real checkpoints through
transformers behind the same ``embed(modality, batch)`` interface.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmlib import config as course_config
from mmlib import zoo
from mmlib.contrastive import ContrastiveConfig, History, LogitScale, contrastive_loss, train_contrastive
from mmlib.data import REVEALS, DigitsDataset, World, digit_caption
from mmlib.encoders import ConvEncoderConfig, EncoderSet, TextEncoderConfig, build_encoders, tower_spec


@dataclass
class ClipConfig:
    """Lesson 1's image-text model at one scale (``configs/<scale>.yaml``, section ``clip``)."""

    pretrained: str | None = None  # a checkpoint to load instead of training (full scale)
    image: ConvEncoderConfig = field(default_factory=ConvEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    training: ContrastiveConfig = field(default_factory=lambda: ContrastiveConfig(steps=700))
    text_lr: float = 2e-3  # the transformer likes a gentler rate than the CNN's training.lr
    full_caption_fraction: float = 0.5  # share of each batch captioned with every attribute


@dataclass
class ClapConfig:
    """Lesson 1's audio-text model at one scale (``configs/<scale>.yaml``, section ``clap``)."""

    pretrained: str | None = None  # a checkpoint to load instead of training (full scale)
    audio: ConvEncoderConfig = field(default_factory=lambda: ConvEncoderConfig(in_channels=1))
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    training: ContrastiveConfig = field(default_factory=lambda: ContrastiveConfig(steps=200))
    text_lr: float = 2e-3
    full_caption_fraction: float = 0.5


course_config.register_section("clip", ClipConfig)
course_config.register_section("clap", ClapConfig)


@dataclass
class TrainedEncoders:
    """An encoder set and what its contrastive training left: temperature and curves."""

    encoders: EncoderSet
    logit_scales: dict[str, LogitScale]  # one per trained pair, e.g. {"image-text": ...}
    history: History

    def save(self, folder: Path) -> None:
        self.encoders.save(folder)
        record = {"log_scales": {name: scale.log_scale.item() for name, scale in self.logit_scales.items()},
                  "history": asdict(self.history)}
        (Path(folder) / "contrastive.json").write_text(json.dumps(record))

    @classmethod
    def load(cls, folder: Path) -> "TrainedEncoders":
        record = json.loads((Path(folder) / "contrastive.json").read_text())
        scales = {}
        for name, value in record["log_scales"].items():
            scales[name] = LogitScale()
            scales[name].log_scale.data.fill_(value)
        return cls(EncoderSet.load(folder), scales, History(**record["history"]))


def caption_batches(world: World, modality: str, batch_size: int, full_caption_fraction: float,
                    among=None, split: str = "train"):
    """A function step -> (inputs, captions): fresh scenes each step, some captioned in full.

    Captions mention a random subset of `among` (default: what `modality` reveals); the first
    ``full_caption_fraction`` of each batch mentions all of it, which teaches every attribute
    in every batch.
    """
    among = tuple(among or REVEALS[modality])
    full = int(round(full_caption_fraction * batch_size))

    def batch(step: int):
        scenes = world.scenes(world.split(split, batch_size, start=step * batch_size))
        texts = world.captions(scenes, variant=step, among=among)[0]
        if full:
            texts[:full] = world.captions(scenes[:full], variant=step, mention="all", among=among)[0]
        return torch.from_numpy(world.render(modality, scenes)), texts

    return batch


def train_pair(modality: str, tower: ConvEncoderConfig, kind: str, text: TextEncoderConfig,
               training: ContrastiveConfig, text_lr: float, full_caption_fraction: float, tokenizer,
               world: World | None = None, evaluate=None, eval_every: int = 0,
               description: str | None = None) -> TrainedEncoders:
    """Train a `modality` tower and a text tower together with InfoNCE on world scenes.

    `kind` is the tower kind ("conv" or "audio"); `evaluate(encoders)` is called every
    `eval_every` steps and at the end (its dict lands in the history's evaluations).
    """
    world = world or World()
    course_config.seed_everything()
    encoders = build_encoders({modality: tower_spec(kind, tower), "text": tower_spec("text", text)}, tokenizer)
    batches = caption_batches(world, modality, training.batch_size, full_caption_fraction)
    return fit_pair(encoders, modality, batches, training, text_lr, evaluate, eval_every, description)


def fit_pair(encoders: EncoderSet, modality: str, batches, training: ContrastiveConfig, text_lr: float,
             evaluate=None, eval_every: int = 0, description: str | None = None) -> TrainedEncoders:
    """Train both towers of a `modality`-text encoder set on `batches(step) -> (inputs, captions)`."""
    name = f"{modality}-text"
    scales = {name: LogitScale(training.init_temperature, learnable=training.learn_temperature)}

    def losses(step: int) -> dict[str, torch.Tensor]:
        inputs, captions = batches(step)
        return {name: contrastive_loss(encoders.embed(modality, inputs), encoders.embed("text", captions), scales[name]())}

    with course_config.on_training_device(encoders, *scales.values()):  # embed() moves each batch there
        history = train_contrastive(
            losses,
            parameter_groups=[
                {"params": list(encoders.towers[modality].parameters())},
                {"params": list(encoders.towers["text"].parameters()), "lr": text_lr},
            ],
            config=training,
            logit_scales=scales,
            modules=[encoders],
            evaluate=(lambda: evaluate(encoders)) if evaluate else None,
            eval_every=eval_every,
            description=description or name,
        )
    return TrainedEncoders(encoders, scales, history)


def train_clip(config: ClipConfig, tokenizer, world: World | None = None, **options) -> TrainedEncoders:
    """Lesson 1's CLIP: a CNN image tower and a transformer text tower, trained together."""
    return train_pair("image", config.image, "conv", config.text, config.training, config.text_lr,
                      config.full_caption_fraction, tokenizer, world, **options)


def train_clap(config: ClapConfig, tokenizer, world: World | None = None, **options) -> TrainedEncoders:
    """Lesson 1's CLAP: the same recipe with a log-mel CNN for sounds and a text tower of its own."""
    return train_pair("audio", config.audio, "audio", config.text, config.training, config.text_lr,
                      config.full_caption_fraction, tokenizer, world, **options)


def digit_batches(dataset, batch_size: int, seed: int):
    """A function step -> (images, captions) drawing random scans of handwritten digits."""

    def batch(step: int):
        rows = torch.randint(len(dataset), (batch_size,), generator=torch.Generator().manual_seed(seed * 100_003 + step))
        captions = [digit_caption(int(dataset.labels[r]), variant=step * batch_size + i, seed=seed)
                    for i, r in enumerate(rows.tolist())]
        return dataset.images[rows], captions

    return batch


def train_digits_clip(config: ClipConfig, tokenizer, dataset=None, steps: int = 150) -> TrainedEncoders:
    """The CLIP recipe on real images: scikit-learn's handwritten digits and their captions."""
    course_config.seed_everything()
    dataset = dataset or DigitsDataset("train")
    encoders = build_encoders({"image": tower_spec("conv", config.image), "text": tower_spec("text", config.text)},
                              tokenizer)
    batches = digit_batches(dataset, config.training.batch_size, dataset.seed)
    return fit_pair(encoders, "image", batches, replace(config.training, steps=steps), config.text_lr,
                    description="digits")


@zoo.entry("clip", load=TrainedEncoders.load, version=2, description="tiny CLIP: image and text encoders",
           lesson="01_contrastive_encoders.ipynb", sections=("clip",), needs=("tokenizer",))
def _train_zoo_clip(folder: Path) -> None:
    train_clip(course_config.scale_config("clip", ClipConfig), zoo.load("tokenizer")).save(folder)


@zoo.entry("clap", load=TrainedEncoders.load, version=2, description="tiny CLAP: audio and text encoders",
           lesson="01_contrastive_encoders.ipynb", sections=("clap",), needs=("tokenizer",))
def _train_zoo_clap(folder: Path) -> None:
    train_clap(course_config.scale_config("clap", ClapConfig), zoo.load("tokenizer")).save(folder)


# ---------------------------------------------------------------------------------------------
# Full scale: real checkpoints behind the same embed() interface.
# ---------------------------------------------------------------------------------------------


def _features(output) -> torch.Tensor:
    """transformers >= 5 returns an output object from get_*_features; older versions a tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


class PretrainedPair(nn.Module):
    """A transformers dual encoder (text plus one other modality) behind ``embed(modality, batch)``."""

    modalities: list[str] = []  # ["text", the other modality], set by each subclass

    @torch.no_grad()
    def embed(self, modality: str, batch) -> torch.Tensor:
        device = next(self.model.parameters()).device
        if modality == "text":
            tokens = self.tokenizer([batch] if isinstance(batch, str) else list(batch), padding=True,
                                    truncation=True, return_tensors="pt").to(device)
            output = self.model.get_text_features(**tokens)
        elif modality in self.modalities:
            output = self.embed_other(batch, device)
        else:
            raise ValueError(f"this encoder set has no {modality!r} encoder; it encodes: {', '.join(self.modalities)}")
        return F.normalize(_features(output).float(), dim=-1)

    def embed_other(self, batch, device):
        raise NotImplementedError


class PretrainedClip(PretrainedPair):
    """A transformers CLIPModel (e.g. ``openai/clip-vit-large-patch14``) as an encoder set.

    Images come in as the world renders them, (B, 3, H, W) in [0, 1]; the checkpoint's own image
    processor resizes and normalises them.
    """

    modalities = ["image", "text"]

    def __init__(self, name_or_path: str, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.model = course_config.from_pretrained_safely(CLIPModel.from_pretrained, name_or_path, dtype=dtype).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)

    def embed_other(self, batch, device):
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"image batch must be a (batch, 3, H, W) tensor in [0, 1]; got {getattr(batch, 'shape', type(batch))}")
        pixels = self.image_processor(images=list(batch.float().cpu()), do_rescale=False, return_tensors="pt")
        return self.model.get_image_features(pixel_values=pixels["pixel_values"].to(device, self.model.dtype))


class PretrainedClap(PretrainedPair):
    """A transformers ClapModel (e.g. ``laion/clap-htsat-unfused``) as an encoder set.

    Sounds come in as the world renders them, (B, samples) at `sample_rate`; they are resampled
    to the checkpoint's rate (48 kHz for LAION's CLAP) before its feature extractor.
    """

    modalities = ["audio", "text"]

    def __init__(self, name_or_path: str, sample_rate: int = 8000, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        from transformers import AutoFeatureExtractor, AutoTokenizer, ClapModel

        self.model = course_config.from_pretrained_safely(ClapModel.from_pretrained, name_or_path, dtype=dtype).eval()
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.sample_rate = sample_rate

    def embed_other(self, batch, device):
        from scipy.signal import resample_poly

        if not isinstance(batch, torch.Tensor) or batch.ndim != 2:
            raise ValueError(f"audio batch must be waveforms (batch, samples); got {getattr(batch, 'shape', type(batch))}")
        target = self.feature_extractor.sampling_rate
        sounds = [resample_poly(wave.double().cpu().numpy(), target, self.sample_rate) for wave in batch]
        features = self.feature_extractor(sounds, sampling_rate=target, return_tensors="pt")
        inputs = {key: value.to(device) for key, value in features.items() if key in ("input_features", "is_longer")}
        inputs["input_features"] = inputs["input_features"].to(self.model.dtype)
        return self.model.get_audio_features(**inputs)


def load_clip(config: ClipConfig | None = None):
    """The scale's image-text encoders: a pretrained CLIP if the config names one, else the zoo's."""
    config = config or course_config.scale_config("clip", ClipConfig)
    return PretrainedClip(config.pretrained) if config.pretrained else zoo.load("clip").encoders


def load_clap(config: ClapConfig | None = None):
    """The scale's audio-text encoders: a pretrained CLAP if the config names one, else the zoo's."""
    config = config or course_config.scale_config("clap", ClapConfig)
    return PretrainedClap(config.pretrained) if config.pretrained else zoo.load("clap").encoders
