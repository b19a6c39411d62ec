"""Users' own launch scripts and DeepSpeed JSON, as published (tests/data/compat, each naming
its source): every flag and section honoured with Megatron's/DeepSpeed's meaning or refused by
name in one ``error:`` line, and what the dry run says is what trains.

The scripts are made runnable here as docs/from-megatron.md tells a user to (helpers/compat.py):
text-data flags -> ``--data-path SHARDS``, fp16 -> bf16 and NCCL -> gloo on a CPU, sizes
shrunk; every other flag name and value is kept.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from helpers.compat import (
    COMPAT,
    DS_JSONS,
    SCRIPTS,
    SEQ_TOKENS,
    for_this_machine,
    json_for_this_machine,
    read_json,
    source_of,
)
from helpers.launch import REPO, dry_run, run_train
from helpers.wds_shards import write_dataset

from localopt_plugin.model import padded_vocab_size
from localopt_plugin.platform import cuda_available

# script -> (words of its one error line, the other refused flags it lists), None: passes
SCRIPT_OUTCOMES = {
    "llama2_distributed": None,
    "gpt_1.3B_rope": None,
    # --ds-sequence-parallel-size 4 maps to --context-parallel-size 4 --cp-comm-type a2a: its
    # dry run at the 4 ranks that layout needs (SCRIPT_WORLDS) passes
    "gpt_1.3B_seq_parallel_32k": None,
    "gpt_125M_MoE64": ("mixture-of-experts layers are not supported", {
        "--moe-eval-capacity-factor", "--moe-expert-parallel-size", "--moe-loss-coeff",
        "--moe-min-capacity", "--moe-train-capacity-factor", "--num-experts"}),
    # the script word-splits its quoted schedule: Megatron-LM's own parser stops there too
    "gpt3_175b_distributed": ("unrecognized arguments: 2.4B:320 4.8B:624", set()),
    # Megatron-DeepSpeed features the plugin does not provide, each listed in one line
    "gpt_1.3B_PR-MoE64or128_MoS": ("--create-moe-param-group", {
        "--hidden-size-teacher", "--kd-beta-ce", "--load-teacher", "--mlp-type",
        "--moe-eval-capacity-factor", "--moe-expert-parallel-size", "--moe-loss-coeff",
        "--moe-min-capacity", "--moe-train-capacity-factor", "--mos",
        "--num-attention-heads-teacher", "--num-experts", "--num-experts-teacher",
        "--num-layers-teacher"}),
    "gpt_1.3B_data_efficiency_cl_ltd": ("--data-efficiency-curriculum-learning",
                                        {"--random-ltd"}),
    "gpt_1.3B_zbh1": ("--enable-zbh1-exact-semantics", {"--enable-zbh1-pipeline"}),
    "gpt_125M_dense_cl_kd": ("--hidden-size-teacher", {
        "--kd", "--kd-beta-ce", "--load-teacher", "--num-attention-heads-teacher",
        "--num-layers-teacher"}),
    # --no-load-lr-state --reset-iteration are honoured (Megatron-DeepSpeed's resume flags)
    "gpt_125M_int8_compression": None,
    # --cpu-optimizer honoured (DeepSpeed's CPU Adam), batch-size ramp-up is not
    "gpt_350M_offload_pp": ("--rampup-batch-size", set()),
    "gpt_6.7B_fpdt_32k": ("--checkpoint-in-cpu", {
        "--ds-sequence-parallel-fpdt", "--ds-sequence-parallel-fpdt-chunk-size",
        "--ds-sequence-parallel-fpdt-offloading"}),
    "gpt_universal_bf16": ("--universal-checkpoint", set()),
    "llama3_8b_h100_fp8": ("--apply-layernorm-1p", {
        "--attention-backend", "--calculate-per-token-loss", "--ckpt-format",
        "--cross-entropy-loss-fusion", "--decoupled-lr", "--decoupled-min-lr",
        "--empty-unused-memory-level", "--fp8-amax-compute-algo", "--fp8-amax-history-len",
        "--fp8-format", "--fp8-param-gather", "--grad-reduce-in-bf16", "--manual-gc",
        "--overlap-param-gather", "--profile", "--profile-step-end", "--profile-step-start",
        "--use-distributed-optimizer"}),
}
FP16_ON_CPU = "fp16 is not supported on this device"
# ZeRO++'s quantized communication has no CPU kernel: the dry run's rehearsal builds the engine
# and stops where the run would (it passes where CUDA is)
ZEROPP_ON_CPU = "This op had not been implemented on CPU backend"
# the world size a script's layout needs, where it is more than the one process the tests use
SCRIPT_WORLDS = {"gpt_1.3B_seq_parallel_32k": 4}


def fp16_trains_here() -> bool:
    """DeepSpeed's answer for this machine's accelerator: yes on CUDA and on CPUs whose oneDNN
    has fp16 (AVX-512 FP16, e.g. Intel Sapphire Rapids), no on others. The fp16 refusal is
    what a dry run gives only where it says no."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


