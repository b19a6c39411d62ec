"""Megatron-LM integration pieces in this interpreter: LocalOptForwardStep under Megatron-Core's
own pipeline schedules gives the losses and gradients of the plugin's TrainingStep; the flags
and data fit Megatron-LM. (Megatron-LM's real pretrain() runs in test_megatron_lm_pretrain.py.)"""

from __future__ import annotations

import argparse
import py_compile
import subprocess
import sys

import pytest
import torch
from helpers.configs import tiny_args
from helpers.launch import REPO, subprocess_env
from helpers.wds_shards import write_dataset
from megatron.core.pipeline_parallel import get_forward_backward_func

from localopt_plugin import megatron_lm, registry
from localopt_plugin.megatron_lm import (
    LocalOptForwardStep,
    build_datasets,
    build_model,
    extra_args_provider,
    video_source,
)
from localopt_plugin.model import ModelConfig, ParallelConfig, transformer_config
from localopt_plugin.objectives import WindowConfig, build_objective
from localopt_plugin.training.config import add_train_args
from localopt_plugin.training.steps import TrainingStep

MICRO_BATCHES = 2


def wds_args(tmp_path, *extra: str):
    written = write_dataset(tmp_path / "shards", 16, 4)  # 2 frames of 3 x 4 tokens
    args = tiny_args("--dataset", "video-wds", "--data-path", written.pattern,
                     "--data-num-workers", "0", "--micro-batch-size", "2",
                     "--local-opt-window-frames", "1", "--local-opt-window-scope", "micro-batch",
                     *extra)
    args.seq_length = video_source(args).layout.input_length
    return args


def make_model(args):
    config = transformer_config(ModelConfig.from_args(args), ParallelConfig.from_args(args))
    return build_model(args, config, video_source(args).vocab.size)


def reference(args, batches, iteration):
    """The plugin's own training step on a fresh model with the same (name-seeded) weights."""
    model = make_model(args)
    objective = build_objective(args.objective, video_source(args).layout,
                                sampler=args.window_sampler, window=WindowConfig.from_args(args),
                                config=registry.config_from_args("objective", args.objective,
                                                                 args),
                                seed=args.seed)
    step = TrainingStep(model, objective,
                        [registry.build("regularizer", r,
                                        registry.config_from_args("regularizer", r, args),
                                        train_iters=args.train_iters)
                         for r in args.regularizer])
    metrics = []
    for micro_batch, batch in enumerate(batches):
        total, m, _ = step(batch["tokens"], iteration, micro_batch)
        (total / len(batches)).backward()
        metrics.append({"total": float(total.detach()), **{k: float(v) for k, v in m.items()}})
    return metrics, {n: p.grad for n, p in model.named_parameters()}


def pair(report, key):
    value, count = report[key].tolist()
    return value / count


@pytest.mark.parametrize("flags", [
    ("--objective", "full-sequence"),
    ("--objective", "local-opt", "--regularizer", "reco"),
    ("--objective", "local-opt", "--local-opt-windows-per-step", "2", "--regularizer", "reco"),
    ("--objective", "fewer-frames", "--regularizer", "reco"),
])
def test_pp1_schedule_matches_training_step(dist_world_of_one, tmp_path, flags):
    args = wds_args(tmp_path, *flags)
    model = make_model(args)
    forward_step = LocalOptForwardStep(args)
    stream = build_datasets(args)[0]
    windows = set()
    for iteration in range(2):
        batches = [next(stream) for _ in range(MICRO_BATCHES)]
        assert all(isinstance(b["keys"], list) for b in batches)
        model.zero_grad(set_to_none=True)
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=MICRO_BATCHES, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=False)
        assert forward_step.iteration == iteration
        expected, expected_grads = reference(args, batches, iteration)
        assert len(reports) == MICRO_BATCHES
        for report, ref in zip(reports, expected, strict=True):
            windows.add(ref.get("window start", ref.get("clip start")))
            assert pair(report, "lm loss") == pytest.approx(ref["lm loss"], rel=1e-5)
            if "--regularizer" in flags:
                assert ref["reco loss"] > 0
                assert pair(report, "reco loss") == pytest.approx(ref["reco loss"], rel=1e-5)
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, expected_grads[name], rtol=1e-4, atol=1e-6,
                                       msg=name)
    if args.objective != "full-sequence":
        assert windows == {0.0, 1.0}  # both windows drawn, so Local Opt. ran with context


