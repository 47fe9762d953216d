"""mmlib.anytoany: the finished model behind one call (its docstring example runs late in make test,
once the decoders exist; these tests use the decoders' text encoders only and generate nothing)."""

import numpy as np
import pytest
import torch

from mmlib import zoo
from mmlib.anytoany import AnyToAny, Conversation
from mmlib.data import ATTRIBUTES, World
from mmlib.data.captions import parse_caption
from mmlib.decoders import OUTPUTS, decoders_to_link
from mmlib.instruction import load_stage3
from mmlib.judge import JUDGED
from mmlib.output_projection import load_stage2


@pytest.fixture(scope="module")
def model():
    decoders = decoders_to_link(OUTPUTS, unets=False)  # no UNet: these tests only read and write text
    stage2 = load_stage2(zoo.ensure("stage2"), decoders=decoders)[0]
    return AnyToAny(load_stage3(zoo.ensure("stage3"), stage2=stage2)[0])


@pytest.fixture(scope="module")
def world():
    return World()


def test_a_turn_places_each_input_where_it_stands_and_the_conversation_goes_on(model, world, monkeypatch):
    scene = world.scenes(world.split("test", 1))
    seen = []
    write = model.model.write

    def spy(prompts, inputs, max_new_tokens):
        seen.append((prompts[0], [m for m, _ in inputs[0]]))
        return write(prompts, inputs, max_new_tokens)

    monkeypatch.setattr(model.model, "write", spy)
    reply = model([("image", world.render("image", scene)[0]), "describe this picture."])
    assert seen[-1] == ("question: <image> describe this picture. answer:", ["image"])
    assert reply.asked is None and reply.outputs == {} and reply.text
    assert reply.conversation.turns == [("<image> describe this picture.", reply.text)]
    # numpy input, and a second turn that still holds the first turn's picture. No template asks
    # "what does <thermal> show?", so the model may answer it with a picture (at seed 0 it does):
    # generate=False, since this fixture's decoders are text encoders without UNets.
    second = model(["what does", ("thermal", world.render("thermal", scene)[0]), "show?"], reply.conversation,
                   generate=False)
    assert seen[-1][0].startswith(f"question: <image> describe this picture. answer: {reply.text}. question: what does")
    assert seen[-1][1] == ["image", "thermal"]
    assert len(second.conversation.inputs) == 2 and len(reply.conversation.inputs) == 1  # the first is unchanged


def test_it_states_the_colour_it_was_shown(model, world):
    scenes = world.scenes(world.split("test", 20))
    right = 0
    for i in range(20):
        reply = model([("image", world.render("image", scenes[i:i + 1])[0]), "describe this picture."], generate=False)
        right += scenes.describe(i)["color"] in reply.text and reply.asked is None
    assert right >= 16  # stage 3 describes pictures right (lesson 6); 20 held-out scenes (seed 0: 19)


def test_inputs_of_another_kind_or_range_are_refused_before_the_encoder(model, world):
    picture = world.render("image", world.scenes(world.split("test", 1)))[0]  # (3, H, W) float32 in [0, 1]
    with pytest.raises(TypeError, match=r"image input holds uint8 values; give floats in \[0, 1\].*divide it by 255"):
        model([("image", (picture * 255).astype(np.uint8)), "describe this picture."])
    for bad in (picture > 0.5, picture.astype(np.complex64)):
        with pytest.raises(TypeError, match="give floats"):
            model([("image", bad), "describe this picture."])
    nan = picture.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        model([("image", nan), "describe this picture."])
    with pytest.raises(ValueError, match=r"image input holds values from \d+ to 255, but the encoder reads image in \[0, 1\].*255"):
        model([("image", picture * 255), "describe this picture."])
    with pytest.raises(ValueError, match=r"audio in \[-1, 1\]"):
        model([("audio", 1e6 * world.render("audio", world.scenes(world.split("test", 1)))[0]), "describe this sound."])
    wide = model.embed("image", picture.astype(np.float64))  # floats of any width are read as float32
    assert torch.equal(wide, model.embed("image", picture))
    sound = world.render("audio", world.scenes(world.split("test", 1)))
    assert model.embed("audio", world.log_mel(sound)[0]).shape == wide.shape, "a log-mel has no fixed range"


def test_a_conversation_longer_than_the_llm_keeps_its_latest_turns(model, world):
    from mmlib.anytoany import Conversation

    picture = world.render("image", world.scenes(world.split("test", 1)))[0]
    vector = model.embed("image", picture)
    turn = ("<image> describe this picture.", "a large red circle at the top left moving up")
    long = Conversation([turn] * 12, [("image", vector)] * 12)  # about 12 x 20 positions: more than 128
    with pytest.warns(UserWarning, match=r"longer than the LLM's 128 positions: its \d+ oldest turn\(s\) are left out"):
        reply = model("and now?", conversation=long, generate=False)
    assert len(reply.conversation.turns) == 13 and len(reply.conversation.inputs) == 12, "the conversation itself is kept"
    with pytest.raises(ValueError, match="takes \\d+ positions \\+ \\d+ new tokens, but the LLM reads at most 128"):
        model("describe " * 200)
    with pytest.raises(ValueError, match="but the LLM reads at most 128"):
        model.model.write(["describe " * 200])


def test_a_text_encoder_alone_cannot_generate(model, world):
    with pytest.raises(TypeError, match="load_decoder"):
        model.model.decoders["audio"](prompt_embeds=None)


