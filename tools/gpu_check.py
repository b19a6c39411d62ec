#!/usr/bin/env python3
"""The GPU acceptance check: on a CUDA machine, stages that cannot fail silently, within a time
budget, writing a bounded number of files.

Stages, each with its own timeout, exit status and log (tail in the summary):
  env        install an offline wheel bundle if given (--wheels); versions; stops the check at
             once if deepspeed, megatron-core, Megatron-LM or webdataset do not import
  gpu-tests  the GPU-marked tests (tests/unit/test_attention.py: the window call under the
             flash kernel alone, the GPU's loss and gradients against the fp32 reference with
             and without recomputation, TransformerEngine's path when TE is importable)
  speed      localopt-bench speed --preset gpu-paper17 (110m preset, bf16; TE spec if importable)
  shards     video-token shards from the embedded procedural videos (no PyAV needed)
  pretrain   Megatron-LM's pretrain() with the plugin (megatron_configs/pretrain_video_gpt.sh,
             which turns off the fusions whose kernels the machine lacks), a few iterations

Usage on any machine with a CUDA GPU and this repository (docs/benchmarks.md):
    python tools/gpu_check.py --out gpu_results                     # every stage
    python tools/gpu_check.py --out gpu_results --only speed        # rerun one stage
Options: --budget SECONDS for the whole check (default: the stages' timeouts added up, 420 s),
--timeout STAGE=SECONDS, --max-files N written to --out (default 6: summary.json, gpu-tests.log,
speed.log, speed.json, pretrain.log; shards and checkpoints stay in a temporary folder), and
--wheels DIR, a folder of wheels made by tools/gpu_wheels.sh for a machine without network.
The verdict is summary.json ("ok", and per stage: status, seconds, log tail).
CPU rehearsal (CI runs it: the same stages at tiny sizes, the same summary and file rules):
    .venv312/bin/python tools/gpu_check.py --rehearse --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_OUT_FILES = 6  # the default of --max-files
TAIL_LINES = 25
# seconds per stage; on the GPU they add up to the budget
GPU_TIMEOUTS = {"env": 45, "gpu-tests": 90, "speed": 120, "shards": 30, "pretrain": 135}
REHEARSAL_TIMEOUTS = {"env": 120, "gpu-tests": 300, "speed": 300, "shards": 120,
                      "pretrain": 420}
STAGES = tuple(GPU_TIMEOUTS)
NEEDS = {"pretrain": "shards"}  # a stage that cannot run when another failed
# What the rehearsal makes unimportable, as it is on the GPU machine (no wheel is carried)
NOT_ON_THE_MACHINE = ("av",)

ENV_PROBE = r"""
import importlib, importlib.util, json, platform, torch
found = {"python": platform.python_version(), "torch": torch.__version__,
         "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)
         if torch.cuda.is_available() else None}
missing = []
for name in ("deepspeed", "megatron.core", "megatron.training", "webdataset", "localopt_plugin"):
    try:
        module = importlib.import_module(name)
        found[name] = getattr(module, "__version__", "importable")
    except Exception as err:
        missing.append(f"{name}: {type(err).__name__}: {err}")
for name in ("transformer_engine", "apex"):
    found[name] = importlib.util.find_spec(name) is not None
print("ENV " + json.dumps(found))
if missing:
    raise SystemExit("not importable: " + "; ".join(missing))
