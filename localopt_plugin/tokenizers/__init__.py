"""Video tokenizers (registered kind ``tokenizer``): ``fsq-video`` (embedded) and ``torchscript``.

Importing this package registers both; ``registry.build("tokenizer", "fsq-video")`` loads the
shipped weights and ``registry.build("tokenizer", "torchscript", path=FOLDER)`` a pretrained
TorchScript folder such as a Cosmos DV tokenizer.
"""

from localopt_plugin.tokenizers.base import VideoTokenizer
from localopt_plugin.tokenizers.fsq import FSQVideoTokenizer
from localopt_plugin.tokenizers.torchscript import TorchScriptTokenizer

__all__ = ["FSQVideoTokenizer", "TorchScriptTokenizer", "VideoTokenizer"]
