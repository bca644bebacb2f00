"""Fixtures of the merge tests: θ0 and three branches, tiny Llamas saved as safetensors."""

from pathlib import Path

import pytest
from merge_models import save_model


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return save_model(tmp_path / "base")


@pytest.fixture
def branches(tmp_path: Path) -> list[Path]:
    return [save_model(tmp_path / f"branch{k}", seed=k + 1) for k in range(3)]
