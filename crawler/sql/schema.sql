-- The whole schema as of the latest migration; tests check it equals applying every migration.
-- The tool's own bookkeeping: runs and a journal of every change it made to artifact rows.
-- {schema} is replaced by the configured, validated state_schema identifier.
create table if not exists {schema}.runs (
  run_id       text primary key,
  command      text not null,
  started_at   timestamptz not null default now(),
  finished_at  timestamptz,
  status       text not null default 'running',   -- running | finished | finished_with_errors | interrupted | failed (lost: computed)
  config       jsonb not null default '{}'::jsonb,
  summary      jsonb,
  heartbeat_at timestamptz,                        -- a running run's latest sign of life (run.heartbeat_s)
  progress     jsonb,                              -- and where it stood then
  host         text,
  pid          int
);
create index if not exists runs_started_idx on {schema}.runs (started_at desc);

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
  detail           jsonb,
  change_id        text               -- unique per change: a batch sent again after a lost answer skips what it holds
);
create index if not exists journal_artifact_idx on {schema}.journal (artifact_id);
create unique index if not exists journal_change_idx on {schema}.journal (change_id);
create index if not exists journal_run_idx on {schema}.journal (run_id);
create index if not exists journal_from_run_idx on {schema}.journal ((detail->>'from_run')) where detail ? 'from_run';

-- Every member header of every S3 tarball read, so no later question re-reads a tarball.
-- A manifest is keyed by key + ETag + size; `complete` is set only after the last member.
create table if not exists {schema}.tarball_manifests (
  id          bigserial primary key,
  s3_url      text not null,
  etag        text not null,
  size        bigint not null,
  complete    boolean not null default false,
  error       text,                                 -- a truncated or corrupt tarball, in words
  members     bigint not null default 0,
  run_id      text,
  scanned_at  timestamptz not null default now(),
  unique (s3_url, etag, size)
);

create table if not exists {schema}.tarball_members (
  manifest_id  bigint not null references {schema}.tarball_manifests (id) on delete cascade,
  idx          bigint not null,                     -- order in the tarball
  path         text not null,                       -- as in the header: never used as an output path
  norm_path    text not null,                       -- "./a//b" → "a/b": how rows and duplicates see it
  size         bigint not null,
  type         text not null,                       -- file, dir, symlink, hardlink, device, fifo, other
  skipped      text,                                -- why it was not extracted, when it matched
  sha256       text,                                -- extracted members only
  staging_path text,
  primary key (manifest_id, idx)
);

-- Cooperating figure runs (docs/scale-out.md): a budget, or a group of the hosts no budget
-- names, is served by one process at a time, the holder of its lease. A lease not renewed by
-- expires_at (its holder killed, or cut off from the database) may be taken by another.
create table if not exists {schema}.leases (
  unit text primary key,
  holder text not null,
  run_id text not null,
  acquired_at timestamptz not null default now(),
  expires_at timestamptz not null
);
-- A unit a run has swept to its end: that run's processes do not take it again.
create table if not exists {schema}.lease_done (
  run_id text not null,
  unit text not null,
  holder text not null,
  done_at timestamptz not null default now(),
  primary key (run_id, unit)
);
-- Every process taking part, alive while seen_at is recent: a process takes its fair share of
-- the units (their number over the processes alive), and `crawler status` counts them.
create table if not exists {schema}.lease_holders (
  holder text primary key,
  run_id text not null,
  host text,
  pid int,
  started_at timestamptz not null default now(),
  seen_at timestamptz not null,
  lease_s double precision not null,
  progress jsonb
);
