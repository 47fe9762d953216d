"""Instruction tuning with LoRA on modality-switching dialogues. L(Encoder-Decoder).

Introduced in `06_lora_instruction_tuning.ipynb`. After stages 1 and 2 every link works on its
own: an encoder's input can be captioned, and a request said the way stage 2 said it reaches a
decoder. Nothing yet makes the whole model do what a user asks, in a conversation that switches
modality: "draw what makes this sound", "make it blue and play the sound of it", "what shape is
it? ... and how hot is it?". NExT-GPT's stage 3 (its MosIT data) tunes for that end to end:

    L(Encoder-Decoder) = cross-entropy on the answer tokens          (the text, and the signal tokens)
                       + alignment of the projected signal states    (lesson 5's terms, on every
                       [+ denoising loss through the frozen UNet]     output an answer asks for)

trained through LoRA adapters on the LLM's attention (only low-rank updates ``W + B A`` train,
`peft` adds them) plus both projections. The frozen LLM cannot learn it: its state where an
answer starts is about the scene, not about what the user asked for. Tuned on dialogues alone,
the model forgets part of how to read its inputs (at seed 1 a picture's position is read right
0.80 of the time after stage 3, 0.92 before); the "replay" term (`replay_loss`) rehearses stage
1's captions every step against that. The tiny zoo trains with it (configs/tiny.yaml); NExT-GPT's
recipe, the dataclass default, does not: see `Stage3Config.terms`.

- The dialogues come from the world and the templates in ``data/dialogues/templates.yaml``
  (`make_dialogues`): a template's placeholders are filled with the scene rendered in that
  modality, its edits (``{color*}``) change the scene the answer must show, and every turn
  records what its answer must state (`Turn.expect`). Templates under ``test`` are held out.
- Dialogue files are JSON Lines (`save_dialogues`, `load_dialogues`); a bad line is rejected
  with its number and the reason. Each dialogue records the world's seed it was made at, and a
  dialogue is refused by a world of another seed (`check_made_at`), whose scene would not match it.
- `run_dialogues` lets a model hold the dialogues turn by turn on its own answers, generates
  every output it asks for and grades them: a dialogue succeeds when every answer states the
  expected attributes (and no others) and the judge reads every output as asked.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from mmlib import config as course_config
from mmlib import zoo
from mmlib.contrastive import History
from mmlib.data import ATTRIBUTES, HELDOUT_PAIRS, REVEALS, World
from mmlib.data.captions import data_file, parse_caption, vocabulary
from mmlib.data.world import check_choice, uniform
from mmlib.decoders import OUTPUTS, captioned_attributes, decoders_to_link, training_latents
from mmlib.diffusion import noise_scheduler
from mmlib.input_projection import caption_loss
from mmlib.judge import JUDGED
from mmlib.llm import answer_phrase, canonical_caption
from mmlib.output_projection import (SignalLLM, caption_alignment_loss, generation_loss, load_stage2, merge_signal_rows,
                                     signal_nll)
from mmlib.tokenizer import MODALITY_TOKENS

PLACEHOLDER = re.compile(r"<(\w+)>")  # an input in what the user says: <audio>
OUTPUT_TAG = re.compile(r"\[(\w+)\]")  # an output in an answer: [image]
SLOT = re.compile(r"\{(\w+)(\*?)\}")  # {caption}, {describe}, {shape}, or an edit {color*}
SPLITS = ("train", "test")  # template splits; scenes come from the world's own splits
TERMS = ("answer", "alignment", "generation", "replay")  # what stage 3 may train with (see Stage3Config.terms)
TUNINGS = ("lora", "full", "frozen")  # what of the LLM trains: LoRA adapters, every weight, nothing


class DialogueError(ValueError):
    """A dialogue (or template) that cannot be used, with where it is and why."""


# ---------------------------------------------------------------------------------------------
# Dialogues
# ---------------------------------------------------------------------------------------------


@dataclass
class Turn:
    """One exchange: what the user says (with placeholders), the inputs, the answer and its check."""

    user: str  # e.g. "<audio> make it large and play the sound of it."
    inputs: list  # the modality of each placeholder in `user`, in order
    answer: str  # e.g. "[audio]" or "a large red circle moving up": text, then at most one output
    expect: dict  # attribute -> value the answer's text states, or its output must show
    values: dict  # all six attributes of the scene as it stands at this turn (edits made)

    @property
    def output(self) -> str | None:
        """The output this turn asks for, or None for a text answer."""
        tags = OUTPUT_TAG.findall(self.answer)
        return tags[0] if tags else None


@dataclass
class Dialogue:
    """A multi-turn dialogue about one scene of the world (its inputs are that scene rendered)."""

    template: str
    scene: int  # the scene's index in the world
    turns: list
    seed: int | None = None  # the world's seed: at another seed, scene `scene` shows other attributes


def load_templates(path: Path | None = None) -> dict[str, dict[str, list]]:
    """``{"train": {name: [[user, answer], ...]}, "test": {...}}`` from the templates file, checked."""
    if path is None:
        course_config.note_read("file", "dialogues/templates.yaml")
    path = Path(path or data_file("dialogues", "templates.yaml"))
    return copy.deepcopy(_read_templates(path, path.stat().st_mtime))


@functools.lru_cache(maxsize=4)
def _read_templates(path: Path, modified: float) -> dict:  # read once per version of the file
    templates = yaml.safe_load(path.read_text())
    if not isinstance(templates, dict) or set(templates) != set(SPLITS):
        raise DialogueError(f"{path}: the file must have exactly the sections {', '.join(SPLITS)}")
    for split, group in templates.items():
        for name, turns in group.items():
            where = f"{path}: template {split}.{name}"
            if not isinstance(turns, list) or not all(isinstance(t, list) and len(t) == 2 for t in turns):
                raise DialogueError(f"{where}: a template is a list of [user, answer] pairs")
            for user, answer in turns:
                _check_text(where, user, answer, OUTPUTS)
    overlap = set(templates["train"]) & set(templates["test"])
    if overlap:
        raise DialogueError(f"{path}: templates {sorted(overlap)} are both train and test")
    return templates


def _check_text(where: str, user: str, answer: str, outputs) -> None:
    """Placeholders name known inputs, slots known attributes, output tags decoders the model has."""
    for tag in PLACEHOLDER.findall(user):
        if tag not in MODALITY_TOKENS:
            raise DialogueError(f"{where}: unknown modality tag <{tag}>; inputs are "
                                + ", ".join(MODALITY_TOKENS.values()))
    for name, star in SLOT.findall(user) + SLOT.findall(answer):
        if name not in ("caption", "describe") and name not in ATTRIBUTES:
            raise DialogueError(f"{where}: unknown slot {{{name}{star}}}; slots are {{caption}}, {{describe}}, "
                                "an attribute such as {color}, or an edit such as {color*}")
    for tag in OUTPUT_TAG.findall(answer):
        if tag not in OUTPUTS:
            raise DialogueError(f"{where}: unknown output [{tag}]; outputs are "
                                + ", ".join(f"[{m}]" for m in OUTPUTS))
        if tag not in outputs:
            raise DialogueError(f"{where}: the answer asks for [{tag}], but the model has no {tag} decoder; "
                                f"it can generate: {', '.join(outputs) or 'text only'}")
    if len(OUTPUT_TAG.findall(answer)) > 1 or (OUTPUT_TAG.search(answer) and not answer.rstrip().endswith("]")):
        raise DialogueError(f"{where}: an answer asks for at most one output, at its end")


def _phrase(attribute: str, value: str, u: float) -> str:
    """One of the vocabulary's phrases for a value (the user speaks in any synonym)."""
    phrases = vocabulary()[attribute][value]
    return phrases[min(int(u * len(phrases)), len(phrases) - 1)]


