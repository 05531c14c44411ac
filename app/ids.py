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


def uuid4() -> uuid.UUID:
    """A version 4 UUID."""
    return uuid.UUID(int=_random.getrandbits(128), version=4)


def hex_token(nbytes: int) -> str:
    """`nbytes` random bytes as hex (unique, not secret)."""
    return f"{_random.getrandbits(nbytes * 8):0{nbytes * 2}x}"
