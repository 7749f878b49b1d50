-- Every change a run hands the database carries an id of its own. A batch whose commit reached
-- the database but whose answer was lost (the connection dropped) is sent again; the changes the
-- journal already holds are then skipped, so no counter moves twice for one request.
alter table {schema}.journal add column if not exists change_id text;
create unique index if not exists journal_change_idx on {schema}.journal (change_id);
