package target

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// Command runs a program (kubectl, consul, a haproxy socket script...)
// without a shell. The flip's facts arrive in its environment:
// CUTOVER_PLAN, CUTOVER_FROM, CUTOVER_TO, CUTOVER_EPOCH, CUTOVER_POSITIONS
// (JSON) and CUTOVER_REPORT. A non-zero exit fails the flip.
//
// The command does not inherit the agent's environment, which holds the
// agent's tokens and the secrets the plans reference: only the variables
// named in its allowlist (PATH by default) are passed on.
type Command struct {
	argv    []string
	timeout time.Duration
	allow   []string
}

// DefaultEnvAllow is what a command inherits when its allowlist is nil.
var DefaultEnvAllow = []string{"PATH"}

// NewCommand returns a command target that inherits the variables named in
// envAllow (DefaultEnvAllow when nil) from the agent's environment.
func NewCommand(argv []string, timeout time.Duration, envAllow []string) *Command {
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	if envAllow == nil {
		envAllow = DefaultEnvAllow
	}
	return &Command{argv: argv, timeout: timeout, allow: envAllow}
}

// Name implements Target.
func (c *Command) Name() string {
	if len(c.argv) == 0 {
		return "command"
	}
	return "command " + c.argv[0]
}

// maxOutput bounds what is kept of the command's output for the error.
const maxOutput = 2048

// Flip implements Target.
func (c *Command) Flip(ctx context.Context, f Flip) error {
	if len(c.argv) == 0 {
		return errors.New("command target: empty command")
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	positions, _ := json.Marshal(f.Positions)
	cmd := exec.CommandContext(ctx, c.argv[0], c.argv[1:]...)
	cmd.Env = append(c.inherited(),
		"CUTOVER_PLAN="+f.Plan,
		"CUTOVER_FROM="+f.From,
		"CUTOVER_TO="+f.To,
		"CUTOVER_EPOCH="+strconv.FormatUint(f.Epoch, 10),
		"CUTOVER_POSITIONS="+string(positions),
		"CUTOVER_REPORT="+f.Report,
	)
	var out bytes.Buffer
	cmd.Stdout = &limited{buf: &out, max: maxOutput}
	cmd.Stderr = cmd.Stdout
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	if err == nil {
		return nil
	}
	msg := strings.TrimSpace(out.String())
	if ctx.Err() == context.DeadlineExceeded {
		return fmt.Errorf("%s: timed out after %s: %s", c.Name(), c.timeout, msg)
	}
	return fmt.Errorf("%s: %v: %s", c.Name(), err, msg)
}

// inherited returns the allowed variables of the agent's environment
// (CUTOVER_* ones excepted: the flip sets those).
func (c *Command) inherited() []string {
	var env []string
	for _, name := range c.allow {
		if strings.HasPrefix(name, "CUTOVER_") {
			continue
		}
		if v, ok := os.LookupEnv(name); ok {
			env = append(env, name+"="+v)
		}
	}
	return env
}

// limited keeps the last max bytes written.
type limited struct {
	buf *bytes.Buffer
	max int
}

func (l *limited) Write(p []byte) (int, error) {
	l.buf.Write(p)
	if over := l.buf.Len() - l.max; over > 0 {
		l.buf.Next(over)
	}
	return len(p), nil
}
