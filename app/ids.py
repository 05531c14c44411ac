"""Identifiers that must be unique, not secret: ledger row ids, socket ids, rate-limit entries.

`uuid.uuid4()` reads 16 bytes from the kernel per call (getrandom(2), with the GIL let go around
it): 4 us alone, and under load, with the log writer thread taking the GIL meanwhile, about 20 us;
a socket needs three, 7% of a handshake's CPU in the bench's profile. These come from a generator
seeded from the kernel once per process (and again in a forked child, as `random` does): 122
random bits per UUID, as unlikely to repeat as `uuid4`'s. Never a secret: API keys and anything
that grants access come from `secrets`.
"""

from __future__ import annotations

import os
import random
import uuid

_random = random.Random()  # seeded from os.urandom
os.register_at_fork(after_in_child=_random.seed)


# The version (4) and variant (RFC 4122) bits, as `uuid.UUID(int=..., version=4)` sets them.
_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_SET = (4 << 76) | (0x8000 << 48)
_new = object.__new__
_set = object.__setattr__
_UNKNOWN = uuid.SafeUUID.unknown


def uuid4() -> uuid.UUID:
    """A version 4 UUID: what `UUID(int=..., version=4)` builds, with its two fields set as its
    `__init__` sets them, without the argument checks (half the time; one per ledger row)."""
    value = _new(uuid.UUID)
    _set(value, "int", (_random.getrandbits(128) & _CLEAR) | _SET)
    _set(value, "is_safe", _UNKNOWN)
    return value


def hex_token(nbytes: int) -> str:
    """`nbytes` random bytes as hex (unique, not secret)."""
    return f"{_random.getrandbits(nbytes * 8):0{nbytes * 2}x}"


def hex_token_bytes(nbytes: int) -> bytes:
    """`hex_token`, as ASCII bytes (for a command packed by hand)."""
    return b"%0*x" % (nbytes * 2, _random.getrandbits(nbytes * 8))
