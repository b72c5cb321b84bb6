"""The sampling engine shared by `generate` and `zeroshot`: `Engine`, `SamplingConfig`, `Samples`.

See `cehrx/sampling/README.md` for the modules and the rules callers rely on.
"""

from cehrx.sampling.config import SamplingConfig
from cehrx.sampling.engine import Engine
from cehrx.sampling.samples import STOP_DEATH, STOP_END, STOP_NAMES, STOP_TIME, STOP_TOKENS, Samples

__all__ = [
    "STOP_DEATH",
    "STOP_END",
    "STOP_NAMES",
    "STOP_TIME",
    "STOP_TOKENS",
    "Engine",
    "Samples",
    "SamplingConfig",
]
