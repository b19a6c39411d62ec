"""``localopt-report RUN_DIR``: the main job's report (markdown + PNG).

Reads what the main job's steps left in ``RUN_DIR`` — ``metrics.jsonl`` (trainer),
``eval/nll.json`` (per-frame validation NLL), ``samples/`` (generated GIFs/mp4s and grid),
``eval/classes.json`` (class accuracy and Frechet distance by the embedded classifier) and
``eval/flow.json`` (temporal consistency) — and writes ``loss_curves.png``,
``real_vs_generated.png`` and ``report.md``. Missing pieces are reported as missing, not
skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from localopt_plugin.errors import UserError
from localopt_plugin.metric_names import (
    ITERATION,
    LM_LOSS,
    RECO_LOSS,
    STEP_TIME,
    TOKENS_PER_SECOND,
    TOTAL_LOSS,
    VALID_LOSS,
)


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(records: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r[ITERATION] for r in records]
    for key in (LM_LOSS, RECO_LOSS, TOTAL_LOSS):
        if key in records[0]:
            axes[0].plot(steps, [r[key] for r in records], label=key)
    valid = [(r[ITERATION], r[VALID_LOSS]) for r in records
             if VALID_LOSS in r]
    if valid:
        axes[0].plot(*zip(*valid, strict=True), "o-", label=VALID_LOSS)
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title("training")
    axes[1].plot(steps, [r[TOKENS_PER_SECOND] for r in records])
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("video tokens / s")
    axes[1].set_title("throughput")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def side_by_side(samples: str, background: str, out: str, frames: int = 6) -> str | None:
    """Per class: a real clip's frames above the first generated video's."""
    import numpy as np

    from localopt_plugin.data.procedural import NUM_CLASSES, render_video
    from localopt_plugin.evaluation.classifier import REFERENCE_SEED_START
    from localopt_plugin.video.io import read_video, save_grid_png

    rows = []
    for label in range(NUM_CLASSES):
        path = os.path.join(samples, f"class{label:02d}_00.mp4")
        if not os.path.exists(path):
            continue
        generated = read_video(path)
        picks = np.linspace(0, len(generated) - 1, frames).round().astype(int)
        real = render_video(label, REFERENCE_SEED_START + label, len(generated),
                            generated.shape[1], background=background)
        rows += [real[picks], generated[picks]]
    return str(save_grid_png(out, rows)) if rows else None


def _classes_section(run_dir: str, samples: str) -> list[str]:
    path = os.path.join(run_dir, "eval", "classes.json")
    if not os.path.exists(path):
        return ["## Classes of the generated videos", "", f"missing: {path}", ""]
    with open(path) as f:
        classes = json.load(f)
    keys = [k for k, v in classes.items() if isinstance(v, int | float) and k != "frames"]
    lines = ["## Classes of the generated videos (the embedded classifier)", "",
             f"{classes['num videos']} generated videos scored against their conditioning "
             f"class (chance: 1/12 = 0.083); Frechet distance of the classifier's features to "
             f"{classes['num real reference clips']} real {classes['background']} clips "
             f"({_reference_overlap(run_dir, classes)}), beside the same distance for as many "
             "real clips (the floor at this count) and for real clips through the "
             "tokenizer.", "",
             "| metric | value |", "|---|---|",
             *(f"| {k} | {classes[k]:.4g} |" for k in keys), ""]
    grid = side_by_side(samples, classes["background"],
                        os.path.join(run_dir, "real_vs_generated.png"))
    if grid:
        lines += ["Per class, a real clip (odd rows) above the first generated video "
                  "(even rows), 6 frames spread over the clip:", "",
                  "![real vs generated](real_vs_generated.png)", ""]
    return lines


def _overlap_words(shared: int, total: int, what: str) -> str:
    if not shared:
        return f"none of the {total} is a training clip (by tokens and class)"
    return (f"{shared} of the {total} are training clips (the same tokens and class): {what} "
            "measures fit on clips the model trained on, not generalization")


@functools.cache
def _training_digests(train_manifest: str) -> frozenset[str]:
    """The training samples' content digests, read once per report."""
    from localopt_plugin.data.wds.samples import sample_digests

    return frozenset(sample_digests(train_manifest))


def _reference_overlap(run_dir: str, classes: dict) -> str:
    """Whether the Frechet reference clips are training clips (checked, not assumed)."""
    from localopt_plugin.data.manifest import load_manifest
    from localopt_plugin.evaluation.classifier import reference_in_training

    train = os.path.join(run_dir, "shards", "train", "manifest.json")
    if not os.path.exists(train):
        return f"not checked against training: {train} is missing"
    shared, total = reference_in_training(_training_digests(train),
                                          load_manifest(train).tokenizer, classes["background"],
                                          classes["num real reference clips"],
                                          classes["frames"])
    return _overlap_words(shared, total, "the distance")


