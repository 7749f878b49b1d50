"""Every SQL statement the tool issues, by name. Nothing else in the code builds SQL.

`{table}` and `{schema}` are the configured identifiers (validated, then quoted); `{updated_at}`
is `, updated_at = now()` when the artifacts table has that column, else empty.
"""

from __future__ import annotations

# The URL's host, lower-cased, as routing sees it (the fetcher re-parses the URL for real).
HOST_EXPR = (r"lower(substring(a.metadata->>'image_url' from "
             r"'^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(\[[^]]*\]|[^/:?#]+)'))")

HAS_URL = ("a.metadata->'image_url' is not null and a.metadata->'image_url' <> 'null'::jsonb "
           "and a.metadata->'image_url' <> '\"\"'::jsonb")

# A paper_figure row the figure job should look at now. $1 = now (ISO-8601 UTC text; our own
# timestamps compare as text, and a garbage value cannot make the query fail), $2 = retry failed.
FIGURE_ELIGIBLE = f"""
  a.artifact_type = 'paper_figure'
  and jsonb_typeof(a.metadata) = 'object'
  and coalesce(a.metadata->'image_unavailable', 'false'::jsonb) <> 'true'::jsonb
  and {HAS_URL}
  and (coalesce(a.metadata->>'image_fetch_outcome', '') <> 'failed' or $2::bool)
  and (coalesce(a.metadata->>'image_fetch_outcome', '') <> 'transient'
       or coalesce(a.metadata->>'image_next_attempt_at', '') <= $1::text)
"""

LOCK_MIGRATIONS = "select pg_advisory_xact_lock(hashtext('crawler:' || $1::text))"
CREATE_SCHEMA = "create schema if not exists {schema}"
CREATE_VERSION_TABLE = """
create table if not exists {schema}.schema_version (
  version int primary key, applied_at timestamptz not null default now())"""
APPLIED_VERSIONS = "select version from {schema}.schema_version"
RECORD_VERSION = "insert into {schema}.schema_version (version) values ($1)"

TABLE_COLUMNS = """
select column_name from information_schema.columns
where table_schema = current_schema() and table_name = $1"""

START_RUN = """
insert into {schema}.runs (run_id, command, config, host, pid, heartbeat_at)
values ($1, $2, $3::jsonb, $4, $5, now())"""
HEARTBEAT = """
update {schema}.runs set heartbeat_at = now(), progress = $2::jsonb where run_id = $1 and status = 'running'"""

# The newest runs, a running one silent for 3 of its heartbeats ($2: the heartbeat when its config has none) shown as lost.
RECENT_RUNS = """
select run_id, command, started_at, finished_at, heartbeat_at, progress, host, pid, summary,
  -- lost: silent for 3 heartbeats of its own (its config's run.heartbeat_s; $2 if it has none)
  case when status = 'running' and coalesce(heartbeat_at, started_at) < now() - make_interval(secs =>
         3 * coalesce((config->'run'->>'heartbeat_s')::float, $2))
       then 'lost' else status end as status
from {schema}.runs
order by started_at desc, run_id desc
limit $1"""

# Rows per type by state, as their columns say (one pass over the table). $1 = now (ISO-8601
# text, as the figure queue compares it).
ROW_STATES = """
select a.artifact_type as type, count(*) as rows,
  count(*) filter (where s = 'unavailable') as unavailable,
  count(*) filter (where s = 'unrecoverable') as unrecoverable,
  count(*) filter (where s = 'with_file') as with_file,
  count(*) filter (where s = 'transient_due') as transient_due,
  count(*) filter (where s = 'transient_later') as transient_later,
  count(*) filter (where s = 'failed') as failed
from {table} a
cross join lateral (select case
  -- one state a row, the first that applies (a row is never counted twice)
  when jsonb_typeof(a.metadata) <> 'object' then 'other'
  when a.metadata->'image_unavailable' = 'true'::jsonb then 'unavailable'
  when a.metadata->'file_unrecoverable' = 'true'::jsonb then 'unrecoverable'
  when a.metadata->>'image_fetch_outcome' = 'transient'
    then case when coalesce(a.metadata->>'image_next_attempt_at', '') <= $1::text then 'transient_due' else 'transient_later' end
  when a.metadata->>'image_fetch_outcome' = 'failed' then 'failed'
  when a.file_path is not null then 'with_file'
  else 'other' end as s) st
group by 1
order by 1"""
FINISH_RUN = """
update {schema}.runs set finished_at = now(), status = $2, summary = $3::jsonb where run_id = $1"""

