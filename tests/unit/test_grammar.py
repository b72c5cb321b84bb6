"""The grammar's one table: `check_sequence` and the sampler's constraint tables read the same rules.

Both are derived from `cehrx.data.grammar.RULES`; these tests check that they accept the same
language, transition by transition and on random sequences, and that the kinds, layouts and
rules of the table fit together.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from cehrx.data import grammar as g
from cehrx.data.grammar import check_sequence
from cehrx.data.vocab import Vocab, kind_of
from cehrx.sampling.constraints import FORBIDDEN, Grammar

ENDS_OPEN = "sequence ends inside a visit or after a gap"
PROMPT_BAD = "prompt must be"
TOKENS = [
    *g.SPECIAL_TOKENS,
    "YEAR//2000",
    "YEAR//UNKNOWN",
    "AGE//40",
    "AGE//UNKNOWN",
    "GENDER//F",
    "GENDER//UNKNOWN",
    "RACE//1",
    "VISIT//IP",
    "VISIT//OP",
    "DISCHARGE//home",
    "D0",
    "D5",
    "Y3",
    "i-D1",
    "i-H2",
    "Q1",
    "Q2",
    "SNOMED/1",
    "SNOMED/2",
]
INPATIENT = (None, frozenset({"IP"}), frozenset({"OP"}))


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    n = len(TOKENS)
    return Vocab(TOKENS, [kind_of(t) for t in TOKENS], [1] * n, [1] * n, [None] * n)


def shortest_prefixes(table: np.ndarray) -> dict[int, list[int]]:
    """A shortest token sequence reaching each state of the table from the start (breadth first)."""
    start = g.state_id(g.PROMPT_STATES[0])
    found, queue = {start: []}, deque([start])
    while queue:
        s = queue.popleft()
        for tok in np.flatnonzero(table[s] != FORBIDDEN):
            nxt = int(table[s, tok])
            if nxt not in found:
                found[nxt] = [*found[s], int(tok)]
                queue.append(nxt)
    return found


def run_machine(table: np.ndarray, seq: list[int]) -> int:
    state = g.state_id(g.PROMPT_STATES[0])
    for tok in seq:
        state = int(table[state, tok])
        if state == FORBIDDEN:
            return g.state_id(g.FREE)
    return state


@pytest.mark.parametrize("inpatient", INPATIENT)
def test_every_transition_of_the_mask_is_a_step_check_sequence_accepts(vocab: Vocab, inpatient) -> None:
    """From every reachable state past the prompt, token t is allowed by the mask exactly when
    check_sequence finds nothing wrong at t's position."""
    table = Grammar.build(vocab, inpatient).next_state.numpy()
    prefixes = shortest_prefixes(table)
    assert {g.state_name(s).split("+")[0] for s in prefixes} == set(g.STATES) - {g.FREE}
    for state, prefix in prefixes.items():
        if g.state_name(state) in g.PROMPT_STATES:
            continue  # a prompt error names no position: covered by the random sequences below
        for tok in range(len(vocab)):
            err = check_sequence(vocab, [*prefix, tok], inpatient)
            ok_here = err is None or err.startswith(ENDS_OPEN)
            sampling_only = g.state_name(state) == "end" and vocab.tokens[tok] == g.END
            assert (table[state, tok] != FORBIDDEN) == (ok_here or sampling_only), (
                g.state_name(state),
                vocab.tokens[tok],
                err,
            )
            assert not (sampling_only and ok_here), "[END] [END] is for the sampler only"


@pytest.mark.parametrize("inpatient", INPATIENT)
def test_random_sequences_get_the_same_verdict_from_both(vocab: Vocab, inpatient) -> None:
    """Random walks that mostly follow the mask and sometimes step off it: the machine's final
    state and check_sequence's verdict agree on every sequence (valid, open, or rejected)."""
    table = Grammar.build(vocab, inpatient).next_state.numpy()
    rng = np.random.default_rng(0)
    verdicts = set()
    for _ in range(3000):
        seq, state = [], g.state_id(g.PROMPT_STATES[0])
        for _ in range(int(rng.integers(0, 30))):
            allowed = np.flatnonzero(table[state] != FORBIDDEN)
            tok = int(rng.choice(allowed)) if rng.random() < 0.9 and len(allowed) else int(rng.integers(len(vocab)))
            seq.append(tok)
            state = g.state_id(g.FREE) if table[state, tok] == FORBIDDEN else int(table[state, tok])
        assert state == run_machine(table, seq)
        if seq and vocab.tokens[seq[-1]] == g.END and g.END in [vocab.tokens[t] for t in seq[:-1]]:
            continue  # [END] [END]: the one sampling-only transition
        err = check_sequence(vocab, seq, inpatient)
        name = g.state_name(state).split("+")[0]
        if name in g.ACCEPTING:
            verdict = err is None
        elif name == g.FREE:
            verdict = err is not None and not err.startswith(ENDS_OPEN)
        elif name in g.PROMPT_STATES:
            verdict = err is not None and err.startswith(PROMPT_BAD)
        else:
            verdict = err is not None and err.startswith(ENDS_OPEN)
        assert verdict, ([vocab.tokens[t] for t in seq], name, err)
        verdicts.add(name if name in (g.FREE, *g.ACCEPTING) else "open")
    assert verdicts >= {"free", "between", "dead", "end", "open"}


def test_every_kind_has_a_rule_and_a_spelling() -> None:
    """Adding a kind to `KIND_TABLE` without a rule that places it fails here."""
    classes = {r.token for r in g.RULES}
    assert set(g.KINDS) - {"special"} <= classes
    assert classes - set(g.KINDS) == set(g.SPECIAL_TOKENS) - {g.PAD, g.UNK}
    assert [kind_of(k.example) for k in g.KIND_TABLE] == list(g.KINDS)
    for r in g.RULES:
        assert set(r.sources) | {r.target} <= set(g.STATES)
    for u in g.TIME_UNITS:
        tok = f"{u.unit}7"
        assert kind_of(tok) == u.kind and g.time_token_days(tok) == 7 * u.days


def test_the_layout_writes_what_the_rules_accept(vocab: Vocab) -> None:
    """A subject written slot by slot in the layout of `tokenize.assemble` (every slot filled,
    no gap before the first visit) is a valid sequence."""
    example = {
        "[VS]": "[VS]",
        "[VE]": "[VE]",
        "[DEATH]": "[DEATH]",
        "gap": "D5",
        "visit": "VISIT//IP",
        "inpatient_time": "i-H2",
        "code": "SNOMED/1",
        "quantile": "Q1",
        "discharge": "DISCHARGE//home",
    }
    visit = [*g.VISIT_HEAD, *g.EVENT_SLOTS, *g.EVENT_SLOTS, *g.VISIT_TAIL]
    slots = [*g.PROMPT_KINDS, *visit[1:], *visit, *g.DEATH_SLOTS]
    prompt = {"year": "YEAR//2000", "age": "AGE//40", "gender": "GENDER//F", "race": "RACE//1"}
    tokens = [vocab[prompt.get(s) or example[s]] for s in slots]
    assert check_sequence(vocab, tokens, {"IP"}) is None
    assert check_sequence(vocab, tokens, {"OP"}).startswith("inpatient time token")