def make_dialogues(world: World, split: str, n: int, templates: list[str] | None = None, start: int = 0,
                   variant: int = 0) -> list[Dialogue]:
    """`n` dialogues on the `split` scenes from `start`, cycling through `templates`.

    `templates` defaults to the templates of the same split (train scenes with train templates,
    test scenes with held-out ones). A pure function of (seed, split, start, variant): the
    captions' wording, the synonyms and the edits are drawn per dialogue.
    """
    check_choice("split", split, list(SPLITS))
    table = load_templates()
    every = {**table["train"], **table["test"]}
    names = templates or list(table[split])
    for name in names:
        check_choice("dialogue template", name, list(every))
    index = world.split(split, n, start)
    scenes = world.scenes(index)
    u = uniform(world.seed, index * 31 + variant, "dialogue", 16)  # (n, 16) draws per dialogue
    dialogues = []
    for i in range(n):
        name = names[(i + variant) % len(names)]
        values, known, turns, draw = scenes.describe(i), set(), [], iter(u[i])
        for user, answer in every[name]:
            inputs = PLACEHOLDER.findall(user)
            for modality in inputs:
                known |= set(REVEALS[modality])
            if "{caption}" in user:
                text, mentioned = world.captions(scenes[i:i + 1], variant=variant * 7 + i)
                user = user.replace("{caption}", text[0])
                known |= {a for a, said in zip(ATTRIBUTES, mentioned[0]) if said}
            for attribute in [a for a, star in SLOT.findall(user) if star]:  # an edit: a new value
                others = [v for v in ATTRIBUTES[attribute]
                          if v != values[attribute] and not _held_out_pair({**values, attribute: v})]
                values[attribute] = others[min(int(next(draw) * len(others)), len(others) - 1)]
                known.add(attribute)
                user = user.replace("{" + attribute + "*}", _phrase(attribute, values[attribute], next(draw)))
            expect = {}
            if "{describe}" in answer:
                among = [a for a in ATTRIBUTES if a in known]
                answer = answer.replace("{describe}", canonical_caption(values, among))
                expect.update({a: values[a] for a in among})
            output = (OUTPUT_TAG.findall(answer) or [None])[0]
            if output:  # the output shows what is known that it can show
                expect.update({a: values[a] for a in captioned_attributes(output) if a in known})
            for attribute in [a for a, star in SLOT.findall(answer) if a in ATTRIBUTES and not star]:
                if attribute not in known:
                    raise DialogueError(f"template {name}: the answer states {{{attribute}}}, which no input so far reveals")
                answer = answer.replace("{" + attribute + "}", answer_phrase(attribute, values[attribute]))
                expect[attribute] = values[attribute]
            turns.append(Turn(user, inputs, answer, expect, dict(values)))
        dialogues.append(Dialogue(name, int(index[i]), turns, world.seed))
    return dialogues


