"""``localopt-bench recall-tokens``: recall against training FLOPs on the token-level task.

The fast companion of ``localopt-bench recall`` (where results are confirmed): the
``recall-tokens`` dataset (a cue in the first frames, hidden, then back; see
:mod:`localopt_plugin.data.recall_tokens`) trains in seconds to minutes per run on a CPU, so
remedies can be compared over seeds and settings (``--gap``, ``--cue-frames`` ...).

Every variant trains with the real trainer (``localopt-train``, a subprocess) at a constant LR
after warm-up, saving checkpoints along the way, until it has spent ``--budget`` x
full-sequence's training FLOPs (counted from the windows the trainer logged, replayed through
the same objective, an adaptive sampler's losses included). Each checkpoint is scored on the
held-out test cues (:mod:`localopt_plugin.evaluation.recall_tokens`): recall accuracy, copy
accuracy, cue worth, attention to the cue; so every run gives a curve of recall against FLOPs.
Figures "at 0.5x" are read on that curve (linear between the two checkpoints around it).
Diagnostics: how often each window start was drawn and its LM loss over training. Writes
``results.json``, ``results.md`` and ``recall_tokens.png``; each finished run leaves
``row.json`` (a rerun reuses it: seeds can be run one by one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import torch

from localopt_plugin.bench.flops import plan_flops, replayed_plans
from localopt_plugin.bench.quality import (
    run_logged,
    select_variants,
    table_cell,
    write_outputs,
)
from localopt_plugin.data.recall_tokens import RecallTokensConfig
from localopt_plugin.errors import UserError
from localopt_plugin.metric_names import (
    CLIP_START,
    FULL_SEQUENCE_STEP,
    ITERATION,
    LM_LOSS,
    STEP_TIME,
    WINDOW_START,
)
from localopt_plugin.objectives import WindowConfig
from localopt_plugin.training.parser import build_parser

READ_AT = (0.25, 0.5, 1.0)  # shares of full-sequence's FLOPs where figures are read
SCORES = ("recall accuracy", "copy accuracy", "cue worth (nats per clip)",
          "attention to the cue", "reappearance NLL (nats per token)")


@dataclass(frozen=True)
class TaskVariant:
    """A localopt-train configuration of the bench (``flags`` after the bench's own)."""

    name: str
    flags: tuple[str, ...]

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name).strip("-")

    @property
    def adaptive(self) -> bool:
        return "adaptive" in self.flags


