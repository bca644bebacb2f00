"""Shared fixtures: a tiny instruction-tuned-style base model and a small planted mixture.

Nothing here reads ../shared: a user's machine has none.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Plain helpers live in tiny_runs.py; re-exported for the tests that import them from here.
from tiny_runs import (  # noqa: F401
    TINY_RUN,
    build_tiny_base,
    make_tasks,
    write_mixture,
    write_run_config,
)


@pytest.fixture(scope="session")
def mixture_specs(tmp_path_factory) -> list[dict]:
    return write_mixture(tmp_path_factory.mktemp("mixture"))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    texts = []
    for rows in make_tasks().values():
        for r in rows:
            texts.append(json.dumps(r))
    return build_tiny_base(tmp_path_factory.mktemp("base") / "tiny-base", texts)


@pytest.fixture(scope="session")
def vlm_specs(tmp_path_factory) -> list[dict]:
    """The tiny image-text mixture: colour, count (LLaVA JSON), position (multiple choice) and
    same (two images per example), 40 examples each, 56×56 generated images."""
    from merit.demo_vision import write_image_mixture

    return write_image_mixture(tmp_path_factory.mktemp("images"), n=40)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory, vlm_specs) -> Path:
    """A tiny Qwen2-VL with random weights and a locally made processor, saved like a hub model."""
    from merit.demo_vision import build_tiny_vlm, mixture_texts

    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-vlm", mixture_texts(vlm_specs))
