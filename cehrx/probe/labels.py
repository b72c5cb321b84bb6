"""Labels for probe and zero-shot: MEDS label files, or ACES task configs run on MEDS data.

A label is `(subject_id, prediction_time, boolean_value)` (MEDS `LabelSchema`). They come from

- a directory (or file) of MEDS label parquet files: `labels_dir=...`;
- a task definition: an ACES config (the MEDS ecosystem's cohort language, package `es-aces`)
  under `configs/aces/<task>.yaml`, run on the MEDS data a prepared dir was made from. A task
  config may also name a shipped label directory (`metadata: {cehrx_labels: <path>}`, a key
  ACES ignores), for data sets that come with official labels (MIMIC-IV demo ICU mortality);
  those labels are then used as given.

Besides ACES's own criteria, a task config may ask for a follow-up (`metadata: {cehrx_followup_days: N}`,
a key ACES ignores): prediction times later than N days before the data set's last event are dropped,
so that no label is a negative only because the extract ended inside its window (administrative
censoring). It depends only on the prediction time, never on the outcome.

ACES on a large MEDS set takes minutes, and a study asks for the same task's labels many times
(each readout, zero-shot, its control). `extract_labels(..., cache_dir=...)` keeps each result as
`<cache_dir>/<task>-<key>.parquet`, the key a hash of the task config's text, the MEDS files' names
(under the dataset's root), sizes and contents, and the ACES version: editing the task or the data makes
a new entry; copying the data elsewhere, or a fresh mount with new file times, does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from cehrx.data.atomic import atomic_file
from cehrx.errors import CehrxError

log = logging.getLogger("cehrx.labels")

LABEL_SCHEMA = pa.schema(
    [("subject_id", pa.int64()), ("prediction_time", pa.timestamp("us")), ("boolean_value", pa.bool_())]
)
MEDS_CORE = ("subject_id", "time", "code", "numeric_value", "text_value")


def aces_config_dir() -> Path:
    from cehrx.configs import config_dir

    return Path(config_dir()) / "aces"


def available_tasks() -> list[str]:
    return sorted(p.stem for p in aces_config_dir().glob("*.yaml"))


def task_config_path(name: str) -> Path:
    """`configs/aces/<name>.yaml`, or `name` itself when it is a path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    path = aces_config_dir() / f"{name}.yaml"
    if not path.is_file():
        raise CehrxError(f"unknown task {name!r}: no {path} (shipped tasks: {', '.join(available_tasks()) or 'none'})")
    return path


def task_description(name: str) -> str:
    """The `description` field of a task config (for reports)."""
    data = yaml.safe_load(task_config_path(name).read_text()) or {}
    return str(data.get("description", "")).strip()


def followup_days(name: str) -> float | None:
    """A task config's `metadata.cehrx_followup_days` (None when absent)."""
    path = task_config_path(name)
    value = ((yaml.safe_load(path.read_text()) or {}).get("metadata") or {}).get("cehrx_followup_days")
    if value is None:
        return None
    try:
        days = float(value)
    except (TypeError, ValueError):
        days = -1.0
    if not days >= 0:
        raise CehrxError(f"{path}: metadata.cehrx_followup_days must be a number of days >= 0, got {value!r}")
    return days


def shipped_labels(name: str) -> Path | None:
    """A task config's `metadata.cehrx_labels` path (relative paths: to the repository root)."""
    path = task_config_path(name)
    data = yaml.safe_load(path.read_text()) or {}
    rel = (data.get("metadata") or {}).get("cehrx_labels")
    if not rel:
        return None
    p = Path(rel)
    return p if p.is_absolute() else (path.parent.parent.parent / p).resolve()


def label_files(labels_dir: str | Path) -> list[Path]:
    p = Path(labels_dir)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise CehrxError(f"labels_dir={labels_dir}: no such file or directory")
    files = sorted(p.rglob("*.parquet"))
    if not files:
        raise CehrxError(f"labels_dir={labels_dir}: no .parquet label files in it")
    return files


