package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/hashicorp/raft"
)

// DialFunc opens a connection to another agent. Every connection a node
// opens to its peers (Raft RPCs and forwarded API calls) goes through one,
// so that tests can cut links (see agent/faultnet).
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// streamLayer is the Raft transport's network: TCP, optionally with mutual
// TLS, dialing through a DialFunc.
type streamLayer struct {
	ln        net.Listener
	advertise net.Addr
	dial      DialFunc
	serverTLS *tls.Config // nil: plain TCP
	clientTLS *tls.Config
}

var _ raft.StreamLayer = (*streamLayer)(nil)

// Accept wraps each connection in TLS when configured. The handshake runs on
// the first read, in Raft's connection goroutine, so a peer that fails it
// (no certificate, wrong CA) only loses its own connection.
func (s *streamLayer) Accept() (net.Conn, error) {
	c, err := s.ln.Accept()
	if err != nil {
		return nil, err
	}
	if s.serverTLS != nil {
		return tls.Server(c, s.serverTLS), nil
	}
	return c, nil
}

func (s *streamLayer) Close() error   { return s.ln.Close() }
func (s *streamLayer) Addr() net.Addr { return s.advertise }

// Dial connects to a peer's Raft address. With TLS it completes the
// handshake within timeout, so that a peer with a bad certificate fails here
// and not in the middle of an RPC.
func (s *streamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := s.dial(ctx, "tcp", string(address))
	if err != nil {
		return nil, err
	}
	if s.clientTLS == nil {
		return c, nil
	}
	conf := s.clientTLS.Clone()
	if host, _, err := net.SplitHostPort(string(address)); err == nil {
		conf.ServerName = host
	}
	tc := tls.Client(c, conf)
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("tls handshake with %s: %w", address, err)
	}
	return tc, nil
}

type tcpAddr string

func (a tcpAddr) Network() string { return "tcp" }
func (a tcpAddr) String() string  { return string(a) }

// TLS is the mutual TLS material of an agent: its certificate and the CA
// that signs every agent's and every client's certificate. Both Raft and
// the API require and verify a client certificate from that CA; a peer's
// certificate must name the host it is dialed at (IP SAN for an address).
type TLS struct {
	Certificate tls.Certificate
	CAs         *x509.CertPool
}

// LoadTLS reads a PEM certificate, its key and a CA bundle.
func LoadTLS(certFile, keyFile, caFile string) (*TLS, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load tls key pair: %w", err)
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("load tls ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, errors.New("load tls ca: no PEM certificate in " + caFile)
	}
	return &TLS{Certificate: cert, CAs: pool}, nil
}

// ServerConfig requires and verifies a client certificate signed by the CA.
func (t *TLS) ServerConfig() *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{t.Certificate},
		ClientCAs:    t.CAs,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	}
}

// ClientConfig presents the agent's certificate and trusts only the CA.
func (t *TLS) ClientConfig() *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{t.Certificate},
		RootCAs:      t.CAs,
		MinVersion:   tls.VersionTLS12,
	}
}
