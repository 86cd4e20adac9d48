package config

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/goccy/go-yaml"
)

var testEnv = map[string]string{
	"OP_TOKEN": "operator-token-0123456789",
	"BLUE_PW":  "blue-secret-pw",
	"GREEN_PW": "green-secret-pw",
}

func lookup(env map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := env[k]; return v, ok }
}

const base = `agent:
  node_id: a1
  data_dir: /tmp/x
  api:
    tokens:
      operator: ${OP_TOKEN}
plans:
  - name: orders
    pairs:
      - name: db
        engine: postgres
        blue:
          dsn: postgres://app:${BLUE_PW}@127.0.0.1:5432/orders
        green:
          dsn: postgres://app:${GREEN_PW}@127.0.0.1:5433/orders
`

func TestParseAcceptsGoodFilesAndFillsDefaults(t *testing.T) {
	tests := []struct {
		name  string
		yaml  string
		check func(t *testing.T, c *Config)
	}{
		{"minimal file gets every default", base, func(t *testing.T, c *Config) {
			p := c.Plans[0]
			if got, want := p.Fence.MaxFenceWindow.D(), DefaultMaxFenceWindow; got != want {
				t.Errorf("max_fence_window = %v, want %v", got, want)
			}
			if got, want := c.Agent.Raft.Advertise, DefaultRaftBind; got != want {
				t.Errorf("advertise = %q, want %q", got, want)
			}
			if got, want := c.Agent.API.Advertise, "http://"+DefaultAPIListen; got != want {
				t.Errorf("api advertise = %q, want %q", got, want)
			}
			if !*p.Verify.Enabled {
				t.Error("verification is off by default")
			}
			if got := p.Pairs[0].Blue.DSN.Reveal(); got != "postgres://app:blue-secret-pw@127.0.0.1:5432/orders" {
				t.Errorf("blue dsn not expanded: %q", got)
			}
		}},
		{"durations and sizes in every unit", strings.Replace(base, "plans:\n  - name: orders\n", "plans:\n  - name: orders\n    lag: {max_bytes: 16MiB, max_delay: 1500ms, hold: 1m}\n    fence: {max_fence_window: 2s, drain_grace: 250ms}\n", 1), func(t *testing.T, c *Config) {
			p := c.Plans[0]
			if p.Lag.MaxBytes != 16<<20 || p.Lag.MaxDelay.D() != 1500*time.Millisecond || p.Lag.Hold.D() != time.Minute {
				t.Errorf("lag = %+v", p.Lag)
			}
			if p.Fence.DrainGrace.D() != 250*time.Millisecond {
				t.Errorf("drain_grace = %v", p.Fence.DrainGrace.D())
			}
		}},
		{"env default and escape", strings.Replace(base, "data_dir: /tmp/x", "data_dir: ${DATA:-/var/lib/c}/$${literal}", 1), func(t *testing.T, c *Config) {
			if got, want := c.Agent.DataDir, "/var/lib/c/${literal}"; got != want {
				t.Errorf("data_dir = %q, want %q", got, want)
			}
		}},
		{"mysql and redis pairs", base + `      - name: legacy
        engine: mysql
        blue: {dsn: "app:${BLUE_PW}@tcp(127.0.0.1:3306)/shop"}
        green: {dsn: "mysql://app:${GREEN_PW}@127.0.0.1:3307/shop"}
      - name: cache
        engine: redis
        blue: {dsn: "redis://127.0.0.1:6379/0"}
        green: {dsn: "redis://127.0.0.1:6380/0"}
`, func(t *testing.T, c *Config) {
			if n := len(c.Plans[0].Pairs); n != 3 {
				t.Fatalf("pairs = %d", n)
			}
			d, err := ParseMySQLDSN(c.Plans[0].Pairs[1].Green.DSN.Reveal())
			if err != nil || d.Addr != "127.0.0.1:3307" || d.User != "app" || d.DB != "shop" || d.Password.Reveal() != "green-secret-pw" {
				t.Errorf("mysql url dsn = %+v, %v", d, err)
			}
		}},
		{"the shipped example", mustRead(t, "../../examples/cutover.yaml"), func(t *testing.T, c *Config) {
			if len(c.Plans[0].Switch.Targets) != 3 {
				t.Errorf("targets = %d", len(c.Plans[0].Switch.Targets))
			}
			if got := c.Plans[0].Switch.Targets[0].Key; got != "cutover:orders:route" {
				t.Errorf("redis key = %q", got)
			}
		}},
	}
	env := map[string]string{}
	for k, v := range testEnv {
		env[k] = v
	}
	for _, k := range []string{"CUTOVER_OPERATOR_TOKEN", "BLUE_PG_PASSWORD", "GREEN_PG_PASSWORD", "BLUE_REDIS_PASSWORD", "GREEN_REDIS_PASSWORD", "ROUTER_REDIS_PASSWORD", "DEPLOY_HOOK_TOKEN", "MONITOR_PG_PASSWORD"} {
		env[k] = "example-secret-" + strings.ToLower(k)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			loaded, err := Parse("test.yaml", []byte(tt.yaml), lookup(env))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			tt.check(t, loaded.Config)
		})
	}
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestParseReportsEveryProblemWithKeyAndLine(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		want []string
	}{
		{"unknown keys anywhere, with suggestions", strings.Replace(strings.Replace(base, "  data_dir: /tmp/x\n", "  data_dir: /tmp/x\n  nodeid: x\n", 1), "        engine: postgres\n", "        engine: postgres\n        fence_role: [app]\n", 1), []string{
			`line 4: agent.nodeid: unknown key (did you mean "node_id"?)`,
			`line 13: plans[0].pairs[0].fence_role: unknown key (did you mean "fence_roles"?)`,
		}},
		{"wrong types", strings.Replace(strings.Replace(base, "  data_dir: /tmp/x\n", "  data_dir: [a, b]\n  raft:\n    bootstrap: yes please\n    snapshot_retain: two\n", 1), "    pairs:\n", "    fence:\n      max_fence_window: 5\n    pairs:\n", 1), []string{
			`line 3: agent.data_dir: expected a single value, found a list`,
			`line 5: agent.raft.bootstrap: expected true or false, found text "yes please"`,
			`line 6: agent.raft.snapshot_retain: expected a whole number, found text "two"`,
			`line 13: plans[0].fence.max_fence_window: 5 is not a duration: give a unit, e.g. 5s`,
		}},
		{"impossible values", strings.Replace(base, "    pairs:\n", "    fence:\n      max_fence_window: 1s\n      drain_grace: 2s\n    verify:\n      parallel: 100\n    lag:\n      hold: -1s\n    pairs:\n", 1), []string{
			`line 11: plans[0].fence.drain_grace: 2s must be shorter than max_fence_window (1s), which also has to fit catch-up and verification`,
			`line 13: plans[0].verify.parallel: 100 is out of range (1-64)`,
			`line 15: plans[0].lag.hold: must not be negative`,
		}},
		{"unknown fence mode", strings.Replace(base, "    pairs:\n", "    fence:\n      blue: rows\n    pairs:\n", 1), []string{
			`line 10: plans[0].fence.blue: "rows" is not one of auto, proxy, grants`,
		}},
		{"malformed and duplicate DSNs", strings.Replace(base, "postgres://app:${GREEN_PW}@127.0.0.1:5433/orders", "postgres://app:${BLUE_PW}@127.0.0.1:5432/orders", 1) + `      - name: db2
        engine: mysql
        blue: {dsn: "app:pw@127.0.0.1:3306/shop"}
        green: {dsn: "app:pw@tcp(127.0.0.1:3306)"}
      - name: c
        engine: redis
        blue: {dsn: "http://x"}
        green: {dsn: "redis://127.0.0.1:6380"}
`, []string{
			`line 15: plans[0].pairs[0].green.dsn: same database as plans[0].pairs[0].blue.dsn: blue and green must be different databases`,
			`line 18: plans[0].pairs[1].blue.dsn: not a valid MySQL DSN: write the address as tcp(host:port), e.g. user:password@tcp(127.0.0.1:3306)/db`,
			`line 19: plans[0].pairs[1].green.dsn: not a valid MySQL DSN (user:password@tcp(host:port)/db or mysql://user:password@host:port/db): invalid DSN: missing the slash separating the database name`,
			`line 22: plans[0].pairs[2].blue.dsn: not a valid Redis URL (redis://[:password@]host:port/db): redis: invalid URL scheme: http`,
		}},
		{"missing required values and env", strings.Replace(strings.Replace(base, "  node_id: a1\n", "", 1), "engine: postgres", "engine: oracle", 1) + "  - name: Bad Name\n", []string{
			`line 5: agent.api.tokens.operator: environment variable OP_TOKEN is not set`,
		}},
		{"semantic problems once env is set", strings.Replace(strings.Replace(base, "  node_id: a1\n", "", 1), "engine: postgres", "engine: oracle", 1) + "  - name: Bad Name\n", []string{
			`line 1: agent.node_id: required: a unique, stable name for this agent`,
			`line 10: plans[0].pairs[0].engine: "oracle" is not supported (postgres, mysql or redis; use mysql for MariaDB)`,
			`line 15: plans[1].name: "Bad Name" is not a valid name: use 1-32 lowercase letters, digits, '-' or '_', starting with a letter`,
			`line 15: plans[1].pairs: a plan needs at least one blue/green pair`,
		}},
		{"yaml syntax error", "agent:\n  node_id: [a\n", []string{
			`YAML syntax: [2:12] sequence end token ']' not found`,
		}},
		{"short token", strings.Replace(base, "${OP_TOKEN}", "short", 1), []string{
			`line 6: agent.api.tokens.operator: too short: use at least 16 characters`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := testEnv
			if tt.name == "missing required values and env" {
				env = map[string]string{"BLUE_PW": "x1", "GREEN_PW": "x2"}
			}
			_, err := Parse("test.yaml", []byte(tt.yaml), lookup(env))
			var invalid *InvalidError
			if !errors.As(err, &invalid) {
				t.Fatalf("err = %v, want *InvalidError", err)
			}
			var got []string
			for _, p := range invalid.Problems {
				got = append(got, p.String())
			}
			if strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
				t.Errorf("problems:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
			}
		})
	}
}

