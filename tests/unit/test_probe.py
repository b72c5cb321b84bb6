"""Probe building blocks: leakage-free history cuts, labels (MEDS files and ACES), embeddings,
count features, metrics, predictions and the evaluation protocol."""

from __future__ import annotations

import datetime as dt
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from cehrx.data.history import cut_histories, load_all_splits
from cehrx.data.shards import PROMPT_LEN, TokenArrays
from cehrx.data.vocab import VS, Vocab
from cehrx.errors import CehrxError
from cehrx.eval.metrics import binary_metrics, expected_calibration_error
from cehrx.eval.predictions import read_predictions, write_predictions
from cehrx.eval.report import write_report
from cehrx.model.config import GPTConfig
from cehrx.model.transformer import GPT
from cehrx.probe.counts import AGE_COLUMN, count_features
from cehrx.probe.embed import embed, embed_unpacked
from cehrx.probe.evaluate import choose_protocol, stratified_sample
from cehrx.probe.labels import extract_labels, load_labels, times_seconds

DAY = 86400


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def prepared(synthetic_prepared: Path) -> tuple[TokenArrays, np.ndarray, Vocab]:
    arrays, split = load_all_splits(synthetic_prepared)
    return arrays, split, Vocab.load(synthetic_prepared)


@pytest.fixture(scope="module")
def gpt(prepared) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(name="t", vocab_size=len(prepared[2]), n_layer=2, n_embd=32, n_head=2, max_seq_len=256)).eval()


def mid_times(arrays: TokenArrays, rows: np.ndarray) -> np.ndarray:
    """A prediction time strictly inside each subject's record."""
    first = arrays.times[arrays.offsets[rows] + PROMPT_LEN]
    last = arrays.times[arrays.offsets[rows + 1] - 1]
    return first + (last - first) // 2


def plant_future(arrays: TokenArrays, rows: np.ndarray, t: np.ndarray, token: int) -> TokenArrays:
    """A copy where every token of `rows` after its prediction time is replaced by `token`."""
    tokens = arrays.tokens.copy()
    seq = np.repeat(np.arange(len(arrays)), arrays.lengths())
    t_of_row = np.full(len(arrays), np.iinfo(np.int64).max)
    t_of_row[rows] = t
    tokens[arrays.times > t_of_row[seq]] = token
    return TokenArrays(arrays.subject_id, arrays.offsets, tokens, arrays.times, arrays.birth_time)


def write_meds(root: Path, rows: list[tuple], extra: dict | None = None) -> Path:
    """A MEDS dataset dir from (subject_id, time, code[, numeric_value]) tuples."""
    d = root / "data" / "train"
    d.mkdir(parents=True, exist_ok=True)
    cols = {
        "subject_id": pa.array([r[0] for r in rows], pa.int64()),
        "time": pa.array([r[1] for r in rows], pa.timestamp("us")),
        "code": pa.array([r[2] for r in rows], pa.string()),
        "numeric_value": pa.array([r[3] if len(r) > 3 else None for r in rows], pa.float32()),
        **(extra or {}),
    }
    pq.write_table(pa.table(cols), d / "0.parquet")
    return root


def day(n: int, hms: tuple[int, int, int] = (23, 59, 59)) -> dt.datetime:
    return dt.datetime(2000, 1, 1, *hms) + dt.timedelta(days=n)


# --------------------------------------------------------------------------------------------
# history cut: no leakage, truncation at a visit with a recomputed prompt


def test_history_is_the_prefix_known_at_prediction_time(prepared) -> None:
    arrays, _, vocab = prepared
    rows = np.arange(len(arrays))
    t = mid_times(arrays, rows)
    h = cut_histories(arrays, vocab, arrays.subject_id[rows], t, max_len=10_000)
    assert len(h) == len(rows) and h.dropped == {"no_subject": 0, "no_token_before_prediction_time": 0}
    for i in range(0, len(rows), 7):
        tok, tim = arrays.subject(rows[i])
        want = tok[tim <= t[i]]
        got = h.tokens[h.offsets[i] : h.offsets[i + 1]]
        assert np.array_equal(got, want)
        assert h.last_time[i] == tim[tim <= t[i]].max() <= t[i]


def test_planted_future_event_changes_nothing(prepared, gpt) -> None:
    arrays, _, vocab = prepared
    rows = np.arange(0, len(arrays), 2)
    t = mid_times(arrays, rows)
    planted = plant_future(arrays, rows, t, vocab["[DEATH]"])
    assert not np.array_equal(planted.tokens, arrays.tokens)
    a = cut_histories(arrays, vocab, arrays.subject_id[rows], t, max_len=64)
    b = cut_histories(planted, vocab, arrays.subject_id[rows], t, max_len=64)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.offsets, b.offsets)
    assert np.array_equal(embed(gpt, a, progress=False), embed(gpt, b, progress=False))


