package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"

	"github.com/goccy/go-yaml"

	"github.com/cutover/cutover/internal/config"
)

// SealPlan encodes a plan specification for the replicated state. Fields
// written with ${NAME} references are sealed as the references (see
// config.Plan.Sealed): the values stay in each agent's environment and
// Plan.Spec resolves them when the agent acts.
//
// json.Marshal cannot do it: config.DSN and redact.Secret mask themselves in
// MarshalText (so that no rendering leaks them), and config.Duration and
// config.ByteSize render as "5s"/"1MiB", which encoding/json cannot read
// back. SealPlan walks the value and writes every field as its underlying
// kind instead, which json.Unmarshal reads back exactly (a test checks the
// round trip on a full plan).
//
// Secrets written out (not through references) would be sealed as they are
// and so land in the Raft log and snapshots: the API refuses such plans
// unless asked (CreatePlanRequest.AllowLiteralSecrets), and the status
// flags them (PlanInfo.Warnings).
func SealPlan(p config.Plan) (json.RawMessage, error) {
	sealed, err := p.Sealed()
	if err != nil {
		return nil, fmt.Errorf("seal plan %s: %w", p.Name, err)
	}
	out, err := json.Marshal(reveal(reflect.ValueOf(sealed)))
	if err != nil {
		return nil, fmt.Errorf("seal plan %s: %w", p.Name, err)
	}
	return out, nil
}

func openSpec(sealed json.RawMessage) (config.Plan, error) {
	var p config.Plan
	if len(sealed) == 0 {
		return p, errors.New("plan has no specification")
	}
	if err := json.Unmarshal(sealed, &p); err != nil {
		return p, fmt.Errorf("open plan spec: %w", err)
	}
	return p, nil
}

// reveal turns v into maps, slices and scalars of its underlying kinds,
// ignoring MarshalText/MarshalJSON methods, keyed by the json tags.
func reveal(v reflect.Value) any {
	switch v.Kind() {
	case reflect.Pointer, reflect.Interface:
		if v.IsNil() {
			return nil
		}
		return reveal(v.Elem())
	case reflect.Struct:
		m := map[string]any{}
		t := v.Type()
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			if !f.IsExported() {
				continue
			}
			name, opts, _ := strings.Cut(f.Tag.Get("json"), ",")
			if name == "-" {
				continue
			}
			if name == "" {
				name = f.Name
			}
			fv := v.Field(i)
			if (strings.Contains(opts, "omitempty") || strings.Contains(opts, "omitzero")) && fv.IsZero() {
				continue
			}
			m[name] = reveal(fv)
		}
		return m
	case reflect.Slice, reflect.Array:
		if v.Kind() == reflect.Slice && v.IsNil() {
			return nil
		}
		out := make([]any, v.Len())
		for i := range out {
			out[i] = reveal(v.Index(i))
		}
		return out
	case reflect.Map:
		if v.IsNil() {
			return nil
		}
		out := make(map[string]any, v.Len())
		it := v.MapRange()
		for it.Next() {
			out[it.Key().String()] = reveal(it.Value())
		}
		return out
	case reflect.String:
		return v.String()
	case reflect.Bool:
		return v.Bool()
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return v.Int()
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return v.Uint()
	case reflect.Float32, reflect.Float64:
		return v.Float()
	}
	return nil
}

