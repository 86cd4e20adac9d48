package postgres

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
)

// NamePrefix starts the name of every slot and publication the engine
// creates, so that leftovers can be found by prefix.
const NamePrefix = "cutover_"

// maxIdentifier is PostgreSQL's NAMEDATALEN-1.
const maxIdentifier = 63

// Name is the name of the publication and of the slot for one pair of a
// plan: cutover_<plan>_<pair>, lowercased, every character other than
// [a-z0-9_] replaced by '_' (slot names allow nothing else). When that is
// longer than 63 bytes it is cut and ends in '_' and 8 hex digits of a
// SHA-256 of the full name, so that two long names stay distinct.
func Name(plan, pair string) string {
	full := NamePrefix + sanitize(plan) + "_" + sanitize(pair)
	if len(full) <= maxIdentifier {
		return full
	}
	sum := sha256.Sum256([]byte(plan + "\x00" + pair))
	suffix := "_" + hex.EncodeToString(sum[:4])
	return full[:maxIdentifier-len(suffix)] + suffix
}

func sanitize(s string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(s) {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') || r == '_' {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return b.String()
}

// quoteIdent quotes an identifier for SQL.
func quoteIdent(s string) string {
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`
}

// quoteLiteral quotes a string literal for SQL (standard_conforming_strings
// on, which every supported server has by default).
func quoteLiteral(s string) string {
	return "'" + strings.ReplaceAll(s, "'", "''") + "'"
}

// TableName is a schema-qualified table.
type TableName struct {
	Schema, Name string
}

// String is schema.table, unquoted: the form used in logs, errors and the
// OnRowChange hook.
func (t TableName) String() string { return t.Schema + "." + t.Name }

// Quoted is "schema"."table".
func (t TableName) Quoted() string { return quoteIdent(t.Schema) + "." + quoteIdent(t.Name) }