def test_same_day_date_only_events_are_excluded(prepared) -> None:
    """Date-only events sit at 23:59:59: a prediction at noon that day cannot see them."""
    arrays, _, vocab = prepared
    i = int(np.argmax(arrays.lengths()))
    tok, tim = arrays.subject(i)
    day_end = int(tim[-1])  # the last visit's events, placed at 23:59:59 of their day
    times = arrays.times.copy()
    off = arrays.offsets[i]
    last_visit = off + np.flatnonzero(tok == vocab[VS])[-1]
    day_start = day_end - day_end % DAY
    times[last_visit : arrays.offsets[i + 1]] = day_start + DAY - 1  # the whole visit: 23:59:59
    dated = TokenArrays(arrays.subject_id, arrays.offsets, arrays.tokens, times, arrays.birth_time)
    noon = day_start + 12 * 3600
    h = cut_histories(dated, vocab, arrays.subject_id[[i, i]], np.array([noon, day_start + DAY - 1]), max_len=10_000)
    assert h.lengths()[0] == last_visit - off  # stops before the visit of that day
    assert h.lengths()[1] == arrays.lengths()[i]  # at 23:59:59 the day is known


def test_left_truncation_starts_at_a_visit_with_recomputed_prompt(prepared) -> None:
    arrays, _, vocab = prepared
    rows = np.flatnonzero(arrays.lengths() > 60)
    t = arrays.times[arrays.offsets[rows + 1] - 1]  # the whole record
    h = cut_histories(arrays, vocab, arrays.subject_id[rows], t, max_len=40)
    assert h.stats["truncated"] == len(rows) and (h.lengths() <= 40).all()
    for i, r in enumerate(rows):
        w = h.tokens[h.offsets[i] : h.offsets[i + 1]]
        wt = h.times[h.offsets[i] : h.offsets[i + 1]]
        tok, _ = arrays.subject(r)
        assert [vocab.kinds[x] for x in w[:PROMPT_LEN]] == ["year", "age", "gender", "race"]
        assert w[2] == tok[2] and w[3] == tok[3]  # gender and race carried over
        year = np.datetime64(int(wt[PROMPT_LEN]), "s").astype("datetime64[Y]").astype(int) + 1970
        assert vocab.tokens[w[0]] == f"YEAR//{year}"  # the year of the window's first visit
        if h.stats["truncated_mid_visit"] == 0:
            assert w[PROMPT_LEN] == vocab[VS]
        assert np.array_equal(w[PROMPT_LEN:], tok[len(tok) - (len(w) - PROMPT_LEN) :])


def test_a_window_that_starts_inside_a_visit_never_starts_on_an_orphan_value(prepared) -> None:
    """One long visit of (code, value) pairs: a window that must start inside it skips a leading value
    token whose code was cut off, so the history stays grammatical (zero-shot samples it constrained)."""
    from cehrx.data.shards import TokenArrays
    from cehrx.sampling.constraints import Grammar

    _, _, vocab = prepared
    code = next(i for i, k in enumerate(vocab.kinds) if k == "code")
    q = next(i for i, k in enumerate(vocab.kinds) if k == "quantile")
    head = [vocab.tokens.index(t) for t in ("YEAR//2000", "AGE//30")] + [
        next(i for i, t in enumerate(vocab.tokens) if t.startswith(p)) for p in ("GENDER//", "RACE//")
    ]
    body = [vocab[VS], vocab.tokens.index("VISIT//OP")] + [code, q] * 30
    tokens = np.array(head + body, dtype=np.int32)
    arrays = TokenArrays(
        np.array([7]), np.array([0, len(tokens)]), tokens, np.full(len(tokens), 10**9, dtype=np.int64), np.array([0])
    )
    grammar = Grammar.build(vocab)
    for max_len in (20, 21):  # the raw start falls on a value for one of the two parities
        h = cut_histories(arrays, vocab, np.array([7]), np.array([10**9]), max_len)
        assert h.stats["truncated_mid_visit"] == 1 and h.lengths()[0] <= max_len
        w = h.tokens[h.offsets[0] : h.offsets[1]]
        assert vocab.kinds[w[PROMPT_LEN + 2]] == "code", [vocab.tokens[x] for x in w[:8]]
        assert not grammar.is_free(grammar.prompt_states(w, np.array([0, len(w)])))[0]


