"""Predictions in the meds-evaluation schema: what any MEDS tool can score again later.

Columns: `subject_id` int64, `prediction_time` timestamp[us], `boolean_value` bool (the label),
`predicted_boolean_value` bool (probability >= `threshold`), `predicted_boolean_probability`
float32. The table is checked with `meds_evaluation.schema.PredictionSchema` before it is
written (written to a temporary name, then renamed), so an invalid file is never left behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cehrx.data.atomic import write_parquet
from cehrx.errors import CehrxError


def timestamps_us(prediction_time) -> pa.Array:
    """A `timestamp[us]` array from an Arrow timestamp/datetime array, numpy datetime64, or int64 seconds."""
    if isinstance(prediction_time, pa.ChunkedArray):
        prediction_time = prediction_time.combine_chunks()
    if isinstance(prediction_time, pa.Array):
        if pa.types.is_timestamp(prediction_time.type) or pa.types.is_date(prediction_time.type):
            return prediction_time.cast(pa.timestamp("us"))
        prediction_time = prediction_time.to_numpy(zero_copy_only=False)
    arr = np.asarray(prediction_time)
    if np.issubdtype(arr.dtype, np.datetime64):
        return pa.array(arr.astype("datetime64[us]"))
    if np.issubdtype(arr.dtype, np.integer):
        return pa.array(arr.astype(np.int64).astype("datetime64[s]").astype("datetime64[us]"))
    raise CehrxError(f"prediction_time must be timestamps or int64 seconds, got dtype {arr.dtype}")


def predictions_table(subject_id, prediction_time, boolean_value, probability, threshold: float = 0.5) -> pa.Table:
    """The validated prediction table (see module doc)."""
    from meds_evaluation.schema import PredictionSchema

    prob = np.asarray(probability, dtype=np.float32)
    table = pa.table(
        {
            "subject_id": pa.array(np.asarray(subject_id, dtype=np.int64)),
            "prediction_time": timestamps_us(prediction_time),
            "boolean_value": pa.array(np.asarray(boolean_value).astype(bool)),
            "predicted_boolean_value": pa.array(prob >= threshold),
            "predicted_boolean_probability": pa.array(prob),
        }
    )
    try:
        return PredictionSchema.align(table)
    except Exception as e:  # flexible_schema's SchemaValidationError / TableValidationError
        raise CehrxError(f"predictions do not validate against meds-evaluation's PredictionSchema: {e}") from e


def write_predictions(
    path: str | Path, subject_id, prediction_time, boolean_value, probability, threshold: float = 0.5
) -> Path:
    """Validate and write a meds-evaluation prediction parquet atomically; returns the path."""
    path = Path(path)
    table = predictions_table(subject_id, prediction_time, boolean_value, probability, threshold)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(table, path)
    return path


def read_predictions(path: str | Path) -> pa.Table:
    """Read a prediction parquet back, validated."""
    from meds_evaluation.schema import PredictionSchema

    try:
        return PredictionSchema.align(pq.read_table(path))
    except Exception as e:
        raise CehrxError(f"{path}: not a valid meds-evaluation prediction file: {e}") from e
