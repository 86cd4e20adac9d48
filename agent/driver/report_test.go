package driver

import (
	"io"
	"os"
	"path/filepath"
	"testing"
)

type stubReport struct{}

func (stubReport) WriteJSON(w io.Writer) error { _, err := io.WriteString(w, "{}"); return err }
func (stubReport) WriteHTML(w io.Writer) error { _, err := io.WriteString(w, "<p>"); return err }

func TestReportsAreWrittenForTheAgentsUserOnly(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "reports")
	d := &Driver{opts: Options{ReportDir: dir}}
	path, err := d.writeReport("orders-verify", func(j, h string) error { return writeReportFiles(stubReport{}, j, h) })
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("report folder: mode %v (%v), want 0700", st.Mode().Perm(), err)
	}
	for _, p := range []string{path, filepath.Join(dir, "orders-verify.html")} {
		if st, err := os.Stat(p); err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v (%v), want 0600", p, st.Mode().Perm(), err)
		}
	}
}
