"""Shared fixtures of tests/ (the 8-device CPU mesh is set up by the repository's root conftest.py)."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import pytest


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


class Checkpoint(NamedTuple):
    path: str  # the checkpoint directory
    hf: Any  # the HF torch model saved there (float32, eager attention)


@pytest.fixture(scope="session")
def tiny_checkpoint(ckpt_root):
    """A factory of tiny random HF checkpoints, each built once per session under ckpt_root/<name>:

        tiny_checkpoint(name, seed, maker=hf_reference.make_text_checkpoint, tokenizer=False, **overrides)
            -> Checkpoint(path, hf)

    `maker(path, seed=seed, **overrides)` builds it (make_text_checkpoint, make_audio_checkpoint,
    make_multimodal_checkpoint, mm_fixtures.make_mm_checkpoint); tokenizer=True adds the byte-level demo tokenizer
    and makes the vocabulary its 512 ids. A second request for the same recipe (maker, seed, tokenizer, overrides)
    gets the same checkpoint, from any test file. Treat it as read-only: copy the directory before editing it.
    """
    from helpers import BYTE_VOCAB
    from hf_reference import make_text_checkpoint

    built: dict[str, Checkpoint] = {}
    names: dict[str, str] = {}

    def make(name: str, seed: int, maker=make_text_checkpoint, tokenizer: bool = False, **overrides) -> Checkpoint:
        if tokenizer:
            overrides = {"vocab_size": BYTE_VOCAB, "vocab_size_per_layer_input": BYTE_VOCAB, **overrides}
        recipe = json.dumps([f"{maker.__module__}.{maker.__qualname__}", seed, tokenizer, overrides], sort_keys=True)
        if recipe in built:
            return built[recipe]
        if names.get(name, recipe) != recipe:
            raise ValueError(f"tiny checkpoint {name!r} was already built from another recipe: {names[name]}")
        path = str(ckpt_root / name)
        hf = maker(path, seed=seed, **overrides)
        if tokenizer:
            from gemma4_jax.serving.demo import save_byte_level_tokenizer

            save_byte_level_tokenizer(path)
        names[name] = recipe
        built[recipe] = Checkpoint(path, hf)
        return built[recipe]

    return make
