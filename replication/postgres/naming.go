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

// Direction is which way a pair replicates: blue to green before the
// flip, green to blue (the way back) after it.
type Direction string

// Directions.
const (
	Forward Direction = "forward"
	Reverse Direction = "reverse"
)

// hashLen is how many hex digits of SHA-256 end a name: 48 bits, so that
// distinct (plan, pair, direction) triples do not collide in practice.
const hashLen = 12

// Name is the name of the publication and of the slot for one pair of a
// plan in one direction: cutover_<plan>_<pair>_<f|r>_<hash>, where plan
// and pair are lowercased with every character other than [a-z0-9_]
// replaced by '_' (slot names allow nothing else), cut so that the whole
// fits PostgreSQL's 63 bytes, and hash is 12 hex digits of a SHA-256 of
// the exact triple. The readable part may be shared (pairs "a-b" and
// "a_b", pair "db-rev" forward and pair "db" reverse); the hash is not.
func Name(plan, pair string, dir Direction) string {
	sum := sha256.Sum256([]byte(plan + "\x00" + pair + "\x00" + string(dir)))
	letter := "f"
	if dir == Reverse {
		letter = "r"
	}
	suffix := "_" + letter + "_" + hex.EncodeToString(sum[:])[:hashLen]
	readable := NamePrefix + sanitize(plan) + "_" + sanitize(pair)
	if len(readable)+len(suffix) > maxIdentifier {
		readable = readable[:maxIdentifier-len(suffix)]
	}
	return readable + suffix
}

// LegacyName is the name slots and publications had before names carried
// a hash of the direction: cutover_<plan>_<pair> (the reverse direction
// used pair "<pair>-rev"), which two pairs or directions could share. Only
// a name a plan recorded in its facts is ever used in this form.
func LegacyName(plan, pair string) string {
	full := NamePrefix + sanitize(plan) + "_" + sanitize(pair)
	if len(full) <= maxIdentifier {
		return full
	}
	sum := sha256.Sum256([]byte(plan + "\x00" + pair))
	suffix := "_" + hex.EncodeToString(sum[:4])
	return full[:maxIdentifier-len(suffix)] + suffix
}

// The plan facts that record a pair's names (slot and publication share
// one name per direction).
const (
	FactSlot               = "slot."
	FactPublication        = "publication."
	FactReverseSlot        = "reverse_slot."
	FactReversePublication = "reverse_publication."
)

// PlanNames are the names of a pair's slot and publication in each
// direction for a plan: those recorded in the plan's facts, else the
// plan's own Name(plan, pair, direction), which no other plan, pair or
// direction shares. A plan that recorded a name of the old scheme
// (LegacyName: created before names carried a hash) keeps that scheme for
// the reverse direction too, so that it finishes with the names it
// started with.
func PlanNames(plan, pair string, facts map[string]string) (fwd, rev string) {
	fwd, rev = facts[FactSlot+pair], facts[FactReverseSlot+pair]
	legacy := fwd != "" && fwd == LegacyName(plan, pair)
	if fwd == "" {
		fwd = Name(plan, pair, Forward)
	}
	if rev == "" {
		if legacy {
			rev = LegacyName(plan, pair+"-rev")
		} else {
			rev = Name(plan, pair, Reverse)
		}
	}
	return fwd, rev
}

// NameFacts are the facts that record a pair's names.
func NameFacts(pair, fwd, rev string) map[string]string {
	return map[string]string{
		FactSlot + pair: fwd, FactPublication + pair: fwd,
		FactReverseSlot + pair: rev, FactReversePublication + pair: rev,
	}
}

// RecordedNames are every slot and publication name recorded in facts.
func RecordedNames(facts map[string]string) []string {
	var out []string
	for k, v := range facts {
		for _, prefix := range []string{FactSlot, FactPublication, FactReverseSlot, FactReversePublication} {
			if strings.HasPrefix(k, prefix) {
				out = append(out, v)
				break
			}
		}
	}
	return out
}

// validSlotName: what PostgreSQL accepts as a slot name.
func validSlotName(s string) bool {
	if s == "" || len(s) > maxIdentifier {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_') {
			return false
		}
	}
	return true
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
