"""``localopt-eval``: teacher-forced NLL per frame, consistency, classes, FVD and long-range recall.

Subcommands::

    localopt-eval nll  --checkpoint CKPT [--data-path SHARDS...] --out nll.json [--plot nll.png]
    localopt-eval plot a.json b.json --labels local-opt full --out compare.png
    localopt-eval flow VIDEO_OR_DIR... --out flow.json
    localopt-eval fvd  --i3d i3d_torchscript.pt --real DIR... --generated DIR... --out fvd.json
    localopt-eval classes GENERATED_DIR... --background calm --out classes.json
    localopt-eval recall --checkpoint CKPT --setting split=valid,colours=4 --out recall.json
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from localopt_plugin.data.procedural import BACKGROUNDS

log = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".gif", ".avi", ".mov", ".webm", ".mkv")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="localopt-eval", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)

    nll = sub.add_parser("nll", help="full-sequence NLL per latent frame of a checkpoint")
    nll.add_argument("--checkpoint", required=True)
    nll.add_argument("--tag", default=None)
    nll.add_argument("--data-path", nargs="+", default=None,
                     help="validation video-wds shards (default: the checkpoint's dataset's "
                     "validation split)")
    nll.add_argument("--num-samples", type=int, default=64)
    nll.add_argument("--micro-batch-size", type=int, default=4)
    nll.add_argument("--seed", type=int, default=0)
    nll.add_argument("--out", required=True, help="JSON file")
    nll.add_argument("--plot", default=None, help="PNG of the per-frame curve")
    nll.add_argument("--condition-check", action="store_true",
                     help="also score the same videos with the null condition: what the model "
                     "takes from its condition, in nats per video")

    plot = sub.add_parser("plot", help="overlay the per-frame curves of several nll JSONs")
    plot.add_argument("results", nargs="+")
    plot.add_argument("--labels", nargs="+", default=None)
    plot.add_argument("--out", required=True, help="PNG file")

    flow = sub.add_parser("flow", help="optical-flow warping error of videos (lower: smoother)")
    flow.add_argument("videos", nargs="+", help="video files or directories of them")
    flow.add_argument("--out", default=None, help="JSON file (default: print only)")

    fvd = sub.add_parser("fvd", help="Frechet Video Distance with a local TorchScript I3D")
    fvd.add_argument("--i3d", required=True, help="i3d_torchscript.pt (StyleGAN-V's)")
    fvd.add_argument("--real", nargs="+", required=True, help="video files or directories")
    fvd.add_argument("--generated", nargs="+", required=True, help="video files or directories")
    fvd.add_argument("--num-frames", type=int, default=16,
                     help="first frames of every clip used (StyleGAN-V: 16)")
    fvd.add_argument("--batch-size", type=int, default=8)
    fvd.add_argument("--out", default=None, help="JSON file (default: print only)")

    classes = sub.add_parser(
        "classes", help="embedded data: class accuracy of generated videos and the Frechet "
        "distance of the shipped classifier's features to held-out real clips")
    classes.add_argument("videos", nargs="+",
                         help="video files or directories (labels from names classNN_*)")
    classes.add_argument("--labels", type=int, nargs="+", default=None,
                         help="conditioning class per video, in file order (default: parsed "
                         "from the file names, as localopt-generate writes them)")
    classes.add_argument("--background", choices=BACKGROUNDS, default="textured",
                         help="the procedural variant the model was trained on (the real "
                         "reference clips are rendered with it)")
    classes.add_argument("--real-count", type=int, default=256,
                         help="held-out real clips rendered for the Frechet distance")
    classes.add_argument("--tokenizer", default=None,
                         help="also report the floor: the distance of real clips after this "
                         "tokenizer's encode/decode (e.g. fsq-video)")
    classes.add_argument("--weights", default=None,
                         help="classifier weights (default: the shipped ones)")
    classes.add_argument("--out", default=None, help="JSON file (default: print only)")

    recall = sub.add_parser(
        "recall", help="recall variant: does the reappearing object keep its colour? (cue worth, "
        "prompted and free generation, per segment)")
    recall.add_argument("--checkpoint", required=True)
    recall.add_argument("--setting", default="split=valid",
                        help="the held-out clips' OPTIONS as for procedural-recall "
                        "(split=train|valid|reference,colours=K,hide=START+FRAMES); colours and "
                        "hide must be the training data's")
    recall.add_argument("--count", type=int, default=48, help="held-out clips")
    recall.add_argument("--first-seed", type=int, default=500000,
                        help="their first seed (procedural-recall:COUNT:FIRST_SEED)")
    recall.add_argument("--per-class", type=int, default=2,
                        help="videos per class sampled from the class alone")
    recall.add_argument("--reference-count", type=int, default=96,
                        help="real clips of the reference split for the Frechet distance")
    recall.add_argument("--temperature", type=float, default=1.0)
    recall.add_argument("--top-k", type=int, default=0)
    recall.add_argument("--seed", type=int, default=0)
    recall.add_argument("--mode", choices=["full", "chunked"], default="full",
                        help="as localopt-generate --mode (chunked: how fewer-frames generates)")
    recall.add_argument("--chunk-frames", type=int, default=None)
    recall.add_argument("--context-frames", type=int, default=None)
    recall.add_argument("--out", required=True, help="JSON file")

    tokens = sub.add_parser(
        "recall-tokens", help="recall-tokens task: recall and copy accuracy, cue worth and "
        "attention to the cue on held-out cues, of one or every checkpoint of a run")
    tokens.add_argument("--checkpoint", required=True)
    tokens.add_argument("--every-checkpoint", action="store_true",
                        help="score every iter_* checkpoint in the directory (default: latest)")
    tokens.add_argument("--split", choices=["valid", "test"], default="test",
                        help="held-out cues to score (never trained on)")
    tokens.add_argument("--out", required=True, help="JSON file")
    return p


def video_files(paths: Sequence[str]) -> list[Path]:
    """Files as given; directories expanded to their videos, one per name (mp4 first, so a
    localopt-generate directory's GIF copies are not counted twice)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = [f for f in path.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES]
            best = {}
            for f in sorted(found, key=lambda f: -VIDEO_SUFFIXES.index(f.suffix.lower())):
                best[f.stem] = f
            files += [best[stem] for stem in sorted(best)]
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"error: {path} does not exist")
    if not files:
        raise SystemExit(f"error: no video files in {', '.join(paths)}")
    return files


