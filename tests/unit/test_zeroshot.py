"""Zero-shot: outcome windows from ACES configs, window arithmetic on futures, the denominator rule,
no leakage, determinism, the REACH estimator."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cehrx.data.decode import token_seconds
from cehrx.data.history import cut_histories, load_all_splits
from cehrx.data.shards import segment_cumsum
from cehrx.data.vocab import VS, Vocab
from cehrx.errors import CehrxError
from cehrx.model.config import GPTConfig
from cehrx.model.transformer import GPT
from cehrx.sampling import STOP_DEATH, STOP_END, STOP_TIME, STOP_TOKENS, Engine, SamplingConfig
from cehrx.sampling.constraints import Grammar
from cehrx.zeroshot.outcome import Outcome, Window, resolve_outcome
from cehrx.zeroshot.predict import LabelInputs, ZeroshotConfig, finalize_probabilities, predict_chunk, zeroshot_engine
from cehrx.zeroshot.reach import InWindow
from cehrx.zeroshot.score import aggregate, score_futures, step_in_window

DAY = 86400


@pytest.fixture(scope="module")
def vocab(synthetic_prepared: Path) -> Vocab:
    return Vocab.load(synthetic_prepared)


def ids(vocab: Vocab, *seqs: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat tokens/offsets from space-separated token strings."""
    toks = [[vocab[t] for t in s.split()] for s in seqs]
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in toks])]).astype(np.int64)
    return np.concatenate([np.asarray(t, dtype=np.int64) for t in toks]), offsets


def outcome_of(vocab: Vocab, window: Window, code: str = "SNOMED/101") -> Outcome:
    return Outcome("t", [code], np.array([vocab[code]]), window)


def score(vocab: Vocab, outcome: Outcome, seqs: list[str], stop: list[int], slack_days: list[float] | None = None):
    tokens, offsets = ids(vocab, *seqs)
    slack = np.asarray([int(d * DAY) for d in (slack_days or [0] * len(seqs))], dtype=np.int64)
    return score_futures(vocab, outcome, tokens, offsets, np.asarray(stop, dtype=np.int8), slack)


# ------------------------------------------------------------------------------ window arithmetic


def test_outcome_just_inside_and_just_outside_the_window(vocab: Vocab) -> None:
    out = outcome_of(vocab, Window(end_days=365))
    s = score(
        vocab,
        out,
        [
            "[VE] D365 [VS] VISIT//OP SNOMED/101",  # exactly at the end: inside (end inclusive)
            "[VE] D366 [VS] VISIT//OP SNOMED/101",  # one day late: outside, and the window has passed
            "SNOMED/101 [VE]",  # rest of the current visit: inside
        ],
        [STOP_TIME, STOP_TIME, STOP_TOKENS],
    )
    assert s.has_outcome.tolist() == [True, False, True]
    assert s.resolved.tolist() == [True, True, True]
    assert s.days_to_outcome[0] == 365 and math.isnan(s.days_to_outcome[1]) and s.days_to_outcome[2] == 0
    exclusive = outcome_of(vocab, Window(end_days=365, end_inclusive=False))
    assert score(vocab, exclusive, ["[VE] D365 [VS] VISIT//OP SNOMED/101"], [STOP_TIME]).has_outcome.tolist() == [False]


def test_time_tokens_are_summed_across_gaps_and_inpatient_time(vocab: Vocab) -> None:
    out = outcome_of(vocab, Window(end_days=365))
    inside = "[VE] D200 [VS] VISIT//IP SNOMED/100 i-D1 SNOMED/102 [VE] D100 [VS] VISIT//OP [VE] D64 [VS] VISIT//OP SNOMED/101"
    outside = inside.replace("D64", "D65")
    years = "[VE] Y3 [VS] VISIT//OP SNOMED/101"  # 3 * 365.25 days: far outside
    s = score(vocab, out, [inside, outside, years], [STOP_TIME] * 3)
    assert s.has_outcome.tolist() == [True, False, False]
    assert s.days_to_outcome[0] == 365


def test_window_start_and_prediction_after_last_event(vocab: Vocab) -> None:
    # prediction time 10 days after the last history event: offsets are counted from the prediction time
    out = outcome_of(vocab, Window(end_days=365))
    s = score(
        vocab,
        out,
        [
            "[VE] D375 [VS] VISIT//OP SNOMED/101",
            "[VE] D376 [VS] VISIT//OP SNOMED/101",
            "[VE] D3 [VS] VISIT//OP SNOMED/101",
        ],
        [STOP_TIME] * 3,
        slack_days=[10, 10, 10],
    )
    assert s.has_outcome.tolist() == [True, False, True]
    assert s.days_to_outcome[2] == 0  # rebuilt before the prediction time: placed just after it
    gap = outcome_of(vocab, Window(start_days=2, end_days=30))  # a gap window: days (2, 30]
    s = score(
        vocab,
        gap,
        ["SNOMED/101 [VE]", "[VE] D2 [VS] VISIT//OP SNOMED/101", "[VE] D3 [VS] VISIT//OP SNOMED/101"],
        [STOP_TOKENS, STOP_TOKENS, STOP_TIME],
    )
    assert s.has_outcome.tolist() == [False, False, True]


def test_within_next_visits(vocab: Vocab) -> None:
    out = outcome_of(vocab, Window(visits=1))
    s = score(
        vocab,
        out,
        [
            "[VE] D5 [VS] VISIT//OP SNOMED/101 [VE]",  # first next visit: inside
            "[VE] D5 [VS] VISIT//OP [VE] D5 [VS] VISIT//OP SNOMED/101",  # second: outside, window passed
            "[VE] D5 [VS] VISIT//OP SNOMED/100",  # still in visit 1 when the tokens ran out: unresolved
        ],
        [STOP_TOKENS] * 3,
    )
    assert s.has_outcome.tolist() == [True, False, False]
    assert s.resolved.tolist() == [True, True, False]


def test_value_constrained_outcome_needs_an_allowed_decile(vocab: Vocab) -> None:
    q_hi = np.array([vocab["Q9"], vocab["Q10"]])
    out = Outcome(
        "t", ["SNOMED/101"], np.array([vocab["SNOMED/101"]]), Window(end_days=30), allowed_q={vocab["SNOMED/101"]: q_hi}
    )
    s = score(
        vocab, out, ["SNOMED/101 Q10 [VE]", "SNOMED/101 Q2 [VE]", "SNOMED/101"], [STOP_END, STOP_END, STOP_TOKENS]
    )
    assert s.has_outcome.tolist() == [True, False, False]


