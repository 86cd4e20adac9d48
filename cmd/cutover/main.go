// Command cutover is the database-aware cutover agent for blue-green
// deployments. See README.md for what each subcommand does.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/cutover/cutover/internal/logging"
	"github.com/cutover/cutover/internal/redact"
)

// Exit codes are part of the interface: scripts branch on them.
const (
	exitOK     = 0
	exitFailed = 1 // invalid, closed, different: the answer is "no"
	exitError  = 2 // could not find out: unreadable input, unreachable, crashed
)

// exitCodeError carries an exit code out of a command.
type exitCodeError struct {
	code int
	err  error
}

func (e *exitCodeError) Error() string { return e.err.Error() }
func (e *exitCodeError) Unwrap() error { return e.err }

// withCode makes err end the process with code.
func withCode(code int, err error) error { return &exitCodeError{code: code, err: err} }

// globals are the flags every command shares.
type globals struct {
	logFormat string
	logLevel  string
	redactor  *redact.Redactor
	// clients are the API clients the command made, by agent address:
	// the index they reached is kept for the next run (see indexstate.go).
	clients []addrClient
}

// logger builds the logger for a command, writing to w.
func (g *globals) logger(w io.Writer) (*zap.Logger, error) {
	return logging.New(g.logFormat, g.logLevel, g.redactor, w)
}

func newRootCmd(g *globals) *cobra.Command {
	root := &cobra.Command{
		Use:   "cutover",
		Short: "Database-aware cutover agent for blue-green deployments",
		Long: `cutover moves production traffic from a blue database to a green one without
losing a write: it replicates blue into green, measures lag, fences writes on
blue, proves that green has caught up, verifies row checksums, and only then
opens the gate that authorizes the traffic flip.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&g.logFormat, "log-format", "console", "log format: console or json")
	root.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	root.AddCommand(
		newVersionCmd(),
		newConfigCmd(g),
		newVerifyCmd(g), newReportCmd(g),
		newReplicateCmd(g), newCleanupCmd(g),
		newAgentCmd(g), newStatusCmd(g), newGateCmd(g), newPlanCmd(g), newMembersCmd(g),
		newStartCmd(g), newAbortCmd(g), newRollbackCmd(g), newCompleteCmd(g), newDemoCmd(g),
		newUnfenceCmd(g), newAuditCmd(g),
	)
	return root
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run executes the command line and returns the process exit code.
func run(args []string, stdout, stderr io.Writer) int {
	g := &globals{redactor: redact.NewRedactor()}
	root := newRootCmd(g)
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.Execute()
	g.keepIndexes()
	if err == nil {
		return exitOK
	}
	var ec *exitCodeError
	code := exitError
	if errors.As(err, &ec) {
		code = ec.code
	}
	if msg := err.Error(); msg != "" {
		fmt.Fprintln(stderr, "cutover: "+g.redactor.Scrub(msg))
	}
	return code
}