# DeepSpeed JSON -> words of its one error line (None: passes)
JSON_OUTCOMES = {
    "alcf_generateDSconfig_bfloat16": None,
    "bf16_master_weights_zero3_autocast": "'torch_autocast'",
    "bing_bert_lamb_seq128": "'sparse_attention' was removed from DeepSpeed",
    # 1-bit Adam left DeepSpeed (0.19 asserts at start): refused before the fp16 check
    "bing_bert_onebitadam_nccl": "optimizer.type 'OneBitAdam' is neither one of DeepSpeed's",
    "cifar10_deepspeed_get_ds_config": FP16_ON_CPU,
    "cifar10_tutorial_adam_warmuplr": None,
    "curriculum_learning_tutorial_legacy": "'curriculum_learning' is DeepSpeed's legacy",
    "dschat_bfloat16_zero3_offload_tensorboard": None,
    "hellodeepspeed_bert_bf16_zero1_offload": None,
    "hf_autotp_adamw_warmupdecaylr": "'tensor_parallel' is DeepSpeed's AutoTP",
    "imagenet_fp16_zero1_gas": "'cuda_visible_devices' is not a DeepSpeed key",
    "mds_data_efficiency_gpt_1clmetric": FP16_ON_CPU,
    "megatron_gpt2_zero2_cpu_offload_actckpt": "activation_checkpointing.partition_activations",
    "monitor_tensorboard_wandb_comet_csv": "is enabled but",  # the first monitor not installed
    "autosp_deepcompile_bf16": "'compile' (DeepSpeed's torch.compile / DeepCompile)",
    "bing_bert_progressive_layer_drop": "'progressive_layer_drop' was removed",
    "bing_bert_zerooneadam_nccl": "optimizer.type 'ZeroOneAdam' is neither one of DeepSpeed's",
    "bingbertsquad_eigenvalue_quantize_training": "'eigenvalue' was removed from DeepSpeed",
    "getting_started_zero_optimization_true": FP16_ON_CPU,  # zero_optimization: true = stage 1
    "lamb_onecycle_fp16": FP16_ON_CPU,
    "lion_zero2_cpu_offload_legacy": FP16_ON_CPU,  # legacy cpu_offload read as offload
    "lr_scheduler_zero3_cpu_offload_legacy_bf16": None,
    "mds_compression_int8_125M": "'compression_training' is DeepSpeed Compression",
    "mds_curriculum_slw_gpt_1.3B": "'curriculum_learning' is DeepSpeed's legacy",
    "mds_data_efficiency_gpt_2clmetrics_cl_ltd": "'data_efficiency' (DeepSpeed's data sampling",
    "mds_offload_pp_zero3_bf16_optimizer_ratio": None,
    "megatron_gpt2_test_zero0_gas3_actckpt": "activation_checkpointing.partition_activations "
    "and activation_checkpointing.contiguous_memory_optimization",
    "sglang_zero3_nvme_param_offload_aio": "offloads to NVMe at '/local_nvme/sglang'",
    "zenflow_zero2_cpu_offload_adamw_bf16": None,
    "zeropp_tutorial": ZEROPP_ON_CPU,
}
# the scripts trained for 4 iterations: as published, or without the flags of features the
# plugin does not provide, which their dry run's one error line names
RUNS = {"llama2_distributed": (), "gpt_1.3B_rope": (),
        "gpt3_175b_distributed": ("--step-batch-size-schedule",),
        "gpt_125M_int8_compression": (), "gpt_1.3B_seq_parallel_32k": (),
        "gpt_1.3B_zbh1": ("--enable-zbh1-pipeline", "--enable-zbh1-exact-semantics"),
        "gpt_universal_bf16": ("--universal-checkpoint",),
        "gpt_350M_offload_pp": ("--rampup-batch-size",),
        "gpt_1.3B_data_efficiency_cl_ltd": ("--random-ltd",
                                            "--data-efficiency-curriculum-learning"),
        "gpt_125M_dense_cl_kd": ("--kd", "--kd-beta-ce", "--num-layers-teacher",
                                 "--hidden-size-teacher", "--num-attention-heads-teacher",
                                 "--load-teacher")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    written = write_dataset(tmp_path_factory.mktemp("compat") / "shards", 16, 4)
    return written.pattern


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def test_fixtures_name_their_source():
    files = [*(COMPAT / "scripts").glob("*"), *(COMPAT / "ds_json").glob("*.json")]
    assert len(SCRIPTS) == 14 and len(DS_JSONS) == 31
    for path in files:
        source_of(path)
    assert set(SCRIPT_OUTCOMES) == set(SCRIPTS)
    assert set(JSON_OUTCOMES) | {"zero3_offload_cpu_tutorial"} == set(DS_JSONS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_dry_run(name, shards, tmp_path):
    """Each published script: passes, or stops with its one expected error line, which also
    lists every other flag refused (so one edit fixes them all)."""
    status, setup, stderr = dry_run(for_this_machine(name, shards, tmp_path),
                                    SCRIPT_WORLDS.get(name, 1))
    expected = SCRIPT_OUTCOMES[name]
    if expected is None:
        assert status == 0, stderr[-3000:]
        return
    assert status == 2
    line = one_error_line(stderr)
    words, others = expected
    assert words in line, line
    listed = set(line.split("(also not run here: ")[1].rstrip(")").split(", ")) if (
        "also not run here" in line) else set()
    assert listed == others, line


def test_text_data_flags_name_their_replacement(shards, tmp_path):
    """Megatron's text-pipeline flags are refused with what replaces them for video tokens."""
    for flag, value in (("--tokenizer-type", "GPT2BPETokenizer"), ("--vocab-file", "v.json"),
                        ("--merge-file", "m.txt"), ("--data-impl", "mmap"),
                        ("--split", "949,50,1")):
        status, _, stderr = dry_run(["--preset", "test", "--data-path", shards, flag, value])
        line = one_error_line(stderr)
        assert status == 2 and line.startswith(f"error: {flag}") and "data-path" in line, line


@pytest.mark.parametrize("name", DS_JSONS)
def test_deepspeed_json_dry_run(name, shards, tmp_path):
    """Each published DeepSpeed JSON, at the world size its batch triple was written for:
    passes with a note per section, or stops with its one expected error line."""
    path = COMPAT / "ds_json" / f"{name}.json"
    cfg = read_json(path)
    batch = [cfg.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                  "gradient_accumulation_steps")]
    world = batch[0] // (batch[1] * batch[2]) if all(isinstance(v, int) for v in batch) else 1
    expected = JSON_OUTCOMES.get(name)
    if expected == FP16_ON_CPU and fp16_trains_here():
        expected = None  # its fp16 section trains on this device: the JSON passes
    if expected == ZEROPP_ON_CPU and cuda_available():
        expected = None
    status, setup, stderr = dry_run(["--preset", "test", "--data-path", shards, "--deepspeed",
                                     "--deepspeed_config", str(path)], world)
    if expected is None:
        assert status == 0, stderr[-3000:]
        train_batch = cfg.get("train_batch_size")
        if isinstance(train_batch, int):
            assert setup["micro batch, global batch, accumulation"][1] == train_batch
        return
    assert status == 2
    line = one_error_line(stderr)
    assert expected in line, line
    if name.startswith("monitor"):
        missing = [p for p in ("tensorboard", "wandb", "comet_ml")
                   if importlib.util.find_spec(p) is None]
        assert missing and f"{missing[0]} is not installed" in line, line


def test_bfloat16_alias_and_batch_inference(shards, tmp_path):
    """DeepSpeed's "bfloat16" alias turns bf16 on (no "bf16" key added that DeepSpeed would
    read first); a batch triple DeepSpeed completes is completed the same way."""
    alias = tmp_path / "alias.json"
    alias.write_text('// a comment, as DeepSpeed (hjson) allows\n{"train_batch_size": 16, '
                     '"gradient_accumulation_steps": 1, "bfloat16": {"enabled": true}}')
    status, setup, stderr = dry_run(["--preset", "test", "--data-path", shards,
                                     "--deepspeed_config", str(alias)])
    assert status == 0, stderr
    assert setup["precision"] == "bf16" and "bf16" not in setup["deepspeed"]
    assert setup["deepspeed"]["bfloat16"] == {"enabled": True}
    assert setup["micro batch, global batch, accumulation"] == [16, 16, 1]
    from deepspeed.runtime.config import DeepSpeedConfig

    assert DeepSpeedConfig(setup["deepspeed"]).bfloat16_config.enabled  # as DeepSpeed reads it

    both = tmp_path / "both.json"
    both.write_text(json.dumps({"bf16": {"enabled": False}, "bfloat16": {"enabled": True}}))
    status, _, stderr = dry_run(["--preset", "test", "--deepspeed_config", str(both)])
    assert status == 2 and "keep one" in one_error_line(stderr)


@pytest.mark.parametrize("argv, words", [
    (["--fp16"], FP16_ON_CPU),
    (["--distributed-backend", "nccl"], "--distributed-backend nccl needs CUDA"),
    (["--deepspeed_config", "{zero}"], "DeepSpeed rejects the config"),
    (["--dataset", "synthetic-video-tokens", "--data-path", "x.tar"],
     "--dataset synthetic-video-tokens does not read --data-path"),
    (["--train-iters", "4", "--train-samples", "8"], "give one of --train-iters"),
    (["--train-samples", "8", "--lr-warmup-iters", "2"], "use the -samples form"),
    (["--lr-warmup-samples", "2"], "need sample-based training"),
    (["--use-distributed-optimizer"], "use --zero-stage 1"),
    (["--overlap-grad-reduce"], "applies only under ZeRO: add --zero-stage 1"),
])
def test_what_would_crash_at_start_fails_the_dry_run(argv, words, tmp_path):
    if argv[0] == "--fp16" and fp16_trains_here():
        pytest.skip("fp16 trains on this device (DeepSpeed's accelerator says so); "
                    "test_fp16_is_refused_where_the_accelerator_has_none tests the refusal")
    if "{zero}" in argv:  # DeepSpeed's pydantic check of the ZeRO section
        path = tmp_path / "zero.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": 2,
                                                          "reduce_bucket_size": 0}}))
        argv = [a.replace("{zero}", str(path)) for a in argv]
    status, _, stderr = dry_run(["--preset", "test", *argv])
    assert status == 2 and words in one_error_line(stderr), stderr[-2000:]


