package agent

import (
	"bytes"
	"encoding/json"
	"sort"
	"strings"

	"github.com/hashicorp/go-hclog"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// hclogger adapts a zap logger for raft and raft-wal, which log through
// hclog. hclog writes JSON lines into zapWriter, which re-emits each as a
// structured zap entry, so every line still passes through the zap core
// (and its redaction).
func hclogger(l *zap.Logger, name string) hclog.Logger {
	level := hclog.Info
	if l.Core().Enabled(zapcore.DebugLevel) {
		level = hclog.Debug
	}
	return hclog.New(&hclog.LoggerOptions{
		Name:        name,
		Level:       level,
		Output:      &zapWriter{l: l},
		JSONFormat:  true,
		DisableTime: true,
	})
}

type zapWriter struct{ l *zap.Logger }

func (w *zapWriter) Write(p []byte) (int, error) {
	for _, line := range bytes.Split(bytes.TrimSpace(p), []byte("\n")) {
		var m map[string]any
		if err := json.Unmarshal(line, &m); err != nil {
			w.l.Info(string(line))
			continue
		}
		msg, _ := m["@message"].(string)
		lvl, _ := m["@level"].(string)
		mod, _ := m["@module"].(string)
		delete(m, "@message")
		delete(m, "@level")
		delete(m, "@module")
		delete(m, "@caller")
		delete(m, "@timestamp")
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		fields := make([]zap.Field, 0, len(keys)+1)
		if mod != "" {
			fields = append(fields, zap.String("module", mod))
		}
		for _, k := range keys {
			fields = append(fields, zap.Any(k, m[k]))
		}
		switch strings.ToLower(lvl) {
		case "trace", "debug":
			w.l.Debug(msg, fields...)
		case "warn":
			w.l.Warn(msg, fields...)
		case "error":
			w.l.Error(msg, fields...)
		default:
			w.l.Info(msg, fields...)
		}
	}
	return len(p), nil
}
