// Package faultnet is a network of named agents whose links a test can
// cut, the way raft's testing.go disconnects its in-memory transports, but
// over real TCP: every connection an agent opens to another goes through
// the agent's Dialer, so cutting a link refuses new dials and closes the
// connections already open on it, in both directions.
//
// It cuts connections between agents only; a test's own client still
// reaches every agent, which is what lets a test ask a cut-off node for its
// gate.
package faultnet

import (
	"context"
	"errors"
	"net"
	"sync"
)

// ErrCut is the dial error on a cut link.
var ErrCut = errors.New("faultnet: link cut")

type link struct{ from, to string }

// Net tracks agents' addresses, cut links and open connections. It is safe
// for concurrent use.
type Net struct {
	mu    sync.Mutex
	names map[string]string // address -> agent name
	cut   map[link]bool
	conns map[link]map[*conn]struct{}
}

// New returns a network with every link up.
func New() *Net {
	return &Net{names: map[string]string{}, cut: map[link]bool{}, conns: map[link]map[*conn]struct{}{}}
}

// Register names the addresses (Raft, API) at which an agent listens.
func (n *Net) Register(name string, addrs ...string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, a := range addrs {
		n.names[a] = name
	}
}

// Dialer returns the dial function for agent from.
func (n *Net) Dialer(from string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		n.mu.Lock()
		to, known := n.names[addr]
		l := link{from, to}
		isCut := known && n.cut[l]
		n.mu.Unlock()
		if isCut {
			return nil, &net.OpError{Op: "dial", Net: network, Err: ErrCut}
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err != nil || !known {
			return c, err
		}
		fc := &conn{Conn: c, n: n, l: l}
		n.mu.Lock()
		defer n.mu.Unlock()
		if n.cut[l] { // cut while dialing
			c.Close()
			return nil, &net.OpError{Op: "dial", Net: network, Err: ErrCut}
		}
		if n.conns[l] == nil {
			n.conns[l] = map[*conn]struct{}{}
		}
		n.conns[l][fc] = struct{}{}
		return fc, nil
	}
}

// Cut cuts the links between a and b, both ways.
func (n *Net) Cut(a, b string) {
	n.mu.Lock()
	var closing []*conn
	for _, l := range []link{{a, b}, {b, a}} {
		n.cut[l] = true
		for c := range n.conns[l] {
			closing = append(closing, c)
		}
		delete(n.conns, l)
	}
	n.mu.Unlock()
	for _, c := range closing {
		c.Conn.Close()
	}
}

// Isolate cuts every link between name and the other registered agents.
func (n *Net) Isolate(name string) {
	n.mu.Lock()
	others := map[string]bool{}
	for _, o := range n.names {
		if o != name {
			others[o] = true
		}
	}
	n.mu.Unlock()
	for o := range others {
		n.Cut(name, o)
	}
}

// Heal restores every link.
func (n *Net) Heal() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.cut = map[link]bool{}
}

type conn struct {
	net.Conn
	n    *Net
	l    link
	once sync.Once
}

func (c *conn) Close() error {
	c.once.Do(func() {
		c.n.mu.Lock()
		delete(c.n.conns[c.l], c)
		c.n.mu.Unlock()
	})
	return c.Conn.Close()
}
