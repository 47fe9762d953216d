import numpy as np
import pytest
import torch

from mmlib.data import ATTRIBUTES, World
from mmlib.retrieval import (
    attribute_matrix, caption_relevance, recall_at_k, shared_relevance, zero_shot_accuracy, zero_shot_prompts,
)
from mmlib.data.captions import parse_caption


def test_caption_relevance_only_checks_mentioned_attributes():
    items = np.array([[0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0]])
    captions = np.array([[0, 0, 9, 9, 9, 9], [0, 1, 0, 0, 0, 0]])
    mentioned = np.array([[True, True, False, False, False, False], [True] * 6])
    assert caption_relevance(captions, mentioned, items).tolist() == [[True, False, False], [False, True, False]]


def test_shared_relevance():
    a = np.array([[0, 1, 0, 0, 2, 0]])
    b = np.array([[0, 5, 0, 0, 2, 1], [1, 1, 0, 0, 2, 0]])
    assert shared_relevance(a, b, ["shape", "motion"]).tolist() == [[True, False]]
    with pytest.raises(ValueError, match="unknown attribute 'speed'"):
        shared_relevance(a, b, ["speed"])


def test_recall_at_k():
    similarity = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    relevant = np.array([[False, False, True], [False, False, True]])
    assert recall_at_k(similarity, relevant, 1) == 0.0
    assert recall_at_k(similarity, relevant, 2) == 0.5
    assert recall_at_k(similarity, relevant, 3) == 1.0
    with pytest.raises(ValueError, match="must match"):
        recall_at_k(similarity, relevant[:1], 1)


def test_zero_shot_prompts_state_only_their_value():
    world = World(seed=0)
    prompts = zero_shot_prompts(world, "color", prompts_per_value=8)
    assert list(prompts) == list(ATTRIBUTES["color"])
    for value, texts in prompts.items():
        assert len(set(texts)) >= 4  # several wordings
        assert all(parse_caption(text) == {"color": value} for text in texts)


def test_zero_shot_accuracy():
    classifier = torch.eye(3)
    embeddings = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8], [1.0, 0.0, 0.0]])
    assert zero_shot_accuracy(embeddings, classifier, np.array([0, 2, 1])) == pytest.approx(2 / 3)


def test_attribute_matrix_order():
    world = World(seed=0)
    scenes = world.scenes(world.split("test", 5))
    matrix = attribute_matrix(scenes)
    assert matrix.shape == (5, 6) and (matrix[:, 1] == scenes.attributes["color"]).all()
