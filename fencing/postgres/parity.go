package postgres

import (
	"context"
	"errors"
	"fmt"
	"slices"
)

// paritySQL describes, one line each, what the fenced roles may do on the
// tables in scope once every saved grant is given back (current grants
// and, while fenced, the saved ones): the table and column privileges of
// each fenced role and of every role it is a member of or PUBLIC, the
// privileges on the sequences the tables own, row level security and its
// policies on the tables, and the default privileges. Names are printed
// from the catalogs, quoted and schema qualified, so lines from two
// databases compare as text.
const paritySQL = `
WITH RECURSIVE tabs AS (
	SELECT c.oid, format('%I.%I', n.nspname, c.relname) AS name, c.relacl, c.relowner, c.relrowsecurity, c.relforcerowsecurity
	FROM unnest($1::text[]) t(name)
	JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(t.name)
	JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
), agent_roles AS (
	SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = current_user
	UNION SELECT m.roleid FROM pg_catalog.pg_auth_members m JOIN agent_roles a ON m.member = a.oid
), named AS (
	SELECT r.oid, r.rolname FROM pg_catalog.pg_roles r
	WHERE CASE WHEN cardinality($2::text[]) > 0 THEN r.rolname = ANY($2::text[])
	           ELSE NOT r.rolsuper AND r.oid NOT IN (SELECT oid FROM agent_roles) AND r.rolname NOT LIKE 'pg\_%'
	                AND r.rolname NOT IN (SELECT e->>'proxy' FROM cutover.fence_state_v3 s, jsonb_array_elements(s.proxied) e) END
), edges AS (
	-- Memberships, and the write proxies' memberships the fence took
	-- away (saved): what the roles are members of once unfenced.
	SELECT a.member, a.roleid FROM pg_catalog.pg_auth_members a
	UNION
	SELECT m.oid, p.oid FROM cutover.fence_state_v3 s, jsonb_array_elements(s.saved) g
	JOIN pg_catalog.pg_roles p ON p.rolname = g->>'role'
	JOIN pg_catalog.pg_roles m ON pg_catalog.quote_ident(m.rolname) = g->>'grantee'
	WHERE s.fenced AND g->>'privilege' = 'MEMBER'
), member_of AS (
	SELECT n.oid AS role, n.oid AS via FROM named n
	UNION SELECT m.role, a.roleid FROM member_of m JOIN edges a ON a.member = m.via
), grants AS (
	SELECT t.name AS obj, NULL::text AS col, x.grantee::oid AS grantee_oid, NULL::text AS grantee_name, x.privilege_type AS priv
	FROM tabs t, pg_catalog.aclexplode(coalesce(t.relacl, pg_catalog.acldefault('r', t.relowner))) x
	UNION
	SELECT t.name, pg_catalog.quote_ident(att.attname), x.grantee, NULL, x.privilege_type
	FROM tabs t JOIN pg_catalog.pg_attribute att ON att.attrelid = t.oid AND att.attacl IS NOT NULL AND NOT att.attisdropped,
	     pg_catalog.aclexplode(att.attacl) x
	UNION
	SELECT g->>'table', g->>'column', NULL, g->>'grantee', g->>'privilege'
	FROM cutover.fence_state_v3 s, jsonb_array_elements(s.saved) g
	WHERE s.fenced AND g->>'table' IN (SELECT name FROM tabs)
	UNION
	SELECT 'sequence ' || format('%I.%I', n.nspname, q.relname), NULL, x.grantee, NULL, x.privilege_type
	FROM pg_catalog.pg_depend d
	JOIN pg_catalog.pg_class q ON q.oid = d.objid AND q.relkind = 'S'
	JOIN pg_catalog.pg_namespace n ON n.oid = q.relnamespace,
	     pg_catalog.aclexplode(coalesce(q.relacl, pg_catalog.acldefault('s', q.relowner))) x
	WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
	  AND d.refobjid IN (SELECT oid FROM tabs) AND d.deptype IN ('a', 'i')
), named_grants AS (
	SELECT obj, col, priv,
	       coalesce(grantee_name, CASE WHEN grantee_oid = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(grantee_oid)) END) AS grantee
	FROM grants
)
SELECT line FROM (
	SELECT format('role %s may %s on %s%s', pg_catalog.quote_ident(r.rolname), g.priv, g.obj, coalesce(' (' || g.col || ')', '')) AS line
	FROM named r JOIN member_of m ON m.role = r.oid
	JOIN named_grants g ON g.grantee = pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(m.via))
	UNION
	SELECT format('role %s may %s on %s%s', pg_catalog.quote_ident(r.rolname), g.priv, g.obj, coalesce(' (' || g.col || ')', ''))
	FROM named r, named_grants g WHERE g.grantee = 'PUBLIC'
	UNION
	SELECT format('row level security on %s: %s', t.name,
	       CASE WHEN t.relforcerowsecurity THEN 'enabled and forced' WHEN t.relrowsecurity THEN 'enabled' ELSE 'disabled' END)
	FROM tabs t
	UNION
	SELECT format('policy %I on %s: %s for %s to %s using (%s) with check (%s)', p.polname, t.name,
	       CASE WHEN p.polpermissive THEN 'permissive' ELSE 'restrictive' END,
	       CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE' WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
	       (SELECT pg_catalog.string_agg(CASE WHEN o = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(o)) END, ', ' ORDER BY 1)
	        FROM unnest(p.polroles) o),
	       coalesce(pg_catalog.pg_get_expr(p.polqual, p.polrelid), ''), coalesce(pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid), ''))
	FROM pg_catalog.pg_policy p JOIN tabs t ON t.oid = p.polrelid
	UNION
	SELECT format('default privileges of %s in %s on %s: %s may %s',
	       pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(d.defaclrole)),
	       CASE WHEN d.defaclnamespace = 0 THEN 'every schema' ELSE 'schema ' || pg_catalog.quote_ident(n.nspname) END,
	       CASE d.defaclobjtype WHEN 'r' THEN 'tables' WHEN 'S' THEN 'sequences' WHEN 'f' THEN 'functions' WHEN 'T' THEN 'types' WHEN 'n' THEN 'schemas' ELSE d.defaclobjtype::text END,
	       CASE WHEN x.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(x.grantee)) END, x.privilege_type)
	FROM pg_catalog.pg_default_acl d LEFT JOIN pg_catalog.pg_namespace n ON n.oid = d.defaclnamespace,
	     pg_catalog.aclexplode(d.defaclacl) x
	WHERE (x.grantee, x.privilege_type) NOT IN (
		SELECT y.grantee, y.privilege_type FROM pg_catalog.aclexplode(pg_catalog.acldefault(
			CASE WHEN d.defaclobjtype = 'S' THEN 's' ELSE d.defaclobjtype END, d.defaclrole)) y)
	UNION
	SELECT format('default privileges of %s in %s on %s: %s may not %s',
	       pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(d.defaclrole)),
	       CASE WHEN d.defaclnamespace = 0 THEN 'every schema' ELSE 'schema ' || pg_catalog.quote_ident(n.nspname) END,
	       CASE d.defaclobjtype WHEN 'r' THEN 'tables' WHEN 'S' THEN 'sequences' WHEN 'f' THEN 'functions' WHEN 'T' THEN 'types' WHEN 'n' THEN 'schemas' ELSE d.defaclobjtype::text END,
	       CASE WHEN y.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(y.grantee)) END, y.privilege_type)
	FROM pg_catalog.pg_default_acl d LEFT JOIN pg_catalog.pg_namespace n ON n.oid = d.defaclnamespace,
	     pg_catalog.aclexplode(pg_catalog.acldefault(CASE WHEN d.defaclobjtype = 'S' THEN 's' ELSE d.defaclobjtype END, d.defaclrole)) y
	WHERE d.defaclnamespace = 0
	  AND (y.grantee, y.privilege_type) NOT IN (SELECT x.grantee, x.privilege_type FROM pg_catalog.aclexplode(d.defaclacl) x)
) l`