def test_bad_parts_are_refused_with_what_to_give(model, world):
    with pytest.raises(ValueError, match="cannot read 'smell'.*image"):
        model([("smell", np.zeros(3)), "what is it?"])
    with pytest.raises(TypeError, match=r"part 1 is int.*\(modality, data\)"):
        model(["describe", 3])
    with pytest.raises(TypeError, match="tensor or numpy array"):
        model([("image", [[0.0]])])
    with pytest.raises(ValueError, match="empty turn"):
        model(["  "])
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)|32"):
        model([("image", torch.zeros(3, 16, 16)), "describe this picture."])


def test_from_run_says_which_stage_is_missing(tmp_path):
    (tmp_path / "stage1" / "final").mkdir(parents=True)
    (tmp_path / "stage1" / "final" / "stage1.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks stage2/final, stage3/final.*mmlib.train --stage 1 2 3"):
        AnyToAny.from_run(tmp_path)
    (tmp_path / "stage2" / "final").mkdir(parents=True)  # without its stage2.json: not finished
    with pytest.raises(FileNotFoundError, match="lacks stage2/final, stage3/final"):
        AnyToAny.from_run(tmp_path)
    with pytest.raises(ValueError, match="signal tokens"):
        AnyToAny.from_zoo("stage1")
    assert Conversation().turns == []


def test_a_run_of_mmlib_train_loads_and_answers(tiny_run, world):
    model = AnyToAny.from_run(tiny_run[0], decoders=decoders_to_link(OUTPUTS, unets=False))
    scene = world.scenes(world.split("test", 1))
    reply = model([("audio", world.render("audio", scene)[0]), "describe this sound."], max_new_tokens=4)
    assert isinstance(reply.text, str) and reply.conversation.turns[0][0] == "<audio> describe this sound."


def test_the_grid_pools_every_one_turn_template_by_its_input_and_output(model, world):
    from mmlib.anytoany import combination, combination_grid
    from mmlib.instruction import load_templates

    table = load_templates()
    assert combination(table["train"]["describe-picture"]) == ("image", "text")
    assert combination(table["train"]["draw-caption"]) == ("text", "image")
    assert combination(table["train"]["sound-of-clip"]) == ("video", "audio")
    with pytest.raises(ValueError, match="one-turn template; this one has 2 turns"):
        combination(table["train"]["hear-then-draw"])  # two turns: not one combination
    grid = combination_grid(model.model, None, world, per_template=2)  # no judge: what is said and asked only
    one_turn = [n for split in table.values() for n, turns in split.items() if len(turns) == 1]
    assert sorted(t for cell in grid.values() for t in cell["templates"]) == sorted(one_turn)
    assert all(cell["dialogues"] == 2 * len(cell["templates"]) for cell in grid.values())
    assert grid[("thermal", "image")]["tuned"] is False and grid[("image", "text")]["tuned"] is True
    assert grid[("image", "text")]["success"] >= 0.5  # lesson 6's model describes pictures


class CaptionEcho:
    """A decoder stand-in that 'draws' a caption as its attribute ids (-1 for what it does not name, or for
    `blind`); given projected states it draws nothing the judge can read."""

    def __init__(self, real, blind: str = ""):
        self.real, self.blind = real, blind

    @property
    def conditioning_shape(self):
        return self.real.conditioning_shape

    def __call__(self, prompts=None, prompt_embeds=None, **options):
        if prompts is None:
            return torch.full((len(prompt_embeds), len(ATTRIBUTES)), -1)
        said = [parse_caption(p) for p in prompts]
        return torch.tensor([[ATTRIBUTES[a].index(s[a]) if a in s and a != self.blind else -1 for a in ATTRIBUTES]
                             for s in said])


class ReadIds:
    """A judge stand-in for CaptionEcho's outputs."""

    def read(self, modality, batch):
        return {a: np.asarray(batch)[:, k] for k, a in enumerate(ATTRIBUTES) if a in JUDGED[modality]}


def test_the_ceiling_grades_the_decoder_on_the_caption_of_what_the_output_should_show(model, world, monkeypatch):
    from mmlib.anytoany import combination_grid, decoder_ceiling

    real = model.model.decoders
    monkeypatch.setattr(model.model, "decoders", {m: CaptionEcho(d) for m, d in real.items()})
    ceiling = decoder_ceiling(model.model, ReadIds(), world, per_template=2)
    grid = combination_grid(model.model, ReadIds(), world, per_template=2)
    assert set(ceiling) == {key for key in grid if key[1] != "text"}  # every output cell, and only those
    assert all(value == 1.0 for value in ceiling.values())  # the caption names all the output should show
    # through the model the projected states drew nothing readable: a picture fails on every attribute
    assert all(cell["success"] == 0.0 for key, cell in grid.items() if key[1] == "image")
    some = [("image", "audio"), ("image", "image")]
    assert set(decoder_ceiling(model.model, ReadIds(), world, per_template=2, cells=some)) == set(some)
    monkeypatch.setattr(model.model, "decoders", {m: CaptionEcho(d, blind="color") for m, d in real.items()})
    ceiling = decoder_ceiling(model.model, ReadIds(), world, per_template=2, cells=some)
    # a picture shows its color to the judge: every sound or picture made from one must have it right
    assert ceiling == {("image", "audio"): 0.0, ("image", "image"): 0.0}
