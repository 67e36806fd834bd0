"""Deterministic training batches streamed from Parquet patch shards.

The batch of step ``s`` is a pure function of (seed, s): each epoch visits this worker's
shards in a seeded order and its rows in a seeded order within each shard, so at most two
shards are held in memory and a resumed run continues with exactly the batches it would
have seen. Random flips and crops are drawn from a generator seeded by (seed, step).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from fusion.data.shards import decode_patches, shard_paths
from fusion.errors import FusionError


class PatchStream:
    def __init__(self, folder: str | Path, split: str, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, crop: int = 0) -> None:
        shards = shard_paths(folder, split)
        if not shards:
            raise FusionError(f"{folder}: no {split} patch shards (run `fusion prepare` first)")
        self.batch_size, self.seed, self.crop = batch_size, seed, crop
        if len(shards) >= world:  # each worker reads only its own shards
            self.shards = shards[rank::world]
            self.rows = [np.arange(pq.ParquetFile(p).metadata.num_rows) for p in self.shards]
        else:  # fewer shards than workers: split the rows of every shard
            self.shards = shards
            self.rows = [np.arange(pq.ParquetFile(p).metadata.num_rows)[rank::world]
                         for p in shards]
        total = sum(len(r) for r in self.rows)
        if total < batch_size:
            raise FusionError(f"{folder}: {total} {split} patches for worker {rank}, fewer than "
                              f"one batch of {batch_size}")
        self.steps_per_epoch = total // batch_size
        self._epoch_order: tuple[int, np.ndarray] | None = None
        self._tables: dict[int, object] = {}
        with pq.ParquetFile(self.shards[0]) as f:
            self.patch_size = int(f.schema_arrow.metadata[b"patch_size"])

    def _order(self, epoch: int) -> np.ndarray:
        """(shard, row) pairs of one epoch, shard-major."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            parts = [np.stack([np.full(len(self.rows[s]), s), rng.permutation(self.rows[s])], 1)
                     for s in rng.permutation(len(self.shards))]
            self._epoch_order = (epoch, np.concatenate(parts))
        return self._epoch_order[1]

    def _table(self, shard: int):
        if shard not in self._tables:
            if len(self._tables) >= 2:
                self._tables.pop(next(iter(self._tables)))
            self._tables[shard] = pq.read_table(self.shards[shard],
                                                columns=["a", "b", "a_bits", "b_bits"])
        return self._tables[shard]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) float32 tensors (N, 1, P, P) in [0, 1] for training step ``step``."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        picks = self._order(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]
        a_parts, b_parts = [], []
        for shard in dict.fromkeys(picks[:, 0].tolist()):
            rows = picks[picks[:, 0] == shard, 1]
            t = self._table(shard).take(rows)
            a_parts.append(decode_patches(t.column("a").combine_chunks(),
                                   t.column("a_bits").combine_chunks(), self.patch_size))
            b_parts.append(decode_patches(t.column("b").combine_chunks(),
                                   t.column("b_bits").combine_chunks(), self.patch_size))
        a = torch.from_numpy(np.concatenate(a_parts)).unsqueeze(1)
        b = torch.from_numpy(np.concatenate(b_parts)).unsqueeze(1)
        return self._augment(a, b, step)

    def _augment(self, a: torch.Tensor, b: torch.Tensor, step: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        flips = torch.rand(a.shape[0], 2, generator=gen) < 0.5
        out_a, out_b = [], []
        size = self.crop if 0 < self.crop < self.patch_size else self.patch_size
        offsets = torch.randint(0, self.patch_size - size + 1, (a.shape[0], 2), generator=gen)
        for i in range(a.shape[0]):
            dims = [d for d, f in zip((-1, -2), flips[i].tolist(), strict=True) if f]
            y, x = offsets[i].tolist()
            pa, pb = a[i, :, y:y + size, x:x + size], b[i, :, y:y + size, x:x + size]
            out_a.append(pa.flip(dims) if dims else pa)
            out_b.append(pb.flip(dims) if dims else pb)
        return torch.stack(out_a), torch.stack(out_b)
