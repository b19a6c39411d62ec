"""Frechet Video Distance from the features of a local TorchScript I3D.

Conventions follow StyleGAN-V's FVD (``src/metrics/frechet_video_distance.py`` and
``metric_utils.py`` of universome/stylegan-v), so numbers are comparable with papers that use
it: the detector is its TorchScript port of the TF-Hub I3D (``i3d_torchscript.pt``), fed
``[B, 3, T, H, W]`` clips and asked for the raw features before the softmax
(``return_features=True``); clips are resized to 224x224 (trilinear, ``T`` kept) and scaled
from [0, 255] to [-1, 1]. StyleGAN-V lets the detector do both (``rescale=True,
resize=True``); both are linear, so doing them here first and passing ``False`` gives the same
input while keeping the step visible and testable. Statistics are the mean and the population
covariance (divided by N), and the distance is
``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))`` (real part).

No weights can be downloaded here: pass the file with ``--i3d``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

I3D_SIZE = 224
I3D_HINT = ("StyleGAN-V's TorchScript I3D (i3d_torchscript.pt, linked from its "
            "src/metrics/frechet_video_distance.py)")


def load_i3d(path: str) -> torch.jit.ScriptModule:
    """The TorchScript feature extractor; a clear error when the file is missing."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"I3D TorchScript file {path!r} not found: FVD needs a local "
                                f"copy of {I3D_HINT}, passed with --i3d")
    return torch.jit.load(path, map_location="cpu").eval()


def preprocess(videos: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, T, H, W, 3]`` -> float ``[B, 3, T, 224, 224]`` in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(videos)).permute(0, 4, 1, 2, 3).float()
    x = F.interpolate(x, size=(x.shape[2], I3D_SIZE, I3D_SIZE), mode="trilinear",
                      align_corners=False)
    return x / 127.5 - 1.0


@torch.no_grad()
def i3d_features(detector, videos: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
    """Features ``[N, D]`` (float64) of uint8 clips ``[T, H, W, 3]`` of equal length."""
    if len({v.shape[0] for v in videos}) != 1:
        raise ValueError("FVD clips must all have the same number of frames (--num-frames)")
    out = []
    for start in range(0, len(videos), batch_size):
        batch = preprocess(np.stack([np.asarray(v) for v in videos[start:start + batch_size]]))
        out.append(detector(batch, rescale=False, resize=False, return_features=True))
    return torch.cat(out).double().numpy()


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population covariance (StyleGAN-V's ``FeatureStats.get_mean_cov``)."""
    features = np.asarray(features, dtype=np.float64)
    mean = features.mean(0)
    return mean, features.T @ features / len(features) - np.outer(mean, mean)


def frechet_distance(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray,
                     sigma_b: np.ndarray) -> float:
    """Frechet distance between the Gaussians ``N(mu_a, sigma_a)`` and ``N(mu_b, sigma_b)``."""
    import scipy.linalg

    mean_term = np.square(mu_a - mu_b).sum()
    root = scipy.linalg.sqrtm(sigma_a @ sigma_b)  # may be complex from round-off
    return float(np.real(mean_term + np.trace(sigma_a + sigma_b - 2 * root)))


def fvd(detector, videos_a: Sequence[np.ndarray], videos_b: Sequence[np.ndarray],
        batch_size: int = 8) -> float:
    """FVD between two sets of uint8 clips ``[T, H, W, 3]`` (every clip the same length)."""
    if len(videos_a) < 2 or len(videos_b) < 2:
        raise ValueError("FVD needs at least two clips per set")
    stats_a = feature_stats(i3d_features(detector, videos_a, batch_size))
    stats_b = feature_stats(i3d_features(detector, videos_b, batch_size))
    return frechet_distance(*stats_a, *stats_b)
