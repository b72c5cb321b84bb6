"""MEDS events with visits -> CEHR-GPT token sequences (DESIGN §4): DuckDB orders, numpy lays out.

A subject's tokens, in order:

    prompt         YEAR//y AGE//a GENDER//g RACE//r
    each visit     [gap] [VS] VISIT//type, then per event [i-D/i-H] code [Q<k>],
                   then [i-D/i-H to the visit end] [DISCHARGE//x] [VE]        (oldest visit first)
    death          gap [DEATH]

Times are made non-decreasing by construction: a visit starts no earlier than the latest end
of the visits before it, its events no earlier than its start, and its end no earlier than its
events. Gaps are computed from those same times, so dates rebuilt from gap tokens match.

How (for speed, the output is the same token for token): DuckDB sorts the visits once and the
events once, by (split, subject_id, visit rank, time, table, code, value), and returns them as
integer/float columns (`token_order.py`: `Ordered`); the vocabulary is decided from small
aggregates before any token exists (vocab_build.py); `assemble` then writes every token id straight into its slot with
numpy, in the layout the grammar declares (`grammar.PROMPT_KINDS`, `VISIT_HEAD`, `EVENT_SLOTS`,
`VISIT_TAIL`, `DEATH_SLOTS`), absent tokens removed at the end. Token spellings (gaps, inpatient
times, deciles, prefixes) come from `grammar` too. No table of token strings is ever built, and
nothing sorts tokens.
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cehrx.data import grammar as g
from cehrx.data.grammar import PREFIX, gap_names, inpatient_time_codes, inpatient_time_name, quantile_name
from cehrx.data.token_order import Ordered


class Resolver:
    """Token strings -> ids, once per distinct string, as the vocabulary dictates.

    A token missing from the vocabulary falls back to its `PREFIX//UNKNOWN` spelling when that
    exists (gender, race and visit types unseen in train), else it is dropped (rare discharges,
    gaps longer than any seen in train). Both are counted by prefix for prepare.json.
    """

    def __init__(self, index: dict[str, int]) -> None:
        self.index = index
        self.not_in_vocab: dict[str, int] = {}
        self.lock = threading.Lock()  # token_ids resolves from two threads

    def ids(self, tokens: list[str | None], counts: np.ndarray | None = None) -> np.ndarray:
        """int32 ids of `tokens` (-1: dropped or None); `counts` = rows each token stands for (default 1)."""
        out = np.full(len(tokens), -1, dtype=np.int32)
        for i, tok in enumerate(tokens):
            if tok is None:
                continue
            n = 1 if counts is None else int(counts[i])
            tid = self.index.get(tok)
            if tid is None:
                tid = self.index.get(g.unknown_fallback(tok))
                if n:
                    p = re.match(r"^([A-Za-z]+)", tok)
                    key = f"{p.group(1) if p else ''} ({'dropped' if tid is None else 'as UNKNOWN'})"
                    with self.lock:
                        self.not_in_vocab[key] = self.not_in_vocab.get(key, 0) + n
            out[i] = -1 if tid is None else tid
        return out

    def column(self, strings: pa.Array, prefix: str = "") -> np.ndarray:
        """Ids for a string column (nulls -> -1), resolving each distinct value once."""
        enc = (
            pc.dictionary_encode(strings).combine_chunks()
            if isinstance(strings, pa.ChunkedArray)
            else pc.dictionary_encode(strings)
        )
        idx = enc.indices.to_numpy(zero_copy_only=False)
        valid = np.asarray(enc.indices.is_valid())
        idx = np.where(valid, idx, 0).astype(np.int64)
        counts = np.bincount(idx[valid], minlength=len(enc.dictionary))
        ids = self.ids([prefix + s for s in enc.dictionary.to_pylist()], counts)
        return np.where(valid, ids[idx] if len(ids) else -1, -1).astype(np.int32)

    def mapped(self, values: np.ndarray, name) -> np.ndarray:
        """Ids for integer-coded tokens (`name(value)` spells one), resolving each distinct value once.

        The values (day gaps, hours, deciles) span a small range, so counting them with bincount
        and mapping through a lookup table replaces np.unique's sort of millions of values.
        """
        if not len(values):
            return np.zeros(0, np.int32)
        lo, hi = int(values.min()), int(values.max())
        if hi - lo >= max(4 * len(values), 1 << 20):  # sparse: sorting is cheaper than a table
            uniq, inv, counts = np.unique(values, return_inverse=True, return_counts=True)
            return self.ids([name(int(v)) for v in uniq], counts)[inv.reshape(-1)]
        shifted = (values - lo).astype(np.int64)
        counts = np.bincount(shifted)
        present = np.flatnonzero(counts)
        table = np.full(len(counts), -1, dtype=np.int32)
        table[present] = self.ids([name(int(v) + lo) for v in present], counts[present])
        return table[shifted]


@dataclass
class TokenIds:
    """Every slot's token id (-1: absent) for subjects, visits and events of `Ordered`."""

    prompt: np.ndarray  # [S, PROMPT_LEN]
    death_gap: np.ndarray  # [S], -1 without death
    death: int
    gap: np.ndarray  # [V], -1 for first visits
    vs: int
    visit: np.ndarray  # [V]
    trail: np.ndarray  # [V] time from the last event to the visit end (inpatient-like visits)
    discharge: np.ndarray  # [V]
    ve: int
    itime: np.ndarray  # [E] time since the previous event (inpatient-like visits)
    code: np.ndarray  # [E]
    q: np.ndarray  # [E] value decile


