"""Who a request is, and whether a live socket still may be: the gateway's authentication.

- `principal.py`: gateway keys' secrets (hashing, generation), whether a secret stands now, and
  `Principal`, who is on a socket (pure; the key store uses it too);
- `guard.py`: the failed-authentication limit per client address (in memory);
- `digests.py`: every secret digest the store has issued, as this node last read them (the
  guard's way to tell a key the store never issued without a lookup);
- `authenticator.py`: `bearer`, `Authenticator.authenticate` (a request's key, or its refusal) and
  the expulsion sweep (which live sockets' keys or teams no longer stand).

This file imports nothing, so the key store can use `principal` without loading the rest.
"""