func TestLoadSaysUnreadableApartFromInvalid(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "missing.yaml"), nil)
	var readErr *ReadError
	if !errors.As(err, &readErr) {
		t.Fatalf("err = %v, want *ReadError", err)
	}
}

func TestRenderedConfigHoldsNoSecret(t *testing.T) {
	loaded, err := Parse("test.yaml", []byte(base), lookup(testEnv))
	if err != nil {
		t.Fatal(err)
	}
	y, err := yaml.Marshal(loaded.Config)
	if err != nil {
		t.Fatal(err)
	}
	j, err := json.Marshal(loaded.Config)
	if err != nil {
		t.Fatal(err)
	}
	for _, out := range []string{string(y), string(j)} {
		for _, secret := range testEnv {
			if strings.Contains(out, secret) {
				t.Errorf("rendered config contains secret %q:\n%s", secret, out)
			}
		}
		if !strings.Contains(out, "postgres://app:[redacted]@127.0.0.1:5432/orders") {
			t.Errorf("rendered config lost the DSN shape:\n%s", out)
		}
	}
	for _, secret := range testEnv {
		found := false
		for _, s := range loaded.Secrets {
			found = found || s == secret
		}
		if !found {
			t.Errorf("Secrets() misses %q", secret)
		}
	}
}

