import copy

import pytest
import torch
import torch.nn.functional as F

from mmlib import config as course_config
from mmlib.data import World
from mmlib.diffusion import denoising_loss, noise_scheduler
from mmlib.encoders import ConvEncoderConfig, build_encoders, count_parameters, tower_spec
from mmlib.input_projection import InputProjectionConfig, build_multimodal_llm
from mmlib.llm import LLMConfig, TrainedLLM, build_llm
from mmlib.output_projection import (SIGNAL_INIT, OutputProjector, OutputProjectorConfig, SignalLLM, Stage2Config,
                                     add_signal_tokens, build_signal_llm, caption_alignment_loss, check_conditioning,
                                     alignment_targets, generation_loss, load_stage2, projector_for, request,
                                     save_stage2, signal_names, signal_nll, stage2_requests, target_captions,
                                     train_stage2)

TINY_LLM = LLMConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
TINY_STAGE2 = dict(projector=OutputProjectorConfig(kind="mlp", feedforward=32), signal_tokens={"image": 2, "audio": 2, "video": 2},
                   steps=3, batch_size=4, generation_batch={"image": 2, "audio": 2, "video": 1}, training_scenes=8)


def base_model(tokenizer):
    """A random one-layer LLM over its own copy of the tokenizer (signal tokens are added to it)."""
    tokenizer = copy.deepcopy(tokenizer)
    torch.manual_seed(0)
    encoders = build_encoders({"image": tower_spec("conv", ConvEncoderConfig(width=8, hidden=0, embed_dim=16))}).eval()
    return build_multimodal_llm(encoders, TrainedLLM(build_llm(tokenizer, TINY_LLM), tokenizer),
                                InputProjectionConfig(kind="mlp", tokens=2))


@pytest.fixture(scope="module")
def frozen(decoders):
    """Copies of the session's tiny decoders: stage 2 freezes its decoders, the session's stay as they are."""
    return {modality: copy.deepcopy(decoder) for modality, decoder in decoders.items()}


@pytest.fixture(scope="module")
def trained(tokenizer, frozen):
    """Stage 2 for a few steps on all three terms and all three tiny decoders."""
    model = build_signal_llm(base_model(tokenizer), frozen, Stage2Config(**TINY_STAGE2))
    embed = model.base.llm.get_input_embeddings().weight.detach().clone()
    head = model.base.llm.get_output_embeddings().weight.detach().clone()
    projectors = copy.deepcopy(model.projectors)
    history = train_stage2(model, Stage2Config(**TINY_STAGE2), World(seed=0))
    return model, history, (embed, head, projectors)


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_projector_maps_signal_states_to_the_decoders_conditioning_shape(kind):
    config = OutputProjectorConfig(kind=kind, width=16, heads=2, feedforward=32)
    projector = projector_for((32, 24), llm_dim=40, signal_tokens=4, config=config)
    assert projector(torch.randn(3, 4, 40)).shape == (3, 32, 24)
    with pytest.raises(ValueError, match=r"\(batch, 4, 40\); got \(3, 5, 40\)"):
        projector(torch.randn(3, 5, 40))


def test_unknown_projector_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match="transformer.*mlp"):
        OutputProjector(8, 2, 4, 8, OutputProjectorConfig(kind="lstm"))


def test_transformer_projector_has_one_distinct_learned_query_per_output_token():
    projector = OutputProjector(8, 2, 6, 8, OutputProjectorConfig(width=16, heads=2))
    out = projector(torch.randn(1, 2, 8))[0]  # (6, 8)
    assert projector.queries.shape == (6, 16) and projector.queries.requires_grad
    assert torch.cdist(out, out).triu(1)[torch.ones(6, 6).triu(1).bool()].min() > 1e-4  # no two outputs alike


def test_signal_nll_is_the_mean_cross_entropy_of_the_scored_next_tokens():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 7, 2], [-100, 4, 9, -100, -100]])
    reference = [-F.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for b in range(2) for t in range(1, 5) if labels[b, t] >= 0]
    assert torch.allclose(signal_nll(logits, labels), torch.stack(reference).mean())


def test_caption_alignment_loss_is_the_mean_per_token_euclidean_distance():
    u, v = torch.randn(3, 7, 5), torch.randn(3, 7, 5)
    reference = torch.tensor([[torch.dist(u[b, t], v[b, t]).item() for t in range(7)] for b in range(3)]).mean()
    assert torch.allclose(caption_alignment_loss(u, v), reference, atol=1e-6)
    assert caption_alignment_loss(v, v) == 0
    near = v.clone()
    near[:, 0] += 0.01  # one token slightly off: its gradient still has unit length (MSE's would be ~0.02)
    near.requires_grad_(True)
    caption_alignment_loss(near, v).backward()
    assert torch.allclose(near.grad[:, 0].norm(dim=-1), torch.full((3,), 1 / 21))
    with pytest.raises(ValueError, match="differ"):
        caption_alignment_loss(u, v[:, :6])


