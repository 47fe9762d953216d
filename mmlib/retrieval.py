"""Measuring a shared embedding space: retrieval recall@k and zero-shot classification.

Introduced in `01_contrastive_encoders.ipynb`; reused by `02_imagebind.ipynb`.

A retrieved item counts as a hit when it agrees with the query on what the query states: a
caption that mentions only "a red circle" is answered correctly by any red circle, whatever its
size or position. Between two non-text modalities, a hit agrees on every attribute both reveal.
"""

from __future__ import annotations

import numpy as np
import torch

from mmlib.data import ATTRIBUTES, World
from mmlib.data.world import Scenes, check_choice


def attribute_matrix(scenes: Scenes) -> np.ndarray:
    """(N, 6) attribute value ids in `ATTRIBUTES` order."""
    return np.stack([scenes.attributes[name] for name in ATTRIBUTES], axis=1)


def caption_relevance(caption_attributes: np.ndarray, mentioned: np.ndarray, item_attributes: np.ndarray) -> np.ndarray:
    """(Q, N) booleans: is caption q true of item n, on every attribute caption q mentions?

    caption_attributes, mentioned: (Q, 6); item_attributes: (N, 6).
    """
    agree = caption_attributes[:, None, :] == item_attributes[None, :, :]  # (Q, N, 6)
    return (agree | ~mentioned[:, None, :]).all(axis=2)


def shared_relevance(query_attributes: np.ndarray, item_attributes: np.ndarray, attributes) -> np.ndarray:
    """(Q, N) booleans: do query q and item n agree on every attribute in `attributes`?"""
    columns = [list(ATTRIBUTES).index(check_choice("attribute", a, list(ATTRIBUTES))) for a in attributes]
    return (query_attributes[:, None, columns] == item_attributes[None, :, columns]).all(axis=2)


def recall_at_k(similarity: torch.Tensor | np.ndarray, relevant: np.ndarray, k: int = 1) -> float:
    """Share of queries (rows) with at least one relevant item among their k most similar."""
    similarity = torch.as_tensor(similarity)
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and relevance {relevant.shape} must match")
    top = similarity.topk(k, dim=1).indices.cpu().numpy()  # (Q, k)
    return float(np.take_along_axis(relevant, top, axis=1).any(axis=1).mean())


@torch.no_grad()
def embed_in_batches(encoders, modality: str, data, batch_size: int = 500) -> torch.Tensor:
    """Embeddings of a large set, a batch at a time (tensors or lists of strings)."""
    parts = [encoders.embed(modality, data[i : i + batch_size]) for i in range(0, len(data), batch_size)]
    return torch.cat(parts).cpu()


@torch.no_grad()
def text_retrieval(encoders, modality: str, inputs, scenes: Scenes, texts: list[str], mentioned: np.ndarray,
                   ks=(1, 5)) -> dict[str, float]:
    """Recall@k from text to `modality` and back, one caption per scene, hits judged on attributes.

    Returns keys like ``"text->image R@1"`` and ``"image->text R@5"``.
    """
    x = embed_in_batches(encoders, modality, inputs)
    t = embed_in_batches(encoders, "text", texts)
    similarity = t @ x.T  # (captions, items)
    attributes = attribute_matrix(scenes)
    relevant = caption_relevance(attributes, mentioned, attributes)  # (captions, items)
    report = {}
    for k in ks:
        report[f"text->{modality} R@{k}"] = recall_at_k(similarity, relevant, k)
        report[f"{modality}->text R@{k}"] = recall_at_k(similarity.T, relevant.T, k)
    return report


def zero_shot_prompts(world: World, attribute: str, prompts_per_value: int = 16, key: int = 0) -> dict[str, list[str]]:
    """Captions that state only `attribute`, several wordings per value ("a crimson thing", ...)."""
    check_choice("attribute", attribute, list(ATTRIBUTES))
    prompts = {}
    for value in ATTRIBUTES[attribute]:
        scenes = world.compose(prompts_per_value, key=key, **{attribute: value})
        prompts[value] = world.captions(scenes, variant=np.arange(prompts_per_value), mention=(attribute,))[0]
    return prompts


@torch.no_grad()
def zero_shot_classifier(encoders, prompts: dict[str, list[str]]) -> torch.Tensor:
    """(values, D) class embeddings: the normalised mean of each value's prompt embeddings.

    Averaging several wordings ("prompt ensembling", as in CLIP) smooths out any one phrasing.
    """
    rows = [encoders.embed("text", texts).mean(dim=0) for texts in prompts.values()]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1).cpu()


def zero_shot_accuracy(embeddings: torch.Tensor, classifier: torch.Tensor, truth: np.ndarray) -> float:
    """Share of items whose most similar class embedding is their true value."""
    predicted = (embeddings @ classifier.T).argmax(dim=1).numpy()
    return float((predicted == np.asarray(truth)).mean())


def show_similarity(similarity, images, captions: list[str], title: str = "", ax=None):
    """Heatmap of caption (rows) x image (columns) cosine similarities, images drawn on top."""
    import textwrap

    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    similarity = torch.as_tensor(similarity).cpu().numpy()
    ax = ax or plt.subplots(figsize=(1.0 * len(captions) + 3.5, 0.55 * len(captions) + 1.2))[1]
    ax.imshow(similarity, cmap="viridis", vmin=-1, vmax=1)
    for (i, j), value in np.ndenumerate(similarity):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white" if value < 0.3 else "black")
    ax.set_yticks(range(len(captions)), [textwrap.shorten(c, 48) for c in captions], fontsize=7)
    ax.set_xticks([])
    for j, image in enumerate(torch.as_tensor(images).cpu().numpy()):
        picture = OffsetImage(image.transpose(1, 2, 0), zoom=0.9)
        ax.add_artist(AnnotationBbox(picture, (j, -0.5), box_alignment=(0.5, 0), frameon=False,
                                     annotation_clip=False))
    ax.set_title(title, fontsize=9, pad=42)
    return ax.figure
