"""``localopt-report RUN_DIR``: the main job's report (markdown + PNG).

Reads what the main job's steps left in ``RUN_DIR`` — ``metrics.jsonl`` (trainer),
``eval/nll.json`` (per-frame validation NLL), ``samples/`` (generated GIFs/mp4s and grid),
``eval/flow.json`` (temporal consistency) and the shards' manifests — and writes
``loss_curves.png`` and ``report.md``. Missing pieces are reported as missing, not skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(records: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["iteration"] for r in records]
    for key in ("lm loss", "reco loss", "total loss"):
        if key in records[0]:
            axes[0].plot(steps, [r[key] for r in records], label=key)
    valid = [(r["iteration"], r["valid full-sequence loss"]) for r in records
             if "valid full-sequence loss" in r]
    if valid:
        axes[0].plot(*zip(*valid, strict=True), "o-", label="valid full-sequence loss")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title("training")
    axes[1].plot(steps, [r["video tokens/s"] for r in records])
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("video tokens / s")
    axes[1].set_title("throughput")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_report(run_dir: str) -> str:
    """Write ``report.md`` and ``loss_curves.png`` into ``run_dir``; return the report path."""
    lines = ["# Main job report", ""]
    metrics_file = os.path.join(run_dir, "metrics.jsonl")
    records = _read_jsonl(metrics_file) if os.path.exists(metrics_file) else []
    if records:
        plot_losses(records, os.path.join(run_dir, "loss_curves.png"))
        last = records[-1]
        total_time = sum(r["step time (s)"] for r in records)
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
        lines += ["## Validation NLL per latent frame (error accumulation)", "",
                  f"Mean full-sequence NLL {nll['mean_nll']:.4f} over {nll['num_samples']} "
                  "validation samples.", "",
                  "| frame | " + " | ".join(str(i) for i in range(len(per_frame))) + " |",
                  "|---|" + "---|" * len(per_frame),
                  "| NLL | " + " | ".join(f"{v:.3f}" for v in per_frame) + " |", ""]
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
    flow_file = os.path.join(run_dir, "eval", "flow.json")
    if os.path.exists(flow_file):
        with open(flow_file) as f:
            flow = json.load(f)
        lines += ["## Temporal consistency", "",
                  f"{flow['metric']}: mean {flow['mean']:.4f} over {flow['num_videos']} "
                  "generated videos.", ""]
    path = os.path.join(run_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localopt_plugin.report")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    print(write_report(args.run_dir))
    return 0



def main(argv: Sequence[str] | None = None) -> int:
    from localopt_plugin.commands import exit_on_user_error

    return exit_on_user_error(lambda: _main(argv))

if __name__ == "__main__":
    sys.exit(main())