def load_labels(labels_dir: str | Path) -> pa.Table:
    """All MEDS label files under `labels_dir`, as `LABEL_SCHEMA` (extra columns dropped).

    Errors name the file and the column. Rows are deduplicated on (subject_id, prediction_time)
    only if their labels agree; conflicting duplicates are an error.
    """
    parts = []
    for f in label_files(labels_dir):
        t = pq.read_table(f)
        missing = [c for c in LABEL_SCHEMA.names if c not in t.column_names]
        if missing:
            raise CehrxError(
                f"{f}: missing label column(s) {missing} (MEDS labels need subject_id, prediction_time, boolean_value)"
            )
        parts.append(_cast_labels(t.select(LABEL_SCHEMA.names), f))
    table = pa.concat_tables(parts) if parts else LABEL_SCHEMA.empty_table()
    return dedupe(table, str(labels_dir))


def _cast_labels(t: pa.Table, source: Path | str) -> pa.Table:
    cols = []
    for field in LABEL_SCHEMA:
        col = t.column(field.name)
        if col.null_count:
            raise CehrxError(f"{source}: column {field.name} has {col.null_count} null value(s)")
        try:
            cols.append(col.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise CehrxError(
                f"{source}: column {field.name} of type {col.type} cannot be read as {field.type}: {e}"
            ) from e
    return pa.table(cols, schema=LABEL_SCHEMA)


def dedupe(table: pa.Table, source: str) -> pa.Table:
    """Drop exact duplicate labels; conflicting labels for one (subject, time) are an error."""
    if not len(table):
        return table
    g = table.group_by(["subject_id", "prediction_time"]).aggregate(
        [("boolean_value", "min"), ("boolean_value", "max")]
    )
    conflict = pc.not_equal(g.column("boolean_value_min"), g.column("boolean_value_max"))
    n_conflict = pc.sum(conflict).as_py() or 0
    if n_conflict:
        raise CehrxError(f"{source}: {n_conflict} (subject_id, prediction_time) pair(s) have conflicting boolean_value")
    if len(g) == len(table):
        return table
    out = pa.table(
        {
            "subject_id": g.column("subject_id"),
            "prediction_time": g.column("prediction_time"),
            "boolean_value": g.column("boolean_value_min"),
        },
        schema=LABEL_SCHEMA,
    )
    return out.sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")])


def meds_data_files(meds_dir: str | Path) -> list[Path]:
    d = Path(meds_dir)
    root = d / "data" if (d / "data").is_dir() else d
    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise CehrxError(f"{meds_dir}: no MEDS data files (expected data/**/*.parquet)")
    return files


def extract_labels(
    task_name: str, meds_dir: str | Path, *, use_shipped: bool = True, cache_dir: str | Path | None = None
) -> pa.Table:
    """Run an ACES task config on a MEDS dataset; returns `LABEL_SCHEMA` rows sorted by subject, time.

    ACES reads one events file, so the dataset's shards are first combined (core MEDS columns,
    sorted by subject and time) into a temporary parquet file with DuckDB. With `cache_dir`, a
    result for the same task config and MEDS files is read back instead (see the module doc).
    """
    shipped = shipped_labels(task_name) if use_shipped else None
    if shipped is not None:
        return load_labels(shipped)
    if cache_dir is None:
        return _run_aces(task_name, meds_dir)
    cached = Path(cache_dir) / f"{Path(task_name).stem}-{labels_cache_key(task_name, meds_dir)}.parquet"
    if cached.exists():
        log.info("task %s: labels from the cache %s", task_name, cached)
        return load_labels(cached)
    table = _run_aces(task_name, meds_dir)
    with atomic_file(cached) as tmp:
        pq.write_table(table, tmp)
    log.info("task %s: labels cached in %s", task_name, cached)
    return table


def labels_cache_key(task_name: str, meds_dir: str | Path) -> str:
    """16 hex digits naming one task config text on one set of MEDS files (relative names, sizes, contents).

    Contents, not modification times: a data set that is copied or mounted afresh (each session here: the
    keys on file times missed every time) keeps its labels, and an edit that keeps a file's size and time
    cannot return stale ones. Reading the files costs about 1 s per 100 MB here (Synthea 20k: 96 MB), against
    18 s of ACES for one task there.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        aces_version = version("es-aces")
    except PackageNotFoundError:
        aces_version = "?"
    root = Path(meds_dir)
    files = [(f.relative_to(root).as_posix(), f.stat().st_size, _sha256(f)) for f in meds_data_files(meds_dir)]
    blob = json.dumps(
        {"format": 2, "task": task_config_path(task_name).read_text(), "files": files, "aces": aces_version}
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _run_aces(task_name: str, meds_dir: str | Path) -> pa.Table:
    import duckdb
    from aces import config as aces_config
    from aces import predicates, query
    from omegaconf import DictConfig

    path = task_config_path(task_name)
    try:
        task = aces_config.TaskExtractorConfig.load(config_path=path)
    except Exception as e:
        raise CehrxError(f"{path}: not a valid ACES task config: {e}") from e
    if task.label_window is None or task.index_timestamp_window is None:
        raise CehrxError(f"{path}: the ACES task needs a window with `label:` and one with `index_timestamp:`")
    files = meds_data_files(meds_dir)
    _quiet_aces()
    with tempfile.TemporaryDirectory(prefix="cehrx-aces-") as tmp:
        events = Path(tmp) / "events.parquet"
        con = duckdb.connect()
        names = {
            c
            for (c, *_rest) in con.execute(
                f"DESCRIBE SELECT * FROM read_parquet({[str(f) for f in files]!r}, union_by_name=true)"
            ).fetchall()
        }
        con.execute(f"COPY ({aces_events_sql(files, names)}) TO '{events}' (FORMAT parquet)")
        data_end = con.execute(f"SELECT max(time) FROM read_parquet('{events}')").fetchall()[0][0]
        con.close()
        try:
            pred = predicates.get_predicates_df(task, DictConfig({"path": str(events), "standard": "meds"}))
            result = query.query(task, pred)
        except Exception as e:
            raise CehrxError(f"ACES task {path.name} failed on {meds_dir}: {type(e).__name__}: {e}") from e
    if result.is_empty():
        log.warning("ACES task %s matched no labels in %s", path.name, meds_dir)
        return LABEL_SCHEMA.empty_table()
    out = result.select(["subject_id", "index_timestamp", "label"]).to_arrow()
    table = pa.table(
        {
            "subject_id": out.column("subject_id").cast(pa.int64()),
            "prediction_time": out.column("index_timestamp").cast(pa.timestamp("us")),
            "boolean_value": pc.greater(out.column("label").cast(pa.int64()), 0),
        },
        schema=LABEL_SCHEMA,
    )
    table = apply_followup(table, followup_days(task_name), data_end, path.name)
    return dedupe(table.sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")]), path.name)


def apply_followup(table: pa.Table, days: float | None, data_end, name: str) -> pa.Table:
    """Drop labels whose prediction time is later than `days` before `data_end` (see the module doc)."""
    if days is None or data_end is None or not len(table):
        return table
    import datetime as dt

    cutoff = pa.scalar(data_end - dt.timedelta(days=days), pa.timestamp("us"))
    keep = pc.less_equal(table.column("prediction_time"), cutoff)
    out = table.filter(keep)
    log.info(
        "task %s: %d of %d labels dropped for follow-up (prediction time after %s, %g days before the last event)",
        name,
        len(table) - len(out),
        len(table),
        cutoff.as_py(),
        days,
    )
    return out


def aces_events_sql(files: list[Path], names: set[str]) -> str:
    """SQL for the events ACES sees: the core MEDS columns, sorted by subject and time.

    cehrx's MEDS output carries a `visit_end` extension column on visit rows (OMOP visits have
    an end date but MEDS has no discharge event for them); each such row also yields a
    `<visit code>//END` event at `visit_end`, so a task can trigger at discharge
    (e.g. `Visit/IP//END` for 30-day readmission).
    """
    src = f"read_parquet({[str(f) for f in files]!r}, union_by_name=true)"
    cols = [c for c in MEDS_CORE if c in names]
    select = ", ".join(f'"{c}"' for c in cols)
    sql = f"SELECT {select} FROM {src}"
    if "visit_end" in names:
        ends = ", ".join(
            {"time": "visit_end AS time", "code": "code || '//END' AS code"}.get(
                c, f'NULL AS "{c}"' if c in ("numeric_value", "text_value") else f'"{c}"'
            )
            for c in cols
        )
        sql += f" UNION ALL SELECT {ends} FROM {src} WHERE visit_end IS NOT NULL"
    return f"SELECT * FROM ({sql}) ORDER BY subject_id, time NULLS FIRST, code"


def _quiet_aces() -> None:
    for name in ("aces", "aces.query", "aces.predicates", "aces.extract_subtree", "aces.constraints", "aces.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def times_seconds(times: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Arrow timestamps -> int64 seconds since 1970, floored (token times are whole seconds, so
    `token_time <= floor(t)` is exactly `token_time <= t`)."""
    if isinstance(times, pa.ChunkedArray):
        times = times.combine_chunks()
    us = times.cast(pa.timestamp("us")).cast(pa.int64()).to_numpy(zero_copy_only=False)
    return np.floor_divide(us, 1_000_000).astype(np.int64)


