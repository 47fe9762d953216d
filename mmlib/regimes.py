"""All at once, or decompose and link? Three ways to train the any-to-any model, measured. Lesson 7.

Introduced in `07_any_to_any.ipynb`. The course notes leave open whether an any-to-any model
should be trained "all at once" (every part, one summed objective) or by "decompose and link"
(pretrained parts, frozen, with only the links trained), or "something in between". The course's
world grades every output, so the question can be settled by experiment:

- **(a) all at once** (`train_all_at_once`): the same parts as the zoo's model, every one of them
  randomly initialised and all trained together on the sum of the six terms,
  L(Overall) = L(Encoder) + L(LLM) + L(Decoder) + L(Encoder-LLM) + L(LLM-Decoder) + L(Encoder-Decoder),
  with each term the very function its lesson trains with;
- **(b) decompose and link**: lessons 1-6 as they are (the zoo's ``stage3``);
- **(c) in between**: the same, with the whole LLM unfrozen in stage 3 (the zoo's ``stage3-full``).

`training_cost` reads what each regime spent (optimizer steps, CPU seconds) from the zoo,
`link_report` measures any of them the same way, one figure per link, and `broken` puts a fault
into one part, to see which regime's figures point at it.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mmlib import config as course_config
from mmlib import zoo
from mmlib.autoencoder import AudioAutoencoderConfig, AutoencoderConfig, build_autoencoder, render_for_vae
from mmlib.clip import ClipConfig, caption_batches
from mmlib.contrastive import History, LogitScale, contrastive_loss
from mmlib.data import World
from mmlib.data.world import check_choice
from mmlib.decoders import CONFIGS, OUTPUTS, assemble, caption_sampler, captioned_attributes
from mmlib.diffusion import build_unet, denoising_loss, drop_conditions, inflate, noise_scheduler, prompt_states
from mmlib.encoders import build_encoders, tower_spec
from mmlib.imagebind import BOUND_MODALITIES, TOWER_KINDS, ImageBindConfig
from mmlib.input_projection import InputProjection, MultimodalLLM, Stage1Config, caption_loss, encoder_dim
from mmlib.instruction import make_dialogues, stage3_losses, training_examples
from mmlib.llm import LLMConfig, build_llm, lm_batch, text_corpus
from mmlib.output_projection import (SignalLLM, Stage2Config, add_signal_tokens, projector_for, request,
                                     stage2_requests)

# What each decoder owns: the video decoder shares the image VAE (and all three share the text tower).
OWN_PARTS = {"image": ("unet", "vae"), "audio": ("unet", "vae"), "video": ("unet",)}
# Each regime and the zoo entries that train it, in order: (b) and (c) stand on the pretrained parts
# of lessons 1-4 and train only links; (a) trains everything in one run.
REGIMES = {"(a) all at once": ("all-at-once",), "(b) decompose and link": ("stage1", "stage2", "stage3"),
           "(c) in between": ("stage1", "stage2", "stage3-full")}
PRETRAINED_PARTS = ("clip", "imagebind", "llm", "image-vae", "audio-vae", "image-decoder", "audio-decoder", "video-decoder")
TERMS = ("encoder", "llm", "decoder", "encoder-llm", "llm-decoder", "encoder-decoder")  # L(Overall)'s six


@dataclass
class AllAtOnceConfig:
    """Regime (a): everything from scratch, one optimizer, the six terms summed (section ``all_at_once``)."""

    steps: int = 250  # optimizer steps, each on all six terms: about the CPU seconds of stages 1-3 (see the lesson)
    lr: float = 3e-3  # peak learning rate of every part (one-cycle), the rate most parts train at alone
    weights: dict = field(default_factory=lambda: {t: 1.0 for t in TERMS})  # each term's weight in the sum
    encoder_batch: int = 64  # scenes per step for InfoNCE (image-text, and each bound modality to image)
    llm_batch: int = 32  # texts per step for next-token pretraining
    denoising_batch: dict = field(default_factory=lambda: {"image": 32, "audio": 32, "video": 4})  # VAEs too
    caption_batch: int = 24  # (input, caption) pairs per step: stage 1's term
    request_batch: int = 8  # instructions per output per step: stage 2's terms
    dialogue_batch: int = 12  # dialogues per step: stage 3's terms


course_config.register_section("all_at_once", AllAtOnceConfig)


# ---------------------------------------------------------------------------------------------
# The zoo's model, with every weight random
# ---------------------------------------------------------------------------------------------


@dataclass
class Untrained:
    """Regime (a)'s model and what trains beside it: the decoders' parts and the InfoNCE temperatures."""

    model: SignalLLM
    scales: dict[str, LogitScale]  # InfoNCE temperatures, one per pair
    schedulers: dict  # the decoders' training noise schedules

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every trained weight: the model's, the decoders' UNets and VAEs, the temperatures."""
        state = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for modality, decoder in self.model.decoders.items():
            for part in OWN_PARTS[modality]:
                state |= {f"{modality}.{part}.{k}": v for k, v in getattr(decoder.pipeline, part).state_dict().items()}
        return state | {f"scale.{name}": scale.log_scale.data for name, scale in self.scales.items()}

    def parameters(self) -> list[torch.nn.Parameter]:
        decoders = [p for m, d in self.model.decoders.items() for part in OWN_PARTS[m]
                    for p in getattr(d.pipeline, part).parameters()]
        return list(self.model.parameters()) + decoders + [s.log_scale for s in self.scales.values()]


