package config

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestASecretFileReferenceIsKeptAndReadWhenResolved(t *testing.T) {
	dir := t.TempDir()
	pwFile := filepath.Join(dir, "blue_pw")
	if err := os.WriteFile(pwFile, []byte("blue-file-pw-8c2d\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	doc := strings.Replace(base, "${BLUE_PW}", "${file:"+pwFile+"}", 1)
	env := lookup(refsEnv)
	loaded, err := Parse("files.yaml", []byte(doc), WithSecretFiles(env))
	if err != nil {
		t.Fatal(err)
	}
	p := loaded.Config.Plans[0]
	if got := p.Refs["pairs[0].blue.dsn"]; got != "postgres://app:${file:"+pwFile+"}@127.0.0.1:5432/orders" {
		t.Fatalf("ref = %q", got)
	}
	if !slices.Contains(loaded.Secrets, "blue-file-pw-8c2d") {
		t.Errorf("the file's secret is not registered for redaction: %v", loaded.Secrets)
	}
	if lit := p.LiteralSecrets(); slices.Contains(lit, "pairs[0].blue.dsn") {
		t.Errorf("a file reference is taken for a literal secret: %v", lit)
	}
	sealed, err := p.Sealed()
	if err != nil {
		t.Fatal(err)
	}
	if raw := revealAll(t, sealed); strings.Contains(raw, "blue-file-pw-8c2d") || !strings.Contains(raw, "${file:"+pwFile+"}") {
		t.Fatalf("sealed: %s", raw)
	}
	resolved, err := sealed.Resolve(WithSecretFiles(env))
	if err != nil {
		t.Fatal(err)
	}
	if got := resolved.Pairs[0].Blue.DSN.Reveal(); got != "postgres://app:blue-file-pw-8c2d@127.0.0.1:5432/orders" {
		t.Fatalf("resolved: %s", got)
	}

	for _, tc := range []struct {
		name  string
		setup func()
		want  string
	}{
		{"readable by others", func() { os.Chmod(pwFile, 0o644) }, "file " + pwFile + ": mode 0644 gives group or others access; chmod 600 it"},
		{"readable by the group", func() { os.Chmod(pwFile, 0o640) }, "file " + pwFile + ": mode 0640 gives group or others access"},
		{"empty", func() { os.WriteFile(pwFile, []byte("\n"), 0o600); os.Chmod(pwFile, 0o600) }, "file " + pwFile + ": empty"},
		{"missing", func() { os.Remove(pwFile) }, "file " + pwFile + ": no such file or directory"},
		{"a folder", func() { os.Mkdir(pwFile, 0o700) }, "file " + pwFile + ": not a regular file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.setup()
			if m := sealed.MissingEnv(WithSecretFiles(env)); !slices.Equal(m, []string{"file:" + pwFile}) {
				t.Fatalf("missing = %v", m)
			}
			_, err := sealed.Resolve(WithSecretFiles(env))
			var me *MissingEnvError
			if !errors.As(err, &me) || !strings.Contains(err.Error(), "plan orders needs "+tc.want) {
				t.Fatalf("resolve: %v", err)
			}
		})
	}
}

func TestASecretFileReferenceNeedsAnAbsolutePath(t *testing.T) {
	doc := strings.Replace(base, "${BLUE_PW}", "${file:secrets/blue_pw}", 1)
	_, err := Parse("files.yaml", []byte(doc), WithSecretFiles(lookup(refsEnv)))
	if err == nil || !strings.Contains(err.Error(), "${file:secrets/blue_pw}: the path must be absolute") {
		t.Fatalf("err = %v", err)
	}
}
