package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"

	"github.com/cutover/cutover/internal/redact"
)

// ReadError means the file could not be read at all (missing, unreadable).
type ReadError struct {
	Path string
	Err  error
}

func (e *ReadError) Error() string { return fmt.Sprintf("read config %s: %v", e.Path, e.Err) }
func (e *ReadError) Unwrap() error { return e.Err }

// Problem is one thing wrong with a configuration.
type Problem struct {
	// Key is the dotted path of the offending key, e.g. plans[0].fence.max_fence_window.
	Key string
	// Line is the 1-based line in the file, 0 when unknown.
	Line    int
	Message string
}

func (p Problem) String() string {
	if p.Line > 0 {
		return fmt.Sprintf("line %d: %s: %s", p.Line, p.Key, p.Message)
	}
	if p.Key == "" {
		return p.Message
	}
	return fmt.Sprintf("%s: %s", p.Key, p.Message)
}

// InvalidError lists every problem found in a configuration.
type InvalidError struct {
	Path     string
	Problems []Problem
}

func (e *InvalidError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "config %s is invalid (%d problem", e.Path, len(e.Problems))
	if len(e.Problems) != 1 {
		b.WriteString("s")
	}
	b.WriteString("):")
	for _, p := range e.Problems {
		b.WriteString("\n  ")
		b.WriteString(p.String())
	}
	return b.String()
}

// Loaded is a validated configuration and the secrets it holds, so that the
// caller can teach its log redactor about them.
type Loaded struct {
	Config  *Config
	Secrets []string
}

// Load reads, expands, decodes, defaults and validates the file at path.
// getenv resolves ${NAME} references (os.Getenv when nil). It returns a
// *ReadError when the file cannot be read and an *InvalidError listing every
// problem when it can be read but is not valid.
func Load(path string, getenv func(string) (string, bool)) (*Loaded, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, &ReadError{Path: path, Err: err}
	}
	return Parse(path, data, getenv)
}

// Parse is Load on bytes already read; name is used in messages only.
func Parse(name string, data []byte, getenv func(string) (string, bool)) (*Loaded, error) {
	if getenv == nil {
		getenv = WithSecretFiles(os.LookupEnv)
	}
	invalid := &InvalidError{Path: name}
	file, err := parser.ParseBytes(data, 0)
	if err != nil {
		invalid.Problems = append(invalid.Problems, Problem{Message: "YAML syntax: " + oneLine(yaml.FormatError(err, false, false))})
		return nil, invalid
	}
	cfg := &Config{}
	w := &walker{getenv: getenv, lines: map[string]int{}, refs: map[string]string{}}
	var body ast.Node
	if len(file.Docs) > 1 {
		invalid.Problems = append(invalid.Problems, Problem{Message: "the file holds several YAML documents; put everything in one"})
		return nil, invalid
	}
	if len(file.Docs) == 1 {
		body = file.Docs[0].Body
	}
	if body != nil {
		w.walk(body, reflect.TypeOf(cfg).Elem(), "")
	}
	if len(w.problems) == 0 && body != nil {
		if err := yaml.NodeToValue(body, cfg, yaml.Strict()); err != nil {
			w.problems = append(w.problems, Problem{Message: oneLine(yaml.FormatError(err, false, false))})
		}
	}
	if len(w.problems) > 0 {
		invalid.Problems = w.problems
		return nil, invalid
	}
	cfg.applyDefaults()
	cfg.keepRefs(w.refs)
	for _, p := range cfg.validate() {
		p.Line = w.lineOf(p.Key)
		invalid.Problems = append(invalid.Problems, p)
	}
	if len(invalid.Problems) > 0 {
		sort.SliceStable(invalid.Problems, func(i, j int) bool {
			li, lj := invalid.Problems[i].Line, invalid.Problems[j].Line
			return li != 0 && (lj == 0 || li < lj)
		})
		return nil, invalid
	}
	return &Loaded{Config: cfg, Secrets: cfg.secrets(getenv)}, nil
}

func oneLine(s string) string {
	s = strings.TrimSpace(s)
	s = strings.ReplaceAll(s, "\n", " ")
	return redact.Text(s)
}

