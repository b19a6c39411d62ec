"""The platform module's environment defaults."""

from __future__ import annotations

import os
import sys

from localopt_plugin.platform import configure_environment

OWN = "LOCALOPT_DEFAULT_TORCH_EXTENSIONS_DIR"


def test_each_environment_builds_its_ops_in_its_own_folder(monkeypatch):
    """A child in another environment (Megatron-LM's Python 3.12 launched from the 3.11 one)
    that inherits the parent's default folder gets its own, never a build for another Python;
    a folder the user set is kept."""
    ours = os.path.join(sys.prefix, "torch_extensions")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.delenv(OWN, raising=False)
    configure_environment()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == ours

    parents = "/elsewhere/.venv/torch_extensions"  # what a parent environment chose
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", parents)
    monkeypatch.setenv(OWN, parents)
    configure_environment()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == ours

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/users/choice")
    configure_environment()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/users/choice"
