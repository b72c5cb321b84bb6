"""A generate run's finished shards, kept beside the output so that a killed run resumes.

`.<output name>.partial/` holds `settings.json` (everything that decides the samples: a resume
with other settings is refused, `cehrx.data.workdir.claim_work_dir`), `tokens/train/<k>.parquet`
and `shard_stats/<k>.json`; a shard is finished once its stats exist. `tasks/generate.py` removes
the dir once the output is in place.
"""

from __future__ import annotations

import json
from pathlib import Path

from cehrx.data.atomic import write_parquet, write_text
from cehrx.data.shards import TokenArrays
from cehrx.data.workdir import claim_work_dir
from cehrx.generate.patients import shard_table

__all__ = ["SHARDS", "STATS", "Partial"]

SHARDS = Path("tokens") / "train"
STATS = "shard_stats"


class Partial:
    """`.<name>.partial/` beside the output: finished shards and their stats, reused on restart."""

    def __init__(self, out: Path, settings: dict, overwrite: bool) -> None:
        self.dir = out.parent / f".{out.name}.partial"
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
        write_parquet(shard_table(arrays), self.dir / SHARDS / f"{index}.parquet", compression="zstd")
        write_text(self.dir / STATS / f"{index}.json", json.dumps(stats, indent=2) + "\n")

    def shard_files(self) -> list[Path]:
        """The parquet files of the finished shards (a file without stats is an interrupted write)."""
        return [self.dir / SHARDS / f"{i}.parquet" for i in range(len(self.done()))]