def test_dropped_labels_are_counted(prepared) -> None:
    arrays, _, vocab = prepared
    first = arrays.times[arrays.offsets[0]]
    h = cut_histories(
        arrays,
        vocab,
        np.array([arrays.subject_id[0], arrays.subject_id[0], -5]),
        np.array([first - DAY, first + 10 * 365 * DAY, first]),
        64,
    )
    assert h.dropped == {"no_subject": 1, "no_token_before_prediction_time": 1}
    assert h.label_index.tolist() == [1]


def test_packed_embeddings_match_unpacked(prepared, gpt) -> None:
    arrays, _, vocab = prepared
    rows = np.arange(0, len(arrays), 3)
    h = cut_histories(arrays, vocab, arrays.subject_id[rows], mid_times(arrays, rows), max_len=64)
    for pooling in ("last", "mean"):
        packed = embed(gpt, h, pooling, max_tokens_per_batch=200, progress=False)
        ref = embed_unpacked(gpt, h, pooling)
        np.testing.assert_allclose(packed, ref, atol=2e-5)


# --------------------------------------------------------------------------------------------
# labels


NSAID_TASK = Path(__file__).resolve().parents[2] / "configs" / "aces" / "gibleed_after_nsaid.yaml"


def test_aces_task_on_a_tiny_meds_fixture(tmp_path: Path) -> None:
    nsaid, bleed = "RxNorm/140587", "SNOMED/74474003"
    meds = write_meds(
        tmp_path / "meds",
        [
            (1, None, "GENDER//F"),
            (1, day(0), "LOINC/1"),
            (1, day(10), nsaid),
            (1, day(100), bleed),  # positive
            (2, day(10), nsaid),
            (2, day(500), bleed),  # bleed too late
            (3, day(5), bleed),
            (3, day(10), nsaid),  # prior bleed: excluded
            (4, day(10), nsaid),
            (4, day(20), "RxNorm/3355"),
            (4, day(30), bleed),  # first exposure only
            (5, day(10), "LOINC/1"),  # never exposed
            (6, day(10), nsaid),
            (6, day(10), bleed),  # same day: not in target
        ],
    )
    labels = extract_labels(str(NSAID_TASK), meds)
    got = {(r["subject_id"], r["prediction_time"], r["boolean_value"]) for r in labels.to_pylist()}
    assert got == {(1, day(10), True), (2, day(10), False), (4, day(10), True)}


def test_readmission_task_triggers_at_visit_end(tmp_path: Path) -> None:
    task = Path(__file__).resolve().parents[2] / "configs" / "aces" / "synthea_readmission_30d.yaml"
    rows = [(1, day(0), "Visit/IP"), (1, day(40), "Visit/IP"), (1, day(45), "Visit/IP"), (2, day(3), "Visit/OP")]
    ends = pa.array([day(2), day(41), day(47), day(3)], pa.timestamp("us"))
    labels = extract_labels(str(task), write_meds(tmp_path / "meds", rows, {"visit_end": ends}))
    got = [(r["subject_id"], r["prediction_time"], r["boolean_value"]) for r in labels.to_pylist()]
    # discharged day 2 -> next admission day 40 (38 days later): no; day 41 -> day 45: yes; day 47: no
    assert got == [(1, day(2), False), (1, day(41), True), (1, day(47), False)]


