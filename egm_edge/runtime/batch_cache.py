"""The KV cache of a batch of sequences that joined at different times (in-flight batching).

Layout: per past tensor one array [rows, kv_heads, capacity, head_dim]. Active sequences occupy rows
0..B-1 (a prefix, so `arrays[i][:B]` is contiguous and binds to the decoder as one tensor). All rows share
one column clock P: a sequence of length n holds its cache in columns P-n..P-1 (right-aligned), the columns
before are padding that the step's attention mask zeroes, and a decode step writes every row's new key and
value at column P. This is what the exported decoder already supports: padding is an additive bias from
`attention_mask`, left or right, and its GroupQueryAttention node can update a bound buffer in place.

- `add(rows)`: a prefilled sequence joins; a longer one than P shifts the others right.
- `remove(i)`: the last row moves into the freed one; the columns no row needs any more (common left
  padding) are dropped, so attention never spans more than the longest live sequence.
- Rows and capacity grow by doubling (one copy), never per step.
Pure numpy: the executor runs the step (`Executor.decode_batch(feeds, arrays, P)`).
"""

from __future__ import annotations

import numpy as np


class BatchCache:
    def __init__(self, n_tensors: int, kv_heads: int, head_dim: int, dtype=np.float32):
        self.n_tensors, self.kv_heads, self.head_dim = n_tensors, kv_heads, head_dim
        self.dtype = np.dtype(dtype)
        self.arrays: list[np.ndarray] = []
        self.lengths: list[int] = []  # cache rows of each active sequence, in row order
        self.P = 0  # the column the next step writes

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2] if self.arrays else 0

    def bytes_per_column(self) -> int:
        """Bytes one cached token of one row takes (all layers, keys and values)."""
        return self.n_tensors * self.kv_heads * self.head_dim * self.dtype.itemsize

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def _reserve(self, rows: int, columns: int) -> None:
        """Room for `rows` rows and `columns` columns (+1 for the next step), growing by doubling with one copy."""
        have_rows = self.arrays[0].shape[0] if self.arrays else 0
        if rows <= have_rows and columns + 1 <= self.capacity:
            return
        new_rows = max(rows, min(2 * have_rows, rows + 8)) if rows > have_rows else have_rows
        new_cols = max(columns + 1, 2 * self.capacity) if columns + 1 > self.capacity else self.capacity
        shape = (new_rows, self.kv_heads, new_cols, self.head_dim)
        grown = [np.zeros(shape, self.dtype) for _ in range(self.n_tensors)]
        for old, new in zip(self.arrays, grown):
            new[: self.rows, :, : self.P] = old[: self.rows, :, : self.P]
        self.arrays = grown

    def add(self, rows: list[np.ndarray]) -> int:
        """A sequence's prefilled cache ([kv, n, head_dim] per tensor) joins as the last row; returns its index."""
        n = rows[0].shape[1]
        shift = max(0, n - self.P)
        self._reserve(self.rows + 1, self.P + shift)
        if shift and self.rows:
            for a in self.arrays:  # numpy copies through a temporary where source and target overlap
                a[: self.rows, :, shift: self.P + shift] = a[: self.rows, :, : self.P]
        self.P += shift
        b = self.rows
        for a, r in zip(self.arrays, rows):
            a[b, :, self.P - n: self.P] = r
        self.lengths.append(n)
        return b

    def remove(self, i: int) -> None:
        """Drop row i: the last row takes its place (callers re-index), then unused left columns go."""
        last = self.rows - 1
        if i != last:
            for a in self.arrays:
                a[i, :, : self.P] = a[last, :, : self.P]
            self.lengths[i] = self.lengths[last]
        self.lengths.pop()
        if not self.lengths:
            self.P = 0
            return
        drop = self.P - max(self.lengths)
        if drop > 0:
            for a in self.arrays:
                a[: self.rows, :, : self.P - drop] = a[: self.rows, :, drop: self.P]
            self.P -= drop

    def prepare_step(self) -> np.ndarray:
        """Room for one more column; returns the step's attention mask [B, P+1] (1 = a real token)."""
        self._reserve(self.rows, self.P)
        cols = np.arange(self.P + 1)[None, :]
        start = self.P - np.asarray(self.lengths, np.int64)[:, None]
        return (cols >= start).astype(np.int64)

    def advance(self) -> None:
        """The step wrote column P for every row."""
        self.P += 1
        self.lengths = [n + 1 for n in self.lengths]

    def clear(self) -> None:
        self.lengths, self.P = [], 0
