import pytest
import torch
from transformers import CLIPConfig, CLIPModel, LlamaForCausalLM

from mmlib import config as course_config
from mmlib.data import World
from mmlib.encoders import ConvEncoderConfig, ImuEncoderConfig, build_encoders, count_parameters, tower_spec
from mmlib.input_projection import (InputProjection, InputProjectionConfig, MultimodalLLM, Stage1Config,
                                    attribute_accuracy, build_multimodal_llm, caption_accuracy, caption_batch, caption_prompt,
                                    encoder_dim, load_stage1, save_stage1, train_stage1)
from mmlib.llm import LLMConfig, TrainedLLM, build_llm, llama_config, train_llm

TINY_LLM = LLMConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)


@pytest.fixture(scope="module")
def model(tokenizer):
    """Random encoders (image, audio, imu) and a random one-layer LLM, linked by an MLP with 3 tokens."""
    encoders = build_encoders({
        "image": tower_spec("conv", ConvEncoderConfig(width=8, hidden=0, embed_dim=16)),
        "audio": tower_spec("audio", ConvEncoderConfig(in_channels=1, width=8, hidden=0, embed_dim=16)),
        "imu": tower_spec("imu", ImuEncoderConfig(width=8, embed_dim=16)),
    }).eval()
    llm = TrainedLLM(build_llm(tokenizer, TINY_LLM), tokenizer)
    return build_multimodal_llm(encoders, llm, InputProjectionConfig(kind="mlp", tokens=3))


def embeddings(model, modality, n, world=World(seed=0)):
    scenes = world.scenes(world.split("val", n))
    return model.encode(modality, torch.from_numpy(world.render(modality, scenes)))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("tokens", [1, 4])
def test_projection_shapes(kind, tokens):
    projection = InputProjection(16, 32, InputProjectionConfig(kind=kind, tokens=tokens))
    assert projection(torch.randn(5, 16)).shape == (5, tokens, 32)
    with pytest.raises(ValueError, match=r"\(batch, 16\)"):
        projection(torch.randn(5, 8))


def test_unknown_projection_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match="linear, mlp"):
        InputProjection(16, 32, InputProjectionConfig(kind="qformer"))


