"""Video tokenizers (registered kind ``tokenizer``): ``fsq-video`` (embedded), ``torchscript``
and ``fsq-video-simple`` (fsq-video with the codebook of the procedural simple clips).

``build_tokenizer("fsq-video")`` loads the shipped weights and ``build_tokenizer("torchscript",
path=FOLDER)`` a pretrained TorchScript folder such as a Cosmos DV tokenizer. Options are the
fields of the tokenizer's registered config (``--tokenizer-arg KEY=VALUE`` on the command line).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from localopt_plugin import registry
from localopt_plugin.errors import UserError
from localopt_plugin.tokenizers.base import VideoTokenizer
from localopt_plugin.tokenizers.fsq import FSQConfig, FSQVideoTokenizer
from localopt_plugin.tokenizers.torchscript import TorchScriptConfig, TorchScriptTokenizer

__all__ = ["FSQConfig", "FSQVideoTokenizer", "TorchScriptConfig", "TorchScriptTokenizer",
           "VideoTokenizer", "build_tokenizer"]


def build_tokenizer(name: str, **options: Any) -> VideoTokenizer:
    """The registered tokenizer ``name`` with its config built from ``options``."""
    component = registry.get("tokenizer", name)
    config = None
    if component.config is not None:
        fields = {f.name for f in dataclasses.fields(component.config)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise UserError(f"tokenizer {name!r} has no option {', '.join(unknown)}; its "
                            f"options are {', '.join(sorted(fields)) or '(none)'}")
        try:
            config = component.config(**options)
        except TypeError as err:
            raise UserError(f"tokenizer {name!r} needs more options: {err}") from None
    elif options:
        raise UserError(f"tokenizer {name!r} takes no options")
    return component.build(config)
