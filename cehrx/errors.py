"""User-facing errors: one line that names the file, table, column or value at fault."""


class CehrxError(Exception):
    """Bad input or a refused action; the CLI prints the message alone, without a traceback."""


class DataError(CehrxError):
    """The input data is missing something required or cannot be read."""
