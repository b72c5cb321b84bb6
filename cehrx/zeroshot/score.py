"""Reading sampled futures: is the outcome inside the window, is the future resolved, the hazard sum and REACH.

Reading a future (`score_futures`, vectorised over all tokens of all futures):

- **Time.** A generated token's time is the last history time plus the time tokens generated up
  to and including it (gap `D<n>`/`Y<n>`, inpatient `i-D<n>`/`i-H<h>`). Its offset from the
  prediction time is that minus the prediction time, floored at 0: everything generated comes
  after the cut, so an event whose rebuilt time is not later than the prediction time (the model
  cannot know how long ago the last recorded event was) happens just after it.
- **Inside the window.** An outcome token (see `cehrx.zeroshot.outcome`) counts when its offset
  is inside `(start, end]` (inclusivity from the ACES window) and, with `window_visits=N`, it
  comes before the (N+1)-th generated `[VS]`.
- **Who is in the denominator.** A future is *resolved* when it has the outcome inside the
  window, when it has run past the window's end (time, or visit count) without it, or when it
  ended with `[END]`/`[DEATH]` (the record ends: a true negative). A future cut by the token
  budget before the window's end without the outcome is *unresolved* and left out: it says
  nothing about the rest of the window.
- **Probability** = futures with the outcome / resolved futures. When all of a label's futures
  are unresolved, the label gets the mean probability over all resolved futures of the run (the
  model could not tell, so it gets the cohort rate; `fallback=True` in `details.parquet`).
- **Expected time to outcome** = mean days from the prediction time to the first outcome token,
  over the futures that have one in the window (NaN when none does).

**The hazard estimator** (`zeroshot.estimator=hazard`) reads the same futures differently. At
every step t the sampler also records p_t, the probability that the token it draws is an outcome
token (`Engine(watch_ids=...)`). Let H_t = 1 when no outcome has been drawn inside the window
before step t, and w_t = 1 when an outcome drawn at step t would fall inside the window (its
time and visit count are those of the tokens before it, as outcome codes carry no time). Then

    P(outcome in window) = E[ sum_t H_t w_t 1{x_t outcome} ] = E[ sum_t H_t w_t p_t ]

because the indicator's expectation given the past is p_t and H_t, w_t depend on the past only
(the tower rule; the sum has at most one non-zero indicator, at the first outcome). So each
future's `sum_t H_t w_t p_t` (steps up to and including its first outcome) is an unbiased
estimate of the label's risk, like its 0/1 indicator, but it spends the probability of every
step instead of one draw: for a rare outcome most futures contribute a small positive number
rather than 0, and the variance drops by orders of magnitude. The futures are the same
(recording p_t changes no draw). Assumptions: the distribution the futures are drawn from is the
model's (temperature applied, no top-k/top-p truncation: refused); resolution and the fallback
are those of the Monte Carlo count. An outcome code that needs a value (`allowed_q`) cannot be
priced before its value is drawn: its term stays the realised indicator, which keeps the sum
unbiased. The per-label standard error is the spread of the per-future sums over sqrt(resolved).
A single future's sum is not bounded by 1 (a future that gives the outcome a high probability at
many steps without drawing it), so a label's mean can exceed 1 by chance; the reported probability
and curve are clipped to [0, 1]. Clipping projects onto the range the true risk lies in, so it never
raises a label's squared error; it adds a small downward bias where it acts (how many labels:
`labels_clipped` in metrics.json; the unclipped mean is `hazard_sum / n_resolved`).
From the same terms: the expected days to the outcome (the terms weighting their times) and a
cumulative incidence curve (the terms summed up to each of `CIF_POINTS` times in the window).

**Control variates** (`zeroshot.estimator=hazard_cv`, `cehrx.zeroshot.controls`): with the sampler's expected
basis rows (`control_mean`), `score_futures` also sums each future's mean-zero controls over the hazard's own
steps (`FutureScores.controls`), and `aggregate` keeps the per-label sums the cross-fitted regression needs.

**REACH** (`zeroshot.estimator=reach`, `cehrx.zeroshot.reach` derives it) reads futures sampled
differently: the outcome tokens are forbidden at every step with w_t = 1 (the same w_t,
`step_in_window`, which the sampler evaluates on its own per-row time and visit count), and p_t
is their probability before forbidding. Each future's estimate is `1 - prod_{t: w_t=1} (1 - p_t)`
(`_add_reach`); resolution, the per-label mean and standard error and the fallback are those of
the hazard sum. Its futures are not the model's natural ones: a REACH run has no Monte Carlo or
hazard estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cehrx.data.decode import token_seconds
from cehrx.data.grammar import SECONDS_PER_DAY as DAY
from cehrx.data.shards import segment_cumsum
from cehrx.data.vocab import VS, Vocab
from cehrx.sampling import STOP_DEATH, STOP_END
from cehrx.zeroshot.controls import control_weights, future_controls, label_sums
from cehrx.zeroshot.outcome import Outcome, Window

HAZARD_COLUMNS = ("hazard_sum", "hazard_probability", "hazard_se", "hazard_expected_days")
REACH_COLUMNS = ("reach_sum", "reach_probability", "reach_se", "reach_expected_days")
CIF_POINTS = 10  # cumulative incidence at window_end * k / CIF_POINTS, k = 1..CIF_POINTS
LOG_ZERO = -1000.0  # log(1 - p_t) floor for REACH (p_t = 1): exp of it is 0.0 in float64


@dataclass
class FutureScores:
    """Per future (sample row): outcome inside the window, resolved, days to the first outcome."""

    has_outcome: np.ndarray  # bool [n]
    resolved: np.ndarray  # bool [n]
    days_to_outcome: np.ndarray  # float64 [n], NaN without outcome
    hazard: np.ndarray | None = None  # float64 [n]: sum_t H_t w_t p_t (see the module doc), with watch probabilities
    hazard_days: np.ndarray | None = None  # float64 [n]: the same terms times their days after the prediction time
    cif: np.ndarray | None = None  # float64 [n, CIF_POINTS]: the terms up to each grid time (finite windows)
    reach: np.ndarray | None = None  # float64 [n]: 1 - prod_{t: w_t=1} (1 - p_t) of a REACH future (module doc)
    reach_days: np.ndarray | None = None  # float64 [n]: P(first outcome at step t) summed times its days
    reach_cif: np.ndarray | None = None  # float64 [n, CIF_POINTS]: the estimate up to each grid time (finite windows)
    controls: np.ndarray | None = None  # float64 [n, K]: the control variates' M (`cehrx.zeroshot.controls`)


def outcome_mask(tokens: np.ndarray, offsets: np.ndarray, outcome: Outcome, vocab_size: int) -> np.ndarray:
    """bool per token: an outcome token (a value-constrained code also needs an allowed Q next)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    is_out = np.zeros(vocab_size, dtype=bool)
    is_out[outcome.token_ids] = True
    mask = is_out[tokens]
    if outcome.allowed_q and mask.any():
        valued = np.zeros(vocab_size, dtype=bool)
        valued[list(outcome.allowed_q)] = True
        pairs = np.array([t * vocab_size + q for t, qs in outcome.allowed_q.items() for q in qs], dtype=np.int64)
        nxt = np.append(tokens[1:], -1)
        last = np.zeros(len(tokens), dtype=bool)
        last[np.asarray(offsets[1:], dtype=np.int64)[np.diff(offsets) > 0] - 1] = True
        nxt[last] = -1  # the next token belongs to another future
        v = mask & valued[tokens]
        mask[v] = np.isin(tokens[v] * vocab_size + nxt[v], pairs) & (nxt[v] >= 0)
    return mask


