-- `crawler undo RUN_ID` finds what a run wrote through `crawler apply` of its changeset by the
-- run id the changeset's lines carry (detail->>'from_run').
create index if not exists journal_from_run_idx on {schema}.journal ((detail->>'from_run')) where detail ? 'from_run';
