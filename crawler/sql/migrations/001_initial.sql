-- The tool's own bookkeeping: runs and a journal of every change it made to artifact rows.
-- {schema} is replaced by the configured, validated state_schema identifier.
create table if not exists {schema}.runs (
  run_id       text primary key,
  command      text not null,
  started_at   timestamptz not null default now(),
  finished_at  timestamptz,
  status       text not null default 'running',   -- running | finished | interrupted | failed
  config       jsonb not null default '{}'::jsonb,
  summary      jsonb
);

create table if not exists {schema}.journal (
  id               bigserial primary key,
  run_id           text not null,
  artifact_id      text not null,
  at               timestamptz not null default now(),
  outcome          text not null,
  before_file_path text,
  after_file_path  text,
  before_metadata  jsonb not null,   -- the keys the change wrote, as they were (absent keys omitted)
  after_metadata   jsonb not null,   -- the same keys as written
  detail           jsonb
);
create index if not exists journal_artifact_idx on {schema}.journal (artifact_id);
create index if not exists journal_run_idx on {schema}.journal (run_id);
