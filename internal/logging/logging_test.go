package logging

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/cutover/cutover/internal/redact"
)

func TestLoggerNeverWritesSecrets(t *testing.T) {
	const token = "op-token-0123456789abcdef"
	const password = "blue-Pa55word!"
	for _, format := range []string{"console", "json"} {
		t.Run(format, func(t *testing.T) {
			var buf bytes.Buffer
			log, err := New(format, "debug", redact.NewRedactor(token, password), &buf)
			if err != nil {
				t.Fatal(err)
			}
			log.Info("connecting", zap.String("dsn", "postgres://app:"+password+"@db/orders"))
			log.Warn("auth failed for "+token, zap.Error(errors.New("dial postgres://x:"+password+"@h/d failed")))
			log.Debug("raw", zap.Any("cfg", map[string]string{"token": token, "other": "host=h password=unregistered dbname=x"}))
			out := buf.String()
			for _, secret := range []string{token, password, "unregistered"} {
				if strings.Contains(out, secret) {
					t.Errorf("log output contains %q:\n%s", secret, out)
				}
			}
			if got := strings.Count(out, redact.Mask); got < 5 {
				t.Errorf("expected at least 5 masks, got %d:\n%s", got, out)
			}
		})
	}
}

func TestNewRejectsUnknownFormatAndLevel(t *testing.T) {
	if _, err := New("xml", "info", nil, nil); err == nil || !strings.Contains(err.Error(), `"xml"`) {
		t.Errorf("format xml: err = %v", err)
	}
	if _, err := New("json", "loud", nil, nil); err == nil || !strings.Contains(err.Error(), `"loud"`) {
		t.Errorf("level loud: err = %v", err)
	}
}
