import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from mmlib import config as course_config
from mmlib.data import REVEALS, World
from mmlib.data.captions import parse_caption
from mmlib.llm import (KINDS, NOUNS, LLMConfig, TrainedLLM, build_llm, complete, llama_config, lm_batch, load_llm,
                       text_corpus, train_llm)
from mmlib.tokenizer import MODALITY_TOKENS

TINY = LLMConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, steps=40, batch_size=16, lr=1e-2)


def test_text_corpus_is_seeded_and_mixes_every_kind():
    world = World(seed=0)
    index = world.split("train", 400)
    texts = text_corpus(world, index, variant=3)
    assert texts == text_corpus(world, index, variant=3)
    assert texts != text_corpus(world, index, variant=4)
    assert sum(t.startswith("question:") and "describe this" in t for t in texts) > 100  # paraphrases and dialogues
    assert sum(not t.startswith("question:") for t in texts) > 20  # plain captions
    assert abs(sum(KINDS.values()) - 1) < 1e-9


def test_a_description_states_what_its_context_states_and_its_modality_carries():
    world = World(seed=1)
    texts = text_corpus(world, world.split("train", 300))
    paraphrases = [t for t in texts if "describe this" in t and t.count("question:") == 1]
    assert len(paraphrases) > 50
    dropped = 0
    for text in paraphrases:
        question, answer = text.split(" answer: ")
        context, request = question[len("question: "):].split(" describe this ")
        modality = next(m for m, noun in NOUNS.items() if request == f"{noun}.")
        stated, said = parse_caption(context), parse_caption(answer)
        assert said == {name: value for name, value in stated.items() if name in REVEALS[modality]}, text
        dropped += len(said) < len(stated)
    assert dropped > 20  # descriptions of sounds, depth maps, ... leave out what those cannot carry


def test_lm_batch_ignores_padding(tokenizer):
    batch = lm_batch(tokenizer, ["a red circle", "there is a small blue square in the top left"])
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 1] == batch["input_ids"][batch["attention_mask"] == 1]).all()


def test_pretraining_lowers_the_next_token_loss(tokenizer):
    model, history = train_llm(tokenizer, TINY, World(seed=0))
    losses = history.loss["L(LLM)"]
    assert len(losses) == TINY.steps
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])


def test_trained_llm_round_trips_through_safetensors(tokenizer, tmp_path):
    model = build_llm(tokenizer, TINY)
    TrainedLLM(model, tokenizer).save(tmp_path)
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    loaded = TrainedLLM.load(tmp_path)
    ids = tokenizer(["a red circle"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded.model(ids).logits)
    prompts = ["a red", "there is a small blue"]  # greedy completion of a batch matches one by one
    assert complete(loaded.model, loaded.tokenizer, prompts, 6) == [complete(loaded.model, loaded.tokenizer, [p], 6)[0]
                                                                   for p in prompts]


def _plain_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with no placeholder tokens and no pad token, as a downloaded LLM's would be."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["a red circle in the top left"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_load_llm_from_a_local_pretrained_checkpoint_adds_the_placeholders(tmp_path):
    tokenizer = _plain_tokenizer()
    old = len(tokenizer)
    model = LlamaForCausalLM(llama_config(tokenizer, TINY))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    llm = load_llm(LLMConfig(pretrained=str(tmp_path)))
    for token in MODALITY_TOKENS.values():
        assert len(llm.tokenizer.tokenize(token)) == 1
        # as in the course tokenizer, the space before a placeholder is part of it
        assert len(llm.tokenizer.tokenize(f"a {token} a")) == len(llm.tokenizer.tokenize("a a")) + 1
    assert llm.model.get_input_embeddings().num_embeddings >= len(llm.tokenizer)
    assert llm.tokenizer.pad_token is not None
    with torch.no_grad():  # the old rows are the checkpoint's
        assert torch.equal(llm.model.get_input_embeddings().weight[:old], model.get_input_embeddings().weight[:old])
    # and the loaded LLM links to an encoder like the tiny one: a placeholder becomes projected vectors
    from mmlib.encoders import ConvEncoderConfig, build_encoders, tower_spec
    from mmlib.input_projection import build_multimodal_llm, caption_prompt

    encoders = build_encoders({"image": tower_spec("conv", ConvEncoderConfig(width=8, hidden=0, embed_dim=16))}).eval()
    linked = build_multimodal_llm(encoders, llm)
    world = World(seed=0)
    pictures = torch.from_numpy(world.image(world.scenes(world.split("test", 2))))
    assert len(linked.caption("image", pictures, max_new_tokens=3)) == 2
    embedding = linked.encode("image", pictures)[0]
    batch = linked.prepare([caption_prompt("image")], [[("image", embedding)]], ["a red circle"])
    assert batch["inputs_embeds"].shape[-1] == TINY.hidden_size


def test_vicuna_7b_builds_at_full_size_on_the_meta_device():
    config = course_config.scale_config("llm", LLMConfig, "full")
    assert config.pretrained == "lmsys/vicuna-7b-v1.5"
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(None, config))
    total = sum(p.numel() for p in model.parameters())
    assert total == pytest.approx(6.74e9, rel=0.01)  # Vicuna-7B / Llama-2-7B: 6,738,415,616
    assert model.config.hidden_size == 4096


def test_a_checkpoint_published_as_pickles_is_refused_with_how_to_convert_it(tmp_path):
    tokenizer = _plain_tokenizer()
    model = LlamaForCausalLM(llama_config(tokenizer, TINY))
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # as older hub repos ship their weights
    with pytest.raises(OSError, match=r"holds no safetensors weights, and mmlib reads no others.*save_pretrained"):
        load_llm(LLMConfig(pretrained=str(tmp_path)))