def build_untrained(world: World | None = None) -> Untrained:
    """The any-to-any model of lessons 1-6 with the same shapes, every part randomly initialised."""
    world = world or World()
    course_config.seed_everything()
    clip = course_config.scale_config("clip", ClipConfig)
    bound = course_config.scale_config("imagebind", ImageBindConfig)
    specs = {"image": tower_spec("conv", clip.image), "text": tower_spec("text", clip.text),
             **{m: tower_spec(TOWER_KINDS[m], getattr(bound, m)) for m in BOUND_MODALITIES}}
    encoders = build_encoders(specs, zoo.load("tokenizer"))
    llm_config = course_config.scale_config("llm", LLMConfig)
    tokenizer = zoo.load("tokenizer")  # the LLM's own copy: it gains the signal tokens
    tokenizer.model_max_length = llm_config.max_positions
    llm = build_llm(tokenizer, llm_config)
    projection = InputProjection(encoder_dim(encoders), llm.config.hidden_size,
                                 course_config.scale_config("stage1", Stage1Config).projection)
    base = MultimodalLLM(encoders, llm, tokenizer, projection)
    text = encoders.towers["text"]
    vaes = {"image": build_autoencoder(course_config.scale_config("image_vae", AutoencoderConfig), world.config.image_size),
            "audio": build_autoencoder(course_config.scale_config("audio_vae", AudioAutoencoderConfig), world.config.image_size)}
    decoders = {}
    for modality in OUTPUTS:
        config = course_config.scale_config(f"{modality}_decoder", CONFIGS[modality])
        vae = vaes["audio" if modality == "audio" else "image"]
        size = world.config.image_size // 2 ** (len(vae.config.block_out_channels) - 1)  # latent side: 8
        unet = build_unet(config.unet, vae.config.latent_channels, size, text.config.hidden_size)
        if modality == "video":  # Zeroscope's shape: the image UNet inflated in time
            unet = inflate(unet, temporal_text=config.temporal_text)
        decoders[modality] = assemble(modality, vae, text.transformer, text.tokenizer, unet,
                                      noise_scheduler(config.unet.prediction_type), config, world.config)
    stage2 = course_config.scale_config("stage2", Stage2Config)
    signals = add_signal_tokens(llm, tokenizer, {m: stage2.signal_tokens[m] for m in OUTPUTS}, stage2.signal_init)
    projectors = {m: projector_for(decoders[m].conditioning_shape, llm.config.hidden_size, len(signals[m]),
                                   stage2.projector) for m in OUTPUTS}
    model = SignalLLM(base, signals, projectors, decoders)  # freezes the decoders: (a) trains them
    for decoder in decoders.values():
        for part in ("unet", "vae"):
            getattr(decoder.pipeline, part).requires_grad_(True)
    model.requires_grad_(True)
    scales = {f"{m}-image": LogitScale() for m in BOUND_MODALITIES} | {"image-text": LogitScale()}
    schedulers = {m: noise_scheduler(d.config.unet.prediction_type) for m, d in decoders.items()}
    return Untrained(model, scales, schedulers)


# ---------------------------------------------------------------------------------------------
# L(Overall): the six terms on one step's data
# ---------------------------------------------------------------------------------------------