def _held_out_pair(values: dict[str, str]) -> bool:
    """Whether a scene's shape and color make one of the world's held-out pairs.

    Dialogues are made on train and test scenes, which never hold those pairs, and an edit must
    not make one: recoloring a triangle purple would put a pair the world keeps for lesson 4's
    compositional test into stage 3's training targets, and ask the decoders for it in evaluation.
    """
    return (values["shape"], values["color"]) in HELDOUT_PAIRS


def save_dialogues(dialogues: list[Dialogue], path: Path) -> None:
    """Write dialogues as JSON Lines, one dialogue per line."""
    with open(path, "w") as handle:
        for dialogue in dialogues:
            handle.write(json.dumps(asdict(dialogue)) + "\n")


def check_dialogue(record, where: str, outputs=OUTPUTS) -> Dialogue:
    """A dialogue from a parsed JSON record, or a DialogueError naming `where` and the reason."""
    if not isinstance(record, dict) or not {"template", "scene", "turns"} <= set(record):
        raise DialogueError(f"{where}: a dialogue is an object with template, scene and turns (and seed)")
    unknown = sorted(set(record) - {"template", "scene", "turns", "seed"})
    if unknown:
        raise DialogueError(f"{where}: unknown key(s) {unknown}; a dialogue has template, scene, turns and seed")
    if not isinstance(record["template"], str):
        raise DialogueError(f"{where}: template must be a string (the template's name), got {record['template']!r}")
    if not isinstance(record["scene"], int) or isinstance(record["scene"], bool) or record["scene"] < 0:
        raise DialogueError(f"{where}: scene must be a scene index (a non-negative integer), got {record['scene']!r}")
    if not isinstance(record["turns"], list) or not record["turns"]:
        raise DialogueError(f"{where}: turns must be a non-empty list")
    turns = []
    for k, turn in enumerate(record["turns"]):
        at = f"{where}, turn {k + 1}"
        if not isinstance(turn, dict) or set(turn) != {"user", "inputs", "answer", "expect", "values"}:
            raise DialogueError(f"{at}: a turn has exactly the keys user, inputs, answer, expect, values")
        kinds = {"user": (str, "a string"), "answer": (str, "a string"), "inputs": (list, "a list of modalities"),
                 "expect": (dict, "an object of attribute values"), "values": (dict, "an object of attribute values")}
        for key, (kind, what) in kinds.items():
            if not isinstance(turn[key], kind):
                raise DialogueError(f"{at}: {key} must be {what}, got {turn[key]!r}")
        if not all(isinstance(m, str) for m in turn["inputs"]):
            raise DialogueError(f"{at}: inputs must be a list of modality names (strings), got {turn['inputs']!r}")
        _check_text(at, turn["user"], turn["answer"], outputs)
        tags = PLACEHOLDER.findall(turn["user"])
        for modality in turn["inputs"]:
            if modality not in MODALITY_TOKENS:
                raise DialogueError(f"{at}: unknown input modality {modality!r}; inputs are {', '.join(MODALITY_TOKENS)}")
        if tags != list(turn["inputs"]):
            missing = [f"<{t}>" for t in tags[len(turn["inputs"]):]] if len(tags) > len(turn["inputs"]) else []
            reason = (f"placeholder {', '.join(missing)} has no input" if missing else
                      f"the placeholders {['<' + t + '>' for t in tags]} do not match the inputs {turn['inputs']}")
            raise DialogueError(f"{at}: {reason}; list one input modality per placeholder, in order")
        for key in ("expect", "values"):
            for attribute, value in turn[key].items():
                if attribute not in ATTRIBUTES or not isinstance(value, str) or value not in ATTRIBUTES[attribute]:
                    raise DialogueError(f"{at}: {key} has {attribute}={value!r}, which is not an attribute value of the world")
        if set(turn["values"]) != set(ATTRIBUTES):
            raise DialogueError(f"{at}: values must give all six attributes ({', '.join(ATTRIBUTES)})")
        turns.append(Turn(**turn))
    seed = record.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise DialogueError(f"{where}: seed must be the world's seed it was made at (a non-negative integer), got {seed!r}")
    return Dialogue(record["template"], record["scene"], turns, seed)


def check_made_at(dialogues: list[Dialogue], world: World) -> None:
    """Refuse dialogues made at another seed than `world`'s: their scene indices show other scenes there."""
    other = [d for d in dialogues if d.seed is not None and d.seed != world.seed]
    if other:
        seeds = sorted({d.seed for d in other})
        raise DialogueError(f"{len(other)} of {len(dialogues)} dialogues were made at seed {', '.join(map(str, seeds))}, but "
                            f"the world is seed {world.seed}: their scenes there show other attributes than their answers "
                            f"state. Use World(seed={seeds[0]}) (MMLIB_SEED={seeds[0]}), or make the dialogues at this seed.")