def test_fp16_is_refused_where_the_accelerator_has_none(monkeypatch):
    """The refusal of fp16 on a device without it, on every machine: DeepSpeed's accelerator is
    told to answer no (a mock: on a CPU with AVX-512 FP16, or a GPU, such a device is not here).
    The same JSON passes where it answers yes."""
    from deepspeed.accelerator import get_accelerator

    from localopt_plugin.errors import UserError
    from localopt_plugin.training.deepspeed_config import check_with_deepspeed

    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "fp16": {"enabled": True}}
    accelerator = type(get_accelerator())
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda self: True)
    check_with_deepspeed(cfg, 1, bf16=False, fp16=True)
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda self: False)
    with pytest.raises(UserError, match=f"^{FP16_ON_CPU} .*train in bf16 here"):
        check_with_deepspeed(cfg, 1, bf16=False, fp16=True)


def test_overlap_grad_reduce_reaches_deepspeed_under_zero():
    status, setup, stderr = dry_run(["--preset", "test", "--overlap-grad-reduce",
                                     "--zero-stage", "1"])
    assert status == 0, stderr
    assert setup["deepspeed"]["zero_optimization"] == {"stage": 1, "overlap_comm": True}


def test_sequence_parallel_at_tp1_is_turned_off_as_megatron_does():
    status, setup, stderr = dry_run(["--preset", "test", "--sequence-parallel"])
    assert status == 0, stderr
    assert any(n.startswith("--sequence-parallel: turned off") for n in setup["flag notes"])