def _real_flow(run_dir: str, count: int) -> str:
    """The same error for as many real clips through the run's tokenizer (its reference)."""
    from localopt_plugin.evaluation.flow import real_flow_error

    classes, train = (os.path.join(run_dir, *parts) for parts in (
        ("eval", "classes.json"), ("shards", "train", "manifest.json")))
    if not (os.path.exists(classes) and os.path.exists(train)):
        return " (no real clips' value: the run's classes report or manifest is missing)"
    with open(classes) as f:
        background = json.load(f)["background"]
    with open(train) as f:
        manifest = json.load(f)
    value = real_flow_error(background, manifest["tokenizer"]["name"], count,
                            manifest["source"]["frames"], max(manifest["source"]["resolution"]))
    return (f", against {value:.4f} for {count} real {background} clips through the tokenizer "
            "(lower than real is not smoother motion but blur or a frozen picture)")


def _data_section(run_dir: str) -> list[str]:
    """What the run trained on, from the shards' manifests (and the classes report's variant)."""
    lines = ["## Data", ""]
    for split in ("train", "valid"):
        path = os.path.join(run_dir, "shards", split, "manifest.json")
        if not os.path.exists(path):
            lines.append(f"missing: {path}")
            continue
        with open(path) as f:
            manifest = json.load(f)
        source = manifest.get("source", {})
        resolution = "x".join(map(str, source.get("resolution", [])))
        lines.append(
            f"- {split}: {sum(s['samples'] for s in manifest['shards'])} clips of "
            f"{source.get('frames')} frames at {resolution}, "
            f"{manifest.get('num_classes')} classes, tokenizer {manifest['tokenizer']['name']} "
            f"(latent grid {manifest['latent_grid']}, {manifest['video_vocab_size']} codes)")
    train, valid = (os.path.join(run_dir, "shards", split, "manifest.json")
                    for split in ("train", "valid"))
    if os.path.exists(train) and os.path.exists(valid):
        from localopt_plugin.data.wds.samples import sample_digests

        training = _training_digests(train)
        held = sample_digests(valid)
        lines.append("- validation clips: " + _overlap_words(
            sum(d in training for d in held), len(held), "the validation loss and NLL"))
    classes = os.path.join(run_dir, "eval", "classes.json")
    if os.path.exists(classes):
        with open(classes) as f:
            lines.append(f"- procedural variant: {json.load(f)['background']} background")
    return [*lines, ""]