def test_splice_puts_projected_vectors_at_the_placeholders_and_scores_only_the_answer(model):
    image, audio = embeddings(model, "image", 1)[0], embeddings(model, "audio", 1)[0]
    prompts = ["question: <image> and <audio> describe them. answer:", caption_prompt("imu")]
    inputs = [[("image", image), ("audio", audio)], [("imu", embeddings(model, "imu", 1)[0])]]
    answers = ["a red circle", "a hot thing"]
    batch = model.prepare(prompts, inputs, answers)
    tok, k = model.tokenizer, 3
    ids = [tok.bos_token_id] + tok(prompts[0], add_special_tokens=False)["input_ids"]
    first = ids.index(tok.convert_tokens_to_ids("<image>"))
    with torch.no_grad():
        projected = model.projection(torch.stack([image, audio]))  # (2, k, H)
        assert torch.allclose(batch["inputs_embeds"][0, first:first + k], projected[0])
        second = ids.index(tok.convert_tokens_to_ids("<audio>")) + (k - 1)  # shifted by the first input's extra k-1
        assert torch.allclose(batch["inputs_embeds"][0, second:second + k], projected[1])
    answer_ids = tok(" a red circle", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labels = batch["labels"][0]
    length = len(ids) + 2 * (k - 1) + len(answer_ids)
    assert labels[:length - len(answer_ids)].eq(-100).all()  # prompt and spliced positions are not scored
    assert labels[length - len(answer_ids):length].tolist() == answer_ids
    assert batch["attention_mask"][0].sum() == length


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_either_side_gives_each_sequence_its_unpadded_loss(model, side):
    world = World(seed=0)
    scenes = world.scenes(world.split("val", 5))
    prompts, inputs, answers, kinds = caption_batch(model, world, ("image", "audio", "imu"), scenes, 0)
    assert len(set(map(len, answers))) > 1  # different lengths, so there is padding
    batch = model.prepare(prompts, inputs, answers, padding_side=side)
    mask = batch["attention_mask"]
    assert (batch["position_ids"][mask == 1] == torch.cat([torch.arange(int(n)) for n in mask.sum(1)])).all()
    together = model.answer_loss(batch)
    alone = torch.cat([model.answer_loss(model.prepare(prompts[i:i + 1], inputs[i:i + 1], answers[i:i + 1]))
                       for i in range(5)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_batched_generation_matches_one_at_a_time(model):
    vectors = embeddings(model, "image", 3)
    prompts = [caption_prompt("image"), "question: <image> what color is it? answer:", "question: <image> hi. answer:"]
    inputs = [[("image", v)] for v in vectors]
    assert model.generate(prompts, inputs, 5) == [model.generate([p], [x], 5)[0] for p, x in zip(prompts, inputs)]


def test_placeholder_count_mismatch_is_a_clear_error(model):
    image = embeddings(model, "image", 1)[0]
    with pytest.raises(ValueError, match=r"prompt 0 has 2 placeholder\(s\) \(<image>, <audio>\) but 1 input\(s\)"):
        model.prepare(["<image> and <audio>"], [[("image", image)]])
    with pytest.raises(ValueError, match=r"0 placeholder\(s\) \(none\) but 1 input"):
        model.prepare(["no placeholder here"], [[("image", image)]])
    with pytest.raises(ValueError, match="in the order they appear"):
        model.prepare(["<audio> then <image>"], [[("image", image), ("audio", image)]])


def test_a_modality_the_encoder_lacks_is_a_clear_error(model):
    with pytest.raises(ValueError, match="cannot read 'depth' inputs; its encoder reads: image, audio, imu"):
        model.encode("depth", torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="'thermal', which the encoder lacks"):
        model.prepare(["<thermal>"], [[("thermal", torch.zeros(16))]])


def test_stage1_trains_the_projection_alone(tokenizer, tmp_path):
    encoders = build_encoders({"image": tower_spec("conv", ConvEncoderConfig(width=8, hidden=0, embed_dim=16))}).eval()
    pretrained = LLMConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, steps=60, batch_size=16, lr=1e-2)
    llm = TrainedLLM(train_llm(tokenizer, pretrained, World(seed=0))[0], tokenizer)  # a few steps: it knows captions
    model = build_multimodal_llm(encoders, llm, InputProjectionConfig(kind="linear", tokens=2))
    frozen = {name: p.clone() for name, p in [*model.llm.named_parameters(), *model.encoders.named_parameters()]}
    before = [p.clone() for p in model.projection.parameters()]
    assert count_parameters(model, trainable_only=True) == count_parameters(model.projection)  # all else frozen
    world = World(seed=0)
    fixed = caption_batch(model, world, ("image",), world.scenes(world.split("val", 16)), 0)[:3]
    with torch.no_grad():
        start = model.answer_loss(model.prepare(*fixed)).mean()
    history = train_stage1(model, Stage1Config(modalities=("image",), steps=40, batch_size=8, lr=5e-2), World(seed=0))
    assert len(history.loss["image"]) == 40
    with torch.no_grad():  # the frozen LLM reads the projected tokens
        assert model.answer_loss(model.prepare(*fixed)).mean() < start - 0.005  # (the real LLM of lesson 4 drops by ~2 nats)
    for name, p in [*model.llm.named_parameters(), *model.encoders.named_parameters()]:
        assert torch.equal(p, frozen[name]), name
    assert all(not torch.equal(a, b) for a, b in zip(before, model.projection.parameters()))
    assert count_parameters(model, trainable_only=True) == count_parameters(model.projection)
    save_stage1(model, history, tmp_path)
    loaded, loaded_history = load_stage1(tmp_path, encoders, llm)
    assert loaded_history.loss == history.loss
    for a, b in zip(model.projection.parameters(), loaded.projection.parameters()):
        assert torch.equal(a, b)
    world = World(seed=0)
    accuracy, captions = caption_accuracy(loaded, world, world.scenes(world.split("test", 4)), "image")
    assert set(accuracy) == {"shape", "color", "size", "position", "motion", "temperature"} and len(captions) == 4


def test_attribute_accuracy_grades_each_caption_against_its_own_scene():
    scenes = World(seed=0).compose(3, shape="circle", color="red")
    captions = ["a red circle", "a blue circle", ""]  # the empty one states nothing: wrong, not skipped
    assert attribute_accuracy(captions, scenes, ("shape", "color")) == {"shape": 2 / 3, "color": 1 / 3}


def test_full_scale_input_projection_is_nextgpts_linear_layer(tokenizer):
    """ImageBind-Huge's 1024-d space -> Vicuna-7B's 4096-d embeddings: NExT-GPT's ~4.2M parameters."""
    stage1 = course_config.scale_config("stage1", Stage1Config, "full")
    llm_config = course_config.scale_config("llm", LLMConfig, "full")

    class ViTH14(torch.nn.Module):  # what load_imagebind() returns at full scale: a CLIP whose projection_dim we read
        def __init__(self):
            super().__init__()
            self.model = CLIPModel(CLIPConfig(projection_dim=1024,
                                              text_config={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
                                              vision_config={"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16}))
            self.modalities = ["image", "text"]

    with torch.device("meta"):
        encoders = ViTH14()
        llm = TrainedLLM(LlamaForCausalLM(llama_config(None, llm_config)), tokenizer)
        model = build_multimodal_llm(encoders, llm, stage1.projection)
    assert encoder_dim(encoders) == 1024
    assert count_parameters(model.projection) == 1024 * 4096 + 4096  # 4,198,400
    assert count_parameters(model, trainable_only=True) == count_parameters(model.projection)  # stage 1's only