def token_ids(
    o: Ordered, res: Resolver, code_ids: np.ndarray, cuts: np.ndarray, has_cuts: np.ndarray, max_gap_days: int
) -> TokenIds:
    """Map every slot of `o` to a token id (vectorised; strings only for distinct values).

    The event slots and the visit and subject slots are independent, so the events (the larger
    part) are done in a second thread: numpy releases the GIL, and this stage would otherwise
    leave a core idle.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        events = pool.submit(event_ids, o, res, code_ids, cuts, has_cuts, max_gap_days)
        gap, trail, visit, discharge = visit_ids(o, res, max_gap_days)
        prompt, death_gap = subject_ids(o, res, max_gap_days)
        itime, q, code = events.result()
    return TokenIds(
        prompt=prompt,
        death_gap=death_gap,
        death=res.index[g.DEATH],
        gap=gap,
        vs=res.index[g.VS],
        visit=visit,
        trail=trail,
        discharge=discharge,
        ve=res.index[g.VE],
        itime=itime,
        code=code,
        q=q,
    )


def event_ids(
    o: Ordered, res: Resolver, code_ids: np.ndarray, cuts: np.ndarray, has_cuts: np.ndarray, max_gap_days: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per event: the inpatient time token, the value decile token and the code token."""
    n_vis, n_ev = len(o.est_us), len(o.t_us)
    # events: time since the previous event of the visit (its start for the first), inside inpatient-like visits
    vidx = np.repeat(np.arange(n_vis), o.nev)
    prev = np.empty(n_ev, dtype=np.int64)
    prev[1:] = o.t_us[:-1]
    firsts = o.efirst[:-1][o.nev > 0]
    prev[firsts] = o.est_us[o.nev > 0]
    inp = np.flatnonzero(o.inpatient[vidx])
    itime_code = inpatient_time_codes(o.t_us[inp] - prev[inp], max_gap_days)
    itime = np.full(n_ev, -1, np.int32)
    sel = itime_code != 0
    itime[inp[sel]] = res.mapped(itime_code[sel], inpatient_time_name)
    # value deciles: 1 + number of cut points <= the value
    q = np.full(n_ev, -1, np.int32)
    sel = has_cuts[o.cid] & ~np.isnan(o.value)
    if sel.any():
        cid, value = o.cid[sel], o.value[sel]
        k = np.ones(len(value), dtype=np.int64)
        for j in range(cuts.shape[1]):  # column by column: no [events x cuts] temporary
            k += cuts[cid, j] <= value
        q[sel] = res.mapped(k, quantile_name)
    return itime, q, code_ids[o.cid] if n_ev else np.zeros(0, np.int32)


