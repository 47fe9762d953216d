"""The course tokenizer: byte-level BPE trained on the world's text, as a transformers tokenizer.

Introduced in `01_contrastive_encoders.ipynb`; every text model of the course (the CLIP text
encoder, the diffusion decoders' text encoder, the LLM) reads text through it.

- Byte-level BPE (as GPT-2 and CLIP use) trained with the `tokenizers` library on captions of
  every split, held-out shape-color pairs included, plus the words in
  ``data/captions/extra_words.txt`` that later lessons' questions and dialogues use. Bytes are
  its base alphabet, so it can encode any text, even words it never saw.
- Wrapped as a `transformers` `PreTrainedTokenizerFast`: ``save_pretrained``/``from_pretrained``,
  padding, attention masks and ``<s> ... </s>`` around every sequence.
- Special tokens reserved for later lessons: one placeholder per input modality (``<image>``,
  ``<audio>``, ...), which lesson 4 replaces with projected embeddings. Signal tokens (lesson 5)
  are appended to the end of the vocabulary when that lesson adds them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mmlib import zoo
from mmlib.data import World
from mmlib.data.captions import corpus_words, data_file

# The end-of-text id must not be 2: transformers' CLIPTextModel treats eos_token_id == 2 as an
# old config and pools at the largest token id instead of at the end of the text.
SPECIAL_TOKENS = ("<pad>", "<s>", "<unk>", "</s>")
MODALITY_TOKENS = {
    "image": "<image>",
    "audio": "<audio>",
    "video": "<video>",
    "depth": "<depth>",
    "thermal": "<thermal>",
    "imu": "<imu>",
}
VOCAB_SIZE = 1024  # bytes (256) + specials + merges: enough to make every listed word one token
MAX_LENGTH = 32  # captions are at most ~20 tokens with <s> and </s>


def placeholder_tokens() -> list[AddedToken]:
    """The placeholders as added tokens. lstrip: the space before one belongs to it ("a <image>" is
    two tokens, not three), in the course tokenizer and in any pretrained one they are added to."""
    return [AddedToken(token, lstrip=True, special=True) for token in MODALITY_TOKENS.values()]


def extra_words() -> list[str]:
    """Words of later lessons' questions and dialogues (``data/captions/extra_words.txt``)."""
    lines = data_file("captions", "extra_words.txt").read_text().splitlines()
    return [word for line in lines if not line.startswith("#") for word in line.split()]


def training_corpus(world: World, captions_per_split: int = 4000) -> list[str]:
    """Captions from every split (held-out pairs included) and the course's word lists."""
    texts = []
    for split in ("train", "heldout"):
        scenes = world.scenes(world.split(split, captions_per_split))
        for mention in ("random", "all"):
            texts += world.captions(scenes, mention=mention)[0]
    # Each listed word 50 times: BPE merges what is frequent, and these words are rare in captions.
    return texts + (corpus_words() + extra_words()) * 50


def train_tokenizer(world: World | None = None, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the course's byte-level BPE on the world's text and wrap it for transformers."""
    world = world or World()
    placeholders = placeholder_tokens()
    special = list(SPECIAL_TOKENS) + placeholders
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # "red" and " red" alike
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(training_corpus(world), trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", bpe.token_to_id("<s>")), ("</s>", bpe.token_to_id("</s>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=placeholders,
        model_max_length=MAX_LENGTH,
    )


def check_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    """Raise if the tokenizer breaks a promise later lessons rely on."""
    if tokenizer.eos_token_id == 2:
        raise ValueError("the end-of-text id must not be 2 (CLIPTextModel would pool at the wrong place)")
    for token in MODALITY_TOKENS.values():
        if len(tokenizer.tokenize(token)) != 1:
            raise ValueError(f"{token} must be a single token")


@zoo.entry("tokenizer", load=lambda folder: PreTrainedTokenizerFast.from_pretrained(folder),
           description="byte-level BPE over the world's text", lesson="01_contrastive_encoders.ipynb")
def _train_zoo_tokenizer(folder: Path) -> None:
    tokenizer = train_tokenizer(World())
    check_tokenizer(tokenizer)
    tokenizer.save_pretrained(folder)


def tokens_per_word(tokenizer: PreTrainedTokenizerFast, words: list[str]) -> float:
    """Average number of tokens per word: 1.0 means every word is a single token."""
    return float(np.mean([len(tokenizer.tokenize(" " + word)) for word in words]))
