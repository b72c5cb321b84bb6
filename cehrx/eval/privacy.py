"""Privacy: does the synthetic data reveal who was in the training set, or what they had?

Patients are binary vectors (code presence + one-hot gender, race, age band; `record_matrix`)
compared with the Jaccard distance; nearest neighbours are computed in batches
(`cehrx.eval.neighbors`). Metrics:

- **Distance to closest record (DCR)**: synthetic -> nearest train patient, with the same for
  real held-out patients as the reference (a real non-member's DCR is what "not copied" looks like).
- **Membership inference** (distance attack): an attacker holding a real record calls it a
  training member when its DCR to the synthetic set is small. Equal numbers of members (train)
  and non-members (held-out) are drawn; AUC of -DCR, and the accuracy of calling the closer half
  members (ties broken at random). 0.5 = no leak, 1.0 = every member is recognisable.
- **Nearest-neighbour adversarial accuracy** (Yale et al. 2020): AA = 0.5 * (P[d_RS > d_RR] +
  P[d_SR > d_SS]) with leave-one-out distances inside a set (ties count 1/2). AA_train uses
  train patients, AA_test held-out ones, each against an equally sized synthetic sample.
  ~0.5 = indistinguishable; privacy loss = AA_test - AA_train (> 0: the synthetic data sits
  closer to training patients than to unseen ones). Each AA uses two sets of equal size.
- **Attribute inference**: an attacker knows a target's demographics and common codes and reads
  the target's other ("sensitive") codes off the nearest synthetic patient on the known part.
  Compared with the same attack on the other real training patients (leave-one-out: what the
  population without the target gives): F1 above that baseline is information leaked about the targets.
- **Exact copies**: synthetic token sequences identical to a training sequence, with and
  without the prompt's YEAR and AGE tokens (a generator conditioned on a real prompt copies it
  trivially; the clinical body is what matters). Real held-out vs train gives the base rate of
  coincidental duplicates (short, common sequences).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from cehrx.eval.neighbors import nearest
from cehrx.eval.patients import Patients, sequence_hashes


def _sample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, k, replace=False)) if k < n else np.arange(n)


def summarize_dcr(d: np.ndarray) -> dict:
    """Distance to closest record summary (median, mean, 5th percentile, share of exact matches)."""
    return {
        "median": float(np.median(d)),
        "mean": float(d.mean()),
        "p05": float(np.quantile(d, 0.05)),
        "zero_rate": float((d == 0).mean()),
        "n": len(d),
    }


def membership_inference(
    members: sp.csr_matrix, non_members: sp.csr_matrix, synthetic: sp.csr_matrix, batch_size: int = 512, seed: int = 0
) -> dict:
    """Distance-based membership inference on balanced member / non-member samples."""
    rng = np.random.default_rng(seed)
    n = min(members.shape[0], non_members.shape[0])
    m = members[_sample(members.shape[0], n, rng)]
    o = non_members[_sample(non_members.shape[0], n, rng)]
    dm, _ = nearest(m, synthetic, batch_size, desc="MIA members")
    do, _ = nearest(o, synthetic, batch_size, desc="MIA non-members")
    d = np.concatenate([dm, do])
    y = np.concatenate([np.ones(n), np.zeros(n)])
    order = np.lexsort((rng.random(2 * n), d))  # closest first, ties in random order
    called_member = np.zeros(2 * n, dtype=bool)
    called_member[order[:n]] = True
    return {
        "auc": float(roc_auc_score(y, -d)) if n else float("nan"),
        "accuracy": float((called_member == (y == 1)).mean()) if n else float("nan"),
        "n_members": n,
        "n_non_members": n,
        "member_dcr_median": float(np.median(dm)),
        "non_member_dcr_median": float(np.median(do)),
    }


def adversarial_accuracy(real: sp.csr_matrix, synthetic: sp.csr_matrix, batch_size: int = 512, tag: str = "") -> float:
    """AA of equally sized real and synthetic sets (ties count 1/2)."""
    d_rs, _ = nearest(real, synthetic, batch_size, desc=f"AA{tag} real->syn")
    d_rr, _ = nearest(real, real, batch_size, exclude_self=True, desc=f"AA{tag} real->real")
    d_sr, _ = nearest(synthetic, real, batch_size, desc=f"AA{tag} syn->real")
    d_ss, _ = nearest(synthetic, synthetic, batch_size, exclude_self=True, desc=f"AA{tag} syn->syn")
    return 0.5 * (_greater(d_rs, d_rr) + _greater(d_sr, d_ss))


def _greater(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a > b) + 0.5 * (a == b)).mean())


def adversarial_privacy(
    train: sp.csr_matrix, held_out: sp.csr_matrix, synthetic: sp.csr_matrix, batch_size: int = 512, seed: int = 0
) -> dict:
    """AA_train, AA_test and privacy loss.

    Each AA compares two sets of equal size (AA depends on how dense the sets are): AA_train uses
    min(|train|, |synthetic|) patients of each, so a synthetic set as large as the training set is
    used whole and a memorised patient always meets its source; AA_test uses the held-out patients
    and an equally large synthetic sample.
    """
    rng = np.random.default_rng(seed)
    m = min(train.shape[0], synthetic.shape[0])
    h = min(held_out.shape[0], synthetic.shape[0])
    if m < 2 or h < 2:
        return {
            "aa_train": float("nan"),
            "aa_test": float("nan"),
            "privacy_loss": float("nan"),
            "n_train": m,
            "n_test": h,
        }
    tr = train[_sample(train.shape[0], m, rng)]
    syn_tr = synthetic[_sample(synthetic.shape[0], m, rng)]
    te = held_out[_sample(held_out.shape[0], h, rng)]
    syn_te = synthetic[_sample(synthetic.shape[0], h, rng)]
    aa_train = adversarial_accuracy(tr, syn_tr, batch_size, " train")
    aa_test = adversarial_accuracy(te, syn_te, batch_size, " test")
    return {"aa_train": aa_train, "aa_test": aa_test, "privacy_loss": aa_test - aa_train, "n_train": m, "n_test": h}


def attribute_inference(
    train: sp.csr_matrix,
    synthetic: sp.csr_matrix,
    known: np.ndarray,
    n_targets: int = 2000,
    batch_size: int = 512,
    seed: int = 0,
) -> dict:
    """Sensitive-code inference about training patients from their nearest neighbour on the known columns.

    `known` are the column indices the attacker sees (demographics + common codes); every other
    column is sensitive. Targets are up to `n_targets` training patients. The attack reads the
    sensitive codes of the nearest synthetic patient; the real baseline reads them off the nearest
    *other* training patient (leave-one-out: what the population, without the target, reveals).
    The synthetic pool is capped at the training set's size so neither pool is larger.
    Micro-averaged precision, recall and F1 over the targets' sensitive codes.
    """
    rng = np.random.default_rng(seed)
    n_train = train.shape[0]
    rows = _sample(n_train, min(n_targets, n_train), rng)
    syn = synthetic[_sample(synthetic.shape[0], min(synthetic.shape[0], n_train), rng)]
    sensitive = np.setdiff1d(np.arange(train.shape[1]), known)
    truth = train[rows][:, sensitive]
    query = train[rows][:, known]
    out = {
        "n_targets": len(rows),
        "n_synthetic_pool": syn.shape[0],
        "n_real_pool": n_train - 1,
        "n_known_columns": len(known),
        "n_sensitive_columns": len(sensitive),
    }
    _, nn = nearest(query, syn[:, known], batch_size, desc="attribute inference (synthetic)")
    out["synthetic"] = _prf(truth, syn[:, sensitive][nn])
    if n_train < 2:
        out["real_baseline"] = {"precision": float("nan"), "recall": float("nan"), "f1": float("nan")}
    else:
        _, nn2 = nearest(query, train[:, known], batch_size, k=2, desc="attribute inference (real, leave-one-out)")
        other = np.where(nn2[:, 0] != rows, nn2[:, 0], nn2[:, 1])
        out["real_baseline"] = _prf(truth, train[:, sensitive][other])
    out["f1_gain"] = out["synthetic"]["f1"] - out["real_baseline"]["f1"]
    return out


def _prf(truth: sp.csr_matrix, pred: sp.csr_matrix) -> dict:
    tp = float(truth.multiply(pred).sum())
    n_pred, n_true = float(pred.sum()), float(truth.sum())
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def exact_copy_rate(train: Patients, other: Patients, skip: int = 0) -> float:
    """Fraction of `other`'s sequences identical to some training sequence (from position `skip`)."""
    if len(other) == 0:
        return float("nan")
    return float(np.isin(sequence_hashes(other, skip), sequence_hashes(train, skip)).mean())


def exact_copies(train: Patients, synthetic: Patients, held_out: Patients | None = None) -> dict:
    out = {
        "rate_full_sequence": exact_copy_rate(train, synthetic, 0),
        "rate_ignoring_year_age": exact_copy_rate(train, synthetic, 2),
    }
    if held_out is not None:
        out["held_out_rate_full_sequence"] = exact_copy_rate(train, held_out, 0)
        out["held_out_rate_ignoring_year_age"] = exact_copy_rate(train, held_out, 2)
    return out
