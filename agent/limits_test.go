package agent_test

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
	"github.com/cutover/cutover/internal/redact"
)

// rawRequest opens a TCP connection to the node's API and sends head.
func rawRequest(t *testing.T, c *agenttest.Cluster, i int, head string) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(c.URL(i), "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := io.WriteString(conn, head); err != nil {
		t.Fatal(err)
	}
	return conn
}

// closedWithin reads the connection until the server closes it and says
// how long that took and what the server answered.
func closedWithin(t *testing.T, conn net.Conn, limit time.Duration) (time.Duration, string) {
	t.Helper()
	start := time.Now()
	_ = conn.SetReadDeadline(start.Add(limit))
	got, err := io.ReadAll(conn)
	took := time.Since(start)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("the server still holds the connection after %s; it answered %q", took.Round(time.Millisecond), got)
	}
	return took, string(got)
}

func TestAnAnonymousClientTricklingAGateBodyIsCutOffWithinSeconds(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{Nodes: 1})
	c.Leader(10 * time.Second)
	conn := rawRequest(t, c, 0, "POST /v1/gate HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(500 * time.Millisecond):
			}
			if _, err := conn.Write([]byte(" ")); err != nil {
				return
			}
		}
	}()
	took, answer := closedWithin(t, conn, 20*time.Second)
	if took > 8*time.Second {
		t.Errorf("the trickling client was cut off after %s, want a few seconds", took.Round(time.Millisecond))
	}
	if !strings.HasPrefix(answer, "HTTP/1.1 401") {
		t.Errorf("the server answered %q, want 401", answer)
	}
}

func TestAnUnauthenticatedPostWithALargeBodyIsRefusedWithoutReadingIt(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{Nodes: 1})
	c.Leader(10 * time.Second)
	for _, tt := range []struct{ path, length string }{
		{"/v1/plans", "100000000"}, {"/v1/plans/orders/start", "100000000"}, {"/v1/members", "100000000"},
		{"/v1/plans", "1000"}, {"/v1/plans/orders/start", "1000"}, {"/v1/members", "1000"},
	} {
		t.Run("POST "+tt.path+" of "+tt.length+" bytes", func(t *testing.T) {
			// Only 10 bytes of the body are sent: reading it would block.
			conn := rawRequest(t, c, 0, "POST "+tt.path+" HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: "+tt.length+"\r\n\r\n0123456789")
			took, answer := closedWithin(t, conn, 20*time.Second)
			if took > 3*time.Second {
				t.Errorf("the refusal took %s: the server waited for the body", took.Round(time.Millisecond))
			}
			resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(answer)), nil)
			if err != nil {
				t.Fatalf("no HTTP answer: %v (%q)", err, answer)
			}
			if resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("status %d, want 401", resp.StatusCode)
			}
		})
	}
}

func TestAnAgentRefusesToListenBeyondLoopbackWithoutTLSOrAReadToken(t *testing.T) {
	base := agent.Config{NodeID: "n1", OperatorToken: redact.Secret(agenttest.OperatorToken), ReadToken: redact.Secret(agenttest.ReadToken)}
	tests := []struct {
		name  string
		tweak func(*agent.Config)
		want  []string
	}{
		{"raft on every interface without TLS", func(c *agent.Config) { c.RaftBind, c.APIListen = "0.0.0.0:0", "127.0.0.1:0" },
			[]string{"raft listens on 0.0.0.0:0", "agent.tls", "agent.insecure: true"}},
		{"the API on every interface without TLS", func(c *agent.Config) { c.RaftBind, c.APIListen = "127.0.0.1:0", ":0" },
			[]string{"the API listens on :0", "agent.insecure: true"}},
		{"the API on every interface with open reads", func(c *agent.Config) {
			c.RaftBind, c.APIListen, c.Insecure, c.ReadToken = "127.0.0.1:0", "0.0.0.0:0", true, ""
		}, []string{"no read token", "agent.api.tokens.read", "insecure_open_reads: true"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := base
			cfg.DataDir = filepath.Join(t.TempDir(), "data")
			tt.tweak(&cfg)
			n, err := agent.Start(cfg)
			if err == nil {
				n.Stop()
				t.Fatal("the agent started")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("the refusal does not say %q: %v", w, err)
				}
			}
		})
	}
	t.Run("insecure and insecure_open_reads accept it", func(t *testing.T) {
		cfg := base
		cfg.DataDir = filepath.Join(t.TempDir(), "data")
		cfg.RaftBind, cfg.APIListen, cfg.Insecure, cfg.InsecureOpenReads, cfg.ReadToken = "0.0.0.0:0", "0.0.0.0:0", true, true, ""
		cfg.Bootstrap = true
		n, err := agent.Start(cfg)
		if err != nil {
			t.Fatalf("refused: %v", err)
		}
		if err := n.Stop(); err != nil {
			t.Error(err)
		}
	})
}
