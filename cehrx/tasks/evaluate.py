"""`cehrx task=evaluate`: fidelity, utility and privacy of synthetic patients vs the real data.

Inputs: `data.prepared_dir` (the real data: train split = what the generator learned from,
`evaluate.test_split` = unseen patients) and `synthetic_dir` (a generate output, or any folder
with `tokens/train/*.parquet` + `vocab.json` [+ `meds/` for labs and utility]). With
`evaluate.baseline=marginal` the independent-marginals baseline (`cehrx.eval.marginal`) is
generated into `<output_dir>/baseline_marginal` and reported side by side.

Output (`output_dir`, written to a temporary sibling and renamed when complete):
    report.md + *.png   the report
    metrics.json        every number in it (per synthetic set, plus the real held-out reference)
    config.yaml         the resolved config
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from cehrx.data.vocab import Vocab
from cehrx.errors import CehrxError
from cehrx.eval import fidelity, marginal, privacy, synthetic_figures, synthetic_report
from cehrx.eval.metrics import json_safe
from cehrx.eval.patients import (
    Patients,
    TokenSpace,
    code_columns,
    load_patients,
    record_matrix,
)
from cehrx.progress import Stages
from cehrx.tasks.inputs import is_prepared_dir, prepared_dir_for
from cehrx.tasks.scaffold import task_output, write_marker

log = logging.getLogger("cehrx.evaluate")
MODEL_SET = "model"
BASELINE_SET = "marginal"


def run(cfg: DictConfig) -> dict:
    e = cfg.evaluate
    prepared = prepared_dir_for(cfg)
    synthetic = _synthetic_dir(cfg)
    baseline = str(e.baseline) if e.baseline else None
    if baseline not in (None, "marginal"):
        raise CehrxError(f"evaluate.baseline={baseline!r}: the only baseline is 'marginal' (or null)")
    if synthetic is None and baseline is None:
        raise CehrxError(
            "nothing to evaluate: pass synthetic_dir=<a generate output> and/or evaluate.baseline=marginal"
        )
    out = Path(cfg.output_dir)
    with task_output(cfg, "evaluate") as tmp:
        metrics = evaluate(cfg, prepared, synthetic, baseline, tmp)
        metrics["output_dir"] = str(out)
        write_marker(tmp, "evaluate", metrics)
    Console(stderr=True).print(f"synthetic data report -> {out / 'report.md'}")
    return metrics


def _synthetic_dir(cfg: DictConfig) -> Path | None:
    if cfg.get("synthetic_dir") in (None, ""):
        return None
    p = Path(str(cfg.synthetic_dir))
    if not is_prepared_dir(p):
        raise CehrxError(f"synthetic_dir={p}: expected a generate output (vocab.json and tokens/train/*.parquet)")
    return p


def real_meds_dir(prepared: Path) -> Path | None:
    from cehrx.probe.labels import meds_dir_for

    try:
        return meds_dir_for(prepared)
    except CehrxError:
        return None


def evaluate(cfg: DictConfig, prepared: Path, synthetic: Path | None, baseline: str | None, out: Path) -> dict:
    """Everything, stage by stage; returns metrics.json's content and writes the report into `out`."""
    e = cfg.evaluate
    seed = int(e.seed)
    stages = Stages(total=6 + int(baseline is not None), spinner=False)
    real_meds = real_meds_dir(prepared)
    dirs: dict[str, Path] = {}
    if synthetic is not None:
        dirs[MODEL_SET] = synthetic
    if baseline == "marginal":
        with stages("marginal baseline"):
            n = e.baseline_n or (_n_patients(synthetic) if synthetic else None)
            marginal.generate(prepared, out / "baseline_marginal", n=n, seed=seed, real_meds=real_meds)
            dirs[BASELINE_SET] = out / "baseline_marginal"
    with stages("load patients"):
        train, held, sets, space = _load_sets(e, prepared, dirs)
    metrics = {
        "real": {
            "prepared_dir": str(prepared),
            "n_train": len(train),
            "non_member_split": str(e.test_split),
            "n_non_members": len(held),
        },
        "config": {k: OmegaConf.to_container(e, resolve=True)[k] for k in e},
        "sets": {},
    }
    for k, d in dirs.items():
        metrics["sets"][k] = {"dir": str(d) if k == MODEL_SET else "baseline_marginal", "n_patients": len(sets[k])}
    top = fidelity.top_codes(train, space, int(e.top_codes))
    with stages("fidelity"):
        phis = _fidelity(train, held, sets, space, top, metrics)
        labs = _labs(e, real_meds, dirs, metrics)
    with stages("privacy"):
        dcr_values = _privacy(e, train, held, sets, space, metrics, int(e.nn_batch_size), seed)
    with stages("utility"):
        _utility(e, real_meds, dirs, metrics, seed)
    with stages("report"):
        figures = _figures(out, train, sets, space, metrics, phis, labs, dcr_values)
        metrics["figures"] = {k: v for k, v in figures.items() if v}
        metrics["summary"] = {k: headline(s) for k, s in metrics["sets"].items()}
        metrics["timings_s"] = stages.timings
        synthetic_report.write_markdown(out, json_safe(metrics), figures)
    return metrics


