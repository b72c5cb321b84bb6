"""Fidelity: does the synthetic population look like the real training population?

Everything compares the real *train* split (what a generator learned from) with a synthetic
set, patient-level and set-based:

- code prevalence (fraction of patients with each code): Pearson and Spearman correlation,
  mean absolute difference, codes missing on either side;
- co-occurrence of the top codes: correlation of the two phi-coefficient matrices;
- numeric distributions (age at first visit, year, visits and tokens per patient, days between
  visits, lab values): Kolmogorov-Smirnov statistic and Wasserstein-1 distance;
- categorical distributions (gender, race, visit types): total variation distance (TVD);
- death rate: absolute difference.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
from scipy import stats

from cehrx.data.duck import literal
from cehrx.eval.patients import Patients, TokenSpace, code_columns


def prevalence(p: Patients, columns: np.ndarray) -> np.ndarray:
    """Fraction of patients having each token in `columns`."""
    return np.asarray(p.presence[:, columns].sum(axis=0)).ravel() / max(len(p), 1)


def correlations(x: np.ndarray, y: np.ndarray) -> dict:
    """Pearson and Spearman correlation (NaN when either side is constant)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pearson": float("nan"), "spearman": float("nan")}
    return {"pearson": float(stats.pearsonr(x, y)[0]), "spearman": float(stats.spearmanr(x, y)[0])}


def prevalence_metrics(real: Patients, synthetic: Patients, space: TokenSpace) -> dict:
    """Prevalence agreement over every code seen in either set."""
    cols = code_columns(space)
    pr, ps = prevalence(real, cols), prevalence(synthetic, cols)
    seen = (pr > 0) | (ps > 0)
    return {
        "n_codes": int(seen.sum()),
        **correlations(pr[seen], ps[seen]),
        "mean_abs_diff": float(np.abs(pr[seen] - ps[seen]).mean()) if seen.any() else float("nan"),
        "codes_missing_in_synthetic": int(((pr > 0) & (ps == 0)).sum()),
        "codes_only_in_synthetic": int(((pr == 0) & (ps > 0)).sum()),
    }


def top_codes(real: Patients, space: TokenSpace, k: int) -> np.ndarray:
    """The k most prevalent real codes (token ids), ties by id."""
    cols = code_columns(space)
    pr = prevalence(real, cols)
    order = np.lexsort((cols, -pr))
    return cols[order[: min(k, int((pr > 0).sum()))]]


