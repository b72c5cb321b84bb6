"""Death rate and age at death by birth decade, real against synthetic MEDS (experiments/synthea20k/RESULTS.md).

    python experiments/synthea20k/death_by_cohort.py [REAL_MEDS_DATA] [SYNTHETIC_MEDS_DATA]

Why: evaluate's `age_at_death` KS says synthetic deaths come too young, but not whether the model's death
hazard has the wrong age gradient or the cohorts differ. Stratifying by birth decade separates the two:
the cohorts' sizes and their follow-up (median age at the last event of those alive) should match, and the
death rate and median age at death within each decade then show the hazard's shape. One DuckDB query per
set over `MEDS_BIRTH`, the first `MEDS_DEATH` and the last event of each subject.
"""

from __future__ import annotations

import sys

import duckdb

REAL = "../shared/data/synthea20k/meds/data"
SYNTHETIC = "runs/synthea20k/synthetic/meds/data"


def cohort_query(data_dir: str, name: str) -> str:
    return f"""
    (with ev as (select subject_id, time, code from read_parquet('{data_dir}/**/*.parquet')),
    b as (select subject_id, min(time) filter (where code like 'MEDS_BIRTH%') birth,
                 min(time) filter (where code like 'MEDS_DEATH%') death, max(time) last from ev group by 1)
    select (year(birth) // 10) * 10 as birth_decade, '{name}' as data, count(*) as patients,
      round(avg((death is not null)::int), 3) as death_rate,
      round(median(date_diff('day', birth, death) / 365.25), 1) as median_age_at_death,
      round(median(date_diff('day', birth, last) / 365.25) filter (where death is null), 1) as median_age_at_end_alive
    from b where birth is not null group by all)"""


def main(real: str = REAL, synthetic: str = SYNTHETIC) -> None:
    con = duckdb.connect()
    sql = f"{cohort_query(real, 'real')} union all {cohort_query(synthetic, 'synthetic')} order by birth_decade, data"
    con.sql(sql).show(max_rows=1000)


if __name__ == "__main__":
    main(*sys.argv[1:3])
