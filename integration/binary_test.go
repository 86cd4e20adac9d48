package integration

import (
	"context"
	"errors"
	"os/exec"
	"reflect"
	"strings"
	"testing"
)

// Not parallel: it swaps the package's lookup seams.
func TestMissingBinaryNamesTheDebianPackage(t *testing.T) {
	empty := t.TempDir()
	oldLookPath, oldBinDirs := lookPath, binDirs
	lookPath = func(string) (string, error) { return "", exec.ErrNotFound }
	binDirs = func() []string { return []string{empty} }
	t.Cleanup(func() { lookPath, binDirs = oldLookPath, oldBinDirs })

	ctx := context.Background()
	for _, tc := range []struct {
		engine, pkg string
		start       func() error
	}{
		{"postgres", "postgresql", func() error { _, err := StartPostgres(ctx, PostgresOptions{}); return err }},
		{"mariadb", "mariadb-server", func() error { _, err := StartMariaDB(ctx, MariaDBOptions{}); return err }},
		{"redis", "redis-server", func() error { _, err := StartRedis(ctx, RedisOptions{}); return err }},
	} {
		err := tc.start()
		if !errors.Is(err, ErrBinaryNotFound) {
			t.Errorf("%s: err = %v, want ErrBinaryNotFound", tc.engine, err)
			continue
		}
		var nf *BinaryNotFoundError
		if !errors.As(err, &nf) || nf.Package != tc.pkg {
			t.Errorf("%s: err = %#v, want a *BinaryNotFoundError for package %s", tc.engine, err, tc.pkg)
		}
		if !strings.Contains(err.Error(), "apt-get install "+tc.pkg) || !strings.Contains(err.Error(), empty) {
			t.Errorf("%s: message %q should name the package %s and the searched directory", tc.engine, err, tc.pkg)
		}
	}
}

func TestPostgresDirectoriesAreSearchedHighestVersionFirst(t *testing.T) {
	dirs := []string{"/usr/lib/postgresql/9.6/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/13/bin"}
	sortByPGVersion(dirs)
	want := []string{"/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/13/bin", "/usr/lib/postgresql/9.6/bin"}
	if !reflect.DeepEqual(dirs, want) {
		t.Errorf("got %v, want %v", dirs, want)
	}
}
