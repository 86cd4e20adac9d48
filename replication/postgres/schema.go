package postgres

// The engine's bookkeeping lives in a schema named cutover on both sides.
// Every statement here is idempotent: a restarted or new leader runs them
// again.
//
// cutover.heartbeat and cutover.markers are written on blue and are part of
// the publication, so their rows flow through the stream like application
// rows; they are created on green too so that they apply. The fencer
// (fencing/postgres) creates cutover.markers with the same definition.
//
// cutover.applied exists on green only. One row per slot holds the end
// position of the last source transaction applied, written in the same
// transaction as the changes, so that a restart resumes exactly once.
// copied_at is NULL while the initial copy runs: a replicator that finds
// the row without it knows the copy was interrupted and starts it over.

// sourceSchemaSQL is run on blue.
const sourceSchemaSQL = `
CREATE SCHEMA IF NOT EXISTS cutover;
CREATE TABLE IF NOT EXISTS cutover.heartbeat (
	plan       text        NOT NULL,
	pair       text        NOT NULL,
	seq        bigint      NOT NULL,
	written_at timestamptz NOT NULL,
	PRIMARY KEY (plan, pair)
);
CREATE TABLE IF NOT EXISTS cutover.markers (
	nonce      text        PRIMARY KEY,
	plan       text        NOT NULL,
	epoch      bigint      NOT NULL,
	written_at timestamptz NOT NULL DEFAULT now()
);
-- read_sequences and sync_sequences sync sequences at cutover (the stream
-- does not carry them) in one round trip per side, however many there
-- are: the sync runs inside the write outage. A name that does not
-- resolve comes back with present false.
CREATE OR REPLACE FUNCTION cutover.read_sequences(p_names text[])
RETURNS TABLE (name text, present boolean, last_value bigint, is_called boolean)
LANGUAGE plpgsql AS $$
DECLARE
	r regclass;
BEGIN
	FOREACH name IN ARRAY p_names LOOP
		r := to_regclass(name);
		present := r IS NOT NULL;
		last_value := NULL;
		is_called := NULL;
		IF present THEN
			EXECUTE format('SELECT last_value, is_called FROM %s', r) INTO last_value, is_called;
		END IF;
		RETURN NEXT;
	END LOOP;
END
$$;
-- sync_sequences moves each sequence forward to the source's state (last
-- value, is_called) unless it is already there or beyond; it never moves
-- one backwards (the target may have handed out values of its own).
-- next_before is the value it would have handed out before.
CREATE OR REPLACE FUNCTION cutover.sync_sequences(p_names text[], p_last bigint[], p_called boolean[], p_inc bigint[])
RETURNS TABLE (name text, present boolean, next_before bigint, moved boolean)
LANGUAGE plpgsql AS $$
DECLARE
	r regclass;
	v_last bigint;
	v_called boolean;
	v_source_next bigint;
BEGIN
	-- LOCK TABLE refuses sequences (42809): an advisory lock keeps two
	-- syncs from racing each other. Nothing else calls setval before the
	-- flip.
	PERFORM pg_advisory_xact_lock(hashtext('cutover.sequence_sync'), 0);
	FOR i IN 1 .. coalesce(array_length(p_names, 1), 0) LOOP
		name := p_names[i];
		r := to_regclass(name);
		present := r IS NOT NULL;
		next_before := NULL;
		moved := false;
		IF present THEN
			EXECUTE format('SELECT last_value, is_called FROM %s', r) INTO v_last, v_called;
			next_before := CASE WHEN v_called THEN v_last + p_inc[i] ELSE v_last END;
			v_source_next := CASE WHEN p_called[i] THEN p_last[i] + p_inc[i] ELSE p_last[i] END;
			IF (p_inc[i] > 0 AND next_before < v_source_next) OR (p_inc[i] < 0 AND next_before > v_source_next) THEN
				PERFORM setval(r, p_last[i], p_called[i]);
				moved := true;
			END IF;
		END IF;
		RETURN NEXT;
	END LOOP;
END
$$;`