def test_hazard_sums_each_steps_outcome_probability_inside_the_window_until_the_first_outcome(vocab: Vocab) -> None:
    """Per token: the probability the sampler gave an outcome at that step. A step counts when an
    outcome drawn there would lie inside the window (the time of the tokens before it) and no
    outcome came before it in the window; a first outcome that needs a value adds its indicator."""
    out = outcome_of(vocab, Window(start_days=2, end_days=30))
    seqs = [
        "SNOMED/100 [VE] D3 [VS] VISIT//OP SNOMED/100 SNOMED/101 SNOMED/100 [VE] D40 [VS] VISIT//OP SNOMED/100",
        "[VE] D20 [VS] VISIT//OP SNOMED/100 [VE] D20 [VS] VISIT//OP SNOMED/100",
    ]
    tokens, offsets = ids(vocab, *seqs)
    p = np.linspace(0.01, 0.2, len(tokens))
    s = score_futures(vocab, out, tokens, offsets, np.array([STOP_TIME, STOP_TIME], np.int8), np.zeros(2, np.int64), p)
    # future 0: the window opens after D3 (day 3 > 2): steps 3..6 ([VS] VISIT//OP SNOMED/100 SNOMED/101); SNOMED/101 is the first outcome
    # (D3 itself is priced at day 0, before the window, since a code drawn instead of D3 would be at day 0)
    # future 1: steps 2..6 lie at day 20 (the second D20 moves the rest to day 40, outside)
    n0 = len(seqs[0].split())
    np.testing.assert_allclose(s.hazard, [p[3:7].sum(), p[n0 + 2 : n0 + 7].sum()])
    assert s.has_outcome.tolist() == [True, False]
    np.testing.assert_allclose(s.hazard_days[0], 3 * p[3:7].sum())
    np.testing.assert_allclose(s.cif[:, -1], s.hazard)  # the curve at days 3, 6, ..., 30
    assert s.cif[0, 0] == s.hazard[0] and s.cif[1, 5] == 0 and s.cif[1, 6] == s.hazard[1]  # future 1's terms at day 20
    valued = Outcome(
        "t",
        ["SNOMED/101"],
        np.array([vocab["SNOMED/101"]]),
        Window(end_days=30),
        allowed_q={vocab["SNOMED/101"]: np.array([vocab["Q10"]])},
    )
    tokens, offsets = ids(vocab, "SNOMED/100 SNOMED/101 Q10 SNOMED/100 [VE]", "SNOMED/100 SNOMED/101 Q2 [VE]")
    # the control variates' step weights (b = 1 for every token, E_t[b] = 0: M counts the weighted steps) must
    # not depend on the draw they weigh: a valued first outcome is known at its value's step, which keeps its
    # weight whether or not the value makes it an outcome (future 0: steps 0..2; future 1: every step)
    s = score_futures(
        vocab,
        valued,
        tokens,
        offsets,
        np.array([STOP_END, STOP_END], np.int8),
        np.zeros(2, np.int64),
        np.full(len(tokens), 0.1),
        control_mean=np.zeros((len(tokens), 1), np.float32),
        control_basis=np.ones((len(vocab), 1), np.float32),
    )
    np.testing.assert_allclose(
        s.hazard, [0.2 + 1.0, 0.4]
    )  # priced steps up to the first outcome, then its realised indicator
    np.testing.assert_allclose(s.controls[:, 0], [3, 4])


@pytest.mark.parametrize("end_inclusive", [True, False])
def test_hazard_reads_window_edges_and_budget_cuts_as_the_monte_carlo_count(vocab: Vocab, end_inclusive: bool) -> None:
    """Same futures, same rules: an outcome exactly at the window's end counts for the count iff the end is
    inclusive, and the hazard prices that day's steps under the same rule; a future past the end is a
    resolved negative for both, priced only up to the end; a future cut by the token budget inside the window
    is unresolved for both and left out of the hazard's mean; a label with no resolved future gets the run's
    hazard rate (the count's fallback rule)."""
    out = outcome_of(vocab, Window(end_days=30, end_inclusive=end_inclusive))
    seqs = [
        "[VE] D30 [VS] VISIT//OP SNOMED/101",  # the outcome at day 30: the window's end (resolved either way)
        "[VE] D31 [VS] VISIT//OP SNOMED/101",  # day 31: past the end
        "[VE] D10 [VS] VISIT//OP SNOMED/100",  # the token budget ran out at day 10
        "[VE] D10 [VS] VISIT//OP",  # the only future of label 1, cut too
    ]
    tokens, offsets = ids(vocab, *seqs)
    p = np.linspace(0.01, 0.1, len(tokens))
    stop = np.array([STOP_TOKENS, STOP_TIME, STOP_TOKENS, STOP_TOKENS], np.int8)
    s = score_futures(vocab, out, tokens, offsets, stop, np.zeros(4, np.int64), p)
    counted = s.has_outcome.tolist()
    assert counted == [end_inclusive, False, False, False]
    assert s.resolved.tolist() == [True, True, False, False]  # an exclusive end at day 30 is passed at day 30
    # future 0: [VE] and D30 are priced at day 0, the rest at day 30 (only with an inclusive end)
    np.testing.assert_allclose(s.hazard[0], p[0:5].sum() if end_inclusive else p[0:2].sum())
    np.testing.assert_allclose(s.hazard[1], p[5:7].sum())  # future 1: day 31 is never priced
    agg = aggregate(s, np.array([0, 0, 0, 1]), 2)
    resolved = s.hazard[:2]
    assert agg["n_resolved"].tolist() == [2, 0] and agg["probability"][0] == (0.5 if end_inclusive else 0.0)
    np.testing.assert_allclose(agg["hazard_probability"][0], np.mean(resolved))
    table = pa.table({k: pa.array(v) if v.ndim == 1 else pa.array(list(v)) for k, v in agg.items()})
    prob, fallback, rate = finalize_probabilities(table, "hazard")
    assert fallback.tolist() == [False, True] and prob[1] == rate == pytest.approx(np.mean(resolved))


