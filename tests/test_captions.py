import re

import numpy as np
import pytest

from mmlib.data import ATTRIBUTES, World, corpus_words, parse_caption
from mmlib.data.captions import AMBIGUOUS, templates, vocabulary


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


def expected(scenes, mentioned, i):
    truth = scenes.describe(i)
    return {name: truth[name] for name, said in zip(ATTRIBUTES, mentioned[i]) if said}


@pytest.mark.parametrize("mention, among", [("random", tuple(ATTRIBUTES)), ("all", tuple(ATTRIBUTES)),
                                           (("color", "motion"), tuple(ATTRIBUTES)), ("random", ("size", "motion"))])
def test_parser_reads_back_exactly_what_each_caption_mentions(world, mention, among):
    scenes = world.scenes(world.split("train", 3000))
    for variant in (0, 1):
        texts, mentioned = world.captions(scenes, variant=variant, mention=mention, among=among)
        assert not mentioned[:, [name not in among for name in ATTRIBUTES]].any()
        for i, text in enumerate(texts):
            assert parse_caption(text) == expected(scenes, mentioned, i), text


def test_mention_modes(world):
    scenes = world.scenes(world.split("test", 2000))
    _, mentioned = world.captions(scenes)
    assert mentioned.any(axis=1).all(), "every caption mentions something"
    rates = mentioned.mean(axis=0)
    assert 0.75 < rates[0] < 0.95 and 0.3 < rates[-1] < 0.5  # shape often, temperature less
    assert world.captions(scenes, mention="all")[1].all()
    only = world.captions(scenes, mention=("size",))[1]
    assert only[:, list(ATTRIBUTES).index("size")].all() and only.sum() == len(scenes)
    with pytest.raises(ValueError, match="unknown attribute 'weight'"):
        world.captions(scenes, mention=("weight",))
    audio_only = world.captions(scenes, among=("shape", "color", "size", "motion"))[1]
    assert audio_only.any(axis=1).all() and not audio_only[:, [3, 5]].any()
    assert world.captions(scenes, mention="all", among=("color",))[1].sum(axis=1).tolist() == [1] * len(scenes)
    with pytest.raises(ValueError, match="at least one attribute"):
        world.captions(scenes, among=())


def test_one_scene_has_many_captions(world):
    scenes = world.scenes(world.split("test", 1))
    variants = {world.captions(scenes, variant=v, mention="all")[0][0] for v in range(40)}
    assert len(variants) >= 25
    again = World(seed=0).captions(scenes, variant=3)[0]
    assert again == world.captions(scenes, variant=3)[0]


def test_attribute_order_varies(world):
    scenes = world.compose(1, size="small", color="red", temperature="hot", motion="up", position="top left")
    orders = set()
    for v in range(200):
        text = world.captions(scenes, variant=v, mention="all")[0][0]
        words = text.split()
        small = next(i for i, w in enumerate(words) if w in ("small", "little", "tiny"))
        red = next(i for i, w in enumerate(words) if w in ("red", "crimson"))
        orders.add(small < red)
    assert orders == {True, False}


def test_articles_agree(world):
    texts, _ = world.captions(world.scenes(world.split("train", 2000)))
    for text in texts:
        assert not re.search(r"\ba [aeiou]", text) and not re.search(r"\ban [^aeiou ]", text), text


def test_corpus_words_cover_every_caption(world):
    words = set(corpus_words())
    for mention in ("random", "all"):
        texts, _ = world.captions(world.scenes(world.split("train", 2000)), mention=mention)
        assert set(" ".join(texts).split()) <= words
    assert {"circle", "crimson", "upper", "scorching", "there"} <= words


def test_vocabulary_and_templates_are_consistent():
    words = vocabulary()
    for name, values in ATTRIBUTES.items():
        assert list(words[name]) == list(values)
    assert len(templates()) >= 5
    assert all(t.count("{object}") == 1 for t in templates())


def test_parser_flags_contradictions_and_ignores_other_words():
    assert parse_caption("a red circle that is blue") == {"color": AMBIGUOUS, "shape": "circle"}
    assert parse_caption("A Huge Violet Disc Rising") == {"size": "large", "color": "purple", "shape": "circle",
                                                         "motion": "up"}
    assert parse_caption("a lukewarm wedge in the middle of the top") == {"temperature": "warm", "shape": "triangle",
                                                                          "position": "top center"}
    assert parse_caption("nothing to see") == {}
    assert parse_caption("moving leftward at the top right") == {"motion": "left", "position": "top right"}
