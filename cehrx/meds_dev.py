"""MEDS-DEV argument names accepted by the `cehrx` command line.

MEDS-DEV runs every model with the same arguments (`dataset_dir`, `labels_dir`, `output_dir`,
`split`, `model_initialization_dir`, `demo`); translating them here lets its `model.yaml` call
`cehrx` directly, with no wrapper script.

>>> translate(["task=probe", "dataset_dir=/d", "model_initialization_dir=/m", "split=held_out"])
['task=probe', 'data=meds', 'data.path=/d', 'model_dir=/m', 'split=held_out']
>>> translate(["task=pretrain", "demo=True"])
['task=pretrain', 'model=micro', 'trainer.max_steps=20']
>>> translate(["demo=false", "output_dir=/o"])
['output_dir=/o']
"""

from __future__ import annotations

DEMO_OVERRIDES = ("model=micro", "trainer.max_steps=20")


def translate(args: list[str]) -> list[str]:
    """Rewrite MEDS-DEV `key=value` arguments into cehrx overrides; everything else passes through."""
    out: list[str] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            out.append(arg)
        elif key == "dataset_dir":
            out += ["data=meds", f"data.path={value}"]
        elif key == "model_initialization_dir":
            out.append(f"model_dir={value}")
        elif key == "demo":
            if value.strip().lower() in ("true", "1", "yes"):
                out += list(DEMO_OVERRIDES)
        else:
            out.append(arg)
    return out