def phi_matrix(p: Patients, columns: np.ndarray) -> np.ndarray:
    """Pearson (phi) correlation between the presence of each pair of codes, 0 for constant codes."""
    x = p.presence[:, columns]
    n = max(x.shape[0], 1)
    mean = np.asarray(x.mean(axis=0)).ravel()
    cov = np.asarray((x.T @ x).toarray()) / n - np.outer(mean, mean)
    sd = np.sqrt(np.clip(np.diag(cov), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sd, sd)
    corr[~np.isfinite(corr)] = 0.0
    np.fill_diagonal(corr, 1.0)
    return corr


def cooccurrence_metrics(
    real: Patients, synthetic: Patients, columns: np.ndarray
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Agreement of the top codes' co-occurrence (phi) matrices, and the two matrices."""
    cr, cs = phi_matrix(real, columns), phi_matrix(synthetic, columns)
    iu = np.triu_indices(len(columns), k=1)
    out = {
        "n_codes": len(columns),
        "mean_abs_diff": float(np.abs(cr[iu] - cs[iu]).mean()) if len(iu[0]) else float("nan"),
    }
    out["pearson"] = correlations(cr[iu], cs[iu])["pearson"]
    return out, cr, cs


def numeric_distance(real: np.ndarray, synthetic: np.ndarray) -> dict:
    """KS statistic and Wasserstein-1 distance between two samples (NaNs dropped)."""
    a, b = _finite(real), _finite(synthetic)
    out = {
        "n_real": len(a),
        "n_synthetic": len(b),
        "real_mean": float(a.mean()) if len(a) else float("nan"),
        "synthetic_mean": float(b.mean()) if len(b) else float("nan"),
    }
    if len(a) and len(b):
        out["ks"] = float(stats.ks_2samp(a, b).statistic)
        out["wasserstein"] = float(stats.wasserstein_distance(a, b))
    else:
        out["ks"] = out["wasserstein"] = float("nan")
    return out


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[np.isfinite(x)]


def categorical_distance(real: dict[str, int], synthetic: dict[str, int]) -> dict:
    """Total variation distance between two category count tables, and both distributions."""
    cats = sorted(set(real) | set(synthetic))
    r = np.array([real.get(c, 0) for c in cats], dtype=float)
    s = np.array([synthetic.get(c, 0) for c in cats], dtype=float)
    pr, ps = r / max(r.sum(), 1), s / max(s.sum(), 1)
    return {
        "tvd": float(0.5 * np.abs(pr - ps).sum()),
        "real": dict(zip(cats, pr.round(6).tolist())),
        "synthetic": dict(zip(cats, ps.round(6).tolist())),
    }


def category_counts(ids: np.ndarray, space: TokenSpace) -> dict[str, int]:
    """Counts of token ids as {token string: count} (-1 -> 'none')."""
    values, counts = np.unique(np.asarray(ids), return_counts=True)
    return {(space.tokens[v] if v >= 0 else "none"): int(c) for v, c in zip(values, counts)}


def visit_type_ids(p: Patients, space: TokenSpace) -> np.ndarray:
    return p.tokens[np.isin(p.tokens, space.of_kind("visit"))]


NUMERIC = {
    "age_at_first_visit": lambda p: p.age,
    "year_of_first_visit": lambda p: p.year,
    "visits_per_patient": lambda p: p.n_visits,
    "tokens_per_patient": lambda p: p.n_tokens,
    "days_between_visits": lambda p: p.gap_days,
    "age_at_death": lambda p: p.death_age,  # the patients who die (in years); the death rate is death_rate
}
CATEGORICAL = {
    "gender": lambda p, s: p.gender,
    "race": lambda p, s: p.race,
    "visit_types": visit_type_ids,
}


def distribution_metrics(real: Patients, synthetic: Patients, space: TokenSpace) -> dict:
    """Every demographic and utilisation distribution, each with its distance."""
    out = {name: numeric_distance(f(real), f(synthetic)) for name, f in NUMERIC.items()}
    for name, f in CATEGORICAL.items():
        out[name] = categorical_distance(
            category_counts(f(real, space), space), category_counts(f(synthetic, space), space)
        )
    dr, ds = float(real.death.mean()), float(synthetic.death.mean())
    out["death_rate"] = {"real": dr, "synthetic": ds, "abs_diff": abs(dr - ds)}
    return out


# ------------------------------------------------------------------------------- lab values


def meds_glob(meds_dir: str | Path, split: str | None = None) -> str:
    d = Path(meds_dir) / "data"
    return str(d / split / "*.parquet") if split else str(d / "**" / "*.parquet")


def top_lab_codes(meds_dir: str | Path, split: str | None, k: int) -> list[str]:
    """The k codes with the most numeric values (ties by code)."""
    rows = duckdb.sql(f"""
        SELECT code FROM read_parquet({literal(meds_glob(meds_dir, split))})
        WHERE numeric_value IS NOT NULL AND isfinite(numeric_value)
        GROUP BY code ORDER BY count(*) DESC, code LIMIT {int(k)}""").fetchall()
    return [r[0] for r in rows]


def lab_values(meds_dir: str | Path, split: str | None, codes: list[str], cap: int = 20000) -> dict[str, np.ndarray]:
    """Numeric values of `codes`, at most `cap` per code (a deterministic hash sample)."""
    if not codes:
        return {}
    table = duckdb.sql(f"""
        SELECT code, numeric_value FROM read_parquet({literal(meds_glob(meds_dir, split))})
        WHERE numeric_value IS NOT NULL AND isfinite(numeric_value) AND code IN ({", ".join(literal(c) for c in codes)})
        QUALIFY row_number() OVER (PARTITION BY code ORDER BY hash(subject_id, time, numeric_value)) <= {int(cap)}
    """).to_arrow_table()
    code = np.asarray(table.column("code").to_pylist(), dtype=object)
    value = table.column("numeric_value").to_numpy(zero_copy_only=False).astype(np.float64)
    return {c: value[code == c] for c in codes}


def lab_metrics(real: dict[str, np.ndarray], synthetic: dict[str, np.ndarray]) -> dict:
    """Per lab code distances, plus their means (over codes the synthetic data has)."""
    per_code = {c: numeric_distance(real[c], synthetic.get(c, np.array([]))) for c in real}
    have = [m for m in per_code.values() if m["n_synthetic"] > 0]
    return {
        "codes": per_code,
        "n_codes": len(per_code),
        "n_codes_in_synthetic": len(have),
        "mean_ks": float(np.mean([m["ks"] for m in have])) if have else float("nan"),
    }
