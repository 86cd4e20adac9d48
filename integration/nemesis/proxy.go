package nemesis

import (
	"bytes"
	"io"
	"net"
	"strconv"
	"sync"
	"time"
)

// Proxy is a TCP proxy the test controls, between the agents and one
// database: it passes bytes, adds latency, drops every connection, or
// blackholes (accepts and holds, forwarding nothing) for a while. It stands
// in for network faults, which this kernel cannot add with netem.
type Proxy struct {
	ln     net.Listener
	target string

	mu        sync.Mutex
	conns     map[net.Conn]struct{}
	latency   time.Duration
	blackhole bool
	healed    chan struct{} // closed when the blackhole ends
	// stalled holds the connections a stall caught (by their client
	// side); unstalled is closed when the stall ends.
	stalled   map[net.Conn]bool
	unstalled chan struct{}
	// stallMatch, when set, narrows a stall to the first chunk holding it
	// (and what follows on that connection); stallHits counts them.
	stallMatch []byte
	stallHits  int
	// streamDelay delays what replication connections carry, without
	// limiting their throughput; repl marks them (by client side).
	streamDelay time.Duration
	repl        map[net.Conn]bool
	closed      bool
	wg          sync.WaitGroup
}

// StartProxy listens on a free loopback port and forwards to target.
func StartProxy(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}, healed: make(chan struct{}),
		stalled: map[net.Conn]bool{}, unstalled: make(chan struct{}), repl: map[net.Conn]bool{}}
	close(p.healed)
	close(p.unstalled)
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Port is the proxy's listening port.
func (p *Proxy) Port() int { return p.ln.Addr().(*net.TCPAddr).Port }

// Addr is the proxy's listening address.
func (p *Proxy) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p.Port())) }

// SetLatency delays every chunk forwarded, in both directions, by d (0:
// none).
func (p *Proxy) SetLatency(d time.Duration) {
	p.mu.Lock()
	p.latency = d
	p.mu.Unlock()
}

// DropAll closes every connection through the proxy at once (both ends):
// the agents see their sessions, and their replication stream, cut.
func (p *Proxy) DropAll() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := len(p.conns)
	for c := range p.conns {
		c.Close()
	}
	return n / 2
}

// Blackhole stops forwarding (on) or resumes it (off): connections stay
// open but carry nothing, and new ones are accepted but not connected to
// the database until the blackhole ends, as through a partition.
func (p *Proxy) Blackhole(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if on == p.blackhole {
		return
	}
	p.blackhole = on
	if on {
		p.healed = make(chan struct{})
	} else {
		close(p.healed)
	}
}

// Stall holds whatever the connections open now carry, in both
// directions, until the stall ends (on) or ends it (off), when everything
// held is delivered: a delayed message, as from a connection whose
// packets were retransmitted for seconds. Connections opened during the
// stall pass. What a client sent before it died is still delivered: the
// epoch guards are there for exactly such late requests.
func (p *Proxy) Stall(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stall(on, nil)
}

// StallMatching stalls the connections open now from the first chunk that
// holds match on (match a query's text: the agents connect without TLS),
// until Stall(false): the one late request a test wants, and what follows
// it on that connection.
func (p *Proxy) StallMatching(match string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stall(true, []byte(match))
}

// StallHits is how many chunks a StallMatching caught.
func (p *Proxy) StallHits() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stallHits
}

func (p *Proxy) stall(on bool, match []byte) {
	p.stallMatch = match
	if on {
		if len(p.stalled) == 0 {
			p.unstalled = make(chan struct{})
		}
		for c := range p.conns {
			p.stalled[c] = true
		}
		return
	}
	if len(p.stalled) > 0 {
		p.stalled = map[net.Conn]bool{}
		close(p.unstalled)
	}
}

// SetStreamDelay delays every chunk of the replication connections (a
// startup packet asking for replication) by d, in both directions, without
// limiting their throughput: the stream runs d behind (0: none).
func (p *Proxy) SetStreamDelay(d time.Duration) {
	p.mu.Lock()
	p.streamDelay = d
	p.mu.Unlock()
}

// Heal ends every fault: no latency, no blackhole, no stall.
func (p *Proxy) Heal() {
	p.SetLatency(0)
	p.SetStreamDelay(0)
	p.Blackhole(false)
	p.Stall(false)
}

// Close stops the proxy and closes its connections.
func (p *Proxy) Close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.ln.Close()
	p.Heal()
	p.DropAll()
	p.wg.Wait()
}

// state returns the latency and the channel to wait on before forwarding.
func (p *Proxy) state() (time.Duration, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.latency, p.healed
}

func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		c.Close()
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.stalled, c)
	delete(p.repl, c)
	p.mu.Unlock()
	c.Close()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		if !p.track(c) {
			continue
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.serve(c)
		}()
	}
}

