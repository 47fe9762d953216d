"""Captions of the generated world, and a parser that reads attributes back out of text.

Introduced in `00_tour.ipynb`. Templates and synonyms live in ``data/captions/`` as plain files.
One scene has many captions: the template, the synonyms, the order of adjectives and clauses and
the subset of attributes mentioned all vary with the caption's `variant`. `parse_caption` inverts
any of them, so a caption written by a model can be graded against the scene it describes.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from mmlib.data.world import ATTRIBUTES, Scenes, check_choice, uniform

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
AMBIGUOUS = "ambiguous"  # parse result for an attribute mentioned with two different values

# How often a "random" caption mentions each attribute. Shape and color are the words people use
# most; every caption mentions at least one attribute.
MENTION_PROBABILITY = {"shape": 0.85, "color": 0.85, "size": 0.5, "position": 0.5, "motion": 0.5, "temperature": 0.4}


def data_file(*parts: str) -> Path:
    """Path of a file under the repository's ``data/`` folder, with a clear error if it is missing."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: mmlib reads its caption templates from the repository's data/ folder. "
            "Install mmlib from a clone of the repository (pip install -e .) rather than from a wheel."
        )
    return path


@lru_cache(maxsize=None)
def vocabulary() -> dict:
    """The synonyms of every attribute value (``data/captions/vocabulary.json``)."""
    words = json.loads(data_file("captions", "vocabulary.json").read_text())
    for name, values in ATTRIBUTES.items():
        if name not in words or set(words[name]) != set(values):
            raise ValueError(f"vocabulary.json must list exactly the {name} values {values}")
    return words


@lru_cache(maxsize=None)
def templates() -> tuple[str, ...]:
    """The caption templates (``data/captions/templates.txt``), each with one ``{object}`` slot."""
    lines = data_file("captions", "templates.txt").read_text().splitlines()
    found = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    for line in found:
        if line.count("{object}") != 1:
            raise ValueError(f"caption template {line!r} must contain {{object}} exactly once")
    return found


def corpus_words() -> list[str]:
    """Every word a caption can contain, sorted: the vocabulary a tokenizer must cover."""
    words = vocabulary()
    text = " ".join(templates()).replace("{object}", " ")
    text += " a an " + " ".join(words["generic_nouns"]) + " " + " ".join(words["temperature_clauses"]).replace("{}", " ")
    for name in ATTRIBUTES:
        text += " " + " ".join(phrase for phrases in words[name].values() for phrase in phrases)
    return sorted(set(text.split()))


def _pick(options, u: float):
    """The option that a uniform number u in [0, 1) selects."""
    return options[min(int(u * len(options)), len(options) - 1)]


class Captioner:
    """Writes captions for scenes from the vocabulary and templates in ``data/captions/``."""

    def __init__(self) -> None:
        self.words = vocabulary()
        self.templates = templates()

    def _mentions(self, u: np.ndarray, mention, among) -> np.ndarray:
        """(B, 6) booleans: which attributes each caption mentions."""
        names = list(ATTRIBUTES)
        allowed = np.array([name in among for name in names])
        if mention == "random":
            chance = np.array([MENTION_PROBABILITY[name] for name in names])
            mentioned = (u[:, : len(names)] < chance) & allowed
            nothing = np.flatnonzero(~mentioned.any(axis=1))
            first = np.flatnonzero(allowed)  # fall back on one allowed attribute, drawn at random
            mentioned[nothing, first[(u[nothing, 23] * len(first)).astype(int)]] = True
            return mentioned
        if mention == "all":
            return np.broadcast_to(allowed, (len(u), len(names))).copy()
        chosen = (mention,) if isinstance(mention, str) else tuple(mention)
        for name in chosen:
            check_choice("attribute", name, names + ["random", "all"])
        return np.broadcast_to(np.array([name in chosen for name in names]), (len(u), len(names))).copy()

    def captions(self, scenes: Scenes, seed: int, variant=0, mention="random",
                 among=tuple(ATTRIBUTES)) -> tuple[list[str], np.ndarray]:
        """Captions of `scenes` and a (B, 6) mask of the attributes each mentions."""
        among = tuple(among)
        for name in among:
            check_choice("attribute", name, list(ATTRIBUTES))
        if not among:
            raise ValueError("captions need at least one attribute to mention (among is empty)")
        variant = np.broadcast_to(np.asarray(variant, dtype=np.int64), (len(scenes),))
        key = scenes.noise_key * 1_000_003 + variant  # one caption per (scene, variant)
        u = uniform(seed, key, "caption", 24)  # (B, 24) uniforms, one per choice below
        mentioned = self._mentions(u, mention, among)
        texts = [self._caption(scenes.describe(i), mentioned[i], u[i]) for i in range(len(scenes))]
        return texts, mentioned

    def _caption(self, values: dict[str, str], mentioned: np.ndarray, u: np.ndarray) -> str:
        """One caption from attribute names, the mention mask and 24 uniform numbers."""
        says = dict(zip(ATTRIBUTES, mentioned))
        words = self.words
        noun = _pick(words["shape"][values["shape"]], u[6]) if says["shape"] else _pick(words["generic_nouns"], u[6])
        adjectives, clauses = [], []
        if says["size"]:
            adjectives.append(_pick(words["size"][values["size"]], u[7]))
        if says["color"]:
            adjectives.append(_pick(words["color"][values["color"]], u[8]))
        if says["temperature"]:
            temperature = _pick(words["temperature"][values["temperature"]], u[9])
            if u[10] < 0.5:
                adjectives.append(temperature)
            else:
                clauses.append(_pick(words["temperature_clauses"], u[11]).format(temperature))
        if says["position"]:
            clauses.append(_pick(words["position"][values["position"]], u[12]))
        if says["motion"]:
            clauses.append(_pick(words["motion"][values["motion"]], u[13]))
        adjectives = [adjectives[i] for i in np.argsort(u[14 : 14 + len(adjectives)])]  # varied order
        clauses = [clauses[i] for i in np.argsort(u[17 : 17 + len(clauses)])]
        phrase = " ".join(adjectives + [noun])
        article = "an" if phrase[0] in "aeiou" else "a"
        obj = " ".join([article, phrase] + clauses)
        return _pick(self.templates, u[20]).format(object=obj)


@lru_cache(maxsize=None)
def _phrase_pattern() -> tuple[re.Pattern, dict[str, tuple[str, str]]]:
    """One regex over every attribute phrase, longest first, and phrase -> (attribute, value)."""
    words = vocabulary()
    lookup = {}
    for name in ATTRIBUTES:
        for value, phrases in words[name].items():
            for phrase in phrases:
                if phrase in lookup:
                    raise ValueError(f"phrase {phrase!r} is used for two attribute values")
                lookup[phrase] = (name, value)
    ordered = sorted(lookup, key=len, reverse=True)  # "at the top left" before "at the top"
    pattern = re.compile(r"\b(" + "|".join(re.escape(p) for p in ordered) + r")\b")
    return pattern, lookup


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption states, e.g. ``{"color": "red", "shape": "circle"}``.

    Attributes the text does not mention are absent; one mentioned with two different values
    maps to ``"ambiguous"``, which never equals a true value when grading.
    """
    pattern, lookup = _phrase_pattern()
    found: dict[str, str] = {}
    for match in pattern.finditer(text.lower()):
        name, value = lookup[match.group(1)]
        found[name] = value if found.get(name, value) == value else AMBIGUOUS
    return found
