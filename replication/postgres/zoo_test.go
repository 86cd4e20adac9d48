package postgres

import (
	"strconv"
	"testing"
)

const zooSchema = `
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
CREATE TABLE zoo (
	id          integer PRIMARY KEY,
	i2          smallint,
	i8          bigint,
	num         numeric,
	num_scaled  numeric(12,4),
	f4          real,
	f8          double precision,
	t           text,
	vc          varchar(20),
	ch          char(5),
	b           bytea,
	j           json,
	jb          jsonb,
	ints        integer[],
	texts       text[],
	grid        integer[][],
	moods       mood[],
	ts          timestamp,
	tstz        timestamptz,
	d           date,
	tm          time,
	iv          interval,
	u           uuid,
	flag        boolean,
	m           mood,
	p           positive,
	big         text,
	bigb        bytea,
	inet_       inet,
	pt          point
);
`

// zooRows inserts rows covering every type's edge cases. base offsets ids.
func zooRows(base int) string {
	return `
INSERT INTO zoo VALUES
 (` + itoa(base+1) + `, -32768, -9223372036854775808, 'NaN', 1.5000, 'NaN', 'Infinity', 'plain', 'v', 'ab', '\x00ff10', '{"a" : 1,  "b":[1,2]}', '{"b": [1, 2], "a": {"x": null}}',
   '{1,2,3}', '{"a b","c\"d","e\\f",NULL,"NULL",""}', '{{1,2},{3,4}}', '{sad,happy}',
   '2024-02-29 23:59:59.999999', '2024-06-01 12:00:00+05:30', 'infinity', '24:00:00', '1 year 2 mons -3 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', true, 'ok', 7,
   NULL, NULL, '::1/128', '(1.5,-2)'),
 (` + itoa(base+2) + `, 32767, 9223372036854775807, '-0.000000000000000000001', 0.0001, '-Infinity', '-0', E'tab\there\nnewline \\ back ''quote''', 'ünïcödé', 'x', '', '[]', '[]',
   '{}', '{}', '{}', '{}',
   '0001-01-01 00:00:00', '1970-01-01 00:00:00-08', '-infinity', '00:00:00', '-178000000 years', '00000000-0000-0000-0000-000000000000', false, 'sad', 1,
   NULL, NULL, '10.0.0.0/8', '(0,0)'),
 (` + itoa(base+3) + `, 0, 0, '123456789012345678901234567890.123456789', -99999999.9999, 3.4028235e+38, 2.2250738585072014e-308, '😀 emoji 𝄞 and CJK 漢字', NULL, NULL, '\x5c22', '"just a string"', '"s"',
   '{NULL}', '{NULL,NULL}', '{{NULL,1},{2,NULL}}', '{}',
   '2000-01-01 00:00:00', '2038-01-19 03:14:08+00', '2024-01-01', '12:34:56.789', '0', NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL),
 (` + itoa(base+4) + `, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL),
 (` + itoa(base+5) + `, 1, 1, '1.10', 1.1, 1.1, 1.1, 'toast', 'toast', 'toast', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   (SELECT string_agg(md5(g::text || ` + itoa(base) + `), '') FROM generate_series(1, 40000) g),
   (SELECT decode(string_agg(md5(g::text || 'b'), ''), 'hex') FROM generate_series(1, 20000) g), NULL, NULL);
`
}

func itoa(i int) string { return strconv.Itoa(i) }

func TestTypeZooRoundTripsExactly(t *testing.T) {
	e := newPairEnv(t, zooSchema)
	// Blue renders values in its own session settings; the stream must
	// not depend on them.
	e.exec(t, e.blue, `ALTER DATABASE cutover SET TimeZone = 'Pacific/Chatham'; ALTER DATABASE cutover SET DateStyle = 'SQL, DMY'; ALTER DATABASE cutover SET IntervalStyle = 'iso_8601'; ALTER DATABASE cutover SET extra_float_digits = 0`)
	e.exec(t, e.green, `ALTER DATABASE cutover SET TimeZone = 'America/St_Johns'; ALTER DATABASE cutover SET DateStyle = 'German'`)
	e.exec(t, e.blue, zooRows(0)) // copied
	r := e.start(t, e.options(t))
	e.sync(t, r)
	e.requireSame(t, "zoo")

	e.exec(t, e.blue, zooRows(100)) // streamed
	e.sync(t, r)
	e.requireSame(t, "zoo")

	// Updates that leave the TOASTed columns alone must keep them on
	// green (pgoutput sends them as "unchanged"), including several
	// updates of the row merged into one batch.
	e.exec(t, e.blue, `UPDATE zoo SET i2 = 42 WHERE id IN (5, 105)`)
	e.exec(t, e.blue, `BEGIN; UPDATE zoo SET i8 = 1 WHERE id = 5; UPDATE zoo SET i8 = 2, t = 'changed' WHERE id = 5; COMMIT`)
	e.exec(t, e.blue, `UPDATE zoo SET id = 1005 WHERE id = 105`) // key change, TOAST unchanged
	e.sync(t, r)
	e.requireSame(t, "zoo")

	// Change the TOASTed value itself, then set everything to NULL.
	e.exec(t, e.blue, `UPDATE zoo SET big = big || 'tail', bigb = NULL WHERE id = 5`)
	e.exec(t, e.blue, `UPDATE zoo SET (i2, i8, num, num_scaled, f4, f8, t, vc, ch, b, j, jb, ints, texts, grid, moods, ts, tstz, d, tm, iv, u, flag, m, p, big, bigb, inet_, pt) =
		(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL) WHERE id = 101`)
	e.exec(t, e.blue, `DELETE FROM zoo WHERE id = 102`)
	e.sync(t, r)
	e.requireSame(t, "zoo")
	if got := count(t, e.green, "zoo"); got != 9 {
		t.Errorf("green has %d rows, want 9", got)
	}
	if r.Err() != nil {
		t.Fatal(r.Err())
	}
}
