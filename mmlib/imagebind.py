"""ImageBind: one embedding space for every modality, bound through images. L(Encoder), continued.

Introduced in `02_imagebind.ipynb`. ImageBind keeps a pretrained image-text model frozen and
trains one encoder per new modality on (image, X) pairs only, each with InfoNCE against the
frozen image embeddings and a temperature of its own. No (X, text) pair is ever seen, yet X lands
next to the text that describes it: the alignment to text *emerges* through the images.

Here the frozen image and text towers are lesson 1's tiny CLIP; the bound modalities are audio,
depth, thermal, IMU and video. The zoo entry ``imagebind`` is the seven-modality encoder set that
later lessons use as "the encoder" of the any-to-any model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmlib import config as course_config
from mmlib import zoo
from mmlib.clip import TrainedEncoders
from mmlib.contrastive import ContrastiveConfig, LogitScale, contrastive_loss, train_contrastive
from mmlib.data import REVEALS, World
from mmlib.data.world import check_choice
from mmlib.encoders import ConvEncoderConfig, EncoderSet, ImuEncoderConfig, build_encoders, tower_spec
from mmlib.retrieval import (
    attribute_matrix, caption_relevance, embed_in_batches, recall_at_k, shared_relevance, zero_shot_accuracy,
    zero_shot_classifier, zero_shot_prompts,
)

BOUND_MODALITIES = ("audio", "depth", "thermal", "imu", "video")


@dataclass
class ImageBindConfig:
    """Lesson 2's bound towers at one scale (``configs/<scale>.yaml``, section ``imagebind``)."""

    pretrained_image_text: str | None = None  # full scale: the frozen image-text model to bind to
    audio: ConvEncoderConfig = field(default_factory=lambda: ConvEncoderConfig(in_channels=1))
    depth: ConvEncoderConfig = field(default_factory=lambda: ConvEncoderConfig(in_channels=1))
    thermal: ConvEncoderConfig = field(default_factory=lambda: ConvEncoderConfig(in_channels=1))
    imu: ImuEncoderConfig = field(default_factory=ImuEncoderConfig)
    video: ConvEncoderConfig = field(default_factory=lambda: ConvEncoderConfig(in_channels=3, frames=8))
    training: ContrastiveConfig = field(default_factory=lambda: ContrastiveConfig(steps=200))


course_config.register_section("imagebind", ImageBindConfig)

TOWER_KINDS = {"audio": "audio", "depth": "conv", "thermal": "conv", "imu": "imu", "video": "conv"}


def bind_to_images(clip: EncoderSet, config: ImageBindConfig | None = None, world: World | None = None,
                   modalities=BOUND_MODALITIES, evaluate=None, eval_every: int = 0) -> TrainedEncoders:
    """Train one tower per modality against `clip`'s frozen image embeddings, on (image, X) pairs.

    Returns an encoder set holding `clip`'s image and text towers (unchanged) and the new towers,
    with one temperature per bound pair (``"audio-image"``, ...).
    """
    config = config or course_config.scale_config("imagebind", ImageBindConfig)
    world = world or World()
    for modality in modalities:
        check_choice("bindable modality", modality, list(BOUND_MODALITIES))
    course_config.seed_everything()
    specs = {**clip.configs, **{m: tower_spec(TOWER_KINDS[m], getattr(config, m)) for m in modalities}}
    encoders = build_encoders(specs, clip.towers["text"].tokenizer if "text" in clip.towers else None)
    for frozen in clip.towers:  # the binding modality and text stay exactly as lesson 1 left them
        encoders.towers[frozen].load_state_dict(clip.towers[frozen].state_dict())
        encoders.towers[frozen].requires_grad_(False).eval()
    training = config.training
    scales = {f"{m}-image": LogitScale(training.init_temperature, learnable=training.learn_temperature)
              for m in modalities}
    size = training.batch_size

    def losses(step: int) -> dict[str, torch.Tensor]:
        scenes = world.scenes(world.split("train", size, start=step * size))
        with torch.no_grad():
            target = encoders.embed("image", torch.from_numpy(world.image(scenes)))  # (B, D), frozen
        parts = {}
        for m in modalities:
            bound = encoders.embed(m, torch.from_numpy(world.render(m, scenes)))  # (B, D), on the training device
            parts[f"{m}-image"] = contrastive_loss(bound, target.to(bound.device), scales[f"{m}-image"]())
        return parts

    bound = [encoders.towers[m] for m in modalities]  # the frozen image tower stays in eval mode, on the CPU
    with course_config.on_training_device(*bound, *scales.values()):
        history = train_contrastive(
            losses,
            parameter_groups=[{"params": [p for m in modalities for p in encoders.towers[m].parameters()]}],
            config=training,
            logit_scales=scales,
            modules=bound,
            evaluate=(lambda: evaluate(encoders)) if evaluate else None,
            eval_every=eval_every,
            description="binding to images",
        )
    return TrainedEncoders(encoders.eval(), scales, history)