def _load_sets(
    e: DictConfig, prepared: Path, dirs: dict[str, Path]
) -> tuple[Patients, Patients, dict[str, Patients], TokenSpace]:
    """Real train and non-member patients and each synthetic set's, in one token space over all vocabularies."""
    seed, n_max = int(e.seed), int(e.n_max_patients)
    vocabs = {"real": Vocab.load(prepared), **{k: Vocab.load(d) for k, d in dirs.items()}}
    space = TokenSpace.from_vocabs(*vocabs.values())
    train = load_patients(prepared, "train", space, vocabs["real"], n_max, seed)
    held = load_patients(prepared, str(e.test_split), space, vocabs["real"], n_max, seed + 1)
    sets = {k: load_patients(d, "train", space, vocabs[k], n_max, seed + 2) for k, d in dirs.items()}
    return train, held, sets, space


def _fidelity(
    train: Patients,
    held: Patients,
    sets: dict[str, Patients],
    space: TokenSpace,
    top: np.ndarray,
    metrics: dict,
) -> dict[str, np.ndarray]:
    """Prevalence, co-occurrence and distribution distances of each set (and of the real non-members,
    the `reference`) to real train; returns the phi matrices of the top codes for the figure."""
    phis = {"real": fidelity.phi_matrix(train, top)}
    for k, p in {**sets, "reference": held}.items():
        target = metrics["sets"][k] if k in sets else metrics.setdefault("reference", {})
        co, _, phis[k] = fidelity.cooccurrence_metrics(train, p, top)
        target["fidelity"] = {
            "prevalence": fidelity.prevalence_metrics(train, p, space),
            "cooccurrence": co,
            "distributions": fidelity.distribution_metrics(train, p, space),
        }
    phis.pop("reference")
    return phis


def _figures(
    out: Path,
    train: Patients,
    sets: dict[str, Patients],
    space: TokenSpace,
    metrics: dict,
    phis: dict[str, np.ndarray],
    labs: tuple | None,
    dcr_values: dict[str, np.ndarray],
) -> dict[str, str | None]:
    """Every figure of the report (file name, or None when there is nothing to draw)."""
    utility = {k: s.get("utility", {}).get("tasks", {}) for k, s in metrics["sets"].items()}
    return {
        "prevalence": synthetic_figures.plot_prevalence(out, train, sets, space, metrics["sets"]),
        "cooccurrence": synthetic_figures.plot_cooccurrence(out, phis),
        "distributions": synthetic_figures.plot_distributions(out, train, sets),
        "categorical": synthetic_figures.plot_categorical(out, train, sets, space),
        "labs": synthetic_figures.plot_labs(out, *labs) if labs else None,
        "dcr": synthetic_figures.plot_dcr(out, dcr_values),
        "utility": synthetic_figures.plot_utility(out, utility),
    }


