import pytest
from transformers import PreTrainedTokenizerFast

from mmlib.data import World, corpus_words
from mmlib.tokenizer import MODALITY_TOKENS, check_tokenizer, extra_words, tokens_per_word, train_tokenizer


def test_every_caption_word_is_one_token(tokenizer):
    assert tokens_per_word(tokenizer, corpus_words()) == 1.0
    assert tokens_per_word(tokenizer, extra_words()) < 1.05  # "it's" splits at the apostrophe


def test_captions_get_bos_eos_and_padding(tokenizer):
    batch = tokenizer(["a red circle", "a small blue square rising"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0, 4] == tokenizer.eos_token_id
    assert ids.shape == (2, 7) and mask[0].tolist() == [1] * 5 + [0] * 2
    assert (ids[0, 5:] == tokenizer.pad_token_id).all()
    assert tokenizer.eos_token_id != 2  # CLIPTextModel's legacy pooling would kick in


def test_modality_placeholders_are_single_special_tokens(tokenizer):
    check_tokenizer(tokenizer)
    for token in MODALITY_TOKENS.values():
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert tokenizer(f"what is in this {token} ?")["input_ids"].count(token_id) == 1
        assert token in tokenizer.all_special_tokens
    ids = tokenizer("describe <audio> please")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True).split() == ["describe", "please"]


def test_unseen_words_still_encode_and_decode(tokenizer):
    text = "a zebra-striped dodecahedron!"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True).strip() == text


def test_heldout_captions_tokenize_like_train_ones(tokenizer):
    world = World(seed=0)
    texts, _ = world.captions(world.split("heldout", 200), mention="all")
    words = sum(len(t.split()) for t in texts)
    tokens = sum(len(tokenizer.tokenize(t)) for t in texts)
    assert tokens == words


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    text = "there is a huge violet disc <image> sinking"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.pad_token_id == tokenizer.pad_token_id and len(again) == len(tokenizer)


def test_training_is_deterministic(tokenizer):
    assert train_tokenizer(World(seed=0)).get_vocab() == tokenizer.get_vocab()


def test_check_tokenizer_rejects_eos_two(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    broken = PreTrainedTokenizerFast.from_pretrained(tmp_path, eos_token="<unk>")  # id 2
    with pytest.raises(ValueError, match="must not be 2"):
        check_tokenizer(broken)
