"""Personal data stays in the tables: what leaves them (metadata, logs, alerts, exceptions) is
masked. The tables keep the values (schema_errors keeps the rejected line as it was)."""

from __future__ import annotations

import re

MASK = "<masked>"
# Anything shaped like an e-mail address, even a mistyped one (two @, no dot after it).
_EMAIL_LIKE = re.compile(r"[^\s'\"<>(),;]*@[^\s'\"<>(),;]*")
# A validation reason of a personal field: its value after "(got " is masked whatever it is.
_PERSONAL_FIELD_VALUE = re.compile(r"^(\S*email\S*: .*?\(got ).*(\))$", re.IGNORECASE)


def mask_personal(text: str) -> str:
    """`text` with e-mail addresses (and the value of a personal field's reason) masked."""
    text = _PERSONAL_FIELD_VALUE.sub(rf"\g<1>{MASK}\g<2>", text)
    return _EMAIL_LIKE.sub(MASK, text)
