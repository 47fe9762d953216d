"""The encoder-side link: input projection and soft tokens. L(Encoder-LLM).

Introduced in `04_llm_and_input_projection.ipynb`. The frozen encoder turns an input of any
modality into one vector of the shared space; the input projection turns that vector into `k`
vectors of the LLM's input-embedding space ("soft tokens"); the prompt marks where they go with a
placeholder token (``<image>``, ``<audio>``, ...), and `MultimodalLLM.prepare` splices them in
through ``inputs_embeds``, as LLaVA's ``prepare_inputs_labels_for_multimodal`` does:

    "question: <image> describe this picture. answer:" + " a red circle</s>"
    tokens   <s> question : [k projected vectors] describe this picture . answer : a red circle </s>
    labels   -100 on everything up to "answer:" and on the projected vectors; the answer's ids after

L(Encoder-LLM) is the LLM's cross-entropy on the answer tokens only. Stage 1 of NExT-GPT (and of
LLaVA) trains the input projection alone, with the encoder and the LLM frozen, on X-caption pairs.

Two projections: NExT-GPT's single linear layer and LLaVA-1.5's two-layer MLP. NExT-GPT has one
projection for every modality, since ImageBind puts them all in one space; so does this module.
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
from mmlib.config import make_config
from mmlib import zoo
from mmlib.contrastive import History
from mmlib.data import ATTRIBUTES, REVEALS, World
from mmlib.data.captions import parse_caption
from mmlib.data.world import check_choice
from mmlib.encoders import TOWER_CONFIGS
from mmlib.llm import PROMPT, TrainedLLM, canonical_caption, describe_request, load_llm
from mmlib.tokenizer import MODALITY_TOKENS

INPUTS = ("image", "audio", "video", "depth", "thermal", "imu")  # what the LLM can be shown
PROJECTIONS = ("linear", "mlp")


@dataclass
class InputProjectionConfig:
    """The input projection: one encoder vector -> `tokens` vectors of the LLM's embedding space."""

    kind: str = "mlp"  # "linear" (NExT-GPT: one nn.Linear) or "mlp" (LLaVA-1.5: Linear, GELU, Linear)
    tokens: int = 4  # soft tokens per input (NExT-GPT: 1; more tokens give the frozen LLM more to read)


