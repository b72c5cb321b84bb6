"""Print the RESULTS.md table rows from evaluate outputs.

python experiments/evaluate/summarize.py runs/eunomia/report_copy runs/eunomia/report_model
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cehrx.eval.synthetic_report import fmt_value, value_at

ROWS = [
    ("prevalence Pearson", ("fidelity", "prevalence", "pearson")),
    ("prevalence Spearman", ("fidelity", "prevalence", "spearman")),
    ("co-occurrence Pearson (top 50)", ("fidelity", "cooccurrence", "pearson")),
    ("tokens per patient KS", ("fidelity", "distributions", "tokens_per_patient", "ks")),
    ("visits per patient KS", ("fidelity", "distributions", "visits_per_patient", "ks")),
    ("lab values mean KS", ("fidelity", "labs", "mean_ks")),
    ("age at death KS", ("fidelity", "distributions", "age_at_death", "ks")),
    ("TSTR/TRTR AUROC ratio (mean over tasks)", ("utility", "mean_ratio")),
    ("MIA AUC", ("privacy", "membership_inference", "auc")),
    ("AA_train", ("privacy", "adversarial", "aa_train")),
    ("AA_test", ("privacy", "adversarial", "aa_test")),
    ("AA privacy loss", ("privacy", "adversarial", "privacy_loss")),
    ("attribute inference F1 gain", ("privacy", "attribute_inference", "f1_gain")),
    ("DCR median", ("privacy", "dcr", "median")),
    ("exact copy rate", ("privacy", "exact_copies", "rate_full_sequence")),
    ("exact copy rate ignoring YEAR/AGE", ("privacy", "exact_copies", "rate_ignoring_year_age")),
]


def main(dirs: list[str]) -> None:
    cols = []
    for d in dirs:
        m = json.loads((Path(d) / "metrics.json").read_text())
        for name, s in m["sets"].items():
            cols.append((f"{Path(d).name}:{name} (n={s['n_patients']})", s))
        cols.append((f"{Path(d).name}:real held-out", m.get("reference", {})))
    print("| metric | " + " | ".join(c for c, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for label, path in ROWS:
        print(f"| {label} | " + " | ".join(fmt_value(value_at(s, path)) for _, s in cols) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
