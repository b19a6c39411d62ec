"""``localopt-preprocess``: videos -> clips -> video tokens -> webdataset shards + manifest.

Modules: ``inputs`` (what to read), ``clips`` (decode, sample, resize/crop), ``writer`` (one
shard per block of videos, resumable), ``ranks`` (MPI / torchrun / SLURM / single process),
``merge`` (manifest, rejects, caption tokenizer, summary), ``cli``. See docs/preprocessing.md.
"""
