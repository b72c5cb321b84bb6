"""Control variates for the hazard sum (`zeroshot.estimator=hazard_cv`): less path noise, still unbiased.

The hazard sum removes the noise of each step's draw of the outcome, not the noise of which path
a future took: a future that happened to draw an ER visit early, or a long gap, has a higher or lower
sum than its history's average future (`experiments/zeroshot/RESULTS.md`: on most Synthea tasks that
path noise is most of the variance). Every other draw of the future is also a random event whose
expectation the model gives, and those draws carry the path noise. For any fixed vector-valued
function b of a token (the K columns of `control_basis`) and any weights a_t that depend on the past
only,

    M = sum_t a_t (b(x_t) - E_t[b(x)]),    E_t[b(x)] = sum_v p_t(v) b(v)

has mean zero (each term's expectation given the past is zero; futures stop after a bounded number
of steps). Two weightings are used (`control_weights`): a_t, and a_t times the share of the window
still ahead (the same draw moves the risk more early in the window than near its end). So for any fixed coefficients beta, `H - beta . M` is, like the hazard sum H, an unbiased
estimate of the label's risk, and with beta the regression of H on M (within labels: the path noise
it explains) its variance is that of H less the part M explains. The sampler records E_t[b(x)]
(`Engine(control_basis=...)`); the weights are the hazard's own, a_t = H_t w_t (before the first
outcome, inside the window).

beta is fitted on the futures of other labels than the ones it corrects (cross-fitting: two folds by
label row parity), so that beta is independent of the futures it is applied to. The fit reads the
resolved futures (those the hazard sum averages); the correction is beta times M averaged over all of a
label's futures, resolved or not, whose mean is exactly zero: `hazard_cv` has the hazard sum's
expectation. The result is clipped to [0, 1] (a per-label risk), which biases it slightly near 0 or 1.

The basis (`control_basis`): how many days a token advances (time drives how much of the window a
future spends), a visit start, `[END]`, `[DEATH]`, each visit type (an ER visit makes an admission
likelier), the outcome tokens themselves (the Monte Carlo count is the hazard sum plus their
martingale, so the fit can also weigh in the count), and the leading principal components of the
model's token embeddings (what the model itself tells apart), each scaled to unit spread over the
vocabulary. The per-label sums the fit needs are kept in the chunks (`cv_*` columns), so a resumed run
refits over every chunk.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch

from cehrx.data.decode import token_seconds
from cehrx.data.grammar import SECONDS_PER_DAY
from cehrx.data.vocab import DEATH, END, VS, Vocab

log = logging.getLogger("cehrx.zeroshot")

# per label: sum M over all its futures (`cv_m_all`), and over its resolved futures sum M, M M^T, M H, H^2
CV_COLUMNS = ("cv_m_all", "cv_m", "cv_mm", "cv_mh", "cv_hh")
EMBEDDING_COMPONENTS = 12
VERSION = 1  # of the basis and weightings: a resumed run never mixes chunks of two (`describe`)
RIDGE = 1e-3  # relative to the mean variance of the controls: keeps the fit defined when a control never varies


def control_basis(
    vocab: Vocab,
    embeddings: torch.Tensor | np.ndarray,
    outcome_ids: np.ndarray | None = None,
    components: int = EMBEDDING_COMPONENTS,
) -> np.ndarray:
    """float32 `[V, K]`: log(1 + days advanced), [VS], [END], [DEATH], each visit type, the outcome tokens
    (one column, when given), then `components` principal components of the token embeddings; every column
    centred and scaled to unit spread over the vocabulary."""
    days = np.log1p(token_seconds(vocab).astype(np.float64) / SECONDS_PER_DAY)
    marked = [vocab[VS], vocab[END], vocab[DEATH], *vocab.ids_of_kind("visit").tolist()]
    marks = np.zeros((len(vocab), len(marked) + (outcome_ids is not None)))
    marks[marked, np.arange(len(marked))] = 1.0
    if outcome_ids is not None:
        marks[np.asarray(outcome_ids, dtype=np.int64), -1] = 1.0
    e = torch.as_tensor(embeddings).detach().double().cpu()
    e = e - e.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(e, full_matrices=False)
    pcs = (e @ v[:components].T).numpy()
    basis = np.column_stack([days, marks, pcs])
    basis = basis - basis.mean(0)
    sd = basis.std(0)
    return (basis / np.where(sd > 0, sd, 1.0)).astype(np.float32)


def describe(basis_width: int, window) -> dict:
    """What the chunks' control sums depend on besides the model and outcome (`tasks/zeroshot.run_identity`)."""
    return {"version": VERSION, "k": int(basis_width), "weightings": weightings(window)}


def weightings(window) -> int:
    """How many step weightings `control_weights` gives for `window` (the controls are weightings x K)."""
    return 2 if np.isfinite(window.end_days) else 1


def control_weights(spent: np.ndarray, rel_s: np.ndarray, window) -> np.ndarray:
    """float64 `[tokens, G]` step weights, each depending on the past only: a_t (the hazard's steps) and, for a
    window with an end, a_t times the share of the window still ahead (a draw early in the window moves the
    risk more than the same draw near its end)."""
    if weightings(window) == 1:
        return spent[:, None]
    start, end = max(window.start_days, 0.0) * SECONDS_PER_DAY, window.end_days * SECONDS_PER_DAY
    ahead = np.clip((end - np.maximum(rel_s, start)) / max(end - start, 1.0), 0.0, 1.0)
    return np.column_stack([spent, spent * ahead])


