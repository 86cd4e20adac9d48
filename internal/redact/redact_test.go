package redact

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

func TestTextMasksPasswordsInEveryDSNShape(t *testing.T) {
	tests := []struct {
		name, in, want string
	}{
		{"postgres url", "postgres://app:s3cret@db:5432/orders?sslmode=disable", "postgres://app:[redacted]@db:5432/orders?sslmode=disable"},
		{"postgres url without password", "postgres://app@db/orders", "postgres://app@db/orders"},
		{"postgres url with password param", "postgres://db/orders?user=app&password=s3cret&sslmode=require", "postgres://db/orders?user=app&password=[redacted]&sslmode=require"},
		{"libpq key value", "host=db user=app password=s3cret dbname=orders", "host=db user=app password=[redacted] dbname=orders"},
		{"libpq quoted", "host=db password='se cret' dbname=x", "host=db password=[redacted] dbname=x"},
		{"mysql driver", "app:s3cret@tcp(db:3306)/orders", "app:[redacted]@tcp(db:3306)/orders"},
		{"redis url", "redis://:s3cret@cache:6379/0", "redis://:[redacted]@cache:6379/0"},
		{"inside a sentence", `connect "postgres://u:p4ss@h/d": refused`, `connect "postgres://u:[redacted]@h/d": refused`},
		{"no dsn", "plain text, 5 = 5", "plain text, 5 = 5"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Text(tt.in); got != tt.want {
				t.Errorf("Text(%q) = %q, want %q", tt.in, got, tt.want)
			}
		})
	}
}

func TestRedactorMasksRegisteredSecretsAnywhere(t *testing.T) {
	r := NewRedactor("tok-operator-123", "p@ss/word")
	got := r.Scrub("auth failed for tok-operator-123; dsn postgres://a:p%40ss%2Fword@h/d")
	if strings.Contains(got, "tok-operator-123") || strings.Contains(got, "p%40ss") {
		t.Fatalf("secret leaked: %q", got)
	}
	if want := "auth failed for [redacted]; dsn postgres://a:[redacted]@h/d"; got != want {
		t.Errorf("Scrub = %q, want %q", got, want)
	}
}

func TestSecretNeverPrintsItself(t *testing.T) {
	s := Secret("hunter22")
	for _, out := range []string{
		s.String(), fmt.Sprint(s), fmt.Sprintf("%v %s %#v", s, s, s),
	} {
		if strings.Contains(out, "hunter22") {
			t.Errorf("secret printed: %q", out)
		}
	}
	b, _ := json.Marshal(struct{ T Secret }{s})
	if strings.Contains(string(b), "hunter22") {
		t.Errorf("secret in JSON: %s", b)
	}
	if s.Reveal() != "hunter22" {
		t.Errorf("Reveal = %q", s.Reveal())
	}
}

func TestURLMasksUserInfoPasswordAndEveryQueryValue(t *testing.T) {
	got := URL("https://hook:pw-1@example.com/flip?token=tk-2&env=prod")
	if strings.Contains(got, "pw-1") || strings.Contains(got, "tk-2") || strings.Contains(got, "prod") ||
		!strings.Contains(got, "hook:"+Mask+"@example.com/flip") || !strings.Contains(got, "token="+Mask) {
		t.Fatalf("URL = %s", got)
	}
}

func TestTextMasksCredentialQueryValuesAndRegisteredSecrets(t *testing.T) {
	if got := Text("POST https://h/flip?env=prod&api_key=k-123 answered 500"); got != "POST https://h/flip?env=prod&api_key="+Mask+" answered 500" {
		t.Fatalf("Text = %s", got)
	}
	Register("registered-value-77")
	if got := Text("deploying with registered-value-77 now"); got != "deploying with "+Mask+" now" {
		t.Fatalf("Text = %s", got)
	}
}
