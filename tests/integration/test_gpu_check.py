"""The prepared GPU check (tools/gpu_check.py) rehearsed on CPU, as CI runs it on every
submission: the same stages at tiny sizes in the Python 3.12 environment the GPU machine mirrors
(PyAV made unimportable, as it is there); the summary, the file rule, a failed stage shown as
failed, a stage past its timeout killed with its children; the wheels the check carries within
the travel size."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from helpers.launch import REPO, megatron_lm_python, subprocess_env

pytestmark = pytest.mark.slow

MAX_OUT_FILES = 6


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def rehearse(out, *flags: str, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([megatron_lm_python(), "tools/gpu_check.py", "--rehearse", "--out",
                           str(out), *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=1500, env=subprocess_env(**env))
    summary = json.loads((out / "summary.json").read_text())
    return proc, summary


def test_the_rehearsal_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    proc, summary = rehearse(out)
    stages = {s["name"]: s for s in summary["stages"]}
    assert proc.returncode == 0 and summary["ok"], proc.stdout[-4000:]
    assert list(stages) == ["env", "gpu-tests", "speed", "shards", "pretrain"]
    assert all(s["status"] == "passed" and s["seconds"] > 0 for s in stages.values())
    assert json.loads(stages["env"]["note"])["megatron.training"] == "importable"
    # the GPU tests exist and are skipped here, each with its reason
    assert "skipped" in stages["gpu-tests"]["note"] and " passed" not in stages["gpu-tests"]["note"]
    assert "needs a CUDA device" in (out / "gpu-tests.log").read_text()
    assert stages["pretrain"]["note"] == "last iteration 3/3"
    assert stages["shards"]["note"].startswith("SEQ_LENGTH=")
    files = sorted(os.listdir(out))
    assert files == ["gpu-tests.log", "pretrain.log", "speed.json", "speed.log",
                     "summary.json"] and len(files) <= MAX_OUT_FILES
    _check_speed_results(json.loads((out / "speed.json").read_text()),
                         (out / "speed.log").read_text())


def _check_speed_results(result: dict, printed: str) -> None:
    """The speed benchmark's table and JSON (the rehearsal runs it at a tiny model size)."""
    assert "expected step" in printed and "target worst-window memory" in printed
    rows = {r["row"]: r for r in result["rows"]}
    assert {"full-sequence", "full-sequence + selective recompute",
            "full-sequence + full recompute", "fewer-frames"} <= set(rows)
    starts = [r["window start"] for r in result["rows"] if r["window start"] is not None]
    assert starts == [0, 1, 2, 3]  # every candidate window of 5 frames, W = 2
    assert rows["full-sequence"]["step ratio"] == 1.0
    local = result["local-opt"]
    assert sum(local["window probabilities"].values()) == pytest.approx(1.0)
    # memory is deterministic: windows keep less than the full sequence, later ones more
    windows = [r for r in result["rows"] if r["window start"] is not None]
    assert all(r["memory ratio"] < 1 for r in windows)
    assert windows[-1]["peak memory (MB)"] > windows[0]["peak memory (MB)"]
    assert local["worst-window memory ratio"] == max(r["memory ratio"] for r in windows)
    assert set(result["targets"]) >= {"expected step", "expected forward+backward",
                                      "worst-window memory"}
    # at equal memory: a larger micro-batch whose every window fits full-sequence's peak
    equal = result["equal memory"]
    assert equal["micro batch"] > equal["full-sequence micro batch"] == 1
    assert equal["worst-window peak memory (MB)"] <= equal["full-sequence peak memory (MB)"]
    assert equal["throughput ratio"] == pytest.approx(
        equal["samples/s"] / equal["full-sequence samples/s"])
    assert "local-opt at equal memory: micro-batch" in printed


def test_an_environment_without_deepspeed_stops_the_check_at_once(tmp_path):
    """A failed stage shows as failed, with its log's tail; without DeepSpeed nothing else
    runs and the check says why."""
    shadow = tmp_path / "shadow" / "deepspeed"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no deepspeed wheel travelled')\n")
    out = tmp_path / "out"
    proc, summary = rehearse(out, PYTHONPATH=os.pathsep.join(
        [str(shadow.parent), subprocess_env()["PYTHONPATH"]]))
    assert proc.returncode == 1 and not summary["ok"]
    env, *rest = summary["stages"]
    assert env["status"] == "failed" and env["returncode"] != 0
    assert any("no deepspeed wheel travelled" in line for line in env["tail"])
    assert [s["status"] for s in rest] == ["not run"] * 4
    assert "environment is not usable" in proc.stdout
    assert os.listdir(out) == ["summary.json"]
    # --max-files: a check that leaves more files than asked fails, saying so
    proc, summary = rehearse(tmp_path / "capped", "--max-files", "0", PYTHONPATH=os.pathsep.join(
        [str(shadow.parent), subprocess_env()["PYTHONPATH"]]))
    assert not summary["ok"] and "more than --max-files 0" in proc.stdout


def test_a_stage_past_its_timeout_is_killed_with_its_children(tmp_path):
    gpu_check = gpu_check_module()
    marker = tmp_path / "child-alive"
    child = f"sleep 3; touch {marker}"  # a grandchild, as torchrun's workers are
    stage = gpu_check.Stage("slow", [["bash", "-c", f"({child}) & sleep 30"]], 1.0,
                            str(tmp_path / "slow.log"))
    result = gpu_check.run_stage(stage, dict(os.environ))
    assert result.status == "timed out" and result.returncode == 124
    assert result.seconds < 10 and "killed after its 1 s timeout" in result.tail[-1]
    subprocess.run(["sleep", "4"])
    assert not marker.exists(), "the stage's child outlived the timeout"


def test_the_wheels_the_check_carries_fit_the_travel_size(tmp_path):
    """tools/gpu_wheels.sh as a user runs it before a device call: pinned wheels, one version
    each, no PyAV, and everything that travels within 55 MiB."""
    dest = tmp_path / "gpu_wheels"
    proc = subprocess.run(["bash", "tools/gpu_wheels.sh"], cwd=REPO, capture_output=True,
                          text=True, timeout=600,
                          env=subprocess_env(DEST=str(dest), PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = sorted(w.split("-")[0].lower().replace("_", "-") for w in os.listdir(dest))
    assert wheels == sorted(["annotated-types", "braceexpand", "deepspeed", "hjson",
                             "megatron-core", "pydantic", "pydantic-core", "webdataset"])
    total = [line for line in proc.stdout.splitlines() if line.strip().endswith(
        "total (limit 55 MiB)")]
    assert total and float(total[0].split()[0]) <= 55
    assert subprocess.run([sys.executable, "tools/travel_size.py", "--carry", str(dest),
                           "--limit-mib", "1"], cwd=REPO, capture_output=True).returncode == 1