def test_load_labels_reads_a_directory_and_names_bad_files(tmp_path: Path) -> None:
    d = tmp_path / "labels"
    (d / "a").mkdir(parents=True)
    t = pa.table(
        {
            "subject_id": pa.array([1, 2], pa.int32()),
            "prediction_time": pa.array([day(1), day(2)], pa.timestamp("ms")),
            "boolean_value": [True, False],
            "extra": ["x", "y"],
        }
    )
    pq.write_table(t, d / "a" / "0.parquet")
    pq.write_table(t.slice(0, 1), d / "1.parquet")  # an exact duplicate is dropped
    labels = load_labels(d)
    assert labels.schema.names == ["subject_id", "prediction_time", "boolean_value"] and len(labels) == 2
    assert labels.schema.field("prediction_time").type == pa.timestamp("us")
    assert times_seconds(labels.column("prediction_time")).tolist() == [
        int(day(1).replace(tzinfo=dt.UTC).timestamp()),
        int(day(2).replace(tzinfo=dt.UTC).timestamp()),
    ]
    pq.write_table(t.drop(["boolean_value"]), d / "2.parquet")
    with pytest.raises(CehrxError, match=r"2.parquet.*boolean_value"):
        load_labels(d)
    with pytest.raises(CehrxError, match="no such file"):
        load_labels(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# count features


def test_count_features_see_only_the_past(tmp_path: Path) -> None:
    rows = [
        (1, None, "GENDER//F"),
        (1, dt.datetime(1950, 1, 1), "MEDS_BIRTH"),
        (1, day(0), "A"),
        (1, day(0), "A"),
        (1, day(5), "B"),
        (1, day(9), "C"),  # C: same day, 23:59:59
        (2, day(1), "A"),
    ]
    meds = write_meds(tmp_path / "meds", rows)
    labels = pa.table(
        {
            "subject_id": pa.array([1, 1, 2], pa.int64()),
            "prediction_time": pa.array([day(9, (12, 0, 0)), day(9), day(0)], pa.timestamp("us")),
            "boolean_value": [True, False, False],
        }
    )
    X, names = count_features(meds, labels)
    X = X.toarray()
    col = {n: i for i, n in enumerate(names)}
    assert X[0, col["A"]] == 2 and X[0, col["B"]] == 1 and X[0, col["C"]] == 0  # noon: C not yet
    assert X[1, col["C"]] == 1 and X[0, col["GENDER//F"]] == 1
    assert X[2].sum() == 1 and X[2, col["AGE_UNKNOWN"]] == 1  # nothing before day 0 23:59:59... except age flag
    assert X[0, col[AGE_COLUMN]] == pytest.approx(50.0, abs=0.1)
    planted = write_meds(tmp_path / "meds2", rows + [(1, day(10), "A"), (1, day(9, (13, 0, 0)), "D")])
    X2, _ = count_features(planted, labels, vocabulary=names[:-2])
    assert np.array_equal(X2.toarray()[0], X[0])  # later events change nothing for the noon label


# --------------------------------------------------------------------------------------------
# metrics, predictions, report


def test_metrics_match_sklearn_and_known_values() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(400) < 0.25
    p = np.clip(np.round(0.2 + 0.4 * y + 0.3 * rng.standard_normal(400), 2), 0, 1)
    sid = rng.integers(0, 150, 400)
    m = binary_metrics(y, p, sid, n_boot=300, seed=0)
    assert m["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))
    assert m["auprc"]["value"] == pytest.approx(average_precision_score(y, p))
    assert m["brier"]["value"] == pytest.approx(brier_score_loss(y, p))
    for k in ("auroc", "auprc", "brier", "ece"):
        assert m[k]["ci_low"] <= m[k]["value"] <= m[k]["ci_high"]
    assert m["n"] == 400 and m["n_pos"] == int(y.sum()) and m["n_boot_valid"] == 300
    perfect = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]), np.arange(4), n_boot=50)
    assert perfect["auroc"]["value"] == 1.0 and perfect["auprc"]["value"] == 1.0
    assert perfect["brier"]["value"] == pytest.approx((0.01 + 0.04 + 0.04 + 0.01) / 4)
    assert perfect["ece"]["value"] == pytest.approx(0.15)  # bins: 0.1,0.2 -> |0-.15|*2/4 ; .8,.9 -> |1-.85|*2/4
    assert (
        binary_metrics(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9]), np.arange(4), n_boot=0)["auroc"]["value"]
        == 0.0
    )
    single = binary_metrics(np.zeros(5), np.full(5, 0.1), np.arange(5), n_boot=20)
    assert math.isnan(single["auroc"]["value"]) and single["brier"]["value"] == pytest.approx(0.01)
    assert expected_calibration_error(np.array([1, 0, 1, 0]), np.full(4, 0.5)) == 0.0


def test_bootstrap_resamples_subjects_not_rows() -> None:
    """One subject with many rows: a row bootstrap would look far more certain."""
    y = np.array([1] * 50 + [0] * 50 + [1, 0] * 5)
    p = np.array([0.9] * 50 + [0.1] * 50 + [0.4, 0.6] * 5)
    one_subject_each_half = np.array([0] * 50 + [1] * 50 + list(range(2, 12)))
    grouped = binary_metrics(y, p, one_subject_each_half, n_boot=400, seed=3)
    rows = binary_metrics(y, p, np.arange(len(y)), n_boot=400, seed=3)
    width = lambda m: m["auroc"]["ci_high"] - m["auroc"]["ci_low"]
    assert width(grouped) > width(rows)