def visit_ids(o: Ordered, res: Resolver, max_gap_days: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per visit: the gap before (not for a subject's first visit), trailing inpatient time, type, discharge."""
    n_vis, n_ev = len(o.est_us), len(o.t_us)
    gap = np.full(n_vis, -1, np.int32)
    sel = o.gap_days >= 0
    gap[sel] = res.mapped(o.gap_days[sel], lambda d: gap_names(np.array([d]), max_gap_days)[0])
    last = np.where(o.nev > 0, o.t_us[np.maximum(o.efirst[1:] - 1, 0)] if n_ev else 0, o.est_us)
    trail_code = np.where(o.inpatient, inpatient_time_codes(o.eend_us - last, max_gap_days), 0)
    trail = np.full(n_vis, -1, np.int32)
    sel = trail_code != 0
    trail[sel] = res.mapped(trail_code[sel], inpatient_time_name)
    return gap, trail, res.column(o.vtype, PREFIX["visit"]), res.column(o.discharge, PREFIX["discharge"])


def subject_ids(o: Ordered, res: Resolver, max_gap_days: int) -> tuple[np.ndarray, np.ndarray]:
    """Per subject: the four prompt tokens and the gap before death (-1 without death)."""
    death_gap = np.full(len(o.subject_id), -1, np.int32)
    if o.has_death.any():
        death_gap[o.has_death] = res.mapped(
            o.death_days[o.has_death], lambda d: gap_names(np.array([d]), max_gap_days)[0]
        )
    prompt = (
        np.stack([res.column(p) for p in o.prompt], axis=1)
        if len(o.subject_id)
        else np.zeros((0, g.PROMPT_LEN), np.int32)
    )
    return prompt, death_gap


def assemble(o: Ordered, ids: TokenIds, s0: int, s1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, times (s) and per-subject lengths of subjects s0..s1-1, laid out by slot.

    Subject block, as the grammar lays it out: the prompt slots (`PROMPT_KINDS`), then per visit
    `VISIT_HEAD`, `EVENT_SLOTS` per event and `VISIT_TAIL`, then `DEATH_SLOTS`. Slots whose token
    is absent (-1) are removed at the end, which keeps everything else in order.
    """
    n_prompt, n_head, n_event, n_tail = g.PROMPT_LEN, len(g.VISIT_HEAD), len(g.EVENT_SLOTS), len(g.VISIT_TAIL)
    per_subject = n_prompt + len(g.DEATH_SLOTS)  # slots of a subject outside its visits
    v0, v1 = o.vfirst[s0], o.vfirst[s1]
    e0, e1 = o.efirst[v0], o.efirst[v1]
    ns, ne = s1 - s0, e1 - e0
    nev = o.nev[v0:v1]
    vsub = np.repeat(np.arange(ns), o.nvis[s0:s1])  # local subject of each visit
    vslots = np.concatenate(
        [[0], np.cumsum(n_head + n_tail + n_event * nev)]
    )  # visit slot offsets, without subject parts
    vstart = vslots[:-1] + per_subject * vsub + n_prompt  # first slot of each visit
    vfirst_local = o.vfirst[s0 : s1 + 1] - v0
    sstart = vslots[vfirst_local[:-1]] + per_subject * np.arange(ns)
    dstart = vslots[vfirst_local[1:]] + per_subject * np.arange(ns) + n_prompt
    total = int(vslots[-1] + per_subject * ns)
    tok = np.full(total, -1, dtype=np.int32)
    tim = np.zeros(total, dtype=np.int64)
    sec = o.seconds

    def put(first_slot: np.ndarray, layout: tuple[str, ...], values: dict, times_s: np.ndarray) -> None:
        for j, slot in enumerate(layout):
            tok[first_slot + j] = values[slot]
            tim[first_slot + j] = times_s

    prompt = {k: ids.prompt[s0:s1, i] for i, k in enumerate(g.PROMPT_KINDS)}
    put(sstart, g.PROMPT_KINDS, prompt, sec["first"][s0:s1])
    head = {"gap": ids.gap[v0:v1], g.VS: ids.vs, "visit": ids.visit[v0:v1]}
    put(vstart, g.VISIT_HEAD, head, sec["est"][v0:v1])
    k = np.arange(ne) - np.repeat(o.efirst[v0:v1] - e0, nev)  # event index inside its visit
    event = {"inpatient_time": ids.itime[e0:e1], "code": ids.code[e0:e1], "quantile": ids.q[e0:e1]}
    put(np.repeat(vstart + n_head, nev) + n_event * k, g.EVENT_SLOTS, event, sec["t"][e0:e1])
    tail = {"inpatient_time": ids.trail[v0:v1], "discharge": ids.discharge[v0:v1], g.VE: ids.ve}
    put(vstart + n_head + n_event * nev, g.VISIT_TAIL, tail, sec["eend"][v0:v1])
    dead = o.has_death[s0:s1]
    death = {"gap": np.where(dead, ids.death_gap[s0:s1], -1), g.DEATH: np.where(dead, ids.death, -1)}
    put(dstart, g.DEATH_SLOTS, death, sec["death"][s0:s1])
    keep = np.flatnonzero(tok >= 0)
    lengths = np.diff(np.searchsorted(keep, np.append(sstart, total))).astype(np.int64)
    return tok[keep], tim[keep], lengths