// targetSchemaSQL is run on green.
const targetSchemaSQL = sourceSchemaSQL + `
CREATE TABLE IF NOT EXISTS cutover.applied (
	slot        text        PRIMARY KEY,
	lsn         pg_lsn      NOT NULL,
	commit_time timestamptz,
	updated_at  timestamptz,
	copied_at   timestamptz,
	epoch       bigint      NOT NULL DEFAULT 0
);
ALTER TABLE cutover.applied ADD COLUMN IF NOT EXISTS epoch bigint NOT NULL DEFAULT 0;
-- Every initial copy that began on this server, kept after the plan is
-- cleaned up: proof that rows left in green's tables were written by
-- cutover (see Options.GreenFencedSince).
CREATE TABLE IF NOT EXISTS cutover.copies (
	slot     text        NOT NULL,
	began_at timestamptz NOT NULL DEFAULT now()
);
-- Green's indexes dropped for the duration of a copy, with what builds
-- them again (see deferIndexes): a row is written in the transaction that
-- drops its index and deleted in the one that builds it.
CREATE TABLE IF NOT EXISTS cutover.deferred_indexes (
	schema_name text        NOT NULL,
	index_name  text        NOT NULL,
	table_name  text        NOT NULL,
	def         text        NOT NULL,
	slot        text        NOT NULL,
	deferred_at timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (schema_name, index_name)
);
-- claim_apply opens every apply batch. It locks the slot's row for the
-- rest of the transaction, so appliers take turns, and fails
--   CUT02 when a higher epoch (a newer leader) has applied: the caller is
--         deposed and must stop;
--   CUT01 when the stored position (the end of the last applied
--         transaction) is past the commit of the batch's first
--         transaction, i.e. someone applied it already: the caller must
--         not apply the batch, and resumes from the stored position.
-- Otherwise it records the caller's epoch and returns the position.
CREATE OR REPLACE FUNCTION cutover.claim_apply(p_slot text, p_first_commit pg_lsn, p_epoch bigint) RETURNS pg_lsn
LANGUAGE plpgsql AS $$
DECLARE
	stored pg_lsn;
	stored_epoch bigint;
BEGIN
	SELECT lsn, epoch INTO stored, stored_epoch FROM cutover.applied WHERE slot = p_slot FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'cutover: no applied position for slot %', p_slot USING ERRCODE = 'P0002';
	END IF;
	IF stored_epoch > p_epoch THEN
		RAISE EXCEPTION 'cutover: slot % is applied by epoch %, this applier has epoch %', p_slot, stored_epoch, p_epoch
			USING ERRCODE = 'CUT02';
	END IF;
	IF stored > p_first_commit THEN
		RAISE EXCEPTION 'cutover: slot % already applied up to %, past the batch''s first commit at %', p_slot, stored, p_first_commit
			USING ERRCODE = 'CUT01';
	END IF;
	IF stored_epoch < p_epoch THEN
		UPDATE cutover.applied SET epoch = p_epoch WHERE slot = p_slot;
	END IF;
	RETURN stored;
END
$$;`

// SQLSTATEs raised by claim_apply.
const (
	aheadCode      = "CUT01" // another applier applied the batch: resume from green
	supersededCode = "CUT02" // a newer leader's applier: stop
)

// Statements on cutover.applied.
const (
	// readAppliedSQL reads the stored position; no row means no copy ever
	// started for the slot.
	readAppliedSQL = `SELECT lsn::text, commit_time, copied_at IS NOT NULL, epoch FROM cutover.applied WHERE slot = $1`
	// beginCopySQL records that a copy is under way (copied_at NULL); a
	// restarted copy resets the row.
	beginCopySQL = `INSERT INTO cutover.applied (slot, lsn, updated_at, epoch) VALUES ($1, '0/0', now(), $2)
		ON CONFLICT (slot) DO UPDATE SET lsn = '0/0', commit_time = NULL, copied_at = NULL, updated_at = now(), epoch = greatest(cutover.applied.epoch, $2)`
	// finishCopySQL makes the consistent point the applied position.
	finishCopySQL = `UPDATE cutover.applied SET lsn = $2::pg_lsn, copied_at = now(), updated_at = now() WHERE slot = $1 AND copied_at IS NULL`
	// claimSQL opens every apply batch.
	claimSQL = `SELECT cutover.claim_apply($1, $2::pg_lsn, $3::bigint)`
	// advanceSQL closes every apply batch, in the same transaction. The
	// guard keeps the position from going backwards whatever happens.
	advanceSQL = `UPDATE cutover.applied SET lsn = $2::pg_lsn, commit_time = $3::timestamptz, updated_at = now() WHERE slot = $1 AND lsn < $2::pg_lsn`
	// forgetSQL removes the slot's row (cleanup).
	forgetSQL = `DELETE FROM cutover.applied WHERE slot = $1`
)

// heartbeatSQL bumps this pair's heartbeat on blue.
const heartbeatSQL = `INSERT INTO cutover.heartbeat AS h (plan, pair, seq, written_at) VALUES ($1, $2, 1, clock_timestamp())
	ON CONFLICT (plan, pair) DO UPDATE SET seq = h.seq + 1, written_at = clock_timestamp()
	RETURNING seq, written_at`