def future_controls(
    tokens: np.ndarray, seg: np.ndarray, n: int, control_mean: np.ndarray, basis: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """float64 `[n, G * K]`: per future and step weighting g, M = sum_t a_t (b(x_t) - E_t[b]) (module doc);
    `weights` holds a_t per token, one column per weighting (`control_weights`; 1-D: one). Only the steps with
    a weight are read (float32 until the sums: a chunk holds millions of steps)."""
    w = np.asarray(weights).reshape(len(tokens), -1)
    steps = np.flatnonzero(w.any(1))
    dev = basis[np.asarray(tokens, dtype=np.int64)[steps]] - control_mean[steps]
    k = basis.shape[1]
    out = np.zeros((n, w.shape[1] * k))
    for g in range(w.shape[1]):
        np.add.at(out[:, g * k : (g + 1) * k], seg[steps], dev * w[steps, g : g + 1].astype(np.float32))
    return out


def label_sums(h: np.ndarray, m: np.ndarray, resolved: np.ndarray, pi: np.ndarray, n_prompts: int) -> dict:
    """The `CV_COLUMNS` per prompt (`h`: hazard sums, `m`: `future_controls`): the regression's sums over the
    resolved futures (those the hazard sum averages), and M over every future (its mean is exactly zero)."""
    r = resolved.astype(np.float64)
    k = m.shape[1]
    outer = (m[:, :, None] * m[:, None, :]).reshape(len(m), k * k)

    def per_prompt(x: np.ndarray, resolved_only: bool = True) -> np.ndarray:
        out = np.zeros((n_prompts, x.shape[1]))
        np.add.at(out, pi, x * r[:, None] if resolved_only else x)
        return out

    return {
        "cv_m_all": per_prompt(m, resolved_only=False),
        "cv_m": per_prompt(m),
        "cv_mm": per_prompt(outer),
        "cv_mh": per_prompt(m * h[:, None]),
        "cv_hh": np.bincount(pi, weights=h**2 * r, minlength=n_prompts),
    }


def cross_fitted(results: pa.Table) -> dict[str, np.ndarray]:
    """`hazard_cv_probability`, `_se` and `_sum` per label row of `results` (chunk rows holding `CV_COLUMNS`),
    beta fitted on the other fold's labels (module doc); NaN where the hazard sum is (no resolved future).
    The fit reads the resolved futures (the ones the hazard sum averages); the correction subtracts beta times
    M averaged over all of a label's futures, whose mean is exactly zero, so that `hazard_cv` has the hazard
    sum's expectation (before clipping). The SE is the spread of the resolved futures' residuals (approximate
    where some futures are unresolved; NaN with fewer than two, as the hazard sum's)."""

    def col(name: str) -> np.ndarray:
        c = results.column(name).combine_chunks()
        if pa.types.is_list(c.type):  # fixed width per run: flatten without Python objects
            return np.asarray(c.flatten(), dtype=np.float64).reshape(len(c), -1)
        return np.asarray(c.to_numpy(zero_copy_only=False), dtype=np.float64)

    n, n_all = col("n_resolved"), col("n_futures")
    # the unclipped mean (`hazard_probability` is clipped to [0, 1]); NaN for labels with no resolved future
    h = np.where(n > 0, col("hazard_sum") / np.maximum(n, 1), np.nan)
    sm_all, sm, smm, smh, shh = (col(c) for c in CV_COLUMNS)
    k = sm.shape[1] if sm.ndim == 2 else 0
    ok = (n > 0) & np.isfinite(h)
    nn = np.maximum(n, 1)
    mbar = sm / nn[:, None]
    hbar = np.where(ok, h, 0.0)
    sxx = smm.reshape(-1, k, k) - nn[:, None, None] * mbar[:, :, None] * mbar[:, None, :]
    sxy = smh - nn[:, None] * mbar * hbar[:, None]
    syy = shh - nn * hbar**2
    fold = col("label_row").astype(np.int64) % 2
    prob, var = np.full(len(n), np.nan), np.full(len(n), np.nan)
    for f in (0, 1):
        fit, use = ok & (fold != f), ok & (fold == f)
        beta = _ridge(sxx[fit].sum(0), sxy[fit].sum(0)) if fit.any() else np.zeros(k)
        # the correction's M averages every future: its mean is exactly 0, whatever the resolution does
        prob[use] = hbar[use] - (sm_all[use] / np.maximum(n_all[use], 1)[:, None]) @ beta
        resid = syy[use] - 2 * sxy[use] @ beta + np.einsum("i,nij,j->n", beta, sxx[use], beta)
        var[use] = np.where(n[use] > 1, np.maximum(resid, 0.0) / np.maximum(n[use] - 1, 1), np.nan)
    clipped = np.isfinite(prob) & ((prob < 0) | (prob > 1))
    if clipped.any():
        log.info("hazard_cv: %d of %d labels clipped to [0, 1]", int(clipped.sum()), int(np.isfinite(prob).sum()))
    prob = np.clip(prob, 0.0, 1.0)
    return {
        "hazard_cv_probability": prob,
        "hazard_cv_se": np.sqrt(var / nn),
        "hazard_cv_sum": np.where(ok, prob * n, np.nan),
    }


def _ridge(xx: np.ndarray, xy: np.ndarray) -> np.ndarray:
    k = len(xy)
    lam = RIDGE * max(float(np.trace(xx)) / max(k, 1), 1e-12)
    return np.linalg.solve(xx + lam * np.eye(k), xy)
