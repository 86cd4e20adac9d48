package integration

import "fmt"

// PostgresTool finds one of PostgreSQL's client programs (pgbench, psql)
// next to the postgres binary the harness starts, as it finds initdb, so
// that the tool and the server are of one version.
func PostgresTool(name string) (string, error) {
	bin, err := findBinary("postgresql", "postgres")
	if err != nil {
		return "", fmt.Errorf("find %s: %w", name, err)
	}
	p, err := siblingBinary(bin, "postgresql", name)
	if err != nil {
		return "", fmt.Errorf("find %s: %w", name, err)
	}
	return p, nil
}
