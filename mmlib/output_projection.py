"""The decoder-side link: signal tokens and output projectors. L(LLM-Decoder).

Introduced in `05_signal_tokens_and_output_projection.ipynb`. The LLM asks for an image by
writing signal tokens, ``[IMG0]`` ... ``[IMG6]``, new rows of its vocabulary. An output
projector reads the LLM's last hidden states at those positions and turns them into the
conditioning the decoder's UNet cross-attends to, in place of the decoder's own text encoder:

    "question: a small red circle in the top left draw it. draw it. answer:" -> LLM -> [IMG0]..[IMG6]
    hidden states at [IMG0..6] (7, 128) -> output projector -> (32, 64) -> tiny SD's UNet -> picture

NExT-GPT's stage 2 trains this link with three terms (the course notes' L(LLM-Decoder)):

- `signal_nll`: the LLM's cross-entropy of producing the signal tokens when asked;
- `caption_alignment_loss`: the distance between the projector's output and the decoder's own
  text-encoder states of the caption (NExT-GPT's per-token Euclidean distance). The caption is
  the scene's canonical one (lesson 4's answer style), not the request's own wording: token
  states depend on word order and synonyms, which no projector can guess from the signal tokens,
  and which the decoder does not need;
- `generation_loss`: the conditional latent denoising loss of lesson 3 through the frozen UNet,
  with the projector's output as the condition.

Only the projectors and the signal tokens' rows (in the input embedding and in the LM head)
train. NExT-GPT's resize made the whole embedding and LM head trainable (its issues #40 and
#71); here `peft`'s TrainableTokens trains the new rows alone, and a test checks that every old
row is unchanged.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken

from mmlib import config as course_config
from mmlib import zoo
from mmlib.contrastive import History
from mmlib.data import World
from mmlib.data.world import check_choice
from mmlib.decoders import (CONFIGS, OUTPUTS, Decoder, captioned_attributes, decoders_to_link, load_decoder,
                            training_latents)
from mmlib.diffusion import denoising_loss, noise_scheduler
from mmlib.input_projection import MultimodalLLM, plot_sequence
from mmlib.llm import PROMPT, canonical_caption

# Signal tokens per output, and the words whose input-embedding rows they start from. The LLM
# learned (lesson 4) to answer in one order, "a small red hot circle in the top left moving up",
# copying each attribute from the context. Its state at a word is about to say the next one: at
# "a" the size, at "small" the color, at "red" the temperature, at "hot" the shape, at "the" and
# "top" the two halves of the position, at "moving" the motion. Signal tokens started as those
# seven words carry every attribute before any training: 7 per output, one per attribute to copy
# (position takes two). Started from the mean row, or from 4 words, color or position came out
# at chance for some seeds and training did not find them. (NExT-GPT uses 4, 8 and 24 tokens for
# decoders that read 77 states of width 768-1,024; the tiny decoders read 32 states of width 64.)
SIGNAL_INIT = ("a", "small", "red", "hot", "the", "top", "moving")
SIGNAL_TOKENS = {"image": len(SIGNAL_INIT), "audio": len(SIGNAL_INIT), "video": len(SIGNAL_INIT)}
PREFIX = {"image": "IMG", "audio": "AUD", "video": "VID"}
# How a user asks for each output, after the caption (the words are in the course tokenizer), said
# twice. The frozen LLM's state at "answer:" is mostly about the scene it is about to restate; only
# the LM-head rows of the signal tokens can learn to read the request from it. With requests said
# once, the LLM asked for the right output for 0.88 of image and 0.80 of video test requests; said
# twice, for 0.96-1.00 (seed 0). Lesson 6's LoRA lets the LLM itself learn to listen.
REQUESTS = {
    "image": ("draw it. draw it.", "paint it. paint it."),
    "audio": ("play the sound of it. play it.", "make a sound of it. play it."),
    "video": ("make a clip of it. film it.", "show me a clip of it. film it."),
}
TERMS = ("nll", "alignment", "generation")  # the three parts of L(LLM-Decoder)


def signal_names(modality: str, count: int) -> list[str]:
    """The signal tokens of an output, e.g. ``["[IMG0]", "[IMG1]", "[IMG2]"]`` for 3."""
    check_choice("output modality", modality, list(OUTPUTS))
    return [f"[{PREFIX[modality]}{i}]" for i in range(count)]


def add_signal_tokens(model, tokenizer, counts: dict[str, int], init_words=SIGNAL_INIT) -> dict[str, list[int]]:
    """Append signal tokens to the tokenizer and rows for them to the LLM; return their ids.

    A new input-embedding row starts as the row of a word of `init_words` (see `SIGNAL_INIT`);
    with no words, at the mean of the old rows. A new LM-head row starts at the mean of the old
    ones: a neutral token, neither favoured nor ruled out, until the NLL term teaches when to ask.
    """
    names = {m: signal_names(m, n) for m, n in counts.items()}
    new = [name for group in names.values() for name in group if name not in tokenizer.get_vocab()]
    if new:
        # lstrip: " [IMG0]" is one token, so an answer's signal tokens tokenize the same anywhere
        tokenizer.add_tokens([AddedToken(name, lstrip=True, special=True) for name in new], special_tokens=True)
        old = model.get_input_embeddings().num_embeddings
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        with torch.no_grad():
            head[old:] = head[:old].mean(dim=0)
            embed[old:] = embed[:old].mean(dim=0)
            for group in names.values():
                for j, name in enumerate(group):
                    row = tokenizer.convert_tokens_to_ids(name)
                    if row >= old and init_words:
                        word = tokenizer(" " + init_words[j % len(init_words)], add_special_tokens=False)["input_ids"][0]
                        embed[row] = embed[word]
    return {m: tokenizer.convert_tokens_to_ids(group) for m, group in names.items()}


def train_only_rows(model, token_ids: list[int]):
    """Wrap the LLM with peft's TrainableTokens: only these rows of embedding and LM head can learn."""
    from peft import TrainableTokensConfig, get_peft_model

    config = TrainableTokensConfig(token_indices=sorted(token_ids), target_modules=["embed_tokens", "lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers API renamed in v5
        return get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------
# The output projector
# ---------------------------------------------------------------------------------------------


@dataclass
class OutputProjectorConfig:
    """The output projector (NExT-GPT: a transformer with learned queries; "mlp": the baseline)."""

    kind: str = "transformer"  # "transformer" (learned queries over the signal states) or "mlp"
    width: int = 128  # model width inside the projector (NExT-GPT: 512)
    heads: int = 4
    encoder_layers: int = 1  # self-attention over the signal states (NExT-GPT: 4)
    decoder_layers: int = 2  # queries attend to them (NExT-GPT: 4)
    feedforward: int = 256  # (NExT-GPT: 2048)


PROJECTOR_KINDS = ("transformer", "mlp")


class OutputProjector(nn.Module):
    """(B, signal tokens, llm_dim) -> (B, out_tokens, out_dim): what the decoder's UNet attends to."""

    def __init__(self, llm_dim: int, signal_tokens: int, out_tokens: int, out_dim: int,
                 config: OutputProjectorConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or OutputProjectorConfig()
        check_choice("output projector kind", config.kind, PROJECTOR_KINDS)
        self.llm_dim, self.signal_tokens, self.out_tokens, self.out_dim = llm_dim, signal_tokens, out_tokens, out_dim
        if config.kind == "transformer":
            self.inp = nn.Linear(llm_dim, config.width)
            with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... norm_first": harmless
                warnings.simplefilter("ignore", UserWarning)
                self.transformer = nn.Transformer(
                    d_model=config.width, nhead=config.heads, num_encoder_layers=config.encoder_layers,
                    num_decoder_layers=config.decoder_layers, dim_feedforward=config.feedforward, dropout=0.0,
                    batch_first=True, norm_first=True)
            self.queries = nn.Parameter(torch.randn(out_tokens, config.width))  # one per output token, all distinct
            self.out = nn.Linear(config.width, out_dim)
        else:
            self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(signal_tokens * llm_dim, config.feedforward), nn.GELU(),
                                     nn.Linear(config.feedforward, out_tokens * out_dim))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if states.ndim != 3 or tuple(states.shape[1:]) != (self.signal_tokens, self.llm_dim):
            raise ValueError(f"the output projector reads the LLM's states at the signal tokens, "
                             f"(batch, {self.signal_tokens}, {self.llm_dim}); got {tuple(states.shape)}")
        if self.config.kind == "mlp":
            return self.mlp(states).view(len(states), self.out_tokens, self.out_dim)  # (B, T*D) -> (B, T, D)
        memory = self.inp(states)  # (B, n, width)
        queries = self.queries.expand(len(states), -1, -1)  # (B, out_tokens, width)
        return self.out(self.transformer(memory, queries))  # (B, out_tokens, out_dim)


def projector_for(decoder_shape: tuple[int, int], llm_dim: int, signal_tokens: int,
                  config: OutputProjectorConfig | None = None) -> OutputProjector:
    """An output projector sized from a decoder's conditioning shape (tokens, dim) and the LLM."""
    tokens, dim = decoder_shape
    return OutputProjector(llm_dim, signal_tokens, tokens, dim, config)


# ---------------------------------------------------------------------------------------------
# The three terms of L(LLM-Decoder)
# ---------------------------------------------------------------------------------------------


def signal_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the scored tokens (labels other than -100): position t predicts t + 1."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=-100)


def caption_alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per-token Euclidean distance between projector output and the decoder's text states.

    NExT-GPT's choice (its ``l2_loss``): ``||u_t - v_t||_2`` averaged over tokens and batch. Unlike
    MSE, every token's gradient has unit length however close it already is, so the many nearly
    matched padding states do not drown the few tokens that carry the attributes.
    """
    if projected.shape != target.shape:
        raise ValueError(f"projector output {tuple(projected.shape)} and text states {tuple(target.shape)} differ")
    return (projected - target).norm(dim=-1).mean()


def generation_loss(decoder: Decoder, scheduler, conditioning: torch.Tensor, latents: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Lesson 3's conditional latent denoising loss through the decoder's frozen UNet."""
    return denoising_loss(decoder.pipeline.unet, scheduler, latents, conditioning, generator)


# ---------------------------------------------------------------------------------------------
# The model: stage 1's LLM, signal tokens, projectors and decoders
# ---------------------------------------------------------------------------------------------


def request(modality: str, caption: str, variant: int = 0) -> str:
    """An instruction asking for `modality` of a scene, e.g. ``"question: a red circle draw it. draw it. answer:"``.

    The format of the LLM's text pretraining (a caption, then a request), which the frozen LLM
    reads as it learned to: its state at "answer:" holds the scene it is about to restate.
    """
    check_choice("output modality", modality, list(REQUESTS))
    templates = REQUESTS[modality]
    return PROMPT.format(context=caption, request=templates[variant % len(templates)])


class SignalLLM(nn.Module):
    """Stage 1's model plus signal tokens, one output projector per output, and the decoders."""

    def __init__(self, base: MultimodalLLM, signals: dict[str, list[int]], projectors: dict[str, OutputProjector],
                 decoders: dict[str, Decoder]) -> None:
        super().__init__()
        self.base, self.signals, self.projectors = base, signals, nn.ModuleDict(projectors)
        self.decoders = decoders  # frozen; not submodules, so their weights stay out of this model's state
        for decoder in decoders.values():
            decoder.freeze()

    def decoder_modules(self) -> list[nn.Module]:
        """The decoders' torch modules (UNet, VAE, text encoder), to move with the model: not submodules."""
        modules = []
        for decoder in self.decoders.values():
            parts = decoder.pipeline.components.values() if hasattr(decoder, "pipeline") else [decoder.text_encoder]
            modules += [part for part in parts if isinstance(part, nn.Module)]
        return modules

    @property
    def outputs(self) -> list[str]:
        """The modalities this model can generate: those with signal tokens, a projector and a decoder."""
        return [m for m in self.projectors if m in self.decoders]

    def check_output(self, modality: str) -> None:
        if modality not in self.outputs:
            raise ValueError(f"this model has no decoder for {modality!r} outputs; it can generate: "
                             f"{', '.join(self.outputs) or 'text only'}")

    def answer(self, modality: str, description: str = "") -> str:
        """The answer that asks the decoder of `modality`: a description, then its signal tokens in order."""
        signals = "".join(self.base.tokenizer.convert_ids_to_tokens(self.signals[modality]))
        return f"{description} {signals}".strip()

    def signal_states(self, hidden: torch.Tensor, labels: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, n, H) last-layer states at the positions whose input is a signal token of `modality`."""
        ids = torch.tensor(self.signals[modality], device=labels.device)
        # labels hold each position's own token id on the answer (see MultimodalLLM.prepare)
        where = torch.isin(labels, ids)  # (B, T)
        counts = where.sum(1)
        if not bool((counts == len(ids)).all()):
            raise ValueError(f"every sequence must hold the {len(ids)} signal tokens of {modality}; found {counts.tolist()}")
        return hidden[where].view(len(hidden), len(ids), -1)  # (B*n, H) -> (B, n, H)

    def read(self, prompts: list[str], inputs, answers: list[str]):
        """The LLM over prompts and teacher-forced answers: (prepared batch, output with hidden states)."""
        batch = self.base.prepare(prompts, inputs, answers)
        out = self.base.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"], output_hidden_states=True)
        return batch, out

    def losses(self, modality: str, captions: list[str], targets: list[str] | torch.Tensor | None,
               latents: torch.Tensor | None, scheduler=None, terms=TERMS, variant: int = 0,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The three terms of L(LLM-Decoder) for instructions asking for `modality` of `captions`.

        `targets` are the captions whose text-encoder states the projector is aligned to (the
        scenes' canonical captions), or those states already encoded (`alignment_targets`; None
        without the alignment term);
        `latents` the scenes' VAE latents for the generation term (the first ``len(latents)``
        instructions).
        """
        self.check_output(modality)
        prompts = [request(modality, caption, variant + i) for i, caption in enumerate(captions)]
        answers = [self.answer(modality)] * len(prompts)  # the signal tokens straight after "answer:"
        batch, out = self.read(prompts, [[] for _ in prompts], answers)
        parts = {}
        if "nll" in terms:
            # The signal tokens only, not the </s> after them: its LM-head row is frozen, so the
            # state at the last signal token would have to turn into "stop", losing what it carries.
            signal_only = batch["labels"].masked_fill(batch["labels"] == self.base.tokenizer.eos_token_id, -100)
            parts["nll"] = signal_nll(out.logits, signal_only)
        if "alignment" in terms or "generation" in terms:
            projected = self.projectors[modality](self.signal_states(out.hidden_states[-1], batch["labels"], modality))
            decoder = self.decoders[modality]
            if "alignment" in terms:
                # (B, tokens, dim); AudioLDM: one (B, dim) vector
                text_states = targets if isinstance(targets, torch.Tensor) else decoder.prompt_embeds(targets)
                parts["alignment"] = caption_alignment_loss(projected, text_states.view(projected.shape))
            if "generation" in terms and latents is not None:
                parts["generation"] = generation_loss(decoder, scheduler, projected[: len(latents)], latents, generator)
        return parts

    @torch.no_grad()
    def project(self, modality: str, prompts: list[str], descriptions: list[str] | None = None,
                inputs=None) -> torch.Tensor:
        """Decoder conditioning for prompts answered with a description and `modality`'s signal tokens.

        The answers are teacher-forced: the states at the signal tokens go through the projector.
        """
        self.check_output(modality)
        inputs = inputs or [[] for _ in prompts]
        answers = [self.answer(modality, text) for text in (descriptions or [""] * len(prompts))]
        batch, out = self.read(prompts, inputs, answers)
        return self.projectors[modality](self.signal_states(out.hidden_states[-1], batch["labels"], modality))

    @torch.no_grad()
    def write(self, prompts: list[str], inputs=None, max_new_tokens: int = 24) -> list[tuple[str, str | None]]:
        """Let the LLM answer freely: (its text up to the first signal token, the output it asked for or None)."""
        inputs = inputs or [[] for _ in prompts]
        tok = self.base.tokenizer
        batch = self.base.prepare(prompts, inputs, padding_side="left")
        for i, mask in enumerate(batch["attention_mask"]):
            self.base.check_length(i, int(mask.sum()), max_new_tokens)
        ids = self.base.llm.generate(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                                     max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
        first = {ids[0]: m for m, ids in self.signals.items()}
        written = []
        for row in ids.tolist():
            asked = next((first[t] for t in row if t in first), None)
            cut = row.index(self.signals[asked][0]) if asked else len(row)
            written.append((tok.decode(row[:cut], skip_special_tokens=True).strip(), asked))
        return written

    def asks(self, prompts: list[str], inputs=None, max_new_tokens: int = 8) -> list[str | None]:
        """Which output the LLM asks for after each prompt (None: a text-only answer)."""
        return [asked for _, asked in self.write(prompts, inputs, max_new_tokens)]

    @torch.no_grad()
    def respond(self, prompts: list[str], inputs=None, max_new_tokens: int = 24, **decoder_options) -> list[dict]:
        """Answer each prompt: ``{"text": ..., "image"/"audio"/"video": output}`` for the outputs it asked for.

        The LLM writes freely; where it writes the first signal token of an output, the answer is
        cut there, all that output's signal tokens are put in (as NExT-GPT does) and the projector
        turns their states into the decoder's condition. An answer without signal tokens is text only.
        """
        inputs = inputs or [[] for _ in prompts]
        answers, wanted = [], {}
        for i, (text, asked) in enumerate(self.write(prompts, inputs, max_new_tokens)):
            answers.append({"text": text})
            if asked:
                wanted.setdefault(asked, []).append(i)
        for modality, rows in wanted.items():
            generated = self.generate_output(modality, [prompts[i] for i in rows], [answers[i]["text"] for i in rows],
                                             [inputs[i] for i in rows], **decoder_options)
            for row, output in zip(rows, generated):
                answers[row][modality] = output
        return answers

    @torch.no_grad()
    def generate_output(self, modality: str, prompts: list[str], texts: list[str], inputs=None, **decoder_options):
        """Decode the output of `modality` for prompts whose answers begin with `texts` and ask for it."""
        if modality not in self.decoders:
            raise ValueError(f"the LLM asked for {modality!r}, which has no decoder here; "
                             f"load one with load_decoder({modality!r})")
        conditioning = self.project(modality, prompts, texts, inputs)
        decoder = self.decoders[modality]
        if decoder.conditioning_shape[0] == 1:  # AudioLDM takes one pooled vector: (B, 1, dim) -> (B, dim)
            conditioning = conditioning[:, 0]
        return decoder(prompt_embeds=conditioning, **decoder_options)


def plot_signal_sequence(model: SignalLLM, prompt: str, modality: str, ax=None):
    """Lesson 4's sequence figure for a request answered with signal tokens, marking where the projector reads."""
    import matplotlib.pyplot as plt

    answer = model.answer(modality)
    fig = plot_sequence(model.base, prompt, [], answer, ax)
    ax = fig.axes[0]
    tok = model.base.tokenizer
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    ids += tok(" " + answer, add_special_tokens=False)["input_ids"]
    reads = [x for x, t in enumerate(ids) if t in model.signals[modality]]
    for x in reads:  # the last-layer state at each signal token goes up into the projector
        ax.annotate("", xy=(x + 0.46, 1.35), xytext=(x + 0.46, 1.02), arrowprops={"arrowstyle": "->", "color": "#c03d3e"})
    ax.text(float(np.mean(reads)) + 0.46, 1.45, f"hidden states -> output projector -> {modality} decoder",
            ha="center", va="center", fontsize=8, color="#c03d3e")
    end = len(ids)  # the </s> after the answer: prepare labels it, but the NLL term does not score it
    for text in [t for t in ax.texts if t.get_position()[0] == end + 0.46]:
        text.remove()
    ax.add_patch(plt.Rectangle((end, 0.45), 0.92, 0.55, color="#d9d9d9"))
    ax.text(end + 0.46, 0.72, "</s>", ha="center", va="center", fontsize=7)
    ax.text(end + 0.46, 0.2, "not\nscored", ha="center", va="center", fontsize=6, color="gray")
    ax.set_ylim(0, 1.55)
    return fig


# ---------------------------------------------------------------------------------------------
# Stage 2
# ---------------------------------------------------------------------------------------------


@dataclass
class Stage2Config:
    """NExT-GPT's stage 2 at one scale (``configs/<scale>.yaml``, section ``stage2``)."""

    projector: OutputProjectorConfig = field(default_factory=OutputProjectorConfig)
    outputs: tuple = OUTPUTS  # the decoders to link; each step trains all of them
    signal_tokens: dict = field(default_factory=lambda: dict(SIGNAL_TOKENS))  # per output (NExT-GPT: 4, 8, 24)
    signal_init: tuple = SIGNAL_INIT  # words the signal tokens' input rows start from, cycled; () = the mean row
    conditioning: dict = field(default_factory=dict)  # full scale: each decoder's (tokens, dim), checked on load
    terms: tuple = TERMS  # which parts of L(LLM-Decoder) to train with
    steps: int = 900
    batch_size: int = 32  # instructions per output per step (NLL and alignment)
    generation_batch: dict = field(default_factory=lambda: {"image": 16, "audio": 16, "video": 4})  # UNet passes per step
    weights: dict = field(default_factory=lambda: {"nll": 1.0, "alignment": 1.0, "generation": 1.0})
    lr: float = 2e-3  # peak learning rate (one-cycle) of the projectors
    row_lr: float = 3e-3  # peak learning rate of the signal tokens' input-embedding rows
    head_lr: float = 0.1  # ... and of their LM-head rows: when to ask is a linear read-out that learns slowly
    training_scenes: int = 2048  # scenes whose latents are encoded once for the generation term


course_config.register_section("stage2", Stage2Config)


def check_conditioning(config: Stage2Config, modality: str, shape: tuple[int, int]) -> None:
    """Raise if the config's recorded conditioning shape for `modality` is not the decoder's."""
    recorded = config.conditioning.get(modality)
    if recorded is not None and tuple(recorded) != tuple(shape):
        raise ValueError(f"stage2.conditioning.{modality} is {tuple(recorded)}, but the {modality} decoder "
                         f"attends to {tuple(shape)} (tokens, dim): an output projector of that size would not fit it")


@course_config.register_check
def check_projector_sizes(scale_name: str) -> None:
    """Raise if ``stage2.conditioning`` gives an output projector a size its decoder cannot take."""
    from mmlib.decoders import conditioning_shape

    config = course_config.scale_config("stage2", Stage2Config, scale_name)
    for modality, recorded in config.conditioning.items():
        expected = conditioning_shape(modality, scale_name)
        if expected is not None and tuple(recorded) != tuple(expected):
            decoder = course_config.scale_config(f"{modality}_decoder", CONFIGS[modality], scale_name)
            source = decoder.pretrained or "lesson 1's text tower (clip.text: max_length, hidden_size)"
            raise ValueError(f"{course_config.source_name(scale_name)}:stage2.conditioning.{modality} is {list(recorded)}, but the "
                             f"{modality} decoder ({source}) attends to {list(expected)} (tokens, dim): "
                             f"set it to {list(expected)}")


def build_signal_llm(base: MultimodalLLM, decoders: dict[str, Decoder], config: Stage2Config | None = None) -> SignalLLM:
    """Give stage 1's model signal tokens (only their rows trainable) and one projector per decoder."""
    config = config or course_config.scale_config("stage2", Stage2Config)
    course_config.seed_everything()
    for modality in config.outputs:
        check_conditioning(config, modality, decoders[modality].conditioning_shape)
    signals = add_signal_tokens(base.llm, base.tokenizer, {m: config.signal_tokens[m] for m in config.outputs},
                                config.signal_init)
    base.llm = train_only_rows(base.llm, [i for ids in signals.values() for i in ids])
    base.projection.requires_grad_(False)
    base.encoders.requires_grad_(False)
    hidden = base.llm.get_base_model().config.hidden_size
    projectors = {m: projector_for(decoders[m].conditioning_shape, hidden, len(signals[m]), config.projector)
                  for m in config.outputs}
    return SignalLLM(base, signals, projectors, decoders)


def stage2_groups(model: SignalLLM, config: Stage2Config) -> list[dict]:
    """The optimizer's parameter groups of stage 2: projectors, signal rows of the embedding, of the LM head."""
    trainable = [(n, p) for n, p in model.base.llm.named_parameters() if p.requires_grad]
    head = [p for n, p in trainable if "lm_head" in n]  # peft's trainable rows of the LM head
    rows = [p for n, p in trainable if "lm_head" not in n]  # ... and of the input embedding
    return [{"params": list(model.projectors.parameters()), "lr": config.lr},
            {"params": rows, "lr": config.row_lr}, {"params": head, "lr": config.head_lr}]


def stage2_requests(world: World, batch, modality: str, step: int) -> tuple[list[str], list[str]]:
    """Captions to ask `modality` of, and the canonical captions the projector aligns to, for `batch` scenes."""
    return request_captions(world, batch, modality, step), target_captions(batch, modality)


def request_captions(world: World, batch, modality: str, step: int) -> list[str]:
    """The captions stage 2's requests for `modality` of `batch` scenes ask about, worded by `step`."""
    among = captioned_attributes(modality)
    # Half the requests describe what this output can show, half the whole scene: trained on
    # the first kind alone, the LM-head rows learn "a caption with a position asks for a
    # picture" and answer a sound request about a full caption with [IMG0].
    half = len(batch) // 2
    return (world.captions(batch[:half], variant=step, mention="all", among=among)[0]
            + world.captions(batch[half:], variant=step, mention="all")[0])


def target_captions(batch, modality: str) -> list[str]:
    """The canonical captions of what `modality`'s output of each scene shows: what stage 2 aligns to."""
    among = captioned_attributes(modality)
    return [canonical_caption(batch.describe(i), among) for i in range(len(batch))]


@torch.no_grad()
def alignment_targets(decoder: Decoder, scenes, modality: str, batch_size: int = 256) -> torch.Tensor:
    """The decoder's text states of every scene's `target_captions`, (N, tokens, dim) (AudioLDM: (N, dim)).

    The text encoder is frozen, so stage 2 encodes its training scenes once instead of at every
    step. Each row is the same, bit for bit, as when encoded in a step's batch (checked at one thread).
    Full scale: 2,048 scenes of SD's 77 x 768 states take 0.5 GB.
    """
    return torch.cat([decoder.prompt_embeds(target_captions(scenes[i : i + batch_size], modality))
                      for i in range(0, len(scenes), batch_size)])


def train_stage2(model: SignalLLM, config: Stage2Config | None = None, world: World | None = None) -> History:
    """Train the output projectors and the signal tokens' rows on the terms in `config.terms`."""
    config = config or course_config.scale_config("stage2", Stage2Config)
    world = world or World()
    for term in config.terms:
        check_choice("L(LLM-Decoder) term", term, list(TERMS))
    groups = stage2_groups(model, config)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = course_config.one_cycle(optimizer, config.steps, 0.05)
    generator = torch.Generator().manual_seed(course_config.seed())
    scenes = world.scenes(world.split("train", config.training_scenes))
    latents, schedulers = {}, {}
    if "generation" in config.terms:
        for modality in config.outputs:
            decoder = model.decoders[modality]
            latents[modality] = training_latents(modality, decoder.pipeline.vae, world, scenes)
            schedulers[modality] = noise_scheduler(decoder.config.unet.prediction_type)
    history = History()
    model.eval()  # frozen parts keep their inference behaviour; the projectors have no dropout
    # with a GPU, the steps run there, the decoders' frozen modules too; the model comes back on the CPU
    with course_config.on_training_device(model, *model.decoder_modules()) as device:
        # the frozen text encoders' states of every training scene, once: a step picks its rows
        aligned = ({m: alignment_targets(model.decoders[m], scenes, m) for m in config.outputs}
                   if "alignment" in config.terms else {})
        for step in course_config.training_steps(config.steps, "stage 2"):
            total = 0.0
            for modality in config.outputs:
                rows = torch.randint(len(scenes), (config.batch_size,), generator=generator)
                captions = request_captions(world, scenes[rows.numpy()], modality, step)
                targets = aligned[modality][rows.to(device)] if aligned else None  # only alignment reads them
                z = None
                if "generation" in config.terms:
                    k = config.generation_batch[modality]
                    mean, std = latents[modality]
                    z = mean[rows[:k]] + std[rows[:k]] * torch.randn(mean[rows[:k]].shape, generator=generator)
                    z = z.to(device)
                parts = model.losses(modality, captions, targets, z, schedulers.get(modality), config.terms, step,
                                     generator)
                for term, value in parts.items():
                    total = total + config.weights[term] * value
                    history.loss.setdefault(f"{modality} {term}", []).append(value.item())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            schedule.step()
    merge_signal_rows(model)
    return history


def merge_signal_rows(model: SignalLLM) -> None:
    """Fold peft's trained rows into the LLM's own embedding and LM head (a plain LlamaForCausalLM again)."""
    if hasattr(model.base.llm, "merge_and_unload"):
        model.base.llm = model.base.llm.merge_and_unload()


def save_stage2(model: SignalLLM, history: History, config: Stage2Config, folder: Path) -> None:
    """Write the projectors and the signal tokens' trained rows (safetensors), the config and the curves."""
    llm = model.base.llm
    ids = torch.tensor([i for m in config.outputs for i in model.signals[m]])
    state = {f"projectors.{k}": v.contiguous() for k, v in model.projectors.state_dict().items()}
    state["signal_rows.input"] = llm.get_input_embeddings().weight[ids].detach().contiguous()
    state["signal_rows.output"] = llm.get_output_embeddings().weight[ids].detach().contiguous()
    save_file(state, Path(folder) / "stage2.safetensors")
    record = {"config": asdict(config), "signals": model.signals, "history": asdict(history)}
    (Path(folder) / "stage2.json").write_text(json.dumps(record))


def load_stage2(folder: Path, base: MultimodalLLM | None = None,
                decoders: dict[str, Decoder] | None = None) -> tuple[SignalLLM, History]:
    """The stage-2 model from `folder`, over the zoo's stage-1 model and decoders (or those given)."""
    record = json.loads((Path(folder) / "stage2.json").read_text())
    config = course_config.make_config(Stage2Config, record["config"])
    base = base or zoo.load("stage1")[0]
    decoders = decoders or {m: load_decoder(m) for m in config.outputs}
    signals = add_signal_tokens(base.llm, base.tokenizer, {m: len(record["signals"][m]) for m in config.outputs})
    if signals != record["signals"]:
        raise ValueError(f"the signal tokens got ids {signals}, but {folder} was trained with {record['signals']}")
    state = load_file(Path(folder) / "stage2.safetensors")
    ids = torch.tensor([i for m in config.outputs for i in signals[m]])
    with torch.no_grad():
        base.llm.get_input_embeddings().weight[ids] = state.pop("signal_rows.input")
        base.llm.get_output_embeddings().weight[ids] = state.pop("signal_rows.output")
    hidden = base.llm.config.hidden_size
    projectors = {m: projector_for(decoders[m].conditioning_shape, hidden, len(signals[m]), config.projector)
                  for m in config.outputs}
    model = SignalLLM(base, signals, projectors, decoders)
    model.projectors.load_state_dict({k.removeprefix("projectors."): v for k, v in state.items()})
    model.requires_grad_(False)
    return model.eval(), History(**record["history"])


@zoo.entry("stage2", load=load_stage2, version=2, description="stage 1 + signal tokens + output projectors to the three decoders",
           lesson="05_signal_tokens_and_output_projection.ipynb", sections=("stage2",),
           needs=("stage1", "image-decoder", "audio-decoder", "video-decoder"))
def _train_zoo_stage2(folder: Path) -> None:
    config = course_config.scale_config("stage2", Stage2Config)
    # Without the denoising term only the decoders' text encoders take part, so at tiny scale stage 2
    # trains while the UNets still train (the saved projectors then load over the whole decoders).
    decoders = decoders_to_link(config.outputs, unets="generation" in config.terms)
    model = build_signal_llm(zoo.load("stage1")[0], decoders, config)
    history = train_stage2(model, config)
    save_stage2(model, history, config, folder)
