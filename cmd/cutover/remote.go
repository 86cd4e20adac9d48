package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/user"
	"time"

	"github.com/spf13/cobra"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/client"
)

// DefaultAddr is the agent API the CLI talks to when neither --addr nor
// CUTOVER_ADDR says otherwise.
const DefaultAddr = "http://127.0.0.1:8420"

// remote holds the flags of commands that call an agent's API.
type remote struct {
	addr, token               string
	caFile, certFile, keyFile string
	timeout                   time.Duration
	leaderWait                time.Duration
}

func (r *remote) register(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&r.addr, "addr", "", "agent API base URL (default $CUTOVER_ADDR, then "+DefaultAddr+")")
	f.StringVar(&r.token, "token", "", "API token (default $CUTOVER_TOKEN; prefer the variable: flags show in ps)")
	f.StringVar(&r.caFile, "ca-file", "", "CA bundle for an agent with mutual TLS (default $CUTOVER_CA_FILE)")
	f.StringVar(&r.certFile, "cert-file", "", "client certificate for mutual TLS (default $CUTOVER_CERT_FILE)")
	f.StringVar(&r.keyFile, "key-file", "", "client key for mutual TLS (default $CUTOVER_KEY_FILE)")
	f.DurationVar(&r.timeout, "request-timeout", 30*time.Second, "timeout of each API call")
	f.DurationVar(&r.leaderWait, "wait-leader", 15*time.Second, "how long a call waits for the agents to elect a leader (or to start listening) before it gives up; 0 fails at once")
}

func firstSet(vals ...string) string {
	for _, v := range vals {
		if v != "" {
			return v
		}
	}
	return ""
}

// client builds the API client, teaching the redactor the token.
func (r *remote) client(g *globals) (*client.Client, string, error) {
	return r.clientFor(g, firstSet(r.addr, os.Getenv("CUTOVER_ADDR"), DefaultAddr))
}

// clientFor is client for another agent than --addr (the leader, say), with
// the same token and TLS settings.
func (r *remote) clientFor(g *globals, addr string) (*client.Client, string, error) {
	token := firstSet(r.token, os.Getenv("CUTOVER_TOKEN"))
	if token != "" {
		g.redactor.Add(token)
	}
	hc := &http.Client{Timeout: r.timeout}
	ca := firstSet(r.caFile, os.Getenv("CUTOVER_CA_FILE"))
	cert := firstSet(r.certFile, os.Getenv("CUTOVER_CERT_FILE"))
	key := firstSet(r.keyFile, os.Getenv("CUTOVER_KEY_FILE"))
	if ca != "" || cert != "" {
		conf, err := clientTLS(ca, cert, key)
		if err != nil {
			return nil, "", withCode(exitError, err)
		}
		hc.Transport = &http.Transport{TLSClientConfig: conf}
	}
	opts := []client.Option{client.WithHTTPClient(hc), client.WithIndex(lastIndex(addr)), client.WithLeaderWait(r.leaderWait)}
	if u := whoami(); u != "" {
		opts = append(opts, client.WithUser(u))
	}
	c := client.New(addr, token, opts...)
	g.clients = append(g.clients, addrClient{addr: addr, c: c})
	return c, addr, nil
}

func clientTLS(caFile, certFile, keyFile string) (*tls.Config, error) {
	conf := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("read ca: %w", err)
		}
		conf.RootCAs = x509.NewCertPool()
		if !conf.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("no PEM certificate in %s", caFile)
		}
	}
	if certFile != "" || keyFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("load client certificate: %w", err)
		}
		conf.Certificates = []tls.Certificate{cert}
	}
	return conf, nil
}

// whoami is user@host, recorded in the audit log of the calls it makes.
func whoami() string {
	name := os.Getenv("USER")
	if u, err := user.Current(); err == nil && u.Username != "" {
		name = u.Username
	}
	host, _ := os.Hostname()
	if name == "" {
		return host
	}
	return name + "@" + host
}

// apiExit maps an API call's error to an exit code: 1 when the agent said
// no (refused transition, stale epoch, unknown plan, bad input), 2 when the
// answer could not be had (unreachable, unauthorized, no leader, 5xx).
func apiExit(err error) error {
	if err == nil {
		return nil
	}
	var coded *exitCodeError
	if errors.As(err, &coded) {
		return err
	}
	var e *client.Error
	if errors.As(err, &e) && e.Status >= 400 && e.Status < 500 &&
		e.Status != http.StatusUnauthorized && e.Status != http.StatusForbidden {
		return withCode(exitFailed, err)
	}
	if errors.Is(err, agent.ErrLeadershipLost) {
		return withCode(exitError, fmt.Errorf("%w (check with cutover plan show)", err))
	}
	return withCode(exitError, err)
}
