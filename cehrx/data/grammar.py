"""A checker for the token grammar of DESIGN §4 (used by tests, and by generation to validate samples).

    patient := YEAR AGE GENDER RACE  visit ( gap visit )*  [ gap [DEATH] ]  [ [END] ]
    visit   := [VS] VISIT//type  ( CODE [Q] | i-D | i-H )*  [ DISCHARGE ]  [VE]
"""

from __future__ import annotations

from cehrx.data.vocab import Vocab


def check_sequence(vocab: Vocab, tokens: list[int] | "np.ndarray", inpatient_types: set[str] | None = None) -> str | None:  # noqa: F821
    """None when the sequence follows the grammar, else a message naming the first bad position."""
    kinds = [vocab.kinds[t] for t in tokens]
    names = [vocab.tokens[t] for t in tokens]
    if kinds[:4] != ["year", "age", "gender", "race"]:
        return f"prompt must be YEAR AGE GENDER RACE, got {names[:4]}"
    state, inpatient = "start", False  # start | visit_type | body | after_code | discharged | between | gap | dead | end
    for i in range(4, len(tokens)):
        k, name = kinds[i], names[i]
        bad = f"unexpected {name} at {i} (state {state})"
        if state in ("start", "gap") and name == "[VS]":
            state = "visit_type"
        elif state == "visit_type":
            if k != "visit":
                return bad
            inpatient = inpatient_types is None or name.split("//", 1)[1] in inpatient_types
            state = "body"
        elif state in ("body", "after_code") and k == "code":
            state = "after_code"
        elif state == "after_code" and k == "quantile":
            state = "body"
        elif state in ("body", "after_code") and k == "inpatient_time":
            if not inpatient:
                return f"inpatient time token {name} at {i} inside a non-inpatient visit"
            state = "body"
        elif state in ("body", "after_code") and k == "discharge":
            state = "discharged"
        elif state in ("body", "after_code", "discharged") and name == "[VE]":
            state = "between"
        elif state == "between" and k == "gap":
            state = "gap"
        elif state == "gap" and name == "[DEATH]":
            state = "dead"
        elif state in ("between", "dead") and name == "[END]":
            state = "end"
        else:
            return bad
    if state not in ("between", "dead", "end"):
        return f"sequence ends inside a visit or after a gap (state {state})"
    return None
