package postgres

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sort"

	"github.com/cutover/cutover/replication"
)

// CompareSchemas lists every difference between blue's and green's tables
// in scope: tables or columns missing on green, columns only on green,
// types, nullability, generated columns and primary keys. DDL is not
// replicated, so a change applied on blue alone shows up here (and stops
// the applier once it touches a replicated column); it is checked before
// the fence and on demand.
func (r *Replicator) CompareSchemas(ctx context.Context) ([]replication.Difference, error) {
	if r.blue == nil || r.green == nil {
		return nil, fmt.Errorf("compare schemas: replicator not started")
	}
	tables, _, err := resolveTables(ctx, r.blue, r.opts.Pair.Scope)
	if err != nil {
		return nil, fmt.Errorf("blue: %w", err)
	}
	greenAll, err := listTables(ctx, r.green)
	if err != nil {
		return nil, fmt.Errorf("green: %w", err)
	}
	return compareTables(tables, greenAll), nil
}

// SchemaFingerprint hashes the definition of the tables in scope on each
// side (names, columns in order with types, nullability and generation,
// primary key). Equal fingerprints mean no drift; CompareSchemas says
// what differs when they are not.
func (r *Replicator) SchemaFingerprint(ctx context.Context) (blue, green string, err error) {
	if r.blue == nil || r.green == nil {
		return "", "", fmt.Errorf("schema fingerprint: replicator not started")
	}
	tables, _, err := resolveTables(ctx, r.blue, r.opts.Pair.Scope)
	if err != nil {
		return "", "", fmt.Errorf("blue: %w", err)
	}
	greenAll, err := listTables(ctx, r.green)
	if err != nil {
		return "", "", fmt.Errorf("green: %w", err)
	}
	var greenTables []*tableInfo
	for _, t := range tables {
		if g, ok := greenAll[t.Name]; ok {
			greenTables = append(greenTables, g)
		} else {
			greenTables = append(greenTables, &tableInfo{Name: t.Name})
		}
	}
	return fingerprint(tables), fingerprint(greenTables), nil
}

func fingerprint(tables []*tableInfo) string {
	sorted := append([]*tableInfo(nil), tables...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name.String() < sorted[j].Name.String() })
	h := sha256.New()
	for _, t := range sorted {
		fmt.Fprintf(h, "table %s key %s\n", t.Name.Quoted(), keyText(t))
		cols := append([]column(nil), t.Columns...)
		sort.Slice(cols, func(i, j int) bool { return cols[i].Name < cols[j].Name })
		for _, c := range cols {
			fmt.Fprintf(h, "  %s %s notnull=%t generated=%t\n", quoteIdent(c.Name), c.Type, c.NotNull, c.Generated)
		}
	}
	return hex.EncodeToString(h.Sum(nil))
}
