"""Training batches from the Parquet patch shards, in a local folder or on S3.

Two readers, one contract: the batch of step ``s`` belongs to epoch ``s // steps_per_epoch``,
every epoch visits each of this worker's patches once, and flips and crops are drawn from
a generator seeded by (seed, step).

- ``PatchStream`` (single process, ``fusion train --local``): the epoch order is a seeded
  permutation, so the batch of a step is a pure function of (seed, step) and a resumed run
  sees exactly the batches it would have seen.
- ``ShardBatches`` (Ray Train workers): a shard of a Ray Data dataset read with
  ``ray.data.read_parquet`` (``TorchTrainer(datasets=...)``, split across the workers by
  Ray Data). Each epoch re-reads the shard, locally shuffled with a seed of (seed, epoch);
  a resumed run skips the batches of the current epoch it already trained on, so it ends
  at the same step count and no worker sees a patch twice in an epoch. Which patches go to
  which worker is decided by Ray Data's split at run time: reproducible with one worker,
  not bit for bit with several (docs: README, "Training input").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion.data.prepared import source
from fusion.data.shards import decode_patches
from fusion.errors import FusionError

COLUMNS = ["a", "b", "a_bits", "b_bits"]


def augment(a: torch.Tensor, b: torch.Tensor, seed: int, step: int, crop: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flips (and crop inside the patch) for both sources, seeded by step."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    flips = torch.rand(a.shape[0], 2, generator=gen) < 0.5
    patch = a.shape[-1]
    size = crop if 0 < crop < patch else patch
    offsets = torch.randint(0, patch - size + 1, (a.shape[0], 2), generator=gen)
    out_a, out_b = [], []
    for i in range(a.shape[0]):
        dims = [d for d, f in zip((-1, -2), flips[i].tolist(), strict=True) if f]
        y, x = offsets[i].tolist()
        pa, pb = a[i, :, y:y + size, x:x + size], b[i, :, y:y + size, x:x + size]
        out_a.append(pa.flip(dims) if dims else pa)
        out_b.append(pb.flip(dims) if dims else pb)
    return torch.stack(out_a), torch.stack(out_b)


def _tensors(table: Any, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(decode_patches(table[k], table[f"{k}_bits"], size))
                 .unsqueeze(1) for k in ("a", "b"))


class PatchStream:
    """Deterministic batches for one process: the batch of a step is a pure function of
    (seed, step); at most two shards are held in memory."""

    def __init__(self, data: str | Path, split: str, batch_size: int, seed: int,
                 crop: int = 0) -> None:
        import pyarrow.parquet as pq

        self.src = source(str(data))
        self.shards = self.src.files(split)
        self.batch_size, self.seed, self.crop = batch_size, seed, crop
        self.rows = [pq.ParquetFile(p).metadata.num_rows for p in self.shards]
        if sum(self.rows) < batch_size:
            raise FusionError(f"{data}: {sum(self.rows)} {split} patches, fewer than one "
                              f"batch of {batch_size}")
        self.steps_per_epoch = sum(self.rows) // batch_size
        self.patch_size = self.src.layout(split)[0]
        self._epoch_order: tuple[int, np.ndarray] | None = None
        self._tables: dict[int, Any] = {}

    def _order(self, epoch: int) -> np.ndarray:
        """(shard, row) pairs of one epoch, shard-major."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            parts = [np.stack([np.full(self.rows[s], s), rng.permutation(self.rows[s])], 1)
                     for s in rng.permutation(len(self.shards))]
            self._epoch_order = (epoch, np.concatenate(parts))
        return self._epoch_order[1]

    def _table(self, shard: int) -> Any:
        import pyarrow.parquet as pq

        if shard not in self._tables:
            if len(self._tables) >= 2:
                self._tables.pop(next(iter(self._tables)))
            self._tables[shard] = pq.read_table(self.shards[shard], columns=COLUMNS)
        return self._tables[shard]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) float32 tensors (N, 1, P, P) in [0, 1] for training step ``step``."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        picks = self._order(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]
        parts = []
        for shard in dict.fromkeys(picks[:, 0].tolist()):
            rows = picks[picks[:, 0] == shard, 1]
            table = self._table(shard).take(rows)
            parts.append(_tensors({k: table.column(k).to_pylist() for k in COLUMNS},
                                  self.patch_size))
        a = torch.cat([p[0] for p in parts])
        b = torch.cat([p[1] for p in parts])
        return augment(a, b, self.seed, step, self.crop)


class ShardBatches:
    """Batches of a Ray Train worker from its Ray Data shard (see the module docstring)."""

    def __init__(self, shard: Any, batch_size: int, seed: int, crop: int, patch_size: int,
                 rows: int, world: int) -> None:
        self.shard, self.batch_size, self.seed, self.crop = shard, batch_size, seed, crop
        self.patch_size = patch_size
        self.steps_per_epoch = rows // world // batch_size  # Ray Data splits rows equally
        if self.steps_per_epoch < 1:
            raise FusionError(f"{rows} training patches for {world} worker(s): fewer than one "
                              f"batch of {batch_size} each")
        self._epoch = -1
        self._iter: Any = None
        self.seen = 0  # batches read from the shard (the resume skips are counted too)

    def _start(self, epoch: int) -> None:
        if self._iter is not None:  # finish the last epoch's pass (the partial batch left)
            for _ in self._iter:
                pass
        self._epoch = epoch
        self._iter = iter(self.shard.iter_batches(
            batch_size=self.batch_size, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=4 * self.batch_size,
            local_shuffle_seed=self.seed * 1000 + epoch))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._start(epoch)
            for _ in range(pos):  # resumed mid-epoch: skip what was trained on
                next(self._iter)
                self.seen += 1
        try:
            rows = next(self._iter)
        except StopIteration as exc:  # the split gave fewer rows than planned
            raise FusionError(f"epoch {epoch} ended after {pos} batches, "
                              f"{self.steps_per_epoch} were planned") from exc
        self.seen += 1
        a, b = _tensors(rows, self.patch_size)
        return augment(a, b, self.seed, step, self.crop)
