-- A team's spend in a period (app/ledger/sums.py, after Redis lost its counters or at the start
-- of a day): an index-only range on (team_id, received_at). A key's spend uses
-- turns_key_received_idx. On a partitioned table the index is built on every partition, inside
-- this migration's transaction; inserts to `turns` wait meanwhile (gateways keep their rows in
-- memory or spill, CONTRACT.md §6).
CREATE INDEX turns_team_received_idx ON turns (team_id, received_at) INCLUDE (cost_usd);
