"""Stage 1, the shard list: ``--data-path`` specs -> blend components -> each slot's shards.

A spec is a shard path, a brace range (``train-{000000..000099}.tar``) or a glob
(``'shards/*.tar'``, quoted so the shell leaves it alone); a weighted blend is Megatron's
``w1 spec1 w2 spec2 ...``. Every shard must be listed in the ``manifest.json`` beside it.
Per component and epoch the shard list is shuffled with ``(seed, component, epoch)`` and split
like webdataset's ``split_by_node`` then ``split_by_worker`` (``shards[rank::R][worker::W]``,
with the trainer's data-parallel rank, not the global rank those read from the environment).
"""

from __future__ import annotations

import glob
import itertools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import braceexpand
import numpy as np

from localopt_plugin.data.manifest import MANIFEST_NAME, Manifest, load_manifest
from localopt_plugin.errors import UserError

# Tags separating the seeded generators of one run.
SHARD_ORDER, SAMPLE_ORDER, TOP_UP, DRAWS = range(4)


def derived_seed(*parts: int) -> int:
    """One generator seed from several integers (the run seed, a tag, indices)."""
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


@dataclass(frozen=True)
class BlendComponent:
    """One dataset of a blend: its shards and its weight."""

    spec: str
    weight: float
    shards: tuple[Shard, ...]

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)


def parse_blend(paths: list[str]) -> list[tuple[float, list[str]]]:
    """Megatron-style ``[w1 spec1 w2 spec2 ...]``, or unweighted specs forming one dataset."""
    try:
        float(paths[0])
    except ValueError:
        return [(1.0, list(paths))]
    if len(paths) % 2:
        raise UserError(f"a weighted --data-path needs weight/path pairs, got {paths}")
    blend = []
    for weight, spec in zip(paths[::2], paths[1::2], strict=True):
        try:
            w = float(weight)
        except ValueError:
            raise UserError(f"blend weight {weight!r} is not a number") from None
        if not w > 0:
            raise UserError(f"blend weight {weight} of {spec} must be positive")
        blend.append((w, [spec]))
    return blend


def expand(spec: str) -> list[str]:
    """Shard paths of a spec: brace ranges, then globs (sorted); a glob must match."""
    urls = []
    for url in braceexpand.braceexpand(spec):
        if glob.has_magic(url):
            matched = sorted(glob.glob(url))
            if not matched:
                raise UserError(f"--data-path pattern {url} matches no file")
            urls.extend(matched)
        else:
            urls.append(url)
    return urls


def resolve_components(paths: list[str]) -> tuple[list[BlendComponent], list[Manifest]]:
    """Expand every spec and look each shard up in the manifest next to it."""
    manifests: dict[str, Manifest] = {}
    components = []
    for weight, specs in parse_blend(paths):
        shards = []
        for url in (u for spec in specs for u in expand(spec)):
            directory = os.path.dirname(os.path.abspath(url))
            if directory not in manifests:
                manifests[directory] = load_manifest(os.path.join(directory, MANIFEST_NAME))
            manifest = manifests[directory]
            name = os.path.basename(url)
            if name not in manifest.shards:
                raise UserError(f"shard {url} is not listed in {manifest.path}")
            if not os.path.exists(url):
                raise UserError(f"shard {url} does not exist")
            shards.append(Shard(url, manifest.shards[name]))
        component = BlendComponent(" ".join(specs), weight, tuple(shards))
        if component.num_samples == 0:
            raise UserError(f"--data-path {component.spec} holds no samples")
        components.append(component)
    return components, list(manifests.values())


def slot_shards(component: BlendComponent, index: int, epoch: int, seed: int, rank: int,
                dp_size: int, worker: int, num_workers: int) -> Iterator[Shard]:
    """The shards slot ``(rank, worker)`` reads of component ``index`` in ``epoch``."""
    order = list(component.shards)
    random.Random(derived_seed(seed, SHARD_ORDER, index, epoch)).shuffle(order)
    return itertools.islice(itertools.islice(order, rank, None, dp_size),
                            worker, None, num_workers)