def shared_attributes(a: str, b: str) -> tuple[str, ...]:
    """The attributes two modalities both reveal: what retrieval between them can be judged on."""
    return tuple(name for name in REVEALS[a] if name in REVEALS[b])


@torch.no_grad()
def pairwise_recall(encoders, world: World, scenes, modalities, k: int = 1) -> np.ndarray:
    """(M, M) recall@k from each modality (row) to each other (column) on the same scenes.

    A hit agrees with the query on every attribute both modalities reveal; text is captioned with
    exactly those attributes. Pairs that share no attribute (depth and IMU) and the diagonal are NaN.
    """
    attributes = attribute_matrix(scenes)
    embeddings = {m: embed_in_batches(encoders, m, torch.from_numpy(world.render(m, scenes)))
                  for m in modalities if m != "text"}
    recall = np.full((len(modalities), len(modalities)), np.nan)
    for i, a in enumerate(modalities):
        for j, b in enumerate(modalities):
            shared = shared_attributes(a, b)
            if a == b or not shared:
                continue
            if "text" in (a, b):
                texts, mentioned = world.captions(scenes, mention="all", among=shared)
                embeddings["text"] = embed_in_batches(encoders, "text", texts)
                relevant = caption_relevance(attributes, mentioned, attributes)  # (captions, items)
                relevant = relevant if a == "text" else relevant.T
            else:
                relevant = shared_relevance(attributes, attributes, shared)
            recall[i, j] = recall_at_k(embeddings[a] @ embeddings[b].T, relevant, k)
    return recall


@torch.no_grad()
def zero_shot_table(encoders, world: World, scenes, modalities) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of each modality on each attribute it reveals, with text prompts."""
    classifiers = {}
    table = {}
    for modality in modalities:
        embeddings = embed_in_batches(encoders, modality, torch.from_numpy(world.render(modality, scenes)))
        table[modality] = {}
        for name in REVEALS[modality]:
            if name not in classifiers:
                classifiers[name] = zero_shot_classifier(encoders, zero_shot_prompts(world, name))
            table[modality][name] = zero_shot_accuracy(embeddings, classifiers[name], scenes.attributes[name])
    return table


@zoo.entry("imagebind", load=TrainedEncoders.load, description="seven modalities in one space, bound through images",
           lesson="02_imagebind.ipynb", sections=("imagebind",), needs=("clip",))
def _train_zoo_imagebind(folder: Path) -> None:
    bind_to_images(zoo.load("clip").encoders).save(folder)


def load_imagebind(config: ImageBindConfig | None = None):
    """The scale's bound encoder set: the zoo's at tiny and small scale.

    At full scale there is no maintained ImageBind package to load (see the README), so this
    returns the frozen image-text model ImageBind-Huge binds to, behind the same ``embed``; the
    other towers are trained on your own (image, X) pairs with `bind_to_images`.
    """
    from mmlib.clip import PretrainedClip

    config = config or course_config.scale_config("imagebind", ImageBindConfig)
    if config.pretrained_image_text:
        return PretrainedClip(config.pretrained_image_text)
    return zoo.load("imagebind").encoders
