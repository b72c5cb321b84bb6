"""The token grammar (`cehrx.data.grammar`) as tensors the sampling engine gathers from.

Generation masks, at every step, the tokens the grammar forbids after what a sequence has so
far, so that a valid sample does not depend on luck. `grammar.transition_table` compiles the
grammar's rules for one vocabulary into two tables indexed by `(state, token id)`:

    allowed[state, token]     bool   may `token` come next?
    next_state[state, token]  int64  the state after it (FORBIDDEN where not allowed)

so a whole batch advances with two gathers and no Python loop over rows. The "inside an
inpatient-like visit" flag (i-D / i-H time tokens are only legal there) is folded into the
state: every state exists twice, once per flag value.

`check_sequence` interprets the same rules, so a sequence is valid for this machine exactly
when `check_sequence` accepts it (up to the end-of-sequence rule: a sample cut by a token or
time budget may stop inside a visit). Prompts that end anywhere (a bare 4-token demographic
prompt, or a zero-shot history cut inside a visit) start the machine in the state they end in
(`prompt_states`). A prompt the grammar rejects gets the `FREE` state: no constraint for that
row, rather than an error in the middle of a large run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cehrx.data import grammar
from cehrx.data.vocab import Vocab

# Base states (before the inpatient flag is folded in), in the grammar's order: full state id = 2 * base + flag.
STATE_NAMES = grammar.STATES
N_BASE = len(STATE_NAMES)
FORBIDDEN = -1


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
        nxt = torch.from_numpy(grammar.transition_table(vocab, inp))
        return cls(allowed=nxt != FORBIDDEN, next_state=nxt, inpatient_types=inp)

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
        state = np.full(len(lengths), grammar.state_id(grammar.PROMPT_STATES[0]), dtype=np.int64)
        free = self.free_state()
        for j in range(int(lengths.max(initial=0))):
            live = lengths > j
            tok = tokens[offsets[:-1][live] + j]
            s = state[live]
            new = table[s, tok]
            new = np.where(new == FORBIDDEN, free, new)
            state[live] = new
        return state

    def free_state(self) -> int:
        return grammar.state_id(grammar.FREE)

    def is_free(self, state: np.ndarray | Tensor) -> np.ndarray | Tensor:
        return state == self.free_state()

    @staticmethod
    def state_name(state: int) -> str:
        return grammar.state_name(state)

    @staticmethod
    def accept_states() -> np.ndarray:
        """Full state ids a complete patient may end in (`grammar.ACCEPTING`, either flag)."""
        return np.array([s for s in range(2 * N_BASE) if STATE_NAMES[s // 2] in grammar.ACCEPTING], dtype=np.int64)
