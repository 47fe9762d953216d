"""The LLM: a decoder-only transformer that predicts the next token. L(LLM).

Introduced in `04_llm_and_input_projection.ipynb`. At tiny scale it is a `transformers`
`LlamaForCausalLM` (the architecture of Vicuna, NExT-GPT's LLM) over the course tokenizer,
pretrained on the world's text with plain next-token cross-entropy:

    L(LLM) = - mean over positions t of log p(token_t | tokens_<t)

Its text is made of four kinds of line, all in one question/answer format that later lessons
reuse, so that what the LLM learns here is what lesson 4's soft tokens plug into:

- a caption:   "a small red circle in the top left"
- a paraphrase: "question: a tiny crimson disc at the top left describe this picture. answer: a
  small red circle in the top left" (the answer states exactly what the question's caption
  states: to describe is to copy attributes out of the context);
- a question:   "question: a red circle what color is it? answer: red";
- a dialogue:   a question, then a request for a description of the same scene.

Every answer is in one style (`canonical_caption`: fixed order, first synonyms), whatever words
the question used; so describing is copying each attribute out of the context into its slot.

Each modality has a noun ("picture", "sound", ...). A description of a "sound" states the
attributes of the context that a sound can carry (no position), and never one the context left
out: the LLM learns which attributes each kind of input carries, and not to make any up.

At full scale the same functions load Vicuna-7B v1.5 with ``from_pretrained``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mmlib import config as course_config
from mmlib import zoo
from mmlib.contrastive import History
from mmlib.data import ATTRIBUTES, REVEALS, World
from mmlib.data.captions import vocabulary
from mmlib.data.world import uniform
from mmlib.tokenizer import VOCAB_SIZE, placeholder_tokens

# How a prompt names each kind of input ("describe this sound"), and the prompt format.
NOUNS = {"image": "picture", "audio": "sound", "video": "clip", "depth": "depth map", "thermal": "heat map",
         "imu": "imu reading", "text": "scene"}
QUESTIONS = {"shape": "what shape is it?", "color": "what color is it?", "size": "what size is it?",
             "position": "where is it?", "motion": "how does it move?", "temperature": "how hot is it?"}
PROMPT = "question: {context} {request} answer:"  # the answer follows after one space


def describe_request(modality: str) -> str:
    """The instruction that asks for a caption of an input of `modality`, e.g. "describe this sound."."""
    return f"describe this {NOUNS[modality]}."


def answer_phrase(attribute: str, value: str) -> str:
    """The canonical answer to a question about `attribute`: its first phrase in the vocabulary."""
    return vocabulary()[attribute][value][0]


ANSWER_ORDER = ("size", "color", "temperature", "shape", "position", "motion")  # "a small red hot circle ..."


def canonical_caption(values: dict[str, str], among=tuple(ATTRIBUTES)) -> str:
    """The LLM's own way of describing: fixed order, first synonyms, exactly the attributes `among`.

    ``canonical_caption(scene, ("shape", "color"))`` is "a red circle". The questions the LLM
    reads come in every template and synonym; its answers all take this one form, as an
    assistant's replies have one style. One form makes each word's job fixed, which makes the
    answer easy to learn and to grade.
    """
    words = [answer_phrase(name, values[name]) for name in ANSWER_ORDER[:3] if name in among]
    words.append(answer_phrase("shape", values["shape"]) if "shape" in among else "object")
    words += [answer_phrase(name, values[name]) for name in ANSWER_ORDER[4:] if name in among]
    return " ".join(["an" if words[0][0] in "aeiou" else "a"] + words)


@dataclass
class LLMConfig:
    """The LLM and its text pretraining (``configs/<scale>.yaml``, section ``llm``)."""

    pretrained: str = ""  # full scale: a hub id or folder (lmsys/vicuna-7b-v1.5); "" trains a tiny Llama
    architecture: dict = field(default_factory=dict)  # LlamaConfig fields to build a model of that shape
    hidden_size: int = 128  # width of the residual stream: what the input projection maps into
    intermediate_size: int = 256  # MLP width (Llama uses ~2.7x the hidden size)
    num_layers: int = 2  # two layers suffice to copy attributes from context (one cannot: it needs a lookup)
    num_heads: int = 4
    max_positions: int = 128  # longest sequence (a dialogue is ~45 tokens)
    steps: int = 1200  # optimizer steps (about 75 s on one thread); most of copying from context is learned
    # by then, not all of it at every seed: configs/tiny.yaml asks for 1,800 and 8 heads (lesson 4 prints the weakest)
    batch_size: int = 32  # texts per step
    lr: float = 3e-3  # peak learning rate (one-cycle: warm up, then cosine down)
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05


course_config.register_section("llm", LLMConfig)


def llama_config(tokenizer: PreTrainedTokenizerFast | None, config: LLMConfig, extra_tokens: int = 0) -> LlamaConfig:
    """The `LlamaConfig` of the tiny LLM (or of `config.architecture`, e.g. Vicuna-7B's shape).

    `extra_tokens` adds rows (the signal tokens, counted before they exist). Without a tokenizer
    (a `meta`-device build of the tiny shape) the course tokenizer's `VOCAB_SIZE` stands in.
    """
    if config.architecture:
        llama = LlamaConfig(**config.architecture)
        llama.vocab_size += extra_tokens
        return llama
    specials = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                 pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(
        vocab_size=(VOCAB_SIZE if tokenizer is None else len(tokenizer)) + extra_tokens,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=False,  # as Llama 2 and Vicuna
        **specials,
    )


def build_llm(tokenizer: PreTrainedTokenizerFast, config: LLMConfig | None = None) -> LlamaForCausalLM:
    """A randomly initialised LLM over `tokenizer` (seeded from the course seed)."""
    config = config or course_config.scale_config("llm", LLMConfig)
    course_config.seed_everything()
    return LlamaForCausalLM(llama_config(tokenizer, config)).eval()


# ---------------------------------------------------------------------------------------------
# The world's text
# ---------------------------------------------------------------------------------------------


KINDS = {"caption": 0.15, "paraphrase": 0.45, "question": 0.2, "dialogue": 0.2}  # share of each kind of text


def text_corpus(world: World, index: np.ndarray, variant: int = 0) -> list[str]:
    """One pretraining text per scene index: a caption, paraphrase, question or dialogue.

    A pure function of (seed, index, variant). The kind (drawn with the odds in `KINDS`), the
    modality the request names, and the attribute a question asks about are drawn per text.
    The question's caption mentions all six attributes or a random subset; the answer states
    those the named modality carries, and nothing the caption left out.
    """
    index = np.asarray(index)
    scenes = world.scenes(index)
    u = uniform(world.seed, index * 7919 + variant, "llm-text", 4)  # (B, 4)
    kinds = np.searchsorted(np.cumsum(list(KINDS.values())), u[:, 0] * 0.999999)  # (B,) into KINDS
    modalities = list(NOUNS)
    picked = (u[:, 1] * len(modalities)).astype(int)  # (B,) into NOUNS
    texts = world.captions(scenes, variant=variant)[0]  # plain captions; the other kinds replace theirs
    full = world.captions(scenes, variant=2 * variant, mention="all")
    partial = world.captions(scenes, variant=2 * variant)
    for row in np.flatnonzero(kinds > 0):
        modality = modalities[picked[row]]
        context, mentioned = full[0][row], full[1][row]
        if u[row, 3] < 0.5:  # half the questions mention only some attributes
            context, mentioned = partial[0][row], partial[1][row]
        among = [name for name, said in zip(ATTRIBUTES, mentioned) if said and name in REVEALS[modality]]
        if not among:  # the caption says nothing this modality carries: ask about the whole scene
            modality, among = "text", [name for name, said in zip(ATTRIBUTES, mentioned) if said]
        values = scenes.describe(row)
        answer = canonical_caption(values, among)
        attribute = among[int(u[row, 2] * len(among))]
        describe = PROMPT.format(context=context, request=describe_request(modality)) + " " + answer
        question = f"question: {context} {QUESTIONS[attribute]} answer: {answer_phrase(attribute, values[attribute])}"
        kind = list(KINDS)[kinds[row]]
        if kind == "paraphrase":
            texts[row] = describe
        elif kind == "question":
            texts[row] = question
        else:  # a dialogue: a question, then a description of the same scene
            texts[row] = f"{question}. question: {describe_request(modality)} answer: {answer}"
    return texts


def lm_batch(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and labels (-100 on padding) for next-token training."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def train_llm(tokenizer: PreTrainedTokenizerFast, config: LLMConfig | None = None,
              world: World | None = None) -> tuple[LlamaForCausalLM, History]:
    """Pretrain the tiny LLM on the world's text with next-token cross-entropy, L(LLM)."""
    config = config or course_config.scale_config("llm", LLMConfig)
    world = world or World()
    model = build_llm(tokenizer, config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = course_config.one_cycle(optimizer, config.steps, config.warmup_fraction)
    history = History()
    size = config.batch_size
    with course_config.on_training_device(model) as device:
        for step in course_config.training_steps(config.steps, "LLM pretraining"):
            texts = text_corpus(world, world.split("train", size, start=step * size), variant=step)
            batch = {key: value.to(device) for key, value in lm_batch(tokenizer, texts).items()}
            loss = model(**batch).loss  # transformers shifts the labels by one
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            history.loss.setdefault("L(LLM)", []).append(loss.item())
    return model.eval(), history


@torch.no_grad()
def complete(model, tokenizer: PreTrainedTokenizerFast, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy completions of text prompts (the prompt itself is not repeated)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation appends on the right
    try:
        batch = tokenizer(prompts, padding=True, return_tensors="pt")
        ids = batch["input_ids"][:, :-1]  # drop the </s> the tokenizer appends: the text goes on
        mask = batch["attention_mask"][:, :-1]
    finally:
        tokenizer.padding_side = side
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return [text.strip() for text in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]


# ---------------------------------------------------------------------------------------------
# Saving, loading, the zoo and full scale
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainedLLM:
    """A pretrained LLM, its tokenizer and its pretraining curve."""

    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    history: History = field(default_factory=History)

    def save(self, folder: Path) -> None:
        with zoo.quiet_loading():  # no "Writing model shards" bar for a 2 MB model
            self.model.save_pretrained(folder)  # safetensors
        self.tokenizer.save_pretrained(folder)
        (Path(folder) / "history.json").write_text(json.dumps(asdict(self.history)))

    @classmethod
    def load(cls, folder: Path) -> "TrainedLLM":
        history = History(**json.loads((Path(folder) / "history.json").read_text()))
        with zoo.quiet_loading():
            model = LlamaForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
        return cls(model, PreTrainedTokenizerFast.from_pretrained(folder), history)


@zoo.entry("llm", load=TrainedLLM.load, description="a tiny Llama pretrained on the world's text",
           lesson="04_llm_and_input_projection.ipynb", sections=("llm",), needs=("tokenizer",))
def _train_zoo_llm(folder: Path) -> None:
    config = course_config.scale_config("llm", LLMConfig)
    tokenizer = zoo.load("tokenizer")
    tokenizer.model_max_length = config.max_positions  # the LLM reads dialogues, longer than one caption
    model, history = train_llm(tokenizer, config)
    TrainedLLM(model, tokenizer, history).save(folder)


def add_placeholders(model, tokenizer) -> None:
    """Give a pretrained tokenizer the course's placeholder tokens (and a pad token), growing the model.

    Vicuna's tokenizer has no ``<image>``; the new rows of the embedding matrix are never read, as
    the input projection's vectors replace them, so their initial values do not matter.
    """
    missing = [token for token in placeholder_tokens() if token.content not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)  # lstrip, as in the course tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows never read: plain init


def load_llm(config: LLMConfig | None = None) -> TrainedLLM:
    """The scale's LLM: the zoo's tiny Llama, or `config.pretrained` (e.g. Vicuna-7B v1.5) at full scale."""
    config = config or course_config.scale_config("llm", LLMConfig)
    if not config.pretrained:
        return zoo.load("llm")
    tokenizer = AutoTokenizer.from_pretrained(config.pretrained)
    model = course_config.from_pretrained_safely(AutoModelForCausalLM.from_pretrained, config.pretrained, dtype="auto").eval()
    add_placeholders(model, tokenizer)
    return TrainedLLM(model, tokenizer)
