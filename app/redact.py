"""Key-looking text out of what OpenAI says, before a customer sees it.

OpenAI's 401 for a wrong key quotes it, masked but for its first 8 and last 4 characters:
"Incorrect API key provided: sk-abc12***…***wxyz. You can find your API key at …". When the
operator's upstream key is refused, the HTTP relay and the session's HTTP fallback pass that error
on to the customer, who must not learn any part of the operator's key. `redact` replaces, in
any text:

- whatever follows "API key provided:" (a short key is quoted unmasked);
- `sk-…` tokens (OpenAI's key prefix: `sk-`, `sk-proj-`, `sk-svcacct-`, …), masked or not;
- masked tokens (a run of three or more `*` inside key characters), whatever their prefix;
- the credentials the caller names (the key it sent), wherever they appear.

Each becomes `[redacted]`; the rest of the message (and the JSON around it) is left as it was.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[redacted]"

# Key characters; `.` only inside a token ("sk-proj-****...abcd"), never as its last character,
# so the full stop after a quoted key stays. Each pattern starts at an anchor (the phrase, `sk-`
# at a word start, the start of a token), so a long run of letters costs linear time.
_KEY = r"[A-Za-z0-9_\-*]"
_TOKEN = rf"(?:{_KEY}|\.(?=[A-Za-z0-9_\-*.]))*"
_PROVIDED = re.compile(r"(?i)(api key provided:[ \t]*)[^\s\"'\\]*[^\s\"'\\.]")
_SK = re.compile(rf"\bsk-{_TOKEN}{_KEY}")
_MASKED = re.compile(rf"(?<![A-Za-z0-9_\-*.])[A-Za-z0-9_\-]*\*{{3,}}{_TOKEN}")


def redact(text: str, known: Iterable[str] = ()) -> str:
    """`text` with every key-looking token, and every `known` secret, replaced."""
    for secret in known:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _PROVIDED.sub(lambda m: m.group(1) + REDACTED, text)
    text = _SK.sub(REDACTED, text)
    return _MASKED.sub(REDACTED, text)


def redact_bytes(raw: bytes, known: Iterable[str] = ()) -> bytes:
    """`redact` over a body, byte for byte where nothing matched (bytes that are not UTF-8
    survive)."""
    text = raw.decode("utf-8", "surrogateescape")
    cleaned = redact(text, known)
    return raw if cleaned == text else cleaned.encode("utf-8", "surrogateescape")