def meds_dir_for(prepared_dir: str | Path) -> Path:
    """The MEDS dataset a prepared dir was made from: `<prepared>/meds` (OMOP sources), else the
    MEDS source path recorded in its `config.yaml` (`data.path`)."""
    prepared_dir = Path(prepared_dir)
    if (prepared_dir / "meds" / "data").is_dir():
        return prepared_dir / "meds"
    cfg_path = prepared_dir / "config.yaml"
    if cfg_path.is_file():
        data = (yaml.safe_load(cfg_path.read_text()) or {}).get("data") or {}
        if data.get("source") == "meds" and data.get("path"):
            p = Path(str(data["path"]))
            for cand in (p, Path(__file__).resolve().parents[2] / p):
                if (cand / "data").is_dir():
                    return cand.resolve()
    raise CehrxError(
        f"no MEDS data for {prepared_dir}: expected {prepared_dir / 'meds'} or a MEDS data.path in its config.yaml"
    )


def read_labels(cfg, prepared: str | Path) -> tuple[pa.Table, dict]:
    """The labels of a probe / zero-shot run and where they came from: the one precedence rule.

    `labels_dir=...` (MEDS label files) wins; else `probe.task` (an ACES config) is run on the MEDS
    data the prepared dir was made from (kept in `probe.labels_cache_dir` when set). With both, the
    task still names the outcome zero-shot looks for, but the labels are the given ones.
    """
    task = cfg.probe.get("task") if "probe" in cfg else None
    if cfg.get("labels_dir"):
        return load_labels(cfg.labels_dir), {"labels_dir": str(cfg.labels_dir)}
    if not task:
        raise CehrxError(
            "no labels: pass labels_dir=<dir of MEDS label parquet files> or probe.task=<name> "
            f"(shipped: {', '.join(available_tasks())})"
        )
    meds = meds_dir_for(prepared)
    table = extract_labels(str(task), meds, cache_dir=cfg.probe.get("labels_cache_dir"))
    return table, {
        "task": str(task),
        "description": task_description(str(task)),
        "meds_dir": str(meds),
        "config": str(task_config_path(str(task))),
    }
