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