// privilegeLines is paritySQL on f's database, with f's tables and roles.
func (f *Fencer) privilegeLines(ctx context.Context) ([]string, error) {
	if f.tableOIDs == nil {
		return nil, errors.New("Prepare has not run")
	}
	roles := f.opts.Roles
	if roles == nil {
		roles = []string{}
	}
	rows, err := f.pool.Query(ctx, paritySQL, f.opts.Tables, roles)
	if err != nil {
		return nil, err
	}
	var out []string
	for rows.Next() {
		var line string
		if err := rows.Scan(&line); err != nil {
			rows.Close()
			return nil, err
		}
		out = append(out, line)
	}
	slices.Sort(out) // bytewise, for the comparison: not the server's collation
	return out, rows.Err()
}

// PrivilegeParity proves, before the gate may open, that green will take
// the application's writes: every fenced role may do on green once green is
// unfenced (its current grants and the saved ones) what it may do on blue
// before its fence (blue's current grants, and the saved ones when blue is
// fenced): table, column and sequence privileges, row level security and
// its policies, default privileges. A retried plan once flipped to a green
// left fenced by its predecessor with nothing saved, and every application
// write failed there. It returns the differences, one human-readable line
// each, none when equal. Both Fencers must be prepared, over the same
// tables and roles.
func PrivilegeParity(ctx context.Context, blue, green *Fencer) ([]string, error) {
	b, err := blue.privilegeLines(ctx)
	if err != nil {
		return nil, fmt.Errorf("privileges on blue: %w", err)
	}
	g, err := green.privilegeLines(ctx)
	if err != nil {
		return nil, fmt.Errorf("privileges on green: %w", err)
	}
	var diffs []string
	for _, l := range b {
		if _, found := slices.BinarySearch(g, l); !found {
			diffs = append(diffs, "on blue, not on green once unfenced: "+l)
		}
	}
	for _, l := range g {
		if _, found := slices.BinarySearch(b, l); !found {
			diffs = append(diffs, "on green once unfenced, not on blue: "+l)
		}
	}
	return diffs, nil
}
