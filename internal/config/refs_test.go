package config

import (
	"encoding/json"
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
)

const refsYAML = base + `    switch:
      targets:
        - type: webhook
          url: http://hook:${HOOK_PW}@127.0.0.1:9/flip?token=${HOOK_TOKEN}&env=prod
          headers:
            Authorization: Bearer ${HOOK_TOKEN}
        - type: command
          command: ["deploy", "--token=${CMD_SECRET}", "--plain"]
`

var refsEnv = map[string]string{
	"OP_TOKEN": "operator-token-0123456789", "BLUE_PW": "blue-secret-pw", "GREEN_PW": "green-secret-pw",
	"HOOK_PW": "hook-secret-pw", "HOOK_TOKEN": "hook-secret-token", "CMD_SECRET": "cmd-secret-arg",
}

func TestLoadedPlansKeepTheirReferences(t *testing.T) {
	loaded, err := Parse("refs.yaml", []byte(refsYAML), lookup(refsEnv))
	if err != nil {
		t.Fatal(err)
	}
	p := loaded.Config.Plans[0]
	want := Refs{
		"pairs[0].blue.dsn":                       "postgres://app:${BLUE_PW}@127.0.0.1:5432/orders",
		"pairs[0].green.dsn":                      "postgres://app:${GREEN_PW}@127.0.0.1:5433/orders",
		"switch.targets[0].url":                   "http://hook:${HOOK_PW}@127.0.0.1:9/flip?token=${HOOK_TOKEN}&env=prod",
		"switch.targets[0].headers.Authorization": "Bearer ${HOOK_TOKEN}",
		"switch.targets[1].command[1]":            "--token=${CMD_SECRET}",
	}
	if !reflect.DeepEqual(p.Refs, want) {
		t.Fatalf("refs = %v\nwant %v", p.Refs, want)
	}
	if p.Pairs[0].Blue.DSN.Reveal() != "postgres://app:blue-secret-pw@127.0.0.1:5432/orders" {
		t.Fatalf("the loaded plan is not expanded: %s", p.Pairs[0].Blue.DSN.Reveal())
	}
	for _, s := range []string{"hook-secret-pw", "hook-secret-token", "cmd-secret-arg", "blue-secret-pw"} {
		if !slices.Contains(loaded.Secrets, s) {
			t.Errorf("secret %s is not registered for redaction (have %v)", s, loaded.Secrets)
		}
	}

	t.Run("the sealed form holds the references and none of the values", func(t *testing.T) {
		sealed, err := p.Sealed()
		if err != nil {
			t.Fatal(err)
		}
		// Render every field, secrets included, as the state would store it.
		raw := revealAll(t, sealed)
		for _, v := range refsEnv {
			if strings.Contains(raw, v) {
				t.Errorf("the sealed plan holds %q: %s", v, raw)
			}
		}
		if !strings.Contains(raw, "${CMD_SECRET}") || !strings.Contains(raw, "${HOOK_TOKEN}") {
			t.Errorf("the sealed plan lost its references: %s", raw)
		}
		if p.Pairs[0].Blue.DSN.Reveal() != "postgres://app:blue-secret-pw@127.0.0.1:5432/orders" {
			t.Error("sealing changed the loaded plan")
		}
		if lit := sealed.LiteralSecrets(); len(lit) != 0 {
			t.Errorf("literal secrets reported in a plan of references: %v", lit)
		}

		resolved, err := sealed.Resolve(lookup(refsEnv))
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(resolved, p) {
			t.Fatalf("resolving the sealed plan does not give the loaded plan back\n got %#v\nwant %#v", resolved, p)
		}
	})

	t.Run("an agent without a variable gets an error naming every missing one", func(t *testing.T) {
		sealed, _ := p.Sealed()
		env := map[string]string{"BLUE_PW": "x", "GREEN_PW": "y"}
		_, err := sealed.Resolve(lookup(env))
		var missing *MissingEnvError
		if !errors.As(err, &missing) || !reflect.DeepEqual(missing.Names, []string{"CMD_SECRET", "HOOK_PW", "HOOK_TOKEN"}) {
			t.Fatalf("err = %v", err)
		}
		if !strings.Contains(err.Error(), "plan orders needs environment variable CMD_SECRET, HOOK_PW, HOOK_TOKEN") {
			t.Fatalf("message = %q", err)
		}
	})
}

// revealAll renders the plan with every secret type's value.
func revealAll(t *testing.T, p Plan) string {
	t.Helper()
	var b strings.Builder
	var walk func(v reflect.Value)
	walk = func(v reflect.Value) {
		switch v.Kind() {
		case reflect.Struct:
			for i := 0; i < v.NumField(); i++ {
				walk(v.Field(i))
			}
		case reflect.Slice:
			for i := 0; i < v.Len(); i++ {
				walk(v.Index(i))
			}
		case reflect.Map:
			it := v.MapRange()
			for it.Next() {
				b.WriteString(it.Key().String() + "=")
				walk(it.Value())
			}
		case reflect.Pointer:
			if !v.IsNil() {
				walk(v.Elem())
			}
		case reflect.String:
			b.WriteString(v.String() + "\n")
		}
	}
	walk(reflect.ValueOf(p))
	return b.String()
}

func TestLiteralSecretsAreFound(t *testing.T) {
	loaded, err := Parse("lit.yaml", []byte(strings.NewReplacer(
		"${BLUE_PW}", "literal-pw", "${HOOK_PW}", "literal-hook-pw").Replace(refsYAML)), lookup(refsEnv))
	if err != nil {
		t.Fatal(err)
	}
	got := loaded.Config.Plans[0].LiteralSecrets()
	want := []string{"pairs[0].blue.dsn", "switch.targets[0].url"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("literal secrets = %v, want %v", got, want)
	}
	if _, err := json.Marshal(loaded.Config.Plans[0]); err != nil {
		t.Fatal(err)
	}
}

func TestRefsRenderWithoutAPasswordWrittenOut(t *testing.T) {
	r := Refs{"pairs[0].blue.dsn": "postgres://app:written-out-pw@${HOST}/db", "switch.targets[0].url": "https://h/x?sig=abc${T}", "switch.targets[0].headers.A": "Bearer ${T}"}
	out, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), "written-out-pw") || strings.Contains(string(out), "abc") || !strings.Contains(string(out), "Bearer ${T}") {
		t.Fatalf("refs render as %s", out)
	}
}
