"""Leakage audit of the history cut on real prepared data: no code token may reach a history more
often than the MEDS data has that code at or before the prediction time.

For every label of a task: the code tokens of its history (cut with `cut_histories`, no length
limit) are counted and compared with the MEDS event counts up to the prediction time
(`count_features`, a separate DuckDB path over the MEDS data). A token count above the MEDS
count would mean an event after the prediction time reached the history.

    python experiments/probe/audit_leakage.py <prepared_dir> <task> [<task> ...]
"""

from __future__ import annotations

import sys

import numpy as np
import scipy.sparse as sp

from cehrx.data.history import cut_histories, load_all_splits
from cehrx.data.vocab import Vocab
from cehrx.probe.counts import count_features
from cehrx.probe.labels import extract_labels, meds_dir_for, times_seconds


def audit(prepared: str, task: str) -> dict:
    arrays, _ = load_all_splits(prepared)
    vocab = Vocab.load(prepared)
    meds = meds_dir_for(prepared)
    labels = extract_labels(task, meds)
    h = cut_histories(
        arrays,
        vocab,
        labels.column("subject_id").to_numpy(),
        times_seconds(labels.column("prediction_time")),
        max_len=10**9,
    )
    kept = labels.take(h.label_index)
    X, names = count_features(meds, kept)
    col = {c: i for i, c in enumerate(names)}
    is_code = np.array([k == "code" for k in vocab.kinds])
    seq = np.repeat(np.arange(len(h)), h.lengths())
    code_tok = is_code[h.tokens]
    tok_col = np.array([col.get(t, -1) for t in vocab.tokens])[h.tokens[code_tok]]
    missing = int((tok_col < 0).sum())  # a code token the MEDS data never has up to any label time
    ok = tok_col >= 0
    T = sp.csr_matrix((np.ones(int(ok.sum())), (seq[code_tok][ok], tok_col[ok])), shape=X.shape)
    excess = (T - X).toarray() if X.shape[0] * X.shape[1] < 5e7 else None
    over = int((excess > 0).sum()) if excess is not None else -1
    return {
        "task": task,
        "labels": len(kept),
        "code_tokens": int(code_tok.sum()),
        "tokens_without_meds_event": missing,
        "cells_with_more_tokens_than_events": over,
        "rows_affected": int((excess > 0).any(1).sum()) if excess is not None else -1,
    }


if __name__ == "__main__":
    for t in sys.argv[2:]:
        print(audit(sys.argv[1], t))