def test_generation_loss_is_lesson_3s_denoising_loss_and_trains_only_the_condition(frozen):
    decoder = frozen["image"]
    decoder.pipeline.unet.requires_grad_(False)
    scheduler = noise_scheduler(decoder.config.unet.prediction_type)
    condition = torch.randn(2, *decoder.conditioning_shape, requires_grad=True)
    unet = decoder.pipeline.unet.config
    latents = torch.randn(2, unet.in_channels, unet.sample_size, unet.sample_size)
    loss = generation_loss(decoder, scheduler, condition, latents, torch.Generator().manual_seed(1))
    reference = denoising_loss(decoder.pipeline.unet, scheduler, latents, condition, torch.Generator().manual_seed(1))
    assert torch.allclose(loss, reference)
    loss.backward()
    assert condition.grad is not None and condition.grad.abs().sum() > 0
    assert all(p.grad is None for p in decoder.pipeline.unet.parameters())


def test_signal_tokens_are_single_new_tokens_with_rows_started_from_words(tokenizer):
    base = base_model(tokenizer)
    old = base.llm.get_input_embeddings().num_embeddings
    ids = add_signal_tokens(base.llm, base.tokenizer, {"image": 4, "audio": 2})
    assert ids["image"] == list(range(old, old + 4)) and ids["audio"] == list(range(old + 4, old + 6))
    text = f"question: draw it. answer: {''.join(signal_names('image', 4))}"
    assert base.tokenizer(text, add_special_tokens=False)["input_ids"][-4:] == ids["image"]  # one token each
    embed, head = base.llm.get_input_embeddings().weight, base.llm.get_output_embeddings().weight
    for j, row in enumerate(ids["image"]):
        word = base.tokenizer(" " + SIGNAL_INIT[j], add_special_tokens=False)["input_ids"][0]
        assert torch.equal(embed[row], embed[word])
    assert torch.allclose(head[old:], head[:old].mean(0).expand(6, -1))
    assert add_signal_tokens(base.llm, base.tokenizer, {"image": 4}) == {"image": ids["image"]}  # adding again: no-op


def test_stage2_trains_only_the_new_rows_and_the_projectors(trained):
    """NExT-GPT's resize made every embedding row trainable (its issues #40, #71); here the old rows stay put."""
    model, history, (embed, head, projectors) = trained
    new = [i for ids in model.signals.values() for i in ids]
    old = torch.ones(len(embed), dtype=torch.bool)
    old[new] = False
    after_embed = model.base.llm.get_input_embeddings().weight
    after_head = model.base.llm.get_output_embeddings().weight
    assert torch.equal(after_embed[old], embed[old]) and torch.equal(after_head[old], head[old])
    assert not torch.equal(after_embed[new], embed[new]) and not torch.equal(after_head[new], head[new])
    assert all(not torch.equal(a, b) for a, b in zip(projectors.parameters(), model.projectors.parameters()))
    assert type(model.base.llm).__name__ == "LlamaForCausalLM"  # peft's wrapper merged away after training
    assert set(history.loss) == {f"{m} {t}" for m in ("image", "audio", "video") for t in ("nll", "alignment", "generation")}
    assert all(len(curve) == 3 for curve in history.loss.values())


def test_the_nll_term_scores_the_signal_tokens_and_not_the_end_of_text(trained):
    model, _, _ = trained
    prompts = [request("image", "a red circle"), request("image", "a big blue square moving up", 1)]
    nll = model.losses("image", ["a red circle", "a big blue square moving up"], ["a red circle"] * 2, None,
                       terms=("nll",))["nll"]
    batch = model.base.prepare(prompts, [[], []], [model.answer("image")] * 2)
    with torch.no_grad():
        logits = model.base.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                                position_ids=batch["position_ids"]).logits
    signals = model.signals["image"]
    scored = [-F.log_softmax(logits[b, t - 1], -1)[batch["labels"][b, t]] for b in range(2)
              for t in range(1, logits.shape[1]) if batch["labels"][b, t] in signals]
    assert len(scored) == 2 * len(signals)
    assert torch.allclose(nll, torch.stack(scored).mean(), atol=1e-5)


def test_stage2s_alignment_targets_encoded_once_are_each_steps_text_states(trained):
    """train_stage2 encodes its scenes' target captions once (the text encoder is frozen): a step's rows
    must be the states of that step's own targets, and the loss given them the loss given the captions."""
    model, _, _ = trained
    world = World(seed=0)
    scenes = world.scenes(world.split("train", 10))
    rows = torch.tensor([7, 2, 2, 9])
    for modality in ("image", "audio", "video"):
        encoded = alignment_targets(model.decoders[modality], scenes, modality, batch_size=4)  # 3 uneven batches
        captions, targets = stage2_requests(world, scenes[rows.numpy()], modality, 5)
        assert targets == target_captions(scenes[rows.numpy()], modality)
        assert torch.allclose(encoded[rows], model.decoders[modality].prompt_embeds(targets), atol=1e-6)
        with torch.no_grad():
            given = model.losses(modality, captions, encoded[rows], None, terms=("alignment",))["alignment"]
            own = model.losses(modality, captions, targets, None, terms=("alignment",))["alignment"]
        assert torch.allclose(given, own, atol=1e-6)


