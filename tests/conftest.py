import pytest
import torch

from mmlib import config as course_config
from mmlib.autoencoder import AutoencoderConfig, build_autoencoder
from mmlib.data import World
from mmlib.decoders import CONFIGS, train_decoder
from mmlib.encoders import TextEncoder, TextEncoderConfig
from mmlib.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """The course tokenizer, trained once per test session (about 2 s)."""
    return train_tokenizer(World(seed=0))


TINY_UNET = {"block_out_channels": [8, 16], "attention_head_dim": 4, "norm_num_groups": 4, "steps": 6,
             "batch_size": 4, "training_scenes": 16}


def tiny_config(modality, **extra):
    return course_config.make_config(CONFIGS[modality], {"unet": TINY_UNET, "inference_steps": 2,
                                                         "snapshots": [3], **extra})


@pytest.fixture(scope="session")
def text(tokenizer):
    torch.manual_seed(0)
    return TextEncoder(TextEncoderConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32), tokenizer)


@pytest.fixture(scope="session")
def vaes():
    torch.manual_seed(0)
    small = dict(block_out_channels=(8, 8, 8), norm_num_groups=4)
    return {"image": build_autoencoder(AutoencoderConfig(**small)),
            "audio": build_autoencoder(AutoencoderConfig(channels=1, **small))}


@pytest.fixture(scope="session")
def decoders(text, vaes):
    """Untrained-quality tiny decoders (a few steps each): real pipelines, fast to build."""
    world = World(seed=0)
    trained = {modality: train_decoder(modality, tiny_config(modality), world, vae=vaes[modality], text=text)
               for modality in ("image", "audio")}
    trained["video"] = train_decoder("video", tiny_config("video"), world, image_decoder=trained["image"])
    return trained


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`python -m mmlib.train --stage 1 2 3 --steps 3` in one process, once per session: (folder, histories).

    On the CPU even where a GPU is present: it is the reference the 2-process CPU run must match
    (a CUDA run differs in the last digits: TF32 convolutions, other reduction orders).
    """
    from mmlib.train import run_stages

    folder = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MMLIB_DEVICE", "cpu")
        return folder, run_stages([1, 2, 3], folder, steps=3)
