"""Shared fixtures: tiny models of every family on disk, and the offline data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

from prunelab.models import TINY_ARCHS, save_tiny  # noqa: E402
from prunelab.paths import shared_data_dir  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny checkpoint (with byte tokenizer) per architecture."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, root / arch) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if not (d / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.fail(f"offline data not found at {d}: CI must have ../shared beside the repo")
    return d


@pytest.fixture
def one_thread_unless_slow(request: pytest.FixtureRequest):
    """Tiny models gain nothing from threads, and on a busy shared box OpenMP barriers cost seconds."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """The first ~12 kB of WikiText-2 test: enough for 64-token windows, fast to tokenize."""
    text = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:12000]
    path = tmp_path_factory.mktemp("text") / "wiki.small.raw"
    path.write_text(text, encoding="utf-8")
    return path
