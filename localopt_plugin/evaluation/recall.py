"""Long-range recall on the procedural recall variant: does the reappearing object keep its
colour?

Why: teacher-forced NLL always conditions on the real clip and a colour is worth a few nats in
thousands, so neither can show a model that forgets what it saw before its training window. Here
the object's colour shows only in the first segment and must be recalled after it was hidden
for longer than a window (``localopt_plugin.data.recall``). Measured three ways:

* **pixels**: in decoded frames, the object is the pixels far from the flat ground; its colour
  is their median, named by the nearest palette colour. A clip recalls when the object hides
  (shows in at most a quarter of the hidden frames) and is then there in the colour it had
  before (:func:`recall_scores`, any videos: real ones score ~1, colour-swapped ones 0, ones that
  never hide 0; chance for a model that hides is ``1 / colours``);
* **prompted generation**: the real first segment of held-out clips as the prompt, the rest
  sampled (:func:`prompted_videos`): recall against the true colour;
* **cue worth** (:func:`cue_worth`): teacher-forced NLL of the reappearance frames after the
  clip's own first segment, against after the same clip's first segment in another colour;
  zero for a model that does not use the cue, growing with how surely it recalls.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from localopt_plugin.data.inputs import InputBuilder
from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.data.procedural import NUM_CLASSES, PLAIN_GROUND
from localopt_plugin.data.recall import (
    PALETTE,
    RecallClip,
    RecallSetting,
    recall_clip,
    render_recall_clip,
)
from localopt_plugin.errors import UserError
from localopt_plugin.evaluation.segments import segments
from localopt_plugin.model import forward_hidden, token_losses

OBJECT_DISTANCE = 0.3  # RGB distance (in [0, 1] units) from the ground that counts as object
MIN_OBJECT_PIXELS = 0.01  # share of a frame's pixels that makes the object present
HIDDEN_PRESENCE = 0.25  # a clip hides the object when it shows in at most this share of the
# hidden frames (real clips through the tokenizer: the first one, where the codec's temporal
# compression blurs the vanishing)


def object_colours(frames: np.ndarray, colours: int) -> np.ndarray:
    """Per frame of uint8 ``[T, H, W, 3]``: the palette index of the object, -1 where none."""
    rgb = frames.astype(np.float64) / 255
    mask = np.linalg.norm(rgb - np.asarray(PLAIN_GROUND), axis=-1) > OBJECT_DISTANCE
    out = np.full(len(frames), -1, dtype=np.int64)
    minimum = MIN_OBJECT_PIXELS * mask[0].size
    for t in range(len(frames)):
        if mask[t].sum() >= minimum:
            colour = np.median(rgb[t][mask[t]], axis=0)
            out[t] = int(np.argmin(np.linalg.norm(PALETTE[:colours] - colour, axis=-1)))
    return out


def _majority(colours: np.ndarray) -> int:
    """The most frequent palette index among frames with an object (-1: none has one)."""
    seen = colours[colours >= 0]
    return int(np.bincount(seen).argmax()) if seen.size else -1


def clip_recall(frames: np.ndarray, setting: RecallSetting, cue: int | None = None) -> dict:
    """One clip: its cue colour (``cue``, else the object's colour before the hiding), whether
    it hides the object, the colour after the hiding, and per frame the object's colour.

    It recalls when it hides the object and then shows it in the cue colour: a model that never
    hides it keeps the colour without remembering anything."""
    per_frame = object_colours(frames, setting.colours)
    cue = _majority(per_frame[:setting.hide_start]) if cue is None else cue
    after = _majority(per_frame[setting.hide_end:])
    hidden = per_frame[setting.hide_start:setting.hide_end]
    hid = bool(hidden.size == 0 or (hidden >= 0).mean() <= HIDDEN_PRESENCE)
    kept = bool(cue >= 0 and after == cue)
    return {"cue": cue, "after": after, "hid": hid, "colour kept": kept,
            "recalled": hid and kept, "per frame": per_frame}


def recall_scores(videos: list[np.ndarray] | np.ndarray, setting: RecallSetting,
                  cues: list[int] | None = None) -> dict:
    """Recall accuracy of videos (``cues``: their true colours; default: each video's own
    first part): the share that hide the object and show it again in the cue colour; apart,
    the share that hide it and the share whose colour after the hiding is the cue's; presence
    after the hiding; per 17-frame segment the share of frames showing the object and the share
    of those in the cue colour."""
    clips = [clip_recall(v, setting, None if cues is None else cues[i])
             for i, v in enumerate(videos)]
    frames = np.stack([c["per frame"] for c in clips])  # [N, T]
    cue = np.array([c["cue"] for c in clips])[:, None]
    after = frames[:, setting.hide_end:]
    result = {
        "videos": len(clips),
        "recall accuracy": float(np.mean([c["recalled"] for c in clips])),
        "hid the object": float(np.mean([c["hid"] for c in clips])),
        "colour kept after hiding": float(np.mean([c["colour kept"] for c in clips])),
        "presence after hiding": float((after >= 0).mean()) if after.size else float("nan"),
        "cue colours": cue[:, 0].tolist(),
        "colours after hiding": [c["after"] for c in clips],
        "hid per clip": [c["hid"] for c in clips],
    }
    spans = segments(frames.shape[1]) or [(0, frames.shape[1])]
    presence, agreement = [], []
    for start, end in spans:
        part = frames[:, start:end]
        present = part >= 0
        presence.append(float(present.mean()))
        agreement.append(float((part == cue)[present].mean()) if present.any()
                         else float("nan"))
    result["presence per segment"] = presence
    result["cue colour share per segment"] = agreement
    return result


def held_out_clips(setting: RecallSetting, count: int, first_seed: int, num_frames: int,
                   size: int) -> tuple[list[RecallClip], np.ndarray]:
    """``count`` clips of ``setting.split`` (clip ``i``: class ``i % 12``, seed
    ``first_seed + i``, as ``procedural-recall:count:first_seed`` lists them) and their
    pixels."""
    drawn = [recall_clip(i % NUM_CLASSES, first_seed + i, setting, num_frames, size)
             for i in range(count)]
    return [clip for clip, _ in drawn], np.stack([frames for _, frames in drawn])


def recoloured(clip: RecallClip, setting: RecallSetting) -> RecallClip:
    """The same clip in the next palette colour (the cue-worth and control counterpart)."""
    return RecallClip(clip.class_id, clip.side, clip.speed_pixels, clip.phase,
                      (clip.colour + 1) % setting.colours)


def latent_frame(frame: int, temporal_compression: int) -> int:
    """The latent frame that holds pixel frame ``frame`` (1 + k*c frames -> 1 + k latents)."""
    return 0 if frame == 0 else (frame + temporal_compression - 1) // temporal_compression


def hiding_latent_frames(setting: RecallSetting, num_frames: int,
                         temporal_compression: int) -> tuple[int, int]:
    """The latent frames before the hiding (the cue) and the first one after it; refuses a
    hiding that leaves none before or after it in ``num_frames`` frames."""
    cue_frames = latent_frame(setting.hide_start - 1, temporal_compression) + 1
    first_after = latent_frame(setting.hide_end, temporal_compression)
    latents = latent_frame(num_frames - 1, temporal_compression) + 1
    if not cue_frames < first_after < latents:
        raise UserError(f"recall hide={setting.hide_start}+{setting.hide_frames} leaves no latent "
                        f"frame before or after the hiding in {num_frames}-frame clips: end the "
                        f"hiding before frame {num_frames - temporal_compression} or use longer "
                        "clips")
    return cue_frames, first_after


@torch.no_grad()
def cue_worth(model, builder: InputBuilder, true_tokens: np.ndarray, other_tokens: np.ndarray,
              labels: list[int], first_frame: int, cue_frames: int,
              batch_size: int = 8) -> dict:
    """Teacher-forced NLL (nats per clip, summed) of latent frames ``first_frame..`` after the
    true first ``cue_frames`` latent frames and after ``other_tokens``' ones (the rest true);
    their difference is what the cue is worth to the model."""
    layout: SampleLayout = builder.layout
    swapped = true_tokens.copy()
    swapped[:, :cue_frames] = other_tokens[:, :cue_frames]
    start, end = layout.label_span(first_frame, layout.num_frames - first_frame)
    device = next(model.parameters()).device
    totals = []
    for tokens in (true_tokens, swapped):
        sums = []
        for i in range(0, len(tokens), batch_size):
            seq = torch.from_numpy(np.stack([builder(t, label, None) for t, label in zip(
                tokens[i:i + batch_size], labels[i:i + batch_size], strict=True)])).to(device)
            hidden = forward_hidden(model, seq[:, :end], torch.arange(end, device=device))
            losses = token_losses(model, hidden[start:], seq[:, start + 1:end + 1])
            sums.append(losses.double().sum(1).cpu())
        totals.append(torch.cat(sums))
    true_nll, swapped_nll = totals
    worth = swapped_nll - true_nll
    return {"cue worth (nats per clip)": float(worth.mean()),
            "cue worth per clip": worth.tolist(),
            "reappearance NLL (nats per token)": float(true_nll.mean()) / (end - start),
            "reappearance NLL with another cue (nats per token)":
                float(swapped_nll.mean()) / (end - start)}



def _encode(tokenizer, videos: np.ndarray) -> np.ndarray:
    """Latent token grids ``[N, F, h*w]`` of uint8 videos ``[N, T, H, W, 3]``."""
    grids = [tokenizer.encode(v) for v in videos]
    return np.stack([g.reshape(g.shape[0], -1) for g in grids])


def _flow_per_segment(videos: np.ndarray) -> list[float]:
    """Mean flow-warping error of the pairs inside each 17-frame segment."""
    from localopt_plugin.evaluation.flow import warping_errors

    errors = np.array([warping_errors(v) for v in videos])  # [N, T-1]
    spans = segments(videos.shape[1]) or [(0, videos.shape[1])]
    return [float(errors[:, start:end - 1].mean()) for start, end in spans]


def evaluate_checkpoint(checkpoint: str, setting: RecallSetting, count: int = 48,
                        first_seed: int = 500_000, per_class: int = 2, reference_count: int = 96,
                        temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                        mode: str = "full", chunk_frames: int | None = None,
                        context_frames: int | None = None, batch_size: int = 16) -> dict:
    """Every recall measure of one checkpoint trained on recall clips.

    ``count`` held-out clips of ``setting.split`` (seeds from ``first_seed``): cue worth
    (teacher-forced) and prompted recall (their real first segment, the rest sampled). Then
    ``per_class`` videos per class sampled from the class alone: their own recall, and per
    segment the object's presence and colour, the shipped classifier's class accuracy, the
    Frechet distance of its features to ``reference_count`` real clips of the reference split
    and flow-warping error; beside each, held-out real clips through the tokenizer (what a
    perfect model of the tokens would score; for the per-segment figures, clips of the valid
    split, so the Frechet floor never compares reference clips with themselves). Needs
    ``init_distributed()``.
    """
    from localopt_plugin.evaluation.classifier import class_accuracy, segment_report
    from localopt_plugin.generation.generate import class_conditions, load_context
    from localopt_plugin.generation.sampling import SamplingConfig, sample_video_tokens

    context = load_context(checkpoint)
    model, vocab, layout, tokenizer = (context.model, context.vocab, context.layout,
                                       context.tokenizer)
    if context.manifest is None or tokenizer is None:
        raise ValueError(f"{checkpoint} was not trained on video shards with a tokenizer")
    num_frames = context.manifest.source_frames
    size = max(context.manifest.source_resolution)
    cue_frames, first_after = hiding_latent_frames(setting, num_frames,
                                                   tokenizer.temporal_compression)
    builder = InputBuilder(vocab, layout)
    clips, real = held_out_clips(setting, count, first_seed, num_frames, size)
    other = np.stack([render_recall_clip(recoloured(c, setting), num_frames, size, setting)
                      for c in clips])
    true_tokens, other_tokens = _encode(tokenizer, real), _encode(tokenizer, other)
    labels = [c.class_id for c in clips]
    result: dict = {"checkpoint": checkpoint, "setting": setting.options(),
                    "frames": num_frames, "size": size, "held-out clips": count,
                    "first seed": first_seed, "cue latent frames": cue_frames,
                    "first latent frame after hiding": first_after,
                    "sampling": {"temperature": temperature, "top_k": top_k, "mode": mode,
                                 "chunk_frames": chunk_frames,
                                 "context_frames": context_frames, "seed": seed}}
    result.update(cue_worth(model, builder, true_tokens, other_tokens, labels, first_after,
                            cue_frames, batch_size))
    sampling = SamplingConfig(temperature=temperature, top_k=top_k)
    generator = torch.Generator().manual_seed(seed)

    def sample(conditions: torch.Tensor, prompt: torch.Tensor | None) -> list[np.ndarray]:
        out = []
        for i in range(0, len(conditions), batch_size):
            tokens = sample_video_tokens(
                model, vocab, layout, conditions[i:i + batch_size], layout.num_frames, sampling,
                generator, mode=mode, chunk_frames=chunk_frames, context_frames=context_frames,
                prompt=None if prompt is None else prompt[i:i + batch_size])
            h, w = context.latent_hw
            out += [tokenizer.decode(t.reshape(layout.num_frames, h, w).cpu().numpy())
                    for t in tokens]
        return out

    decoded_real = np.stack([tokenizer.decode(t.reshape(layout.num_frames, *context.latent_hw))
                             for t in true_tokens])
    prompt = torch.from_numpy(true_tokens[:, :cue_frames])
    prompted = sample(class_conditions(vocab, labels), prompt)
    cues = [c.colour for c in clips]
    result["prompted"] = recall_scores(prompted, setting, cues)
    result["real clips through the tokenizer"] = recall_scores(decoded_real, setting, cues)
    result["colour-swapped control"] = recall_scores(
        decoded_real, setting, [(c + 1) % setting.colours for c in cues])

    free_labels = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
    free = np.stack(sample(class_conditions(vocab, free_labels), None))
    _, reference = held_out_clips(dataclasses.replace(setting, split="reference"),
                                  reference_count, first_seed, num_frames, size)
    # the floor's real clips come from the valid split: never among the reference clips (the
    # prompts may be reference clips themselves)
    control_clips, control = held_out_clips(dataclasses.replace(setting, split="valid"),
                                            len(free), first_seed, num_frames, size)
    control = np.stack([tokenizer.decode(tokenizer.encode(clip)) for clip in control])
    real_scores = result["real clips through the tokenizer"]
    real_scores["class accuracy per segment"] = [
        class_accuracy(control[:, start:end], np.array([c.class_id for c in control_clips]),
                       part_frames=None)["accuracy"]
        for start, end in segments(num_frames) or [(0, num_frames)]]
    real_scores["flow warp error per segment"] = _flow_per_segment(control)
    free_scores = recall_scores(free, setting)
    free_scores["segments"] = segment_report(free, np.array(free_labels), reference, control)
    free_scores["flow warp error per segment"] = _flow_per_segment(free)
    result["free"] = free_scores
    return result