def score_futures(
    vocab: Vocab,
    outcome: Outcome,
    tokens: np.ndarray,
    offsets: np.ndarray,
    stop: np.ndarray,
    slack_s: np.ndarray,
    watch_prob: np.ndarray | None = None,
    reach: bool = False,
    control_mean: np.ndarray | None = None,
    control_basis: np.ndarray | None = None,
) -> FutureScores:
    """Score generated futures (flat tokens/offsets, `stop` reasons of the sampler).

    `slack_s[i]` = prediction time - last history time (seconds, >= 0) of future i's prompt.
    `watch_prob` (per token: P(the step draws a plain outcome token), `hazard_watch_ids`) adds
    the hazard estimator's per-future sums; with `reach` (futures sampled with the outcome
    forbidden inside the window) the REACH estimates instead. `control_mean` (per token, the
    sampler's expected `control_basis` row) adds the hazard's control variates (`cehrx.zeroshot.controls`).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    seg = np.repeat(np.arange(n), lengths)
    w = outcome.window
    steps = token_seconds(vocab)[tokens]
    elapsed = segment_cumsum(steps, offsets)  # seconds since the last history token
    slack = np.asarray(slack_s, dtype=np.int64)
    rel = np.maximum(elapsed - slack[seg], 0)  # seconds after the prediction time
    inside = outcome_mask(tokens, offsets, outcome, len(vocab)) & _in_time(rel, w)
    visits_total = np.zeros(n, dtype=np.int64)
    if w.visits is not None:
        nvs = segment_cumsum((tokens == vocab[VS]).astype(np.int64), offsets)
        inside &= nvs <= w.visits
        visits_total = np.bincount(seg, weights=(tokens == vocab[VS]), minlength=n).astype(np.int64)
    has = np.zeros(n, dtype=bool)
    days = np.full(n, np.nan)
    hit_seg, first = np.unique(seg[inside], return_index=True)
    has[hit_seg] = True
    days[hit_seg] = rel[np.flatnonzero(inside)[first]] / DAY
    total_rel = np.maximum(np.bincount(seg, weights=steps, minlength=n).astype(np.int64) - slack, 0)
    passed = _past_end(total_rel, w)
    if w.visits is not None:
        passed |= visits_total > w.visits
    ended = np.isin(np.asarray(stop), [STOP_END, STOP_DEATH])
    scores = FutureScores(has, has | passed | ended, days)
    if watch_prob is not None:
        is_vs = (tokens == vocab[VS]).astype(np.int64)
        before = _Before(rel=np.maximum(elapsed - steps - slack[seg], 0), visits=segment_cumsum(is_vs, offsets) - is_vs)
        p = np.asarray(watch_prob, dtype=np.float64)
        if reach:
            _add_reach(scores, outcome.window, offsets, seg, inside, before, p)
        else:
            weight = _add_hazard(scores, vocab, outcome, tokens, offsets, seg, inside, before, p)
            if control_mean is not None:
                weights = control_weights(weight, before.rel, outcome.window)
                scores.controls = future_controls(tokens, seg, n, control_mean, control_basis, weights)
    return scores


@dataclass
class _Before:
    """Per token, what an outcome drawn at its step would have: seconds after the prediction time, visits before it."""

    rel: np.ndarray  # int64 seconds
    visits: np.ndarray  # int64


def hazard_watch_ids(outcome: Outcome) -> np.ndarray:
    """The outcome tokens whose probability the sampler records: those that need no value."""
    return np.setdiff1d(outcome.token_ids, np.asarray(list(outcome.allowed_q), dtype=np.int64))


def _add_hazard(
    scores: FutureScores,
    vocab: Vocab,
    outcome: Outcome,
    tokens: np.ndarray,
    offsets: np.ndarray,
    seg: np.ndarray,
    inside: np.ndarray,
    before: _Before,
    p: np.ndarray,
) -> np.ndarray:
    """Fill `scores.hazard`, `hazard_days`, `cif` (module doc): the terms H_t w_t p_t of every step up
    to the first outcome in the window, plus the realised indicator of a first outcome that needs a value.
    Returns the control variates' step weights (float64 per token, `cehrx.zeroshot.controls`): H_t w_t, except
    that a first outcome that needs a value is only known at its value's step, which therefore keeps its
    weight whatever value is drawn (a weight must not depend on the draw it weighs)."""
    n = len(offsets) - 1
    w = outcome.window
    pos = np.arange(len(tokens)) - np.repeat(offsets[:-1], np.diff(offsets))
    first = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(first, seg[inside], pos[inside])
    alive = pos <= first[seg]  # H_t: no outcome in the window before step t
    spent = alive & step_in_window(before.rel, before.visits, w)
    term = np.where(spent, p, 0.0)
    valued = np.zeros(len(vocab), dtype=bool)
    valued[np.asarray(list(outcome.allowed_q), dtype=np.int64)] = True
    term = term + (
        inside & (pos == first[seg]) & valued[tokens]
    )  # the first outcome needs a value: its realised indicator
    days = before.rel / DAY
    scores.hazard, scores.hazard_days, scores.cif = _by_future(seg, n, term, days, w)
    valued_first = np.zeros(n, dtype=np.int64)
    hit = first < np.iinfo(np.int64).max
    valued_first[hit] = valued[tokens[offsets[:-1][hit] + first[hit]]]
    return ((pos <= first[seg] + valued_first[seg]) & step_in_window(before.rel, before.visits, w)).astype(np.float64)


def _add_reach(
    scores: FutureScores,
    w: Window,
    offsets: np.ndarray,
    seg: np.ndarray,
    inside: np.ndarray,
    before: _Before,
    p: np.ndarray,
) -> None:
    """Fill `scores.reach`, `reach_days`, `reach_cif` (module doc, `cehrx.zeroshot.reach`): per future
    `1 - S` with `S = prod_{t: w_t=1} (1 - p_t)`; the step terms `S_{t-1} - S_t` = P(first outcome at
    step t) give the expected days and the curve. An outcome drawn inside the window (only when its
    grammar state allowed nothing else) has p_t = 1."""
    n = len(offsets) - 1
    p = np.where(inside, 1.0, np.clip(p, 0.0, 1.0))
    with np.errstate(divide="ignore"):
        log_keep = np.where(step_in_window(before.rel, before.visits, w), np.log1p(-p), 0.0)
    log_keep = np.maximum(log_keep, LOG_ZERO)  # exp(LOG_ZERO) is 0.0 in float64; no -inf in the running sums
    cum = segment_cumsum(log_keep, offsets)
    term = np.exp(cum - log_keep) - np.exp(cum)  # S_{t-1} - S_t
    _, scores.reach_days, scores.reach_cif = _by_future(seg, n, term, before.rel / DAY, w)
    # the terms telescope to 1 - S; taken from the log sum instead, so that it lies exactly in [0, 1]
    scores.reach = 1.0 - np.exp(np.bincount(seg, weights=log_keep, minlength=n))


def _by_future(
    seg: np.ndarray, n: int, term: np.ndarray, days: np.ndarray, w: Window
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per future: the step terms summed, weighted by their days, and summed up to each grid time (finite windows)."""
    total = np.bincount(seg, weights=term, minlength=n)
    weighted = np.bincount(seg, weights=term * days, minlength=n)
    if not np.isfinite(w.end_days):
        return total, weighted, None
    grid = w.end_days * np.arange(1, CIF_POINTS + 1) / CIF_POINTS
    return total, weighted, np.stack([np.bincount(seg, weights=term * (days <= g), minlength=n) for g in grid], axis=1)


