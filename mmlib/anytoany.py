"""The finished model as one object: interleaved inputs in; text, pictures, sounds and clips out.

What a learner uses after the course. It wraps the stage-3 model (`SignalLLM`: encoders, input
projection, LLM with LoRA, signal tokens, output projectors, decoders) behind one call, and keeps
the conversation, so a later turn can refer to an earlier input ("now make it blue"):

    >>> from mmlib.anytoany import AnyToAny
    >>> from mmlib.data import World
    >>> model = AnyToAny.from_zoo()  # lesson 6's tuned model (trained on first use, then cached)
    >>> model.inputs, model.outputs
    (['image', 'audio', 'video', 'depth', 'thermal', 'imu'], ['image', 'audio', 'video'])
    >>> world = World()
    >>> scene = world.scenes(world.split("test", 1))
    >>> reply = model([("audio", world.render("audio", scene)[0]), "describe this sound."])
    >>> reply.asked is None, sorted(reply.outputs)  # a text answer
    (True, [])
    >>> reply = model(["now draw it."], reply.conversation)  # the sound of turn 1, drawn
    >>> reply.asked, tuple(reply.outputs["image"].shape)  # a picture in the world's format
    ('image', (3, 32, 32))

Parts are strings, or ``(modality, data)`` with data one item in the world's format for that
modality (an image (3, 32, 32) in [0, 1], a waveform or log-mel, a clip (8, 3, 32, 32), ...):
each input becomes its placeholder (``<image>``) where it stands in the text. Full scale works
the same on a run of ``python -m mmlib.train`` (`AnyToAny.from_run`).
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmlib import zoo
from mmlib.tokenizer import MODALITY_TOKENS


@dataclass
class Conversation:
    """What the model has been told and answered: (user text, answer with signal tokens), and the inputs."""

    turns: list = field(default_factory=list)  # [(user text with placeholders, the model's answer)]
    inputs: list = field(default_factory=list)  # [(modality, encoder embedding (D,))], in order of appearance


@dataclass
class Reply:
    """One answer: its text, the output the LLM asked for (or None) and what the decoder made of it."""

    text: str
    asked: str | None
    outputs: dict  # {modality: tensor}: a picture (3, H, W), a waveform (samples,), a clip (frames, 3, H, W)
    conversation: Conversation  # pass it to the next call to go on


# The world's value ranges (mmlib.data.World): an input outside them is another kind of data.
VALUE_RANGES = {"image": (0.0, 1.0), "depth": (0.0, 1.0), "thermal": (0.0, 1.0), "video": (0.0, 1.0),
                "audio": (-1.0, 1.0)}  # audio: a waveform; a log-mel (n_mels, frames) has no fixed range


def check_values(modality: str, data: torch.Tensor) -> None:
    """Refuse an input whose values are not real, finite numbers in the world's range for `modality`.

    Floats of any width are read (as float32); integers, booleans and complex numbers are refused,
    since a cast would hide what they mean (a uint8 picture in 0..255 is not one in [0, 1]).
    """
    if not data.dtype.is_floating_point:
        hint = " (a picture in 0..255? divide it by 255)" if modality in VALUE_RANGES and not data.dtype.is_complex \
            and data.dtype != torch.bool and VALUE_RANGES[modality] == (0.0, 1.0) else ""
        low, high = VALUE_RANGES.get(modality, ("any", "real"))
        raise TypeError(f"the {modality} input holds {str(data.dtype).removeprefix('torch.')} values; give floats"
                        + (f" in [{low:g}, {high:g}]" if modality in VALUE_RANGES else "") + hint)
    if data.numel() and not torch.isfinite(data).all():
        raise ValueError(f"the {modality} input holds NaN or infinite values")
    if modality in VALUE_RANGES and data.numel() and not (modality == "audio" and data.ndim == 2):  # a log-mel: any level
        low, high = VALUE_RANGES[modality]
        smallest, largest = data.min().item(), data.max().item()
        if smallest < low - 1e-3 or largest > high + 1e-3:
            hint = " (a picture in 0..255? divide it by 255)" if high == 1.0 and largest > 1.5 else ""
            raise ValueError(f"the {modality} input holds values from {smallest:.3g} to {largest:.3g}, but the "
                             f"encoder reads {modality} in [{low:g}, {high:g}]{hint}")


class AnyToAny:
    """NExT-GPT end to end over a stage-3 `SignalLLM` (see the module docstring for an example)."""

    def __init__(self, model) -> None:
        self.model = model.eval()

    @classmethod
    def from_zoo(cls, entry: str = "stage3") -> "AnyToAny":
        """The zoo's tuned model (``stage3``; or ``stage3-full``, ``stage3-frozen``, ``stage2``) with its decoders."""
        if entry not in ("stage2", "stage3") and not entry.startswith("stage3-"):
            raise ValueError(f"AnyToAny needs a model with signal tokens: a stage-2 or stage-3 zoo entry, got {entry!r}")
        return cls(zoo.load(entry)[0])

    @classmethod
    def from_run(cls, folder: str | Path, decoders: dict | None = None) -> "AnyToAny":
        """The result of ``python -m mmlib.train --stage 1 2 3 --output <folder>``, at the scale it was trained at.

        Each stage loads over the one before: ``stage1/final``, ``stage2/final``, ``stage3/final``;
        the encoders, LLM and decoders are the scale config's (`load_imagebind`, `load_llm`,
        `load_decoder`), or `decoders` ({modality: decoder}) if given.
        """
        from mmlib.input_projection import load_stage1
        from mmlib.instruction import load_stage3
        from mmlib.output_projection import load_stage2

        from mmlib.train import finished

        folder = Path(folder)
        missing = [f"stage{n}/final" for n in (1, 2, 3) if not finished(folder / f"stage{n}" / "final", n)]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: train them with "
                                    f"python -m mmlib.train --stage 1 2 3 --output {folder}")
        base = load_stage1(folder / "stage1" / "final")[0]
        stage2 = load_stage2(folder / "stage2" / "final", base=base, decoders=decoders)[0]
        return cls(load_stage3(folder / "stage3" / "final", stage2=stage2)[0])

    @property
    def inputs(self) -> list[str]:
        """The modalities it reads (besides text)."""
        return list(self.model.base.modalities)

    @property
    def outputs(self) -> list[str]:
        """The modalities it can generate (besides text)."""
        return list(self.model.outputs)

    def embed(self, modality: str, data) -> torch.Tensor:
        """The encoder embedding (D,) of one input in the world's format for `modality`."""
        if modality not in self.inputs:
            raise ValueError(f"this model cannot read {modality!r} inputs; it reads text and: {', '.join(self.inputs)}")
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(data)
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"a {modality} input is a tensor or numpy array (one item, no batch axis), "
                            f"got {type(data).__name__}")
        check_values(modality, data)
        return self.model.base.encode(modality, data.float().unsqueeze(0))[0]  # (1, ...) -> (1, D) -> (D,)

    @torch.no_grad()
    def __call__(self, parts, conversation: Conversation | None = None, max_new_tokens: int = 24,
                 generate: bool = True, **decoder_options) -> Reply:
        """Answer one user turn made of `parts` (strings and ``(modality, data)``), after `conversation`.

        With ``generate=False`` the reply only says which output the LLM asked for, and no decoder
        runs. `decoder_options` go to the decoder (``guidance_scale``, ``steps``, ``seed``, and for
        audio ``vocode=False`` to get the log-mel instead of the waveform).
        """
        if isinstance(parts, (str, tuple)):
            parts = [parts]
        conversation = conversation or Conversation()
        words, inputs = [], list(conversation.inputs)
        for i, part in enumerate(parts):
            if isinstance(part, str):
                words.append(part)
            elif isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], str):
                modality, data = part
                if modality == "text":
                    words.append(str(data))
                    continue
                inputs.append((modality, self.embed(modality, data)))
                words.append(MODALITY_TOKENS[modality])
            else:
                raise TypeError(f"part {i} is {type(part).__name__}: give strings and (modality, data) pairs, "
                                "e.g. [('image', picture), 'describe this picture.']")
        user = " ".join(word.strip() for word in words if word.strip())
        if not user:
            raise ValueError("an empty turn: give some text or an input")
        from mmlib.instruction import prompt_for

        # Generating an output reads the prompt, the answer and all of that output's signal tokens.
        signals = max(len(ids) for ids in self.model.signals.values()) + 1 if generate else 0
        prompt, read = self._fit(conversation.turns, user, inputs, max_new_tokens + signals)
        (text, asked), = self.model.write([prompt], [read], max_new_tokens)
        outputs = {}
        if asked is not None and generate:
            outputs[asked] = self.model.generate_output(asked, [prompt], [text], [read], **decoder_options)[0]
        answer = self.model.answer(asked, text) if asked else text
        return Reply(text, asked, outputs, Conversation(conversation.turns + [(user, answer)], inputs))


    def _fit(self, turns: list, user: str, inputs: list, new_tokens: int) -> tuple[str, list]:
        """The prompt of `turns` and `user`, without the oldest turns (and their inputs) that do not fit.

        A chat keeps what the LLM can read: its latest turns, within its positions, with a warning
        when earlier ones are left out. A turn that alone does not fit is refused.
        """
        from mmlib.instruction import prompt_for

        base = self.model.base
        for first in range(len(turns) + 1):
            prompt = prompt_for(turns[first:], user)
            if base.positions(prompt) + new_tokens <= base.max_positions:
                break
        else:
            base.check_length(0, base.positions(prompt), new_tokens)  # this turn alone is too long: raises
        if first:
            dropped = sum(u.count(token) for u, _ in turns[:first] for token in MODALITY_TOKENS.values())
            warnings.warn(f"the conversation is longer than the LLM's {base.max_positions} positions: its "
                          f"{first} oldest turn(s) are left out of this answer", stacklevel=4)
            inputs = inputs[dropped:]
        return prompt, inputs


