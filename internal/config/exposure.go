package config

import (
	"fmt"
	"net"
	"strings"
)

// Loopback reports whether a listen address (host:port) only accepts
// connections from this machine: localhost or a loopback IP. An empty host
// or 0.0.0.0 listens on every interface and is not loopback.
func Loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// ExposureProblems says why an agent must not listen where it is asked to:
// Raft or the API on a non-loopback address without TLS (unless insecure),
// or the API on a non-loopback address with open reads (no read token,
// unless insecureOpenReads). Each problem is keyed by the setting that
// would fix it. The agent checks the same at start.
func ExposureProblems(raftBind, apiListen string, tls, hasReadToken, insecure, insecureOpenReads bool) []Problem {
	var ps problems
	if !tls && !insecure {
		if !Loopback(raftBind) {
			ps.add("agent.tls", "raft listens on %s, not a loopback address, without TLS: the plans (with their DSNs) and the votes would cross the network in clear, and anyone who reaches the port could pose as a peer; configure agent.tls (cert_file, key_file, ca_file), bind to 127.0.0.1, or set agent.insecure: true to accept that", raftBind)
		}
		if !Loopback(apiListen) {
			ps.add("agent.tls", "the API listens on %s, not a loopback address, without TLS: tokens and answers would cross the network in clear; configure agent.tls, listen on 127.0.0.1, or set agent.insecure: true to accept that", apiListen)
		}
	}
	if !hasReadToken && !insecureOpenReads && !Loopback(apiListen) {
		ps.add("agent.api.tokens.read", "the API listens on %s, not a loopback address, with no read token: anyone who reaches it could read the plans, the status and the audit log; set agent.api.tokens.read (e.g. ${CUTOVER_READ_TOKEN}), listen on 127.0.0.1, or set agent.api.insecure_open_reads: true to accept that", apiListen)
	}
	return ps
}

// ExposureError joins exposure problems into one error, or nil.
func ExposureError(ps []Problem) error {
	if len(ps) == 0 {
		return nil
	}
	msgs := make([]string, len(ps))
	for i, p := range ps {
		msgs[i] = p.Message
	}
	return fmt.Errorf("refusing to listen: %s", strings.Join(msgs, "; "))
}
