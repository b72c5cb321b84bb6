"""cehrx: foundation models of electronic health records (OMOP CDM / MEDS -> CEHR-GPT tokens)."""

__version__ = "0.1.0"