def load_dialogues(path: Path, outputs=OUTPUTS) -> list[Dialogue]:
    """Read and check a JSON Lines dialogue file against a model's `outputs` (e.g. ``model.outputs``).

    A bad line raises a DialogueError with the file, the line number and the reason.
    """
    dialogues = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DialogueError(f"{where}: not valid JSON ({error.msg})") from None
        dialogues.append(check_dialogue(record, where, outputs))
    return dialogues


# ---------------------------------------------------------------------------------------------
# Dialogues as LLM sequences
# ---------------------------------------------------------------------------------------------


def prompt_for(history: list[tuple[str, str]], user: str) -> str:
    """The text the LLM reads before its next answer: earlier turns, then the new question.

    ``prompt_for([("<audio> describe this sound.", "a red circle")], "now draw it.")`` is
    "question: <audio> describe this sound. answer: a red circle. question: now draw it. answer:",
    lesson 4's dialogue format.
    """
    earlier = "".join(f"question: {u} answer: {a}. " for u, a in history)
    return earlier + f"question: {user} answer:"  # PROMPT, with the whole turn as context and request


def with_signals(model: SignalLLM, answer: str) -> str:
    """An answer with its output tag replaced by the model's signal tokens."""
    output = (OUTPUT_TAG.findall(answer) or [None])[0]
    if output is None:
        return answer
    model.check_output(output)
    return model.answer(output, OUTPUT_TAG.sub("", answer).strip())


def _embed_inputs(model: SignalLLM, world: World, wanted: list[list[tuple[str, int]]]) -> list[list[tuple[str, torch.Tensor]]]:
    """Encoder embeddings for (modality, scene index) lists: each modality rendered and encoded once."""
    by_modality = {}
    for row in wanted:
        for modality, scene in row:
            by_modality.setdefault(modality, set()).add(scene)
    table = {}
    for modality, scenes in by_modality.items():
        scenes = sorted(scenes)
        embeddings = model.base.encode(modality, torch.from_numpy(world.render(modality, world.scenes(np.array(scenes)))))
        table.update({(modality, s): e for s, e in zip(scenes, embeddings)})
    return [[(m, table[(m, s)]) for m, s in row] for row in wanted]


def training_examples(model: SignalLLM, world: World, dialogues: list[Dialogue]):
    """Every turn of the dialogues as (prompts, inputs, answers with signal tokens, turns), gold history."""
    check_made_at(dialogues, world)
    prompts, wanted, answers, turns = [], [], [], []
    for dialogue in dialogues:
        history, seen = [], []
        for turn in dialogue.turns:
            seen = seen + [(m, dialogue.scene) for m in turn.inputs]
            prompts.append(prompt_for(history, turn.user))
            wanted.append(seen)
            answers.append(with_signals(model, turn.answer))
            turns.append(turn)
            history.append((turn.user, answers[-1]))
    return prompts, _embed_inputs(model, world, wanted), answers, turns


# ---------------------------------------------------------------------------------------------
# LoRA and stage 3
# ---------------------------------------------------------------------------------------------


@dataclass
class LoraSettings:
    """peft's LoraConfig fields the course sets (NExT-GPT: r=32, alpha=32, dropout 0.1 on q, k, v, o)."""

    r: int = 8  # rank of each update B A, of the tiny LLM's 128 dimensions
    alpha: int = 16  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapter's input; tiny data is fresh every step, so none is needed
    target_modules: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")  # attention: where the request is read
    signal_rows: bool = True  # also train the signal tokens' embedding and LM-head rows (peft's trainable tokens)


@dataclass
class Stage3Config:
    """NExT-GPT's stage 3 at one scale (``configs/<scale>.yaml``, section ``stage3``)."""

    tuning: str = "lora"  # lora | full | frozen: what of the LLM trains
    lora: LoraSettings = field(default_factory=LoraSettings)
    projections: bool = True  # also train the input projection and the output projectors (NExT-GPT does)
    # L(Encoder-Decoder)'s "answer" and "alignment"; + "generation": the denoising loss through the
    # frozen UNets; + "replay": stage 1's captions rehearsed (L(Encoder-LLM)). Replay keeps every
    # attribute of every input read as well as after stage 1 (>= 0.97 at seeds 0 and 1; without
    # it, down to 0.80 at seed 1). Alone it costs lesson 7's (imu, video) cell at seed 0 (0.78), so
    # the tiny zoo trains it with fill_unknown.
    terms: tuple = ("answer", "alignment")
    steps: int = 600
    batch_size: int = 24  # dialogues per step (one to two turns each)
    lr: float = 3e-3  # peak learning rate of the LLM's trainable weights (one-cycle)
    projection_lr: float = 1e-3  # ... and of the projections
    generation_batch: int = 4  # outputs per decoder per step that also get the denoising loss
    replay_batch: int = 12  # stage-1 (input, caption) pairs per step in the "replay" term
    # Alignment targets describe the whole scene, so where a turn's inputs never revealed an
    # attribute (a clip asked of an IMU reading: no shape, color, size or position) the projector
    # learns the average of its values, a condition unlike any caption the decoder knows. True:
    # those attributes get fixed values (UNKNOWN_FILL), a plain caption. Measured at tiny scale,
    # lesson 7's grid (imu, video) goes from 0.78-0.85 to >= 0.88 at seeds 0 and 1. The tiny zoo
    # trains with replay and fill_unknown together (configs/tiny.yaml); NExT-GPT's recipe, the
    # default here, has neither.
    fill_unknown: bool = False
    weights: dict = field(default_factory=lambda: {"answer": 1.0, "alignment": 1.0, "generation": 1.0, "replay": 1.0})