def test_a_hazard_mean_above_one_is_reported_as_one(vocab: Vocab) -> None:
    """One future's sum is not bounded by 1 (high outcome probabilities never drawn); the label's reported
    probability and curve are clipped to [0, 1], the unclipped sum kept (`hazard_sum`)."""
    out = outcome_of(vocab, Window(end_days=30))
    tokens, offsets = ids(vocab, "[VE] D1 [VS] VISIT//OP SNOMED/100 SNOMED/100 [VE] [END]", "[VE] [END]")
    p = np.full(len(tokens), 0.4)
    s = score_futures(vocab, out, tokens, offsets, np.array([STOP_END, STOP_END], np.int8), np.zeros(2, np.int64), p)
    assert s.hazard[0] == pytest.approx(0.4 * 8) and s.hazard[1] == pytest.approx(0.8)
    agg = aggregate(s, np.array([0, 1]), 2)
    assert agg["hazard_sum"][0] == pytest.approx(3.2) and agg["hazard_probability"].tolist() == [
        1.0,
        pytest.approx(0.8),
    ]
    assert agg["hazard_cif"].max() == 1.0 and (agg["hazard_cif"] >= 0).all()
    # metrics.json counts the labels reported as 1, and the report says so
    from cehrx.zeroshot.report import _estimator_lines, compare_estimators

    kept = pa.table({k: pa.array(v) if v.ndim == 1 else pa.array(list(v)) for k, v in agg.items()})
    p_mc = agg["probability"]
    estimates = {"mc": (p_mc, None, None), "hazard": (agg["hazard_probability"], None, None)}
    e = compare_estimators(estimates, kept, np.array([True, False]), np.array([1, 2]), None, n_boot=5, seed=0)
    assert e["hazard"]["labels_clipped"] == 1 and "1 labels' mean sum above 1, reported as 1" in _estimator_lines(e)


# ------------------------------------------------------------------------------ denominator rule


def test_early_stops_count_as_negatives_only_after_end_or_death(vocab: Vocab) -> None:
    out = outcome_of(vocab, Window(end_days=365))
    seqs = [
        "[VE] D10 [VS] VISIT//OP SNOMED/101",  # outcome
        "[VE] D10 [END]",  # record ends: negative
        "[VE] D10 [DEATH]",  # death: negative
        "[VE] D10 [VS] VISIT//OP SNOMED/100",  # token budget before the window's end: excluded
        "[VE] D300 [VS] VISIT//OP [VE] D100",  # ran past the window: negative
    ]
    s = score(vocab, out, seqs, [STOP_TOKENS, STOP_END, STOP_DEATH, STOP_TOKENS, STOP_TIME])
    assert s.resolved.tolist() == [True, True, True, False, True]
    agg = aggregate(s, np.zeros(5, dtype=np.int64), 1)
    assert agg["n_resolved"][0] == 4 and agg["n_outcome"][0] == 1 and agg["probability"][0] == 0.25
    assert agg["expected_days"][0] == 10


def test_all_unresolved_falls_back_to_the_cohort_rate(vocab: Vocab) -> None:
    out = outcome_of(vocab, Window(end_days=365))
    s = score(
        vocab,
        out,
        ["[VE] D10 [VS] VISIT//OP SNOMED/101", "[VE] D10 [END]", "[VE] D10", "[VE] D11"],
        [STOP_TOKENS, STOP_END, STOP_TOKENS, STOP_TOKENS],
    )
    agg = aggregate(s, np.array([0, 0, 1, 1]), 2)
    assert agg["probability"][0] == 0.5 and math.isnan(agg["probability"][1])
    table = pa.table({k: pa.array(v) for k, v in agg.items()})
    prob, fallback, rate = finalize_probabilities(table)
    assert fallback.tolist() == [False, True] and rate == 0.5 and prob.tolist() == [0.5, 0.5]


# ------------------------------------------------------------------------------ outcome from ACES


ACES = """
predicates:
  nsaid: {code: "SNOMED/120"}
  bleed: {code: "SNOMED/101"}
  other_bleed: {code: {regex: "^SNOMED/10[23]$"}}
  any_bleed: {expr: "or(bleed, other_bleed)"}
  death: {code: MEDS_DEATH}
trigger: nsaid
windows:
  input: {start: null, end: trigger, start_inclusive: true, end_inclusive: true, index_timestamp: end}
  gap: {start: input.end, end: start + 2d, start_inclusive: false, end_inclusive: true}
  target: {start: gap.end, end: start + 365 days, start_inclusive: false, end_inclusive: true, label: LABEL}
"""


def write_aces(tmp_path: Path, label: str, target_end: str = "start + 365 days") -> Path:
    p = tmp_path / f"task_{label}.yaml"
    p.write_text(ACES.replace("LABEL", label).replace("start + 365 days", target_end))
    return p


def test_outcome_and_window_from_an_aces_config(vocab: Vocab, tmp_path: Path) -> None:
    out = resolve_outcome(vocab, str(write_aces(tmp_path, "any_bleed")))
    assert sorted(vocab.tokens[i] for i in out.token_ids) == ["SNOMED/101", "SNOMED/102", "SNOMED/103"]
    assert (out.window.start_days, out.window.end_days) == (2, 367)  # the gap window shifts the target
    assert not out.window.start_inclusive and out.window.end_inclusive
    death = resolve_outcome(vocab, str(write_aces(tmp_path, "death")))
    assert [vocab.tokens[i] for i in death.token_ids] == ["[DEATH]"]


def test_overrides_and_event_bound_windows(vocab: Vocab, tmp_path: Path) -> None:
    event_bound = write_aces(tmp_path, "bleed", target_end="start -> death")
    with pytest.raises(CehrxError, match="zeroshot.window_days"):
        resolve_outcome(vocab, str(event_bound))
    out = resolve_outcome(vocab, str(event_bound), outcome_codes=["SNOMED/104", "NOT/IN_VOCAB"], window_days=30)
    assert [vocab.tokens[i] for i in out.token_ids] == ["SNOMED/104"] and out.unmatched == ["NOT/IN_VOCAB"]
    assert out.window.end_days == 30
    with pytest.raises(CehrxError, match="not in the model's vocabulary|none of the codes"):
        resolve_outcome(vocab, None, outcome_codes=["NOT/IN_VOCAB"], window_days=30)
    with pytest.raises(CehrxError, match="window_days or zeroshot.window_visits"):
        resolve_outcome(vocab, None, outcome_codes=["SNOMED/101"])
    assert resolve_outcome(vocab, None, outcome_codes=["SNOMED/101"], window_visits=2).window.visits == 2


def test_descendants_from_meds_parent_codes(vocab: Vocab, tmp_path: Path) -> None:
    meta = tmp_path / "prep" / "meds" / "metadata"
    meta.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "code": ["SNOMED/101", "SNOMED/105", "SNOMED/106", "SNOMED/107"],
                "description": ["a", "b", "c", "d"],
                "parent_codes": [[], ["SNOMED/101"], ["SNOMED/105"], []],
            }
        ),
        meta / "codes.parquet",
    )
    out = resolve_outcome(vocab, None, outcome_codes=["SNOMED/101"], window_days=30, prepared_dir=tmp_path / "prep")
    assert sorted(vocab.tokens[i] for i in out.token_ids) == ["SNOMED/101", "SNOMED/105", "SNOMED/106"]
    assert out.descendants == "meds_parent_codes"
    flat = resolve_outcome(
        vocab,
        None,
        outcome_codes=["SNOMED/101"],
        window_days=30,
        prepared_dir=tmp_path / "prep",
        include_descendants=False,
    )
    assert [vocab.tokens[i] for i in flat.token_ids] == ["SNOMED/101"]


