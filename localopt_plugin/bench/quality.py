"""``localopt-bench quality``: the paper's ablation at equal compute, on one dataset and one model.

Every variant trains with the real trainer (``localopt-train``, DeepSpeed, a subprocess as a
user launches it) on the same data and model until the same compute budget is spent: the
analytic training FLOPs (``localopt_plugin.bench.flops``) of full-sequence training for the
preset's steps. Window draws are a pure function of the seed, so the steps that fit the budget
are known before a run starts (its LR schedule then completes); after the run the draws the
trainer logged are checked against the ones counted. Measured train time stands beside the FLOPs
to validate the FLOP model. Variants (the paper's ablation):

* full-sequence; fewer-frames (W-frame clips without context, generated chunk by chunk);
* local-opt without the first-frame window (``--local-opt-first-window-prob 0``);
* + first-frame window (uniform over all windows); + balanced (p = 0.5); + ReCo.

``--preset cpu-long`` (``--sweep long``) trains on 65-frame clips (17 latent frames): full-sequence
for its budget; fewer-frames and Local Opt. + balanced, with and without ReCo in its best form,
at a quarter of that budget; Local Opt. + ReCo also at full-sequence's steps. Long videos are
judged per 17-frame segment too (NLL, class accuracy, Frechet distance): error accumulation.

``--sweep remedies`` runs full-sequence, Local Opt. + balanced, and Local Opt. + balanced with a
quarter of its steps on the whole sequence (``--local-opt-full-sequence-share 0.25``, the remedy
that keeps long-range recall best on the recall benchmarks) at the ablation's budget: does the
remedy keep what Local Opt. had on 17-frame clips?

``--sweep reco`` runs ReCo's forms instead (which states, reduction, weight, pairs) on
local-opt + balanced (writing ``reco-results.*``; in the ablation's ``--out`` the runs both
share are reused). Every run is evaluated the same way: validation NLL per latent frame
(full-sequence, teacher-forced), then videos generated for every class (two per
class by default), scored by the shipped classifier of the embedded data (class accuracy on the
whole video and on its first and last frames, Frechet distance to held-out real clips) and by
optical-flow warping error. Several seeds give mean and spread. Writes ``results.json``,
``results.md`` and ``nll_vs_compute.png`` (validation NLL against FLOPs spent, every variant).
Each finished run leaves ``row.json``: a rerun of an interrupted bench reuses those.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from localopt_plugin.bench.flops import plan_flops, replayed_plans
from localopt_plugin.data.procedural import BACKGROUNDS, NUM_CLASSES
from localopt_plugin.errors import UserError
from localopt_plugin.metric_names import (
    CLIP_START,
    ITERATION,
    LM_LOSS,
    STEP_TIME,
    VALID_LOSS,
    WINDOW_START,
)
from localopt_plugin.preprocess.inputs import procedural_kind


@dataclass(frozen=True)
class QualityPreset:
    """One size of the quality bench: the model, its data and its evaluation."""

    model: str  # a model preset (localopt_plugin.model.presets)
    model_flags: str  # extra localopt-train flags
    micro_batch: int
    full_steps: int  # full-sequence's steps: they set the FLOP budget
    window: int  # Local Opt.'s window, in latent frames
    videos: int
    valid_videos: int
    background: str
    eval_samples: int
    eval_points: int
    generate_per_class: int
    lr: float
    frames: int = 17  # frames per clip (65: 17 latent frames)
    budget_fraction: float = 1.0  # the other variants' FLOPs, as a fraction of full-sequence's
    sweep: str = "ablation"  # what --sweep runs by default


PRESETS = {
    # 27 minutes per seed for the 6 variants on a 2-core CPU (measured, with evaluation)
    "cpu": QualityPreset(model="tiny", model_flags="", micro_batch=4, full_steps=200, window=2,
                         videos=600, valid_videos=48, background="calm", eval_samples=48,
                         eval_points=4, generate_per_class=2, lr=2e-3),
    # one GPU (an H100), under 8 minutes for one seed of the ablation
    "gpu": QualityPreset(model="110m", model_flags="--bf16", micro_batch=16, full_steps=300,
                         window=2, videos=2400, valid_videos=96, background="calm",
                         eval_samples=96, eval_points=4, generate_per_class=2, lr=6e-4),
    # 65-frame clips (17 latent frames), every other variant at a quarter of full-sequence's
    # FLOPs; about 30 minutes per seed on a 2-core CPU (docs/RESULTS.md)
    "cpu-long": QualityPreset(model="tiny", model_flags="", micro_batch=4, full_steps=100,
                              window=4, videos=400, valid_videos=24, background="calm",
                              eval_samples=24, eval_points=4, generate_per_class=2, lr=2e-3,
                              frames=65, budget_fraction=0.25, sweep="long"),
}


@dataclass(frozen=True)
class Variant:
    name: str
    objective: str
    first_window_prob: float | None = None  # None: uniform over all candidate windows
    reco: tuple[str, ...] = field(default_factory=tuple)  # --reco-* flags; set: ReCo on
    same_steps: bool = False  # full-sequence's steps instead of a share of its FLOPs
    extra: tuple[str, ...] = field(default_factory=tuple)  # any other localopt-train flags

    def flags(self) -> list[str]:
        flags = ["--objective", self.objective]
        if self.objective != "full-sequence":
            if self.first_window_prob is None:
                flags += ["--window-sampler", "uniform"]
            else:
                flags += ["--window-sampler", "first-frame-balanced",
                          "--local-opt-first-window-prob", str(self.first_window_prob)]
        if self.reco:
            flags += ["--regularizer", "reco", *self.reco]
        return [*flags, *self.extra]

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name).strip("-")


# the ablation's "+ ReCo", as it was run: the mean over the hidden size on the final states
RECO = ("--reco-weight", "0.1", "--reco-reduction", "mean", "--reco-states", "final")
ABLATION = (
    Variant("full-sequence", "full-sequence"),
    Variant("fewer-frames", "fewer-frames"),
    Variant("local-opt, no first-frame window", "local-opt", first_window_prob=0.0),
    Variant("+ first-frame window (uniform)", "local-opt"),
    Variant("+ balanced (p=0.5)", "local-opt", first_window_prob=0.5),
    Variant("+ balanced + ReCo", "local-opt", first_window_prob=0.5, reco=RECO),
)
RECO_SWEEP = (  # the first three are the ablation's runs (reused in the same --out)
    ABLATION[0],
    ABLATION[4],
    ABLATION[5],
    Variant("ReCo final, sum, 0.1 (paper)", "local-opt", first_window_prob=0.5,
            reco=("--reco-weight", "0.1", "--reco-reduction", "sum", "--reco-states", "final")),
    Variant("ReCo final, mean, 1.0", "local-opt", first_window_prob=0.5,
            reco=("--reco-weight", "1.0", "--reco-reduction", "mean", "--reco-states", "final")),
    Variant("ReCo pre-norm, sum, 0.1", "local-opt", first_window_prob=0.5,
            reco=("--reco-weight", "0.1", "--reco-reduction", "sum", "--reco-states",
                  "pre-norm")),
    Variant("ReCo final, mean, 0.1, frame pairs", "local-opt", first_window_prob=0.5,
            reco=(*RECO, "--reco-pairs", "adjacent-frame")),
)
# the form the ReCo sweep found best: the paper's sum (lambda 0.1) before the final norm
RECO_BEST = ("--reco-weight", "0.1", "--reco-reduction", "sum", "--reco-states", "pre-norm")
LONG = (  # long clips: the rest at the preset's share of full-sequence's FLOPs
    Variant("full-sequence", "full-sequence"),
    Variant("fewer-frames", "fewer-frames"),
    Variant("local-opt + balanced", "local-opt", first_window_prob=0.5),
    Variant("local-opt + balanced + ReCo", "local-opt", first_window_prob=0.5, reco=RECO_BEST),
    Variant("local-opt + balanced + ReCo, full-sequence's steps", "local-opt",
            first_window_prob=0.5, reco=RECO_BEST, same_steps=True),
)
REMEDIES = (  # issue 43's remedy for long-range recall, on the ablation's clips and budget
    ABLATION[0],
    ABLATION[4],
    Variant("+ balanced + 25% full-sequence steps", "local-opt", first_window_prob=0.5,
            extra=("--local-opt-full-sequence-share", "0.25")),
)
SWEEPS = {"ablation": ABLATION, "reco": RECO_SWEEP, "long": LONG, "remedies": REMEDIES}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="a size of this bench (data, model, steps: "
                        "localopt_plugin/bench/quality.py PRESETS), not a model preset")
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default=None,
                        help="ablation: the paper's variants; reco: ReCo's forms; long: "
                        "long clips at a share of full-sequence's compute; remedies: Local "
                        "Opt. with the recall remedy (a share of full-sequence steps) beside "
                        "full-sequence and Local Opt. (default: the preset's: long for "
                        "cpu-long, else ablation)")
    parser.add_argument("--data-path", nargs="+", default=None,
                        help="training shards (default: made by localopt-preprocess from the "
                        "preset's procedural videos into OUT/data)")
    parser.add_argument("--valid-data-path", nargs="+", default=None,
                        help="validation shards (with --data-path)")
    parser.add_argument("--background", choices=(*BACKGROUNDS, "none"), default=None,
                        help="the procedural variant of the data, for class accuracy and "
                        "Frechet distance (default: the preset's with its own data, none "
                        "with --data-path)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--full-steps", type=int, default=None,
                        help="full-sequence steps that set the FLOP budget (default: preset's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235])
    parser.add_argument("--variants", nargs="+", default=None,
                        help="run only these (full-sequence always runs: it sets the budget)")
    parser.add_argument("--generate-per-class", type=int, default=None)
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="validation samples of the loss curve and of the NLL per frame "
                        "(default: the preset's; fewer for a quick run)")
    parser.add_argument("--i3d", default=None, help="TorchScript I3D file: adds FVD")
    parser.add_argument("--real-videos", default=None,
                        help="directory of real videos for FVD (with --i3d)")


def run_logged(cmd: list[str], log: str | None = None) -> None:
    """A subprocess as a user runs it (``OMP_NUM_THREADS`` as set, else every core); its
    output goes to ``log`` (shown on failure)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                           str(os.cpu_count()))}
    if log is None:
        subprocess.run(cmd, check=True, env=env)
        return
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        with open(log) as f:
            tail = f.read()[-4000:]
        raise UserError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); "
                        f"the end of {log}:\n{tail}")