course_config.register_section("stage3", Stage3Config)


def add_lora(llm, settings: LoraSettings, signal_ids: list[int] = ()):
    """Wrap an LLM with peft LoRA adapters (and `signal_ids`' rows trainable); returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    rows = {"embed_tokens": sorted(signal_ids), "lm_head": sorted(signal_ids)} if signal_ids else None
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none", trainable_token_indices=rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(llm, config)


def prepare_stage3(model: SignalLLM, config: Stage3Config | None = None) -> SignalLLM:
    """Make the parts of `model` that stage 3 trains trainable (in place); everything else frozen."""
    config = config or course_config.scale_config("stage3", Stage3Config)
    check_choice("stage-3 tuning", config.tuning, list(TUNINGS))
    course_config.seed_everything()
    merge_signal_rows(model)  # a stage-2 model still wrapped in its trainable rows: a plain LLM first
    if config.tuning == "lora":
        rows = [i for ids in model.signals.values() for i in ids] if config.lora.signal_rows else []
        model.base.llm = add_lora(model.base.llm, config.lora, rows)
    mark_trainable(model, config)
    return model


def mark_trainable(model: SignalLLM, config: Stage3Config) -> None:
    """Set requires_grad on exactly what stage 3 trains: adapters (or the whole LLM) and the projections."""
    model.requires_grad_(False)
    for name, parameter in model.base.llm.named_parameters():
        if config.tuning == "full" or (config.tuning == "lora" and _is_adapter(name)):
            parameter.requires_grad_(True)
    if config.projections:
        model.base.projection.requires_grad_(True)
        model.projectors.requires_grad_(True)


def trainable_parameters(model: SignalLLM) -> dict[str, int]:
    """Trainable and total parameters of the LLM and of the projections."""
    named = list(model.base.llm.named_parameters())
    projections = list(model.base.projection.parameters()) + list(model.projectors.parameters())
    return {"llm trainable": sum(p.numel() for _, p in named if p.requires_grad),
            "llm total": sum(p.numel() for n, p in named if not _is_adapter(n)),  # the LLM's own weights
            "projections trainable": sum(p.numel() for p in projections if p.requires_grad)}


def _is_adapter(name: str) -> bool:
    """A parameter peft added: a LoRA matrix or a trainable-token row delta."""
    return "lora_" in name or "trainable_tokens" in name


def stage3_losses(model: SignalLLM, prompts, inputs, answers, turns, terms=("answer", "alignment"),
                  latents: dict | None = None, schedulers: dict | None = None,
                  generator: torch.Generator | None = None, counts: dict | None = None,
                  fill_unknown: bool = False) -> dict[str, torch.Tensor]:
    """L(Encoder-Decoder) on a batch of turns: answer cross-entropy, then lesson 5's terms per output.

    The cross-entropy scores an answer's words and, of an output's signal tokens, only the first:
    the model chooses its output there, and `SignalLLM.write` cuts the answer at it and puts the
    rest in, so they are never written. Scoring them all (NExT-GPT and lesson 5 do) left that
    choice one scored token in seven of an output turn at tiny scale, and asked for a picture of a
    clip, the seed-1 model chose a picture with probability 0.42 (0.999 scoring only the first).
    After the signal tokens the ``</s>`` is not scored either (lesson 5: its state is the one the
    projector reads). `latents[m]` holds clean latents of the first turns asking for output `m`,
    for the generation term. A `counts` dict is filled with what each term averages over (scored
    tokens, turns, latents): data parallelism (`mmlib.train`) weighs each process's terms by them.
    """
    batch, out = model.read(prompts, inputs, answers)
    labels = batch["labels"]
    eos = model.base.tokenizer.eos_token_id
    asks = torch.tensor([turn.output is not None for turn in turns], device=labels.device)
    scored = labels.masked_fill((labels == eos) & asks[:, None], -100)  # (B, T)
    put_in = torch.tensor([i for ids in model.signals.values() for i in ids[1:]], device=labels.device)
    scored = scored.masked_fill(torch.isin(labels, put_in), -100)  # an output's signal tokens after its first
    parts = {}
    if "answer" in terms:
        parts["answer"] = signal_nll(out.logits, scored)
        if counts is not None:
            counts["answer"] = int((scored[:, 1:] != -100).sum())  # the positions signal_nll scores
    for modality in OUTPUTS:
        rows = [i for i, turn in enumerate(turns) if turn.output == modality]
        if not rows or not ({"alignment", "generation"} & set(terms)):
            continue
        states = model.signal_states(out.hidden_states[-1][rows], labels[rows], modality)
        projected = model.projectors[modality](states)
        decoder = model.decoders[modality]
        if "alignment" in terms:
            # stage 2's targets: the scene's canonical caption of all the output shows. What the
            # dialogue never revealed (a sound's position) is unknowable, so the projector learns
            # its average there (or, with fill_unknown, fixed values); the judge grades only what
            # was revealed.
            targets = [canonical_caption(alignment_values(turns[i], fill_unknown), captioned_attributes(modality))
                       for i in rows]
            text_states = decoder.prompt_embeds(targets)
            parts[f"{modality} alignment"] = caption_alignment_loss(projected, text_states.view(projected.shape))
            if counts is not None:
                counts[f"{modality} alignment"] = len(rows)
        if "generation" in terms and latents and modality in latents:
            z = latents[modality]
            parts[f"{modality} generation"] = generation_loss(decoder, schedulers[modality], projected[: len(z)], z, generator)
            if counts is not None:
                counts[f"{modality} generation"] = len(z)
    return parts


UNKNOWN_FILL = {"shape": "circle", "color": "red", "size": "large", "position": "top center", "motion": "still",
                "temperature": "warm"}


def alignment_values(turn: Turn, fill_unknown: bool = False) -> dict[str, str]:
    """The scene's values an output turn's alignment target describes; with `fill_unknown`, what the
    turn does not expect (its inputs never revealed it) is a fixed value instead of the scene's."""
    if not fill_unknown:
        return turn.values
    return {a: v if a in turn.expect else UNKNOWN_FILL[a] for a, v in turn.values.items()}


