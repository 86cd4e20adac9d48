package agent_test

import (
	"encoding/json"
	"io"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
	"github.com/cutover/cutover/switch/gate"
)

// TestGateDocSnippetsWork calls the gate the way docs/gate.md tells Flagger
// and Argo Rollouts to, with the URLs taken from the page itself.
func TestGateDocSnippetsWork(t *testing.T) {
	doc, err := os.ReadFile("../docs/gate.md")
	if err != nil {
		t.Fatal(err)
	}
	urls := regexp.MustCompile(`url: "?(http://cutover\.cutover-system:8420[^"\s]*)"?`).FindAllStringSubmatch(string(doc), -1)
	var flagger, argo []string
	for _, m := range urls {
		if strings.Contains(m[1], "format=always200") {
			argo = append(argo, m[1])
		} else {
			flagger = append(flagger, m[1])
		}
	}
	if len(flagger) == 0 || len(argo) == 0 {
		t.Fatalf("found no snippet URLs in docs/gate.md: %q", urls)
	}

	c := agenttest.New(t, agenttest.Options{})
	leader := c.Leader(10 * time.Second)
	mustCreate(t, c.Client(leader.Index), "orders")
	follower := (leader.Index + 1) % 3
	local := func(u string) string {
		u = strings.Replace(u, "http://cutover.cutover-system:8420", c.URL(follower), 1)
		return strings.Replace(u, "{{args.plan}}", "orders", 1)
	}

	// Flagger: POST with its JSON payload; only the status counts.
	flaggerStatus := func(u string) int {
		body := `{"name":"shop","namespace":"shop","phase":"Promoting","metadata":{"token":"` + agenttest.ReadToken + `"}}`
		resp, err := http.Post(local(u), "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	// Argo Rollouts: GET with the header; a non-2xx is an error; the whole
	// body is `result`, and success is result.open == true.
	argoResult := func(u string) (int, bool) {
		req, _ := http.NewRequest(http.MethodGet, local(u), nil)
		req.Header.Set("Authorization", "Bearer "+agenttest.ReadToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		data, _ := io.ReadAll(resp.Body)
		var result map[string]any
		if err := json.Unmarshal(data, &result); err != nil {
			t.Fatalf("argo cannot parse %s: %v", data, err)
		}
		return resp.StatusCode, result["open"] == true
	}

	for _, u := range flagger {
		if code := flaggerStatus(u); code != gate.ClosedStatus {
			t.Errorf("flagger %s before authorized: %d", u, code)
		}
	}
	for _, u := range argo {
		if code, open := argoResult(u); code != http.StatusOK || open {
			t.Errorf("argo %s before authorized: %d open=%v", u, code, open)
		}
	}
	walkTo(t, c.Client(leader.Index), "orders", agent.PhaseAuthorized)
	for _, u := range flagger {
		if code := flaggerStatus(u); code != http.StatusOK {
			t.Errorf("flagger %s once authorized: %d", u, code)
		}
	}
	for _, u := range argo {
		if code, open := argoResult(u); code != http.StatusOK || !open {
			t.Errorf("argo %s once authorized: %d open=%v", u, code, open)
		}
	}
}
