package agent_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
	"github.com/cutover/cutover/agent/client"
)

type nodeState struct {
	Plans   []agent.Plan
	Audit   []agent.AuditEntry
	Members []agent.Member
}

func stateOf(n *agent.Node) nodeState {
	f := n.FSM()
	return nodeState{Plans: f.Plans(), Audit: f.Audit("", 0), Members: f.Members()}
}

func TestRestartAllFromDiskRestoresSnapshotAndLog(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{Tweak: func(i int, cfg *agent.Config) {
		cfg.SnapshotThreshold = 8
		cfg.SnapshotInterval = 50 * time.Millisecond
		cfg.TrailingLogs = 4
		cfg.WALSegmentSize = 32 << 10
	}})
	leader := c.Leader(10 * time.Second)
	lc := c.Client(leader.Index)
	for _, name := range []string{"orders", "sessions", "billing"} {
		mustCreate(t, lc, name)
	}
	walkTo(t, lc, "orders", agent.PhaseSwitched)
	walkTo(t, lc, "sessions", agent.PhaseFenced)
	if _, err := leader.Node.Propose(agenttest.Ctx(t, 5*time.Second), agent.Command{Op: agent.OpIntent, Plan: "sessions", Step: "catch_up", Origin: agent.OriginDriver}); err != nil {
		t.Fatal(err)
	}
	write(t, func(ctx context.Context) (agent.PlanInfo, error) { return lc.Abort(ctx, "billing", "not this week") },
		func(err error) bool { return strings.Contains(err.Error(), "already in that phase") })
	last := leader.Node.FSM().Index()

	// Every node snapshots and truncates its log.
	agenttest.Eventually(t, 10*time.Second, func() error {
		for _, m := range c.Members() {
			n := c.Node(m.Index)
			first, _, err := n.LogBounds()
			if err != nil {
				return err
			}
			if st := n.Status(); st.LastSnapshotIndex == 0 || first <= 1 || n.FSM().Index() < last {
				return fmt.Errorf("%s: snapshot at %d, log from %d, applied %d of %d", m.ID, st.LastSnapshotIndex, first, n.FSM().Index(), last)
			}
		}
		return nil
	})
	before := map[string]nodeState{}
	for _, m := range c.Members() {
		before[m.ID] = stateOf(c.Node(m.Index))
	}
	if !reflect.DeepEqual(before["n1"], before["n2"]) || !reflect.DeepEqual(before["n1"], before["n3"]) {
		t.Fatal("nodes disagree before the restart")
	}

	c.StopAll()
	for _, m := range c.Members() {
		c.Restart(m.Index)
	}
	next := c.Leader(10 * time.Second)

	agenttest.Eventually(t, 10*time.Second, func() error {
		for _, m := range c.Members() {
			n := c.Node(m.Index)
			got, want := stateOf(n), before[m.ID]
			if !reflect.DeepEqual(got.Plans, want.Plans) {
				return fmt.Errorf("%s: plans differ after restart\n got %+v\nwant %+v", m.ID, got.Plans, want.Plans)
			}
			// A new leader may register itself: the audit log only grows.
			if len(got.Audit) < len(want.Audit) || !reflect.DeepEqual(got.Audit[:len(want.Audit)], want.Audit) {
				return fmt.Errorf("%s: audit log is not the old one extended", m.ID)
			}
		}
		return nil
	})
	for _, m := range c.Members() {
		n := c.Node(m.Index)
		first, _, _ := n.LogBounds()
		if first <= 1 || n.Status().LastSnapshotIndex == 0 {
			t.Errorf("%s restarted without its snapshot (log from %d)", m.ID, first)
		}
	}
	// The plans that began before the first retained log entry can only
	// have come back from the snapshot.
	for _, m := range c.Members() {
		n := c.Node(m.Index)
		first, _, _ := n.LogBounds()
		if oldest := n.FSM().Audit("", 0)[0].Index; oldest >= first {
			t.Errorf("%s: the oldest command (%d) is still in the log (from %d): the snapshot was not needed", m.ID, oldest, first)
		}
	}
	// The cluster goes on where it stopped; the epoch keeps growing.
	done := walkTo(t, c.Client(next.Index), "orders", agent.PhaseDone)
	if old := before["n1"].Plans[1]; old.Name != "orders" || done.Epoch <= old.Epoch {
		t.Fatalf("epoch %d after restart, %d before (%s)", done.Epoch, old.Epoch, old.Name)
	}
}

// testPKI is a CA and certificates made in the test.
type testPKI struct {
	caCert *x509.Certificate
	caKey  *ecdsa.PrivateKey
	pool   *x509.CertPool
}

func newPKI(t *testing.T) *testPKI {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "cutover test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testPKI{caCert: cert, caKey: key, pool: pool}
}

// issue makes a certificate for 127.0.0.1 usable as server and client.
func (p *testPKI) issue(t *testing.T, name string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, &key.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func TestMutualTLSOnRaftAndAPI(t *testing.T) {
	pki := newPKI(t)
	certs := []tls.Certificate{pki.issue(t, "n1"), pki.issue(t, "n2"), pki.issue(t, "n3")}
	c := agenttest.New(t, agenttest.Options{Tweak: func(i int, cfg *agent.Config) {
		cfg.TLS = &agent.TLS{Certificate: certs[i], CAs: pki.pool}
		for j := range cfg.Peers {
			cfg.Peers[j].API = strings.Replace(cfg.Peers[j].API, "http://", "https://", 1)
		}
	}})
	// Raft elects and replicates over mutual TLS.
	leader := c.Leader(10 * time.Second)
	follower := (leader.Index + 1) % 3
	url := func(i int) string { return "https://" + c.Members()[i].APIAddr }
	clientCert := pki.issue(t, "operator")
	okTLS := &tls.Config{Certificates: []tls.Certificate{clientCert}, RootCAs: pki.pool}
	fc := client.New(url(follower), agenttest.OperatorToken, client.WithTLS(okTLS))
	// A write through a follower is forwarded to the leader over mutual TLS.
	if _, err := fc.CreatePlan(agenttest.Ctx(t, 10*time.Second), agent.CreatePlanRequest{Spec: specFor("orders"), AllowLiteralSecrets: true}); err != nil {
		t.Fatal(err)
	}
	if r, err := fc.Gate(agenttest.Ctx(t, 5*time.Second), "orders"); err != nil || r.Phase != "pending" {
		t.Fatalf("gate over TLS via a follower: %+v %v", r, err)
	}

	otherCA := newPKI(t)
	tests := []struct {
		name string
		conf *tls.Config
	}{
		{"a client without a certificate is refused", &tls.Config{RootCAs: pki.pool}},
		{"a client with a certificate from another CA is refused", &tls.Config{Certificates: []tls.Certificate{otherCA.issue(t, "intruder")}, RootCAs: pki.pool}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: tt.conf}}
			resp, err := hc.Get(url(follower) + "/healthz")
			if err == nil {
				resp.Body.Close()
				t.Fatalf("got HTTP %d, want a TLS failure", resp.StatusCode)
			}
		})
	}
	t.Run("plain HTTP is refused", func(t *testing.T) {
		resp, err := http.Get("http://" + c.Members()[follower].APIAddr + "/healthz")
		if err == nil {
			defer resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				t.Fatal("plain HTTP served")
			}
		}
	})
}