def replay_loss(model: SignalLLM, world: World, step: int, size: int, share: slice = slice(None)) -> torch.Tensor:
    """Stage 1's L(Encoder-LLM) on `size` fresh captioned inputs of every modality it reads (rows `share`).

    Rehearsal: the tuned LLM and input projection keep being asked to say all that an input shows,
    with stage 1's prompt, while they learn to follow dialogues.
    """
    return caption_loss(model.base, world, model.base.modalities, step, size, share)


def stage3_groups(model: SignalLLM, config: Stage3Config) -> list[dict]:
    """The optimizer's parameter groups of stage 3: the LLM's trainable weights, then the projections."""
    llm = [p for p in model.base.llm.parameters() if p.requires_grad]
    projections = [p for p in list(model.base.projection.parameters()) + list(model.projectors.parameters())
                   if p.requires_grad]
    groups = [g for g in ({"params": llm, "lr": config.lr}, {"params": projections, "lr": config.projection_lr})
              if g["params"]]
    if not groups:
        raise ValueError("nothing to train: tuning 'frozen' with projections=False leaves no trainable parameter")
    return groups


def train_stage3(model: SignalLLM, config: Stage3Config | None = None, world: World | None = None,
                 templates: list[str] | None = None) -> History:
    """Instruction-tune a stage-2 model prepared with `prepare_stage3` on fresh training dialogues each step."""
    config = config or course_config.scale_config("stage3", Stage3Config)
    world = world or World()
    for term in config.terms:
        check_choice("L(Encoder-Decoder) term", term, list(TERMS))
    groups = stage3_groups(model, config)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = course_config.one_cycle(optimizer, config.steps, 0.05)
    generator = torch.Generator().manual_seed(course_config.seed())
    schedulers = ({m: noise_scheduler(model.decoders[m].config.unet.prediction_type) for m in model.outputs}
                  if "generation" in config.terms else {})  # DecoderText has no UNet, nor needs a scheduler
    history = History()
    model.eval()  # frozen parts keep inference behaviour (LoRA dropout, if any, is the adapters' own)
    if config.tuning == "lora" and config.lora.dropout > 0:
        model.base.llm.train()
    # with a GPU, the steps run there, the decoders' frozen modules too; the model comes back on the CPU
    with course_config.on_training_device(model, *model.decoder_modules()) as device:
        for step in course_config.training_steps(config.steps, "stage 3"):
            dialogues = make_dialogues(world, "train", config.batch_size, templates, start=step * config.batch_size,
                                       variant=step)
            prompts, inputs, answers, turns = training_examples(model, world, dialogues)
            latents = None
            if "generation" in config.terms:
                latents = _turn_latents(model, world, dialogues, config.generation_batch, generator)
                latents = {m: z.to(device) for m, z in latents.items()}
            parts = stage3_losses(model, prompts, inputs, answers, turns, config.terms, latents, schedulers, generator,
                                  fill_unknown=config.fill_unknown)
            if "replay" in config.terms:
                parts["replay"] = replay_loss(model, world, step, config.replay_batch)
            total = sum(config.weights[name.split()[-1]] * value for name, value in parts.items())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            schedule.step()
            for name, value in parts.items():
                history.loss.setdefault(name, []).append(value.item())
    model.eval()
    return history