def make_data(out: str, preset: QualityPreset) -> tuple[list[str], list[str]]:
    """The preset's procedural shards (train seeds from 0, validation from 500000)."""
    kind = procedural_kind(preset.background)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    paths = []
    for split, count, seed in (("train", preset.videos, 0),
                               ("valid", preset.valid_videos, 500000)):
        directory = os.path.join(out, "data", split)
        if not os.path.exists(os.path.join(directory, "manifest.json")):
            run_logged([sys.executable, "-m", "localopt_plugin.commands.preprocess",
                        f"{kind}:{count}:{seed}", "--output", directory, "--videos-per-shard", "64",
                        "--frames", str(preset.frames), "--no-progress"],
                       os.path.join(out, "data", f"{split}.log"))
        paths.append(sorted(os.path.join(directory, f) for f in os.listdir(directory)
                            if f.endswith(".tar")))
    return paths[0], paths[1]


def select_variants(variants: list[Variant], names: list[str] | None,
                    where: str) -> list[Variant]:
    """``--variants``: the named ones and the first (full-sequence sets the budget); unknown
    names refused, listing ``where``'s."""
    if not names:
        return variants
    unknown = set(names) - {v.name for v in variants}
    if unknown:
        raise UserError(f"unknown --variants {sorted(unknown)}; {where} has: "
                        f"{[v.name for v in variants]}")
    return [v for v in variants if v is variants[0] or v.name in names]


