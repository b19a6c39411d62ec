"""ReCo: the penalty against explicit loops, its weight schedules against their formulas, its
gradient inside a real training step, TP=2 against TP=1, and its metrics in the logs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.configs import TINY_TRAIN_FLAGS, preset_model, tiny_args, tiny_model
from helpers.launch import REPO, TRAIN_MODULE, run_train, subprocess_env

from localopt_plugin import registry
from localopt_plugin.commands.train import build_parser
from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.model import build_gpt_model
from localopt_plugin.objectives.sequence import FullSequence, LocalOptimization
from localopt_plugin.plan import ObjectiveOutput
from localopt_plugin.regularizers import reco as reco_module
from localopt_plugin.regularizers.reco import (
    ADAPTIVE_CAP,
    PAIR_MODES,
    REDUCTIONS,
    SCHEDULES,
    ReCo,
    ReCoConfig,
    reco_penalty,
)
from localopt_plugin.training.steps import TrainingStep

FRAMES, P, B, H = 3, 4, 2, 5


def hand_built_hidden() -> torch.Tensor:
    """[3 frames x 4 tokens, 2, 5] with distinct, non-linear values along every axis."""
    s, b, h = np.meshgrid(np.arange(FRAMES * P), np.arange(B), np.arange(H), indexing="ij")
    return torch.tensor(np.sin(1.3 * s + 0.7 * b) * (h + 1) + 0.1 * s**2 - b * h,
                        dtype=torch.float64)


def loop_penalty(hidden: np.ndarray, stride: int) -> float:
    total, count = 0.0, 0
    for b in range(hidden.shape[1]):
        for i in range(hidden.shape[0] - stride):
            total += sum((hidden[i + stride, b, k] - hidden[i, b, k]) ** 2
                         for k in range(hidden.shape[2]))
            count += 1
    return total / count


# -- 1. the penalty ----------------------------------------------------------------------------

@pytest.mark.parametrize(("pairs", "stride"), [("adjacent-token", 1), ("adjacent-frame", P)])
def test_penalty_equals_explicit_loop(pairs, stride):
    hidden = hand_built_hidden()
    value = reco_penalty(hidden, P, pairs)
    assert value.dtype == torch.float64 and value.shape == ()
    assert value.item() == pytest.approx(loop_penalty(hidden.numpy(), stride), rel=1e-12)


@pytest.mark.parametrize(("pairs", "wrong_stride"), [("adjacent-token", 2),
                                                   ("adjacent-frame", P - 1)])
def test_the_loop_reference_tells_a_wrong_pair(pairs, wrong_stride):
    """Negative control: pairing (i, i + 2) or (i, i + P - 1) instead moves the hand loop's
    value far outside the tolerance the penalty is held to."""
    hidden = hand_built_hidden()
    value = reco_penalty(hidden, P, pairs).item()
    assert value != pytest.approx(loop_penalty(hidden.numpy(), wrong_stride), rel=1e-3)


@pytest.mark.parametrize(("pairs", "stride"), [("adjacent-token", 1), ("adjacent-frame", P)])
def test_mean_reduction_is_the_sum_over_the_hidden_size(pairs, stride):
    hidden = hand_built_hidden()
    value = reco_penalty(hidden, P, pairs, reduction="mean")
    assert value.item() == pytest.approx(loop_penalty(hidden.numpy(), stride) / H, rel=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        reco_penalty(hidden, P, pairs, reduction="max")


def test_penalty_distinguishes_pair_modes_and_is_zero_when_constant():
    constant = torch.randn(1, B, H).expand(FRAMES * P, B, H)
    for pairs in PAIR_MODES:
        assert reco_penalty(constant, P, pairs).item() == 0.0
    # the same frame repeated: constant along frames, not along tokens
    periodic = torch.randn(1, P, B, H).expand(FRAMES, P, B, H).reshape(FRAMES * P, B, H)
    assert reco_penalty(periodic, P, "adjacent-frame").item() == 0.0
    assert reco_penalty(periodic, P, "adjacent-token").item() > 0.1
    # no pair at all: a single frame has no adjacent frame
    assert reco_penalty(torch.randn(P, B, H), P, "adjacent-frame").item() == 0.0


def test_penalty_of_bf16_hidden_is_accumulated_in_float32():
    hidden = hand_built_hidden()
    value = reco_penalty(hidden.to(torch.bfloat16), P)
    assert value.dtype == torch.float32
    expected = reco_penalty(hidden.to(torch.bfloat16).double(), P)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_penalty_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown ReCo pairs"):
        reco_penalty(hand_built_hidden(), P, "diagonal")
    with pytest.raises(ValueError, match="whole"):
        reco_penalty(hand_built_hidden(), 5)
    with pytest.raises(ValueError, match=r"\[s, b, h\]"):
        reco_penalty(torch.zeros(12, 5), P)


@pytest.mark.parametrize(("pairs", "stride"), [("adjacent-token", 1), ("adjacent-frame", 3)])
def test_penalty_gradient(pairs, stride):
    torch.manual_seed(0)
    hidden = torch.randn(2 * 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: reco_penalty(h, 3, pairs), (hidden,))
    (grad,) = torch.autograd.grad(reco_penalty(hidden, 3, pairs), hidden)
    # analytic: d/dh of (1/N) sum_pairs ||h[j] - h[i]||^2 is (2/N)(h[j] - h[i]) at j, minus at i
    h = hidden.detach().numpy()
    expected = np.zeros_like(h)
    n = (h.shape[0] - stride) * h.shape[1]
    for b in range(h.shape[1]):
        for i in range(h.shape[0] - stride):
            d = h[i + stride, b] - h[i, b]
            expected[i + stride, b] += 2 * d / n
            expected[i, b] -= 2 * d / n
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-12, atol=1e-15)


# -- 2. weights and the regularizer ------------------------------------------------------------

def fake_output(seed: int = 0, frames: int = FRAMES):
    """An ObjectiveOutput whose CE depends on a parameter of its own, to see what gets grads."""
    torch.manual_seed(seed)
    hidden = torch.randn(frames * P, B, H, requires_grad=True)
    ce_param = torch.tensor(2.0, requires_grad=True)
    ce = ce_param * 2.5
    # the same states before and after the final norm: the formula tests hold for both forms
    return ObjectiveOutput(ce, hidden, hidden, frames * P * B, 0, frames), ce_param


def test_linear_warmup_and_cosine_follow_their_formulas():
    warm = ReCo(ReCoConfig(weight=0.3, schedule="linear-warmup", warmup_iters=8))
    for it in (0, 1, 3, 7, 8, 9, 100):
        assert warm.scheduled_weight(it) == pytest.approx(0.3 * min(it / 8, 1.0), abs=1e-15)
    assert warm.scheduled_weight(4) == pytest.approx(0.15)
    cosine = ReCo(ReCoConfig(weight=0.3, schedule="cosine"), train_iters=40)
    for it in (0, 5, 10, 20, 33, 40, 55):
        expected = 0.3 * 0.5 * (1 + math.cos(math.pi * min(it / 40, 1)))
        assert cosine.scheduled_weight(it) == pytest.approx(expected, abs=1e-15)
    assert cosine.scheduled_weight(0) == pytest.approx(0.3)
    assert cosine.scheduled_weight(20) == pytest.approx(0.15)
    assert cosine.scheduled_weight(40) == pytest.approx(0.0, abs=1e-15)
    assert ReCo(ReCoConfig(weight=0.3)).scheduled_weight(1234) == 0.3
    # 0 warm-up iterations
    assert ReCo(ReCoConfig(weight=0.3, schedule="linear-warmup")).scheduled_weight(0) == 0.3
    # a pure function of the iteration: a fresh instance (a resumed run) agrees
    again = ReCo(ReCoConfig(weight=0.3, schedule="cosine"), train_iters=40)
    assert [again.scheduled_weight(i) for i in range(50)] == [
        cosine.scheduled_weight(i) for i in range(50)]


@pytest.mark.parametrize("pairs", PAIR_MODES)
def test_constant_weight_loss_and_metrics(pairs):
    out, _ = fake_output()
    loss, metrics = ReCo(ReCoConfig(weight=0.25, pairs=pairs))(out, iteration=3)
    raw = reco_penalty(out.hidden.detach(), P, pairs).item()
    assert loss.item() == pytest.approx(0.25 * raw, rel=1e-6)
    assert float(metrics["reco raw"]) == pytest.approx(raw, rel=1e-6)
    assert float(metrics["reco loss"]) == pytest.approx(0.25 * raw, rel=1e-6)
    assert float(metrics["reco weight"]) == 0.25
    assert not metrics["reco loss"].requires_grad


def test_adaptive_weight_holds_the_target_ratio_and_is_detached():
    out, ce_param = fake_output()
    reco = ReCo(ReCoConfig(weight=0.1, schedule="adaptive", target_ratio=0.2))
    loss, metrics = reco(out, iteration=0)
    raw = reco_penalty(out.hidden.detach(), P).item()
    expected_weight = 0.2 * 5.0 / raw
    assert expected_weight < ADAPTIVE_CAP * 0.1  # the cap does not bind here
    assert float(metrics["reco weight"]) == pytest.approx(expected_weight, rel=1e-6)
    assert float(metrics["reco loss"]) / out.loss.item() == pytest.approx(0.2, rel=1e-6)
    loss.backward()
    assert ce_param.grad is None  # no gradient through the weight into the CE
    hidden = out.hidden.detach().requires_grad_()
    (raw_grad,) = torch.autograd.grad(reco_penalty(hidden, P), hidden)
    torch.testing.assert_close(out.hidden.grad, expected_weight * raw_grad, rtol=1e-5, atol=0)


def test_adaptive_weight_is_capped():
    out, _ = fake_output()
    raw = reco_penalty(out.hidden.detach(), P).item()
    target = 10 * ADAPTIVE_CAP * 0.1 * raw / 5.0  # would need 10x the cap
    _, metrics = ReCo(ReCoConfig(weight=0.1, schedule="adaptive", target_ratio=target))(out, 0)
    assert float(metrics["reco weight"]) == pytest.approx(ADAPTIVE_CAP * 0.1)
    ones = torch.ones(FRAMES * P, B, H)
    flat = ObjectiveOutput(out.loss, ones, ones, 1, 0, FRAMES)
    # raw 0: the cap, no NaN
    loss, metrics = ReCo(ReCoConfig(weight=0.1, schedule="adaptive"))(flat, 0)
    assert float(metrics["reco weight"]) == pytest.approx(ADAPTIVE_CAP * 0.1)
    assert loss.item() == 0.0


@pytest.mark.parametrize(("kwargs", "iteration"), [
    ({"weight": 0.0}, 5),
    ({"weight": 0.1, "schedule": "linear-warmup", "warmup_iters": 4}, 0),
    ({"weight": 0.1, "schedule": "cosine", "train_iters": 10}, 10),
    ({"weight": 0.0, "schedule": "adaptive"}, 3),
    ({"weight": 0.1, "schedule": "adaptive", "target_ratio": 0.0}, 3),
])
def test_zero_weight_computes_nothing(monkeypatch, kwargs, iteration):
    def fail(*args, **kw):
        raise AssertionError("reco_penalty computed with a zero weight")

    monkeypatch.setattr(reco_module, "reco_penalty", fail)
    out, _ = fake_output()
    train_iters = kwargs.pop("train_iters", None)
    loss, metrics = ReCo(ReCoConfig(**kwargs), train_iters)(out, iteration)
    assert loss.item() == 0.0 and loss.grad_fn is None
    assert metrics["reco loss"] == 0.0 and metrics["reco weight"] == 0.0
    assert math.isnan(metrics["reco raw"])


def test_adjacent_frame_needs_two_frames():
    out, _ = fake_output(frames=1)
    with pytest.raises(ValueError, match="at least 2"):
        ReCo(ReCoConfig(pairs="adjacent-frame"))(out, 0)
    ReCo(ReCoConfig(pairs="adjacent-token"))(out, 0)


def reco_from_flags(*flags: str) -> ReCo:
    args = tiny_args(*flags)
    return registry.build("regularizer", "reco", ReCoConfig.from_args(args),
                          train_iters=args.train_iters)


def test_registered_and_built_from_flags():
    assert "reco" in registry.names("regularizer")
    parser = build_parser()
    choices = {a.dest: a.choices for a in parser._actions}
    assert tuple(choices["reco_pairs"]) == PAIR_MODES
    assert tuple(choices["reco_weight_schedule"]) == SCHEDULES
    assert tuple(choices["reco_reduction"]) == REDUCTIONS
    default = reco_from_flags()
    # the default is the form the ReCo sweep found: the paper's sum and lambda, pre-norm
    assert (default.config.weight, default.config.pairs, default.config.schedule,
            default.config.reduction, default.config.states) == (
        0.1, "adjacent-token", "constant", "sum", "pre-norm")
    reco = reco_from_flags(
        "--reco-weight", "0.3", "--reco-pairs", "adjacent-frame", "--reco-weight-schedule",
        "cosine", "--reco-warmup-iters", "7", "--reco-target-ratio", "0.5",
        "--train-iters", "20")
    assert (reco.config.weight, reco.config.pairs, reco.config.schedule,
            reco.config.warmup_iters, reco.train_iters, reco.config.target_ratio) == (
        0.3, "adjacent-frame", "cosine", 7, 20, 0.5)
    for bad in (("--reco-weight", "-1"), ("--reco-warmup-iters", "-2"),
                ("--reco-weight-schedule", "cosine", "--train-iters", "0")):
        with pytest.raises(ValueError, match="^--"):
            reco_from_flags(*bad)


# -- 3. inside a real training step ------------------------------------------------------------

LAYOUT = SampleLayout(video_start=3, num_frames=4, frame_tokens=16)
VOCAB = 100


def fixed_window(first: int, frames: int):
    return SimpleNamespace(window_frames=frames, draw=lambda iteration, micro_batch: first)


def step_grads(step: TrainingStep, tokens: torch.Tensor):
    step.zero_grad(set_to_none=True)
    total, metrics, _ = step(tokens, 0, 0)
    total.backward()
    return total, metrics, {n: p.grad.clone() for n, p in step.model.named_parameters()
                            if p.grad is not None}


@pytest.mark.parametrize("pairs", PAIR_MODES)
@pytest.mark.parametrize("objective", ["local-opt", "full-sequence"])
def test_reco_gradient_reaches_transformer_layers(dist_world_of_one, pairs, objective):
    torch.manual_seed(0)
    model = build_gpt_model(tiny_model(), VOCAB)
    tokens = torch.randint(0, VOCAB, (2, LAYOUT.seq_length))
    obj = (LocalOptimization(LAYOUT, fixed_window(1, 2)) if objective == "local-opt"
           else FullSequence(LAYOUT))
    def reco(weight):  # on the final states, which the independent computation below uses
        return [ReCo(ReCoConfig(weight, pairs, states="final"))]

    total, metrics, with_reco = step_grads(TrainingStep(model, obj, reco(0.1)), tokens)
    lm_total, _, without = step_grads(TrainingStep(model, obj, reco(0.0)), tokens)

    # an independent computation of the penalty's gradient alone
    model.zero_grad(set_to_none=True)
    out = obj(model, tokens)
    assert out.hidden.shape[0] == out.num_frames * LAYOUT.frame_tokens
    raw = reco_penalty(out.hidden, LAYOUT.frame_tokens, pairs)
    raw.backward()
    raw_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert float(metrics["reco raw"]) == pytest.approx(raw.item(), rel=1e-5)
    assert total.item() == pytest.approx(lm_total.item() + 0.1 * raw.item(), rel=1e-5)
    layer_params = [n for n in with_reco if n.startswith("decoder.layers.")]
    assert len(layer_params) > 10 and set(layer_params) <= set(raw_grads)
    for name in layer_params:
        assert raw_grads[name].abs().max() > 0, name
        torch.testing.assert_close(with_reco[name] - without[name], 0.1 * raw_grads[name],
                                   rtol=1e-3, atol=1e-7, msg=name)
    assert any(not torch.allclose(with_reco[n], without[n], rtol=1e-4, atol=1e-7)
               for n in layer_params)
    # and hence a different update
    lr = 1e-2
    moved = {n: p.detach() - lr * with_reco[n] for n, p in model.named_parameters()
             if n in layer_params}
    assert any(not torch.equal(moved[n], dict(model.named_parameters())[n].detach()
                               - lr * without[n]) for n in layer_params)


def test_pre_norm_states_are_the_final_norms_input(dist_world_of_one):
    torch.manual_seed(0)  # the shipped architecture: RMSNorm is the final norm
    model = build_gpt_model(preset_model("test"), VOCAB)
    tokens = torch.randint(0, VOCAB, (2, LAYOUT.seq_length))
    out = LocalOptimization(LAYOUT, fixed_window(1, 2))(model, tokens)
    pre = out.pre_norm_hidden
    assert pre.shape == out.hidden.shape and not torch.allclose(pre, out.hidden)
    torch.testing.assert_close(model.decoder.final_layernorm(pre), out.hidden)
    loss, metrics = ReCo(ReCoConfig(0.1, states="pre-norm"))(out, 0)
    expected = reco_penalty(pre, LAYOUT.frame_tokens)
    assert float(metrics["reco raw"]) == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()  # the penalty before the norm cannot reach the norm's weight
    norm_grad = model.decoder.final_layernorm.weight.grad
    assert norm_grad is None or not norm_grad.any()
    assert model.decoder.layers[-1].mlp.linear_fc2.weight.grad.abs().max() > 0


def test_bad_reco_states_are_refused():
    with pytest.raises(ValueError, match="--reco-states must be one of"):
        ReCo(ReCoConfig(0.1, states="normed"))


# -- 4./5. the trainer: TP=2 against TP=1, console and TensorBoard -----------------------------

TRAIN = (
    *TINY_TRAIN_FLAGS,
    "--objective", "local-opt", "--regularizer", "reco",
    # Megatron pads the vocabulary to a multiple of 128 x TP; pad both runs to the same size so
    # that TP=1 and TP=2 start from the same weights.
    "--make-vocab-size-divisible-by", "64",
)


@pytest.mark.slow
def test_tensor_parallel_matches_single_process(tmp_path):
    flags = (*TRAIN, "--reco-weight", "0.1")
    tp1 = run_train(tmp_path, *flags, name="tp1")
    tp2 = run_train(tmp_path, *flags, "--tensor-model-parallel-size", "2", nproc=2, name="tp2")
    assert len(tp1) == len(tp2) == 6
    for key in ("lm loss", "reco loss", "reco raw", "total loss"):
        ref, got = [r[key] for r in tp1], [r[key] for r in tp2]
        assert all(math.isfinite(x) and x > 0 for x in ref), (key, ref)
        assert got == pytest.approx(ref, rel=1e-4), (key, got, ref)
    assert [r["reco weight"] for r in tp2] == pytest.approx([0.1] * 6)


def test_metrics_reach_console_and_tensorboard(tmp_path):
    tb, metrics_file = tmp_path / "tb", tmp_path / "metrics.jsonl"
    cmd = [sys.executable, "-m", TRAIN_MODULE, *TRAIN, "--reco-weight", "0.2",
           "--reco-weight-schedule", "cosine", "--tensorboard-dir", str(tb),
           "--metrics-file", str(metrics_file)]
    env = subprocess_env(LOCALOPT_LOG_LEVEL="INFO")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert len(records) == 6
    for r in records:  # the trainer passes the completed-iteration count, record has it + 1
        expected = 0.2 * 0.5 * (1 + math.cos(math.pi * (r["iteration"] - 1) / 6))
        assert r["reco weight"] == pytest.approx(expected, rel=1e-6)
        assert r["reco loss"] == pytest.approx(r["reco weight"] * r["reco raw"], rel=1e-5)
        assert r["total loss"] == pytest.approx(r["lm loss"] + r["reco loss"], rel=1e-5)

    number = r"([-+0-9.eE]+|nan|inf)"
    lines = [line for line in proc.stderr.splitlines() if re.search(r"\blm loss ", line)]
    assert len(lines) == 6, proc.stderr[-3000:]
    for line, r in zip(lines, records, strict=True):
        assert f"iteration {r['iteration']}" in line
        assert float(re.search(rf"\blm loss {number}", line)[1]) == pytest.approx(
            r["lm loss"], rel=1e-3)
        assert float(re.search(rf"\breco loss {number}", line)[1]) == pytest.approx(
            r["reco loss"], rel=1e-3)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    assert {"lm loss", "reco loss", "reco raw", "reco weight"} <= set(events.Tags()["scalars"])
    for key in ("lm loss", "reco loss", "reco weight"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [r["iteration"] for r in records]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)