def test_predictions_validate_against_meds_evaluation(tmp_path: Path) -> None:
    from meds_evaluation.schema import PredictionSchema

    t = pa.array([day(1), day(2), day(3)], pa.timestamp("us"))
    path = write_predictions(tmp_path / "p" / "predictions.parquet", [1, 2, 3], t, [True, False, True], [0.9, 0.2, 0.4])
    table = pq.read_table(path)
    PredictionSchema.validate(table)
    assert table.column("predicted_boolean_value").to_pylist() == [True, False, False]
    assert read_predictions(path).num_rows == 3
    secs = np.array([0, DAY], dtype=np.int64)  # int64 seconds are accepted too
    assert pq.read_table(write_predictions(tmp_path / "s.parquet", [1, 2], secs, [1, 0], [0.5, 0.5])).column(
        "prediction_time"
    )[1].as_py() == dt.datetime(1970, 1, 2)
    with pytest.raises(CehrxError):
        write_predictions(tmp_path / "bad.parquet", [1], np.array([1.5]), [True], [0.5])


def test_report_has_table_and_roc(tmp_path: Path) -> None:
    y = np.array([0, 1, 0, 1, 1, 0])
    p = np.array([0.1, 0.8, 0.3, 0.6, 0.4, 0.2])
    rows = {
        "probe": binary_metrics(y, p, np.arange(6), n_boot=50),
        "counts": binary_metrics(y, 1 - p, np.arange(6), n_boot=50),
    }
    path = write_report(tmp_path, "Linear probe: t", rows, {k: (y, p) for k in rows}, sections={"Few-shot": "| a |"})
    text = path.read_text()
    assert (
        "| probe | 1.000 [" in text
        and "| counts | 0.000 [" in text
        and "![ROC curves](roc.png)" in text
        and "## Few-shot" in text
    )
    assert (tmp_path / "roc.png").stat().st_size > 1000


# --------------------------------------------------------------------------------------------
# protocol


def test_protocol_falls_back_to_cv_when_held_out_is_small() -> None:
    rng = np.random.default_rng(0)
    sid = np.repeat(np.arange(60), 2)
    split = np.where(sid < 50, "train", np.where(sid < 55, "tuning", "held_out"))
    y = rng.random(120) < 0.3
    auto = choose_protocol(split, y, sid, "auto", 10, 5, 0)
    assert auto.mode == "cv" and len(auto.folds) == 5
    assert sorted(auto.test_rows.tolist()) == list(range(120))
    for train, test in auto.folds:
        assert not set(sid[train]) & set(sid[test])  # a subject never straddles folds
    forced = choose_protocol(split, y, sid, "split", 10, 5, 0)
    assert forced.mode == "split" and set(split[forced.folds[0][1]]) == {"held_out"}


def test_stratified_sample_keeps_both_classes() -> None:
    y = np.array([True] * 3 + [False] * 97)
    idx = stratified_sample(y, 16, np.random.default_rng(0))
    assert len(idx) == 16 and y[idx].sum() == 1 and len(set(idx)) == 16