# Distinct hosts among eligible rows (small: one line per host), for routing and totals.
FIGURE_HOSTS = f"""
select {HOST_EXPR} as host, count(*) as n
from {{table}} a
where {FIGURE_ELIGIBLE} and ($3::text is null or {HOST_EXPR} = $3::text)
group by 1"""

FIGURE_SKIPPED = """
select
  count(*) filter (where jsonb_typeof(a.metadata) = 'object'
                   and coalesce(a.metadata->'image_unavailable', 'false'::jsonb) <> 'true'::jsonb
                   and not ({has_url})) as no_url,
  array_agg(a.id order by a.id) filter (where jsonb_typeof(a.metadata) is distinct from 'object')
    as bad_metadata
from {{table}} a
where a.artifact_type = 'paper_figure'""".format(has_url=HAS_URL)

# For the rest of the transaction: no sorting and no sequential scans where an ordered index does.
PREFER_KEY_ORDER = "set local enable_sort = off; set local enable_seqscan = off"

# One keyset page of eligible rows whose host is in $3 ($3 null: rows whose host cannot be parsed).
FIGURE_PAGE = f"""
select a.id, a.file_path, a.metadata->'image_url' as image_url, {HOST_EXPR} as host,
       a.metadata->'paper_id' as paper_id, a.metadata->'pmcid' as pmcid,
       a.metadata->'figure_label' as figure_label
from {{table}} a
where {FIGURE_ELIGIBLE}
  and (case when $3::text[] is null then {HOST_EXPR} is null else {HOST_EXPR} = any($3::text[]) end)
  and a.id > $4::text
order by a.id
limit $5"""

# One round trip per batch: read the rows as they were, merge each patch (and bump a counter),
# and journal before/after of exactly the keys written. Every CTE sees the same snapshot, so
# `before` holds the values from before the update.
APPLY_CHANGES = """
with input as (
  select t.id, t.outcome, t.file_path, t.patch::jsonb as patch, t.bump_key, t.detail::jsonb as detail, t.change_id
  from unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[])
    as t(id, outcome, file_path, patch, bump_key, detail, change_id)
  -- sent again after a lost answer: what the journal holds was written already
  where t.change_id is null or not exists (select 1 from {schema}.journal j where j.change_id = t.change_id)
), before as (
  select a.id, a.file_path, a.metadata from {table} a join input i on a.id = i.id
  where jsonb_typeof(a.metadata) = 'object'
), updated as (
  update {table} a set
    file_path = coalesce(i.file_path, a.file_path),
    metadata = a.metadata || i.patch || case when i.bump_key is null then '{{}}'::jsonb
      -- a garbage counter (a string, 1e19, -3.5) restarts at 1 instead of failing the batch
      else jsonb_build_object(i.bump_key, 1 + case when jsonb_typeof(a.metadata->i.bump_key) = 'number'
          and (a.metadata->>i.bump_key)::numeric between 0 and 1000000000
        then floor((a.metadata->>i.bump_key)::numeric)::bigint else 0 end)
      end
    {updated_at}
  from input i
  where a.id = i.id and jsonb_typeof(a.metadata) = 'object'
  returning a.id, a.file_path, a.metadata
)
insert into {schema}.journal
  (run_id, artifact_id, outcome, before_file_path, after_file_path, before_metadata, after_metadata, detail, change_id)
select $1, i.id, i.outcome, b.file_path, u.file_path,
  (select coalesce(jsonb_object_agg(k, b.metadata->k), '{{}}'::jsonb)
     from jsonb_object_keys(u.metadata) k where (i.patch ? k or k = i.bump_key) and b.metadata ? k),
  (select coalesce(jsonb_object_agg(k, u.metadata->k), '{{}}'::jsonb)
     from jsonb_object_keys(u.metadata) k where i.patch ? k or k = i.bump_key),
  i.detail, i.change_id
from input i join before b on b.id = i.id join updated u on u.id = i.id
returning artifact_id"""

