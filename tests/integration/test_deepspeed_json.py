"""DeepSpeed JSON as DeepSpeed users write it: optimizer and scheduler sections honoured,
conflicting flags refused, ZeRO-Offload on DeepSpeed's CPU Adam, bad files reported in one
line."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from helpers.configs import PRESET_TRAIN_FLAGS
from helpers.launch import REPO, TRAIN_MODULE, run_train, subprocess_env

pytestmark = pytest.mark.slow

# the preset run without the LR flags a JSON section may take over
BASE = tuple(f for i, f in enumerate(PRESET_TRAIN_FLAGS)
             if f not in ("--lr", "--lr-warmup-iters")
             and PRESET_TRAIN_FLAGS[i - 1] not in ("--lr", "--lr-warmup-iters"))


def _json(tmp_path, name: str, config: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


def _refused(*flags: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", TRAIN_MODULE, *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def test_optimizer_section_is_honoured(tmp_path):
    """DeepSpeed builds the JSON's AdamW; Megatron's schedule peaks at the JSON's lr. The same
    AdamW configured by flags gives the same run."""
    config = _json(tmp_path, "opt.json", {"optimizer": {"type": "AdamW", "params": {
        "lr": 2e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01,
        "torch_adam": True}}})
    from_json = run_train(tmp_path, *BASE, "--lr-warmup-iters", "2", "--deepspeed_config",
                          config, name="json")
    from_flags = run_train(tmp_path, *BASE, "--lr-warmup-iters", "2", "--lr", "2e-3",
                           name="flags")
    assert from_json[1]["lr"] == pytest.approx(2e-3)  # the end of warm-up: the JSON's peak
    assert [r["lr"] for r in from_json] == [r["lr"] for r in from_flags]
    assert [r["lm loss"] for r in from_json] == pytest.approx(
        [r["lm loss"] for r in from_flags], rel=1e-6)


def test_scheduler_section_is_honoured(tmp_path):
    """The logged learning rates are DeepSpeed's WarmupLR's, stepped independently here."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupLR

    params = {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 4,
              "warmup_type": "linear"}
    config = _json(tmp_path, "sched.json", {"scheduler": {"type": "WarmupLR",
                                                          "params": params}})
    records = run_train(tmp_path, *BASE, "--deepspeed_config", config, name="sched")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    reference = WarmupLR(optimizer, **params)
    expected = []
    for _ in records:
        reference.step()
        expected.append(reference.get_last_lr()[0])
    assert [r["lr"] for r in records] == pytest.approx(expected)
    assert max(r["lr"] for r in records) == pytest.approx(1e-3)


def test_sections_refuse_the_flags_they_take_over(tmp_path):
    optimizer = _json(tmp_path, "opt.json", {"optimizer": {"type": "AdamW",
                                                           "params": {"lr": 1e-3}}})
    proc = _refused(*BASE, "--deepspeed_config", optimizer, "--lr", "5e-4")
    assert "'optimizer'" in proc.stderr and "--lr" in proc.stderr
    scheduler = _json(tmp_path, "sched.json", {"scheduler": {"type": "WarmupLR",
                                                             "params": {}}})
    proc = _refused(*BASE, "--deepspeed_config", scheduler, "--lr-warmup-iters", "3")
    assert "'scheduler'" in proc.stderr and "--lr-warmup-iters" in proc.stderr


def test_missing_and_malformed_config_files_give_one_error_line(tmp_path):
    missing = str(tmp_path / "nope.json")
    proc = _refused(*BASE, "--deepspeed_config", missing)
    assert f"DeepSpeed config {missing}: no such file" in proc.stderr
    malformed = tmp_path / "bad.json"
    malformed.write_text('{"train_batch_size": 8,,}')
    proc = _refused(*BASE, "--deepspeed_config", str(malformed))
    assert f"DeepSpeed config {malformed}: not valid JSON" in proc.stderr


