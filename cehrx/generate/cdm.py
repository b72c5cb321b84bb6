"""OMOP CDM 5.4 tables written by `generate`: column names, order and Arrow types.

Types follow the CDM 5.4 DDL: `integer` -> int32 (concept ids, counts, years), `bigint` ->
int64 (the primary and foreign keys of the event tables and person_id, which CDM 5.4 allows to
be bigint and which large sites need), `date` -> date32, `datetime` -> timestamp[us],
`float` -> float64, `varchar` -> string.
"""

from __future__ import annotations

import pyarrow as pa

I32, I64, DATE, TS, F64, STR = pa.int32(), pa.int64(), pa.date32(), pa.timestamp("us"), pa.float64(), pa.string()

CDM_TABLES: dict[str, list[tuple[str, pa.DataType]]] = {
    "person": [
        ("person_id", I64), ("gender_concept_id", I32), ("year_of_birth", I32), ("month_of_birth", I32),
        ("day_of_birth", I32), ("birth_datetime", TS), ("race_concept_id", I32), ("ethnicity_concept_id", I32),
        ("location_id", I64), ("provider_id", I64), ("care_site_id", I64), ("person_source_value", STR),
        ("gender_source_value", STR), ("gender_source_concept_id", I32), ("race_source_value", STR),
        ("race_source_concept_id", I32), ("ethnicity_source_value", STR), ("ethnicity_source_concept_id", I32),
    ],
    "observation_period": [
        ("observation_period_id", I64), ("person_id", I64), ("observation_period_start_date", DATE),
        ("observation_period_end_date", DATE), ("period_type_concept_id", I32),
    ],
    "visit_occurrence": [
        ("visit_occurrence_id", I64), ("person_id", I64), ("visit_concept_id", I32), ("visit_start_date", DATE),
        ("visit_start_datetime", TS), ("visit_end_date", DATE), ("visit_end_datetime", TS), ("visit_type_concept_id", I32),
        ("provider_id", I64), ("care_site_id", I64), ("visit_source_value", STR), ("visit_source_concept_id", I32),
        ("admitted_from_concept_id", I32), ("admitted_from_source_value", STR), ("discharged_to_concept_id", I32),
        ("discharged_to_source_value", STR), ("preceding_visit_occurrence_id", I64),
    ],
    "condition_occurrence": [
        ("condition_occurrence_id", I64), ("person_id", I64), ("condition_concept_id", I32),
        ("condition_start_date", DATE), ("condition_start_datetime", TS), ("condition_end_date", DATE),
        ("condition_end_datetime", TS), ("condition_type_concept_id", I32), ("condition_status_concept_id", I32),
        ("stop_reason", STR), ("provider_id", I64), ("visit_occurrence_id", I64), ("visit_detail_id", I64),
        ("condition_source_value", STR), ("condition_source_concept_id", I32), ("condition_status_source_value", STR),
    ],
    "drug_exposure": [
        ("drug_exposure_id", I64), ("person_id", I64), ("drug_concept_id", I32), ("drug_exposure_start_date", DATE),
        ("drug_exposure_start_datetime", TS), ("drug_exposure_end_date", DATE), ("drug_exposure_end_datetime", TS),
        ("verbatim_end_date", DATE), ("drug_type_concept_id", I32), ("stop_reason", STR), ("refills", I32),
        ("quantity", F64), ("days_supply", I32), ("sig", STR), ("route_concept_id", I32), ("lot_number", STR),
        ("provider_id", I64), ("visit_occurrence_id", I64), ("visit_detail_id", I64), ("drug_source_value", STR),
        ("drug_source_concept_id", I32), ("route_source_value", STR), ("dose_unit_source_value", STR),
    ],
    "procedure_occurrence": [
        ("procedure_occurrence_id", I64), ("person_id", I64), ("procedure_concept_id", I32), ("procedure_date", DATE),
        ("procedure_datetime", TS), ("procedure_end_date", DATE), ("procedure_end_datetime", TS),
        ("procedure_type_concept_id", I32), ("modifier_concept_id", I32), ("quantity", I32), ("provider_id", I64),
        ("visit_occurrence_id", I64), ("visit_detail_id", I64), ("procedure_source_value", STR),
        ("procedure_source_concept_id", I32), ("modifier_source_value", STR),
    ],
    "device_exposure": [
        ("device_exposure_id", I64), ("person_id", I64), ("device_concept_id", I32), ("device_exposure_start_date", DATE),
        ("device_exposure_start_datetime", TS), ("device_exposure_end_date", DATE), ("device_exposure_end_datetime", TS),
        ("device_type_concept_id", I32), ("unique_device_id", STR), ("production_id", STR), ("quantity", I32),
        ("provider_id", I64), ("visit_occurrence_id", I64), ("visit_detail_id", I64), ("device_source_value", STR),
        ("device_source_concept_id", I32), ("unit_concept_id", I32), ("unit_source_value", STR), ("unit_source_concept_id", I32),
    ],
    "measurement": [
        ("measurement_id", I64), ("person_id", I64), ("measurement_concept_id", I32), ("measurement_date", DATE),
        ("measurement_datetime", TS), ("measurement_time", STR), ("measurement_type_concept_id", I32),
        ("operator_concept_id", I32), ("value_as_number", F64), ("value_as_concept_id", I32), ("unit_concept_id", I32),
        ("range_low", F64), ("range_high", F64), ("provider_id", I64), ("visit_occurrence_id", I64),
        ("visit_detail_id", I64), ("measurement_source_value", STR), ("measurement_source_concept_id", I32),
        ("unit_source_value", STR), ("unit_source_concept_id", I32), ("value_source_value", STR),
        ("measurement_event_id", I64), ("meas_event_field_concept_id", I32),
    ],
    "observation": [
        ("observation_id", I64), ("person_id", I64), ("observation_concept_id", I32), ("observation_date", DATE),
        ("observation_datetime", TS), ("observation_type_concept_id", I32), ("value_as_number", F64),
        ("value_as_string", STR), ("value_as_concept_id", I32), ("qualifier_concept_id", I32), ("unit_concept_id", I32),
        ("provider_id", I64), ("visit_occurrence_id", I64), ("visit_detail_id", I64), ("observation_source_value", STR),
        ("observation_source_concept_id", I32), ("unit_source_value", STR), ("qualifier_source_value", STR),
        ("value_source_value", STR), ("observation_event_id", I64), ("obs_event_field_concept_id", I32),
    ],
    "death": [
        ("person_id", I64), ("death_date", DATE), ("death_datetime", TS), ("death_type_concept_id", I32),
        ("cause_concept_id", I32), ("cause_source_value", STR), ("cause_source_concept_id", I32),
    ],
    "concept": [
        ("concept_id", I32), ("concept_name", STR), ("domain_id", STR), ("vocabulary_id", STR), ("concept_class_id", STR),
        ("standard_concept", STR), ("concept_code", STR), ("valid_start_date", DATE), ("valid_end_date", DATE),
        ("invalid_reason", STR),
    ],
}

# Clinical event tables: (table, id column, concept column, date prefix) in the order they are written.
EVENT_TABLES: dict[str, tuple[str, str, str]] = {
    "condition_occurrence": ("condition_occurrence_id", "condition_concept_id", "condition_start"),
    "drug_exposure": ("drug_exposure_id", "drug_concept_id", "drug_exposure_start"),
    "procedure_occurrence": ("procedure_occurrence_id", "procedure_concept_id", "procedure"),
    "device_exposure": ("device_exposure_id", "device_concept_id", "device_exposure_start"),
    "measurement": ("measurement_id", "measurement_concept_id", "measurement"),
    "observation": ("observation_id", "observation_concept_id", "observation"),
}

# OMOP domain_id -> the table its events are written to; every other domain goes to observation.
DOMAIN_TABLE = {
    "Condition": "condition_occurrence", "Drug": "drug_exposure", "Procedure": "procedure_occurrence",
    "Device": "device_exposure", "Measurement": "measurement", "Observation": "observation",
}
TABLE_DOMAIN = {t: d for d, t in DOMAIN_TABLE.items()}


def schema(table: str) -> pa.Schema:
    return pa.schema(CDM_TABLES[table])