# Changes that must find the row as they expect it (apply, undo): $2.. per change: id, outcome,
# whether to set file_path, the file_path, whether to check file_path, the file_path expected,
# the metadata keys expected (JSON object; null = absent or null), keys to set (object), keys to
# remove (array), detail, change id. The expectation is checked in the UPDATE's own WHERE, so a
# row changed by another session meanwhile is re-checked on its newest version, and skipped.
APPLY_EXPECTED = """
with input as (
  select t.id, t.outcome, t.set_fp, t.file_path, t.check_fp, t.expect_fp, t.expect::jsonb as expect,
         t.patch::jsonb as patch, t.unset::jsonb as unset, t.detail::jsonb as detail, t.change_id
  from unnest($2::text[], $3::text[], $4::bool[], $5::text[], $6::bool[], $7::text[], $8::text[], $9::text[],
              $10::text[], $11::text[], $12::text[])
    as t(id, outcome, set_fp, file_path, check_fp, expect_fp, expect, patch, unset, detail, change_id)
  where t.change_id is null or not exists (select 1 from {schema}.journal j where j.change_id = t.change_id)
), before as (
  select a.id, a.file_path, a.metadata from {table} a join input i on a.id = i.id
), updated as (
  update {table} a set
    file_path = case when i.set_fp then i.file_path else a.file_path end,
    metadata = (a.metadata - array(select jsonb_array_elements_text(i.unset))) || i.patch
    {updated_at}
  from input i
  where a.id = i.id and jsonb_typeof(a.metadata) = 'object'
    and (not i.check_fp or a.file_path is not distinct from i.expect_fp)
    and not exists (select 1 from jsonb_each(i.expect) e where coalesce(a.metadata->e.key, 'null'::jsonb) <> e.value)
  returning a.id, a.file_path, a.metadata
)
insert into {schema}.journal
  (run_id, artifact_id, outcome, before_file_path, after_file_path, before_metadata, after_metadata, detail, change_id)
select $1, i.id, i.outcome, b.file_path, u.file_path,
  (select coalesce(jsonb_object_agg(k, b.metadata->k), '{{}}'::jsonb)
     from (select jsonb_object_keys(i.patch) union select jsonb_array_elements_text(i.unset)) ks(k)
     where b.metadata ? k),
  (select coalesce(jsonb_object_agg(k, u.metadata->k), '{{}}'::jsonb)
     from (select jsonb_object_keys(i.patch) union select jsonb_array_elements_text(i.unset)) ks(k)
     where u.metadata ? k),
  i.detail, i.change_id
from input i join before b on b.id = i.id join updated u on u.id = i.id
returning artifact_id"""

# Rows as they stand, by id (a changeset's before; apply and undo's checks).
ROWS_BY_ID = "select a.id, a.file_path, a.metadata from {table} a where a.id = any($1::text[])"

