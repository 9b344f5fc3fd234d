"""The corpus: plain text from a Debian package, byte-level tokens.

Default: the English fortune-cookie files of Debian's `fortunes` package
(/usr/share/games/fortunes: ~2.5 MB of quotations, literature, jokes, definitions), every
regular file except the strfile indexes (*.dat). Any directory or file of UTF-8 text works
(--corpus PATH). The first 95% of the bytes train, the last 5% validate."""
import os

import numpy as np
import torch

DEFAULT_CORPUS = "/usr/share/games/fortunes"


def read_corpus(path=DEFAULT_CORPUS) -> np.ndarray:
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path)
            if not f.endswith(".dat") and not os.path.islink(os.path.join(path, f))
            and os.path.isfile(os.path.join(path, f)))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(
            f"corpus {path!r} not found (install Debian's 'fortunes' package, or pass --corpus)")
    chunks = []
    for f in files:
        with open(f, "rb") as fh:
            chunks.append(fh.read())
    data = np.frombuffer(b"\n".join(chunks), dtype=np.uint8)
    if data.size < 10_000:
        raise ValueError(f"corpus {path!r} holds only {data.size} bytes")
    return data


class Batches:
    """Random windows of the corpus. Batch (rank, step) is the same for every optimizer, so
    Celo2 and the AdamW baseline see identical data."""

    def __init__(self, data: np.ndarray, context: int, batch: int, seed: int, split=0.95):
        cut = int(data.size * split)
        self.train = torch.from_numpy(data[:cut].astype(np.int64))
        self.val = torch.from_numpy(data[cut:].astype(np.int64))
        self.context, self.batch, self.seed = context, batch, seed

    def _take(self, src, g, n):
        starts = torch.randint(0, src.numel() - self.context - 1, (n,), generator=g)
        x = torch.stack([src[s:s + self.context] for s in starts.tolist()])
        y = torch.stack([src[s + 1:s + 1 + self.context] for s in starts.tolist()])
        return x, y

    def train_batch(self, rank: int, step: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + rank)
        return self._take(self.train, g, self.batch)

    def val_batches(self, rank: int, world: int, count: int):
        """`count` fixed validation batches split over the ranks."""
        out = []
        for i in range(rank, count, world):
            g = torch.Generator().manual_seed(7_777_777 + i)
            out.append(self._take(self.val, g, self.batch))
        return out