def headline(s: dict) -> dict:
    """The few numbers a reader looks for first (the pipeline summary finds them by key name)."""
    get = synthetic_report.value_at
    return {
        "prevalence_pearson": get(s, ("fidelity", "prevalence", "pearson")),
        "mia_auc": get(s, ("privacy", "membership_inference", "auc")),
        "privacy_loss": get(s, ("privacy", "adversarial", "privacy_loss")),
        "exact_copy_rate": get(s, ("privacy", "exact_copies", "rate_full_sequence")),
        "tstr_trtr_ratio": get(s, ("utility", "mean_ratio")),
    }


def _n_patients(d: Path) -> int:
    from cehrx.data.shards import read_split_table

    return read_split_table(d, "train", columns=["subject_id"]).num_rows


def _labs(e: DictConfig, real_meds: Path | None, dirs: dict[str, Path], metrics: dict):
    """Lab value distances per set; returns the values for the figure (or None without MEDS)."""
    if real_meds is None or int(e.top_labs) <= 0:
        return None
    codes = fidelity.top_lab_codes(real_meds, "train", int(e.top_labs))
    real = fidelity.lab_values(real_meds, "train", codes)
    per_set = {}
    for k, d in dirs.items():
        meds = d / "meds"
        per_set[k] = fidelity.lab_values(meds, None, codes) if (meds / "data").is_dir() else {}
        metrics["sets"][k]["fidelity"]["labs"] = fidelity.lab_metrics(real, per_set[k])
    if (real_meds / "data" / str(e.test_split)).is_dir():
        metrics["reference"]["fidelity"]["labs"] = fidelity.lab_metrics(
            real, fidelity.lab_values(real_meds, str(e.test_split), codes)
        )
    return (real, per_set) if codes else None


def _privacy(
    e: DictConfig,
    train: Patients,
    held: Patients,
    sets: dict[str, Patients],
    space: TokenSpace,
    metrics: dict,
    batch: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Every privacy metric per set; returns the DCR samples for the figure."""
    from cehrx.eval.neighbors import nearest

    r_train, r_held = record_matrix(train, space), record_matrix(held, space)
    n_code_cols = len(code_columns(space))
    top_known = fidelity.top_codes(train, space, int(e.known_codes))
    known = np.concatenate([np.searchsorted(code_columns(space), top_known), np.arange(n_code_cols, r_train.shape[1])])
    d_held, _ = nearest(r_held, r_train, batch, desc="DCR held-out -> train")
    dcr_values = {f"real {e.test_split} (reference)": d_held}
    metrics.setdefault("reference", {})["privacy"] = {
        "dcr": privacy.summarize_dcr(d_held),
        "exact_copies": privacy.exact_copies(train, held),
    }
    for k, p in sets.items():
        r_syn = record_matrix(p, space)
        d_syn, _ = nearest(r_syn, r_train, batch, desc=f"DCR {k} -> train")
        dcr_values[k] = d_syn
        metrics["sets"][k]["privacy"] = {
            "dcr": privacy.summarize_dcr(d_syn),
            "membership_inference": privacy.membership_inference(r_train, r_held, r_syn, batch, seed),
            "adversarial": privacy.adversarial_privacy(r_train, r_held, r_syn, batch, seed),
            "attribute_inference": privacy.attribute_inference(r_train, r_syn, known, 2000, batch, seed),
            "exact_copies": privacy.exact_copies(train, p, held),
        }
    return dcr_values


def _utility(e: DictConfig, real_meds: Path | None, dirs: dict[str, Path], metrics: dict, seed: int) -> None:
    from cehrx.eval.utility import utility
    from cehrx.probe.labels import available_tasks

    syn_meds = {k: (d / "meds") for k, d in dirs.items() if (d / "meds" / "data").is_dir()}
    if real_meds is None:
        metrics["utility_skipped"] = "the real prepared dir has no MEDS dataset"
        return
    if not syn_meds:
        metrics["utility_skipped"] = "no synthetic set has a meds/ dataset"
        return
    tasks = list(e.tasks) if e.tasks else available_tasks()
    cache = e.get("labels_cache_dir") or None
    results = utility(tasks, real_meds, syn_meds, str(e.test_split), str(e.classifier), int(e.n_boot), seed, cache)
    for k, r in results.items():
        metrics["sets"][k]["utility"] = r
