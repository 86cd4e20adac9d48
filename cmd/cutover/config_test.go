package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestConfigCheckExitCodes(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	write(t, good, `agent:
  node_id: a1
  data_dir: /tmp/a1
  api: {tokens: {operator: "${TEST_OP_TOKEN}"}}
plans:
  - name: p
    pairs:
      - name: db
        engine: postgres
        blue: {dsn: "postgres://app:${TEST_BLUE_PW}@127.0.0.1:5432/x"}
        green: {dsn: "postgres://app:${TEST_BLUE_PW}@127.0.0.1:5433/x"}
`)
	write(t, bad, "agent:\n  node_id: a1\n  colour: blue\n")
	t.Setenv("TEST_OP_TOKEN", "tok-abcdefghijklmnopq")
	t.Setenv("TEST_BLUE_PW", "pw-very-secret")

	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantOut    string
		wantErr    string
		notInAnyIO []string
	}{
		{"valid file prints normalized config with secrets redacted", []string{"config", "check", good}, 0,
			"dsn: postgres://app:[redacted]@127.0.0.1:5432/x", "valid", []string{"tok-abcdefghijklmnopq", "pw-very-secret"}},
		{"invalid file lists problems and exits 1", []string{"config", "check", bad}, 1,
			"", `line 3: agent.colour: unknown key`, nil},
		{"unreadable file exits 2", []string{"config", "check", filepath.Join(dir, "nope.yaml")}, 2,
			"", "no such file or directory", nil},
		{"version prints the go version", []string{"version"}, 0, "go1.", "", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			code := run(tt.args, &out, &errb)
			if code != tt.wantCode {
				t.Errorf("exit = %d, want %d (stderr %q)", code, tt.wantCode, errb.String())
			}
			if !strings.Contains(out.String(), tt.wantOut) {
				t.Errorf("stdout %q does not contain %q", out.String(), tt.wantOut)
			}
			if !strings.Contains(errb.String(), tt.wantErr) {
				t.Errorf("stderr %q does not contain %q", errb.String(), tt.wantErr)
			}
			for _, s := range tt.notInAnyIO {
				if strings.Contains(out.String()+errb.String(), s) {
					t.Errorf("output contains secret %q", s)
				}
			}
		})
	}
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}
