"""localopt-plugin: Local Optimization and ReCo for autoregressive video models on Megatron-Core
and DeepSpeed (Zhou & Shen, ACL 2026 Findings, arXiv 2604.07402).

Where things are:
  registry.py       the component registry (objective, regularizer, dataset, tokenizer, ...)
  platform.py       the only place with platform shims (Megatron-Core/DeepSpeed on CPU torch)
  arguments.py      Megatron-LM flags + the plugin's argument group
  model/            GPTModel construction, SDPA core attention, keys/values across forwards
  objectives/       full-sequence, local-opt, fewer-frames, and the window samplers
  regularizers/     ReCo
  data/             sample layout, vocabulary, datasets, the resumable batch stream
  training/         distributed setup, DeepSpeed config, the training loop, metrics
  bench/            speed and memory benchmarks
"""

__version__ = "0.1.0"