func TestInvalidErrorsNeverEchoPasswords(t *testing.T) {
	yml := strings.Replace(base, "postgres://app:${GREEN_PW}@127.0.0.1:5433/orders", "postgres://app:${GREEN_PW}@127.0.0.1:99999/orders", 1)
	_, err := Parse("test.yaml", []byte(yml), lookup(testEnv))
	if err == nil {
		t.Fatal("want an error for port 99999")
	}
	if strings.Contains(err.Error(), testEnv["GREEN_PW"]) {
		t.Errorf("error leaks password: %v", err)
	}
	if !strings.Contains(err.Error(), "plans[0].pairs[0].green.dsn") {
		t.Errorf("error does not name the key: %v", err)
	}
}

func TestTableNamesInScopeMayQuoteTheirParts(t *testing.T) {
	for name, ok := range map[string]bool{
		"orders":                true,
		"public.Orders":         true,
		`public."Orders"`:       true,
		`"my.schema"."a""b"`:    true,
		`"odd.name"`:            true,
		"a.b.c":                 false,
		`public."open`:          false,
		`""`:                    false,
		"public.orders; DROP x": false,
	} {
		if got := validTableName(name); got != ok {
			t.Errorf("validTableName(%q) = %v, want %v", name, got, ok)
		}
	}
}