def step_in_window(rel_s, visits_before, w: Window):
    """w_t per step (numpy or torch, elementwise): an outcome drawn at the step would count, from the
    seconds after the prediction time (floored at 0) and the generated [VS] before it."""
    inside = _in_time(rel_s, w)
    return inside if w.visits is None else inside & (visits_before <= w.visits)


def _in_time(rel_s, w: Window):
    """`rel_s` (integer seconds >= 0, numpy or torch) inside the window's time bounds: integer thresholds,
    so the comparison is exact in any dtype. A start at or before 0 admits offset 0 (generated after the cut)."""
    start, end = w.start_days * DAY, w.end_days * DAY
    if start <= 0:
        lower = rel_s >= 0
    else:
        lower = rel_s >= math.ceil(start) if w.start_inclusive else rel_s > math.floor(start)
    if math.isinf(end):
        return lower
    return lower & (rel_s <= math.floor(end) if w.end_inclusive else rel_s < math.ceil(end))


def _past_end(total_rel_s: np.ndarray, w: Window) -> np.ndarray:
    """The future was followed beyond the window's end (an outcome at the end itself would still count)."""
    end = w.end_days * DAY
    return total_rel_s > end if w.end_inclusive else total_rel_s >= end


def aggregate(scores: FutureScores, prompt_index: np.ndarray, n_prompts: int) -> dict[str, np.ndarray]:
    """Per prompt: futures, resolved, with outcome, probability (NaN when none resolved), mean days; and the
    hazard / REACH columns (`_per_label`) when the scores hold them."""
    pi = np.asarray(prompt_index, dtype=np.int64)
    n = np.bincount(pi, minlength=n_prompts)
    res = np.bincount(pi, weights=scores.resolved, minlength=n_prompts).astype(np.int64)
    pos = np.bincount(pi, weights=scores.has_outcome, minlength=n_prompts).astype(np.int64)
    dsum = np.bincount(pi, weights=np.nan_to_num(scores.days_to_outcome), minlength=n_prompts)
    with np.errstate(invalid="ignore", divide="ignore"):
        prob = np.where(res > 0, pos / np.maximum(res, 1), np.nan)
        days = np.where(pos > 0, dsum / np.maximum(pos, 1), np.nan)
    out = {"n_futures": n, "n_resolved": res, "n_outcome": pos, "probability": prob, "expected_days": days}
    for name, value, value_days, cif in (
        ("hazard", scores.hazard, scores.hazard_days, scores.cif),
        ("reach", scores.reach, scores.reach_days, scores.reach_cif),
    ):
        if value is not None:
            out.update(_per_label(name, value, value_days, cif, scores.resolved, pi, res))
    if scores.controls is not None:
        out.update(label_sums(scores.hazard, scores.controls, scores.resolved, pi, n_prompts))
    return out