def _write(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text if len(text) < 4000 else json.dumps(
        {k: v for k, v in result.items() if not isinstance(v, list | dict)}, indent=2))


def _nll(args: argparse.Namespace) -> None:
    from localopt_plugin.data.layout import SampleLayout, Vocabulary
    from localopt_plugin.evaluation.nll import (
        condition_check,
        nll_per_position,
        plot_curves,
        validation_tokens,
    )
    from localopt_plugin.training.convert import load_trained_model
    from localopt_plugin.training.distributed import init_distributed

    init_distributed(seed=args.seed)
    model, meta = load_trained_model(args.checkpoint, args.tag)
    batches = list(validation_tokens(meta, args.data_path, args.micro_batch_size,
                                     args.num_samples, args.seed))
    vocab, layout = Vocabulary(**meta["vocabulary"]), SampleLayout(**meta["layout"])
    result = nll_per_position(model, layout, batches)
    if args.condition_check:
        result["null_condition"] = condition_check(model, vocab, layout, batches,
                                                   result["mean_nll"])
    result = {"checkpoint": str(args.checkpoint), "iteration": meta.get("iteration"),
              "objective": meta["config"].get("objective"),
              "data": args.data_path or f"validation split of {meta['config'].get('dataset')}",
              **result}
    _write(result, args.out)
    if args.plot:
        label = f"{result['objective']} (iter {result['iteration']})"
        plot_curves({label: result["per_frame_nll"]}, args.plot)


def _plot(args: argparse.Namespace) -> None:
    from localopt_plugin.evaluation.nll import plot_curves

    labels = args.labels or [Path(r).stem for r in args.results]
    if len(labels) != len(args.results):
        raise SystemExit("error: --labels needs one label per result file")
    curves = {label: json.loads(Path(r).read_text())["per_frame_nll"]
              for label, r in zip(labels, args.results, strict=True)}
    plot_curves(curves, args.out)


