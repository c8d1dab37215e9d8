"""Personal data stays in the tables: what leaves them (metadata, logs, alerts, exceptions) is
masked. The tables keep the values (schema_errors keeps the rejected line as it was)."""

from __future__ import annotations

import re

from pipeline_project.contract import CONTRACT

MASK = "<masked>"
# Anything shaped like an e-mail address, even a mistyped one (two @, no dot after it).
_EMAIL_LIKE = re.compile(r"[^\s'\"<>(),;]*@[^\s'\"<>(),;]*")
# A validation reason of a personal field of the contract ("email: ...", "items[2].email: ..."):
# its value after "(got " is masked whatever it is.
_PERSONAL = "|".join(re.escape(key) for key in CONTRACT.personal_keys) or "(?!)"
_PERSONAL_FIELD_VALUE = re.compile(
    rf"^((?:\S*\.)?(?:{_PERSONAL})(?:\[\d+\])?: .*?\(got ).*(\))$", re.IGNORECASE
)


def mask_personal(text: str) -> str:
    """`text` with e-mail addresses (and the value of a personal field's reason) masked."""
    text = _PERSONAL_FIELD_VALUE.sub(rf"\g<1>{MASK}\g<2>", text)
    return _EMAIL_LIKE.sub(MASK, text)