def _latents(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's loss on a batch (reconstruction + KL, lesson 3) and its latents, detached and unit-scaled."""
    posterior = vae.encode(x).latent_dist
    loss = F.mse_loss(vae.decode(posterior.sample()).sample, x) + 1e-6 * posterior.kl().mean()
    z = posterior.mean.detach()
    return loss, z / z.std().clamp_min(1e-3)


def overall_losses(parts: Untrained, world: World, step: int, config: AllAtOnceConfig,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Each term of L(Overall) on fresh training scenes, computed by the function its lesson trains with."""
    model = parts.model
    base, encoders = model.base, model.base.encoders
    losses = {}

    # L(Encoder): lesson 1's image-text InfoNCE, and lesson 2's binding of every other input to images
    size = config.encoder_batch
    scenes = world.scenes(world.split("train", size, start=step * size))
    images, captions = caption_batches(world, "image", size, 0.5)(step)
    image = encoders.embed("image", images)
    terms = [contrastive_loss(image, encoders.embed("text", captions), parts.scales["image-text"]())]
    image = encoders.embed("image", torch.from_numpy(world.image(scenes)))
    terms += [contrastive_loss(encoders.embed(m, torch.from_numpy(world.render(m, scenes))), image,
                               parts.scales[f"{m}-image"]()) for m in BOUND_MODALITIES]
    losses["encoder"] = sum(terms) / len(terms)

    # L(LLM): lesson 4's next-token pretraining on the world's text
    size = config.llm_batch
    texts = text_corpus(world, world.split("train", size, start=step * size), variant=step)
    losses["llm"] = base.llm(**lm_batch(base.tokenizer, texts)).loss

    # L(Decoder): lesson 3's VAEs, and the conditional denoising loss of each UNet on their latents
    terms = []
    for modality in OUTPUTS:
        decoder = model.decoders[modality]
        count = config.denoising_batch[modality]
        picked = world.scenes(world.split("train", count, start=step * count))
        if modality == "video":
            clips = torch.from_numpy(world.video(picked))  # (B, F, 3, H, W)
            _, z = _latents(decoder.pipeline.vae, clips.flatten(0, 1) * 2 - 1)  # (B*F, C, h, w)
            z = z.unflatten(0, (count, -1)).transpose(1, 2)  # (B, C, F, h, w), as UNet3D reads clips
        else:
            vae_loss, z = _latents(decoder.pipeline.vae, render_for_vae(world, modality, picked))
            terms.append(vae_loss)
        # the decoder's own recipe: mostly full captions, some partial, a share dropped to ""
        unet = replace(decoder.config.unet, batch_size=count)
        prompts = caption_sampler(modality, world, picked, unet)(torch.arange(count), step)
        prompts = drop_conditions(prompts, unet.condition_dropout, generator)
        states = prompt_states(decoder.pipeline.text_encoder, decoder.pipeline.tokenizer, prompts)
        terms.append(denoising_loss(decoder.pipeline.unet, parts.schedulers[modality], z, states, generator))
    losses["decoder"] = sum(terms) / len(terms)

    # L(Encoder-LLM): stage 1's captions of inputs in every modality, through the input projection
    losses["encoder-llm"] = caption_loss(base, world, Stage1Config().modalities, step, config.caption_batch)

    # L(LLM-Decoder): stage 2's signal-token NLL and caption alignment, for every output
    terms = []
    for modality in OUTPUTS:
        size = config.request_batch
        captions, targets = stage2_requests(world, world.scenes(world.split("train", size, start=step * size)), modality, step)
        terms += list(model.losses(modality, captions, targets, None, terms=("nll", "alignment"), variant=step).values())
    losses["llm-decoder"] = sum(terms) / len(terms)

    # L(Encoder-Decoder): stage 3's dialogues, answer cross-entropy and alignment
    dialogues = make_dialogues(world, "train", config.dialogue_batch, start=step * config.dialogue_batch, variant=step)
    terms = list(stage3_losses(model, *training_examples(model, world, dialogues)).values())
    losses["encoder-decoder"] = sum(terms) / len(terms)
    return losses


def train_all_at_once(config: AllAtOnceConfig | None = None, world: World | None = None) -> tuple[Untrained, History]:
    """Regime (a): build every part at random and train them all together on L(Overall).

    Returns the trained parts (``.model`` is the any-to-any `SignalLLM`) and the curve of each term.
    """
    config = config or course_config.scale_config("all_at_once", AllAtOnceConfig)
    world = world or World()
    parts = build_untrained(world)
    optimizer = torch.optim.AdamW(parts.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = course_config.one_cycle(optimizer, config.steps, 0.05)
    generator = torch.Generator().manual_seed(course_config.seed())
    history, start = History(), time.perf_counter()
    parts.model.train()
    for step in course_config.training_steps(config.steps, "all at once"):
        losses = overall_losses(parts, world, step, config, generator)
        total = sum(config.weights[name] * value for name, value in losses.items())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        schedule.step()
        for name, value in losses.items():
            history.loss.setdefault(name, []).append(value.item())
    history.seconds = time.perf_counter() - start
    parts.model.eval()
    for modality in ("image", "audio"):  # unit-variance latents at sampling time, as each step saw them
        vae = parts.model.decoders[modality].pipeline.vae.eval()
        with torch.no_grad():
            std = vae.encode(render_for_vae(world, modality, world.scenes(world.split("val", 512)))).latent_dist.mean.std()
        vae.register_to_config(scaling_factor=1.0 / std.item())
    _settle(parts.model)
    return parts, history


def save_all_at_once(parts: Untrained, history: History, config: AllAtOnceConfig, folder: Path) -> None:
    """Every weight in one safetensors file; the config, the VAEs' scaling and the curves in JSON."""
    save_file({k: v.contiguous() for k, v in parts.state_dict().items()}, Path(folder) / "all_at_once.safetensors")
    scaling = {m: parts.model.decoders[m].pipeline.vae.config.scaling_factor for m in ("image", "audio")}
    record = {"config": asdict(config), "scaling": scaling, "history": asdict(history)}
    (Path(folder) / "all_at_once.json").write_text(json.dumps(record))


def load_all_at_once(folder: Path) -> tuple[SignalLLM, History]:
    """Regime (a)'s model from `folder`: the same build, then its weights."""
    record = json.loads((Path(folder) / "all_at_once.json").read_text())
    parts = build_untrained()
    state = load_file(Path(folder) / "all_at_once.safetensors")
    missing = set(parts.state_dict()) ^ set(state)
    if missing:
        raise ValueError(f"{folder} holds another model: {len(missing)} weights differ, e.g. {sorted(missing)[:3]}")
    parts.model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    for modality, decoder in parts.model.decoders.items():
        for part in OWN_PARTS[modality]:
            prefix = f"{modality}.{part}."
            getattr(decoder.pipeline, part).load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                                              if k.startswith(prefix)})
    for modality, factor in record["scaling"].items():
        parts.model.decoders[modality].pipeline.vae.register_to_config(scaling_factor=factor)
    _settle(parts.model)
    return parts.model.requires_grad_(False).eval(), History(**record["history"])