# ---------------------------------------------------------------------------------------------
# Which input -> output combinations work
# ---------------------------------------------------------------------------------------------


def combination(turns) -> tuple[str, str]:
    """(input, output) of a one-turn dialogue template: its input modality ("text" for a caption)
    and the output it asks for ("text" for an answer in words)."""
    from mmlib.instruction import OUTPUT_TAG, PLACEHOLDER

    if len(turns) != 1:
        raise ValueError(f"a combination is read from a one-turn template; this one has {len(turns)} turns")
    (user, answer), = turns
    inputs = PLACEHOLDER.findall(user)
    outputs = OUTPUT_TAG.findall(answer)
    return (inputs[0] if inputs else "text"), (outputs[0] if outputs else "text")


def one_turn_dialogues(world, per_template: int):
    """The grid's dialogues: every one-turn template of lesson 6 on `per_template` test scenes each.

    Returns (dialogues, {template: its split}, the template table). A pure function of the world's
    seed, so `combination_grid` and `decoder_ceiling` grade the same scenes.
    """
    from mmlib.instruction import load_templates, make_dialogues

    table = load_templates()
    names = {name: split for split in ("train", "test") for name, turns in table[split].items() if len(turns) == 1}
    return make_dialogues(world, "test", per_template * len(names), list(names)), names, table


