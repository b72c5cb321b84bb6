"""Nearest neighbours between binary patient vectors, in row batches (no n x m matrix in memory).

Distance is Jaccard on code-presence vectors: 1 - |a & b| / |a | b|. The intersections of a
batch of query rows with every reference row are one sparse matrix product; only the batch's
`[batch, m]` block is ever dense, so tens of thousands of patients fit in a few hundred MB.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm


def jaccard_block(a: sp.csr_matrix, b: sp.csr_matrix, a_sizes: np.ndarray, b_sizes: np.ndarray) -> np.ndarray:
    """Dense Jaccard distances `[len(a), len(b)]` (two empty vectors are at distance 0)."""
    inter = np.asarray((a @ b.T).toarray(), dtype=np.float32)
    union = a_sizes[:, None] + b_sizes[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 - inter / union
    d[union == 0] = 0.0
    return d


def nearest(
    queries: sp.csr_matrix,
    reference: sp.csr_matrix,
    batch_size: int = 512,
    exclude_self: bool = False,
    k: int = 1,
    desc: str | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Distance and index of the `k` nearest reference rows of each query row, batch by batch.

    `exclude_self` (queries and reference are the same set) skips each row's own index, the
    leave-one-out distance that adversarial accuracy needs. Ties go to the lowest index, so
    results are deterministic. Returns float32 `[n, k]` distances and int64 `[n, k]` indices
    (squeezed to `[n]` when k == 1).
    """
    queries, reference = sp.csr_matrix(queries, dtype=np.float32), sp.csr_matrix(reference, dtype=np.float32)
    q_sizes = np.asarray(queries.sum(axis=1)).ravel().astype(np.float32)
    r_sizes = np.asarray(reference.sum(axis=1)).ravel().astype(np.float32)
    n, m = queries.shape[0], reference.shape[0]
    k_eff = min(k, m - 1 if exclude_self else m)
    if k_eff < 1:
        raise ValueError(f"need at least {k + int(exclude_self)} reference rows, got {m}")
    dist = np.empty((n, k_eff), dtype=np.float32)
    idx = np.empty((n, k_eff), dtype=np.int64)
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc=desc or "nearest neighbours", disable=not progress or len(starts) < 2, leave=False):
        e = min(s + batch_size, n)
        block = jaccard_block(queries[s:e], reference, q_sizes[s:e], r_sizes)
        if exclude_self:
            block[np.arange(e - s), np.arange(s, e)] = np.inf
        top = _smallest(block, k_eff)
        idx[s:e], dist[s:e] = top, np.take_along_axis(block, top, axis=1)
    return (dist[:, 0], idx[:, 0]) if k == 1 else (dist, idx)


def _smallest(block: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest entries per row, ordered, ties broken by the lower index."""
    if k == 1:
        return np.argmin(block, axis=1)[:, None]  # argmin returns the first minimum
    part = np.argpartition(block, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(block, part, axis=1)
    order = np.lexsort((part, vals), axis=1)
    return np.take_along_axis(part, order, axis=1)
