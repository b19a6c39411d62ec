"""The names of the losses and metrics that the trainers log and the report, metrics file and
benchmarks read: one set of constants, so a renamed metric cannot silently go missing.

Megatron-LM's log prints them as they are (``| lm loss: ... |``), as Megatron's own
pretrain_gpt.py names its loss.
"""

LM_LOSS = "lm loss"  # the objective's mean cross-entropy over the optimized tokens
TOTAL_LOSS = "total loss"  # LM loss plus every regularizer's loss: what is optimized
RECO_LOSS = "reco loss"  # weighted ReCo penalty
RECO_RAW = "reco raw"  # unweighted ReCo penalty (NaN when the weight was 0 and it was skipped)
RECO_WEIGHT = "reco weight"
WINDOW_START = "window start"  # Local Opt.'s first optimized latent frame (the first window's)
LATEST_WINDOW_START = "latest window start"  # with several windows per step: the latest's
FULL_SEQUENCE_STEP = "full-sequence step"  # 1 where Local Opt. trained the whole sequence
CLIP_START = "clip start"  # the fewer-frames baseline's first frame
VALID_LOSS = "valid full-sequence loss"  # validation is always full-sequence
VALID_PPL = "valid full-sequence ppl"
GRAD_NORM = "grad norm"
LEARNING_RATE = "lr"
ITERATION = "iteration"
STEP_TIME = "step time (s)"
TOKENS_PER_SECOND = "video tokens/s"
GLOBAL_BATCH = "global batch size"
SKIPPED_SAMPLES = "skipped samples"