def test_stage2_learns_to_ask_and_align(tokenizer, frozen):
    """Rows and an image projector only, on a random LLM: NLL and alignment both fall."""
    config = Stage2Config(**{**TINY_STAGE2, "outputs": ("image",), "terms": ("nll", "alignment"), "steps": 60,
                             "batch_size": 16, "lr": 1e-2})
    model = build_signal_llm(base_model(tokenizer), {"image": frozen["image"]}, config)
    history = train_stage2(model, config, World(seed=0))
    for term in ("nll", "alignment"):
        curve = history.loss[f"image {term}"]
        assert sum(curve[-10:]) / 10 < 0.7 * sum(curve[:10]) / 10, term


def test_save_and_load_give_the_same_conditioning(trained, tokenizer, frozen, tmp_path):
    model, history, _ = trained
    config = Stage2Config(**TINY_STAGE2)
    save_stage2(model, history, config, tmp_path)
    loaded, loaded_history = load_stage2(tmp_path, base_model(tokenizer), frozen)
    assert loaded_history.loss == history.loss
    prompts = [request("image", "a red circle", 0), request("image", "a big blue square moving up", 1)]
    assert torch.allclose(loaded.project("image", prompts), model.project("image", prompts), atol=1e-6)


def writes(model, monkeypatch, text):
    """Make the LLM write `text` (greedy generation replaced), to test what respond does with it."""
    ids = model.base.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    monkeypatch.setattr(model.base.llm, "generate", lambda **kwargs: ids)


def test_an_answer_without_signal_tokens_is_text_only(trained, monkeypatch):
    model, _, _ = trained
    writes(model, monkeypatch, "a small red circle</s>")
    assert model.respond(["question: a red circle draw it. answer:"]) == [{"text": "a small red circle"}]
    assert model.asks(["question: a red circle draw it. answer:"]) == [None]


def test_the_answer_is_cut_at_the_first_signal_token_and_the_output_generated(trained, monkeypatch):
    model, _, _ = trained
    writes(model, monkeypatch, "here it is [IMG0][IMG1] and more")
    answer = model.respond(["question: a red circle draw it. answer:"])[0]
    assert answer["text"] == "here it is" and answer["image"].shape == (3, 32, 32)


def test_asking_for_an_output_without_a_decoder_is_a_clear_error(trained, monkeypatch):
    model, _, _ = trained
    partial = SignalLLM(model.base, model.signals, dict(model.projectors.items()),
                        {m: d for m, d in model.decoders.items() if m != "video"})
    writes(model, monkeypatch, "[VID0][VID1]")
    assert partial.asks(["question: a red circle film it. answer:"]) == ["video"]
    with pytest.raises(ValueError, match="asked for 'video', which has no decoder here"):
        partial.respond(["question: a red circle film it. answer:"])


def test_a_modality_without_a_decoder_is_a_clear_error(trained):
    model, _, _ = trained
    with pytest.raises(ValueError, match="no decoder for 'depth'.*image, audio, video"):
        model.project("depth", ["question: a red circle draw it. answer:"])
    with pytest.raises(ValueError, match="must hold the 2 signal tokens of image"):
        model.signal_states(torch.zeros(1, 3, 32), torch.tensor([[5, 6, 7]]), "image")
    with pytest.raises(ValueError, match="output modality"):
        request("thermal", "a red circle")


def test_recorded_conditioning_shape_must_match_the_decoder():
    config = Stage2Config(conditioning={"image": [77, 768]})
    check_conditioning(config, "image", (77, 768))
    with pytest.raises(ValueError, match=r"stage2.conditioning.image is \(77, 768\).*\(32, 64\)"):
        check_conditioning(config, "image", (32, 64))


def test_full_scale_projectors_are_nextgpts_size_on_the_meta_device():
    """SD v1.5 (77 x 768), AudioLDM (1 x 512), Zeroscope (77 x 1024) from Vicuna-7B's 4096-d states."""
    config = course_config.scale_config("stage2", Stage2Config, "full")
    assert config.signal_tokens == {"image": 4, "audio": 8, "video": 24}  # NExT-GPT's counts
    with torch.device("meta"):
        projectors = {m: projector_for(tuple(config.conditioning[m]), 4096, config.signal_tokens[m], config.projector)
                      for m in ("image", "audio", "video")}
    sizes = {m: count_parameters(p) for m, p in projectors.items()}
    assert all(25e6 < n < 40e6 for n in sizes.values()), sizes  # NExT-GPT: about 32M each
    out = projectors["video"](torch.empty(2, 24, 4096, device="meta"))
    assert out.shape == (2, 77, 1024)
