"""The admin surface of CONTRACT.md §5: teams, keys, prices and sessions, over HTTP and a shell.

- `schemas.py`: request bodies (pydantic, strict) and the shapes the API answers with;
- `ops.py`: the operations themselves, shared by the API and the shell; each write is recorded
  in the audit ledger as an `AdminAction`;
- `api.py`: `setup_admin(app)`: the `/admin/v1` routes behind `ADMIN_TOKEN`;
- `openapi.py`: the OpenAPI 3.1 document served at `/admin/v1/openapi.json`;
- `cli.py`: `gateway teams|keys|models|sessions` (CONTRACT.md §5.1), against Redis directly.

Imports go one way: `cli` and `api` use `ops`, which uses `schemas` and the key store.
"""
