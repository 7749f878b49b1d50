-- A running run says it is alive (heartbeat_at) and where it stands (progress) every
-- run.heartbeat_s; `crawler status` shows a running run silent for 3 x that as `lost`.
alter table {schema}.runs add column if not exists heartbeat_at timestamptz;
alter table {schema}.runs add column if not exists progress jsonb;
alter table {schema}.runs add column if not exists host text;
alter table {schema}.runs add column if not exists pid int;
create index if not exists runs_started_idx on {schema}.runs (started_at desc);
