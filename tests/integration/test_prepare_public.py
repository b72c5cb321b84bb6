"""`prepare` on the three public data sets in ../shared/data: nothing lost, grammar, dates, MEDS validity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from meds import CodeMetadataSchema, DataSchema, SubjectSplitSchema

from cehrx.data.grammar import check_sequence
from cehrx.data.shards import SPLITS, load_split
from cehrx.data.vocab import KINDS, Vocab
from cehrx.tasks import prepare
from tests.conftest import assert_counts_balance, compose_cfg, shared_data

DATASETS = {
    "gibleed": ("gibleed", "omop_eunomia_gibleed/parquet"),
    "synthea1k": ("synthea1k", "omop_synthea1k/csv"),
    "mimic_demo": ("mimic_demo", "meds_mimic_iv_demo"),
}


@pytest.fixture(scope="module", params=sorted(DATASETS))
def prepared(request, tmp_path_factory) -> tuple[str, Path, dict]:
    data, rel = DATASETS[request.param]
    src = shared_data(rel)
    out = tmp_path_factory.mktemp(request.param) / "prepared"
    cfg = compose_cfg("task=prepare", f"data={data}", f"data.path={src}", f"output_dir={out}")
    return request.param, out, prepare.run(cfg)


def test_every_subject_and_event_tokenized_or_dropped_with_reason(prepared):
    """Subjects, MEDS events and source rows in = kept + dropped by reason (conftest.assert_counts_balance)."""
    name, out, report = prepared
    assert_counts_balance(out, report)
    subjects = report["subjects"]
    expected_in = {"gibleed": 2694, "synthea1k": 1130, "mimic_demo": 100}[name]
    assert subjects["in"] == expected_in
    if name != "synthea1k":  # synthea1k: 4 persons have no events at all
        assert subjects["tokenized"] == expected_in, (
            "every patient is kept (the reference ETL keeps 584 of GiBleed's 2,694)"
        )


def test_every_sequence_parses_and_times_never_go_back(prepared):
    _, out, _ = prepared
    vocab = Vocab.load(out)
    inpatient = set(vocab.meta["inpatient_visit_types"])
    for split in SPLITS:
        arrays = load_split(out, split)
        for i in range(len(arrays)):
            tokens, times = arrays.subject(i)
            assert check_sequence(vocab, tokens, inpatient) is None, (
                arrays.subject_id[i],
                check_sequence(vocab, tokens, inpatient),
            )
            assert (np.diff(times) >= 0).all(), arrays.subject_id[i]


def test_dates_rebuilt_from_gap_tokens_match(prepared):
    """The visit after D<n> starts exactly n days after the previous visit ends; Y<n> within half a year."""
    _, out, _ = prepared
    vocab = Vocab.load(out)
    arrays = load_split(out, "train")
    tok, days = arrays.tokens, arrays.times // 86400
    gap = np.flatnonzero(vocab.kind_array()[tok] == KINDS.index("gap"))
    assert len(gap) > 0
    prev_end = days[gap - 1]  # the [VE] before the gap (a gap never starts a sequence)
    assert (tok[gap - 1] == vocab["[VE]"]).all()
    after = days[gap]  # the gap carries the start of the visit (or death) it leads to
    assert (after == days[gap + 1]).all()
    n = np.array([int(vocab.tokens[t][1:]) for t in tok[gap]])
    is_day = np.array([vocab.tokens[t][0] == "D" for t in tok[gap]])
    assert ((after - prev_end)[is_day] == n[is_day]).all()
    assert (np.abs((after - prev_end)[~is_day] - 365.25 * n[~is_day]) <= 183).all()


def test_meds_output_validates(prepared):
    name, out, _ = prepared
    if name == "mimic_demo":
        pytest.skip("a MEDS source is tokenized in place; only OMOP sources get a MEDS copy")
    files = sorted((out / "meds" / "data").rglob("*.parquet"))
    assert {f.parent.name for f in files} == set(SPLITS)
    for f in files:
        table = pq.read_table(f)
        DataSchema.validate(table)
        assert "table" in table.column_names and "visit_id" in table.column_names
    CodeMetadataSchema.validate(pq.read_table(out / "meds" / "metadata" / "codes.parquet"))
    SubjectSplitSchema.validate(pq.read_table(out / "meds" / "metadata" / "subject_splits.parquet"))


def test_date_only_events_are_not_visible_same_day(prepared):
    """OMOP date-only events sit at 23:59:59, so a same-day prediction time cannot see them."""
    name, out, _ = prepared
    if name != "gibleed":
        pytest.skip("GiBleed has only date-only clinical events")
    vocab = Vocab.load(out)
    arrays = load_split(out, "train")
    code = vocab.kind_array()[arrays.tokens] == KINDS.index("code")
    seconds_of_day = arrays.times[code] % 86400
    assert (seconds_of_day == 86399).all()