# What a run wrote, directly or through `apply` of its changeset, oldest first.
RUN_JOURNAL = """
select j.id, j.run_id, j.artifact_id, j.outcome, j.before_file_path, j.after_file_path,
       j.before_metadata, j.after_metadata
from {schema}.journal j
where j.run_id = $1 or (j.detail ? 'from_run' and j.detail->>'from_run' = $1)
order by j.id"""
ROWS_WITH_FILE_PATHS = "select a.id, a.file_path from {table} a where a.file_path = any($1::text[])"
RUN_EXISTS = "select run_id, command, status from {schema}.runs where run_id = $1"
# (whether the tool's schema exists, whether this role may read its journal)
HAS_STATE_SCHEMA = """
select n.oid is not null as exists,
  n.oid is not null and has_schema_privilege(n.oid, 'usage')
    and exists (select 1 from pg_class c where c.relnamespace = n.oid and c.relname = 'journal'
                and has_table_privilege(c.oid, 'select')) as readable
from (select 1) one left join pg_namespace n on n.nspname = $1::text"""

# One job at a time (recover): a session-level advisory lock, held by a connection of its own for
# the run's life and let go by PostgreSQL when that connection ends (a killed run included).
# $1 = the lock's name. Who holds it: that session's application_name, which names the run.
TRY_JOB_LOCK = "select pg_try_advisory_lock(hashtextextended($1::text, 0))"
JOB_LOCK_HOLDER = """
select a.application_name, a.backend_start
from pg_locks l join pg_stat_activity a on a.pid = l.pid
where l.locktype = 'advisory' and l.granted and l.objsubid = 1
  and ((l.classid::bigint << 32) | l.objid::bigint) = (hashtextextended($1::text, 0) & x'ffffffffffffffff'::bigint)
limit 1"""

LATEST_RECOVER_SUMMARY = """
select summary from {schema}.runs where command = 'recover' and summary is not null
order by started_at desc, run_id desc limit 1"""

LAST_RUN = "select run_id from {schema}.runs order by started_at desc, run_id desc limit 1"

# -- the recovery job ---------------------------------------------------------------------------

RECOVERY_PAGE = """
select a.id, a.artifact_type, a.file_path, a.metadata
from {table} a
where a.artifact_type = any($1::text[]) and a.id > $2::text
order by a.id
limit $3"""

# (A role that may not read it, as a read-only repair's may not, is as if it had none.)
HAS_REFERENCES = """
select case when to_regclass('artifact_references') is null then false
  else has_table_privilege(to_regclass('artifact_references'), 'select') end"""

LATEST_REFERENCES = """
select distinct on (artifact_id) artifact_id, source_kind, source_id, referenced_at
from artifact_references
where artifact_id = any($1::text[])
order by artifact_id, referenced_at desc"""

MANIFEST_FIND = """
select id, complete, error, members from {schema}.tarball_manifests
where s3_url = $1 and etag = $2 and size = $3"""

# A scan that starts again (an earlier one was cut off) begins from an empty member list.
MANIFEST_OPEN = """
insert into {schema}.tarball_manifests (s3_url, etag, size, run_id) values ($1, $2, $3, $4)
on conflict (s3_url, etag, size) do update set complete = false, error = null, members = 0,
  run_id = excluded.run_id, scanned_at = now()
returning id"""
MANIFEST_CLEAR = "delete from {schema}.tarball_members where manifest_id = $1"
MANIFEST_CLOSE = """
update {schema}.tarball_manifests set complete = true, error = $2, members = $3, scanned_at = now()
where id = $1"""

MEMBERS_COLUMNS = ("manifest_id", "idx", "path", "norm_path", "size", "type", "skipped", "sha256", "staging_path")

# Extracted members of a manifest; a later duplicate of a path wins, as in tar.
MEMBERS_EXTRACTED = """
select distinct on (norm_path) path, norm_path, size, sha256, staging_path
from {schema}.tarball_members
where manifest_id = $1 and sha256 is not null
order by norm_path, idx desc"""

# Members a later run may want: regular files that were neither extracted nor refused.
MEMBER_PATHS = """
select norm_path as path, size, bool_or(sha256 is not null) as extracted
from {schema}.tarball_members
where manifest_id = $1 and type = 'file' and (skipped is null or sha256 is not null)
group by norm_path, size"""