def write_report(run_dir: str) -> str:
    """Write ``report.md`` and ``loss_curves.png`` into ``run_dir``; return the report path."""
    lines = ["# Main job report", "", *_data_section(run_dir)]
    metrics_file = os.path.join(run_dir, "metrics.jsonl")
    records = _read_jsonl(metrics_file) if os.path.exists(metrics_file) else []
    if records:
        plot_losses(records, os.path.join(run_dir, "loss_curves.png"))
        last = records[-1]
        total_time = sum(r[STEP_TIME] for r in records)
        lines += [
            "## Training", "",
            f"{len(records)} iterations in {total_time:.0f} s of training "
            f"(median {sorted(r['video tokens/s'] for r in records)[len(records) // 2]:.0f} "
            "video tokens/s); final values:", "",
            "| metric | value |", "|---|---|",
            *(f"| {k} | {v:.4g} |" for k, v in last.items() if isinstance(v, float)),
            "", "![loss curves](loss_curves.png)", "",
        ]
    else:
        lines += ["## Training", "", f"missing: {metrics_file}", ""]
    nll_file = os.path.join(run_dir, "eval", "nll.json")
    if os.path.exists(nll_file):
        with open(nll_file) as f:
            nll = json.load(f)
        per_frame = nll["per_frame_nll"]
        lines += ["## Validation NLL per latent frame (teacher-forced)", "",
                  "Each frame predicted from the real frames before it: how well positions "
                  "are modelled, not the error accumulation of generation (see the classes "
                  "of the first and last frames above).", "",
                  f"Mean full-sequence NLL {nll['mean_nll']:.4f} over {nll['num_samples']} "
                  "validation samples.", "",
                  "| frame | " + " | ".join(str(i) for i in range(len(per_frame))) + " |",
                  "|---|" + "---|" * len(per_frame),
                  "| NLL | " + " | ".join(f"{v:.3f}" for v in per_frame) + " |"]
        null = nll.get("null_condition")
        if null:
            lines += ["| NLL, null condition | "
                      + " | ".join(f"{v:.3f}" for v in null["per_frame_nll"]) + " |", "",
                      f"The condition is worth {null['condition_nats_per_video']:.2f} nats per "
                      "video: the same videos with the null condition instead of their own "
                      "(0: the model ignores its condition; a label of C classes carries at "
                      "most log C nats about a video)."]
        lines += [""]
        if os.path.exists(os.path.join(run_dir, "eval", "nll.png")):
            lines += ["![NLL per frame](eval/nll.png)", ""]
    else:
        lines += ["## Validation NLL per latent frame", "", f"missing: {nll_file}", ""]
    samples = os.path.join(run_dir, "samples")
    if os.path.isdir(samples):
        gifs = sorted(f for f in os.listdir(samples) if f.endswith(".gif"))
        grids = sorted(f for f in os.listdir(samples) if f.endswith(".png"))
        lines += ["## Generated videos (full-context generation)", ""]
        lines += [f"![grid](samples/{g})" for g in grids]
        lines += ["", " ".join(f"![{g}](samples/{g})" for g in gifs), ""]
    else:
        lines += ["## Generated videos", "", f"missing: {samples}", ""]
    lines += _classes_section(run_dir, samples)
    flow_file = os.path.join(run_dir, "eval", "flow.json")
    if os.path.exists(flow_file):
        with open(flow_file) as f:
            flow = json.load(f)
        lines += ["## Temporal consistency", "",
                  f"{flow['metric']}: mean {flow['mean']:.4f} over {flow['num_videos']} "
                  f"generated videos{_real_flow(run_dir, flow['num_videos'])}.", ""]
    path = os.path.join(run_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


SPREAD_FIGURES = (  # (column, eval file, key) of one main job run
    ("class accuracy", "classes.json", "accuracy"),
    ("first frames accuracy", "classes.json", "first frames accuracy"),
    ("last frames accuracy", "classes.json", "last frames accuracy"),
    ("frechet distance (training clips)", "classes.json", "frechet distance"),
    ("validation NLL (training clips)", "nll.json", "mean_nll"),
    ("flow warp error", "flow.json", "mean"),
)


def _machine() -> str:
    """The CPU's model name (what the figures were measured on)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_spread(run_dirs: Sequence[str], out: str) -> str:
    """One table of the main job's figures over several runs (seeds): each run's values, then
    mean, min and max; the machine named."""
    rows = []
    for run_dir in run_dirs:
        row = {"run": run_dir}
        for column, name, key in SPREAD_FIGURES:
            path = os.path.join(run_dir, "eval", name)
            if not os.path.exists(path):
                raise UserError(f"{path} is missing: run launch/main_job.sh with OUT={run_dir} "
                                "to the end first")
            with open(path) as f:
                row[column] = json.load(f)[key]
        rows.append(row)
    columns = [c for c, _, _ in SPREAD_FIGURES]
    lines = [f"# Main job over {len(rows)} runs ({_machine()}, {os.cpu_count()} CPUs)", "",
             "| run | " + " | ".join(columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    lines += ["| " + " | ".join([os.path.basename(r["run"].rstrip("/")),
                                 *(f"{r[c]:.4g}" for c in columns)]) + " |" for r in rows]
    for name, reduce in (("mean", np.mean), ("min", np.min), ("max", np.max)):
        lines.append(f"| **{name}** | " + " | ".join(
            f"{reduce([r[c] for r in rows]):.4g}" for c in columns) + " |")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"runs": rows}, f, indent=2)
    return out


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localopt_plugin.commands.report")
    parser.add_argument("run_dir", nargs="+",
                        help="a main job's OUT directory (several with --spread)")
    parser.add_argument("--spread", default=None, metavar="MARKDOWN",
                        help="write the figures of every RUN_DIR (e.g. one per SEED) and their "
                        "mean, min and max to this file (and a JSON beside it)")
    args = parser.parse_args(argv)
    if args.spread:
        print(write_spread(args.run_dir, args.spread))
    elif len(args.run_dir) > 1:
        raise UserError("several run directories need --spread FILE")
    else:
        print(write_report(args.run_dir[0]))
    return 0



def main(argv: Sequence[str] | None = None) -> int:
    from localopt_plugin.commands import exit_on_user_error

    return exit_on_user_error(lambda: _main(argv))

if __name__ == "__main__":
    sys.exit(main())
