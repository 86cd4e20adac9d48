package deploy

import (
	"bytes"
	"debug/elf"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/goccy/go-yaml"

	"github.com/cutover/cutover/internal/config"
	_ "github.com/cutover/cutover/internal/dsnsyntax/register"
)

var (
	staticOnce sync.Once
	staticBin  string
	staticErr  error
)

// buildStatic builds the agent the way the Dockerfile does (CGO off, its
// flags), once for the package's tests. -trimpath aside: it would rebuild
// every dependency outside the build cache, and says nothing of the
// binary's linking.
func buildStatic(t *testing.T) string {
	t.Helper()
	staticOnce.Do(func() { staticBin, staticErr = buildStaticOnce() })
	if staticErr != nil {
		t.Fatal(staticErr)
	}
	return staticBin
}

func buildStaticOnce() (string, error) {
	df, err := os.ReadFile("docker/Dockerfile")
	if err != nil {
		return "", err
	}
	m := regexp.MustCompile(`(?m)^RUN (CGO_ENABLED=0 go build .*) -o \S+ (\./cmd/cutover)$`).FindStringSubmatch(string(df))
	if m == nil {
		return "", fmt.Errorf("the Dockerfile has no `RUN CGO_ENABLED=0 go build ... -o OUT ./cmd/cutover` line")
	}
	dir, err := os.MkdirTemp("", "cutover-deploy-")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "cutover")
	// The Dockerfile's own flags, build arguments given values.
	flags := strings.NewReplacer("${VERSION}", "test", "${COMMIT}", "test").Replace(strings.TrimPrefix(m[1], "CGO_ENABLED=0 go build"))
	args := []string{"build"}
	for _, a := range splitQuoted(flags) {
		if a != "-trimpath" {
			args = append(args, a)
		}
	}
	cmd := exec.Command("go", append(args, "-o", bin, m[2])...)
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go %v: %v\n%s", cmd.Args[1:], err, out)
	}
	return bin, nil
}

func TestMain(m *testing.M) {
	code := m.Run()
	if staticBin != "" {
		os.RemoveAll(filepath.Dir(staticBin))
	}
	os.Exit(code)
}

// splitQuoted splits a shell word list with double quotes, as the
// Dockerfile's RUN line writes it.
func splitQuoted(s string) []string {
	var out []string
	for _, m := range regexp.MustCompile(`"([^"]*)"|(\S+)`).FindAllStringSubmatch(s, -1) {
		if m[2] != "" {
			out = append(out, m[2])
		} else {
			out = append(out, m[1])
		}
	}
	return out
}

func TestTheImageRunsAStaticBinaryAsANonRootUser(t *testing.T) {
	df, err := os.ReadFile("docker/Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	froms := regexp.MustCompile(`(?m)^FROM (\S+)`).FindAllStringSubmatch(string(df), -1)
	if len(froms) < 2 || !strings.Contains(froms[len(froms)-1][1], "distroless/static") {
		t.Errorf("the final stage is %v, want a distroless static base (no shell, no libc)", froms)
	}
	user := regexp.MustCompile(`(?m)^USER (\d+)(:\d+)?$`).FindStringSubmatch(string(df))
	if user == nil {
		t.Fatal("no numeric USER line: Kubernetes' runAsNonRoot can only check a numeric user")
	}
	if uid, _ := strconv.Atoi(user[1]); uid == 0 {
		t.Error("USER is root")
	}

	bin := buildStatic(t)
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("the binary asks for a dynamic loader: it would not start on a static base")
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("the binary needs %v", libs)
	}
	if out, err := exec.Command(bin, "version").CombinedOutput(); err != nil || !strings.Contains(string(out), "test") {
		t.Errorf("cutover version: %v: %s (want the version given at build)", err, out)
	}
}

func TestTheSystemdUnitVerifies(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatal("systemd-analyze is missing (Debian package systemd; .ci/run installs it)")
	}
	unit, err := os.ReadFile("systemd/cutover@.service")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(unit, []byte("ExecReload=/bin/kill -HUP $MAINPID")) {
		t.Error("the unit does not reload with SIGHUP")
	}
	// systemd-analyze checks that the program exists: point it at a real
	// build, and verify an instance of the template.
	dir := t.TempDir()
	bin := buildStatic(t)
	unit = bytes.ReplaceAll(unit, []byte("/usr/local/bin/cutover"), []byte(bin))
	if err := os.WriteFile(filepath.Join(dir, "cutover@.service"), unit, 0o644); err != nil {
		t.Fatal(err)
	}
	inst := filepath.Join(dir, "cutover@agent-1.service")
	if err := os.Symlink("cutover@.service", inst); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(sa, "verify", inst).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// docs reads every YAML document of a manifest file.
func docs(t *testing.T, path string) []map[string]any {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	for _, part := range regexp.MustCompile(`(?m)^---$`).Split(string(data), -1) {
		var d map[string]any
		if err := yaml.Unmarshal([]byte(part), &d); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if d == nil {
			continue
		}
		meta, _ := d["metadata"].(map[string]any)
		if d["apiVersion"] == nil || d["kind"] == nil || meta == nil || meta["name"] == nil {
			t.Errorf("%s: a document without apiVersion, kind or metadata.name: %v", path, d)
		}
		out = append(out, d)
	}
	return out
}