class InputProjection(nn.Module):
    """(B, encoder_dim) -> (B, tokens, llm_dim)."""

    def __init__(self, encoder_dim: int, llm_dim: int, config: InputProjectionConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or InputProjectionConfig()
        check_choice("input projection kind", config.kind, PROJECTIONS)
        if config.tokens < 1:
            raise ValueError(f"an input projection makes at least 1 token per input, got tokens={config.tokens}")
        self.encoder_dim, self.llm_dim = encoder_dim, llm_dim
        out = config.tokens * llm_dim
        if config.kind == "linear":
            self.layers = nn.Linear(encoder_dim, out)
        else:
            self.layers = nn.Sequential(nn.Linear(encoder_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.encoder_dim:
            raise ValueError(f"the input projection takes encoder embeddings (batch, {self.encoder_dim}); "
                             f"got {tuple(x.shape)}")
        return self.layers(x).view(len(x), self.config.tokens, self.llm_dim)  # (B, k*H) -> (B, k, H)


def encoder_dim(encoders) -> int:
    """The width of an encoder set's shared space (a tiny `EncoderSet` or a pretrained CLIP)."""
    if hasattr(encoders, "model"):  # PretrainedClip / PretrainedClap: the checkpoint's projection_dim
        return encoders.model.config.projection_dim
    spec = next(iter(encoders.configs.values()))  # every tower of a set ends in the same space
    return make_config(TOWER_CONFIGS[spec["kind"]], spec.get("config", {})).embed_dim


def caption_prompt(modality: str) -> str:
    """The stage-1 prompt for one input: "question: <audio> describe this sound. answer:"."""
    return PROMPT.format(context=MODALITY_TOKENS[modality], request=describe_request(modality))


class MultimodalLLM(nn.Module):
    """Frozen encoders + input projection + LLM: prompts with placeholders in, text out."""

    def __init__(self, encoders, llm, tokenizer, projection: InputProjection) -> None:
        super().__init__()
        self.encoders, self.llm, self.tokenizer, self.projection = encoders, llm, tokenizer, projection
        self.placeholders = {tokenizer.convert_tokens_to_ids(token): modality
                             for modality, token in MODALITY_TOKENS.items()}  # token id -> modality

    @property
    def modalities(self) -> list[str]:
        """The input modalities this model can read: those with a placeholder and an encoder."""
        return [m for m in MODALITY_TOKENS if m in self.encoders.modalities]

    def encode(self, modality: str, batch) -> torch.Tensor:
        """Frozen encoder embeddings (B, D) of a batch of one modality."""
        if modality not in self.modalities:
            raise ValueError(f"this model cannot read {modality!r} inputs; its encoder reads: "
                             f"{', '.join(self.modalities)}")
        with torch.no_grad():
            return self.encoders.embed(modality, batch)

    @property
    def max_positions(self) -> int:
        """The longest sequence the LLM reads (its position embeddings)."""
        return self.llm.config.max_position_embeddings

    def positions(self, prompt: str) -> int:
        """How many positions `prompt` takes: ``<s>``, its tokens, and each placeholder's k projected vectors."""
        ids = self.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]  # a long one is measured, not warned of
        k = self.projection.config.tokens
        return 1 + len(ids) + (k - 1) * sum(t in self.placeholders for t in ids)

    def check_length(self, i: int, length: int, new_tokens: int = 0) -> None:
        """Refuse a sequence longer than the LLM's positions: past them its answers are not what it learned."""
        if length + new_tokens > self.max_positions:
            also = f" + {new_tokens} new tokens" if new_tokens else ""
            raise ValueError(f"prompt {i} takes {length} positions{also}, but the LLM reads at most {self.max_positions}: "
                             f"shorten it, or hold the conversation in AnyToAny, which keeps the latest turns that fit")

    def _check_inputs(self, i: int, ids: list[int], given: list[str]) -> None:
        wanted = [self.placeholders[t] for t in ids if t in self.placeholders]
        for modality in given:
            if modality not in self.modalities:
                raise ValueError(f"input of prompt {i} is {modality!r}, which the encoder lacks; "
                                 f"it reads: {', '.join(self.modalities)}")
        if wanted != given:
            names = ", ".join(MODALITY_TOKENS[m] for m in wanted) or "none"
            raise ValueError(f"prompt {i} has {len(wanted)} placeholder(s) ({names}) but {len(given)} input(s) "
                             f"were given ({', '.join(given) or 'none'}); give one input per placeholder, "
                             "of its modality, in the order they appear")

    def prepare(self, prompts: list[str], inputs: list[list[tuple[str, torch.Tensor]]],
                answers: list[str] | None = None, padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Splice projected inputs into the prompts' token embeddings; pad the batch.

        `inputs[i]` lists ``(modality, embedding)`` for each placeholder of `prompts[i]`, in order
        (an embedding is an encoder output of shape (D,)). With `answers`, each answer and
        ``</s>`` follow its prompt and are the only positions scored in ``labels``.
        Returns ``inputs_embeds`` (B, T, H), ``attention_mask`` and ``position_ids`` (B, T) and,
        with answers, ``labels`` (B, T). Padding goes on `padding_side` ("left" to generate).
        """
        check_choice("padding side", padding_side, ["left", "right"])
        if len(inputs) != len(prompts) or (answers is not None and len(answers) != len(prompts)):
            raise ValueError(f"got {len(prompts)} prompts, {len(inputs)} input lists"
                             + (f" and {len(answers)} answers" if answers is not None else "") + "; they must match")
        tok, table = self.tokenizer, self.llm.get_input_embeddings()
        device = table.weight.device
        ids = [[tok.bos_token_id] + row for row in tok(list(prompts), add_special_tokens=False)["input_ids"]]
        if answers is not None:  # one tokenizer call per batch, not per text (the same ids, a tenth of the time)
            answer_ids = [row + [tok.eos_token_id] for row in
                          tok([" " + answer.strip() for answer in answers], add_special_tokens=False)["input_ids"]]
        for i, row in enumerate(inputs):
            self._check_inputs(i, ids[i], [modality for modality, _ in row])
        flat = [vector for row in inputs for _, vector in row]
        if flat:  # one projection call for every input of the batch: (N, D) -> (N, k, H)
            projected = self.projection(torch.stack(flat).to(device, table.weight.dtype))
        sequences, label_rows, n = [], [], 0
        for i, prompt_ids in enumerate(ids):
            tokens = torch.tensor(prompt_ids, device=device)
            pieces, start = [], 0
            for slot in [j for j, t in enumerate(prompt_ids) if t in self.placeholders]:
                pieces += [table(tokens[start:slot]), projected[n]]  # text up to the placeholder, then k vectors
                n, start = n + 1, slot + 1
            pieces.append(table(tokens[start:]))
            answer = answer_ids[i] if answers is not None else []
            if answers is not None:
                pieces.append(table(torch.tensor(answer, device=device)))
            sequence = torch.cat(pieces)  # (T_i, H)
            self.check_length(i, len(sequence))
            sequences.append(sequence)
            label_rows.append([-100] * (len(sequence) - len(answer)) + answer)
        return self._pad(sequences, label_rows if answers is not None else None, padding_side)

    def _pad(self, sequences, label_rows, side: str) -> dict[str, torch.Tensor]:
        longest = max(len(s) for s in sequences)
        pad_vector = self.llm.get_input_embeddings().weight[self.tokenizer.pad_token_id]
        embeds, masks, labels = [], [], []
        for i, sequence in enumerate(sequences):
            gap = longest - len(sequence)
            filler = pad_vector.expand(gap, -1)
            mask = torch.tensor([1] * len(sequence) + [0] * gap)
            embeds.append(torch.cat([sequence, filler] if side == "right" else [filler, sequence]))
            masks.append(mask if side == "right" else mask.flip(0))
            if label_rows is not None:
                row = label_rows[i] + [-100] * gap if side == "right" else [-100] * gap + label_rows[i]
                labels.append(torch.tensor(row))
        mask = torch.stack(masks).to(pad_vector.device)
        batch = {"inputs_embeds": torch.stack(embeds), "attention_mask": mask,
                 "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}  # positions count real tokens only
        if label_rows is not None:
            batch["labels"] = torch.stack(labels).to(pad_vector.device)
        return batch

    def answer_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sequence mean cross-entropy on the scored (answer) tokens, (B,): L(Encoder-LLM)."""
        logits = self.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"]).logits
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]  # position t predicts token t + 1
        losses = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=-100, reduction="none")  # (B, T-1)
        scored = (labels != -100).sum(1).clamp(min=1)
        return losses.sum(1) / scored

    @torch.no_grad()
    def generate(self, prompts: list[str], inputs: list[list[tuple[str, torch.Tensor]]],
                 max_new_tokens: int = 24) -> list[str]:
        """Greedy answers to prompts with spliced inputs."""
        batch = self.prepare(prompts, inputs, padding_side="left")
        out = self.llm.generate(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                                max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def caption(self, modality: str, batch, max_new_tokens: int = 24) -> list[str]:
        """Captions of a batch of one modality (rendered data, e.g. ``world.render("audio", scenes)``)."""
        embeddings = self.encode(modality, torch.as_tensor(batch))
        return self.generate([caption_prompt(modality)] * len(embeddings), [[(modality, e)] for e in embeddings],
                             max_new_tokens)


def plot_sequence(model: MultimodalLLM, prompt: str, inputs: list[tuple[str, torch.Tensor]], answer: str, ax=None):
    """Draw what the LLM reads: one box per position (text, spliced input vectors, answer) and its label."""
    import matplotlib.pyplot as plt

    tok, k = model.tokenizer, model.projection.config.tokens
    names, kinds = [], []
    for t in [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]:
        if t in model.placeholders:
            names += [f"{model.placeholders[t]}\n{j + 1}/{k}" for j in range(k)]
            kinds += ["input"] * k
        else:
            names.append(tok.convert_ids_to_tokens(t).replace("\u0120", ""))
            kinds.append("prompt")
    answer_ids = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    names += [tok.convert_ids_to_tokens(t).replace("\u0120", "") for t in answer_ids]
    kinds += ["answer"] * len(answer_ids)
    labels = model.prepare([prompt], [inputs], [answer])["labels"][0].tolist()
    assert len(labels) == len(names), "plot_sequence and prepare disagree on the sequence"
    colors = {"prompt": "#d9d9d9", "input": "#f4a259", "answer": "#8cc084"}
    if ax is None:
        _, ax = plt.subplots(figsize=(0.62 * len(names), 1.7))
    for x, (name, kind, label) in enumerate(zip(names, kinds, labels)):
        ax.add_patch(plt.Rectangle((x, 0.45), 0.92, 0.55, color=colors[kind]))
        ax.text(x + 0.46, 0.72, name, ha="center", va="center", fontsize=7)
        ax.text(x + 0.46, 0.2, str(label), ha="center", va="center", fontsize=6.5,
                color="gray" if label == -100 else "black")
    ax.text(-0.2, 0.72, "input", ha="right", va="center", fontsize=8)
    ax.text(-0.2, 0.2, "label", ha="right", va="center", fontsize=8)
    ax.set(xlim=(-2.2, len(names)), ylim=(0, 1.05))
    ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, ["text token", "projected input vector", "answer (scored)"], loc="upper center",
              bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=7, frameon=False)
    return ax.figure


# ---------------------------------------------------------------------------------------------
# Stage 1: train the input projection on X-caption pairs
# ---------------------------------------------------------------------------------------------


@dataclass
class Stage1Config:
    """NExT-GPT's stage 1 at one scale (``configs/<scale>.yaml``, section ``stage1``)."""

    projection: InputProjectionConfig = field(default_factory=InputProjectionConfig)
    modalities: tuple = INPUTS  # every input modality; each batch mixes them
    steps: int = 400  # optimizer steps; every step draws fresh scenes
    batch_size: int = 48  # (input, caption) pairs per step
    lr: float = 3e-3  # peak learning rate (one-cycle)
    weight_decay: float = 0.0


course_config.register_section("stage1", Stage1Config)


def caption_batch(model: MultimodalLLM, world: World, modalities, scenes, variant: int):
    """Stage-1 pairs for `scenes`: modality (i + variant) % M for scene i, captioned with all it reveals.

    The captions are in the LLM's own answer style (`canonical_caption`), the style its text
    pretraining gave every description. Returns (prompts, inputs, answers, modality of each).
    """
    kinds = [modalities[(i + variant) % len(modalities)] for i in range(len(scenes))]
    prompts, inputs, answers = [None] * len(scenes), [None] * len(scenes), [None] * len(scenes)
    for modality in modalities:
        rows = [i for i, m in enumerate(kinds) if m == modality]
        if not rows:
            continue
        group = scenes[np.array(rows)]
        embeddings = model.encode(modality, torch.from_numpy(world.render(modality, group)))
        for j, (row, embedding) in enumerate(zip(rows, embeddings)):
            caption = canonical_caption(group.describe(j), REVEALS[modality])
            prompts[row], inputs[row], answers[row] = caption_prompt(modality), [(modality, embedding)], caption
    return prompts, inputs, answers, kinds


def caption_losses(model: MultimodalLLM, world: World, modalities, step: int, size: int,
                   share: slice = slice(None)) -> tuple[torch.Tensor, list[str]]:
    """Stage 1's loss of each of rows `share` of step `step`'s batch of `size` captioned inputs: (B,), modalities.

    The batch depends on (seed, step) alone, and a share keeps the modalities its rows have in the
    whole batch, so processes that each take a share (`mmlib.train`) see the one-process batch.
    """
    scenes = world.scenes(world.split("train", size, start=step * size))[share]
    # caption_batch gives scene i modality (i + variant) % M: offsetting the variant by the
    # share's start gives its rows the modalities they have in the whole batch
    prompts, inputs, answers, kinds = caption_batch(model, world, modalities, scenes, step + (share.start or 0))
    return model.answer_loss(model.prepare(prompts, inputs, answers)), kinds


def caption_loss(model: MultimodalLLM, world: World, modalities, step: int, size: int,
                 share: slice = slice(None)) -> torch.Tensor:
    """Stage 1's mean loss on rows `share` of step `step`'s batch (see `caption_losses`)."""
    return caption_losses(model, world, modalities, step, size, share)[0].mean()


def train_stage1(model: MultimodalLLM, config: Stage1Config | None = None, world: World | None = None) -> History:
    """Train the input projection alone (encoders and LLM frozen) on X-caption pairs."""
    config = config or course_config.scale_config("stage1", Stage1Config)
    world = world or World()
    model.requires_grad_(False)
    model.projection.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.projection.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = course_config.one_cycle(optimizer, config.steps, 0.05)
    history, size = History(), config.batch_size
    model.eval()  # nothing frozen should change its behaviour (dropout, batch norm) while the projection trains
    # with a GPU, the steps run there (encoders, LLM and projection); the model comes back on the CPU
    with course_config.on_training_device(model):
        for step in course_config.training_steps(config.steps, "stage 1"):
            losses, kinds = caption_losses(model, world, config.modalities, step, size)
            losses = losses.cpu()  # (B,)
            optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            optimizer.step()
            schedule.step()
            kinds = np.array(kinds)
            for modality in config.modalities:
                history.loss.setdefault(modality, []).append(losses[torch.from_numpy(kinds == modality)].mean().item())
    return history


def caption_accuracy(model: MultimodalLLM, world: World, scenes, modality: str,
                     batch_size: int = 100) -> tuple[dict[str, float], list[str]]:
    """How often the generated captions state each attribute `modality` reveals correctly.

    A caption is parsed back into attributes (`parse_caption`); an attribute it leaves out, or
    states twice with different values, counts as wrong. Returns (accuracy per attribute, captions).
    """
    captions = []
    for start in range(0, len(scenes), batch_size):
        part = scenes[start:start + batch_size]
        captions += model.caption(modality, torch.from_numpy(world.render(modality, part)))
    return attribute_accuracy(captions, scenes, REVEALS[modality]), captions


def attribute_accuracy(captions: list[str], scenes, names) -> dict[str, float]:
    """How often caption i states attribute `name` of scene i correctly, for each of `names`.

    Captions are parsed back into attributes (`parse_caption`); one that leaves an attribute out,
    or states it twice with different values, is wrong on it.
    """
    parsed = [parse_caption(text) for text in captions]
    return {name: float(np.mean([p.get(name) == ATTRIBUTES[name][v] for p, v in zip(parsed, scenes.attributes[name])]))
            for name in names}


# ---------------------------------------------------------------------------------------------
# Building, saving, the zoo and full scale
# ---------------------------------------------------------------------------------------------


def build_multimodal_llm(encoders, llm: TrainedLLM, config: InputProjectionConfig | None = None) -> MultimodalLLM:
    """Frozen `encoders` and `llm`, linked by a new input projection sized from both."""
    course_config.seed_everything()
    projection = InputProjection(encoder_dim(encoders), llm.model.config.hidden_size, config)
    model = MultimodalLLM(encoders, llm.model, llm.tokenizer, projection)
    model.encoders.requires_grad_(False)
    model.llm.requires_grad_(False)
    return model


def save_stage1(model: MultimodalLLM, history: History, folder: Path) -> None:
    """Write the input projection (safetensors), its config and the training curves."""
    state = {key: value.contiguous() for key, value in model.projection.state_dict().items()}
    save_file(state, Path(folder) / "input_projection.safetensors")
    record = {"projection": asdict(model.projection.config), "history": asdict(history)}
    (Path(folder) / "stage1.json").write_text(json.dumps(record))


def load_stage1(folder: Path, encoders=None, llm: TrainedLLM | None = None) -> tuple[MultimodalLLM, History]:
    """The stage-1 model from `folder` over the zoo's encoder and LLM (or those given)."""
    from mmlib.imagebind import load_imagebind

    record = json.loads((Path(folder) / "stage1.json").read_text())
    model = build_multimodal_llm(encoders or load_imagebind(), llm or load_llm(),
                                 InputProjectionConfig(**record["projection"]))
    model.projection.load_state_dict(load_file(Path(folder) / "input_projection.safetensors"))
    return model.eval(), History(**record["history"])


@zoo.entry("stage1", load=load_stage1, description="LLM + input projection trained on X-caption pairs",
           lesson="04_llm_and_input_projection.ipynb", sections=("stage1",), needs=("imagebind", "llm"))
def _train_zoo_stage1(folder: Path) -> None:
    config = course_config.scale_config("stage1", Stage1Config)
    model = build_multimodal_llm(zoo.load("imagebind").encoders, zoo.load("llm"), config.projection)
    save_stage1(model, train_stage1(model, config), folder)
