package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/integration"
)

const verifySetup = `
CREATE TABLE orders (id bigint PRIMARY KEY, customer text, total numeric(12,2), placed timestamptz);
INSERT INTO orders SELECT g, 'customer ' || g % 97, g * 1.5, '2025-01-01 00:00:00+00'::timestamptz + g * interval '1 minute' FROM generate_series(1, 2000) g;
`

func startPair(t *testing.T) (blue, green *integration.Postgres) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs PostgreSQL servers")
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); blue = integration.NewPostgres(t, integration.PostgresOptions{}) }()
	go func() { defer wg.Done(); green = integration.NewPostgres(t, integration.PostgresOptions{}) }()
	wg.Wait()
	if blue == nil || green == nil {
		t.FailNow()
	}
	for _, pg := range []*integration.Postgres{blue, green} {
		if err := pg.Exec(context.Background(), verifySetup); err != nil {
			t.Fatal(err)
		}
	}
	return blue, green
}

func TestVerifyCommandExitCodesAndReports(t *testing.T) {
	blue, green := startPair(t)
	const password = "s3cret-pw-verify"
	// Trust auth ignores the password, so the DSNs connect; it must
	// still never be printed.
	blueDSN := blue.DSNFor(blue.Database, "postgres", password)
	greenDSN := green.DSNFor(green.Database, "postgres", password)
	dir := t.TempDir()
	jsonPath, htmlPath := filepath.Join(dir, "r.json"), filepath.Join(dir, "r.html")

	verify := func(t *testing.T, args ...string) (int, string, string) {
		t.Helper()
		var out, errb bytes.Buffer
		code := run(append([]string{"verify", "--progress", "never"}, args...), &out, &errb)
		for name, text := range map[string]string{"stdout": out.String(), "stderr": errb.String()} {
			if strings.Contains(text, password) {
				t.Errorf("%s shows the password:\n%s", name, text)
			}
		}
		for _, p := range []string{jsonPath, htmlPath} {
			if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), password) {
				t.Errorf("%s shows the password", p)
			}
		}
		return code, out.String(), errb.String()
	}

	t.Run("equal databases exit 0 and write both reports", func(t *testing.T) {
		code, out, errs := verify(t, "--blue", blueDSN, "--green", greenDSN, "--json", jsonPath, "--html", htmlPath)
		if code != exitOK || !strings.HasPrefix(out, "equal: 1 tables, 2000 rows") {
			t.Fatalf("exit %d\nstdout: %s\nstderr: %s", code, out, errs)
		}
		f, err := os.Open(jsonPath)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		rep, err := consistency.ReadReport(f)
		if err != nil {
			t.Fatal(err)
		}
		if rep.Verdict != consistency.Equal || rep.Blue.PositionStart == "" || !strings.Contains(rep.Blue.DSN, "[redacted]") {
			t.Errorf("report: verdict %s, blue %+v", rep.Verdict, rep.Blue)
		}
		if html, _ := os.ReadFile(htmlPath); !strings.Contains(string(html), "<!DOCTYPE html>") {
			t.Error("no HTML report")
		}
	})

	t.Run("a difference exits 1 and is printed", func(t *testing.T) {
		if err := green.Exec(context.Background(), "UPDATE orders SET total = 0 WHERE id = 1234"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = green.Exec(context.Background(), "UPDATE orders SET total = 1851.00 WHERE id = 1234") })
		code, out, errs := verify(t, "--blue", blueDSN, "--green", greenDSN, "--tables", "orders", "--json", jsonPath)
		if code != exitFailed || !strings.Contains(out, "public.orders: changed (id=1234); total: 1851.00 -> 0.00") {
			t.Fatalf("exit %d\nstdout: %s\nstderr: %s", code, out, errs)
		}
	})

	t.Run("DSNs from the environment work", func(t *testing.T) {
		t.Setenv("CUTOVER_BLUE_DSN", blueDSN)
		t.Setenv("CUTOVER_GREEN_DSN", greenDSN)
		if code, out, errs := verify(t); code != exitOK {
			t.Fatalf("exit %d\nstdout: %s\nstderr: %s", code, out, errs)
		}
	})

	t.Run("an unreachable side exits 2 without the password", func(t *testing.T) {
		dead := "postgres://postgres:" + password + "@127.0.0.1:1/cutover?sslmode=disable&connect_timeout=2"
		code, out, errs := verify(t, "--blue", blueDSN, "--green", dead)
		if code != exitError || !strings.Contains(errs, "green") {
			t.Fatalf("exit %d\nstdout: %s\nstderr: %s", code, out, errs)
		}
	})

	t.Run("a table without a primary key exits 0 when equal and 1 naming a changed row", func(t *testing.T) {
		for _, pg := range []*integration.Postgres{blue, green} {
			if err := pg.Exec(context.Background(), `CREATE TABLE events (at timestamptz, what text);
				ALTER TABLE events REPLICA IDENTITY FULL;
				INSERT INTO events SELECT '2025-01-01 00:00:00+00'::timestamptz + g * interval '1 hour', 'event ' || g FROM generate_series(1, 500) g;
				INSERT INTO events VALUES (NULL, 'twice'), (NULL, 'twice')`); err != nil {
				t.Fatal(err)
			}
		}
		t.Cleanup(func() {
			for _, pg := range []*integration.Postgres{blue, green} {
				_ = pg.Exec(context.Background(), "DROP TABLE events")
			}
		})
		code, out, errs := verify(t, "--blue", blueDSN, "--green", greenDSN)
		if code != exitOK || !strings.HasPrefix(out, "equal: 2 tables, 2502 rows") {
			t.Fatalf("exit %d\nstdout: %s\nstderr: %s", code, out, errs)
		}
		if err := green.Exec(context.Background(), `UPDATE events SET what = 'changed' WHERE what = 'event 42';
			DELETE FROM events WHERE ctid = (SELECT ctid FROM events WHERE what = 'twice' LIMIT 1)`); err != nil {
			t.Fatal(err)
		}
		code, out, errs = verify(t, "--blue", blueDSN, "--green", greenDSN, "--tables", "events", "--json", jsonPath)
		if code != exitFailed || !strings.Contains(out, "public.events: changed (at=2025-01-02 18:00:00+00); what: event 42 -> changed") ||
			!strings.Contains(out, "public.events: missing on green (at=NULL, what=twice); copies: 2 on blue, 1 on green") {
			t.Fatalf("exit %d\nstdout: %s\nstderr: %s", code, out, errs)
		}
		f, err := os.Open(jsonPath)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		rep, err := consistency.ReadReport(f)
		if err != nil || !rep.Tables[0].KeyLess || rep.Tables[0].DifferenceCount != 2 {
			t.Fatalf("report %+v, err %v", rep.Tables[0], err)
		}
	})

	t.Run("missing DSNs exit 2", func(t *testing.T) {
		t.Setenv("CUTOVER_BLUE_DSN", "")
		t.Setenv("CUTOVER_GREEN_DSN", "")
		if code, _, _ := verify(t, "--blue", blueDSN); code != exitError {
			t.Fatalf("exit %d", code)
		}
	})
}