def _flow(args: argparse.Namespace) -> None:
    from localopt_plugin.evaluation.flow import warping_errors
    from localopt_plugin.video.io import read_video

    per_video = {}
    for path in video_files(args.videos):
        errors = warping_errors(read_video(path))
        per_video[str(path)] = {"mean": float(np.mean(errors)), "per_pair": errors}
    means = [v["mean"] for v in per_video.values()]
    _write({"metric": "flow warping error (mean abs, [0, 1] intensities; lower is smoother)",
            "mean": float(np.mean(means)), "num_videos": len(means), "videos": per_video},
           args.out)


def _fvd(args: argparse.Namespace) -> None:
    from localopt_plugin.evaluation.fvd import fvd, load_i3d
    from localopt_plugin.video.io import read_video

    try:
        detector = load_i3d(args.i3d)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None

    def clips(paths: Sequence[str]) -> list[np.ndarray]:
        videos = [read_video(p, max_frames=args.num_frames) for p in video_files(paths)]
        short = [len(v) for v in videos if len(v) < args.num_frames]
        if short:
            raise SystemExit(f"error: {len(short)} clips have fewer than --num-frames "
                             f"{args.num_frames} frames (e.g. {short[0]})")
        return videos

    real, generated = clips(args.real), clips(args.generated)
    value = fvd(detector, real, generated, args.batch_size)
    _write({"fvd": value, "num_real": len(real), "num_generated": len(generated),
            "num_frames": args.num_frames, "i3d": str(args.i3d)}, args.out)


def labels_from_names(files: Sequence[Path]) -> list[int]:
    """Conditioning classes from ``classNN_*`` file names (localopt-generate's naming)."""
    labels = []
    for path in files:
        match = re.match(r"class(\d+)_", path.name)
        if not match:
            raise SystemExit(f"error: {path.name} is not named classNN_*: pass --labels")
        labels.append(int(match.group(1)))
    return labels


def _classes(args: argparse.Namespace) -> None:
    from localopt_plugin.evaluation.classifier import class_report
    from localopt_plugin.video.io import read_video

    files = video_files(args.videos)
    labels = args.labels if args.labels is not None else labels_from_names(files)
    if len(labels) != len(files):
        raise SystemExit(f"error: {len(labels)} --labels for {len(files)} videos")
    videos = [read_video(f) for f in files]
    if len({v.shape for v in videos}) != 1:
        raise SystemExit("error: the videos differ in frames or size: "
                         f"{sorted({v.shape for v in videos})}")
    result = class_report(np.stack(videos), np.asarray(labels), background=args.background,
                          real_count=args.real_count, tokenizer=args.tokenizer,
                          weights=args.weights)
    result["videos"] = {str(f): int(label) for f, label in zip(files, labels, strict=True)}
    _write(result, args.out)


def _recall(args: argparse.Namespace) -> None:
    from localopt_plugin.data.recall import RecallSetting
    from localopt_plugin.evaluation.recall import evaluate_checkpoint
    from localopt_plugin.training.distributed import init_distributed

    init_distributed(seed=args.seed)
    result = evaluate_checkpoint(
        args.checkpoint, RecallSetting.parse(args.setting), count=args.count,
        first_seed=args.first_seed, per_class=args.per_class,
        reference_count=args.reference_count, temperature=args.temperature, top_k=args.top_k,
        seed=args.seed, mode=args.mode, chunk_frames=args.chunk_frames,
        context_frames=args.context_frames)
    _write(result, args.out)


def _recall_tokens(args: argparse.Namespace) -> None:
    from localopt_plugin.evaluation.recall_tokens import score_checkpoints
    from localopt_plugin.training.distributed import init_distributed

    init_distributed(seed=0)
    _write({"checkpoints": score_checkpoints(args.checkpoint, args.every_checkpoint,
                                             args.split)}, args.out)


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    commands = {"nll": _nll, "plot": _plot, "flow": _flow, "fvd": _fvd, "classes": _classes,
                "recall": _recall, "recall-tokens": _recall_tokens}
    commands[args.command](args)
    return 0



def main(argv: Sequence[str] | None = None) -> int:
    from localopt_plugin.commands import exit_on_user_error

    return exit_on_user_error(lambda: _main(argv))

if __name__ == "__main__":
    raise SystemExit(main())