# ------------------------------------------------------------------------------ with a model


@pytest.fixture(scope="module")
def micro(vocab: Vocab) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(name="micro", vocab_size=len(vocab), n_layer=2, n_embd=32, n_head=2, max_seq_len=256)).eval()


def _labels(arrays, n: int = 6) -> LabelInputs:
    """Prediction times in the middle of the first n subjects' records."""
    mids = [int(arrays.times[arrays.offsets[i] + (arrays.offsets[i + 1] - arrays.offsets[i]) // 2]) for i in range(n)]
    return LabelInputs(
        np.asarray(arrays.subject_id[:n], dtype=np.int64), np.asarray(mids, dtype=np.int64), np.zeros(n, dtype=bool)
    )


def same(a: pa.Table, b: pa.Table) -> bool:
    """Tables equal column by column, NaN == NaN (pa.Table.equals says NaN != NaN)."""

    def values(t: pa.Table, c: str) -> np.ndarray:
        col = t.column(c)
        return (
            np.stack(col.to_pylist()).astype(float)
            if pa.types.is_list(col.type)
            else col.to_numpy(zero_copy_only=False)
        )

    return a.column_names == b.column_names and all(
        np.array_equal(
            values(a, c),
            values(b, c),
            equal_nan=pa.types.is_floating(a.column(c).type) or pa.types.is_list(a.column(c).type),
        )
        for c in a.column_names
    )


def _predict(micro: GPT, vocab: Vocab, arrays, labels: LabelInputs, seed: int = 0):
    zcfg = ZeroshotConfig(
        num_samples=4, write_trajectories=True, sampling=SamplingConfig(max_new_tokens=48, batch_size=16, seed=seed)
    )
    out = outcome_of(vocab, Window(end_days=365))
    engine = zeroshot_engine(micro, vocab, zcfg, out)
    return predict_chunk(
        engine, arrays, labels, np.arange(len(labels.subject_id)), out, zcfg, zcfg.history_max_len(256), 0
    )


def test_no_leakage_planted_future_events_change_nothing(micro: GPT, vocab: Vocab, synthetic_prepared: Path) -> None:
    arrays, _ = load_all_splits(synthetic_prepared)
    labels = _labels(arrays)
    before, traj_before = _predict(micro, vocab, arrays, labels)
    # overwrite every token after each prediction time with the outcome code
    planted = type(arrays)(
        **{k: np.array(getattr(arrays, k)) for k in ("subject_id", "offsets", "tokens", "times", "birth_time")}
    )
    seg = np.repeat(np.arange(len(arrays)), arrays.lengths())
    pred_of = np.full(len(arrays), np.iinfo(np.int64).max)
    pred_of[: len(labels.prediction_time)] = labels.prediction_time
    future = planted.times > pred_of[seg]
    assert future.sum() > 10
    planted.tokens[future] = vocab["SNOMED/101"]
    after, traj_after = _predict(micro, vocab, planted, labels)
    assert same(before, after) and traj_before.equals(traj_after)


def test_deterministic_for_a_seed(micro: GPT, vocab: Vocab, synthetic_prepared: Path) -> None:
    arrays, _ = load_all_splits(synthetic_prepared)
    labels = _labels(arrays, 4)
    (a, ta), (b, tb), (_, tc) = (_predict(micro, vocab, arrays, labels, seed=s) for s in (1, 1, 2))
    assert same(a, b) and ta.equals(tb)
    assert a.column("n_futures").to_pylist() == [4] * 4
    assert not ta.equals(tc)  # another seed samples other futures
    # trajectories: MEDS rows of the futures only, after each label's history
    assert set(ta.column("sample").to_pylist()) <= set(range(4)) and ta.num_rows > 0
    first = ta.group_by(["subject_id", "prediction_time"]).aggregate([("time", "min")])
    assert all(
        t >= p - np.timedelta64(1, "D")
        for t, p in zip(first.column("time_min").to_pylist(), first.column("prediction_time").to_pylist())
    )


def test_descendants_from_the_omop_source_concept_ancestor(vocab: Vocab, tmp_path: Path) -> None:
    omop = tmp_path / "omop"
    omop.mkdir()
    pq.write_table(pa.table({"person_id": pa.array([1], pa.int64())}), omop / "person.parquet")
    pq.write_table(
        pa.table(
            {
                "ancestor_concept_id": pa.array([11, 11, 12, 13], pa.int64()),
                "descendant_concept_id": pa.array([11, 12, 12, 14], pa.int64()),
            }
        ),
        omop / "concept_ancestor.parquet",
    )
    prep = tmp_path / "prep"
    (prep / "meds" / "metadata").mkdir(parents=True)
    (prep / "config.yaml").write_text(f"data:\n  source: omop\n  path: {omop}\n")
    pq.write_table(
        pa.table(
            {
                "code": ["SNOMED/101", "SNOMED/110", "SNOMED/111", "SNOMED/112"],
                "omop_concept_id": pa.array([11, 12, 13, 14], pa.int64()),
                "parent_codes": pa.array([[], [], [], []], pa.list_(pa.string())),
            }
        ),
        prep / "meds" / "metadata" / "codes.parquet",
    )
    out = resolve_outcome(vocab, None, outcome_codes=["SNOMED/101"], window_days=30, prepared_dir=prep)
    assert (
        sorted(vocab.tokens[i] for i in out.token_ids) == ["SNOMED/101", "SNOMED/110"]
        and out.descendants == "omop_concept_ancestor"
    )


def test_case_control_sample_keeps_the_positives_and_weights_back_to_the_split() -> None:
    import pyarrow as pa

    from cehrx.zeroshot.labels import sample_labels

    n = 5000
    y = np.zeros(n, bool)
    y[::100] = True  # 50 positives, 1 %
    table = pa.table(
        {
            "subject_id": np.arange(n),
            "prediction_time": pa.array(np.arange(n) * 10**6, pa.timestamp("us")),
            "boolean_value": y,
        }
    )
    kept, w, info = sample_labels(table, 400, "case_control", seed=1)
    ky = kept.column("boolean_value").to_numpy(zero_copy_only=False)
    assert ky.sum() == 50 and len(kept) == 400 and info["positives"] == "50 of 50"
    assert w[ky].sum() == pytest.approx(50) and w[~ky].sum() == pytest.approx(n - 50), (
        "weights add up to the split's classes"
    )
    uni, w_uni, _ = sample_labels(table, 400, "uniform", seed=1)
    assert w_uni is None and len(uni) == 400
    same, w_all, _ = sample_labels(table, None, "case_control", seed=1)
    assert w_all is None and len(same) == n
    with pytest.raises(CehrxError, match="label_sample"):
        sample_labels(table, 400, "stratified", seed=1)


def test_weighted_metrics_equal_repeated_rows_and_sklearn() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    from cehrx.eval.metrics import binary_metrics

    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    p = np.clip(0.3 * y + 0.7 * rng.random(300), 0, 1)
    w = rng.integers(1, 4, 300).astype(float)
    m = binary_metrics(y, p, np.arange(300), n_boot=20, sample_weight=w)
    assert m["auroc"]["value"] == pytest.approx(roc_auc_score(y, p, sample_weight=w))
    assert m["auprc"]["value"] == pytest.approx(average_precision_score(y, p, sample_weight=w))
    rep = np.repeat(np.arange(300), w.astype(int))
    r = binary_metrics(y[rep], p[rep], rep, n_boot=0)
    for k in ("auroc", "auprc", "brier", "ece"):
        assert m[k]["value"] == pytest.approx(r[k]["value"])
    assert m["weighted"] and m["auroc"]["ci_low"] < m["auroc"]["value"] < m["auroc"]["ci_high"]
    with pytest.raises(ValueError, match="sample_weight"):
        binary_metrics(y, p, np.arange(300), n_boot=0, sample_weight=-w)


def test_estimator_names_auto_resolves_and_bad_names_list_the_choices() -> None:
    assert ZeroshotConfig().estimator == "hazard"  # auto, with the default (untruncated) sampling
    truncated = SamplingConfig(top_k=5, max_new_tokens=8)
    assert ZeroshotConfig(sampling=truncated).estimator == "mc"  # auto: the only estimator truncated sampling allows
    with pytest.raises(CehrxError, match="top_k=0"):
        ZeroshotConfig(estimator="hazard", sampling=truncated)
    with pytest.raises(CehrxError, match="top_k=0"):
        ZeroshotConfig(estimator="hazard_cv", sampling=truncated)
    with pytest.raises(CehrxError, match=r"one of \('mc', 'hazard', 'hazard_cv', 'reach', 'auto'\), got 'montecarlo'"):
        ZeroshotConfig(estimator="montecarlo")


# ------------------------------------------------------------------------------ REACH


def codes_of(vocab: Vocab) -> np.ndarray:
    return np.flatnonzero(np.array([k == "code" for k in vocab.kinds]))


def test_reach_score_multiplies_the_window_steps(vocab: Vocab) -> None:
    """Per future 1 - prod(1 - p_t) over the steps whose outcome would fall inside the window (the time
    and visits of the tokens before the step, as for the hazard sum); an outcome drawn inside the window
    (only when the grammar allowed nothing else) is p_t = 1; a future cut inside the window is unresolved."""
    out = outcome_of(vocab, Window(start_days=2, end_days=30))
    seqs = [
        "SNOMED/101 [VE] D3 [VS] VISIT//OP SNOMED/100 SNOMED/100 [VE] D40 [VS] VISIT//OP SNOMED/100",
        "[VE] D5 [VS] VISIT//OP SNOMED/101 SNOMED/100",  # an outcome drawn in the window: estimate 1
        "[VE] D5 [VS] VISIT//OP SNOMED/100",  # the token budget ran out inside the window
    ]
    tokens, offsets = ids(vocab, *seqs)
    p = np.linspace(0.01, 0.2, len(tokens))
    stop = np.array([STOP_TIME, STOP_TOKENS, STOP_TOKENS], np.int8)
    s = score_futures(vocab, out, tokens, offsets, stop, np.zeros(3, np.int64), p, reach=True)
    # future 0: the outcome at day 0 lies before the window (drawn freely); steps 3..8 ([VS] .. D40) lie at day 3
    assert s.reach[0] == pytest.approx(1 - np.prod(1 - p[3:9]))
    assert s.reach_days[0] == pytest.approx(3 * s.reach[0]) and s.reach_cif[0, 0] == pytest.approx(s.reach[0])
    assert s.reach[1] == 1.0 and s.hazard is None
    assert s.resolved.tolist() == [True, True, False]
    agg = aggregate(s, np.array([0, 0, 1]), 2)
    assert agg["reach_probability"][0] == pytest.approx((s.reach[0] + 1) / 2) and np.isnan(agg["reach_probability"][1])
    assert agg["reach_se"][0] == pytest.approx(np.std([s.reach[0], 1.0], ddof=1) / np.sqrt(2))
    table = pa.table({k: pa.array(v) if v.ndim == 1 else pa.array(list(v)) for k, v in agg.items()})
    prob, fallback, rate = finalize_probabilities(table, "reach")
    assert fallback.tolist() == [False, True] and prob[1] == rate == pytest.approx((s.reach[0] + 1) / 2)
    # the next visit only: steps before the second generated [VS], that [VS] included
    visits = outcome_of(vocab, Window(visits=1))
    tokens, offsets = ids(vocab, "SNOMED/100 [VE] D5 [VS] VISIT//OP SNOMED/100 [VE] D5 [VS] VISIT//OP SNOMED/100")
    p = np.full(len(tokens), 0.1)
    s = score_futures(vocab, visits, tokens, offsets, np.array([STOP_TOKENS], np.int8), np.zeros(1, np.int64), p, True)
    assert s.reach[0] == pytest.approx(1 - 0.9**9) and s.resolved[0] and s.reach_cif is None


@pytest.fixture(scope="module")
def inside_visit(vocab: Vocab, synthetic_prepared: Path) -> tuple[np.ndarray, int]:
    """A real history cut where codes may come next (inside a visit), and its grammar state."""
    arrays, _ = load_all_splits(synthetic_prepared)
    grammar = Grammar.build(vocab)
    codes = torch.from_numpy(codes_of(vocab))
    for cut in range(12, 60):
        prompt = np.asarray(arrays.tokens[arrays.offsets[0] : arrays.offsets[0] + cut], dtype=np.int64)
        state = int(grammar.prompt_states(prompt, np.array([0, cut]))[0])
        if bool(grammar.allowed[state, codes].any()):
            return prompt, state
    raise AssertionError("no history cut inside a visit")


@torch.no_grad()
def two_step_exact(model: GPT, vocab: Vocab, prompt: np.ndarray, state: int, watch: np.ndarray):
    """By enumeration, from the model and the grammar: the first step's distribution p1 and, for every first
    token x1, the probability that the second step draws a watched token (0 after a stop token)."""
    grammar = Grammar.build(vocab)

    def dists(seqs: np.ndarray, states: torch.Tensor) -> torch.Tensor:
        logits = model.lm_head_logits(model(torch.from_numpy(seqs))[:, -1]).float()
        return torch.softmax(logits.masked_fill(~grammar.allowed[states], float("-inf")), -1).double()

    p1 = dists(prompt[None], torch.tensor([state]))[0]
    x1 = torch.nonzero(p1 > 0)[:, 0]
    seqs = np.concatenate([np.repeat(prompt[None], len(x1), 0), x1.numpy()[:, None]], 1)
    q2 = torch.zeros_like(p1)
    q2[x1] = dists(seqs, grammar.step(torch.full_like(x1, state), x1))[:, torch.from_numpy(watch)].sum(-1)
    q2[[vocab["[END]"], vocab["[DEATH]"]]] = 0.0
    return p1.numpy(), q2.numpy()


@pytest.mark.usefixtures("one_thread")
def test_reach_is_unbiased_and_never_noisier_than_monte_carlo(
    micro: GPT, vocab: Vocab, inside_visit: tuple[np.ndarray, int]
) -> None:
    """Two-step futures, the outcome a third of the codes. Window = both steps, or the second only (the
    first step draws freely and its outcomes do not count). The exact P(outcome in window), enumerated,
    is matched by the REACH mean (outcome forbidden in the window), by the Monte Carlo share and by the
    hazard sum read through `score_futures` / `aggregate` (natural futures); REACH's and the hazard's
    per-future spread is below Monte Carlo's and every REACH estimate lies in [0, 1]."""
    prompt, state = inside_visit
    watch = codes_of(vocab)[::3]
    p1, q2 = two_step_exact(micro, vocab, prompt, state, watch)
    is_watch = np.isin(np.arange(len(vocab)), watch)
    exact = {"both": p1[is_watch].sum() + (p1 * q2)[~is_watch].sum(), "second": (p1 * q2).sum()}
    n, cfg = 4000, SamplingConfig(max_new_tokens=2, batch_size=512, seed=0)
    kw = dict(num_samples=n, progress=False)
    natural = Engine(micro, vocab, cfg, watch_ids=watch).sample(prompt, np.array([0, len(prompt)]), **kw)
    engine = Engine(micro, vocab, cfg, watch_ids=watch, forbid_ids=watch)
    for window, when in (("both", lambda rows: torch.ones_like(rows.alive)), ("second", lambda rows: rows.n >= 1)):
        s = engine.sample(prompt, np.array([0, len(prompt)]), forbid_when=when, **kw)
        first, two = s.offsets[:-1], s.lengths() == 2
        second = np.minimum(first + 1, len(s.tokens) - 1)
        p_first, p_second = s.watch_prob[first].astype(np.float64), np.where(two, s.watch_prob[second], 0.0)
        np.testing.assert_allclose(p_first, p1[is_watch].sum(), rtol=1e-4)  # p_t before forbidding, exact
        assert not np.isin(s.tokens[second][two], watch).any(), "the second step is inside: never an outcome"
        nat_first, nat_two = natural.offsets[:-1], natural.lengths() == 2
        nat_hit2 = nat_two & np.isin(natural.tokens[np.minimum(nat_first + 1, len(natural.tokens) - 1)], watch)
        if window == "both":
            reach = 1 - (1 - p_first) * (1 - p_second)
            mc = np.isin(natural.tokens[nat_first], watch) | nat_hit2
            assert not np.isin(s.tokens[first], watch).any()
            # the hazard sum through the reader (score_futures, aggregate) on the natural futures, each read as
            # a record that ends after its two steps (a resolved future; the two steps lie at day 0 of the window)
            out = Outcome("t", [vocab.tokens[i] for i in watch], watch, Window(end_days=365))
            ended = np.full(n, STOP_END, np.int8)
            hs = score_futures(
                vocab, out, natural.tokens, natural.offsets, ended, np.zeros(n, np.int64), natural.watch_prob
            )
            agg = aggregate(hs, np.zeros(n, np.int64), 1)
            assert agg["probability"][0] == mc.mean() and agg["n_resolved"][0] == n
            assert abs(agg["hazard_probability"][0] - exact[window]) < 4 * agg["hazard_se"][0] + 1e-6
            assert agg["hazard_se"][0] < mc.std() / np.sqrt(n), "the hazard sum varies less than the count"
        else:
            reach, mc = p_second, nat_hit2
            assert np.isin(s.tokens[first], watch).mean() > 0.05, "before the window the outcome is drawn freely"
        assert ((reach >= 0) & (reach <= 1)).all()
        assert abs(reach.mean() - exact[window]) < 4 * reach.std() / np.sqrt(n) + 1e-6, (window, reach.mean(), exact)
        assert abs(mc.mean() - exact[window]) < 4 * mc.std() / np.sqrt(n), (window, mc.mean(), exact)
        assert 0.05 < exact[window] < 0.95 and reach.std() < mc.std(), (window, reach.std(), mc.std())


def _reach_prompts(vocab: Vocab, synthetic_prepared: Path, n: int = 8):
    """Histories cut in the middle of n records, prediction times 0 to 3 days after their last event."""
    arrays, _ = load_all_splits(synthetic_prepared)
    labels = _labels(arrays, n)
    pred = labels.prediction_time + (np.arange(n) % 4) * DAY
    hist = cut_histories(arrays, vocab, labels.subject_id, pred, 128)
    return hist, np.maximum(pred[hist.label_index] - hist.last_time, 0)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("window", [Window(start_days=30, end_days=365), Window(end_days=365, visits=1)], ids=str)
def test_reach_forbids_the_outcome_exactly_on_the_window_steps(
    micro: GPT, vocab: Vocab, synthetic_prepared: Path, window: Window
) -> None:
    """The engine forbids the outcome on the steps whose w_t = 1, read back from the tokens the way
    the scorer reads them (seconds and [VS] before the step, the prompt's slack): never an outcome on
    those steps, outcomes on others (before the window's start, after its visits), and up to each
    future's first window step the same tokens as the natural future of the same seed."""
    hist, slack = _reach_prompts(vocab, synthetic_prepared)
    watch, ns = codes_of(vocab)[::3], 16
    cfg = SamplingConfig(max_new_tokens=64, batch_size=64, seed=2, max_days=window.end_days + 3)
    masked = Engine(micro, vocab, cfg, watch_ids=watch, forbid_ids=watch).sample(
        hist.tokens, hist.offsets, num_samples=ns, progress=False, forbid_when=InWindow(window, slack, ns, "cpu")
    )
    natural = Engine(micro, vocab, cfg).sample(hist.tokens, hist.offsets, num_samples=ns, progress=False)
    tok, off = masked.tokens.astype(np.int64), masked.offsets
    seg = np.repeat(np.arange(len(off) - 1), np.diff(off))
    secs = token_seconds(vocab)[tok]
    is_vs = (tok == vocab[VS]).astype(np.int64)
    rel = np.maximum(segment_cumsum(secs, off) - secs - slack[masked.prompt_index][seg], 0)
    w = step_in_window(rel, segment_cumsum(is_vs, off) - is_vs, window)
    hit = np.isin(tok, watch)
    assert w.sum() > 100 and (~w).sum() > 100
    assert not (hit & w).any(), "an outcome drawn on a step inside the window"
    assert (hit & ~w).sum() > 5, "outcomes outside the window are drawn freely"
    pos = np.arange(len(tok)) - off[seg]
    first_in = np.full(len(off) - 1, np.iinfo(np.int64).max)
    np.minimum.at(first_in, seg[w], pos[w])
    k = np.minimum(first_in, masked.lengths())  # each future's steps before its first window step
    assert (natural.lengths() >= k).all()
    kseg = np.repeat(np.arange(len(k)), k)
    kpos = np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)
    np.testing.assert_array_equal(masked.tokens[off[kseg] + kpos], natural.tokens[natural.offsets[kseg] + kpos])
    assert k.sum() > 100 or window.start_days == 0  # a window from the prediction time opens at the first step


@pytest.mark.usefixtures("one_thread")
def test_reach_when_the_grammar_allows_only_outcome_tokens(
    micro: GPT, vocab: Vocab, synthetic_prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After [VS] only a visit type may come: with every visit type an outcome, nothing is left to
    renormalise over inside the window. The row draws unmasked (an outcome), p_t = 1, and the
    future's REACH estimate is 1 (resolved), on the grammar-state head and on the full head alike."""
    from cehrx.sampling import engine as engine_module

    arrays, _ = load_all_splits(synthetic_prepared)
    vs = int(np.flatnonzero(np.asarray(arrays.tokens[: arrays.offsets[1]]) == vocab[VS])[1])
    prompt = np.asarray(arrays.tokens[: vs + 1], dtype=np.int64)  # ends with a [VS]
    visit_types = np.flatnonzero(np.array([k == "visit" for k in vocab.kinds]))
    out = Outcome("visit", ["Visit/*"], visit_types, Window(end_days=365))
    zcfg = ZeroshotConfig(estimator="reach", num_samples=16, sampling=SamplingConfig(max_new_tokens=6, seed=1))
    engine = zeroshot_engine(micro, vocab, zcfg, out)
    runs = []
    for by_state in (True, False):
        if not by_state:
            monkeypatch.setattr(engine_module, "_score_by_state", lambda hidden: False)
        s = engine.sample(
            prompt,
            np.array([0, len(prompt)]),
            num_samples=16,
            progress=False,
            forbid_when=InWindow(out.window, [0], 16, "cpu"),
        )
        first = s.offsets[:-1]
        assert np.isin(s.tokens[first], visit_types).all()
        np.testing.assert_allclose(s.watch_prob[first], 1.0, rtol=1e-6)
        scores = score_futures(
            vocab, out, s.tokens, s.offsets, s.stop, np.zeros(16, np.int64), s.watch_prob, reach=True
        )
        assert (scores.reach == 1.0).all() and scores.resolved.all()
        runs.append(s.tokens)
    np.testing.assert_array_equal(*runs)


def _predict_reach(micro: GPT, vocab: Vocab, arrays, labels: LabelInputs, seed: int = 0, batch_size: int = 16):
    zcfg = ZeroshotConfig(
        estimator="reach",
        num_samples=4,
        write_trajectories=True,
        sampling=SamplingConfig(max_new_tokens=48, batch_size=batch_size, seed=seed),
    )
    out = outcome_of(vocab, Window(start_days=1, end_days=365))
    engine = zeroshot_engine(micro, vocab, zcfg, out)
    return predict_chunk(
        engine, arrays, labels, np.arange(len(labels.subject_id)), out, zcfg, zcfg.history_max_len(256), 0
    )


@pytest.mark.usefixtures("one_thread")
def test_reach_runs_are_reproducible_and_hold_reach_only(
    micro: GPT, vocab: Vocab, synthetic_prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same seed, same REACH results; the same futures whatever the batch size or the lm-head path (their
    probabilities up to float rounding); another seed differs. A REACH chunk holds REACH columns only (its
    futures are not natural: no Monte Carlo, no hazard)."""
    from cehrx.sampling import engine as engine_module

    arrays, _ = load_all_splits(synthetic_prepared)
    labels = _labels(arrays, 6)
    (a, ta), (a2, ta2), (b, tb), (c, tc) = (
        _predict_reach(micro, vocab, arrays, labels, seed=s, batch_size=k)
        for s, k in ((1, 16), (1, 16), (1, 5), (2, 16))
    )
    monkeypatch.setattr(engine_module, "_score_by_state", lambda hidden: False)
    full, tf = _predict_reach(micro, vocab, arrays, labels, seed=1)
    assert same(a, a2) and ta.equals(ta2) and not tc.equals(ta)
    for other, traj in ((b, tb), (full, tf)):
        assert traj.equals(ta)
        np.testing.assert_allclose(other.column("reach_sum").to_numpy(), a.column("reach_sum").to_numpy(), rtol=1e-5)
    names = set(a.column_names)
    assert {"reach_sum", "reach_probability", "reach_se", "reach_expected_days", "reach_cif"} <= names
    assert not names & {"probability", "n_outcome", "expected_days", "hazard_probability"}
    p = a.column("reach_probability").to_numpy(zero_copy_only=False)
    assert np.isfinite(p).any() and ((p[np.isfinite(p)] >= 0) & (p[np.isfinite(p)] <= 1)).all()
    assert (a.column("reach_se").to_numpy(zero_copy_only=False)[np.isfinite(p)] >= 0).all()
    kept = a.filter(a.column("has_history"))
    with pytest.raises(CehrxError, match="no mc estimates"):
        finalize_probabilities(kept, "mc")
    # what the task reports: REACH alone, and why
    from cehrx.tasks.zeroshot import scored
    from cehrx.zeroshot.report import futures_summary, reach_summary, report_sections

    assert set(scored(a, labels, ZeroshotConfig(estimator="reach"), None).estimates) == {"reach"}
    summary = futures_summary(kept, np.zeros(kept.num_rows, dtype=bool), 0.1, 0)
    assert "with_outcome_share" not in summary and summary["futures"] == 4 * kept.num_rows
    text = report_sections(outcome_of(vocab, Window(end_days=365)), summary, {}, reach_summary(kept))
    assert "REACH" in text["Futures"] and "no Monte Carlo or hazard estimate" in text["Estimators"]


def test_reach_refusals_are_clear(micro: GPT, vocab: Vocab) -> None:
    truncated = SamplingConfig(top_p=0.9, max_new_tokens=8)
    with pytest.raises(CehrxError, match=r"estimator=reach .*top_k=0 and top_p=1.*estimator=mc"):
        ZeroshotConfig(estimator="reach", sampling=truncated)
    assert ZeroshotConfig(estimator="reach").estimator == "reach" and ZeroshotConfig().estimator == "hazard"
    valued = Outcome(
        "hba1c",
        ["LAB/1"],
        np.array([vocab["SNOMED/101"]]),
        Window(end_days=30),
        {vocab["SNOMED/101"]: np.array([vocab["Q10"]])},
    )
    with pytest.raises(CehrxError, match=r"count only with a value.*zeroshot.estimator=hazard"):
        zeroshot_engine(micro, vocab, ZeroshotConfig(estimator="reach"), valued)
    prompt, offsets = ids(vocab, "YEAR//1950")  # never sampled: the settings are refused first
    with pytest.raises(CehrxError, match="forbid_ids"):
        Engine(micro, vocab).sample(prompt, offsets, forbid_when=lambda rows: rows.alive)
    greedy = Engine(micro, vocab, SamplingConfig(temperature=0), forbid_ids=[vocab["SNOMED/101"]])
    with pytest.raises(CehrxError, match="temperature > 0"):
        greedy.sample(prompt, offsets, forbid_when=lambda rows: rows.alive)


@pytest.mark.usefixtures("one_thread")
def test_control_expectations_are_exact_and_their_martingale_has_mean_zero(
    micro: GPT, vocab: Vocab, inside_visit: tuple[np.ndarray, int]
) -> None:
    """`Engine(control_basis=...)` records sum_v p_t(v) b(v) under the distribution drawn from: at the first
    step exactly the enumerated expectation, on the grammar-state head and the full head alike; recording
    changes no draw; and M = sum_t (b(x_t) - E_t[b]) over two-step futures has mean zero (every column within
    4 standard errors), which is what keeps `hazard_cv` unbiased."""
    from cehrx.sampling import engine as engine_module
    from cehrx.zeroshot.controls import control_basis, future_controls

    prompt, state = inside_visit
    basis = control_basis(vocab, micro.wte.weight)
    watch = codes_of(vocab)[::3]
    p1, _ = two_step_exact(micro, vocab, prompt, state, watch)
    n, cfg = 3000, SamplingConfig(max_new_tokens=2, batch_size=512, seed=3)
    off = np.array([0, len(prompt)])
    plain = Engine(micro, vocab, cfg, watch_ids=watch).sample(prompt, off, num_samples=n, progress=False)
    s = Engine(micro, vocab, cfg, watch_ids=watch, control_basis=basis).sample(
        prompt, off, num_samples=n, progress=False
    )
    np.testing.assert_array_equal(s.tokens, plain.tokens)  # recording the expectations changes no draw
    np.testing.assert_array_equal(s.watch_prob, plain.watch_prob)
    assert s.control_mean.shape == (len(s.tokens), basis.shape[1])
    np.testing.assert_allclose(s.control_mean[s.offsets[:-1]], np.tile(p1 @ basis, (n, 1)), rtol=1e-4, atol=1e-5)
    seg = np.repeat(np.arange(n), s.lengths())
    m = future_controls(s.tokens, seg, n, s.control_mean, basis, np.ones(len(s.tokens)))
    assert (m.std(0) > 0.05).sum() >= basis.shape[1] // 2, "the controls vary from future to future"
    # within 4 SE, plus 4 draws for a column whose token is rarely drawn (no draw: an SE of 0)
    tol = 4 * m.std(0) / np.sqrt(n) + 4 * np.ptp(basis, 0) / n
    assert (np.abs(m.mean(0)) < tol).all(), (m.mean(0), tol)
    full = Engine(micro, vocab, cfg, watch_ids=watch, control_basis=basis)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_module, "_score_by_state", lambda hidden: False)  # the full-vocabulary head
        f = full.sample(prompt, off, num_samples=64, progress=False)
    np.testing.assert_allclose(f.control_mean[f.offsets[:-1]], np.tile(p1 @ basis, (64, 1)), rtol=1e-4, atol=1e-5)
    with pytest.raises(CehrxError, match="top_k=0"):
        Engine(micro, vocab, SamplingConfig(top_k=5), control_basis=basis)
    with pytest.raises(CehrxError, match="vocab size"):
        Engine(micro, vocab, cfg, control_basis=basis[:10])


def test_cross_fitted_control_variates_remove_the_path_noise_they_explain() -> None:
    """Futures whose hazard sum is the label's risk plus path noise that a control explains: `hazard_cv`
    stays centred on the risk (unbiased: beta comes from the other fold's labels) with a fraction of the
    hazard sum's spread; a control unrelated to the noise changes little; labels without a resolved
    future stay NaN (the run's fallback applies)."""
    from cehrx.zeroshot.controls import cross_fitted, label_sums

    rng = np.random.default_rng(0)
    n_labels, nf, k = 400, 10, 3
    risk = rng.uniform(0.05, 0.4, n_labels)
    pi = np.repeat(np.arange(n_labels), nf)
    m = rng.normal(size=(n_labels * nf, k))  # mean-zero controls
    noise = 0.2 * m[:, 0] - 0.1 * m[:, 1]  # the path noise the first two explain
    h = risk[pi] + noise + rng.normal(scale=0.02, size=len(pi))
    resolved = np.ones(len(pi), dtype=bool)
    resolved[pi == 7] = False  # a label with no resolved future
    sums = label_sums(h, m, resolved, pi, n_labels)
    res = np.bincount(pi, weights=resolved, minlength=n_labels)
    hbar = np.where(res > 0, np.bincount(pi, weights=h * resolved, minlength=n_labels) / np.maximum(res, 1), np.nan)
    table = pa.table(
        {
            "label_row": np.arange(n_labels),
            "n_resolved": res.astype(np.int64),
            "n_futures": np.full(n_labels, nf),
            "hazard_probability": np.clip(hbar, 0, 1),  # as `aggregate` reports it; cross_fitted reads the sum
            "hazard_sum": np.bincount(pi, weights=h * resolved, minlength=n_labels),
            **{c: pa.array(list(v)) if v.ndim == 2 else v for c, v in sums.items()},
        }
    )
    cv = cross_fitted(table)
    p = cv["hazard_cv_probability"]
    assert (
        np.isnan(p[7])
        and np.isfinite(np.delete(p, 7)).all()
        and ((np.delete(p, 7) >= 0) & (p[~np.isnan(p)] <= 1)).all()
    )
    err_cv, err_h = np.delete(p - risk, 7), np.delete(hbar - risk, 7)
    assert abs(err_cv.mean()) < 4 * err_cv.std() / np.sqrt(len(err_cv))
    assert err_cv.std() < 0.25 * err_h.std(), (err_cv.std(), err_h.std())
    se = np.delete(cv["hazard_cv_se"], 7)
    assert 0.5 < np.median(se) / (0.02 / np.sqrt(nf)) < 2  # the residual spread, not the hazard sum's
