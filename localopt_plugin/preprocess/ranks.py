"""Who am I among the preprocessing processes, and how rank 0 learns that the others are done.

Launchers, checked in this order:

* ``mpirun``/``srun --mpi`` (``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE`` or ``PMIX_RANK`` set):
  mpi4py's ``COMM_WORLD``; rank 0 gathers the per-rank statistics.
* torchrun (``RANK``/``WORLD_SIZE``) or SLURM (``SLURM_PROCID``/``SLURM_NTASKS``) without MPI:
  no communication library is needed. Each rank writes ``.preprocess/rank-<r>-of-<R>.json``
  when done; rank 0 waits until every rank's file (of this launch: ``TORCHELASTIC_RUN_ID`` or
  the SLURM job step, where set) and every shard's record exist (the output directory must be
  shared), giving up when nothing new appears for ``timeout`` seconds.
* otherwise a single process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from localopt_plugin.errors import UserError

_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    launcher: str  # "mpi", "torchrun", "slurm" or "single"
    comm: Any = None  # mpi4py communicator under MPI
    run_id: str = ""  # the launch's id, so rank 0 ignores done-files of earlier launches

    def _stats_path(self, state_dir: str, rank: int) -> str:
        return os.path.join(state_dir, f"rank-{rank:05d}-of-{self.world:05d}.json")

    def clear_stale(self, state_dir: str) -> None:
        """Drop this rank's done-file of an earlier run before working (file protocol)."""
        if self.comm is None and self.world > 1:
            path = self._stats_path(state_dir, self.rank)
            if os.path.exists(path):
                os.remove(path)

    def gather(self, stats: dict, state_dir: str, ready: Callable[[], int],
               timeout: float) -> list[dict] | None:
        """Every rank's ``stats`` on rank 0 (None elsewhere) once all ranks are done.

        ``ready()`` counts what is still missing on disk (shard records); rank 0 also waits
        for it to reach zero, which is what makes the merge safe under the file protocol.
        """
        if self.world == 1:
            return [stats]
        if self.comm is not None:
            return self.comm.gather(stats, root=0)
        tmp = self._stats_path(state_dir, self.rank) + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**stats, "run_id": self.run_id}, f)
        os.replace(tmp, self._stats_path(state_dir, self.rank))
        if self.rank != 0:
            return None
        paths = [self._stats_path(state_dir, r) for r in range(self.world)]
        last, progress = None, time.monotonic()
        while True:
            state = (sum(not self._current(p) for p in paths), ready())
            if state == (0, 0):
                break
            if state != last:
                last, progress = state, time.monotonic()
            elif time.monotonic() - progress > timeout:
                raise UserError(f"rank 0 waited {timeout:.0f} s with no progress for "
                                 f"{state[0]} rank(s) and {state[1]} shard(s) to finish")
            time.sleep(0.2)
        out = []
        for path in paths:
            with open(path) as f:
                out.append(json.load(f))
        return out

    def _current(self, path: str) -> bool:
        try:
            with open(path) as f:
                return json.load(f).get("run_id") == self.run_id
        except (OSError, json.JSONDecodeError):
            return False


def discover() -> Ranks:
    """This process's rank and the world size, from the launcher's environment."""
    if any(os.environ.get(v) for v in _MPI_VARS):
        from mpi4py import MPI  # only under mpirun: importing it needs the MPI library

        comm = MPI.COMM_WORLD
        return Ranks(comm.Get_rank(), comm.Get_size(), "mpi", comm)
    if os.environ.get("WORLD_SIZE") and os.environ.get("RANK"):
        return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "torchrun",
                     run_id=os.environ.get("TORCHELASTIC_RUN_ID", ""))
    if os.environ.get("SLURM_NTASKS") and os.environ.get("SLURM_PROCID"):
        step = f"{os.environ.get('SLURM_JOB_ID', '')}.{os.environ.get('SLURM_STEP_ID', '')}"
        return Ranks(int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), "slurm",
                     run_id=step)
    return Ranks(0, 1, "single")
