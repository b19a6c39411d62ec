"""localopt-plugin: Local Optimization and ReCo for autoregressive video models on Megatron-Core
and DeepSpeed (Zhou & Shen, ACL 2026 Findings, arXiv 2604.07402).

Where things are (lower layers import nothing above them):
  registry.py, platform.py, errors.py, metric_names.py
                    the component registry; the only platform shims (CPU torch); UserError;
                    the names of logged losses and metrics
  data/, video/, tokenizers/
                    sample layout, vocabulary, datasets and shards (data/wds: where a shard is
                    read); video decoding; video tokenizers
  model/            GPTModel with the planned core attention, keys/values kept across forwards,
                    pipeline stages
  plan.py, objectives/, regularizers/, plugin.py
                    forward plans and their execution; full-sequence, local-opt, fewer-frames
                    and the window samplers (objectives/window_sampler.py: where a window is
                    drawn); ReCo (regularizers/reco.py); the plugin's one configuration
  training/, megatron_lm.py, generation/, evaluation/, preprocess/, bench/
                    executors: the DeepSpeed trainer (flags, DeepSpeed JSON, loop, pipeline),
                    Megatron-LM's pretrain() hooks, generation, evaluation, shard writing,
                    benchmarks
  commands/         the thin command-line entry points
"""

__version__ = "0.1.0"