def combination_grid(model, judge, world=None, per_template: int = 40) -> dict[tuple[str, str], dict]:
    """Judge-graded success of every one-turn template on `per_template` test scenes, per (input, output).

    Each cell pools the templates of its combination: ``{"success", "dialogues", "templates",
    "tuned"}``, where `tuned` says whether a training template has that combination (the others
    are lesson 6's held-out templates). All dialogues are held in one batched `run_dialogues`.
    """
    from mmlib.data import World
    from mmlib.instruction import run_dialogues

    world = world or World()
    dialogues, names, table = one_turn_dialogues(world, per_template)
    records = run_dialogues(model, world, dialogues, judge)
    grid = {}
    for name, split in names.items():
        cell = grid.setdefault(combination(table[split][name]), {"outcomes": [], "templates": [], "tuned": False})
        cell["outcomes"] += [r["success"] for r in records if r["template"] == name]
        cell["templates"].append(name)
        cell["tuned"] |= split == "train"
    return {key: {"success": float(np.mean(c["outcomes"])), "dialogues": len(c["outcomes"]),
                  "templates": c["templates"], "tuned": c["tuned"]} for key, c in grid.items()}


def decoder_ceiling(model, judge, world=None, per_template: int = 40, cells=None) -> dict[tuple[str, str], float]:
    """The grid's output cells as the decoder alone makes them: the best the links could do.

    For the same dialogues as `combination_grid` (cells `cells`, default every output cell), the
    decoder is given the canonical caption of all the output should show, instead of the projected
    signal states, and graded on the same attributes, from the same noise (`output_seed`). What a
    cell loses below its ceiling is the links' doing; what the ceiling loses is the decoder's (lesson 3).
    """
    from mmlib.data import World
    from mmlib.decoders import captioned_attributes
    from mmlib.instruction import output_seed, shows_expected
    from mmlib.llm import canonical_caption

    world = world or World()
    dialogues, names, table = one_turn_dialogues(world, per_template)
    key = {name: combination(table[split][name]) for name, split in names.items()}
    cells = set(cells) if cells is not None else {k for k in key.values() if k[1] != "text"}
    outcomes = {}
    for modality in model.outputs:
        rows = [d for d in dialogues if key[d.template] in cells and d.turns[0].output == modality]
        if not rows:
            continue
        captions = [canonical_caption(d.turns[0].values, captioned_attributes(modality)) for d in rows]
        options = {"vocode": False} if modality == "audio" else {}  # the judge reads log-mels
        outputs = model.decoders[modality](captions, seed=[output_seed(d, 0) for d in rows], **options)
        read = judge.read(modality, outputs)
        for n, d in enumerate(rows):
            outcomes.setdefault(key[d.template], []).append(shows_expected(modality, read, n, d.turns[0].expect))
    return {cell: float(np.mean(values)) for cell, values in outcomes.items()}