def _pp2_against_single_process(tmp_path, objectives, env=None) -> None:
    """Megatron-Core's own 1F1B schedule over 2 gloo ranks against the single process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "helpers" / "megatron_lm_pp_worker.py"), str(tmp_path), *objectives]
    proc = subprocess.run(cmd, cwd=REPO / "tests", env=subprocess_env(**(env or {})),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    stages = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for objective in objectives:
        name, *extra = objective.split()
        args = tiny_args("--objective", name, *extra, "--regularizer", "reco",
                         "--reco-states", "pre-norm", "--local-opt-window-scope", "micro-batch",
                         "--micro-batch-size", "2")
        stream = build_datasets(args)[0]
        batches = [next(stream) for _ in range(MICRO_BATCHES)]
        expected, expected_grads = reference(args, batches, 0)
        if name == "local-opt":  # a window after its context crossed the stages
            assert max(ref["window start"] for ref in expected) > 0
        assert stages[0][objective]["reports"] == []  # only the last stage computes losses
        reports = stages[1][objective]["reports"]
        assert len(reports) == MICRO_BATCHES
        grads: dict[str, torch.Tensor] = {}
        for stage in stages:  # the tied word embedding gets a gradient on both stages
            for name, grad in stage[objective]["grads"].items():
                grads[name] = grads[name] + grad if name in grads else grad
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6,
                                       msg=f"{objective}: {name}")
        for report, ref in zip(reports, expected, strict=True):
            assert report["lm loss"][0] / report["lm loss"][1] == pytest.approx(
                ref["lm loss"], rel=1e-5)
            assert report["reco loss"][0] / report["reco loss"][1] == pytest.approx(
                ref["reco loss"], rel=1e-5)


def test_pp2_schedule_over_gloo_matches_single_process(dist_world_of_one, tmp_path):
    """Local Opt. (both streams in one tensor; also with two windows per context pass),
    fewer-frames and full-sequence under Megatron's pipeline schedule give the single
    process's losses and gradients."""
    _pp2_against_single_process(tmp_path, ["full-sequence", "fewer-frames", "local-opt",
                                           "local-opt --local-opt-windows-per-step 2"])


def test_pp2_comparison_tells_a_dropped_context(dist_world_of_one, tmp_path):
    """Negative control: the last stage given zeros for the context rows it receives (the
    context stream lost between stages) fails the comparison."""
    with pytest.raises(AssertionError):
        _pp2_against_single_process(tmp_path, ["local-opt"],
                                    env={"LOCALOPT_TEST_PERTURB": "dropped-context"})


def test_pipelined_local_opt_needs_variable_sequence_lengths(dist_world_of_one, monkeypatch):
    """Under Megatron PP the rows crossing stages vary with the window: a model built without
    Megatron's variable_seq_lengths (model_provider sets it) is refused, naming it."""
    args = tiny_args("--objective", "local-opt", "--micro-batch-size", "2")
    model = make_model(args)
    for layer in model.decoder.layers:
        layer.current_microbatch = 0
    monkeypatch.setattr(megatron_lm.parallel_state, "get_pipeline_model_parallel_world_size",
                        lambda: 2)
    with pytest.raises(RuntimeError, match="variable_seq_lengths"):
        LocalOptForwardStep(args)(build_datasets(args)[0], model)


def test_forward_step_outside_a_schedule_is_refused(dist_world_of_one):
    args = tiny_args("--micro-batch-size", "2")
    with pytest.raises(RuntimeError, match="get_forward_backward_func"):
        LocalOptForwardStep(args)(build_datasets(args)[0], make_model(args))


def test_datasets_stream_video_wds_batches(dist_world_of_one, tmp_path):
    valid = write_dataset(tmp_path / "valid", 8, 4, name="v")
    args = wds_args(tmp_path, "--valid-data-path", valid.pattern)
    train, valid_stream, test = build_datasets(args)
    assert test is None
    batch = next(train)
    layout = video_source(args).layout
    assert batch["tokens"].shape == (2, layout.seq_length)
    assert torch.equal(batch["labels"], batch["tokens"][:, 1:])
    assert batch["loss_mask"].shape == batch["position_ids"].shape == (2, layout.input_length)
    assert all(k.startswith("v") for k in next(valid_stream)["keys"])
    # resuming after Megatron's consumed-sample count continues the same stream
    following = next(train)
    resumed = next(build_datasets(args, consumed_train_samples=2)[0])
    assert resumed["keys"] == following["keys"]


def test_plugin_flags_parse_with_megatron_parser():
    parser = argparse.ArgumentParser(allow_abbrev=False)  # Megatron-LM's parser settings
    # Megatron-LM's names for what the trainer has
    ModelConfig.add_args(parser)
    add_train_args(parser)
    ParallelConfig.add_args(parser)
    extra_args_provider(parser)
    args = parser.parse_args([
        "--num-layers", "4", "--hidden-size", "256", "--seq-length", "1024",
        "--micro-batch-size", "2", "--data-path", "/shards/{000..009}.tar",
        "--objective", "local-opt", "--regularizer", "reco", "--reco-weight", "0.2",
        "--local-opt-window-frames", "3", "--dataset", "video-wds", "--data-num-workers", "1",
    ])
    assert (args.num_layers, args.objective, args.regularizer, args.reco_weight) == (
        4, "local-opt", ["reco"], 0.2)
    assert args.data_path == ["/shards/{000..009}.tar"] and args.data_num_workers == 1
    with pytest.raises(argparse.ArgumentError):  # a clash would be reported, not ignored
        extra_args_provider(parser)