def test_zero_offload_runs_deepspeeds_cpu_adam(tmp_path):
    config = _json(tmp_path, "offload.json", {"zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}}})
    offloaded = run_train(tmp_path, *PRESET_TRAIN_FLAGS, "--deepspeed_config", config,
                          name="offload", timeout=900)
    plain = run_train(tmp_path, *PRESET_TRAIN_FLAGS, "--zero-stage", "2", name="plain")
    # CPU Adam is AdamW computed by DeepSpeed's own kernel: the same run up to rounding
    assert [r["lm loss"] for r in offloaded] == pytest.approx([r["lm loss"] for r in plain],
                                                              rel=1e-4)


def test_legacy_zero_spellings_are_read_as_deepspeed_reads_them(tmp_path):
    """``"zero_optimization": true`` is stage 1 and ``"cpu_offload": true`` is
    ``offload_optimizer`` on the CPU, as in DeepSpeed; the legacy offload trains the same run
    as the current spelling (DeepSpeed's CPU Adam both times)."""
    from helpers.launch import dry_run

    legacy = _json(tmp_path, "legacy.json", {"zero_optimization": True})
    status, setup, err = dry_run([*PRESET_TRAIN_FLAGS, "--deepspeed_config", legacy])
    assert status == 0, err
    assert setup["deepspeed"]["zero_optimization"]["stage"] == 1
    assert any("legacy spelling" in n for n in setup["deepspeed notes"])
    offload = _json(tmp_path, "offload-legacy.json", {"zero_optimization": {
        "stage": 2, "cpu_offload": True}})
    status, setup, err = dry_run([*PRESET_TRAIN_FLAGS, "--deepspeed_config", offload])
    assert status == 0 and "CPU Adam" in setup["optimizer"], err
    current = _json(tmp_path, "offload.json", {"zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}}})
    flags = (*PRESET_TRAIN_FLAGS, "--train-iters", "3")
    old = run_train(tmp_path, *flags, "--deepspeed_config", offload, name="legacy", timeout=900)
    new = run_train(tmp_path, *flags, "--deepspeed_config", current, name="current",
                    timeout=900)
    assert [r["lm loss"] for r in old] == [r["lm loss"] for r in new]


@pytest.mark.parametrize(("optimizer", "message"), [
    ({"type": "Adam", "params": {"lr": 1e-3, "max_grad_norm": 1.0}},
     "max_grad_norm is refused by DeepSpeed: clip with the top-level \"gradient_clipping\""),
    ({"type": "Adamz", "params": {"lr": 1e-3}},
     "optimizer.type 'Adamz' is neither one of DeepSpeed's"),
])
def test_optimizer_sections_deepspeed_would_refuse_stop_the_dry_run(tmp_path, optimizer,
                                                                     message):
    """What DeepSpeed raised at start (ValueError, AssertionError) is one error line before
    any process group (the dry run shares the check)."""
    config = _json(tmp_path, "opt.json", {"optimizer": optimizer})
    proc = _refused(*BASE, "--deepspeed_config", config)
    assert message in proc.stderr


def test_every_refused_key_of_one_config_in_one_line(tmp_path):
    """Two of DeepSpeed's activation-checkpointing options, a removed section and an unknown
    key: all named in the one error line (a user fixes them in one pass)."""
    config = _json(tmp_path, "many.json", {
        "activation_checkpointing": {"partition_activations": True, "cpu_checkpointing": True},
        "sparse_attention": {"mode": "fixed"}, "not_a_key": 1})
    proc = _refused(*BASE, "--deepspeed_config", config, "--dry-run")
    line = next(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    for words in ("activation_checkpointing.partition_activations and "
                  "activation_checkpointing.cpu_checkpointing", "'sparse_attention'",
                  "'not_a_key'"):
        assert words in line


def test_nvme_offload_is_checked_before_the_engine_is_built(tmp_path):
    """DeepSpeed stops while building the engine when an NVMe offload's path is missing or its
    async I/O op cannot load: the dry run says so first, in one line."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    missing = _json(tmp_path, "nvme-missing.json", {"zero_optimization": {
        "stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path / "no")}}})
    proc = _refused(*BASE, "--deepspeed_config", missing, "--dry-run")
    assert "not a writable directory here" in proc.stderr
    if not AsyncIOBuilder().is_compatible(verbose=False):
        present = _json(tmp_path, "nvme.json", {"zero_optimization": {
            "stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)}}})
        proc = _refused(*BASE, "--deepspeed_config", present, "--dry-run")
        assert "needs DeepSpeed's async I/O op (libaio)" in proc.stderr


def test_the_dry_run_builds_the_engine_and_stops_on_what_deepspeed_refuses(tmp_path):
    """An optimizer option no rule knows passes every check of the configuration (resolve) and
    would stop the run inside DeepSpeed's engine: the dry run's rehearsal builds that engine on
    a stand-in model and ends with one error line naming it. A valid ZeRO-3 offload config is
    built and stepped (DeepSpeed's stage-3 optimizer) in a world of one process."""
    import torch.distributed as dist
    from helpers.configs import train_args
    from helpers.launch import dry_run

    from localopt_plugin.training.config import resolve

    bogus = _json(tmp_path, "bogus.json", {"optimizer": {
        "type": "AdamW", "params": {"lr": 1e-3, "betas_typo": [0.9, 0.95]}}})
    resolve(train_args(*BASE, "--deepspeed_config", bogus), 1)  # the rules see nothing wrong
    proc = _refused(*BASE, "--deepspeed_config", bogus, "--dry-run")
    assert "the run would stop at start (building the DeepSpeed engine" in proc.stderr
    assert "betas_typo" in proc.stderr
    offload = _json(tmp_path, "z3.json", {"zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}})
    status, setup, err = dry_run([*BASE, "--deepspeed_config", offload])
    assert status == 0, err
    rehearsal = setup["rehearsal"]
    assert rehearsal["zero stage"] == 3 and "Stage3" in rehearsal["optimizer"], rehearsal
    assert math.isfinite(rehearsal["first step loss"])
    assert dist.get_world_size() == 1