def _per_label(
    name: str,
    value: np.ndarray,
    value_days: np.ndarray,
    cif: np.ndarray | None,
    resolved: np.ndarray,
    pi: np.ndarray,
    res: np.ndarray,
) -> dict[str, np.ndarray]:
    """A per-future estimate (hazard sum, REACH) per prompt over its resolved futures: `<name>_sum`,
    `_probability` (mean; NaN when none resolved), `_se`, `_expected_days` and `_cif`."""
    n_prompts = len(res)
    r = resolved.astype(np.float64)
    total = np.bincount(pi, weights=value * r, minlength=n_prompts)
    sq = np.bincount(pi, weights=value**2 * r, minlength=n_prompts)
    days = np.bincount(pi, weights=value_days * r, minlength=n_prompts)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(res > 0, total / np.maximum(res, 1), np.nan)
        var = np.where(res > 1, (sq - res * mean**2) / np.maximum(res - 1, 1), np.nan)
        out[f"{name}_sum"] = total
        out[f"{name}_probability"] = np.clip(mean, 0.0, 1.0)  # module doc: a hazard mean may pass 1 by chance
        out[f"{name}_se"] = np.sqrt(np.maximum(var, 0.0) / np.maximum(res, 1))
        out[f"{name}_expected_days"] = np.where(total > 0, days / total, np.nan)
        if cif is not None:
            c = np.stack([np.bincount(pi, weights=cif[:, k] * r, minlength=n_prompts) for k in range(cif.shape[1])], 1)
            out[f"{name}_cif"] = np.clip(np.where(res[:, None] > 0, c / np.maximum(res, 1)[:, None], np.nan), 0.0, 1.0)
    return out
