// Package redact keeps secrets out of logs, errors and reports.
//
// Two mechanisms work together. Values known to be secret at load time (API
// tokens, passwords inside DSNs) are registered with a Redactor, which scrubs
// them from any text. DSN-shaped strings are also scrubbed by shape, so that a
// DSN that was never registered (one typed on a command line, say) still loses
// its password.
package redact

import (
	"net/url"
	"regexp"
	"sort"
	"strings"
	"sync"
)

// Mask replaces every secret in output.
const Mask = "[redacted]"

// Secret is a string that never prints itself. Use Reveal to get the value.
type Secret string

// Reveal returns the secret's value. Call it only where the value is sent to
// the system that needs it.
func (s Secret) Reveal() string { return string(s) }

// String implements fmt.Stringer.
func (s Secret) String() string {
	if s == "" {
		return ""
	}
	return Mask
}

// GoString implements fmt.GoStringer, so %#v does not leak either.
func (s Secret) GoString() string { return `"` + s.String() + `"` }

// MarshalText keeps the secret out of JSON and YAML renderings.
func (s Secret) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// Redactor scrubs registered secrets and DSN passwords from text. It is safe
// for concurrent use.
type Redactor struct {
	mu      sync.RWMutex
	secrets []string // longest first, so that a secret containing another is masked whole
}

// NewRedactor returns a Redactor that knows the given secrets.
func NewRedactor(secrets ...string) *Redactor {
	r := &Redactor{}
	r.Add(secrets...)
	return r
}

// minSecretLen stops very short values (say a one-letter password) from
// masking every occurrence of that letter; such values are still masked by
// shape inside DSNs.
const minSecretLen = 4

// Add registers more secrets.
func (r *Redactor) Add(secrets ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range secrets {
		if len(s) < minSecretLen {
			continue
		}
		dup := false
		for _, have := range r.secrets {
			if have == s {
				dup = true
				break
			}
		}
		if !dup {
			r.secrets = append(r.secrets, s)
			// The URL-escaped form appears inside DSNs.
			if esc := url.QueryEscape(s); esc != s {
				r.secrets = append(r.secrets, esc)
			}
		}
	}
	sort.Slice(r.secrets, func(i, j int) bool { return len(r.secrets[i]) > len(r.secrets[j]) })
}

// Scrub returns text with every registered secret and every DSN password
// replaced by Mask. A nil Redactor scrubs by shape only.
func (r *Redactor) Scrub(text string) string {
	if r != nil {
		r.mu.RLock()
		for _, s := range r.secrets {
			if strings.Contains(text, s) {
				text = strings.ReplaceAll(text, s, Mask)
			}
		}
		r.mu.RUnlock()
	}
	return Text(text)
}

var (
	// scheme://user:password@host
	urlPassword = regexp.MustCompile(`([a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)([^@\s]*)(@)`)
	// password=secret or password='sec ret' in libpq key/value strings, and
	// password= query parameters in URLs.
	kvPassword = regexp.MustCompile(`(?i)((?:^|[\s?&;])(?:password|passwd|pwd|sslpassword)\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&;]*)`)
	// go-sql-driver style: user:password@tcp(host:port)/db
	mysqlPassword = regexp.MustCompile(`((?:^|[\s"'=])[^:@/\s"'=]+:)([^@\s]*)(@(?:tcp|unix)\()`)
)

// process holds the secrets registered with Register: values an agent
// resolved from its environment when it acted on a plan.
var process = &Redactor{}

// Register teaches Text (and so every Redactor) more secrets, process-wide:
// an agent calls it with the values it resolves from its environment, so
// that no error, log line or report shows them, whichever path printed them.
func Register(secrets ...string) { process.Add(secrets...) }

// secretQuery matches the value of a credential-like query parameter
// (token=, api_key=, sig=, ...) in a URL.
var secretQuery = regexp.MustCompile(`(?i)([?&][a-z0-9_.-]*(?:token|secret|key|pass|pwd|auth|sig|credential)[a-z0-9_.-]*=)([^&#\s"']*)`)

// Text scrubs registered secrets and passwords out of DSN-shaped substrings
// of text: URLs with user info or credential-like query values, key=value
// connection strings and MySQL driver DSNs.
func Text(text string) string {
	process.mu.RLock()
	for _, s := range process.secrets {
		if strings.Contains(text, s) {
			text = strings.ReplaceAll(text, s, Mask)
		}
	}
	process.mu.RUnlock()
	if !strings.ContainsAny(text, "@=") {
		return text
	}
	text = secretQuery.ReplaceAllString(text, "${1}"+Mask)
	text = urlPassword.ReplaceAllString(text, "${1}"+Mask+"${3}")
	text = mysqlPassword.ReplaceAllString(text, "${1}"+Mask+"${3}")
	text = kvPassword.ReplaceAllString(text, "${1}"+Mask)
	return text
}

// URL returns raw with its user-info password and every query value
// masked, for showing a configured URL (webhook, health check) to people.
func URL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return Text(raw)
	}
	if _, ok := u.User.Password(); ok {
		u.User = url.UserPassword(u.User.Username(), "xxxxx")
	}
	if u.RawQuery != "" {
		q := u.Query()
		for k := range q {
			q[k] = []string{"xxxxx"}
		}
		u.RawQuery = q.Encode()
	}
	return strings.ReplaceAll(u.String(), "xxxxx", Mask)
}

// DSN returns dsn with its password masked.
func DSN(dsn string) string { return Text(dsn) }
