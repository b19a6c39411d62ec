"""``localopt-bench recall``: does Local Opt. keep long-range recall? Full-sequence against
fewer-frames and Local Opt. (+ ReCo) at shares of its compute, on the recall variant.

The data (``localopt_plugin.data.recall``): 65-frame clips at 32x32 (17 latent frames of 8x8
tokens with ``fsq-video-recall``); the object's colour (one of K, not in the label) shows only
in the first 17-frame segment, the object is hidden for longer than the window, then reappears.
Training clips come from the train split with a data seed that follows the run seed; prompts
and Frechet reference clips from the reference split, never trained on (disjoint by
construction, checked by content hash in the tests); the validation loss from the valid split.

Every variant trains with the real trainer (as ``localopt-bench quality`` does, FLOPs counted
from the window draws) and is evaluated in one process (``localopt-eval recall``): prompted
recall accuracy (the real first segment given, the rest sampled) and cue worth (teacher-forced
NLL of the reappearance frames after another colour's first segment minus after the true one),
then videos sampled from the class alone, per segment: presence and colour of the object, class
accuracy, Frechet distance and flow error, beside real clips through the tokenizer.
Fewer-frames is also generated within its trained length (chunks of W/2 frames after W/2).

The pilot gate: full-sequence must learn the recall (prompted recall accuracy >= 0.6 and cue
worth > 0 in every seed), otherwise the comparison says nothing and the budget or model must
grow. Writes ``results.json``, ``results.md`` and ``recall.png``. Each finished run leaves
``row.json``; a rerun reuses it, so seeds can be run one by one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from dataclasses import dataclass

import numpy as np

from localopt_plugin.bench.quality import (
    RECO_BEST,
    FlopCounter,
    Variant,
    run_logged,
    select_variants,
    table_cell,
    train,
    write_outputs,
)
from localopt_plugin.data.recall import RecallSetting
from localopt_plugin.errors import UserError
from localopt_plugin.evaluation.recall import hiding_latent_frames
from localopt_plugin.preprocess.inputs import RECALL
from localopt_plugin.tokenizers import build_tokenizer
from localopt_plugin.training.parser import build_parser

PROMPT_SEED = 500_000  # the first seed of the held-out clips (valid and reference splits)


@dataclass(frozen=True)
class RecallPreset:
    """One size of the recall bench (the fields ``bench.quality.train`` reads, and the data's)."""

    model: str
    model_flags: str
    micro_batch: int
    full_steps: int
    window: int
    videos: int
    valid_videos: int
    eval_samples: int  # validation samples per loss evaluation
    eval_points: int
    lr: float
    prompts: int  # held-out clips prompted with their first segment
    per_class: int  # videos sampled per class from the class alone
    reference: int  # real clips of the reference split for the Frechet distance
    frames: int = 65
    resolution: int = 32
    temperature: float = 1.0
    top_k: int = 0


PRESETS = {
    # full-sequence learns the recall at this budget (the pilot, docs/RESULTS.md)
    "cpu": RecallPreset(model="tiny", model_flags="", micro_batch=4, full_steps=1500, window=4,
                        videos=2400, valid_videos=96, eval_samples=24, eval_points=5, lr=2e-3,
                        prompts=96, per_class=2, reference=96),
    # the CI check of the machinery: a few steps, no claim
    "ci": RecallPreset(model="test", model_flags="", micro_batch=2, full_steps=6, window=4,
                       videos=24, valid_videos=8, eval_samples=4, eval_points=1, lr=2e-3,
                       prompts=4, per_class=1, reference=12),
}


@dataclass(frozen=True)
class Budgeted(Variant):
    """A variant with its own share of full-sequence's FLOPs."""

    budget: float = 1.0


VARIANTS = (
    Budgeted("full-sequence", "full-sequence"),
    Budgeted("fewer-frames 0.5x", "fewer-frames", budget=0.5),
    Budgeted("local-opt + balanced 0.5x", "local-opt", first_window_prob=0.5, budget=0.5),
    Budgeted("local-opt + balanced 0.25x", "local-opt", first_window_prob=0.5, budget=0.25),
    Budgeted("local-opt + balanced + ReCo 0.5x", "local-opt", first_window_prob=0.5,
             reco=RECO_BEST, budget=0.5),
    Budgeted("local-opt + balanced + ReCo 0.25x", "local-opt", first_window_prob=0.5,
             reco=RECO_BEST, budget=0.25),
    Budgeted("local-opt + balanced, full-sequence's steps", "local-opt", first_window_prob=0.5,
             same_steps=True),
)
# one value per run (mean and spread over seeds)
METRICS = ("steps", "compute (PFLOP)", "train time (s)", "final valid loss",
           "prompted recall accuracy", "prompted hid the object",
           "prompted colour kept after hiding", "cue worth (nats per clip)",
           "prompted presence after hiding", "free recall accuracy", "free hid the object",
           "free presence after hiding", "prompted recall accuracy (within trained length)",
           "prompted hid the object (within trained length)",
           "prompted colour kept after hiding (within trained length)",
           "free recall accuracy (within trained length)")
# one value per 17-frame segment (mean over seeds)
SEGMENT_METRICS = ("free presence per segment", "free cue colour share per segment",
                   "free class accuracy per segment", "free frechet distance per segment",
                   "free flow warp error per segment")
REAL_METRICS = ("real recall accuracy", "real presence per segment",
                "real class accuracy per segment", "real frechet distance per segment",
                "real flow warp error per segment", "colour-swapped recall accuracy")
GATE_RECALL = 0.6


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="a size of this bench (localopt_plugin/bench/recall.py PRESETS), "
                        "not a model preset")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="run seeds: initialisation, data order and the training data")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="run only these (full-sequence always runs: it sets the budget)")
    parser.add_argument("--add-variant", nargs=3, action="append", default=[],
                        metavar=("NAME", "BUDGET", "FLAGS"),
                        help="another variant: localopt-train FLAGS (one string, e.g. "
                        "'--objective local-opt --window-sampler uniform') trained to BUDGET x "
                        "full-sequence's FLOPs; repeatable")
    parser.add_argument("--recall", default="colours=4,hide=17+32",
                        help="the data's recall OPTIONS: colours=K,hide=START+FRAMES (the "
                        "frames the object is hidden)")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per clip (default: the preset's 65)")
    parser.add_argument("--full-steps", type=int, default=None,
                        help="full-sequence steps that set the FLOP budget (default: preset's)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature (default: the preset's)")
    parser.add_argument("--top-k", type=int, default=None)


def _setting(args: argparse.Namespace, split: str) -> RecallSetting:
    base = RecallSetting.parse(args.recall)
    return dataclasses.replace(base, split=split)


def make_data(directory: str, preset: RecallPreset, seed: int,
              args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Train shards (train split, seeds from ``seed * 10**6``) and valid shards (valid split)."""
    paths = []
    for split, count, first in (("train", preset.videos, seed * 10**6),
                                ("valid", preset.valid_videos, PROMPT_SEED)):
        out = os.path.join(directory, split)
        if not os.path.exists(os.path.join(out, "manifest.json")):
            os.makedirs(directory, exist_ok=True)
            spec = f"{RECALL}:{count}:{first}:{_setting(args, split).options()}"
            run_logged([sys.executable, "-m", "localopt_plugin.commands.preprocess", spec,
                        "--output", out, "--shard-prefix", split, "--frames", str(preset.frames),
                        "--resolution", str(preset.resolution), "--tokenizer", "fsq-video-recall",
                        "--videos-per-shard", "256", "--no-progress"],
                       os.path.join(directory, f"{split}.log"))
        paths.append(sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".tar")))
    return paths[0], paths[1]


def _evaluate_once(run_dir: str, preset: RecallPreset, args: argparse.Namespace, seed: int,
                   name: str, mode: list[str]) -> dict:
    out = os.path.join(run_dir, f"{name}.json")
    if not os.path.exists(out):
        temperature = preset.temperature if args.temperature is None else args.temperature
        top_k = preset.top_k if args.top_k is None else args.top_k
        run_logged([sys.executable, "-m", "localopt_plugin.commands.evaluate", "recall",
                    "--checkpoint", os.path.join(run_dir, "checkpoint"),
                    "--setting", _setting(args, "reference").options(),
                    "--count", str(preset.prompts), "--first-seed", str(PROMPT_SEED),
                    "--per-class", str(preset.per_class),
                    "--reference-count", str(preset.reference), "--temperature", str(temperature),
                    "--top-k", str(top_k), "--seed", str(seed), *mode, "--out", out + ".tmp"],
                   os.path.join(run_dir, f"{name}.log"))
        os.replace(out + ".tmp", out)
    with open(out) as f:
        return json.load(f)


def row_metrics(result: dict, suffix: str = "") -> dict:
    """A run's figures from its ``localopt-eval recall`` JSON."""
    prompted, free = result["prompted"], result["free"]
    row = {f"prompted recall accuracy{suffix}": prompted["recall accuracy"],
           f"prompted hid the object{suffix}": prompted["hid the object"],
           f"prompted colour kept after hiding{suffix}": prompted["colour kept after hiding"],
           f"free recall accuracy{suffix}": free["recall accuracy"]}
    if suffix:
        return row
    real = result["real clips through the tokenizer"]
    segments = free["segments"]
    row.update({
        "cue worth (nats per clip)": result["cue worth (nats per clip)"],
        "prompted presence after hiding": prompted["presence after hiding"],
        "free presence after hiding": free["presence after hiding"],
        "free hid the object": free["hid the object"],
        "free presence per segment": free["presence per segment"],
        "free cue colour share per segment": free["cue colour share per segment"],
        "free class accuracy per segment": [s["accuracy"] for s in segments],
        "free frechet distance per segment": [s["frechet distance"] for s in segments],
        "free flow warp error per segment": free["flow warp error per segment"],
        "real recall accuracy": real["recall accuracy"],
        "real presence per segment": real["presence per segment"],
        "real class accuracy per segment": real["class accuracy per segment"],
        "real frechet distance per segment": [s["frechet distance of real clips"]
                                              for s in segments],
        "real flow warp error per segment": real["flow warp error per segment"],
        "colour-swapped recall accuracy": result["colour-swapped control"]["recall accuracy"],
    })
    return row


def evaluate(run_dir: str, preset: RecallPreset, variant: Variant, args: argparse.Namespace,
             seed: int) -> dict:
    """The recall evaluation of a run (twice for fewer-frames: full context, then chunks within
    its trained length)."""
    row = row_metrics(_evaluate_once(run_dir, preset, args, seed, "recall", ["--mode", "full"]))
    if variant.objective == "fewer-frames":
        chunk = max(1, preset.window // 2)
        mode = ["--mode", "chunked", "--chunk-frames", str(chunk), "--context-frames",
                str(preset.window - chunk)]
        row.update(row_metrics(_evaluate_once(run_dir, preset, args, seed, "recall-chunked",
                                              mode), " (within trained length)"))
    return row


def _spread(values: list) -> dict | list:
    if isinstance(values[0], list):
        return [float(v) for v in np.nanmean(np.array(values, dtype=float), axis=0)]
    return {"mean": float(np.mean(values)), "min": float(np.min(values)),
            "max": float(np.max(values)), "values": [float(v) for v in values]}


def summarize(rows: list[dict], variants: list[Variant]) -> list[dict]:
    """Per variant: mean and spread over seeds, compute and time against full-sequence."""
    table = []
    for variant in variants:
        runs = [r for r in rows if r["variant"] == variant.name]
        if not runs:
            continue
        entry = {"variant": variant.name, "seeds": [r["seed"] for r in runs]}
        for metric in (*METRICS, *SEGMENT_METRICS, *REAL_METRICS):
            values = [r[metric] for r in runs if r.get(metric) is not None]
            if values:
                entry[metric] = _spread(values)
        table.append(entry)
    full = table[0]
    for entry in table:
        for key in ("compute (PFLOP)", "train time (s)"):
            entry[f"{key.split(' (')[0]} / full-sequence"] = (entry[key]["mean"]
                                                              / full[key]["mean"])
    return table


def pilot_gate(rows: list[dict]) -> dict:
    """Did full-sequence learn the recall in every seed?"""
    full = [r for r in rows if r["variant"] == VARIANTS[0].name]
    passed = bool(full) and all(r["prompted recall accuracy"] >= GATE_RECALL
                                and r["cue worth (nats per clip)"] > 0 for r in full)
    return {"rule": f"full-sequence prompted recall accuracy >= {GATE_RECALL} and cue worth > 0 "
                    "in every seed", "passed": passed,
            "full-sequence": [{k: r[k] for k in ("seed", "prompted recall accuracy",
                                                 "cue worth (nats per clip)")} for r in full]}


def _added_variant(spec: list[str]) -> Budgeted:
    """An ``--add-variant NAME BUDGET FLAGS`` (its objective read from FLAGS, as the trainer
    and the FLOP count read them)."""
    name, budget, flags = spec
    try:
        share = float(budget)
    except ValueError:
        raise UserError(f"--add-variant {name}: BUDGET must be a number, got {budget!r}") from None
    if not 0 < share <= 4:
        raise UserError(f"--add-variant {name}: BUDGET must lie in (0, 4], got {share}")
    if name in {v.name for v in VARIANTS}:
        raise UserError(f"--add-variant {name}: a built-in variant has this name")
    extra = tuple(shlex.split(flags))
    parsed, unknown = build_parser().parse_known_args(extra)  # the trainer reads them so
    if unknown:
        raise UserError(f"--add-variant {name}: not localopt-train flags: {' '.join(unknown)}")
    return Budgeted(name, parsed.objective, first_window_prob=0.5, extra=extra, budget=share)


def train_within(args: argparse.Namespace, preset: RecallPreset, variant: Variant, seed: int,
                 steps: int, data: tuple[list[str], list[str]], counter: FlopCounter,
                 budget: float) -> dict:
    """A run of ``steps`` (its ``planned steps``); a variant whose draws follow its losses (the
    adaptive sampler) spends FLOPs known only afterwards: it is rerun with its steps scaled to
    the budget (up to twice) until it spends at most 2% more."""
    row = train(args, preset, variant, seed, steps, data, counter)
    if counter.learns_from_losses(variant):
        for _ in range(2):
            spent = row["compute (PFLOP)"] * 1e15
            if spent <= budget * 1.02:
                break
            fewer = int(row["steps"] * budget / spent)
            print(f"[recall] seed {seed}: {variant.name}: spent {spent / budget:.3f}x its "
                  f"budget; again with {fewer} steps", flush=True)
            row = train(args, preset, variant, seed, fewer, data, counter)
    row["planned steps"] = steps
    return row


def run(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.preset]
    if args.full_steps:
        preset = dataclasses.replace(preset, full_steps=args.full_steps)
    if args.frames:
        preset = dataclasses.replace(preset, frames=args.frames)
    # bad --recall options or a hiding that does not fit the clips: refused before any work
    hiding_latent_frames(_setting(args, "train"), preset.frames,
                         build_tokenizer("fsq-video-recall").temporal_compression)
    variants = select_variants([*VARIANTS, *map(_added_variant, args.add_variant)],
                               args.variants, "this bench")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for seed in args.seeds:
        data = make_data(os.path.join(args.out, f"seed{seed}", "data"), preset, seed, args)
        counter = FlopCounter(data[0], preset)
        full_flops, _ = counter.steps(variants[0], seed, preset.full_steps)
        budget = float(np.sum(full_flops))
        for variant in variants:
            steps = (preset.full_steps if variant is variants[0] or variant.same_steps
                     else counter.steps_within(variant, seed, budget * variant.budget))
            run_dir = os.path.join(args.out, f"seed{seed}", variant.slug)
            row_file = os.path.join(run_dir, "row.json")
            if os.path.exists(row_file):
                with open(row_file) as f:
                    row = json.load(f)
                if (row.get("planned steps", row["steps"]) == steps
                        and row.get("recall") == args.recall):
                    print(f"[recall] seed {seed}: {variant.name}: reusing {row_file}", flush=True)
                    rows.append(row)
                    continue
            print(f"[recall] seed {seed}: {variant.name}: {steps} steps ({variant.budget:g}x "
                  f"full-sequence's {budget / 1e15:.4f} PFLOP)", flush=True)
            trained = os.path.join(run_dir, "train-row.json")
            if os.path.exists(trained):  # trained before an interruption: evaluate only
                with open(trained) as f:
                    row = json.load(f)
            if not os.path.exists(trained) or row.get("planned steps", row["steps"]) != steps:
                row = train_within(args, preset, variant, seed, steps, data, counter,
                                   budget * variant.budget)
                with open(trained, "w") as f:
                    json.dump(row, f, indent=2)
            curve = row["valid loss vs compute"]
            row["final valid loss"] = curve[-1][1] if curve else None
            row.update(evaluate(run_dir, preset, variant, args, seed))
            row["recall"] = args.recall
            with open(row_file, "w") as f:
                json.dump(row, f, indent=2)
            rows.append(row)
    return {"bench": "recall", "preset": args.preset, "settings": dataclasses.asdict(preset),
            "recall": args.recall, "seeds": args.seeds, "machine": {"cpus": os.cpu_count()},
            "pilot gate": pilot_gate(rows), "runs": rows, "summary": summarize(rows, variants)}


def format_table(result: dict) -> str:
    """Two markdown tables (per run figures; per segment figures) and the gate's verdict."""
    summary = result["summary"]
    gate = result["pilot gate"]
    out = [f"recall bench ({result['preset']}, {result['recall']}), seeds {result['seeds']}: "
           "mean (min-max over seeds)", "",
           f"pilot gate ({gate['rule']}): {'passed' if gate['passed'] else 'NOT passed'}", ""]
    for columns in ((*METRICS, "compute / full-sequence", "train time / full-sequence"),
                    SEGMENT_METRICS):
        columns = ["variant", *(c for c in columns if any(c in e for e in summary))]
        out += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(table_cell(e.get(c, "n/a")) for c in columns) + " |"
                for e in summary]
        out.append("")
    real = summary[0]
    out.append("real held-out clips through the tokenizer: " + "; ".join(
        f"{metric} {table_cell(real[metric])}" for metric in REAL_METRICS if metric in real))
    return "\n".join(out) + "\n"


def plot(result: dict, path: str) -> str:
    """Recall accuracy and cue worth per variant (mean, min-max over seeds) and the free
    videos' figures per 17-frame segment (mean over seeds; real clips dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), dpi=100)
    names = [e["variant"] for e in summary]
    for ax, metric in zip(axes[0], ("prompted recall accuracy", "cue worth (nats per clip)",
                                    "free recall accuracy"), strict=True):
        means = [e[metric]["mean"] if metric in e else np.nan for e in summary]
        low = [m - e[metric]["min"] if metric in e else 0 for m, e in zip(means, summary,
                                                                            strict=True)]
        high = [e[metric]["max"] - m if metric in e else 0 for m, e in zip(means, summary,
                                                                             strict=True)]
        ax.barh(range(len(names)), means, xerr=[low, high], color=[f"C{i}" for i in
                                                                  range(len(names))])
        ax.set_yticks(range(len(names)), names if ax is axes[0][0] else [""] * len(names),
                      fontsize=7)
        ax.invert_yaxis()
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    for ax, (metric, real) in zip(axes[1], (
            ("free presence per segment", "real presence per segment"),
            ("free cue colour share per segment", None),
            ("free frechet distance per segment", "real frechet distance per segment")),
                                  strict=True):
        for i, entry in enumerate(summary):
            if metric in entry:
                ax.plot(range(1, len(entry[metric]) + 1), entry[metric], marker="o",
                        color=f"C{i}", label=entry["variant"])
        if real and real in summary[0]:
            ax.plot(range(1, len(summary[0][real]) + 1), summary[0][real], "k--",
                    label="real clips through the tokenizer")
        ax.set_xticks(range(1, len(summary[0].get(metric, [])) + 1))
        ax.set_xlabel("17-frame segment (default hiding: 1 shown, 2-3 hidden, 4 back)",
                      fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
    axes[1][0].legend(fontsize=6)
    fig.suptitle(f"recall bench ({result['recall']}), seeds {result['seeds']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    result = run(args)
    write_outputs(args.out, result, format_table(result), plot, "recall.png")
    return 0