# -- leases (crawler/leases.py) ---------------------------------------------------------------

# A unit counts as swept for us when our run swept it, or any run did after this process started
# (that sweep saw every row due when we started). Not waiting to sweep it again matters: a swept
# unit's lease is kept until its holder ends, so two overlapping runs each waiting to sweep the
# other's units would wait for ever.
SWEPT_FOR_US = ("d.run_id = {run} or d.done_at >= "
                "(select started_at from {{schema}}.lease_holders where holder = {holder})")
# Take up to $5 of the units in $4 (in that order) that nobody holds (or whose lease expired)
# and that this run has not swept already. One statement: two processes asking at once each get a unit or not, never both.
LEASE_TAKE = """
insert into {schema}.leases as l (unit, holder, run_id, acquired_at, expires_at)
select t.u, $1::text, $2::text, now(), now() + make_interval(secs => $3::float8)
from unnest($4::text[]) with ordinality t(u, k)
where not exists (select 1 from {schema}.lease_done d where d.unit = t.u and ({swept_take}))
  and not exists (select 1 from {schema}.leases h where h.unit = t.u and h.expires_at >= now())
order by t.k
limit $5::int
on conflict (unit) do update set holder = excluded.holder, run_id = excluded.run_id,
  acquired_at = excluded.acquired_at, expires_at = excluded.expires_at
where l.expires_at < now()
returning unit"""

# Extend this holder's leases; a unit missing from the answer is no longer ours.
LEASE_RENEW = """
update {schema}.leases set expires_at = now() + make_interval(secs => $2::float8)
where holder = $1::text and unit = any($3::text[])
returning unit"""

# The unit swept for the run. Its lease is kept until its holder ends (LEASE_RELEASE): files
# placed but not yet committed and stamped must not be taken up by another run meanwhile.
LEASE_DONE = """
insert into {schema}.lease_done (run_id, unit, holder) values ($2::text, $3::text, $1::text)
on conflict do nothing"""

LEASE_RELEASE = "delete from {schema}.leases where holder = $1::text"

# The units of $2 swept for holder $3 of run $1, and how many processes are alive (this one included).
LEASE_STATE = """
select (select coalesce(array_agg(distinct unit), '{{}}') from {schema}.lease_done d
         where d.unit = any($2::text[]) and ({swept_state})) as done,
       (select count(*) from {schema}.lease_holders
         where seen_at > now() - make_interval(secs => lease_s)) as alive,
       (select count(*) from {schema}.lease_holders
         where run_id = $1::text and seen_at > now() - make_interval(secs => lease_s)) as alive_in_run"""

LEASE_TAKE = LEASE_TAKE.replace("{swept_take}", SWEPT_FOR_US.format(run="$2::text", holder="$1::text"))
LEASE_STATE = LEASE_STATE.replace("{swept_state}", SWEPT_FOR_US.format(run="$1::text", holder="$3::text"))

LEASE_HOLDER_SEEN = """
insert into {schema}.lease_holders (holder, run_id, host, pid, seen_at, lease_s, progress)
values ($1::text, $2::text, $3::text, $4::int, now(), $5::float8, $6::jsonb)
on conflict (holder) do update set seen_at = now(), progress = excluded.progress"""

LEASE_HOLDER_GONE = "delete from {schema}.lease_holders where holder = $1::text"

# Holders not seen for a day are forgotten (their leases expired long ago).
LEASE_HOLDERS_FORGET = "delete from {schema}.lease_holders where seen_at < now() - interval '1 day'"

LEASE_RUN_PROGRESS = """
select holder, host, pid, seen_at, progress, seen_at > now() - make_interval(secs => lease_s) as alive
from {schema}.lease_holders where run_id = $1::text order by holder"""