class FlopCounter:
    """Training FLOPs of every step of a variant, from the window draws of its seed."""

    def __init__(self, data_path: list[str], preset: QualityPreset) -> None:
        from localopt_plugin.data.wds import VideoWdsConfig
        from localopt_plugin.model import padded_vocab_size
        from localopt_plugin.model.presets import config_with_flags
        from localopt_plugin.plugin import PluginConfig

        source = PluginConfig(dataset="video-wds", dataset_config=VideoWdsConfig(
            data_path=tuple(data_path), num_workers=0), seed=0).build_dataset()
        self.layout = source.layout
        self.model = config_with_flags(preset.model, preset.model_flags)
        self.vocab = padded_vocab_size(source.vocab.size, self.model.make_vocab_size_divisible_by,
                                       1)
        self.tokens = torch.zeros(preset.micro_batch, self.layout.seq_length,
                                  dtype=torch.long)
        self.window = preset.window

    def plugin(self, variant: Variant, seed: int):
        """The variant's plugin configuration as the trainer resolves it from the same flags."""
        from localopt_plugin.plugin import PluginConfig
        from localopt_plugin.training.parser import build_parser

        args = build_parser().parse_args([  # in the trainer's order: the variant's flags win
            "--local-opt-window-frames", str(self.window), "--seed", str(seed),
            *variant.flags(), "--dataset", "synthetic-video-tokens"])  # it reads no data
        return PluginConfig.from_args(args)

    def objective(self, variant: Variant, seed: int):
        """The variant's objective as the trainer builds it from the same flags."""
        return self.plugin(variant, seed).build_objective(self.layout)

    def steps(self, variant: Variant, seed: int, count: int,
              records: list[dict] | None = None) -> tuple[list[float], list[float]]:
        """FLOPs and window starts of the first ``count`` steps (one micro-batch each); with
        the trainer's logged ``records``, each step's metrics are fed back as the trainer did
        (an adaptive sampler's draws follow them)."""
        objective = self.objective(variant, seed)
        plans = (replayed_plans(objective, self.tokens, records[:count]) if records is not None
                 else (objective.plan(self.tokens, iteration, 0) for iteration in range(count)))
        flops, starts = [], []
        for plan in plans:
            flops.append(plan_flops(plan, self.model, self.vocab))
            starts.append(float(plan.first_frame))
        return flops, starts

    def learns_from_losses(self, variant: Variant) -> bool:
        """Whether the variant's draws follow its losses: its steps within a budget are then
        known only after a run (see ``localopt_plugin.bench.recall``)."""
        return getattr(self.plugin(variant, 0).window, "learns_from_losses", False)

    def steps_within(self, variant: Variant, seed: int, budget: float) -> int:
        """The most steps whose FLOPs sum to at most ``budget``."""
        objective, spent, steps = self.objective(variant, seed), 0.0, 0
        while True:
            spent += plan_flops(objective.plan(self.tokens, steps, 0), self.model, self.vocab)
            if spent > budget * (1 + 1e-9):
                return steps
            steps += 1


