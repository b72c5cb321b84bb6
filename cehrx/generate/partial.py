"""A generate run's finished shards, kept beside the output so that a killed run resumes.

`.<output name>.partial/` holds `settings.json` (everything that decides the samples: a resume
with other settings is refused, `cehrx.data.workdir.claim_work_dir`), `tokens/train/<k>.parquet`
and `shard_stats/<k>.json`; a shard is finished once its stats exist. `tasks/generate.py` removes
the dir once the output is in place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cehrx.data.atomic import write_parquet, write_text
from cehrx.data.shards import TokenArrays, table_from_arrays
from cehrx.data.workdir import claim_work_dir

__all__ = ["SHARDS", "STATS", "Partial", "drop_if_finished", "partial_dir"]

SHARDS = Path("tokens") / "train"
STATS = "shard_stats"


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def drop_if_finished(out: Path, finished: bool) -> bool:
    """Remove the partial dir of a finished output: a run killed between putting the output in place and
    removing the partial leaves it behind, and no later run (refused: the output is finished) would.
    Its shards are hard-linked into the output, so only disk is freed."""
    path = partial_dir(out)
    if finished and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        return True
    return False


class Partial:
    """`.<name>.partial/` beside the output: finished shards and their stats, reused on restart."""

    def __init__(self, out: Path, settings: dict, overwrite: bool) -> None:
        self.dir = partial_dir(out)
        claim_work_dir(self.dir, settings, overwrite, what="generate")  # settings.json: resume only the same run
        (self.dir / SHARDS).mkdir(parents=True, exist_ok=True)
        (self.dir / STATS).mkdir(parents=True, exist_ok=True)

    def done(self) -> list[dict]:
        """Stats of the finished shards, in order (a shard is finished once its stats exist)."""
        stats = []
        while (f := self.dir / STATS / f"{len(stats)}.json").is_file():
            stats.append(json.loads(f.read_text()))
        return stats

    def save(self, index: int, arrays: TokenArrays, stats: dict) -> None:
        write_parquet(table_from_arrays(arrays), self.dir / SHARDS / f"{index}.parquet", compression="zstd")
        write_text(self.dir / STATS / f"{index}.json", json.dumps(stats, indent=2) + "\n")

    def shard_files(self) -> list[Path]:
        """The parquet files of the finished shards (a file without stats is an interrupted write)."""
        return [self.dir / SHARDS / f"{i}.parquet" for i in range(len(self.done()))]
