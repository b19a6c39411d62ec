"""Real 2-rank DeepSpeed runs over gloo with the shipped presets' architecture (RoPE, RMSNorm,
SwiGLU, GQA, no bias, untied) and Local Opt. + ReCo, compared with a single process on the same
global batch; checkpoints of every layout convert to the single-process model."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.configs import PRESET_TRAIN_FLAGS
from helpers.launch import REPO, run_train

pytestmark = pytest.mark.slow

LOCAL_OPT = ("--objective", "local-opt", "--local-opt-window-scope", "micro-batch",
             "--regularizer", "reco", "--reco-reduction", "mean", "--reco-states", "pre-norm")
# Megatron pads the vocabulary to a multiple of divisible-by x TP; pad every run to the same size
# so that TP=1 and TP=2 start from the same weights.
SAME_VOCAB = ("--make-vocab-size-divisible-by", "64")


def _values(records, key="lm loss"):
    return [r[key] for r in records if key in r]


def test_zero_stages_over_two_ranks_match_single_process(tmp_path):
    """DP=2 x 1 accumulation step (ZeRO 1/2/3) against DP=1 x 2 accumulation steps: the same
    windows on the same samples, hence the same losses. A window per global micro-batch with
    ZeRO 1/2; one per step with ZeRO-3 (which needs every rank to run the same passes). The
    same run with DeepSpeed's gradient reduction skipped fails the comparison."""
    for scope, stages in (("micro-batch", (1, 2)), ("step", (3,))):
        flags = (*PRESET_TRAIN_FLAGS, *LOCAL_OPT[:2], "--local-opt-window-scope", scope,
                 *LOCAL_OPT[4:])
        single = run_train(tmp_path, *flags, name=f"single-{scope}")
        assert all(math.isfinite(x) for x in _values(single))
        assert len({r["window start"] for r in single}) > 1
        assert _values(single)[-1] < _values(single)[0]
        for stage in stages:
            ranks2 = run_train(tmp_path, *flags, "--deepspeed_config",
                               str(REPO / f"ds_configs/zero{stage}.json"), nproc=2,
                               name=f"zero{stage}")
            for key in ("lm loss", "reco loss", "window start"):
                assert _values(ranks2, key) == pytest.approx(_values(single, key),
                                                             rel=1e-4), (stage, key)
        if scope == "micro-batch":
            # negative control: without the gradient reduction the ranks drift apart
            broken = run_train(tmp_path, *flags, "--zero-stage", "0", nproc=2,
                               name="no-grad-reduction",
                               script=REPO / "tests/helpers/train_skipping_grad_reduction.py")
            assert _values(broken)[0] == pytest.approx(_values(single)[0], rel=1e-4)
            assert _values(broken) != pytest.approx(_values(single), rel=1e-4)


def test_bf16_and_tensorboard(tmp_path):
    """bf16 (ZeRO-1 JSON, 2 ranks, the shipped architecture with Local Opt. + ReCo) was on:
    its weights are bf16 and its losses follow the fp32 run's at a bf16 tolerance without
    being bitwise equal to them; TensorBoard gets every metric."""
    tb = tmp_path / "tb"
    flags = (*PRESET_TRAIN_FLAGS, *LOCAL_OPT)
    records = run_train(tmp_path, *flags, "--deepspeed_config",
                        str(REPO / "ds_configs/zero1_bf16.json"), "--tensorboard-dir", str(tb),
                        "--save", str(tmp_path / "ckpt"), nproc=2, name="bf16")
    fp32 = run_train(tmp_path, *flags, "--deepspeed_config",
                     str(REPO / "ds_configs/zero1.json"), nproc=2, name="fp32")
    for key in ("lm loss", "reco loss"):
        assert _values(records, key) == pytest.approx(_values(fp32, key), rel=3e-2), key
    assert _values(records) != _values(fp32)  # bf16 rounding shows
    latest = (tmp_path / "ckpt" / "latest").read_text().strip()
    module = torch.load(tmp_path / "ckpt" / latest / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    assert {v.dtype for k, v in module.items() if torch.is_tensor(v)
            and not k.endswith("_extra_state")} == {torch.bfloat16}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss", "lr", "grad norm", "video tokens/s", "step time (s)",
            "memory (MB)", "skipped samples"} <= tags
    assert len(events.Scalars("lm loss")) == 6


