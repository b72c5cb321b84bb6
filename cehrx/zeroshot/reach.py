"""REACH (Risk Estimation from Anticipated Conditional Hazards, arXiv 2602.03730): `zeroshot.estimator=reach`.

Sample each future with the outcome tokens **forbidden** at every step inside the window, record
at each such step the outcome's probability before forbidding, and estimate

    P(outcome in window) = 1 - prod_{t: w_t = 1} (1 - p_t)      per future, averaged over futures.

Notation (as in `cehrx.zeroshot.score`): pi(x_t | x_<t) is the model's step distribution
(temperature and grammar applied), O the outcome tokens, p_t = pi(O | x_<t), and w_t = 1 when an
outcome drawn at step t would fall inside the window: the time of the tokens before it in
`(start, end]` (ACES inclusivity), and with `window_visits=N` before the (N+1)-th generated [VS]
(`score.step_in_window`; outcome tokens carry no time and open no visit). w_t depends on x_<t
only. A = "some step with w_t = 1 draws an outcome".

**The sampler.** q draws x_t from pi(. | x_<t, x_t not in O) = pi(x_t | x_<t) / (1 - p_t) when
w_t = 1 and from pi otherwise (`InWindow` tells the engine which rows are inside, from its own
per-row seconds and visit counts; `Engine(forbid_ids=...)` renormalises over the other allowed
tokens and records p_t from the unmasked distribution).

**Unbiased.** Every path q can draw is outcome-free inside the window, and for such a path x,
pi(x) = prod_t pi(x_t | x_<t) = q(x) * prod_{t: w_t=1} (1 - p_t). Summing over those paths,
P(not A) = E_q[prod_{t: w_t=1} (1 - p_t)], so `1 - prod (1 - p_t)` of a q-future is an unbiased
estimate of P(A), and it lies in [0, 1].

**Never noisier than Monte Carlo.** A natural future can be drawn as a q-future plus a coin at
each window step that comes up "outcome" with probability p_t (then A happened; what follows no
longer matters for A). So the Monte Carlo indicator 1{A} and the REACH estimate live on one
probability space, with E[1{A} | q-future] = 1 - prod (1 - p_t): REACH is its Rao-Blackwellisation,
Var(REACH) = Var(1{A}) - E[Var(1{A} | q-future)] <= Var(1{A}). (The hazard sum of `score.py` has no
such guarantee: it can exceed 1 and vary more.)

**Assumptions and edge cases.**

- The draws come from pi itself: temperature > 0, no top-k / top-p (`ZeroshotConfig` refuses
  otherwise: q would not be pi renormalised).
- The outcome is a set of tokens. A code that counts only with a value (`Outcome.allowed_q`: the
  `Q<k>` after it decides) is a two-token event that masking one token cannot forbid exactly:
  refused (`reach_ids`); `zeroshot.estimator=hazard` handles it.
- A grammar state that allows outcome tokens only (e.g. after [VS] when every visit type is an
  outcome): nothing is left to renormalise over, p_t = 1, so the future's estimate is 1. The
  engine draws such a row unmasked (an outcome token) and the scorer reads p_t = 1 there; the
  future runs on (its estimate can no longer change) and counts as resolved, like a Monte Carlo
  future with the outcome.
- [DEATH] is a stop token; when it is an outcome (a death task) it is forbidden inside the window
  like any other outcome token, so q-futures do not die there.
- Resolution as for Monte Carlo: a future cut by the token budget before the window's end is
  unresolved and left out; a label with no resolved future gets the fallback (the run's mean).
- Expected days and the cumulative incidence curve: P(first outcome at step t) = E_q[S_{t-1} p_t]
  with S_t = prod_{s <= t, w_s=1} (1 - p_s), by the same argument; summing the terms up to a time g
  estimates P(outcome in (start, g]).

**What a REACH run does not give.** Its futures are not the model's natural futures, so the
share of futures with the outcome (Monte Carlo) and the hazard sum are not computed from them:
a REACH run reports REACH only (`metrics.json` `reach.note`); run `zeroshot.estimator=hazard`
(which also reports mc) for those. Its trajectories (`zeroshot.write_trajectories`) are REACH
futures too, and its chunks are never mixed with those of an mc/hazard run (the run fingerprint
holds `estimator=reach`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cehrx.errors import CehrxError
from cehrx.sampling.rows import Rows
from cehrx.zeroshot.outcome import Outcome, Window
from cehrx.zeroshot.score import step_in_window

__all__ = ["REACH_NOTE", "InWindow", "reach_ids"]

REACH_NOTE = (
    "REACH samples each future with the outcome tokens forbidden inside the window, so its futures are not "
    "the model's natural ones: no Monte Carlo or hazard estimate is computed from them "
    "(run zeroshot.estimator=hazard for those)"
)


def reach_ids(outcome: Outcome) -> np.ndarray:
    """The tokens REACH forbids and prices: every outcome token. Refuses outcomes that need a value."""
    if outcome.allowed_q:
        raise CehrxError(
            f"zeroshot.estimator=reach cannot forbid outcome {outcome.name}: {len(outcome.allowed_q)} of its code(s) "
            "count only with a value (a Q token after the code), which masking tokens one step at a time cannot "
            "forbid exactly; use zeroshot.estimator=hazard"
        )
    return np.asarray(outcome.token_ids, dtype=np.int64)


class InWindow:
    """`Engine.sample(forbid_when=...)` for REACH: the rows whose next step has w_t = 1.

    Reads the engine's per-row state before the draw (`Rows.secs`: seconds of the time tokens
    drawn so far; `Rows.visits`: [VS] drawn so far; `Rows.row // num_samples`: the prompt) and each
    prompt's slack (prediction time - last history time), and applies `score.step_in_window`, the
    function the scorer reads w_t with, to the same numbers."""

    def __init__(self, window: Window, slack_s: np.ndarray, num_samples: int, device: torch.device) -> None:
        self.window, self.num_samples = window, int(num_samples)
        self.slack = torch.as_tensor(np.asarray(slack_s, dtype=np.int64), device=device)

    def __call__(self, rows: Rows) -> Tensor:
        rel = (rows.secs - self.slack[rows.row // self.num_samples]).clamp_min(0)
        return step_in_window(rel, rows.visits, self.window)