_LOCAL = ("--objective", "local-opt", "--window-sampler")
VARIANTS = (
    TaskVariant("full-sequence", ("--objective", "full-sequence")),
    TaskVariant("fewer-frames", ("--objective", "fewer-frames")),
    TaskVariant("local-opt + balanced", (*_LOCAL, "first-frame-balanced")),
    TaskVariant("local-opt + adaptive", (*_LOCAL, "adaptive")),
    TaskVariant("local-opt + balanced + 25% full-sequence steps",
                (*_LOCAL, "first-frame-balanced", "--local-opt-full-sequence-share", "0.25")),
    TaskVariant("local-opt + adaptive + 25% full-sequence steps",
                (*_LOCAL, "adaptive", "--local-opt-full-sequence-share", "0.25")),
)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="run seeds (initialisation, data order, window draws)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="run only these (full-sequence always runs: it sets the budget)")
    parser.add_argument("--add-variant", nargs=2, action="append", default=[],
                        metavar=("NAME", "FLAGS"),
                        help="another variant: localopt-train FLAGS as one string; repeatable")
    parser.add_argument("--full-steps", type=int, default=600,
                        help="full-sequence's steps: its FLOPs are the unit of the budget")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="every other variant trains to this many times full-sequence's "
                        "FLOPs")
    parser.add_argument("--checkpoints", type=int, default=8,
                        help="checkpoints scored per run (the points of its curve)")
    parser.add_argument("--model", default="tiny", help="a model preset (localopt-train --preset)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="constant after warm-up")
    WindowConfig.add_args(parser, only=("window_frames",))  # W of the windowed variants
    # the task: localopt-train's own --recall-tokens-* flags (training samples: its default)
    RecallTokensConfig.add_args(parser, only=("frames", "grid", "colours", "parts",
                                              "cue_frames", "gap"))


def task_flags(task: RecallTokensConfig) -> list[str]:
    """The dataset flags of ``task`` (localopt-train's)."""
    return ["--dataset", "recall-tokens", *task.flags()]


class FlopReplay:
    """Training FLOPs of each step of a run, from the draws its trainer logged, replayed through
    the objective the trainer built from the same flags (losses fed back as the trainer did)."""

    def __init__(self, args: argparse.Namespace, task: RecallTokensConfig) -> None:
        from localopt_plugin.model import padded_vocab_size
        from localopt_plugin.model.presets import config_with_flags

        self.args, self.task, self.layout = args, task, task.layout()
        self.model = config_with_flags(args.model, "")
        self.vocab = padded_vocab_size(task.vocabulary().size,
                                       self.model.make_vocab_size_divisible_by, 1)
        self.tokens = torch.zeros(args.micro_batch_size, self.layout.seq_length, dtype=torch.long)

    def objective(self, variant: TaskVariant, seed: int):
        from localopt_plugin.plugin import PluginConfig

        parsed = build_parser().parse_args([
            *task_flags(self.task), "--local-opt-window-frames",
            str(self.args.local_opt_window_frames),
            "--seed", str(seed), *variant.flags])
        return PluginConfig.from_args(parsed).build_objective(self.layout)

    def flops(self, plan) -> float:
        return plan_flops(plan, self.model, self.vocab)

    def full_step(self) -> float:
        return self.flops(self.objective(VARIANTS[0], 0).plan(self.tokens))

    def expected_step(self, variant: TaskVariant, seed: int, draws: int = 512) -> float:
        """Mean FLOPs of a step over the first ``draws`` draws (no losses fed back)."""
        objective = self.objective(variant, seed)
        return float(np.mean([self.flops(objective.plan(self.tokens, i, 0))
                              for i in range(draws)]))

    def steps(self, variant: TaskVariant, seed: int, records: list[dict]) -> list[float]:
        """FLOPs of each logged step; refuses a run whose logged windows differ from the
        replay's (the count would not be the run's)."""
        flops = []
        plans = replayed_plans(self.objective(variant, seed), self.tokens, records)
        for i, (plan, record) in enumerate(zip(plans, records, strict=True)):
            logged = record.get(WINDOW_START, record.get(CLIP_START))
            if logged is not None and logged != plan.first_frame:
                raise RuntimeError(f"{variant.name}: step {i + 1} trained window {logged}, the "
                                   f"replay drew {plan.first_frame}")
            flops.append(self.flops(plan))
        return flops


def train(args: argparse.Namespace, task: RecallTokensConfig, variant: TaskVariant, seed: int,
          steps: int, run_dir: str) -> list[dict]:
    """One localopt-train run saving ``--checkpoints`` checkpoints; its per-step records."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    cmd = [sys.executable, "-m", "localopt_plugin.commands.train", "--preset", args.model,
           *task_flags(task), "--micro-batch-size", str(args.micro_batch_size),
           "--train-iters", str(steps), "--lr", str(args.lr), "--lr-decay-style", "constant",
           "--lr-warmup-iters", str(max(1, args.full_steps // 20)), "--weight-decay", "0.0",
           "--seed", str(seed), "--local-opt-window-frames", str(args.local_opt_window_frames),
           "--log-interval", str(max(1, steps // 4)),
           "--save", os.path.join(run_dir, "checkpoint"),
           "--save-interval", str(max(1, math.ceil(steps / args.checkpoints))),
           "--metrics-file", metrics, "--progress", "off", *variant.flags]
    run_logged(cmd, os.path.join(run_dir, "train.log"))
    with open(metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if ITERATION in r and STEP_TIME in r]


def score_checkpoints(run_dir: str) -> list[dict]:
    """Every checkpoint of a run scored on the held-out test cues (``localopt-eval
    recall-tokens``, one process)."""
    out = os.path.join(run_dir, "scores.json")
    run_logged([sys.executable, "-m", "localopt_plugin.commands.evaluate", "recall-tokens",
                "--checkpoint", os.path.join(run_dir, "checkpoint"), "--every-checkpoint",
                "--out", out], os.path.join(run_dir, "scores.log"))
    with open(out) as f:
        return json.load(f)["checkpoints"]


def window_diagnostics(records: list[dict], quarters: int = 4) -> dict:
    """Per window start: how often it was drawn, and its mean LM loss per part of training."""
    starts = sorted({int(r[WINDOW_START]) for r in records if WINDOW_START in r
                     and not r.get(FULL_SEQUENCE_STEP)})
    if not starts:
        return {}
    bounds = np.linspace(0, len(records), quarters + 1).astype(int)
    out = {"draws per start": {}, "lm loss per start and quarter": {}}
    for start in starts:
        mine = [(i, r[LM_LOSS]) for i, r in enumerate(records)
                if r.get(WINDOW_START) == start and not r.get(FULL_SEQUENCE_STEP)]
        out["draws per start"][str(start)] = len(mine)
        out["lm loss per start and quarter"][str(start)] = [
            float(np.mean([v for i, v in mine if lo <= i < hi])) if any(
                lo <= i < hi for i, _ in mine) else None
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    full = [r for r in records if r.get(FULL_SEQUENCE_STEP)]
    if full:
        out["full-sequence steps"] = len(full)
    return out


def read_at(curve: list[tuple[float, dict]], share: float, key: str) -> float | None:
    """``key`` at ``share`` of the budget unit on a run's curve (linear between checkpoints);
    None where the run did not reach it or starts after it."""
    points = [(x, s[key]) for x, s in curve if s.get(key) is not None]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= share <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (share - x0) / (x1 - x0)
    if points and abs(points[-1][0] - share) < 1e-9:
        return points[-1][1]
    return None


def run_variant(args, task, replay: FlopReplay, variant: TaskVariant, seed: int,
                unit: float) -> dict:
    run_dir = os.path.join(args.out, f"seed{seed}", variant.slug)
    row_file = os.path.join(run_dir, "row.json")
    if variant is VARIANTS[0]:
        steps = args.full_steps
    else:  # enough steps to spend the budget; adaptive draws cost more as they learn
        margin = 1.6 if variant.adaptive else 1.05
        steps = math.ceil(margin * args.budget * unit / replay.expected_step(variant, seed))
    setting = {"steps": steps, "task": dataclasses.asdict(task), "flags": list(variant.flags),
               "lr": args.lr, "model": args.model, "window": args.local_opt_window_frames}
    if os.path.exists(row_file):
        with open(row_file) as f:
            row = json.load(f)
        if row["setting"] == setting:
            print(f"[recall-tokens] seed {seed}: {variant.name}: reusing {row_file}", flush=True)
            return row
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier setting's checkpoints
    os.makedirs(run_dir)
    print(f"[recall-tokens] seed {seed}: {variant.name}: {steps} steps", flush=True)
    records = train(args, task, variant, seed, steps, run_dir)
    spent = np.cumsum(replay.steps(variant, seed, records)) / unit
    scores = score_checkpoints(run_dir)
    curve = [(float(spent[s["iteration"] - 1]), s) for s in scores]
    row = {"variant": variant.name, "seed": seed, "setting": setting,
           "steps": len(records), "compute / full-sequence": float(spent[-1]),
           "train time (s)": sum(r[STEP_TIME] for r in records),
           "curve": curve, "windows": window_diagnostics(records)}
    for share in READ_AT:
        for key in SCORES:
            row[f"{key} at {share:g}x"] = read_at(curve, share, key)
    with open(row_file, "w") as f:
        json.dump(row, f, indent=2)
    return row


def _spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "min": float(np.min(values)),
            "max": float(np.max(values)), "n": len(values)}


def summarize(rows: list[dict], variants: list[TaskVariant]) -> list[dict]:
    summary = []
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant.name]
        entry = {"variant": variant.name, "runs": len(mine)}
        for key in ("compute / full-sequence", "train time (s)", *(
                f"{k} at {s:g}x" for s in READ_AT for k in SCORES)):
            spread = _spread([r.get(key) for r in mine])
            if spread is not None:
                entry[key] = spread
        summary.append(entry)
    return summary


def goal(summary: list[dict]) -> dict:
    """Which variants recall within full-sequence's seed spread at <= 0.5x its FLOPs."""
    full = summary[0].get("recall accuracy at 1x")
    if full is None:
        return {"rule": "no full-sequence figure"}
    reached = [e["variant"] for e in summary[1:] if any(
        e.get(f"recall accuracy at {s:g}x", {}).get("mean", -1) >= full["min"]
        for s in READ_AT if s <= 0.5)]
    return {"rule": "mean recall at 0.25x or 0.5x >= the lowest full-sequence seed at 1x "
                    f"({full['min']:.3g})", "reached": reached}


def _added(spec: list[str]) -> TaskVariant:
    name, flags = spec
    extra = tuple(shlex.split(flags))
    _, unknown = build_parser().parse_known_args(extra)
    if unknown:
        raise UserError(f"--add-variant {name}: not localopt-train flags: {' '.join(unknown)}")
    if name in {v.name for v in VARIANTS}:
        raise UserError(f"--add-variant {name}: a built-in variant has this name")
    return TaskVariant(name, extra)


def run(args: argparse.Namespace) -> dict:
    task = RecallTokensConfig.from_args(args)
    window = args.local_opt_window_frames
    if window >= task.frames:
        raise UserError(f"--local-opt-window-frames {window} must be below "
                        f"--recall-tokens-frames {task.frames}")
    variants = select_variants([*VARIANTS, *map(_added, args.add_variant)], args.variants,
                               "this bench")
    replay = FlopReplay(args, task)
    unit = replay.full_step() * args.full_steps
    os.makedirs(args.out, exist_ok=True)
    rows = [run_variant(args, task, replay, variant, seed, unit)
            for seed in args.seeds for variant in variants]
    summary = summarize(rows, variants)
    return {"bench": "recall-tokens", "task": dataclasses.asdict(task), "seeds": args.seeds,
            "settings": {**{k: getattr(args, k) for k in ("full_steps", "budget", "model",
                                                           "micro_batch_size", "lr")},
                         "window_frames": window},
            "full-sequence PFLOP": unit / 1e15, "machine": {"cpus": os.cpu_count()},
            "runs": rows, "summary": summary, "goal": goal(summary)}


def format_table(result: dict) -> str:
    task = result["task"]
    out = [f"recall-tokens: {task['frames']} frames of {task['grid']}x{task['grid']} tokens, "
           f"{task['colours']} colours x {task['parts']} parts, cue frames "
           f"{task['cue_frames']}, hidden {task['gap']}; seeds {result['seeds']}; mean "
           f"(min-max over seeds); chance recall {1 / task['colours']:.3g}", ""]
    columns = ["variant", "compute / full-sequence",
               *(f"recall accuracy at {s:g}x" for s in READ_AT),
               "cue worth (nats per clip) at 0.5x", "copy accuracy at 0.5x",
               "attention to the cue at 0.5x", "cue worth (nats per clip) at 1x"]
    out += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(table_cell(e.get(c, "n/a")) for c in columns) + " |"
            for e in result["summary"]]
    g = result["goal"]
    out += ["", f"goal ({g['rule']}): reached by {', '.join(g.get('reached', [])) or 'none'}"]
    return "\n".join(out) + "\n"


def plot(result: dict, path: str) -> str:
    """Recall accuracy and cue worth against FLOPs, every run (one colour per variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["variant"] for e in result["summary"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    for ax, key in zip(axes, ("recall accuracy", "cue worth (nats per clip)"), strict=True):
        for run in result["runs"]:
            i = names.index(run["variant"])
            xs = [x for x, _ in run["curve"]]
            ax.plot(xs, [s[key] for _, s in run["curve"]], color=f"C{i}", alpha=0.8,
                    marker=".", label=run["variant"] if run["seed"] == result["seeds"][0]
                    else None)
        ax.set_xlabel("training FLOPs / full-sequence's")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].axhline(1 / result["task"]["colours"], color="k", ls="--", lw=0.8, label="chance")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    result = run(args)
    write_outputs(args.out, result, format_table(result), plot, "recall_tokens.png")
    return 0