// planNameRE is config's rule for plan names (they end up in replication
// slot names).
var planNameRE = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,31}$`)

// ParsePlanSpec validates a plan posted as JSON, written as in the
// configuration file's plans section (durations as "5s", sizes as "1MiB"),
// and returns it with defaults filled in. It runs the configuration's own
// validation, so a posted plan is held to the same rules as a configured
// one.
//
// Secrets go in as ${CUTOVER_NAME} references, resolved by getenv (the
// agent's environment) for validation and, later, by every agent from its
// own environment when it acts; the state keeps the references. Only
// CUTOVER_* variables may be named: the rest of the agent's environment is
// not the caller's to read (a webhook URL could carry it away). For the
// same reason a ${file:/path} reference must name a file under one of
// secretDirs (the agent's secret_dirs; none allows none).
func ParsePlanSpec(raw []byte, getenv func(string) (string, bool), secretDirs ...string) (config.Plan, error) {
	if getenv == nil {
		getenv = func(string) (string, bool) { return "", false }
	}
	var foreign, outside []string
	for _, name := range config.RefNames(string(raw)) {
		if path, ok := config.SecretFilePath(name); ok {
			if !underAny(path, secretDirs) {
				outside = append(outside, path)
			}
			continue
		}
		if !strings.HasPrefix(name, "CUTOVER_") {
			foreign = append(foreign, name)
		}
	}
	if len(foreign) > 0 {
		return config.Plan{}, fmt.Errorf("%w: a posted plan may reference only CUTOVER_* environment variables, not %s", ErrInvalidCommand, strings.Join(foreign, ", "))
	}
	if len(outside) > 0 {
		dirs := "none is configured: set agent.secret_dirs"
		if len(secretDirs) > 0 {
			dirs = strings.Join(secretDirs, ", ")
		}
		return config.Plan{}, fmt.Errorf("%w: a posted plan may reference only secret files under the agent's secret_dirs (%s), not %s", ErrInvalidCommand, dirs, strings.Join(outside, ", "))
	}
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '{' || !json.Valid(raw) {
		return config.Plan{}, fmt.Errorf("%w: the plan spec must be a JSON object", ErrInvalidCommand)
	}
	// Wrap the plan in the smallest configuration that validates on its
	// own, so that config.Parse checks the plan and applies its defaults.
	// The config walker wants block YAML (it reads flow-style keys with
	// their quotes), so the JSON is converted first.
	body, err := yaml.JSONToYAML(raw)
	if err != nil {
		return config.Plan{}, fmt.Errorf("%w: plan spec: %v", ErrInvalidCommand, err)
	}
	var doc strings.Builder
	doc.WriteString("agent:\n  node_id: spec-check\n  data_dir: /nonexistent\n  api:\n    tokens:\n      operator: spec-check-placeholder-token\nplans:\n")
	for i, line := range strings.Split(strings.TrimRight(string(body), "\n"), "\n") {
		if i == 0 {
			doc.WriteString("  - " + line + "\n")
		} else {
			doc.WriteString("    " + line + "\n")
		}
	}
	loaded, err := config.Parse("posted plan", []byte(doc.String()), getenv)
	var invalid *config.InvalidError
	if errors.As(err, &invalid) {
		msgs := make([]string, 0, len(invalid.Problems))
		for _, p := range invalid.Problems {
			key := strings.TrimPrefix(strings.TrimPrefix(p.Key, "plans[0]"), ".")
			if key == "" {
				msgs = append(msgs, p.Message)
			} else {
				msgs = append(msgs, key+": "+p.Message)
			}
		}
		return config.Plan{}, fmt.Errorf("%w: invalid plan: %s", ErrInvalidCommand, strings.Join(msgs, "; "))
	}
	if err != nil {
		return config.Plan{}, fmt.Errorf("%w: %v", ErrInvalidCommand, err)
	}
	if len(loaded.Config.Plans) != 1 {
		return config.Plan{}, fmt.Errorf("%w: the plan spec must hold one plan", ErrInvalidCommand)
	}
	return loaded.Config.Plans[0], nil
}

// underAny reports whether path, made absolute and cleaned, lies inside one
// of dirs (not at a dir itself; ".." cannot climb out).
func underAny(path string, dirs []string) bool {
	if !filepath.IsAbs(path) {
		return false
	}
	clean := filepath.Clean(path)
	for _, d := range dirs {
		d = filepath.Clean(d)
		if filepath.IsAbs(d) && strings.HasPrefix(clean, strings.TrimSuffix(d, string(filepath.Separator))+string(filepath.Separator)) {
			return true
		}
	}
	return false
}