def megatron_lr(steps: int, increment: float, **schedule) -> list[float]:
    """Megatron-Core's OptimizerParamScheduler, counted in Megatron's own units (samples or
    tokens), stepped as Megatron-LM's train loop steps it: the LR after each iteration."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = OptimizerParamScheduler(
        opt, init_lr=0.0, start_wd=0.0, end_wd=0.0, wd_incr_steps=1, wd_incr_style="constant",
        **schedule)
    lrs = []
    for _ in range(steps):
        scheduler.step(increment)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def checkpoint_state(checkpoints: Path) -> dict:
    latest = (checkpoints / "latest").read_text().strip()
    return torch.load(checkpoints / latest / "mp_rank_00_model_states.pt", weights_only=False)


def checkpoint_module(checkpoints: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in checkpoint_state(checkpoints)["module"].items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


def token_schedule(max_lr: float, min_lr: float) -> list[float]:
    """Megatron-DeepSpeed's token schedule of the shrunk scripts (global batch 2 of SEQ_TOKENS
    each per iteration, warm-up 2 samples' tokens, decay 8 samples' tokens, cosine)."""
    return megatron_lr(4, 2 * SEQ_TOKENS, max_lr=max_lr, min_lr=min_lr,
                       lr_warmup_steps=2 * SEQ_TOKENS, lr_decay_steps=8 * SEQ_TOKENS,
                       lr_decay_style="cosine")


# Megatron-LM counts its schedule in samples (global batch 2 per iteration),
# Megatron-DeepSpeed's token flags in tokens (SEQ_TOKENS per sample)
EXPECTED_LR = {
    "llama2_distributed": lambda: megatron_lr(
        4, 2, max_lr=3e-4, min_lr=3e-5, lr_warmup_steps=1 * 2, lr_decay_steps=4 * 2,
        lr_decay_style="cosine"),
    "gpt3_175b_distributed": lambda: megatron_lr(
        4, 2, max_lr=6e-5, min_lr=6e-6, lr_warmup_steps=0.001 * 4 * 2, lr_decay_steps=4 * 2,
        lr_decay_style="cosine"),
    # no warm-up flag, decay over --train-iters (Megatron's default)
    "gpt_universal_bf16": lambda: megatron_lr(
        4, 2, max_lr=6e-3, min_lr=6e-4, lr_warmup_steps=0, lr_decay_steps=4 * 2,
        lr_decay_style="cosine"),
    "gpt_1.3B_rope": lambda: token_schedule(2e-4, 1e-6),
    "gpt_1.3B_seq_parallel_32k": lambda: token_schedule(2e-4, 1e-6),
    "gpt_1.3B_zbh1": lambda: token_schedule(2e-4, 1e-6),
    "gpt_1.3B_data_efficiency_cl_ltd": lambda: token_schedule(2e-4, 1e-6),
    "gpt_125M_int8_compression": lambda: token_schedule(6e-5, 6e-5),
    "gpt_125M_dense_cl_kd": lambda: token_schedule(2.4e-3, 6e-5),
    "gpt_350M_offload_pp": lambda: token_schedule(3e-4, 3e-5),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_script_trains_what_its_dry_run_said(name, shards, tmp_path):
    """Published scripts, as published or without the flags their error line names: 4
    iterations on CPU, at the world size their layout needs.
    The trained model (from its checkpoint), precision, iterations, optimizer and LR per
    iteration are what the dry run said; the LR is Megatron's scheduler counted in Megatron's
    units."""
    argv = for_this_machine(name, shards, tmp_path, drop=RUNS[name])
    world = SCRIPT_WORLDS.get(name, 1)
    status, setup, stderr = dry_run(argv, world)
    assert status == 0, stderr[-3000:]
    metrics = run_train(tmp_path, *argv, name=name, nproc=world)

    assert len(metrics) == setup["train iters"] == 4
    if "--log-optimizer-states-to-tensorboard" in argv:  # Megatron-DeepSpeed's norms, logged
        assert any("optimizer/momentum_l2" in r for r in metrics)
    if "--cpu-optimizer" in argv:
        assert "CPU Adam" in setup["optimizer"], setup["optimizer"]
    state = checkpoint_state(tmp_path / "checkpoints")
    tp, pp, cp, dp = setup["parallel layout (tp, pp, cp, dp)"]
    assert state["world_size"] == world == tp * pp * cp * dp
    assert state["config"]["parallel"]["context_parallel_size"] == cp
    module = checkpoint_module(tmp_path / "checkpoints")
    assert sum(v.numel() for v in module.values()) == setup["parameters"]
    assert {v.dtype for v in module.values()} == {torch.bfloat16} and setup["precision"] == "bf16"
    arch = setup["architecture"]
    qkv = module["model.decoder.layers.0.self_attention.linear_qkv.weight"]
    head_dim = arch["hidden"] // arch["attention heads"]
    assert qkv.shape[0] == head_dim * (arch["attention heads"] + 2 * arch["query groups"])
    fc1 = module["model.decoder.layers.0.mlp.linear_fc1.weight"]
    assert fc1.shape[0] == arch["ffn hidden"] * (2 if arch["ffn"] == "SwiGLU" else 1)
    has_table = any("position_embeddings" in k for k in module)
    assert has_table == (arch["position embedding"] == "learned_absolute")
    assert [r["lr"] for r in metrics] == pytest.approx(EXPECTED_LR[name](), rel=1e-9)
    assert all(math.isfinite(r["lm loss"]) for r in metrics)


@pytest.mark.slow
def test_data_path_bfloat16_and_swiglu_default(shards, tmp_path):
    """Three silent changes, gone: ``--data-path`` without ``--dataset`` trains on the shards,
    a JSON ``"bfloat16"`` trains in bf16, ``--swiglu`` without ``--ffn-hidden-size`` builds
    Megatron's int(8h/3) rounded down to 64; a sample-based schedule gives Megatron's LR."""
    config = tmp_path / "bfloat16.json"
    config.write_text(json.dumps({"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
                                  "bfloat16": {"enabled": True}}))
    argv = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4",
            "--swiglu", "--normalization", "rmsnorm", "--data-path", shards,
            "--deepspeed_config", str(config), "--train-samples", "8",
            "--lr-warmup-samples", "2", "--lr-decay-samples", "6", "--lr", "1e-3",
            "--min-lr", "1e-4", "--lr-decay-style", "cosine",
            "--save", str(tmp_path / "checkpoints")]
    metrics = run_train(tmp_path, *argv)
    module = checkpoint_module(tmp_path / "checkpoints")
    assert {v.dtype for v in module.values()} == {torch.bfloat16}
    assert module["model.decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 320, 128)
    # the shards' vocabulary (VOCAB video ids + class conditions + specials), not the
    # built-in synthetic tokens' (512 codes)
    saved = checkpoint_state(tmp_path / "checkpoints")["config"]
    assert saved["dataset"] == "video-wds" and saved["dataset_config"]["data_path"] == [shards]
    rows = module["model.embedding.word_embeddings.weight"].shape[0]
    assert rows == padded_vocab_size(59, 128, 1) < 512
    assert [r["lr"] for r in metrics] == pytest.approx(megatron_lr(
        4, 2, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=2, lr_decay_steps=6,
        lr_decay_style="cosine"), rel=1e-9)


def test_megatron_lm_flag_list_is_complete():
    """Every flag of the installed Megatron-LM's parser is in megatron_lm_flags.json (run in
    the Python 3.12 environment where megatron.training imports)."""
    import subprocess

    from helpers.launch import megatron_lm_python

    python = megatron_lm_python()
    proc = subprocess.run([str(python), "tools/megatron_lm_flags.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


@pytest.mark.slow
def test_resume_checks_the_schedule_as_megatron_does(tmp_path):
    """On --load, the flags' LR schedule must match the checkpoint's (Megatron-LM's default);
    --override-opt_param-scheduler takes the flags'; --use-checkpoint-opt_param-scheduler
    keeps the checkpoint's."""
    import subprocess
    import sys

    from helpers.launch import TRAIN_MODULE, subprocess_env

    base = ["--preset", "test", "--micro-batch-size", "1", "--global-batch-size", "1",
            "--lr-decay-style", "linear", "--save", str(tmp_path / "ckpt"),
            "--load", str(tmp_path / "ckpt")]
    run_train(tmp_path, *base, "--train-iters", "2", "--lr", "1e-3", name="first")
    proc = subprocess.run([sys.executable, "-m", TRAIN_MODULE, *base, "--train-iters", "2",
                           "--lr", "2e-3"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert "--override-opt_param-scheduler" in line and "learning rate" in line, line
    # the flags' schedule: peak 2e-3 decaying linearly over 4 iterations, from iteration 2 on
    resumed = run_train(tmp_path, *base, "--train-iters", "4", "--lr", "2e-3",
                        "--override-opt_param-scheduler", name="override")
    assert [r["lr"] for r in resumed] == pytest.approx([2e-3 * 1 / 4, 0.0])


@pytest.mark.parametrize("name", ["lr_scheduler_zero3_cpu_offload_legacy_bf16",
                                  "mds_offload_pp_zero3_bf16_optimizer_ratio",
                                  "zenflow_zero2_cpu_offload_adamw_bf16",
                                  # the legacy "zero_optimization": true (stage 1), one
                                  # of the tracebacks (the legacy "cpu_offload": test
                                  # _deepspeed_json's legacy spellings)
                                  "getting_started_zero_optimization_true",
                                  "cifar10_deepspeed_get_ds_config",
                                  "dschat_bfloat16_zero3_offload_tensorboard"])
def test_published_json_that_passes_the_dry_run_trains(name, shards, tmp_path):
    """After a passing dry run, no traceback: 4 iterations under the JSON (its batch keys
    shrunk to one process, fp16 -> bf16 on a CPU), in the precision and with the optimizer the
    dry run named."""
    path = json_for_this_machine(name, tmp_path, cpu=not fp16_trains_here())
    argv = ["--preset", "test", "--data-path", shards, "--deepspeed", "--deepspeed_config",
            str(path), "--train-iters", "4", "--log-interval", "1"]
    status, setup, stderr = dry_run(argv)
    assert status == 0, stderr[-3000:]
    records = run_train(tmp_path, *argv, name=name, timeout=900)
    assert [r["iteration"] for r in records if "lm loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["lm loss"]) for r in records if "lm loss" in r)
    fp16 = read_json(path).get("fp16", {}).get("enabled", False)
    assert setup["precision"] == ("fp16" if fp16 else "bf16"), setup["precision"]
    assert "CPU Adam" in setup["optimizer"] or "(JSON)" in setup["optimizer"], setup["optimizer"]
