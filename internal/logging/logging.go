// Package logging builds cutover's zap loggers. Every line goes through a
// redactor, so that a password or token that reaches a log call by accident
// (inside an error from a driver, say) is masked before it is written.
package logging

import (
	"fmt"
	"io"
	"os"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/cutover/cutover/internal/redact"
)

// New returns a logger writing to w (stderr when nil) in format "console"
// (for people) or "json" (for machines) at level debug, info, warn or error.
// A nil redactor still masks DSN passwords by shape.
func New(format, level string, r *redact.Redactor, w io.Writer) (*zap.Logger, error) {
	log, _, err := NewLeveled(format, level, r, w)
	return log, err
}

// ParseLevel reads a level name (debug, info, warn, error).
func ParseLevel(level string) (zapcore.Level, error) {
	var lvl zapcore.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return lvl, fmt.Errorf("log level %q: use debug, info, warn or error", level)
	}
	return lvl, nil
}

// NewLeveled is New with a level that can be changed while the logger
// runs (a daemon's reload).
func NewLeveled(format, level string, r *redact.Redactor, w io.Writer) (*zap.Logger, zap.AtomicLevel, error) {
	parsed, err := ParseLevel(level)
	if err != nil {
		return nil, zap.AtomicLevel{}, err
	}
	lvl := zap.NewAtomicLevelAt(parsed)
	if w == nil {
		w = os.Stderr
	}
	var enc zapcore.Encoder
	switch format {
	case "json":
		cfg := zap.NewProductionEncoderConfig()
		cfg.EncodeTime = zapcore.ISO8601TimeEncoder
		enc = zapcore.NewJSONEncoder(cfg)
	case "console", "":
		cfg := zap.NewDevelopmentEncoderConfig()
		cfg.EncodeTime = zapcore.TimeEncoderOfLayout("15:04:05.000")
		cfg.EncodeCaller = nil
		enc = zapcore.NewConsoleEncoder(cfg)
	default:
		return nil, zap.AtomicLevel{}, fmt.Errorf("log format %q: use console or json", format)
	}
	core := zapcore.NewCore(enc, zapcore.Lock(zapcore.AddSync(&scrubWriter{w: w, r: r})), lvl)
	return zap.New(core), lvl, nil
}

// scrubWriter masks secrets in each encoded entry. Scrubbing the encoded
// bytes, rather than fields one by one, also covers error strings, nested
// objects and anything a field's marshaler produces.
type scrubWriter struct {
	w io.Writer
	r *redact.Redactor
}

func (s *scrubWriter) Write(p []byte) (int, error) {
	clean := s.r.Scrub(string(p))
	if _, err := io.WriteString(s.w, clean); err != nil {
		return 0, err
	}
	return len(p), nil
}