def _turn_latents(model: SignalLLM, world: World, dialogues: list[Dialogue], count: int, generator) -> dict:
    """Noisy-VAE latents of the scenes the first `count` output turns per decoder must show."""
    wanted = {}
    for dialogue in dialogues:
        for turn in dialogue.turns:
            if turn.output and len(wanted.setdefault(turn.output, [])) < count:
                wanted[turn.output].append((dialogue.scene, turn.values))
    latents = {}
    for modality, items in wanted.items():
        scenes = world.scenes(np.array([s for s, _ in items]))
        edits = {a: np.array([ATTRIBUTES[a].index(values[a]) for _, values in items]) for a in ATTRIBUTES}
        scenes = world.edit(scenes, **edits)  # the scene the answer must show, edits included
        mean, std = training_latents(modality, model.decoders[modality].pipeline.vae, world, scenes)
        latents[modality] = mean + std * torch.randn(mean.shape, generator=generator)
    return latents


# ---------------------------------------------------------------------------------------------
# Holding dialogues, and grading them
# ---------------------------------------------------------------------------------------------


def _states_ok(text: str, turn: Turn) -> bool:
    """The answer's text states exactly what the expected answer's text states (an output request: nothing)."""
    return parse_caption(text) == parse_caption(OUTPUT_TAG.sub("", turn.answer))


@torch.no_grad()
def run_dialogues(model: SignalLLM, world: World, dialogues: list[Dialogue], judge=None,
                  max_new_tokens: int = 24, keep_outputs: bool = False) -> list[dict]:
    """Let the model hold each dialogue on its own answers; grade every turn.

    Turn k of every dialogue is answered in one batch, after the model's own earlier answers. An
    answer is cut at its first signal token, the rest of the output's signal tokens follow (as
    in `SignalLLM.respond`) and the projector turns their states into the decoder's condition.
    Returns per dialogue ``{"template", "turns": [{"text", "asked", "text_ok", "output_ok", ...}],
    "success"}``; with a `judge`, outputs are generated and graded on the attributes the turn
    expects that the judge reads; without one, only what the model asks for is checked. Each
    output starts from its own noise, seeded by its scene and turn, so a dialogue's grade does not
    depend on which other dialogues share its batch.
    """
    check_made_at(dialogues, world)
    records = [{"template": d.template, "turns": []} for d in dialogues]
    histories = [[] for _ in dialogues]
    seen = [[] for _ in dialogues]
    for k in range(max(len(d.turns) for d in dialogues)):
        active = [i for i, d in enumerate(dialogues) if len(d.turns) > k]
        prompts, wanted = [], []
        for i in active:
            turn = dialogues[i].turns[k]
            seen[i] = seen[i] + [(m, dialogues[i].scene) for m in turn.inputs]
            prompts.append(prompt_for(histories[i], turn.user))
            wanted.append(seen[i])
        inputs = _embed_inputs(model, world, wanted)
        written = model.write(prompts, inputs, max_new_tokens)
        groups = {}
        for j, (i, (text, asked)) in enumerate(zip(active, written)):
            turn = dialogues[i].turns[k]
            record = {"user": turn.user, "text": text, "asked": asked, "wanted": turn.output,
                      "text_ok": _states_ok(text, turn) and asked == turn.output, "output_ok": True}
            records[i]["turns"].append(record)
            histories[i].append((turn.user, model.answer(asked, text) if asked in model.signals else text))
            if asked is not None and asked == turn.output and judge is not None:
                groups.setdefault(asked, []).append((i, j))
        for modality, items in groups.items():
            options = {"vocode": False} if modality == "audio" else {}  # the judge reads log-mels
            seeds = [output_seed(dialogues[i], k) for i, _ in items]
            outputs = model.generate_output(modality, [prompts[j] for _, j in items], [written[j][0] for _, j in items],
                                            [inputs[j] for _, j in items], seed=seeds, **options)
            read = judge.read(modality, outputs)
            for n, (i, _) in enumerate(items):
                record = records[i]["turns"][k]
                record["output_ok"] = shows_expected(modality, read, n, dialogues[i].turns[k].expect)
                if keep_outputs:
                    record["output"] = outputs[n]
    for record in records:
        record["success"] = all(t["text_ok"] and t["output_ok"] for t in record["turns"])
    return records


def output_seed(dialogue: Dialogue, turn: int) -> int:
    """The seed of the output a dialogue's turn asks for: its own, whatever else shares the batch."""
    return 1000 * dialogue.scene + turn  # a dialogue has fewer than 1,000 turns


def shows_expected(modality: str, read: dict[str, np.ndarray], n: int, expect: dict[str, str]) -> bool:
    """Whether output `n`, as the judge `read` the batch, shows every expected attribute the judge reads."""
    return all(read[a][n] == ATTRIBUTES[a].index(expect[a]) for a in JUDGED[modality] if a in expect)


