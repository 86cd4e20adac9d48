package integration

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// ErrBinaryNotFound is matched (errors.Is) by every error that reports a
// missing server binary. The concrete error is a *BinaryNotFoundError.
var ErrBinaryNotFound = errors.New("server binary not found")

// BinaryNotFoundError reports that none of the names of a server binary was
// found in PATH or in the Debian locations, and which Debian package
// provides it.
type BinaryNotFoundError struct {
	Names    []string // binary names tried, in order
	Package  string   // Debian package that provides the binary
	Searched []string // directories searched after PATH
}

func (e *BinaryNotFoundError) Error() string {
	return fmt.Sprintf("%s not found in PATH or %s: install the Debian package %s (apt-get install %s)",
		strings.Join(e.Names, "/"), strings.Join(e.Searched, ", "), e.Package, e.Package)
}

// Unwrap makes errors.Is(err, ErrBinaryNotFound) true.
func (e *BinaryNotFoundError) Unwrap() error { return ErrBinaryNotFound }

// Seams for tests: where binaries are looked up.
var (
	lookPath = exec.LookPath
	binDirs  = debianBinDirs
)

// debianBinDirs lists the Debian locations of server binaries, the
// PostgreSQL ones highest major version first.
func debianBinDirs() []string {
	pg, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sortByPGVersion(pg)
	return append(pg, "/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")
}

// sortByPGVersion orders /usr/lib/postgresql/<v>/bin directories highest
// version first (numerically: 16 before 9.6).
func sortByPGVersion(dirs []string) {
	sort.SliceStable(dirs, func(i, j int) bool {
		return pgMajor(dirs[i]) > pgMajor(dirs[j])
	})
}

// pgMajor extracts the version from /usr/lib/postgresql/<v>/bin; 0 if none.
func pgMajor(dir string) float64 {
	v, err := strconv.ParseFloat(filepath.Base(filepath.Dir(dir)), 64)
	if err != nil {
		return 0
	}
	return v
}

// findBinary returns the absolute path of the first of names found in PATH,
// then in binDirs.
func findBinary(pkg string, names ...string) (string, error) {
	for _, n := range names {
		if p, err := lookPath(n); err == nil {
			return filepath.Abs(p)
		}
	}
	dirs := binDirs()
	for _, d := range dirs {
		for _, n := range names {
			p := filepath.Join(d, n)
			if isExecutable(p) {
				return p, nil
			}
		}
	}
	return "", &BinaryNotFoundError{Names: names, Package: pkg, Searched: dirs}
}

// siblingBinary finds name next to bin (after resolving symlinks), so that
// initdb matches the postgres it prepares a directory for; it falls back to
// findBinary.
func siblingBinary(bin, pkg, name string) (string, error) {
	if real, err := filepath.EvalSymlinks(bin); err == nil {
		if p := filepath.Join(filepath.Dir(real), name); isExecutable(p) {
			return p, nil
		}
	}
	return findBinary(pkg, name)
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}
