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
