"""splitmix64 on numpy arrays: the one home of the 64-bit mixer that fingerprints and thins data.

Callers: `probe.cohort.thin_training_labels` and `tasks.finetune` (`unit_hash`: a uniform number per
(subject, time) pair); `sequence_hashes` (a token sequence's fingerprint), the one definition of "the same
record" for evaluate's exact-copy rate (`eval.patients.sequence_hashes`) and generate's
`drop_train_copies` (`generate.copies`).
The sampler's `sampling/draws.py` runs the same mixer on torch tensors, which have no uint64
arithmetic: it uses these constants as signed int64 with a logical right shift.

Values are fixed: thinning and the exact-copy rate of the evaluation depend on them, so a change is a
change of results (the doctests pin a few).
"""

from __future__ import annotations

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment (2**64 / golden ratio)
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (multiplication wraps modulo 2**64).

    >>> hex(int(mix64(np.array([0x9E3779B97F4A7C15], np.uint64))[0]))
    '0xe220a8397b1dcdaf'
    """
    with np.errstate(over="ignore"):
        x = np.asarray(x, np.uint64)
        for shift, mult in ((30, MIX1), (27, MIX2)):
            x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
        return x ^ (x >> np.uint64(31))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output for state `x` (uint64): `mix64(x + GOLDEN)`.

    >>> [hex(int(v)) for v in splitmix64(np.array([0, 1, 2**63, 2**64 - 1], np.uint64))]
    ['0xe220a8397b1dcdaf', '0x910a2dec89025cc1', '0x481ec0a212a9f3db', '0xe4d971771b652c20']
    """
    with np.errstate(over="ignore"):
        return mix64(np.asarray(x, np.uint64) + np.uint64(GOLDEN))


def unit_hash(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per (a, b) pair of int64s (`mix64` of `a * GOLDEN ^ b`), the same everywhere.

    >>> unit_hash(np.array([0, 1, 42, -7]), np.array([0, 0, 1_600_000_000, -2_000_000_000])).tolist()
    [0.0, 0.8833108082136426, 0.6656600170309941, 0.5273277997371298]
    """
    with np.errstate(over="ignore"):
        x = np.asarray(a, np.int64).astype(np.uint64) * np.uint64(GOLDEN) ^ np.asarray(b, np.int64).astype(np.uint64)
    return (mix64(x) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def sequence_hashes(tokens: np.ndarray, offsets: np.ndarray, skip: int = 0) -> np.ndarray:
    """A 64-bit fingerprint of each flat token sequence `tokens[offsets[i]:offsets[i+1]]` (from position
    `skip` on), vectorised: uint64 [len(offsets) - 1].

    Each token is mixed with its position (splitmix64) and the mixes are summed per sequence
    (mod 2^64) together with the length: two different sequences collide with probability
    ~2^-64. Equal ids give equal fingerprints, so callers must hash sequences in one id space.

    >>> h = sequence_hashes(np.array([1, 2, 1, 2, 2, 1]), np.array([0, 2, 4, 6]))
    >>> bool(h[0] == h[1]), bool(h[0] == h[2])
    (True, False)
    """
    tokens = np.asarray(tokens)
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    n = len(lengths)
    seq = np.repeat(np.arange(n), lengths)
    pos = np.arange(len(tokens)) - np.repeat(offsets[:-1], lengths)
    keep = pos >= skip
    with np.errstate(over="ignore"):
        mixed = splitmix64(tokens[keep].astype(np.uint64) * np.uint64(GOLDEN) + pos[keep].astype(np.uint64))
        sums = np.zeros(n, dtype=np.uint64)
        np.add.at(sums, seq[keep], mixed)
        return sums ^ splitmix64(np.maximum(lengths - skip, 0).astype(np.uint64) + np.uint64(1))