def test_pipeline_and_tensor_parallel_match_single_process(tmp_path, dist_world_of_one):
    """PP=2 (DeepSpeed PipelineModule of GPTModel stages; ReCo on the final norm's input, on
    the last stage) and TP=2 (Megatron parallel_state, gated MLP and query groups split over
    ranks) against one process, same global batch; layout-independent init makes them
    comparable. Local Opt. + ReCo trains; validation runs full-sequence plans through the same
    stages. Their checkpoints convert to GPTModels that generate the single process's tokens.
    TP=2 with Megatron's all-reduce after row-parallel layers skipped fails the comparison."""
    objective = LOCAL_OPT
    flags = (*PRESET_TRAIN_FLAGS, *objective, "--zero-stage", "1", *SAME_VOCAB,
             "--eval-interval", "6", "--eval-iters", "2")
    keys = ["lm loss", "reco loss", "total loss", "valid full-sequence loss"]
    single = run_train(tmp_path, *flags, "--save", str(tmp_path / "ckpt-single"), name="single")
    for layout in (("--pipeline-model-parallel-size", "2"), ("--tensor-model-parallel-size", "2")):
        name = "-".join(layout).strip("-")
        records = run_train(tmp_path, *flags, *layout, "--save", str(tmp_path / f"ckpt-{name}"),
                            nproc=2, name=name)
        for key in keys:
            got, want = _values(records, key), _values(single, key)
            assert got == pytest.approx(want, rel=1e-4), (layout, key, got, want)
        assert all(math.isfinite(r["grad norm"]) for r in records)
    _converted_checkpoints_generate_the_same_tokens(tmp_path)
    # negative control: TP=2 without the all-reduce after row-parallel layers differs
    broken = run_train(tmp_path, *flags, "--tensor-model-parallel-size", "2", nproc=2,
                       name="no-tp-reduction",
                       script=REPO / "tests/helpers/train_skipping_tp_reduction.py")
    assert _values(broken) != pytest.approx(_values(single), rel=1e-4)


@pytest.mark.parametrize("objective", [("--objective", "full-sequence"), LOCAL_OPT],
                         ids=["full-sequence", "local-opt+reco"])
def test_sequence_parallel_matches_tensor_parallel(tmp_path, objective):
    """TP=2 + --sequence-parallel (norms, residuals and ReCo on sequence slices; the plans'
    odd lengths padded to split evenly) against TP=2, same global batch and evaluation; with the
    norms' weight gradients left unsummed over the TP ranks the comparison fails."""
    flags = (*PRESET_TRAIN_FLAGS, *objective, "--zero-stage", "1", *SAME_VOCAB,
             "--tensor-model-parallel-size", "2", "--eval-interval", "6", "--eval-iters", "2")
    keys = ["lm loss", "reco loss", "total loss", "valid full-sequence loss", "grad norm"]
    tp = run_train(tmp_path, *flags, nproc=2, name="tp2")
    sp = run_train(tmp_path, *flags, "--sequence-parallel", nproc=2, name="tp2-sp")
    for key in keys:
        assert _values(sp, key) == pytest.approx(_values(tp, key), rel=1e-4), key
    if objective[1] == "local-opt":
        broken = run_train(tmp_path, *flags, "--sequence-parallel", nproc=2, name="sp-broken",
                           script=REPO / "tests/helpers/"
                           "train_skipping_sequence_parallel_norm_reduction.py")
        assert _values(broken, "grad norm") != pytest.approx(_values(tp, "grad norm"),
                                                             rel=1e-4)


def test_pipeline_under_sequence_and_context_parallelism_matches_one_process(tmp_path):
    """DeepSpeed's pipeline of GPTModel stages (PP=2) with TP=2 + --sequence-parallel and with
    CP=2 (4 ranks each) against one process: the stages run the shared plan on their sequence
    slices or context shares (DeepSpeed's grid counting context ranks as data ranks, its
    activation partitioning over TP ranks off under SP)."""
    flags = (*PRESET_TRAIN_FLAGS, *LOCAL_OPT, "--zero-stage", "1", *SAME_VOCAB,
             "--train-iters", "4", "--pipeline-model-parallel-size", "2")
    keys = ["lm loss", "reco loss", "grad norm"]
    single = run_train(tmp_path, *flags[:-2], name="single")
    for layout in (("--tensor-model-parallel-size", "2", "--sequence-parallel"),
                   ("--context-parallel-size", "2", "--cp-comm-type", "a2a")):
        records = run_train(tmp_path, *flags, *layout, nproc=4, name="-".join(layout))
        for key in keys:
            assert _values(records, key) == pytest.approx(_values(single, key), rel=1e-4), (
                layout, key)


def _converted_checkpoints_generate_the_same_tokens(tmp_path):
    from localopt_plugin.data.layout import SampleLayout, Vocabulary
    from localopt_plugin.generation.sampling import SamplingConfig, sample_video_tokens
    from localopt_plugin.model import compute_logits, forward_hidden
    from localopt_plugin.training.convert import load_trained_model

    generated, logits = {}, {}
    for name in ("single", "pipeline-model-parallel-size-2", "tensor-model-parallel-size-2"):
        model, meta = load_trained_model(str(tmp_path / f"ckpt-{name}"))
        vocab, layout = Vocabulary(**meta["vocabulary"]), SampleLayout(**meta["layout"])
        conditions = torch.tensor([[vocab.class_token(i)] for i in range(vocab.num_classes)])
        generated[name] = sample_video_tokens(
            model, vocab, layout, conditions, layout.num_frames, SamplingConfig(temperature=0),
            torch.Generator().manual_seed(0), show_progress=False)
        ids = torch.arange(layout.input_length)[None] % vocab.size
        with torch.no_grad():
            logits[name] = compute_logits(model, forward_hidden(model, ids, ids[0]))
    reference = generated.pop("single")
    for name, tokens in generated.items():
        assert torch.equal(tokens, reference), name
        torch.testing.assert_close(logits[name], logits["single"], rtol=1e-3, atol=1e-4,
                                   msg=name)