// walker checks the YAML tree against the Go types before decoding, so that
// every unknown key and every malformed scalar is reported (a decoder stops at
// the first), each with its line; it also expands ${ENV} in string scalars.
type walker struct {
	getenv   func(string) (string, bool)
	problems []Problem
	lines    map[string]int
	// refs maps the key of every scalar that held a ${NAME} reference to
	// its text before expansion (see Plan.Refs).
	refs map[string]string
}

func (w *walker) add(n ast.Node, key, format string, args ...any) {
	w.problems = append(w.problems, Problem{Key: key, Line: line(n), Message: fmt.Sprintf(format, args...)})
}

func line(n ast.Node) int {
	if n == nil || n.GetToken() == nil {
		return 0
	}
	return n.GetToken().Position.Line
}

// lineOf finds the line of key or, failing that, of its nearest parent.
func (w *walker) lineOf(key string) int {
	for k := key; k != ""; {
		if l, ok := w.lines[k]; ok {
			return l
		}
		i := strings.LastIndexAny(k, ".[")
		if i < 0 {
			break
		}
		k = k[:i]
	}
	return 0
}

var (
	durationType = reflect.TypeOf(Duration(0))
	byteSizeType = reflect.TypeOf(ByteSize(0))
)

func join(prefix, key string) string {
	if prefix == "" {
		return key
	}
	return prefix + "." + key
}

func (w *walker) walk(n ast.Node, t reflect.Type, key string) {
	for {
		switch v := n.(type) {
		case *ast.TagNode:
			n = v.Value
			continue
		case *ast.AnchorNode:
			n = v.Value
			continue
		}
		break
	}
	if key != "" {
		if _, seen := w.lines[key]; !seen {
			w.lines[key] = line(n)
		}
	}
	if _, isNull := n.(*ast.NullNode); isNull || n == nil {
		return
	}
	if _, isAlias := n.(*ast.AliasNode); isAlias {
		return // the decoder resolves and type-checks aliases
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Struct:
		m, ok := mapping(n)
		if !ok {
			w.add(n, key, "expected a mapping (key: value lines), found %s", kind(n))
			return
		}
		fields := yamlFields(t)
		seen := map[string]bool{}
		for _, mv := range m {
			name := mv.Key.String()
			if seen[name] {
				w.add(mv.Key, join(key, name), "duplicate key")
				continue
			}
			seen[name] = true
			f, ok := fields[name]
			if !ok {
				msg := "unknown key"
				if s := suggest(name, fields); s != "" {
					msg += fmt.Sprintf(" (did you mean %q?)", s)
				}
				w.add(mv.Key, join(key, name), "%s", msg)
				continue
			}
			w.lines[join(key, name)] = line(mv.Key)
			w.walk(mv.Value, f.Type, join(key, name))
		}
	case reflect.Slice:
		seq, ok := n.(*ast.SequenceNode)
		if !ok {
			w.add(n, key, "expected a list, found %s", kind(n))
			return
		}
		for i, item := range seq.Values {
			w.walk(item, t.Elem(), fmt.Sprintf("%s[%d]", key, i))
		}
	case reflect.Map:
		m, ok := mapping(n)
		if !ok {
			w.add(n, key, "expected a mapping, found %s", kind(n))
			return
		}
		for _, mv := range m {
			w.walk(mv.Value, t.Elem(), join(key, mv.Key.String()))
		}
	default:
		w.scalar(n, t, key)
	}
}