def _settle(model: SignalLLM) -> None:
    """Trained decoders frozen and in eval mode: the video UNet's temporal layers use dropout in training."""
    for modality, decoder in model.decoders.items():
        decoder.freeze()
        for part in OWN_PARTS[modality]:
            getattr(decoder.pipeline, part).eval()


@zoo.entry("all-at-once", load=load_all_at_once, lesson="07_any_to_any.ipynb", version=5,
           description="every part from scratch, trained together on L(Overall) for the links' budget",
           sections=("all_at_once", "clip", "imagebind", "llm", "stage1", "image_vae", "audio_vae", "image_decoder",
                     "audio_decoder", "video_decoder", "stage2"),
           needs=("tokenizer",), files=("dialogues/templates.yaml",))
def _train_zoo_all_at_once(folder: Path) -> None:
    config = course_config.scale_config("all_at_once", AllAtOnceConfig)
    parts, history = train_all_at_once(config)
    save_all_at_once(parts, history, config, folder)


def training_cost(entries) -> dict[str, float]:
    """Optimizer steps and training seconds of zoo entries (their histories and manifests), summed."""
    steps = seconds = 0
    for entry in entries:
        history = zoo.load(entry)[1] if entry in {e for es in REGIMES.values() for e in es} else None
        steps += history.steps if history is not None else 0
        seconds += json.loads((zoo.folder(entry) / zoo.MANIFEST).read_text())["train_seconds"]
    return {"steps": steps, "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# Measuring a regime, one link at a time
# ---------------------------------------------------------------------------------------------

LINKS = {  # probe -> (what it measures, the lesson whose figure it is)
    "retrieval": ("encoders alone: image <-> X recall@1, mean over the bound modalities", "02"),
    "decoding": ("decoders alone: judge accuracy of outputs made from captions", "03"),
    "captioning": ("encoders -> input projection -> LLM: caption attribute accuracy", "04"),
    "generation": ("a request through the LLM, its signal tokens given -> output projection -> decoders: judge accuracy", "05"),
    "dialogue": ("the whole model: held-out dialogue success", "06"),
}


@torch.no_grad()
def _judged(judge, modality: str, outputs, scenes) -> float:
    """Mean judge accuracy over the attributes the judge reads."""
    return float(np.mean(list(judge.grade(modality, outputs, scenes.attributes).values())))


def probe_prompts(world: World, scenes) -> dict[str, tuple[list[str], list[str]]]:
    """Per output: the scenes' captions of what it can show (decoding's prompts), and a request in words
    for each (generation's, answered with the output's signal tokens)."""
    prompts = {}
    for modality in OUTPUTS:
        captions = world.captions(scenes, mention="all", among=captioned_attributes(modality))[0]
        prompts[modality] = (captions, [request(modality, caption, i) for i, caption in enumerate(captions)])
    return prompts


@torch.no_grad()
def link_report(model: SignalLLM, judge, world: World | None = None, scenes: int = 60,
                dialogues: int = 60, links=tuple(LINKS)) -> dict[str, float]:
    """One figure per link of `model` (see `LINKS`; or only `links`), each probing its link with the others
    left out where possible.

    Retrieval reads the encoders alone; decoding gives the decoders the scenes' captions directly;
    captioning and generation go through one link each: an input in, or a request out, whose signal
    tokens are given (whether the LLM asks at the right moment is the dialogues' to test); dialogue
    success is lesson 6's, on held-out dialogues and test scenes.
    """
    from mmlib.imagebind import pairwise_recall
    from mmlib.input_projection import caption_accuracy
    from mmlib.instruction import run_dialogues, success_rate

    links = (links,) if isinstance(links, str) else tuple(links)
    for name in links:
        check_choice("link", name, list(LINKS))
    world = world or World()
    test = world.scenes(world.split("test", scenes))
    report = {}
    if "retrieval" in links:
        names = ("image",) + BOUND_MODALITIES
        recall = pairwise_recall(model.base.encoders, world, test, names)  # (M, M), row: query
        report["retrieval"] = float(np.mean([recall[0, 1:], recall[1:, 0]]))
    decoding, generation = [], []
    for modality, (captions, prompts) in probe_prompts(world, test).items():
        options = {"vocode": False} if modality == "audio" else {}  # the judge reads log-mels
        if "decoding" in links:
            decoding.append(_judged(judge, modality, model.decoders[modality](captions, **options), test))
        if "generation" in links:
            outputs = model.generate_output(modality, prompts, [""] * len(prompts), **options)  # signal tokens given
            generation.append(_judged(judge, modality, outputs, test))
    if decoding:
        report["decoding"] = float(np.mean(decoding))
    if generation:
        report["generation"] = float(np.mean(generation))
    if "captioning" in links:
        report["captioning"] = float(np.mean([np.mean(list(caption_accuracy(model.base, world, test, m)[0].values()))
                                              for m in Stage1Config().modalities]))
    if "dialogue" in links:
        report["dialogue"] = success_rate(run_dialogues(model, world, make_dialogues(world, "test", dialogues), judge))
    return {name: report[name] for name in LINKS if name in links}


# ---------------------------------------------------------------------------------------------
# A fault to find
# ---------------------------------------------------------------------------------------------

PARTS = {  # the parts a fault can be put into
    "encoders": lambda model: model.base.encoders,
    "input projection": lambda model: model.base.projection,
    "LLM": lambda model: model.base.llm,
    "output projection": lambda model: model.projectors,
}


@contextmanager
def broken(model: SignalLLM, part: str = "input projection", seed: int = 0):
    """Inside the block, `part` of `model` holds random weights of the same scale: a bad checkpoint, say.

    The weights are put back when the block ends, however it ends.
    """
    check_choice("part", part, list(PARTS))
    module = PARTS[part](model)
    saved = {name: value.clone() for name, value in module.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            scale = parameter.std() if parameter.numel() > 1 else parameter.abs()
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    try:
        yield model
    finally:
        module.load_state_dict(saved)
