package config

import (
	"errors"
	"strings"
	"testing"
)

func TestANonLoopbackAgentWithoutTLSOrReadTokenIsRefusedUnlessItSaysInsecure(t *testing.T) {
	exposed := strings.Replace(base, "  api:\n", "  raft:\n    bind: 0.0.0.0:8421\n    advertise: 10.0.0.5:8421\n  api:\n    listen: 10.0.0.5:8420\n", 1)
	_, err := Parse("exposed.yaml", []byte(exposed), lookup(testEnv))
	var inv *InvalidError
	if !errors.As(err, &inv) {
		t.Fatalf("a non-loopback agent without TLS was accepted: %v", err)
	}
	msg := err.Error()
	for _, want := range []string{"raft listens on 0.0.0.0:8421", "the API listens on 10.0.0.5:8420", "agent.insecure: true", "agent.api.insecure_open_reads: true", "agent.api.tokens.read"} {
		if !strings.Contains(msg, want) {
			t.Errorf("the refusal does not say %q:\n%s", want, msg)
		}
	}

	accepted := strings.Replace(exposed, "  api:\n", "  insecure: true\n  api:\n    insecure_open_reads: true\n", 1)
	if _, err := Parse("insecure.yaml", []byte(accepted), lookup(testEnv)); err != nil {
		t.Errorf("insecure: true and insecure_open_reads: true are refused: %v", err)
	}

	if _, err := Parse("loopback.yaml", []byte(base), lookup(testEnv)); err != nil {
		t.Errorf("the loopback defaults are refused: %v", err)
	}
}

func TestLoopbackKnowsWhatOnlyThisMachineReaches(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:8420": true, "localhost:1": true, "[::1]:8420": true, "127.1.2.3:9": true,
		"0.0.0.0:8420": false, ":8420": false, "10.0.0.5:8420": false, "[::]:1": false, "agent-1.internal:8420": false,
	} {
		if got := Loopback(addr); got != want {
			t.Errorf("Loopback(%q) = %v, want %v", addr, got, want)
		}
	}
}
