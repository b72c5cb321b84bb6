"""`cehrx task=show subject_id=N`: print one prepared subject's tokens with dates and descriptions."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow.compute as pc
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from cehrx.data.shards import SPLITS, read_split_table
from cehrx.data.vocab import Vocab
from cehrx.errors import CehrxError


def find_subject(prepared_dir: Path, subject_id: int | None) -> tuple[str, dict]:
    """The split and shard row of a subject (the first train subject when None)."""
    for split in SPLITS:
        table = read_split_table(prepared_dir, split)
        if subject_id is None and table.num_rows:
            return split, table.slice(0, 1).to_pylist()[0]
        if subject_id is not None:
            hit = table.filter(pc.equal(table["subject_id"], subject_id))
            if hit.num_rows:
                return split, hit.to_pylist()[0]
    raise CehrxError(f"subject_id={subject_id} is not in any token shard under {prepared_dir / 'tokens'}")


def run(cfg: DictConfig) -> dict:
    prepared = Path(cfg.data.prepared_dir if cfg.output_dir is None else cfg.output_dir)
    vocab = Vocab.load(prepared)
    split, row = find_subject(prepared, cfg.task.subject_id)
    table = Table(title=f"subject {row['subject_id']} ({split}, {row['n_tokens']} tokens)")
    for col in ("#", "time (UTC)", "token", "description"):
        table.add_column(col)
    for i, (tok, t) in enumerate(zip(row["tokens"][: cfg.task.max_tokens], row["times"])):
        when = datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(str(i), when, vocab.tokens[tok], vocab.descriptions[tok] or "")
    Console().print(table)
    return {"subject_id": row["subject_id"], "split": split, "n_tokens": row["n_tokens"]}
