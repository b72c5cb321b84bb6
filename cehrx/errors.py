"""User-facing errors: one line that names the file, table, column or value at fault."""


class CehrxError(Exception):
    """Bad input or a refused action; the CLI prints the message alone, without a traceback."""


class DataError(CehrxError):
    """The input data is missing something required or cannot be read."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message as one line, for a CehrxError that wraps it.

    DuckDB's and pyarrow's messages run over several lines (the offending row, the SQL, hints); a
    user error must stay one line, and must not echo a patient's row into a log. Keeps the lines
    before the first blank one, without the echoed row or SQL.

    >>> one_line(ValueError("CSV Error on Line: 2\\nOriginal Line: 1,caf\\nNot utf-8 encoded.\\n\\nPossible Solution: ..."))
    'CSV Error on Line: 2; Not utf-8 encoded.'
    """
    kept = []
    for line in str(e).splitlines():
        if not line.strip():
            if kept:
                break
            continue
        if line.startswith(("Original Line", "LINE ")) or set(line.strip()) <= {"^"}:
            continue
        kept.append(line.strip())
    text = "; ".join(kept) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
