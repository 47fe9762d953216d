import pytest

from mmlib.data import World
from mmlib.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """The course tokenizer, trained once per test session (about 2 s)."""
    return train_tokenizer(World(seed=0))
