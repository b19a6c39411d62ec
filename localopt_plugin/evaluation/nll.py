"""Full-sequence NLL per latent frame position, teacher-forced.

Why per frame: Local Optimization trains each window with only detached context, so whether
late frames are predicted as well as early ones is a question; the curve answers it for any
objective on the same validation data, and curves of several checkpoints can be overlaid.
What it cannot show: every frame is predicted from the real frames before it, so errors never
feed back as they do in generation (error accumulation), and a fact worth a few nats (a colour
seen long before) is lost among thousands; ``localopt_plugin.evaluation.recall`` measures
those on generated videos.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from localopt_plugin.data.inputs import null_condition
from localopt_plugin.data.layout import SampleLayout, Vocabulary
from localopt_plugin.errors import UserError
from localopt_plugin.evaluation.segments import LATENT_FRAMES, LATENT_STRIDE, segments
from localopt_plugin.model import forward_hidden, token_losses


@torch.no_grad()
def nll_per_position(model, layout: SampleLayout, batches: Iterable[torch.Tensor]) -> dict:
    """Mean next-token cross-entropy (nats) of every video token position and latent frame,
    and of each 17-frame segment (5 latent frames) of a longer video.

    ``batches`` yields full samples ``[b, seq_length]``; the forward is the ordinary causal one
    over the whole sequence, as in full-sequence training and the paper's inference.
    """
    start, end = layout.label_span(0, layout.num_frames)
    device = next(model.parameters()).device
    total = torch.zeros(end - start, dtype=torch.float64)
    samples = 0
    for tokens in batches:
        tokens = tokens.to(device)
        hidden = forward_hidden(model, tokens[:, :end], torch.arange(end, device=device))
        losses = token_losses(model, hidden[start:], tokens[:, start + 1:end + 1])
        total += losses.double().sum(0).cpu()
        samples += tokens.shape[0]
    if not samples:
        raise ValueError("no validation samples")
    per_position = total / samples
    per_frame = per_position.reshape(layout.num_frames, layout.frame_tokens).mean(1)
    return {"num_samples": samples, "mean_nll": per_position.mean().item(),
            "per_frame_nll": per_frame.tolist(),
            "per_segment_nll": [{"latent_frames": [s, e], "nll": per_frame[s:e].mean().item()}
                                for s, e in segments(layout.num_frames, LATENT_FRAMES,
                                                     LATENT_STRIDE)],
            "per_position_nll": per_position.tolist()}


def with_null_condition(tokens: torch.Tensor, vocab: Vocabulary,
                        layout: SampleLayout) -> torch.Tensor:
    """``tokens`` ``[b, seq_length]`` with every sample's condition replaced by the null one."""
    out = tokens.clone()
    out[:, 1:layout.video_start - 1] = torch.from_numpy(null_condition(vocab, layout))
    return out


def condition_check(model, vocab: Vocabulary, layout: SampleLayout,
                    batches: list[torch.Tensor], mean_nll: float) -> dict:
    """Does the model use its condition? The same videos' NLL with the null condition, beside
    their ``mean_nll`` with their own (:func:`nll_per_position` of ``batches``).

    ``condition_nats_per_video`` is what the condition saves on a whole video (summed over its
    tokens): near 0 for a model that ignores it, whatever sampling settings are used; a label
    of C classes carries at most log C nats about a video.
    """
    null = nll_per_position(model, layout, [with_null_condition(b, vocab, layout)
                                             for b in batches])
    gain = (null["mean_nll"] - mean_nll) * layout.num_frames * layout.frame_tokens
    return {"mean_nll": null["mean_nll"], "per_frame_nll": null["per_frame_nll"],
            "condition_nats_per_video": gain}


def validation_tokens(meta: dict, data_path: list[str] | None, micro_batch_size: int,
                      num_samples: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """``num_samples`` samples (whole batches) of validation data for a checkpoint.

    With ``data_path``: those ``video-wds`` shards (true conditions, no null-condition drops).
    Without: the validation split of the dataset the checkpoint was trained on.
    """
    from localopt_plugin import registry
    from localopt_plugin.data.wds import VideoWdsConfig
    from localopt_plugin.training.config import dataset_from_saved, seed_from_saved

    name, config = dataset_from_saved(meta["config"])
    if data_path:
        base = config if name == "video-wds" else VideoWdsConfig()
        config = dataclasses.replace(base, data_path=tuple(data_path), valid_data_path=None,
                                     null_condition_prob=0.0, num_workers=0)
        name = "video-wds"
    source = registry.build("dataset", name, config, seed=seed_from_saved(meta["config"]))
    if (source.vocab != Vocabulary(**meta["vocabulary"])
            or source.layout != SampleLayout(**meta["layout"])):
        raise UserError(f"the evaluation data ({source.vocab}, {source.layout}) does "
                         f"not match the checkpoint's vocabulary and layout")
    stream = source.train if data_path else source.valid
    if stream is None:
        raise UserError(f"dataset {name} of the checkpoint has no validation "
                         f"split; pass --data-path")
    batches = stream.batches(micro_batch_size, 0, 1, seed)
    count = -(-num_samples // micro_batch_size)
    return (batch["tokens"] for batch in itertools.islice(batches, count))


def plot_curves(curves: dict[str, list[float]], path: str, title: str = "") -> str:
    """Per-frame NLL curves (one line per label) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, values in curves.items():
        ax.plot(np.arange(len(values)), values, marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("latent frame index")
    ax.set_ylabel("NLL per token (nats)")
    ax.set_title(title or "full-sequence NLL per frame position")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
