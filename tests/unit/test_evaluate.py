"""Synthetic-data evaluation: each metric on tiny hand-made patients where the answer is known."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from cehrx.data.shards import SECONDS_PER_YEAR, SHARD_SCHEMA, TokenArrays, load_split
from cehrx.data.vocab import SPECIAL_TOKENS, Vocab, kind_of
from cehrx.errors import CehrxError
from cehrx.eval import fidelity, marginal, privacy
from cehrx.eval.neighbors import nearest
from cehrx.eval.patients import TokenSpace, record_matrix, sequence_hashes, subset, summarize
from tests.conftest import compose_cfg

TOKENS = [
    *SPECIAL_TOKENS,
    "YEAR//2000",
    "YEAR//2001",
    "AGE//30",
    "AGE//40",
    "AGE//UNKNOWN",
    "GENDER//F",
    "GENDER//M",
    "RACE//1",
    "RACE//2",
    "VISIT//OP",
    "VISIT//IP",
    "D5",
    "D10",
    "Y3",
    "Q1",
    "Q2",
    *[f"C/{c}" for c in "ABCDEFGH"],
]
VOCAB = Vocab(TOKENS, [kind_of(t) for t in TOKENS], [1] * len(TOKENS), [1] * len(TOKENS), [None] * len(TOKENS))
SPACE = TokenSpace.from_vocabs(VOCAB)


def seq(
    codes: list[list[str]],
    year: int = 2000,
    age: int = 30,
    gender: str = "F",
    race: str = "1",
    death: bool = False,
    visit: str = "OP",
) -> list[str]:
    """A patient: prompt, one visit per code list, D5 gaps, optional death."""
    out = [f"YEAR//{year}", f"AGE//{age}", f"GENDER//{gender}", f"RACE//{race}"]
    for i, visit_codes in enumerate(codes):
        out += (["D5"] if i else []) + ["[VS]", f"VISIT//{visit}", *[f"C/{c}" for c in visit_codes], "[VE]"]
    return out + (["D10", "[DEATH]"] if death else [])


def arrays(patients: list[list[str]]) -> TokenArrays:
    ids = [np.array([VOCAB[t] for t in p], dtype=np.int32) for p in patients]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
    tokens = np.concatenate(ids)
    return TokenArrays(
        np.arange(1, len(ids) + 1, dtype=np.int64),
        offsets,
        tokens,
        np.zeros(len(tokens), np.int64),
        np.zeros(len(ids), np.int64),
    )


def patients(ps: list[list[str]]):
    return summarize(arrays(ps), SPACE, SPACE.ids(VOCAB))


POP = [
    seq([list("AB"), list("C")]),
    seq([list("AD")], gender="M", age=40),
    seq([list("E"), list("FG"), list("H")], death=True),
    seq([list("BC")], year=2001, race="2"),
    seq([list("A"), list("A")]),
    seq([list("GH")], gender="M"),
]
OTHERS = [
    seq([list("CDE")], age=40),
    seq([list("FH"), list("B")], gender="M"),
    seq([list("D")], race="2"),
    seq([list("AEG")], year=2001),
    seq([list("H"), list("C")], gender="M", age=40),
    seq([list("BF")]),
]


# ------------------------------------------------------------------------------ representation


def test_summaries_are_exact() -> None:
    p = patients([seq([list("AB"), list("A")], death=True), seq([list("C")], age=40, gender="M")])
    assert p.n_visits.tolist() == [2, 1] and p.death.tolist() == [True, False]
    assert p.age.tolist() == [30, 40] and p.year.tolist() == [2000, 2000]
    assert [SPACE.tokens[g] for g in p.gender] == ["GENDER//F", "GENDER//M"]
    assert p.gap_days.tolist() == [5.0]  # the D10 before [DEATH] is not a gap between visits
    codes = fidelity.prevalence(p, SPACE.of_kind("code"))
    assert codes[[SPACE.id("C/A") - SPACE.of_kind("code")[0]]].tolist() == [0.5]  # presence, not counts
    # age at death from the [DEATH] token's time and the birth time; NaN for the living
    a = arrays([seq([list("A")], death=True), seq([list("B")]), seq([list("C")], death=True)])
    a.times[a.offsets[0] : a.offsets[1]] = int(40.5 * SECONDS_PER_YEAR)
    a.times[a.offsets[2] : a.offsets[3]] = int(70 * SECONDS_PER_YEAR)
    a.birth_time[2] = int(10 * SECONDS_PER_YEAR)
    ages = summarize(a, SPACE, SPACE.ids(VOCAB)).death_age
    assert ages[0] == pytest.approx(40.5) and np.isnan(ages[1]) and ages[2] == pytest.approx(60.0)
    d = fidelity.distribution_metrics(patients(POP), patients(POP), SPACE)["age_at_death"]
    assert d["n_real"] == 1 and d["ks"] == 0.0  # only the one patient who dies counts
    sub = subset(arrays(POP), np.array([3, 0]))
    assert sub.subject_id.tolist() == [4, 1] and len(sub.tokens) == len(POP[3]) + len(POP[0])


def test_sequence_hashes_see_order_and_prompt() -> None:
    a = seq([list("AB")])
    p = patients([a, seq([list("BA")]), a, seq([list("AB")], year=2001)])
    h = sequence_hashes(p)
    assert h[0] == h[2] and len({h[0], h[1], h[3]}) == 3
    h2 = sequence_hashes(p, skip=2)
    assert h2[0] == h2[3]  # same body, different YEAR


# ------------------------------------------------------------------------------ neighbours


def test_nearest_jaccard_batches_and_self_exclusion() -> None:
    a = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]], dtype=np.float32))
    b = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=np.float32))
    d, i = nearest(a, b, batch_size=1, progress=False)
    assert i.tolist() == [0, 1, 0] and np.allclose(d, [0.0, 1 / 3, 0.5])
    d2, i2 = nearest(a, b, batch_size=100, progress=False)
    assert np.array_equal(i, i2) and np.allclose(d, d2)
    d3, i3 = nearest(b, b, batch_size=2, exclude_self=True, progress=False)
    assert i3.tolist() == [1, 0, 0] and np.allclose(d3, [0.75, 0.75, 1.0])
    dk, ik = nearest(a, b, k=2, progress=False)
    assert ik[0].tolist() == [0, 1] and np.allclose(dk[0], [0.0, 0.75])


# ------------------------------------------------------------------------------ fidelity


def test_identical_sets_have_perfect_fidelity() -> None:
    real, syn = patients(POP), patients(POP)
    prev = fidelity.prevalence_metrics(real, syn, SPACE)
    assert (
        prev["pearson"] == pytest.approx(1.0) and prev["spearman"] == pytest.approx(1.0) and prev["mean_abs_diff"] == 0
    )
    top = fidelity.top_codes(real, SPACE, 5)
    co, cr, cs = fidelity.cooccurrence_metrics(real, syn, top)
    assert co["pearson"] == pytest.approx(1.0) and co["mean_abs_diff"] == 0 and np.array_equal(cr, cs)
    dist = fidelity.distribution_metrics(real, syn, SPACE)
    assert all(dist[k]["ks"] == 0 and dist[k]["wasserstein"] == 0 for k in fidelity.NUMERIC)
    assert all(dist[k]["tvd"] == 0 for k in fidelity.CATEGORICAL) and dist["death_rate"]["abs_diff"] == 0


def test_disjoint_and_known_distances() -> None:
    real = patients([seq([list("AB")]), seq([list("AC")])])
    syn = patients([seq([list("FG")], gender="M"), seq([list("H")], gender="M")])
    prev = fidelity.prevalence_metrics(real, syn, SPACE)
    assert prev["codes_missing_in_synthetic"] == 3 and prev["codes_only_in_synthetic"] == 3 and prev["n_codes"] == 6
    assert fidelity.distribution_metrics(real, syn, SPACE)["gender"]["tvd"] == 1.0
    m = fidelity.numeric_distance(np.array([0.0, 0.0]), np.array([2.0, 2.0, np.nan]))
    assert m["ks"] == 1.0 and m["wasserstein"] == 2.0 and m["n_synthetic"] == 2
    assert fidelity.categorical_distance({"a": 3, "b": 1}, {"a": 1, "b": 1})["tvd"] == pytest.approx(0.25)


def test_phi_matrix_matches_numpy() -> None:
    p = patients(POP + OTHERS)
    cols = SPACE.of_kind("code")
    x = p.presence[:, cols].toarray()
    assert np.allclose(fidelity.phi_matrix(p, cols), np.corrcoef(x.T))


# ------------------------------------------------------------------------------ privacy


def test_membership_inference_known_answers() -> None:
    members, others = record_matrix(patients(POP), SPACE), record_matrix(patients(OTHERS), SPACE)
    same = privacy.membership_inference(members, members, others, seed=0)
    assert same["auc"] == 0.5  # members and non-members identical: no attack can tell them apart
    copy = privacy.membership_inference(members, others, members, seed=0)  # synthetic = copy of the members
    assert copy["auc"] == 1.0 and copy["accuracy"] == 1.0 and copy["member_dcr_median"] == 0


def test_adversarial_accuracy_known_answers() -> None:
    real = record_matrix(patients(POP), SPACE)
    assert privacy.adversarial_accuracy(real, real) == 0.0  # every real has a synthetic twin at distance 0
    far = record_matrix(patients([seq([list("AB")]), seq([list("AB")])]), SPACE)
    near = record_matrix(
        patients([seq([list("GH")], gender="M", age=40), seq([list("GH")], gender="M", age=40)]), SPACE
    )
    assert privacy.adversarial_accuracy(far, near) == 1.0  # each set's nearest is always its own kind
    out = privacy.adversarial_privacy(real, record_matrix(patients(OTHERS), SPACE), real)
    assert out["aa_train"] == 0.0 and out["privacy_loss"] > 0.2 and out["n_train"] == out["n_test"] == 6


def test_attribute_inference_copy_reveals_everything() -> None:
    targets = record_matrix(patients(POP), SPACE)
    known = np.arange(2)  # codes A and B known (plus nothing else): the rest is sensitive
    known = np.concatenate([known, np.arange(len(SPACE.of_kind("code")), targets.shape[1])])
    out = privacy.attribute_inference(targets, targets, known)
    assert out["synthetic"]["f1"] == 1.0 and out["real_baseline"]["f1"] < 1.0 and out["f1_gain"] > 0
    assert out["n_targets"] == 6 and out["n_real_pool"] == 5
    twins = record_matrix(patients([POP[0], POP[0], POP[1], POP[1]]), SPACE)  # each patient's twin is another patient
    assert privacy.attribute_inference(twins, twins, known)["real_baseline"]["f1"] == 1.0
    unrelated = privacy.attribute_inference(targets, record_matrix(patients(OTHERS), SPACE), known)
    assert unrelated["synthetic"]["f1"] < 1.0


def test_exact_copy_rates() -> None:
    train = patients(POP)
    assert privacy.exact_copy_rate(train, patients(POP)) == 1.0
    assert privacy.exact_copy_rate(train, patients(OTHERS)) == 0.0
    shifted = patients(
        [seq([list("AB"), list("C")], year=2001), seq([list("AB"), list("C")], age=40)]
    )  # POP[0] with another YEAR/AGE
    out = privacy.exact_copies(train, shifted, patients(OTHERS))
    assert (
        out["rate_full_sequence"] == 0.0
        and out["rate_ignoring_year_age"] == 1.0
        and out["held_out_rate_full_sequence"] == 0.0
    )


# ------------------------------------------------------------------------------ marginal baseline


def test_marginal_sampler_matches_marginals_and_grammar(synthetic_prepared: Path) -> None:
    vocab = Vocab.load(synthetic_prepared)
    real = load_split(synthetic_prepared, "train")
    m = marginal.fit(real, vocab)
    a = marginal.sample(m, vocab, 3000, seed=1)
    b = marginal.sample(m, vocab, 3000, seed=1)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.times, b.times)  # seeded
    space = TokenSpace.from_vocabs(vocab)
    pr, ps = summarize(real, space, space.ids(vocab)), summarize(a, space, space.ids(vocab))
    cols = space.of_kind("code")
    assert np.abs(fidelity.prevalence(pr, cols) - fidelity.prevalence(ps, cols)).max() < 0.05
    assert abs(pr.death.mean() - ps.death.mean()) < 0.05
    kinds = np.asarray(vocab.kinds)[a.tokens]
    starts = a.offsets[:-1]
    assert (kinds[starts] == "year").all() and (kinds[starts + 3] == "race").all()
    assert (a.tokens == vocab["[VS]"]).sum() == (a.tokens == vocab["[VE]"]).sum() == ps.n_visits.sum()
    same_seq = np.repeat(np.arange(len(a)), np.diff(a.offsets))
    assert (np.diff(a.times)[np.diff(same_seq) == 0] >= 0).all()  # times rebuilt, non-decreasing
    after_code = np.isin(a.tokens[1:], vocab.ids_of_kind("quantile"))
    assert (kinds[:-1][after_code] == "code").all()  # Q<k> only right after a code


def test_marginal_generate_writes_a_generate_like_folder(synthetic_prepared: Path, tmp_path: Path) -> None:
    info = marginal.generate(synthetic_prepared, tmp_path / "m", n=20, seed=0)
    out = tmp_path / "m"
    assert info["n_patients"] == 20 and (out / "vocab.json").is_file() and (out / marginal.MARKER).is_file()
    assert pq.read_schema(next((out / "tokens" / "train").glob("*.parquet"))).equals(SHARD_SCHEMA)
    assert len(load_split(out, "train")) == 20
    meds = pq.read_table(out / "meds" / "data" / "train" / "0.parquet")
    assert set(meds.column("subject_id").to_pylist()) == set(range(1, 21))
    codes = set(meds.column("code").to_pylist())
    assert "VISIT//OP" in codes or "VISIT//IP" in codes  # no real MEDS to map visit codes onto: token spelling kept
    visits = meds.filter(meds.column("visit_end").is_valid())
    assert len(visits) == (load_split(out, "train").tokens == Vocab.load(out)["[VS]"]).sum()


def test_source_code_map() -> None:
    got = marginal.source_code_map(VOCAB, ["Gender/F", "Gender/M", "Race/1", "Visit/IP", "SNOMED/1"])
    assert got == {"GENDER//F": "Gender/F", "GENDER//M": "Gender/M", "RACE//1": "Race/1", "VISIT//IP": "Visit/IP"}


# ------------------------------------------------------------------------------ task + report


def test_evaluate_task_renders_report(synthetic_prepared: Path, tmp_path: Path) -> None:
    from cehrx.tasks.evaluate import run

    syn = tmp_path / "syn"  # "synthetic" = a copy of the real train split: perfect fidelity, total leak
    (syn / "tokens").mkdir(parents=True)
    shutil.copytree(synthetic_prepared / "tokens" / "train", syn / "tokens" / "train")
    shutil.copyfile(synthetic_prepared / "vocab.json", syn / "vocab.json")
    out = tmp_path / "report"
    cfg = compose_cfg(
        "task=evaluate",
        f"data.prepared_dir={synthetic_prepared}",
        f"synthetic_dir={syn}",
        f"output_dir={out}",
        "evaluate.baseline=marginal",
        "evaluate.top_codes=10",
        "evaluate.nn_batch_size=16",
    )
    metrics = run(cfg)
    saved = json.loads((out / "metrics.json").read_text())
    model, base = saved["sets"]["model"], saved["sets"]["marginal"]
    assert model["fidelity"]["prevalence"]["pearson"] == pytest.approx(1.0)
    assert model["privacy"]["exact_copies"]["rate_full_sequence"] == 1.0 and model["privacy"]["dcr"]["zero_rate"] == 1.0
    assert model["privacy"]["membership_inference"]["auc"] == 1.0
    assert base["privacy"]["exact_copies"]["rate_full_sequence"] == 0.0
    assert base["fidelity"]["cooccurrence"]["pearson"] < model["fidelity"]["cooccurrence"]["pearson"]
    assert "no MEDS" in saved["utility_skipped"]  # the synthetic prepared dir has no MEDS dataset
    report = (out / "report.md").read_text()
    for fig in ("prevalence.png", "cooccurrence.png", "distributions.png", "categorical.png", "dcr.png"):
        assert f"]({fig})" in report and (out / fig).stat().st_size > 1000
    assert "| prevalence Pearson ↑ | 1.000 |" in report
    assert metrics["output_dir"] == str(out)
    with pytest.raises(CehrxError, match="overwrite=true"):
        run(cfg)


def test_evaluate_clear_errors(synthetic_prepared: Path, tmp_path: Path) -> None:
    from cehrx.tasks.evaluate import run

    with pytest.raises(CehrxError, match="nothing to evaluate"):
        run(compose_cfg("task=evaluate", f"data.prepared_dir={synthetic_prepared}", f"output_dir={tmp_path / 'a'}"))
    with pytest.raises(CehrxError, match="expected a generate output"):
        run(
            compose_cfg(
                "task=evaluate",
                f"data.prepared_dir={synthetic_prepared}",
                f"synthetic_dir={tmp_path}",
                f"output_dir={tmp_path / 'b'}",
            )
        )
    with pytest.raises(CehrxError, match="only baseline"):
        run(
            compose_cfg(
                "task=evaluate",
                f"data.prepared_dir={synthetic_prepared}",
                "evaluate.baseline=gan",
                f"output_dir={tmp_path / 'c'}",
            )
        )


def test_utility_skips_tasks_with_fixed_label_files(tmp_path: Path) -> None:
    from cehrx.eval.utility import utility
    from cehrx.probe.labels import available_tasks, shipped_labels

    fixed = [t for t in available_tasks() if shipped_labels(t) is not None]
    if not fixed:
        pytest.skip("no shipped task with fixed label files")
    out = utility(fixed[:1], tmp_path, {"model": tmp_path})
    assert "ships fixed labels" in out["model"]["tasks"][fixed[0]]["skipped"] and np.isnan(out["model"]["mean_ratio"])
