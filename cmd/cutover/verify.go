package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/cutover/cutover/consistency"
	cpostgres "github.com/cutover/cutover/consistency/postgres"
)

type verifyFlags struct {
	blue, green      string
	tables           []string
	jsonOut, htmlOut string
	chunkTime        time.Duration
	parallel         int
	maxRowsPerSecond int
	progress         string
	// A pair of a config: its DSNs and its scope (verifyscope.go).
	config, plan, pair string
}

func newVerifyCmd(g *globals) *cobra.Command {
	var f verifyFlags
	cmd := &cobra.Command{
		Use:   "verify --blue DSN --green DSN",
		Short: "Compare the rows of blue and green, chunk by chunk, and report every difference",
		Long: `Compare every row of blue with green (PostgreSQL 14 or later on both sides).
Each table is cut into chunks by primary key; each chunk is hashed inside both
databases at once, chunks that differ are bisected down to rows, and each row
difference is reported: missing on green, extra on green, changed (which
columns, both values) or key changed. A table without a primary key is
compared as a multiset of rows (buckets of row hashes, bisected by longer
hash prefixes): a differing row is named by its values, with its number of
copies on each side.

Both sides should be quiet (no writes) for an exact answer: this command
needs no cluster and no replication. DSNs may also come from the environment
(CUTOVER_BLUE_DSN, CUTOVER_GREEN_DSN), which keeps passwords out of the
process list; passwords never appear in output or reports.

Exit status: 0 equal, 1 different, 2 error (including rows that could not
be compared).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runVerify(cmd, g, f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.blue, "blue", "", "blue (source) DSN; default $CUTOVER_BLUE_DSN")
	fl.StringVar(&f.green, "green", "", "green (target) DSN; default $CUTOVER_GREEN_DSN")
	fl.StringSliceVar(&f.tables, "tables", nil, "tables to compare (schema.table or table, comma-separated); default every user table")
	fl.StringVar(&f.jsonOut, "json", "", "write the JSON report to `FILE`")
	fl.StringVar(&f.htmlOut, "html", "", "write the HTML report to `FILE`")
	fl.DurationVar(&f.chunkTime, "chunk-time", consistency.DefaultChunkTime, "target time to hash one chunk; the chunk size adapts")
	fl.IntVar(&f.parallel, "parallel", consistency.DefaultParallel, "chunks compared at once (one connection per side each)")
	fl.IntVar(&f.maxRowsPerSecond, "max-rows-per-second", 0, "read at most this many rows per second on blue (0: no limit)")
	fl.StringVar(&f.progress, "progress", "auto", "progress bar on stderr: auto (when a terminal), always or never")
	fl.StringVar(&f.config, "config", "", "take the DSNs and the tables (the pair's scope) from this config's pair (--pair, and --plan when it has several)")
	fl.StringVar(&f.plan, "plan", "", "the plan of --pair")
	fl.StringVar(&f.pair, "pair", "", "the pair of --config")
	return cmd
}

func runVerify(cmd *cobra.Command, g *globals, f verifyFlags) error {
	if err := f.fromConfig(cmd.Context(), g); err != nil {
		return err
	}
	if f.blue == "" {
		f.blue = os.Getenv("CUTOVER_BLUE_DSN")
	}
	if f.green == "" {
		f.green = os.Getenv("CUTOVER_GREEN_DSN")
	}
	if f.blue == "" || f.green == "" {
		return withCode(exitError, errors.New("verify: give both --blue and --green (or CUTOVER_BLUE_DSN and CUTOVER_GREEN_DSN)"))
	}
	for _, dsn := range []string{f.blue, f.green} {
		if cfg, err := pgx.ParseConfig(dsn); err == nil && cfg.Password != "" {
			g.redactor.Add(cfg.Password)
		}
	}
	switch f.progress {
	case "auto", "always", "never":
	default:
		return withCode(exitError, fmt.Errorf("verify: --progress %q: use auto, always or never", f.progress))
	}
	if f.parallel < 1 {
		return withCode(exitError, errors.New("verify: --parallel must be at least 1"))
	}
	stderr := cmd.ErrOrStderr()
	log, err := g.logger(stderr)
	if err != nil {
		return withCode(exitError, err)
	}
	defer func() { _ = log.Sync() }()

	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()

	blue, err := cpostgres.Open(ctx, f.blue, f.parallel+2)
	if err != nil {
		return withCode(exitError, fmt.Errorf("verify: blue: %w", err))
	}
	defer blue.Close()
	green, err := cpostgres.Open(ctx, f.green, f.parallel+2)
	if err != nil {
		return withCode(exitError, fmt.Errorf("verify: green: %w", err))
	}
	defer green.Close()

	opts := consistency.Options{
		BlueDSN:          f.blue,
		GreenDSN:         f.green,
		ChunkTime:        f.chunkTime,
		Parallel:         f.parallel,
		MaxRowsPerSecond: f.maxRowsPerSecond,
		Logger:           log,
	}
	var bar *progressbar.ProgressBar
	if f.progress == "always" || (f.progress == "auto" && isTerminal(stderr)) {
		bar = progressbar.NewOptions64(-1,
			progressbar.OptionSetWriter(stderr),
			progressbar.OptionSetDescription("verify"),
			progressbar.OptionSetItsString("rows"),
			progressbar.OptionShowIts(),
			progressbar.OptionShowCount(),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionThrottle(200*time.Millisecond),
			progressbar.OptionClearOnFinish(),
		)
		opts.OnProgress = func(p consistency.Progress) {
			if p.RowsTotal > 0 {
				bar.ChangeMax64(p.RowsTotal)
			}
			bar.Describe(fmt.Sprintf("verify %d/%d %s", p.TablesDone, p.TablesTotal, p.Table))
			_ = bar.Set64(p.Rows)
		}
	}
	v := consistency.NewVerifier(blue, green, opts)
	rep, err := v.Full(ctx, f.tables)
	if bar != nil {
		_ = bar.Finish()
	}
	if rep == nil {
		return withCode(exitError, fmt.Errorf("verify: %w", err))
	}
	if werr := writeReports(rep, f.jsonOut, f.htmlOut); werr != nil {
		return withCode(exitError, werr)
	}
	printSummary(cmd.OutOrStdout(), rep)
	if err != nil {
		return withCode(exitError, fmt.Errorf("verify: %w", err))
	}
	switch rep.Verdict {
	case consistency.Equal:
		return nil
	case consistency.Different:
		return withCode(exitFailed, errors.New(""))
	default:
		return withCode(exitError, errors.New("verify: incomplete: some rows could not be compared (see above)"))
	}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// writeReports writes the JSON and HTML reports, each through a temporary
// file renamed into place, so that a reader never sees half a report.
func writeReports(rep *consistency.Report, jsonPath, htmlPath string) error {
	if jsonPath != "" {
		if err := writeFileAtomic(jsonPath, rep.WriteJSON); err != nil {
			return fmt.Errorf("json report: %w", err)
		}
	}
	if htmlPath != "" {
		if err := writeFileAtomic(htmlPath, rep.WriteHTML); err != nil {
			return fmt.Errorf("html report: %w", err)
		}
	}
	return nil
}

func writeFileAtomic(path string, write func(io.Writer) error) error {
	if path == "-" {
		return write(os.Stdout)
	}
	// A missing folder is made for the user alone; an existing one is the
	// user's choice and left as it is.
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // no-op once renamed
	if err := write(tmp); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	// Reports name tables and row keys: readable by the user only.
	if err := os.Chmod(tmp.Name(), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// printSummary tells a person what was found.
func printSummary(w io.Writer, rep *consistency.Report) {
	t := rep.Totals
	fmt.Fprintf(w, "%s: %d tables, %d rows on blue, %d on green, %d chunks, %d differences, %s\n",
		rep.Verdict, t.Tables, t.RowsBlue, t.RowsGreen, t.Chunks, t.Differences,
		time.Duration(rep.DurationSeconds*float64(time.Second)).Round(time.Millisecond))
	for _, e := range rep.Errors {
		fmt.Fprintf(w, "  error: %s\n", e)
	}
	for _, tab := range rep.Tables {
		for _, s := range tab.Schema {
			fmt.Fprintf(w, "  %s: %s\n", tab.Name, s)
		}
		if tab.Error != "" {
			fmt.Fprintf(w, "  %s: error: %s\n", tab.Name, tab.Error)
		}
		const shown = 10
		for i, d := range tab.Differences {
			if i == shown {
				fmt.Fprintf(w, "  %s: ... %d more (see the reports)\n", tab.Name, tab.DifferenceCount-shown)
				break
			}
			fmt.Fprintf(w, "  %s: %s %s", tab.Name, strings.ReplaceAll(string(d.Kind), "_", " "), keyText(d.Key))
			if d.Kind == consistency.KeyChanged {
				fmt.Fprintf(w, " -> %s", keyText(d.GreenKey))
			}
			if d.Kind == consistency.Changed {
				for _, c := range d.Columns {
					fmt.Fprintf(w, "; %s: %s -> %s", c.Column, c.Blue, c.Green)
				}
			}
			if d.Copies != nil {
				fmt.Fprintf(w, "; copies: %s", d.Copies)
			}
			fmt.Fprintln(w)
		}
	}
}

func keyText(k []consistency.NamedValue) string {
	parts := make([]string, len(k))
	for i, v := range k {
		parts[i] = v.Column + "=" + v.Value
	}
	return "(" + strings.Join(parts, ", ") + ")"
}