func TestReportCommandRendersHTMLFromJSON(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "r.json")
	rep := &consistency.Report{Version: consistency.ReportVersion, Pass: consistency.PassFull, Verdict: consistency.Different,
		Tables: []*consistency.TableInfo{{Name: "public.t", DifferenceCount: 1, Differences: []consistency.Difference{
			{Kind: consistency.MissingOnGreen, Key: []consistency.NamedValue{{Column: "id", Value: "7"}}},
		}}}}
	var buf bytes.Buffer
	if err := rep.WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(in, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "r.html")
	var stdout, stderr bytes.Buffer
	if code := run([]string{"report", "--json", in, "--html", out}, &stdout, &stderr); code != exitOK {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	html, err := os.ReadFile(out)
	if err != nil || !strings.Contains(string(html), "missing on green") || !strings.Contains(string(html), "id=7") {
		t.Fatalf("html %q, err %v", html, err)
	}

	bad := filepath.Join(dir, "bad.json")
	if err := os.WriteFile(bad, []byte("{}"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code := run([]string{"report", "--json", bad, "--html", out}, &stdout, &stderr); code != exitError {
		t.Fatalf("unreadable report: exit %d", code)
	}
}

func TestReportFilesAreWrittenForTheUserOnly(t *testing.T) {
	path := filepath.Join(t.TempDir(), "new-folder", "report.html")
	if err := writeFileAtomic(path, func(w io.Writer) error { _, err := io.WriteString(w, "<p>"); return err }); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("report: mode %v (%v), want 0600", st.Mode().Perm(), err)
	}
	if st, err := os.Stat(filepath.Dir(path)); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("report folder: mode %v (%v), want 0700", st.Mode().Perm(), err)
	}
}