func (p *Proxy) serve(client net.Conn) {
	defer p.untrack(client)
	_, healed := p.state()
	<-healed
	server, err := net.DialTimeout("tcp", p.target, 5*time.Second)
	if err != nil {
		return
	}
	if !p.track(server) {
		return
	}
	defer p.untrack(server)
	type ended struct {
		dst net.Conn
		err error
	}
	done := make(chan ended, 2)
	go func() { done <- ended{server, p.pump(server, client, client)} }()
	go func() { done <- ended{client, p.pump(client, server, client)} }()
	if e := <-done; e.err == nil {
		// One side closed its end cleanly (a client that died after
		// sending): pass the close on once what it sent is delivered,
		// and give the other side a moment to answer and close.
		if tc, ok := e.dst.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
		select {
		case <-done:
		case <-time.After(5 * time.Second):
		}
	}
	// Otherwise end both, as a broken connection does.
	client.Close()
	server.Close()
}

// chunk is what a pump read, and when it may be written.
type chunk struct {
	data []byte
	due  time.Time
}

// pump copies src to dst; key is the connection's client side (what
// stalls and the replication mark are kept by). It returns nil when src
// ended cleanly (EOF) and everything read was written.
func (p *Proxy) pump(dst, src, key net.Conn) error {
	queue := make(chan chunk, 4096)
	wrote := make(chan error, 1)
	go func() {
		// Writes wait for their due time: a delay that keeps the
		// throughput (SetStreamDelay).
		var werr error
		for c := range queue {
			if werr != nil {
				continue // drain, so that the reader never blocks
			}
			if d := time.Until(c.due); d > 0 {
				time.Sleep(d)
			}
			if _, werr = dst.Write(c.data); werr != nil {
				src.Close()
			}
		}
		wrote <- werr
	}()
	buf := make([]byte, 32<<10)
	first := key == src
	var rerr error
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if first {
				first = false
				p.markReplication(key, buf[:n])
			}
			latency, healed := p.state()
			<-healed
			p.waitStall(key, buf[:n])
			if latency > 0 {
				time.Sleep(latency)
			}
			queue <- chunk{data: append([]byte(nil), buf[:n]...), due: time.Now().Add(p.delayOf(key))}
		}
		if err != nil {
			rerr = err
			break
		}
	}
	close(queue)
	werr := <-wrote
	if werr != nil {
		return werr
	}
	if rerr == io.EOF {
		return nil
	}
	return rerr
}

// markReplication marks a connection whose startup packet asks for a
// replication session (the "replication" parameter; the agents connect
// without TLS).
func (p *Proxy) markReplication(key net.Conn, startup []byte) {
	if bytes.Contains(startup, []byte("replication\x00")) {
		p.mu.Lock()
		p.repl[key] = true
		p.mu.Unlock()
	}
}

func (p *Proxy) waitStall(key net.Conn, data []byte) {
	p.mu.Lock()
	hit := p.stalled[key] && (p.stallMatch == nil || bytes.Contains(data, p.stallMatch))
	unstalled := p.unstalled
	if hit && p.stallMatch != nil {
		p.stallHits++
	}
	p.mu.Unlock()
	if hit {
		<-unstalled
	}
}

func (p *Proxy) delayOf(key net.Conn) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.repl[key] {
		return p.streamDelay
	}
	return 0
}

// Link is the agents' way to one database: a Proxy per agent, so that a
// fault may hit every agent's link at once (the methods below) or one
// agent's (Via).
type Link struct {
	Via []*Proxy // by agent, in the order of the cluster's agents
}

// StartLink starts n proxies to target.
func StartLink(target string, n int) (*Link, error) {
	l := &Link{}
	for range n {
		p, err := StartProxy(target)
		if err != nil {
			l.Close()
			return nil, err
		}
		l.Via = append(l.Via, p)
	}
	return l, nil
}

func (l *Link) each(f func(p *Proxy)) {
	for _, p := range l.Via {
		f(p)
	}
}

// SetLatency, Blackhole, Stall, SetStreamDelay and Heal act on every
// agent's proxy; DropAll returns the connections dropped in all.
func (l *Link) SetLatency(d time.Duration) { l.each(func(p *Proxy) { p.SetLatency(d) }) }
func (l *Link) Blackhole(on bool)          { l.each(func(p *Proxy) { p.Blackhole(on) }) }
func (l *Link) Stall(on bool)              { l.each(func(p *Proxy) { p.Stall(on) }) }
func (l *Link) StallMatching(match string) { l.each(func(p *Proxy) { p.StallMatching(match) }) }
func (l *Link) StallHits() int {
	n := 0
	l.each(func(p *Proxy) { n += p.StallHits() })
	return n
}
func (l *Link) SetStreamDelay(d time.Duration) { l.each(func(p *Proxy) { p.SetStreamDelay(d) }) }
func (l *Link) Heal()                          { l.each(func(p *Proxy) { p.Heal() }) }
func (l *Link) Close()                         { l.each(func(p *Proxy) { p.Close() }) }
func (l *Link) DropAll() int {
	n := 0
	l.each(func(p *Proxy) { n += p.DropAll() })
	return n
}