def test_example_script_compiles(tmp_path):
    py_compile.compile(str(REPO / "examples" / "pretrain_video_gpt.py"),
                       cfile=str(tmp_path / "example.pyc"), doraise=True)


def test_evaluation_runs_the_full_sequence_loss(dist_world_of_one, tmp_path):
    """A model in eval mode (Megatron-LM's evaluation) gets the full-sequence loss under the
    name localopt-train logs it with, whatever the training objective."""
    from localopt_plugin.objectives import FullSequence

    args = wds_args(tmp_path, "--objective", "local-opt", "--regularizer", "reco")
    model = make_model(args).eval()
    batches = [next(build_datasets(args)[0]) for _ in range(MICRO_BATCHES)]
    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=LocalOptForwardStep(args), data_iterator=iter(batches),
            model=[model], num_microbatches=MICRO_BATCHES, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=True)
        expected = [FullSequence(video_source(args).layout)(model, b["tokens"]).loss.item()
                    for b in batches]
    assert all(set(r) == {megatron_lm.VALID_LOSS} for r in reports)
    got = [pair(r, megatron_lm.VALID_LOSS) for r in reports]
    assert got == pytest.approx(expected, rel=1e-5)


def test_what_the_plugin_cannot_run_is_refused(dist_world_of_one, tmp_path):
    from localopt_plugin.errors import UserError

    args = wds_args(tmp_path)
    with pytest.raises(UserError, match="combined 1F1B"):
        LocalOptForwardStep(args)(iter([]), make_model(args), return_schedule_plan=True)
    args.mtp_num_layers = 1
    with pytest.raises(UserError, match="--mtp-num-layers"):
        megatron_lm.check_megatron_config(args)
    args.mtp_num_layers = None
    megatron_lm.check_megatron_config(args)


# Megatron-LM's defaults for its fusions (megatron/training/arguments.py, 0.17-0.19): all on
MEGATRON_LM_FUSION_DEFAULTS = dict(
    no_persist_layer_norm=False, masked_softmax_fusion=True, bias_gelu_fusion=True,
    bias_swiglu_fusion=True, bias_dropout_fusion=True, gradient_accumulation_fusion=True,
    apply_rope_fusion=True)
ALL_FUSION_FLAGS = ["--no-persist-layer-norm", "--no-masked-softmax-fusion",
                    "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion",
                    "--no-bias-dropout-fusion", "--no-gradient-accumulation-fusion",
                    "--no-rope-fusion"]


@pytest.mark.parametrize("machine, impl, installed, missing", [
    ("cpu", "local", (), ALL_FUSION_FLAGS),
    ("gpu", "local", (), ["--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
                          "--no-rope-fusion"]),
    ("gpu", "local", ("transformer_engine",), ["--no-persist-layer-norm",
                                               "--no-gradient-accumulation-fusion"]),
    ("gpu", "local", ("apex", "fused_weight_gradient_mlp_cuda", "transformer_engine"), []),
    ("gpu", "transformer_engine", ("transformer_engine",), []),
])
def test_fusions_without_their_kernels_are_refused_by_flag(monkeypatch, machine, impl,
                                                           installed, missing):
    """Megatron-LM's default fusions against what the machine has: without CUDA none runs; on
    a GPU without TransformerEngine (the lent GPU machine) RoPE fusion raises in Megatron, and
    under the local spec persistent layer norm and gradient-accumulation fusion need APEX. The
    GPU and the installed packages are simulated (neither exists here)."""
    import argparse
    import importlib.util

    from localopt_plugin.errors import UserError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(megatron_lm, "cuda_available", lambda: machine == "gpu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        object() if name in installed else None) if name in (
        "apex", "fused_weight_gradient_mlp_cuda", "transformer_engine") else real_find_spec(
        name, *a))
    args = argparse.Namespace(transformer_impl=impl, **MEGATRON_LM_FUSION_DEFAULTS)
    assert megatron_lm.missing_fused_kernels(args) == missing
    if missing:
        with pytest.raises(UserError, match=" ".join(missing)):
            megatron_lm.check_megatron_config(args)
    for flag in missing:  # each named flag is the fix
        dest, off = FLAG_TURNS_OFF[flag]
        setattr(args, dest, off)
    megatron_lm.check_megatron_config(args)


# what each flag sets in Megatron-LM's parser
FLAG_TURNS_OFF = {"--no-persist-layer-norm": ("no_persist_layer_norm", True),
                  "--no-masked-softmax-fusion": ("masked_softmax_fusion", False),
                  "--no-bias-gelu-fusion": ("bias_gelu_fusion", False),
                  "--no-bias-swiglu-fusion": ("bias_swiglu_fusion", False),
                  "--no-bias-dropout-fusion": ("bias_dropout_fusion", False),
                  "--no-gradient-accumulation-fusion": ("gradient_accumulation_fusion", False),
                  "--no-rope-fusion": ("apply_rope_fusion", False)}