def success_rate(records: list[dict]) -> float:
    """Share of dialogues held successfully."""
    return float(np.mean([r["success"] for r in records]))


def success_by_template(records: list[dict]) -> dict[str, float]:
    """Success rate per template, in order of first appearance."""
    names = list(dict.fromkeys(r["template"] for r in records))
    return {name: float(np.mean([r["success"] for r in records if r["template"] == name])) for name in names}


# ---------------------------------------------------------------------------------------------
# Saving, loading, the zoo
# ---------------------------------------------------------------------------------------------


def save_stage3(model: SignalLLM, history: History, config: Stage3Config, folder: Path) -> None:
    """Write the LoRA adapters (peft's safetensors; or the whole LLM for full tuning) and the projections."""
    folder = Path(folder)
    if config.tuning == "lora":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.base.llm.save_pretrained(folder / "adapter")  # adapter_model.safetensors + adapter_config.json
    elif config.tuning == "full":
        with zoo.quiet_loading():
            model.base.llm.save_pretrained(folder / "llm")
    state = {f"input_projection.{k}": v.contiguous() for k, v in model.base.projection.state_dict().items()}
    state.update({f"projectors.{k}": v.contiguous() for k, v in model.projectors.state_dict().items()})
    save_file(state, folder / "projections.safetensors")
    (folder / "stage3.json").write_text(json.dumps({"config": asdict(config), "history": asdict(history)}))


def load_stage3(folder: Path, stage2: SignalLLM | None = None) -> tuple[SignalLLM, History]:
    """The tuned model from `folder` over the zoo's stage-2 model (or the one given), adapters attached."""
    folder = Path(folder)
    record = json.loads((folder / "stage3.json").read_text())
    config = course_config.make_config(Stage3Config, record["config"])
    model = stage2 or zoo.load("stage2")[0]
    if config.tuning == "lora":
        from peft import PeftModel

        if not (folder / "adapter" / "adapter_model.safetensors").is_file():  # peft would fall back to a pickle
            raise FileNotFoundError(f"{folder / 'adapter'} holds no adapter_model.safetensors: save_stage3 writes one")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.base.llm = PeftModel.from_pretrained(model.base.llm, folder / "adapter")
    elif config.tuning == "full":
        from transformers import LlamaForCausalLM

        with zoo.quiet_loading():
            model.base.llm = LlamaForCausalLM.from_pretrained(folder / "llm", use_safetensors=True).eval()
    state = load_file(folder / "projections.safetensors")
    model.base.projection.load_state_dict({k.removeprefix("input_projection."): v for k, v in state.items()
                                           if k.startswith("input_projection.")})
    model.projectors.load_state_dict({k.removeprefix("projectors."): v for k, v in state.items()
                                      if k.startswith("projectors.")})
    mark_trainable(model, config)  # what stage 3 trained (trainable_parameters counts it); inference runs without grad
    return model.eval(), History(**record["history"])


def peak_resident_gib() -> float | None:
    """The process's peak resident memory (GiB) since the last `reset_peak`: Linux's VmHWM, else None."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 2**20 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def reset_peak() -> None:
    """Start measuring the peak afresh, from the memory in use now (Linux; elsewhere nothing)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _train_into(folder: Path, config: Stage3Config) -> None:
    # As stage 2: without the denoising term, the decoders' text encoders are all stage 3 needs.
    decoders = decoders_to_link(OUTPUTS, unets="generation" in config.terms)
    model = prepare_stage3(load_stage2(zoo.ensure("stage2"), decoders=decoders)[0], config)
    reset_peak()
    start = time.perf_counter()
    history = train_stage3(model, config)
    history.seconds = time.perf_counter() - start
    history.peak_memory_gib = peak_resident_gib()
    save_stage3(model, history, config, folder)


# What every stage-3 entry's training reads (zoo.entry checks it).
STAGE3_READS = dict(sections=("stage3",), needs=("stage2",), files=("dialogues/templates.yaml",))


@zoo.entry("stage3", load=load_stage3, version=6, description="stage 2 instruction-tuned with LoRA on modality-switching dialogues",
           lesson="06_lora_instruction_tuning.ipynb", **STAGE3_READS)
def _train_zoo_stage3(folder: Path) -> None:
    _train_into(folder, course_config.scale_config("stage3", Stage3Config))


# Lesson 6's comparison: the zoo's stage 3 with the LLM frozen, or with all of it trained. Full
# fine-tuning gets the learning rate it did better with (3e-3, against 1e-3).
TUNING_RUNS = {"frozen": {"tuning": "frozen"}, "full": {"tuning": "full", "lr": 3e-3}}


def _tuning_entry(name: str, changes: dict) -> None:
    def train(folder: Path) -> None:
        _train_into(folder, replace(course_config.scale_config("stage3", Stage3Config), **changes))

    zoo.entry(f"stage3-{name}", load=load_stage3, version=5, description=f"the zoo's stage 3 with {changes}",
              lesson="06_lora_instruction_tuning.ipynb", **STAGE3_READS)(train)


for _name, _changes in TUNING_RUNS.items():
    _tuning_entry(_name, _changes)