def test_logistic_reports_its_training_cv_auroc() -> None:
    """`cv_auroc` is the fold-mean AUROC at the chosen C on the training rows (a recipe can be
    compared without the test rows): high for a real signal, near 0.5 for noise."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from cehrx.probe.classifier import cv_splits, fit_predict

    rng = np.random.default_rng(0)
    n = 400
    groups = np.repeat(np.arange(n // 2), 2)
    y = rng.random(n) < 0.3
    signal = rng.normal(size=(n, 6)) + 0.8 * y[:, None] * (np.arange(6) < 2)
    info: dict = {}
    fit_predict(signal, y, signal[:3], seed=1, groups=groups, info=info)
    X = StandardScaler().fit_transform(signal)
    folds = [
        roc_auc_score(y[b], LogisticRegression(C=info["C"], max_iter=5000).fit(X[a], y[a]).decision_function(X[b]))
        for a, b in cv_splits(y, groups, 1)
    ]
    assert info["cv_auroc"] == pytest.approx(np.mean(folds), abs=2e-3) and info["cv_auroc"] > 0.75
    noise: dict = {}
    fit_predict(rng.normal(size=(n, 6)), y, signal[:3], seed=1, groups=groups, info=noise)
    assert 0.35 < noise["cv_auroc"] < 0.65


def test_report_sections_under_cross_fitting() -> None:
    from cehrx.probe.report import report_sections

    result = {
        "labels": {
            "in": 74,
            "used": 74,
            "positives": 9,
            "dropped": {"no_subject": 0},
            "by_split": {"held_out": {"n": 6, "n_pos": 0, "subjects": 4}},
        },
        "evaluation": "cv5",
        "history": {"max_len": 256, "mean_tokens": 200.0, "truncated": 3, "pooling": "last"},
        "scored": {
            "labels": 74,
            "positives": 9,
            "subjects": 60,
            "positive_subjects": 9,
            "pretraining_labels": 50,
            "pretraining_subjects": 40,
        },
        "few_shot": {},
    }
    sections = report_sections(result)
    assert list(sections) == ["Data"] and "cv5 subject-grouped cross-fitting" in sections["Data"]
    assert (
        "9 with a positive label" in sections["Data"]
        and "50 scored labels (40 subjects) are from the `train` split" in sections["Data"]
    )
    result["scored"].update(pretraining_labels=0, pretraining_subjects=0)
    assert "pretrained on" not in report_sections(result)["Data"]


def test_scored_rows_count_positive_subjects_and_pretraining_overlap() -> None:
    """Held-out scoring never touches pretraining subjects; cross-fitting does, and says how many."""
    from cehrx.probe.evaluate import choose_protocol, scored_rows

    split = np.array(["train"] * 40 + ["tuning"] * 20 + ["held_out"] * 20)
    groups = np.arange(80) // 2  # two labels per subject
    y = np.zeros(80, bool)
    y[[41, 60, 61, 62, 70]] = True  # one tuning positive; held_out rows 60-62 and 70 are subjects 30, 30, 31 and 35
    y[:40:4] = True
    held = scored_rows(split, y, groups, choose_protocol(split, y, groups, "split", 1, 5, 0))
    assert held == {
        "labels": 20,
        "positives": 4,
        "subjects": 10,
        "positive_subjects": 3,
        "pretraining_labels": 0,
        "pretraining_subjects": 0,
    }
    cv = scored_rows(split, y, groups, choose_protocol(split, y, groups, "cv", 1, 5, 0))
    assert cv["labels"] == 80 and cv["pretraining_labels"] == 40 and cv["pretraining_subjects"] == 20


def test_protocol_tests_on_the_requested_split_and_never_trains_on_held_out() -> None:
    from cehrx.probe.evaluate import choose_protocol

    split = np.array(["train"] * 40 + ["tuning"] * 20 + ["held_out"] * 20)
    y = np.tile([True, False], 40)
    groups = np.arange(80)
    held = choose_protocol(split, y, groups, "split", 1, 5, 0)
    ((train, test),) = held.folds
    assert set(split[train]) == {"train", "tuning"} and set(split[test]) == {"held_out"}
    tuning = choose_protocol(split, y, groups, "split", 1, 5, 0, test_split="tuning")
    ((train, test),) = tuning.folds
    assert set(split[train]) == {"train"} and set(split[test]) == {"tuning"}


# --------------------------------------------------------------------------------------------
# scale: several readouts in one pass, the feature store, training-label thinning, follow-up


def test_one_pass_gives_every_readout_and_take_selects_histories(prepared, gpt) -> None:
    from cehrx.probe.embed import embed_poolings

    arrays, _, vocab = prepared
    rows = np.arange(len(arrays))
    h = cut_histories(arrays, vocab, arrays.subject_id[rows], mid_times(arrays, rows), max_len=64)
    both = embed_poolings(gpt, h, ("last", "mean"), max_tokens_per_batch=300, progress=False)
    for pooling in ("last", "mean"):
        np.testing.assert_array_equal(both[pooling], embed(gpt, h, pooling, max_tokens_per_batch=300, progress=False))
    idx = np.array([5, 0, 3])
    sub = h.take(idx)
    assert [sub.tokens[sub.offsets[i] : sub.offsets[i + 1]].tolist() for i in range(3)] == [
        h.tokens[h.offsets[i] : h.offsets[i + 1]].tolist() for i in idx
    ]
    np.testing.assert_allclose(embed(gpt, sub, "mean", progress=False), both["mean"][idx], atol=2e-5)


def test_feature_cache_embeds_each_history_once(prepared, gpt, tmp_path: Path) -> None:
    from cehrx.probe.embed import embed_poolings
    from cehrx.probe.feature_cache import READOUTS, FeatureCache

    arrays, _, vocab = prepared
    rows = np.arange(len(arrays))
    h = cut_histories(arrays, vocab, arrays.subject_id[rows], mid_times(arrays, rows), max_len=64)
    sid = arrays.subject_id[rows][h.label_index]
    calls = []

    def compute(r):
        calls.append(len(r))
        return embed_poolings(gpt, h.take(r), READOUTS, progress=False)

    cache = FeatureCache(tmp_path, {"model": "m", "max_len": 64})
    half = np.arange(len(h)) % 2 == 0
    first, found = cache.get(sid[half], h.last_time[half], lambda r: compute(np.flatnonzero(half)[r]))
    assert found == 0 and calls == [int(half.sum())]
    feats, found = FeatureCache(tmp_path, {"model": "m", "max_len": 64}).get(sid, h.last_time, compute)
    assert found == int(half.sum()) and calls[-1] == int((~half).sum())  # only the missing half is embedded
    ref = embed_poolings(gpt, h, READOUTS, progress=False)
    for r in READOUTS:
        np.testing.assert_allclose(feats[r], ref[r], atol=2e-5)
        np.testing.assert_array_equal(feats[r][half], first[r])
    again, found = FeatureCache(tmp_path, {"model": "m", "max_len": 64}).get(sid, h.last_time, compute)
    assert found == len(h) and len(calls) == 2
    assert not list(tmp_path.rglob(".*tmp*")), "no temporary part is left behind"
    _, found = FeatureCache(tmp_path, {"model": "other", "max_len": 64}).get(sid[:3], h.last_time[:3], compute)
    assert found == 0, "another model never reads these features"
    twice = np.array([4, 1, 4, 1, 2])  # one query asking for the same histories twice: each embedded once
    n_calls = len(calls)
    dup, found = FeatureCache(tmp_path, {"model": "dup", "max_len": 64}).get(
        sid[twice], h.last_time[twice], lambda r: compute(twice[r])
    )
    assert found == 0 and calls[n_calls:] == [3]
    np.testing.assert_allclose(dup["last"], ref["last"][twice], atol=2e-5)


def test_thinning_keeps_the_test_split_and_the_same_times_for_every_task(prepared) -> None:
    from cehrx.data.hashing import unit_hash
    from cehrx.probe.cohort import thin_training_labels

    arrays, split, _ = prepared
    sid = np.repeat(arrays.subject_id, 20)
    t = np.tile(np.arange(20) * DAY, len(arrays)) + 10**9
    table = pa.table(
        {
            "subject_id": sid,
            "prediction_time": pa.array(t * 10**6, pa.timestamp("us")),
            "boolean_value": np.arange(len(sid)) % 3 == 0,
        }
    )
    kept, info = thin_training_labels(table, arrays, split, 0.25, "held_out")
    kept_split = split[np.searchsorted(arrays.subject_id, kept.column("subject_id").to_numpy())]
    assert (kept_split == "held_out").sum() == (np.repeat(split, 20) == "held_out").sum()
    frac = (kept_split != "held_out").sum() / (np.repeat(split, 20) != "held_out").sum()
    assert 0.15 < frac < 0.35 and info["dropped"] == len(table) - len(kept)
    flipped = table.set_column(2, "boolean_value", pa.array(~table.column("boolean_value").to_numpy()))
    again, _ = thin_training_labels(flipped, arrays, split, 0.25, "held_out")
    assert again.column("prediction_time").equals(kept.column("prediction_time")), (
        "the outcome never decides what is kept"
    )
    u = unit_hash(np.arange(10000), np.full(10000, -2_000_000_000, np.int64))  # times before 1970 too
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
    with pytest.raises(CehrxError, match="train_label_fraction"):
        thin_training_labels(table, arrays, split, 0.0, "held_out")


def test_followup_drops_labels_whose_window_runs_past_the_data(tmp_path: Path) -> None:
    from cehrx.probe.labels import apply_followup, followup_days

    task = tmp_path / "t.yaml"
    task.write_text(NSAID_TASK.read_text() + "\nmetadata:\n  cehrx_followup_days: 30\n")
    assert followup_days(str(task)) == 30
    meds = write_meds(
        tmp_path / "meds",
        [
            (1, day(10), "RxNorm/140587"),
            (2, day(80), "RxNorm/140587"),
            (3, day(100), "LOINC/1"),  # data end: day 100
        ],
    )
    labels = extract_labels(str(task), meds)
    assert labels.column("subject_id").to_pylist() == [1]  # day 80 + 30 > day 100: dropped
    table = pa.table(
        {"subject_id": [1], "prediction_time": pa.array([day(0)], pa.timestamp("us")), "boolean_value": [True]}
    )
    assert len(apply_followup(table, None, day(1), "x")) == 1
    task.write_text(NSAID_TASK.read_text() + "\nmetadata:\n  cehrx_followup_days: soon\n")
    with pytest.raises(CehrxError, match="cehrx_followup_days"):
        followup_days(str(task))


def test_count_columns_are_chosen_on_training_rows_only() -> None:
    import scipy.sparse as sp

    from cehrx.probe.counts import frequent_columns

    X = sp.csr_matrix(np.array([[1, 0, 0], [1, 0, 0], [0, 1, 1], [0, 1, 1], [0, 1, 1]]))
    assert frequent_columns(X, np.array([0, 1]), 2).tolist() == [True, False, False]  # rows 2-4 (test) never decide
    assert frequent_columns(X, np.arange(5), 2).tolist() == [True, True, True]


def test_window_counts_are_the_tokens_of_each_history() -> None:
    from cehrx.probe.counts import window_counts

    X = window_counts(np.array([3, 5, 5, 7, 3]), np.array([0, 3, 5]), 8)
    assert (
        X.shape == (2, 8)
        and X.toarray()[0].tolist() == [0, 0, 0, 1, 0, 2, 0, 0]
        and X.toarray()[1].tolist() == [0, 0, 0, 1, 0, 0, 0, 1]
    )


def test_one_precedence_rule_for_labels(tmp_path: Path) -> None:
    """labels_dir wins over probe.task (whose outcome zero-shot still reads); neither is an error."""
    from omegaconf import OmegaConf

    from cehrx.probe.labels import read_labels

    d = tmp_path / "labels"
    d.mkdir()
    pq.write_table(
        pa.table(
            {"subject_id": [1], "prediction_time": pa.array([day(3)], pa.timestamp("us")), "boolean_value": [True]}
        ),
        d / "0.parquet",
    )
    both = OmegaConf.create({"labels_dir": str(d), "probe": {"task": "gibleed_after_nsaid"}})
    table, source = read_labels(both, tmp_path / "no_prepared_dir_needed")
    assert source == {"labels_dir": str(d)} and len(table) == 1
    with pytest.raises(CehrxError, match="no labels"):
        read_labels(OmegaConf.create({"labels_dir": None, "probe": {"task": None}}), tmp_path)


def test_label_cache_reuses_a_result_until_the_task_or_the_data_changes(tmp_path: Path, monkeypatch) -> None:
    import cehrx.probe.labels as L

    task = tmp_path / "t.yaml"
    task.write_text(NSAID_TASK.read_text())
    rows = [(1, day(10), "RxNorm/140587"), (1, day(100), "SNOMED/74474003"), (2, day(10), "RxNorm/140587")]
    meds = write_meds(tmp_path / "meds", rows)
    cache = tmp_path / "cache"
    first = extract_labels(str(task), meds, cache_dir=cache)
    assert len(list(cache.glob("t-*.parquet"))) == 1 and not list(cache.glob(".*"))  # no temporary left behind
    calls = []
    monkeypatch.setattr(L, "_run_aces", lambda *a: calls.append(a) or L.LABEL_SCHEMA.empty_table())
    assert extract_labels(str(task), meds, cache_dir=cache).equals(first) and not calls  # read back, ACES not run
    task.write_text(NSAID_TASK.read_text() + "\n# edited\n")
    extract_labels(str(task), meds, cache_dir=cache)
    assert len(calls) == 1  # a new task text: ACES again
    write_meds(tmp_path / "meds", rows + [(3, day(10), "RxNorm/140587")])
    extract_labels(str(task), meds, cache_dir=cache)
    assert len(calls) == 2 and len(list(cache.glob("t-*.parquet"))) == 3  # new data: a new entry
    # the same files copied elsewhere (new paths, new times): the entry is found again
    copy = shutil.copytree(meds, tmp_path / "copy", copy_function=shutil.copy)
    extract_labels(str(task), copy, cache_dir=cache)
    assert len(calls) == 2
    # one byte changed, size and modification time kept: a miss, never stale labels
    f = next((copy / "data").rglob("*.parquet"))
    st, data = f.stat(), bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    extract_labels(str(task), copy, cache_dir=cache)
    assert len(calls) == 3


def test_paired_difference_uses_the_same_draws_for_every_method() -> None:
    from cehrx.eval.metrics import paired_difference

    rng = np.random.default_rng(0)
    sid = np.repeat(np.arange(150), 4)
    y = rng.random(len(sid)) < 0.3
    noise = rng.random(len(sid))
    good = (y + noise) / 2  # a better score than the noise alone
    same = paired_difference(y, sid, noise, [noise, noise], n_boot=200)
    assert same["auroc"]["value"] == 0 and same["auroc"]["ci_low"] == same["auroc"]["ci_high"] == 0, (
        "paired: identical scores differ by exactly 0"
    )
    other = rng.random(len(sid))
    d = paired_difference(y, sid, good, [noise, other], n_boot=200)
    assert d["auroc"]["ci_low"] > 0.2 and d["auroc"]["beats"] == 2 and d["n_controls"] == 2
    assert d["auroc"]["value"] == pytest.approx(
        roc_auc_score(y, good) - (roc_auc_score(y, noise) + roc_auc_score(y, other)) / 2
    )
