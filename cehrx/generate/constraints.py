"""The token grammar (DESIGN §4, `cehrx.data.grammar.check_sequence`) as a tensor state machine.

Generation masks, at every step, the tokens the grammar forbids after what a sequence has so
far, so that a valid sample does not depend on luck. The grammar is a finite automaton over
token *classes*; with the vocabulary known it compiles into two tables indexed by
`(state, token id)`:

    allowed[state, token]     bool   may `token` come next?
    next_state[state, token]  int16  the state after it (FORBIDDEN where not allowed)

so a whole batch advances with two gathers and no Python loop over rows. The "inside an
inpatient-like visit" flag (i-D / i-H time tokens are only legal there) is folded into the
state: body states exist twice, once per flag value.

The states mirror `check_sequence` one to one, and a sequence is valid for this machine
exactly when `check_sequence` accepts it (up to the end-of-sequence rule: a sample cut by a
token or time budget may stop inside a visit). Prompts that end anywhere (a bare 4-token
demographic prompt, or a zero-shot history cut inside a visit) start the machine in the state
they end in (`prompt_states`). A prompt the grammar rejects gets the `FREE` state: no
constraint for that row, rather than an error in the middle of a large run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cehrx.data.vocab import DEATH, END, PAD, VE, VS, Vocab

# Automaton states (before the inpatient flag is folded in). P0..P3: inside the demographic prompt.
P0, P1, P2, P3, START, VISIT_TYPE, BODY, AFTER_CODE, DISCHARGED, BETWEEN, GAP, DEAD, ENDED, FREE = range(14)
STATE_NAMES = ("prompt0", "prompt1", "prompt2", "prompt3", "start", "visit_type", "body", "after_code",
               "discharged", "between", "gap", "dead", "end", "free")
N_BASE = len(STATE_NAMES)
FORBIDDEN = -1


def _state(base: int, inpatient: bool | int = 0) -> int:
    """Full state id: the base state and the inpatient flag (only body states use the flag)."""
    return 2 * base + int(inpatient)


@dataclass
class Grammar:
    """Compiled tables for one vocabulary (build once with `Grammar.build`, move with `.to`)."""

    allowed: Tensor  # bool [2 * N_BASE, V]
    next_state: Tensor  # int64 [2 * N_BASE, V], FORBIDDEN where not allowed
    inpatient_types: frozenset[str] | None

    @classmethod
    def build(cls, vocab: Vocab, inpatient_types: set[str] | list[str] | None = None) -> Grammar:
        """Tables for `vocab`. `inpatient_types` default: `vocab.meta["inpatient_visit_types"]`,
        and when the vocabulary does not record them, every visit type (as `check_sequence(None)`)."""
        if inpatient_types is None and "inpatient_visit_types" in vocab.meta:
            inpatient_types = vocab.meta["inpatient_visit_types"]
        inp = None if inpatient_types is None else frozenset(str(t) for t in inpatient_types)
        V = len(vocab)
        kinds = np.asarray(vocab.kinds, dtype=object)
        names = np.asarray(vocab.tokens, dtype=object)

        def of_kind(k: str) -> np.ndarray:
            return kinds == k

        def token(name: str) -> np.ndarray:
            return names == name

        visit = of_kind("visit")
        inpatient_visit = visit.copy()
        if inp is not None:
            inpatient_visit &= np.array([t.split("//", 1)[-1] in inp for t in vocab.tokens])
        nxt = np.full((2 * N_BASE, V), FORBIDDEN, dtype=np.int64)

        def rule(base: int, tokens: np.ndarray, to: int | np.ndarray, flags: tuple[int, ...] = (0, 1)) -> None:
            for f in flags:
                target = to if isinstance(to, np.ndarray) else np.full(V, _state(to, f if to in (BODY, AFTER_CODE, DISCHARGED) else 0))
                nxt[_state(base, f), tokens] = target[tokens]

        for i, k in enumerate(("year", "age", "gender", "race")):
            rule(P0 + i, of_kind(k), P0 + i + 1)  # P3 + 1 == START
        rule(START, token(VS), VISIT_TYPE)
        rule(GAP, token(VS), VISIT_TYPE)
        rule(VISIT_TYPE, visit, np.where(inpatient_visit, _state(BODY, 1), _state(BODY, 0)))
        for body in (BODY, AFTER_CODE):
            rule(body, of_kind("code"), AFTER_CODE)
            rule(body, of_kind("inpatient_time"), BODY, flags=(1,))  # inpatient visits only
            rule(body, of_kind("discharge"), DISCHARGED)
            rule(body, token(VE), BETWEEN)
        rule(AFTER_CODE, of_kind("quantile"), BODY)
        rule(DISCHARGED, token(VE), BETWEEN)
        rule(BETWEEN, of_kind("gap"), GAP)
        rule(GAP, token(DEATH), DEAD)
        rule(BETWEEN, token(END), ENDED)
        rule(DEAD, token(END), ENDED)
        rule(ENDED, token(END), ENDED)  # a prompt that already ended can only end again
        rule(FREE, ~token(PAD), FREE)
        nxt_t = torch.from_numpy(nxt)
        return cls(allowed=nxt_t != FORBIDDEN, next_state=nxt_t, inpatient_types=inp)

    def to(self, device: torch.device | str) -> Grammar:
        return Grammar(self.allowed.to(device), self.next_state.to(device), self.inpatient_types)

    def step(self, state: Tensor, tokens: Tensor) -> Tensor:
        """States after `tokens` (`[B]`); FORBIDDEN where a token was not allowed."""
        return self.next_state[state, tokens]

    def prompt_states(self, tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """The state each prompt ends in (int64 `[n]`); `FREE` for a prompt the grammar rejects.

        Runs the automaton over the prompts' columns (a loop over positions, each step
        vectorised over all prompts): prompt lengths, not the number of prompts, bound it.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        lengths = np.diff(offsets)
        table = self.next_state.numpy()
        state = np.full(len(lengths), _state(P0), dtype=np.int64)
        free = _state(FREE)
        for j in range(int(lengths.max(initial=0))):
            live = lengths > j
            tok = tokens[offsets[:-1][live] + j]
            s = state[live]
            new = table[s, tok]
            new = np.where(new == FORBIDDEN, free, new)
            state[live] = new
        return state

    def free_state(self) -> int:
        return _state(FREE)

    def is_free(self, state: np.ndarray | Tensor) -> np.ndarray | Tensor:
        return state == _state(FREE)

    @staticmethod
    def state_name(state: int) -> str:
        base, flag = divmod(int(state), 2)
        return STATE_NAMES[base] + ("+inpatient" if flag and base in (BODY, AFTER_CODE, DISCHARGED) else "")
