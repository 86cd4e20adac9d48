package config

import (
	"fmt"
	"net/url"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// keepRefs files the templates the walker saw under the plans they belong
// to, keyed relative to the plan.
func (c *Config) keepRefs(refs map[string]string) {
	for key, raw := range refs {
		rest, ok := strings.CutPrefix(key, "plans[")
		if !ok {
			continue
		}
		num, path, ok := strings.Cut(rest, "].")
		i, err := strconv.Atoi(num)
		if !ok || err != nil || i < 0 || i >= len(c.Plans) {
			continue
		}
		if c.Plans[i].Refs == nil {
			c.Plans[i].Refs = Refs{}
		}
		c.Plans[i].Refs[path] = raw
	}
}

// RefNames returns the variable names the ${NAME} references of text use,
// sorted, each once.
func RefNames(text string) []string {
	seen := map[string]bool{}
	for _, m := range envRef.FindAllStringSubmatch(text, -1) {
		if m[1] != "" {
			seen[m[1]] = true
		}
	}
	out := make([]string, 0, len(seen))
	for n := range seen {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// EnvNames returns every variable the plan's references use, sorted.
func (p Plan) EnvNames() []string {
	var all strings.Builder
	for _, raw := range p.Refs {
		all.WriteString(raw)
		all.WriteByte(' ')
	}
	return RefNames(all.String())
}

// MissingEnv returns the variables the plan needs that getenv does not
// know (or knows as empty) and that have no default.
func (p Plan) MissingEnv(getenv func(string) (string, bool)) []string {
	var out []string
	for _, raw := range p.Refs {
		if _, err := expandEnv(raw, getenv); err != nil {
			for _, m := range envRef.FindAllStringSubmatch(raw, -1) {
				if m[1] == "" || m[2] != "" {
					continue
				}
				if v, ok := getenv(m[1]); !ok || v == "" {
					out = append(out, m[1])
				}
			}
		}
	}
	sort.Strings(out)
	return slicesCompact(out)
}

func slicesCompact(s []string) []string {
	out := s[:0]
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}

// MissingEnvError says which variables an agent lacks to act on a plan.
type MissingEnvError struct {
	Plan  string
	Names []string
}

func (e *MissingEnvError) Error() string {
	return fmt.Sprintf("plan %s needs %s", e.Plan, missingText(e.Names, "environment variable %s, not set on this agent"))
}

// missingText says what the reference names lack: the variables not set,
// and each secret file with what is wrong with it.
func missingText(names []string, varsFormat string) string {
	var vars, files []string
	for _, n := range names {
		if _, ok := SecretFilePath(n); ok {
			files = append(files, DescribeMissing(n))
		} else {
			vars = append(vars, n)
		}
	}
	var parts []string
	if len(vars) > 0 {
		parts = append(parts, fmt.Sprintf(varsFormat, strings.Join(vars, ", ")))
	}
	parts = append(parts, files...)
	return strings.Join(parts, "; ")
}

// Sealed returns a copy of the plan holding, in every field written with a
// ${NAME} reference, the reference instead of its value: the form the
// replicated state keeps, so that no value taken from the environment is
// ever written to the Raft log or a snapshot.
func (p Plan) Sealed() (Plan, error) {
	out := clonePlan(p)
	for path, raw := range p.Refs {
		if err := setPath(&out, path, raw); err != nil {
			return Plan{}, err
		}
	}
	return out, nil
}

// Resolve returns a copy of a sealed plan with every reference replaced by
// its value from getenv. A variable getenv lacks gives a
// *MissingEnvError naming them all.
func (p Plan) Resolve(getenv func(string) (string, bool)) (Plan, error) {
	if missing := p.MissingEnv(getenv); len(missing) > 0 {
		return Plan{}, &MissingEnvError{Plan: p.Name, Names: missing}
	}
	out := clonePlan(p)
	for path, raw := range p.Refs {
		v, err := expandEnv(raw, getenv)
		if err != nil {
			return Plan{}, fmt.Errorf("plan %s: %s: %w", p.Name, path, err)
		}
		if err := setPath(&out, path, v); err != nil {
			return Plan{}, err
		}
	}
	return out, nil
}

// Secrets lists the secret values of a resolved plan, for redaction: DSN
// passwords, header values, and the values of the variables referenced by
// URLs, headers and command arguments.
func (p Plan) Secrets(getenv func(string) (string, bool)) []string {
	var out []string
	add := func(s string) {
		if s != "" {
			out = append(out, s)
		}
	}
	for _, pair := range p.Pairs {
		add(dsnPassword(pair.Engine, pair.Blue.DSN.Reveal()))
		add(dsnPassword(pair.Engine, pair.Green.DSN.Reveal()))
	}
	for _, t := range p.Switch.Targets {
		add(dsnPassword(targetEngine(t), t.DSN.Reveal()))
		for _, h := range t.Headers {
			add(h.Reveal())
		}
		if u, err := url.Parse(t.URL); err == nil {
			for _, vs := range u.Query() {
				for _, v := range vs {
					if secretParam(v) {
						add(v)
					}
				}
			}
			if pw, ok := u.User.Password(); ok {
				add(pw)
			}
		}
	}
	for _, c := range p.Rollback.Checks {
		add(dsnPassword(Postgres, c.DSN.Reveal()))
	}
	if getenv != nil {
		for path, raw := range p.Refs {
			if strings.HasSuffix(path, ".dsn") {
				continue // its password is listed above; the rest is not secret
			}
			for _, name := range RefNames(raw) {
				if v, ok := getenv(name); ok {
					add(v)
				}
			}
		}
	}
	return out
}

// secretParam keeps short, common query values (true, json, 1) out of the
// redactor, which would otherwise mask them everywhere.
func secretParam(v string) bool { return len(v) >= 8 }

// secretQueryKey matches query parameters that usually carry credentials.
var secretQueryKey = regexp.MustCompile(`(?i)token|secret|key|pass|pwd|auth|sig|credential`)

// authScheme matches the scheme word of an Authorization header ("Bearer
// ${TOKEN}" writes no secret out).
var authScheme = regexp.MustCompile(`(?i)^(bearer|basic|token|digest|apikey)$`)

// LiteralSecrets lists the fields of the plan that hold a secret written
// out rather than through a ${NAME} reference: DSN passwords, header
// values, URL passwords and credential-like query values. Such a plan
// would put the secret in the replicated state.
func (p Plan) LiteralSecrets() []string {
	var out []string
	// literal strips the references from a field's text, leaving what was
	// written out; a field without references is all literal.
	literal := func(path, v string) string {
		if raw, ok := p.Refs[path]; ok {
			return envRef.ReplaceAllString(raw, "")
		}
		return v
	}
	dsn := func(path string, e Engine, v DSN) {
		if v != "" && dsnPassword(e, literal(path, v.Reveal())) != "" {
			out = append(out, path)
		}
	}
	urlSecrets := func(path, v string) {
		u, err := url.Parse(literal(path, v))
		if err != nil {
			return
		}
		if pw, ok := u.User.Password(); ok && pw != "" {
			out = append(out, path)
			return
		}
		for k, vs := range u.Query() {
			if secretQueryKey.MatchString(k) && strings.Join(vs, "") != "" {
				out = append(out, path)
				return
			}
		}
	}
	for i, pair := range p.Pairs {
		dsn(fmt.Sprintf("pairs[%d].blue.dsn", i), pair.Engine, pair.Blue.DSN)
		dsn(fmt.Sprintf("pairs[%d].green.dsn", i), pair.Engine, pair.Green.DSN)
	}
	for i, t := range p.Switch.Targets {
		key := fmt.Sprintf("switch.targets[%d]", i)
		dsn(key+".dsn", targetEngine(t), t.DSN)
		urlSecrets(key+".url", t.URL)
		names := make([]string, 0, len(t.Headers))
		for h := range t.Headers {
			names = append(names, h)
		}
		sort.Strings(names)
		for _, h := range names {
			path := key + ".headers." + h
			for _, word := range strings.Fields(literal(path, t.Headers[h].Reveal())) {
				if !authScheme.MatchString(word) {
					out = append(out, path)
					break
				}
			}
		}
	}
	for i, c := range p.Rollback.Checks {
		key := fmt.Sprintf("rollback.checks[%d]", i)
		dsn(key+".dsn", Postgres, c.DSN)
		urlSecrets(key+".url", c.URL)
	}
	return out
}

// setPath sets the text field at path ("a.b[2].c", map keys as the last
// segment) of the plan to v.
func setPath(p *Plan, path string, v string) error {
	cur := reflect.ValueOf(p).Elem()
	rest := path
	for rest != "" {
		switch cur.Kind() {
		case reflect.Map:
			// A map key is the rest of the path: header names may hold dots.
			if cur.IsNil() {
				cur.Set(reflect.MakeMap(cur.Type()))
			}
			cur.SetMapIndex(reflect.ValueOf(rest).Convert(cur.Type().Key()), reflect.ValueOf(v).Convert(cur.Type().Elem()))
			return nil
		case reflect.Struct:
			seg := rest
			if i := strings.IndexAny(rest, ".["); i >= 0 {
				seg, rest = rest[:i], rest[i:]
			} else {
				rest = ""
			}
			rest = strings.TrimPrefix(rest, ".")
			f, ok := yamlFields(cur.Type())[seg]
			if !ok {
				return fmt.Errorf("plan key %s: no field %q", path, seg)
			}
			cur = cur.FieldByIndex(f.Index)
		case reflect.Slice:
			if !strings.HasPrefix(rest, "[") {
				return fmt.Errorf("plan key %s: expected an index", path)
			}
			num, after, ok := strings.Cut(rest[1:], "]")
			i, err := strconv.Atoi(num)
			if !ok || err != nil || i < 0 || i >= cur.Len() {
				return fmt.Errorf("plan key %s: bad index", path)
			}
			cur, rest = cur.Index(i), strings.TrimPrefix(after, ".")
		case reflect.Pointer:
			if cur.IsNil() {
				return fmt.Errorf("plan key %s: nil", path)
			}
			cur = cur.Elem()
		default:
			return fmt.Errorf("plan key %s: not a text field", path)
		}
	}
	if cur.Kind() != reflect.String {
		return fmt.Errorf("plan key %s: not a text field", path)
	}
	cur.SetString(v)
	return nil
}

// clonePlan copies p deeply, so that setting fields of the copy leaves p
// (and the configuration it came from) alone.
func clonePlan(p Plan) Plan {
	var out Plan
	deepCopy(reflect.ValueOf(&out).Elem(), reflect.ValueOf(p))
	return out
}

func deepCopy(dst, src reflect.Value) {
	switch src.Kind() {
	case reflect.Struct:
		for i := 0; i < src.NumField(); i++ {
			if dst.Field(i).CanSet() {
				deepCopy(dst.Field(i), src.Field(i))
			}
		}
	case reflect.Slice:
		if src.IsNil() {
			return
		}
		s := reflect.MakeSlice(src.Type(), src.Len(), src.Len())
		for i := 0; i < src.Len(); i++ {
			deepCopy(s.Index(i), src.Index(i))
		}
		dst.Set(s)
	case reflect.Map:
		if src.IsNil() {
			return
		}
		m := reflect.MakeMapWithSize(src.Type(), src.Len())
		it := src.MapRange()
		for it.Next() {
			v := reflect.New(src.Type().Elem()).Elem()
			deepCopy(v, it.Value())
			m.SetMapIndex(it.Key(), v)
		}
		dst.Set(m)
	case reflect.Pointer:
		if src.IsNil() {
			return
		}
		v := reflect.New(src.Type().Elem())
		deepCopy(v.Elem(), src.Elem())
		dst.Set(v)
	default:
		dst.Set(src)
	}
}

// targetEngine is the kind of DSN a flip target holds: a PgBouncer admin
// console speaks the PostgreSQL protocol.
func targetEngine(t Target) Engine {
	if t.Type == TargetPgBouncer {
		return Postgres
	}
	return Redis
}