"""


@dataclass
class Stage:
    name: str
    commands: list[list[str]]
    timeout_s: float
    log: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    name: str
    status: str  # passed | failed | timed out | not run
    returncode: int | None
    seconds: float
    timeout_s: float
    log: str
    tail: list[str]
    commands: list[str]
    note: str = ""


def tail(path: str, lines: int = TAIL_LINES) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        return [line.rstrip("\n") for line in f.readlines()[-lines:]]


def run_stage(stage: Stage, env: dict[str, str]) -> Result:
    """Run the stage's commands in order in their own process group, all output to its log;
    past its timeout the whole group (torchrun's workers too) is killed: returncode 124."""
    started, returncode, status = time.monotonic(), 0, "passed"
    os.makedirs(os.path.dirname(stage.log), exist_ok=True)
    with open(stage.log, "w") as log:
        for command in stage.commands:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            left = stage.timeout_s - (time.monotonic() - started)
            proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    env={**env, **stage.env}, start_new_session=True)
            try:
                returncode = proc.wait(timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                returncode, status = 124, "timed out"
                log.write(f"\n[gpu_check] stage {stage.name} killed after its "
                          f"{stage.timeout_s:g} s timeout\n")
                break
            if returncode != 0:
                status = "failed"
                break
    return Result(stage.name, status, returncode, round(time.monotonic() - started, 1),
                  stage.timeout_s, stage.log, tail(stage.log), [" ".join(c) for c in
                                                                stage.commands])


def build_stages(args: argparse.Namespace, work: str, python: str,
                 timeouts: dict[str, float], te: bool, seq_length: str) -> dict[str, Stage]:
    """The stages' commands; ``te`` and ``seq_length`` come from the env and shards stages."""
    out, impl = args.out, "transformer_engine" if te else "local"
    shards = os.path.join(work, "shards")
    pattern = os.path.join(shards, "train-{000000..000001}.tar")
    env_commands = []
    if args.wheels:
        env_commands.append([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                             "--no-compile", "--no-cache-dir", "--upgrade", "--target",
                             os.path.join(work, "site"),
                             *sorted(os.path.join(args.wheels, w)
                                     for w in os.listdir(args.wheels) if w.endswith(".whl"))])
    env_commands.append([python, "-c", ENV_PROBE])
    if args.rehearse:  # tiny sizes on CPU, the same commands otherwise
        speed = ["--preset", "paper17", "--repeats", "3", "--warmup", "1", "--model-flags",
                 "--num-layers 1 --hidden-size 32 --num-attention-heads 2 "
                 "--num-query-groups 1 --ffn-hidden-size 64"]
        videos, per_shard = "procedural:8:0", "4"
        pretrain_env = dict(MODEL="tiny", TRAIN_ITERS="3", MICRO_BATCH="2", GLOBAL_BATCH="2",
                            CPU="1")
    else:
        speed = ["--preset", "gpu-paper17", "--repeats", "5", "--warmup", "2",
                 "--model-flags", f"--transformer-impl {impl}"]
        videos, per_shard = "procedural:64:0", "32"
        pretrain_env = dict(MODEL="110m", TRAIN_ITERS="20", MICRO_BATCH="4", GLOBAL_BATCH="8",
                            TRANSFORMER_IMPL=impl)
    layout = ("from localopt_plugin.data.wds import VideoWdsConfig, video_wds; "
              f"print('SEQ_LENGTH=%d' % video_wds(VideoWdsConfig(data_path=({pattern!r},), "
              "num_workers=0)).layout.input_length)")
    return {
        "env": Stage("env", env_commands, timeouts["env"], os.path.join(work, "env.log")),
        "gpu-tests": Stage("gpu-tests", [[python, "-m", "pytest", "-q", "-m", "gpu", "-p",
                                          "no:cacheprovider", "tests/unit/test_attention.py"]],
                           timeouts["gpu-tests"], os.path.join(out, "gpu-tests.log")),
        "speed": Stage("speed", [[python, "-m", "localopt_plugin.commands.bench", "speed",
                                  *speed, "--json", os.path.join(out, "speed.json")]],
                       timeouts["speed"], os.path.join(out, "speed.log")),
        "shards": Stage("shards", [[python, "-m", "localopt_plugin.commands.preprocess", videos,
                                    "--output", shards, "--videos-per-shard", per_shard,
                                    "--no-progress"], [python, "-c", layout]],
                        timeouts["shards"], os.path.join(work, "shards.log")),
        "pretrain": Stage("pretrain", [["bash", "megatron_configs/pretrain_video_gpt.sh",
                                        "--lr-warmup-iters", "1", "--save-interval", "100000",
                                        "--eval-interval", "100000", "--eval-iters", "1",
                                        "--log-interval", "1", "--data-num-workers", "1"]],
                          timeouts["pretrain"], os.path.join(out, "pretrain.log"),
                          env=dict(GPUS="1", PYTHON=python, DATA_PATH=pattern,
                                   SEQ_LENGTH=seq_length,
                                   CHECKPOINTS=os.path.join(work, "checkpoints"),
                                   **pretrain_env)),
    }


def judge(result: Result, stage: Stage, rehearse: bool) -> None:
    """Checks beyond the exit status, and the stage's figures, into ``result.note``: on the
    GPU, GPU tests that all skipped checked nothing; a pretrain() that stopped before its last
    iteration, or shards without an input length, failed."""
    text = "\n".join(tail(stage.log, 400))
    if stage.name == "env":
        found = re.findall(r"^ENV (\{.*\})$", text, flags=re.M)
        result.note = found[-1] if found else ""
    elif stage.name == "gpu-tests":
        counts = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?) in [\d.]+s", text,
                            flags=re.M)
        result.note = counts[-1] if counts else ""
        if result.status == "passed" and not rehearse and " passed" not in result.note:
            result.status, result.returncode = "failed", 1
    elif stage.name == "speed" and result.status == "passed":
        with open(os.path.join(os.path.dirname(stage.log), "speed.json")) as f:
            local = json.load(f)["local-opt"]
        result.note = json.dumps({k: v for k, v in local.items() if "ratio" in k})
    elif stage.name == "shards":
        seq = re.findall(r"^SEQ_LENGTH=(\d+)$", text, flags=re.M)
        result.note = f"SEQ_LENGTH={seq[-1]}" if seq else ""
        if result.status == "passed" and not seq:
            result.status, result.returncode = "failed", 1
    elif stage.name == "pretrain":
        iterations = re.findall(r" iteration +(\d+)/ *(\d+)", text)
        result.note = f"last iteration {iterations[-1][0]}/{iterations[-1][1]}" if iterations \
            else "no iteration line"
        done = iterations and iterations[-1][0] == iterations[-1][1]
        if result.status == "passed" and not done:
            result.status, result.returncode = "failed", 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_results",
                        help="folder for summary.json and the stages' logs (default $OUT, "
                        "else gpu_results)")
    parser.add_argument("--max-files", type=int, default=MAX_OUT_FILES,
                        help="most files the check may leave in --out (more: the check fails)")
    parser.add_argument("--wheels", default=None,
                        help="a folder of wheels (tools/gpu_wheels.sh) to install first, for "
                        "a machine without network")
    parser.add_argument("--rehearse", action="store_true",
                        help="on CPU at tiny sizes: the same stages, summary and file rules")
    parser.add_argument("--only", default=",".join(STAGES),
                        help=f"comma-separated stages to run (env always runs): {STAGES}")
    parser.add_argument("--timeout", action="append", default=[], metavar="STAGE=SECONDS",
                        help="override one stage's timeout")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole check, a stage getting at most what is "
                        "left (default: the stages' timeouts added up)")
    args = parser.parse_args(argv)
    wanted = {"env", *args.only.split(",")}
    if unknown := wanted - set(STAGES):
        parser.error(f"unknown stage(s) {sorted(unknown)}; stages: {STAGES}")
    wanted |= {NEEDS[s] for s in wanted if s in NEEDS}
    if args.wheels and not (os.path.isdir(args.wheels) and any(
            w.endswith(".whl") for w in os.listdir(args.wheels))):
        parser.error(f"--wheels {args.wheels}: no wheels there: make them with "
                     "tools/gpu_wheels.sh and copy the folder (git-ignored) with the repository")
    timeouts = dict(REHEARSAL_TIMEOUTS if args.rehearse else GPU_TIMEOUTS)
    for item in args.timeout:
        name, _, seconds = item.partition("=")
        if name not in timeouts or not seconds:
            parser.error(f"--timeout {item}: expected STAGE=SECONDS with STAGE in {STAGES}")
        timeouts[name] = float(seconds)
    if args.budget is None:
        args.budget = float(sum(timeouts.values()))
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)
    python = sys.executable
    work = tempfile.mkdtemp(prefix="gpu-check-")
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               DS_ACCELERATOR="cpu" if args.rehearse else "cuda")
    paths = [os.path.join(work, "site")] if args.wheels else []
    if args.rehearse:
        shadow = os.path.join(work, "not-on-the-machine")
        for name in NOT_ON_THE_MACHINE:
            os.makedirs(os.path.join(shadow, name))
            with open(os.path.join(shadow, name, "__init__.py"), "w") as f:
                f.write(f"raise ImportError('{name} is not on the GPU machine')\n")
        paths.append(shadow)
    env["PYTHONPATH"] = os.pathsep.join([*paths, REPO, env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)

    started, results, te, seq_length = time.monotonic(), [], False, ""
    print(f"gpu_check: {'rehearsal on CPU' if args.rehearse else 'GPU'}; stages "
          f"{[s for s in STAGES if s in wanted]}; out {args.out}", flush=True)
    for name in STAGES:
        stages = build_stages(args, work, python, timeouts, te, seq_length)
        stage = stages[name]
        failed_need = NEEDS.get(name) in {r.name for r in results if r.status != "passed"}
        left = args.budget - (time.monotonic() - started)
        if name not in wanted or failed_need or left < 5:
            why = ("not asked for" if name not in wanted else f"{NEEDS.get(name)} failed"
                   if failed_need else "the budget is spent")
            results.append(Result(name, "not run", None, 0.0, stage.timeout_s, "", [],
                                  [" ".join(c) for c in stage.commands], why))
            print(f"gpu_check: {name}: not run ({why})", flush=True)
            continue
        stage.timeout_s = min(stage.timeout_s, left)
        print(f"gpu_check: {name} (timeout {stage.timeout_s:.0f} s) ...", flush=True)
        result = run_stage(stage, env)
        judge(result, stage, args.rehearse)
        results.append(result)
        print(f"gpu_check: {name}: {result.status} in {result.seconds} s "
              f"(exit {result.returncode}) {result.note}", flush=True)
        if result.status != "passed":
            print("\n".join("    " + line for line in result.tail[-10:]), flush=True)
        if name == "env":
            if result.status != "passed":
                print("gpu_check: stopping: the environment is not usable (see the lines "
                      "above); are the packages installed (or --wheels given)?", flush=True)
                break
            te = '"transformer_engine": true' in result.note
        if name == "shards":
            seq_length = result.note.partition("=")[2]
    shutil.rmtree(work, ignore_errors=True)
    for name in STAGES[len(results):]:  # after a failed env stage
        results.append(Result(name, "not run", None, 0.0, timeouts[name], "", [], [],
                              "env failed"))
    summary = {
        "mode": "rehearsal" if args.rehearse else "gpu",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "ok": all(r.status == "passed" for r in results if r.name in wanted),
        "seconds": round(time.monotonic() - started, 1),
        "budget_s": args.budget,
        "transformer_impl": "transformer_engine" if te else "local",
        "stages": [asdict(r) for r in results],
    }
    files = sorted({*os.listdir(args.out), "summary.json"})
    if len(files) > args.max_files:
        print(f"gpu_check: error: {len(files)} files in {args.out}, more than --max-files "
              f"{args.max_files}: {files}", flush=True)
        summary["ok"] = False
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"gpu_check: {'all stages passed' if summary['ok'] else 'FAILED'} in "
          f"{summary['seconds']} s; {args.out}/summary.json; files: {files}", flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