func get(v any, path ...string) any {
	for _, k := range path {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = m[k]
	}
	return v
}

func TestTheKubernetesExampleRunsThreeValidAgentsBesideTheDatabases(t *testing.T) {
	all := docs(t, "kubernetes/cutover-agents.yaml")
	var cm map[string]any
	sets := map[string]map[string]any{}
	services := map[string]bool{}
	for _, d := range all {
		switch d["kind"] {
		case "ConfigMap":
			cm = d
		case "StatefulSet":
			sets[get(d, "metadata", "name").(string)] = d
		case "Service":
			services[get(d, "metadata", "name").(string)] = true
		}
	}
	if cm == nil {
		t.Fatal("no ConfigMap")
	}
	env := map[string]string{"CUTOVER_OPERATOR_TOKEN": "op-token-0123456789abcdef", "CUTOVER_READ_TOKEN": "read-token-0123456789abcdef",
		"BLUE_PG_PASSWORD": "b", "GREEN_PG_PASSWORD": "g", "ROUTER_REDIS_PASSWORD": "r"}
	getenv := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	data := get(cm, "data").(map[string]any)
	configs := map[string]*config.Config{}
	for key, v := range data {
		loaded, err := config.Parse(key, []byte(v.(string)), getenv)
		if err != nil {
			t.Fatalf("%s in the ConfigMap: %v", key, err)
		}
		configs[key] = loaded.Config
	}
	if len(configs) != 3 {
		t.Fatalf("%d agent configurations, want 3", len(configs))
	}
	// Every agent lists the two others as peers, by the address they
	// advertise, and all carry the same plans.
	var first *config.Config
	for key, c := range configs {
		if first == nil {
			first = c
		} else if !slices.EqualFunc(c.Plans, first.Plans, func(a, b config.Plan) bool {
			ja, _ := json.Marshal(a)
			jb, _ := json.Marshal(b)
			return bytes.Equal(ja, jb)
		}) {
			t.Errorf("%s's plans differ from the other agents'", key)
		}
		for _, p := range c.Agent.Raft.Peers {
			found := false
			for _, o := range configs {
				if o.Agent.NodeID == p.ID && o.Agent.Raft.Advertise == p.Address && o.Agent.API.Advertise == p.API {
					found = true
				}
			}
			if !found || p.ID == c.Agent.NodeID {
				t.Errorf("%s: peer %+v is not another agent as it advertises itself", key, p)
			}
		}
		if len(c.Agent.Raft.Peers) != 2 {
			t.Errorf("%s: %d peers, want 2", key, len(c.Agent.Raft.Peers))
		}
	}
	// Each agent container runs one of those files as a non-root user,
	// with its data on a persistent volume; each database has one beside it.
	agents := 0
	for name, s := range sets {
		spec := get(s, "spec", "template", "spec").(map[string]any)
		if !services[get(s, "spec", "serviceName").(string)] {
			t.Errorf("%s: its headless service %v is missing", name, get(s, "spec", "serviceName"))
		}
		hasPG := false
		for _, c := range spec["containers"].([]any) {
			c := c.(map[string]any)
			if c["name"] == "postgres" {
				hasPG = true
			}
			if c["name"] != "cutover" {
				continue
			}
			agents++
			args := c["args"].([]any)
			file := filepath.Base(args[len(args)-1].(string))
			if _, ok := configs[file]; !ok {
				t.Errorf("%s runs %s, which the ConfigMap does not hold", name, file)
			}
			if get(c, "securityContext", "runAsNonRoot") != true {
				t.Errorf("%s: the agent may run as root", name)
			}
			if !strings.HasPrefix(configs[file].Agent.DataDir, "/var/lib/cutover/") {
				t.Errorf("%s: data_dir %s is not on the data volume", name, configs[file].Agent.DataDir)
			}
		}
		if (name == "shop-blue" || name == "shop-green") && !hasPG {
			t.Errorf("%s has no database beside its agent", name)
		}
		if get(s, "spec", "volumeClaimTemplates") == nil {
			t.Errorf("%s: no persistent volume for the Raft state", name)
		}
	}
	if agents != 3 || !services["cutover"] {
		t.Errorf("%d agent containers, gate service %v: want 3 and a service", agents, services["cutover"])
	}

	// The deployment tools ask the gate of a plan that exists, through
	// the agents' service.
	gate := regexp.MustCompile(`http://cutover\.shop\.svc:8420/v1/gate/([a-z0-9-]+|\{\{args\.plan\}\})`)
	for _, f := range []string{"kubernetes/flagger-canary.yaml", "kubernetes/argo-rollout.yaml"} {
		docs(t, f)
		text, _ := os.ReadFile(f)
		m := gate.FindSubmatch(text)
		if m == nil {
			t.Errorf("%s does not ask the agents' gate", f)
			continue
		}
		plan := string(m[1])
		if plan == "{{args.plan}}" {
			plan = regexp.MustCompile(`- name: plan\n\s+value: (\S+)`).FindStringSubmatch(string(text))[1]
		}
		if first.Plans[0].Name != plan {
			t.Errorf("%s asks the gate of plan %q; the agents run %q", f, plan, first.Plans[0].Name)
		}
	}
}