func (w *walker) scalar(n ast.Node, t reflect.Type, key string) {
	switch n.(type) {
	case *ast.MappingNode, *ast.MappingValueNode, *ast.SequenceNode:
		w.add(n, key, "expected a single value, found %s", kind(n))
		return
	}
	if s, ok := n.(*ast.StringNode); ok && strings.Contains(s.Value, "${") {
		expanded, err := expandEnv(s.Value, w.getenv)
		if err != nil {
			w.add(n, key, "%v", err)
			return
		}
		w.refs[key] = s.Value
		s.Value = expanded
	}
	value := scalarValue(n)
	switch {
	case t == durationType:
		if _, err := parseDuration(value); err != nil {
			w.add(n, key, "%v", err)
		}
	case t == byteSizeType:
		if _, err := parseByteSize(value); err != nil {
			w.add(n, key, "%v", err)
		}
	case t.Kind() == reflect.Bool:
		if _, ok := value.(bool); !ok {
			w.add(n, key, "expected true or false, found %s", kind(n))
		}
	case t.Kind() >= reflect.Int && t.Kind() <= reflect.Uint64:
		switch value.(type) {
		case int64, uint64, int:
		default:
			w.add(n, key, "expected a whole number, found %s", kind(n))
		}
	case t.Kind() == reflect.String:
		switch value.(type) {
		case string:
		default:
			// Numbers and booleans where text is expected are almost always
			// a mistake (an unquoted "yes", a port where an address goes).
			w.add(n, key, "expected text, found %s (quote it if you mean the text)", kind(n))
		}
	}
}

func scalarValue(n ast.Node) any {
	switch v := n.(type) {
	case *ast.StringNode:
		return v.Value
	case *ast.LiteralNode:
		return v.Value.Value
	case *ast.IntegerNode:
		return v.Value
	case *ast.BoolNode:
		return v.Value
	case *ast.FloatNode:
		return v.Value
	}
	return n.String()
}

func mapping(n ast.Node) ([]*ast.MappingValueNode, bool) {
	switch v := n.(type) {
	case *ast.MappingNode:
		return v.Values, true
	case *ast.MappingValueNode:
		return []*ast.MappingValueNode{v}, true
	}
	return nil, false
}

func kind(n ast.Node) string {
	switch v := n.(type) {
	case *ast.MappingNode, *ast.MappingValueNode:
		return "a mapping"
	case *ast.SequenceNode:
		return "a list"
	case *ast.StringNode, *ast.LiteralNode:
		return fmt.Sprintf("text %q", fmt.Sprint(scalarValue(v)))
	case *ast.IntegerNode:
		return fmt.Sprintf("the number %v", v.Value)
	case *ast.FloatNode:
		return fmt.Sprintf("the number %v", v.Value)
	case *ast.BoolNode:
		return fmt.Sprintf("the boolean %v", v.Value)
	}
	return n.Type().String()
}

func yamlFields(t reflect.Type) map[string]reflect.StructField {
	out := map[string]reflect.StructField{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "" || name == "-" {
			continue
		}
		out[name] = f
	}
	return out
}

// suggest returns the known key closest to name when it is close enough to
// be a typo.
func suggest(name string, fields map[string]reflect.StructField) string {
	best, bestD := "", 3
	for k := range fields {
		if d := editDistance(name, k); d < bestD || (d == bestD && k < best) {
			best, bestD = k, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// envRef matches $$, ${NAME}, ${file:/path} and either with :-default.
var envRef = regexp.MustCompile(`\$\$|\$\{(file:[^}]*?|[A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}`)

// expandEnv replaces ${NAME}, ${file:/path} (see ReadSecretFile) and
// either with :-default; $${ escapes a literal ${. A bare $NAME is left
// alone so that passwords holding a $ survive. getenv answers for both
// kinds of names (see WithSecretFiles).
func expandEnv(s string, getenv func(string) (string, bool)) (string, error) {
	var missing, bad []string
	out := envRef.ReplaceAllStringFunc(s, func(ref string) string {
		if ref == "$$" {
			return "$"
		}
		m := envRef.FindStringSubmatch(ref)
		if path, ok := SecretFilePath(m[1]); ok && !filepath.IsAbs(path) {
			bad = append(bad, path)
			return ""
		}
		if v, ok := getenv(m[1]); ok && v != "" {
			return v
		}
		if m[2] != "" {
			return m[3]
		}
		missing = append(missing, m[1])
		return ""
	})
	if len(bad) > 0 {
		return "", fmt.Errorf("secret file reference ${file:%s}: the path must be absolute", bad[0])
	}
	if len(missing) > 0 {
		return "", fmt.Errorf("%s", missingText(missing, "environment variable %s is not set"))
	}
	if strings.Contains(out, "${") && !strings.Contains(s, "$${") {
		return "", errors.New("malformed ${...} reference (use ${NAME} or ${NAME:-default})")
	}
	return out, nil
}
