"""Write a prepared dir's train split as if a generator had produced it: the "memorising
generator" upper bound of fidelity and utility (and worst case of privacy) for the evaluate report.

    python experiments/evaluate/copy_as_synthetic.py runs/eunomia runs/eunomia/train_copy
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from cehrx.data.shards import load_split
from cehrx.data.vocab import Vocab
from cehrx.eval.marginal import write_synthetic_meds


def main(prepared: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(prepared / "tokens" / "train", out / "tokens" / "train")
    shutil.copyfile(prepared / "vocab.json", out / "vocab.json")
    meds = prepared / "meds"
    n = write_synthetic_meds(
        out, Vocab.load(prepared), load_split(prepared, "train"), meds if meds.is_dir() else None, "train-copy", 0
    )
    print(f"{out}: {n} MEDS events decoded from the train tokens")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