def train(args: argparse.Namespace, preset: QualityPreset, variant: Variant, seed: int, steps: int,
          data: tuple[list[str], list[str]], counter: FlopCounter) -> dict:
    """One trainer run; its cost (FLOPs from the logged draws, time, memory) and NLL curve."""
    run_dir = os.path.join(args.out, f"seed{seed}", variant.slug)
    os.makedirs(run_dir, exist_ok=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    interval = max(1, steps // preset.eval_points)
    cmd = [sys.executable, "-m", "localopt_plugin.commands.train", "--preset", preset.model,
           *preset.model_flags.split(), "--dataset", "video-wds", "--data-path", *data[0],
           "--valid-data-path", *data[1], "--data-num-workers", "0",
           "--micro-batch-size", str(preset.micro_batch), "--train-iters", str(steps),
           "--lr", str(preset.lr), "--min-lr", str(preset.lr / 10),
           "--lr-warmup-iters", str(max(1, steps // 20)), "--lr-decay-style", "cosine",
           "--weight-decay", "0.05", "--seed", str(seed),
           "--local-opt-window-frames", str(preset.window), "--log-interval", "50",
           "--eval-interval", str(interval), "--eval-iters",
           str(max(1, preset.eval_samples // preset.micro_batch)),
           "--save", os.path.join(run_dir, "checkpoint"), "--metrics-file", metrics,
           "--progress", "off", *variant.flags()]
    started = time.perf_counter()
    run_logged(cmd, os.path.join(run_dir, "train.log"))
    wall = time.perf_counter() - started
    with open(metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if ITERATION in r and STEP_TIME in r]
    flops, starts = counter.steps(variant, seed, len(records), records)
    logged = [r.get(WINDOW_START, r.get(CLIP_START)) for r in records]
    if variant.objective != "full-sequence" and logged != starts:
        raise RuntimeError(f"{variant.name}: the trainer drew other windows than the "
                           f"FLOP count assumed ({logged[:8]} vs {starts[:8]})")
    spent = np.cumsum(flops)
    curve = [(float(spent[r[ITERATION] - 1]), r[VALID_LOSS])
             for r in records if VALID_LOSS in r]
    return {
        "variant": variant.name, "seed": seed, "steps": len(records),
        "compute (PFLOP)": float(spent[-1]) / 1e15,
        "train time (s)": sum(r[STEP_TIME] for r in records), "wall time (s)": wall,
        "peak memory (MB)": max(r["memory (MB)"] for r in records),
        "final lm loss": records[-1][LM_LOSS],
        "valid loss vs compute": curve,
        "checkpoint": os.path.join(run_dir, "checkpoint"),
    }


@functools.cache
def classifier_digest() -> str:
    """The shipped classifier's weights digest: which evaluator scored a row."""
    from localopt_plugin.evaluation.classifier import default_weights_path

    with open(default_weights_path().with_suffix(".json")) as f:
        return json.load(f)["sha256"]


def score_classes(run_dir: str, background: str) -> dict:
    """Class accuracy and Frechet distance of a run's samples by the shipped classifier."""
    classes_file = os.path.join(run_dir, "classes.json")
    run_logged([sys.executable, "-m", "localopt_plugin.commands.evaluate", "classes",
                os.path.join(run_dir, "samples"), "--background", background,
                "--out", classes_file], os.path.join(run_dir, "classes.log"))
    with open(classes_file) as f:
        classes = json.load(f)
    keys = ("accuracy", "first frames accuracy", "last frames accuracy", "frechet distance",
            "frechet distance of real clips")
    scores = {"classifier": classifier_digest(), **{key: classes.get(key) for key in keys}}
    if classes.get("segments"):  # long videos: per 17-frame segment
        for key in ("accuracy", "frechet distance", "frechet distance of real clips"):
            scores[f"{key} per segment"] = [s[key] for s in classes["segments"]]
    return scores


def evaluate(args: argparse.Namespace, preset: QualityPreset, variant: Variant, row: dict,
             valid: list[str], background: str) -> dict:
    """NLL per frame, then generated videos: class accuracy, Frechet distance, flow error.

    Every model generates the way it must: full context, except fewer-frames, which can only
    generate chunk by chunk (each W-frame chunk conditioned on the previous one).
    """
    checkpoint = row["checkpoint"]
    run_dir = os.path.dirname(checkpoint)
    py = [sys.executable, "-m"]
    nll_file = os.path.join(run_dir, "nll.json")
    run_logged([*py, "localopt_plugin.commands.evaluate", "nll", "--checkpoint", checkpoint,
                "--data-path", *valid, "--num-samples", str(preset.eval_samples),
                "--out", nll_file], os.path.join(run_dir, "nll.log"))
    with open(nll_file) as f:
        nll = json.load(f)
    per_frame = nll["per_frame_nll"]
    result = {"valid NLL": float(np.mean(per_frame)), "NLL per frame": per_frame,
              "first-frame NLL": per_frame[0], "last-frame NLL": per_frame[-1]}
    if nll.get("per_segment_nll"):
        result["NLL per segment"] = [s["nll"] for s in nll["per_segment_nll"]]
    samples = os.path.join(run_dir, "samples")
    mode = (["--mode", "chunked", "--chunk-frames", str(preset.window)]
            if variant.objective == "fewer-frames" else ["--mode", "full"])
    per_class = args.generate_per_class or preset.generate_per_class
    run_logged([*py, "localopt_plugin.commands.generate", "--checkpoint", checkpoint, "--out",
                samples, "--class-labels", *map(str, range(NUM_CLASSES)),
                "--samples-per-condition", str(per_class), "--top-k", "50", "--seed",
                str(row["seed"]), "--no-progress", *mode], os.path.join(run_dir, "generate.log"))
    flow_file = os.path.join(run_dir, "flow.json")
    run_logged([*py, "localopt_plugin.commands.evaluate", "flow", samples, "--out", flow_file],
               os.path.join(run_dir, "flow.log"))
    with open(flow_file) as f:
        result["flow warp error"] = json.load(f)["mean"]
    if background != "none":
        result.update(score_classes(run_dir, background))
    if args.i3d:
        fvd_file = os.path.join(run_dir, "fvd.json")
        run_logged([*py, "localopt_plugin.commands.evaluate", "fvd", "--i3d", args.i3d,
                    "--real", args.real_videos, "--generated", samples, "--out", fvd_file],
                   os.path.join(run_dir, "fvd.log"))
        with open(fvd_file) as f:
            result["FVD"] = json.load(f)["fvd"]
    return result


METRICS = ("steps", "compute (PFLOP)", "train time (s)", "peak memory (MB)", "valid NLL",
           "first-frame NLL", "last-frame NLL", "accuracy", "first frames accuracy",
           "last frames accuracy", "frechet distance", "flow warp error", "FVD")
# long videos: one value per 17-frame segment (mean over seeds, segment by segment)
SEGMENT_METRICS = ("NLL per segment", "accuracy per segment", "frechet distance per segment")


def summarize(rows: list[dict], variants: list[Variant]) -> list[dict]:
    """Per variant: mean and spread (min, max) over seeds of every metric, and the compute
    ratio to full-sequence."""
    table = []
    for variant in variants:
        runs = [r for r in rows if r["variant"] == variant.name]
        if not runs:
            continue
        entry = {"variant": variant.name, "seeds": [r["seed"] for r in runs]}
        for metric in METRICS:
            values = [r[metric] for r in runs if r.get(metric) is not None]
            if values:
                entry[metric] = {"mean": float(np.mean(values)), "min": float(np.min(values)),
                                 "max": float(np.max(values))}
        for metric in SEGMENT_METRICS:
            values = [r[metric] for r in runs if r.get(metric)]
            if values:
                entry[metric] = [float(v) for v in np.mean(values, axis=0)]
        if "NLL per segment" in entry:  # error accumulation: last segment against the first
            entry["NLL drift (last - first segment)"] = (entry["NLL per segment"][-1]
                                                         - entry["NLL per segment"][0])
        table.append(entry)
    full = table[0]
    for entry in table:
        entry["time / full-sequence time"] = (entry["train time (s)"]["mean"]
                                              / full["train time (s)"]["mean"])
        entry["compute / full-sequence compute"] = (entry["compute (PFLOP)"]["mean"]
                                                    / full["compute (PFLOP)"]["mean"])
    return table


def run(args: argparse.Namespace) -> dict:
    if args.i3d and not args.real_videos:
        raise UserError("--i3d needs --real-videos (the reference set for FVD)")
    if bool(args.data_path) != bool(args.valid_data_path):
        raise UserError("--data-path and --valid-data-path go together")
    preset = PRESETS[args.preset]
    args.sweep = args.sweep or preset.sweep
    if args.full_steps:
        preset = dataclasses.replace(preset, full_steps=args.full_steps)
    if args.eval_samples:
        preset = dataclasses.replace(preset, eval_samples=args.eval_samples)
    variants = list(SWEEPS[args.sweep])
    variants = select_variants(variants, args.variants, "this sweep")
    os.makedirs(args.out, exist_ok=True)
    if args.data_path:
        data = (args.data_path, args.valid_data_path)
        background = args.background or "none"
    else:
        data = make_data(args.out, preset)
        background = args.background or preset.background
    counter = FlopCounter(data[0], preset)
    rows = []
    for seed in args.seeds:
        full_flops, _ = counter.steps(variants[0], seed, preset.full_steps)
        budget = float(np.sum(full_flops))
        for variant in variants:
            steps = (preset.full_steps if variant is variants[0] or variant.same_steps
                     else counter.steps_within(variant, seed, budget * preset.budget_fraction))
            row_file = os.path.join(args.out, f"seed{seed}", variant.slug, "row.json")
            if os.path.exists(row_file):  # a finished run of an interrupted bench
                with open(row_file) as f:
                    row = json.load(f)
                if row["steps"] == steps and row.get("background") == background:
                    print(f"[quality] seed {seed}: {variant.name}: reusing {row_file}")
                    if background != "none" and row.get("classifier") != classifier_digest():
                        print(f"[quality] seed {seed}: {variant.name}: new classifier weights: "
                              "scoring its samples again", flush=True)
                        row.update(score_classes(os.path.dirname(row_file), background))
                        with open(row_file, "w") as f:
                            json.dump(row, f, indent=2)
                    rows.append(row)
                    continue
            print(f"[quality] seed {seed}: {variant.name}: {steps} steps (full-sequence's "
                  f"budget: {budget / 1e15:.4f} PFLOP)", flush=True)
            row = train(args, preset, variant, seed, steps, data, counter)
            row.update(evaluate(args, preset, variant, row, data[1], background))
            row["background"] = background
            with open(row_file, "w") as f:
                json.dump(row, f, indent=2)
            rows.append(row)
    real_flow = None
    if background != "none":  # the flow error of real clips: generated videos' reference
        from localopt_plugin.evaluation.flow import real_flow_error

        with open(os.path.join(os.path.dirname(data[0][0]), "manifest.json")) as f:
            manifest = json.load(f)
        real_flow = real_flow_error(background, manifest["tokenizer"]["name"],
                                    NUM_CLASSES * (args.generate_per_class
                                                   or preset.generate_per_class),
                                    manifest["source"]["frames"],
                                    max(manifest["source"]["resolution"]))
    return {"preset": args.preset, "sweep": args.sweep, "settings": dataclasses.asdict(preset),
            "seeds": args.seeds, "background": background,
            "flow warp error of real clips through the tokenizer": real_flow,
            "machine": {"cpus": os.cpu_count(), "torch threads": torch.get_num_threads(),
                        "cuda": torch.cuda.is_available()},
            "runs": rows, "summary": summarize(rows, variants)}


def write_outputs(out: str, result: dict, table: str, plot, png: str) -> None:
    """A bench's ``results.json``, ``results.md`` (``table``) and ``png`` (drawn by
    ``plot(result, path)``) in ``out``; the table printed."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    plot(result, os.path.join(out, png))
    print(table)


def table_cell(value) -> str:
    """A table cell: a list's values, a spread's mean (min-max), a float to 4 digits."""
    if isinstance(value, list):
        return " ".join(f"{v:.3g}" for v in value)
    if isinstance(value, dict):
        mean, low, high = value["mean"], value["min"], value["max"]
        return f"{mean:.4g}" if low == high else f"{mean:.4g} ({low:.3g}-{high:.3g})"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(result: dict) -> str:
    columns = ["variant", *METRICS, "compute / full-sequence compute",
               "time / full-sequence time", *SEGMENT_METRICS, "NLL drift (last - first segment)"]
    columns = [c for c in columns if any(c in e for e in result["summary"])]
    share = result["settings"]["budget_fraction"]
    budget = "equal training FLOPs" if share == 1 else f"{share:g}x full-sequence's FLOPs"
    out = [f"{result['sweep']} at {budget}, seeds {result['seeds']}: mean "
           "(min-max over seeds)", "", "| " + " | ".join(columns) + " |",
           "|" + "---|" * len(columns)]
    for entry in result["summary"]:
        out.append("| " + " | ".join(table_cell(entry.get(c, "n/a")) for c in columns) + " |")
    real_flow = result.get("flow warp error of real clips through the tokenizer")
    if real_flow is not None:
        out += ["", f"flow warp error of as many real clips through the tokenizer: "
                    f"{real_flow:.4g} (generated videos below it are blurred or frozen, not "
                    "smoother)"]
    return "\n".join(out) + "\n"


def plot_nll_vs_compute(result: dict, path: str) -> str:
    """Validation NLL (full-sequence) against FLOPs spent: one line per variant and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colours = {}
    for row in result["runs"]:
        if not row["valid loss vs compute"]:
            continue
        x, y = zip(*row["valid loss vs compute"], strict=True)
        colour = colours.setdefault(row["variant"], f"C{len(colours)}")
        label = row["variant"] if row["seed"] == result["seeds"][0] else None
        ax.plot(np.array(x) / 1e12, y, marker="o", color=colour, label=label, alpha=0.85)
    ax.set_xlabel("training compute (TFLOP, analytic)")
    ax.set_ylabel("validation full-sequence NLL (nats/token)")
    ax.set_title(f"{result['sweep']}: validation NLL against compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    result = run(args)
    prefix = os.path.join(args.out, "" if args.sweep == "ablation" else f"{args.sweep}-")
    with open(f"{prefix}results.json", "w") as f:
        json.dump(result, f, indent=2)
    table = format_table(result)
    with open(f"{prefix}results.md", "w") as f:
        f.write(table)
    plot_nll_vs_compute(result, f"{prefix}nll_vs_compute.png")
    print(table)
    return 0

