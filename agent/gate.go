package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/hashicorp/raft"

	"github.com/cutover/cutover/switch/gate"
)

// Headers between agents.
const (
	// hdrForwardedBy marks a request one agent forwards to the leader; the
	// receiver never forwards it again.
	hdrForwardedBy = "X-Cutover-Forwarded-By"
	// hdrActor carries the original caller's identity on a forwarded write.
	hdrActor = "X-Cutover-Actor"
	// hdrUser is what a client says about who runs it (the CLI sends
	// user@host); recorded in the audit log next to the token's role.
	hdrUser = "X-Cutover-User"
)

// Gate answers whether plan may flip now (plan "" means the single active
// plan), linearizably and within the gate timeout:
//
//   - on the leader: it waits until its leader loop has caught up (Barrier),
//     notes the commit index, confirms its leadership with a majority
//     (VerifyLeader), waits until the state machine has applied everything
//     up to that index, and only then reads the phase (the read-index
//     protocol);
//   - on a follower: it asks the leader's API, with the time left;
//   - a node that cannot do either in time (cut off from the majority, no
//     leader) answers closed, with the reason.
func (n *Node) Gate(ctx context.Context, plan string) gate.Response {
	return n.gate(ctx, plan, false)
}

func (n *Node) gate(ctx context.Context, plan string, forwarded bool) gate.Response {
	ctx, cancel := context.WithTimeout(ctx, n.cfg.GateTimeout)
	defer cancel()
	start := time.Now()
	var r gate.Response
	switch {
	case n.IsLeader():
		r = n.gateOnLeader(ctx, plan)
	case forwarded:
		r = gate.Closed(plan, "asked as the leader, but this node is no longer the leader")
	default:
		r = n.gateViaLeader(ctx, plan)
	}
	n.metrics.observeGate(r.Open, time.Since(start))
	return r
}

func (n *Node) gateOnLeader(ctx context.Context, plan string) gate.Response {
	for !n.Established() {
		if !n.IsLeader() {
			return gate.Closed(plan, "lost leadership while answering")
		}
		select {
		case <-ctx.Done():
			return gate.Closed(plan, "leadership not established in time (the leader is still catching up)")
		case <-time.After(5 * time.Millisecond):
		}
	}
	readIndex := n.raft.CommitIndex()
	if err := n.verifyLeader(ctx); err != nil {
		return gate.Closed(plan, fmt.Sprintf("leadership not confirmed by a majority: %v", err))
	}
	if err := n.waitApplied(ctx, readIndex); err != nil {
		return gate.Closed(plan, fmt.Sprintf("state not applied up to the commit index %d in time: %v", readIndex, err))
	}
	return n.decide(plan)
}

// verifyLeader confirms with a majority that this node still leads. Raft's
// future cannot be cancelled; the goroutine that waits on it ends when Raft
// resolves it, which it does within the leader lease at the latest.
func (n *Node) verifyLeader(ctx context.Context) error {
	f := n.raft.VerifyLeader()
	errc := make(chan error, 1)
	go func() { errc <- f.Error() }()
	select {
	case err := <-errc:
		return raftErr(err)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// waitApplied waits until the state machine reflects every command up to
// index. The FSM sees only commands, not Raft's no-op and configuration
// entries, so it checks the log for commands between the FSM's index and
// index, and falls back to a Barrier when those entries are gone
// (truncated by a snapshot, which only happens to applied entries, but the
// barrier is the safe answer).
func (n *Node) waitApplied(ctx context.Context, index uint64) error {
	for {
		changed := n.fsm.Changed()
		applied := n.fsm.Index()
		if applied >= index {
			return nil
		}
		pending := false
		for i := applied + 1; i <= index; i++ {
			var l raft.Log
			if err := n.store.GetLog(i, &l); err != nil {
				return n.barrier(ctx)
			}
			if l.Type == raft.LogCommand {
				pending = true
				break
			}
		}
		if !pending {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (n *Node) barrier(ctx context.Context) error {
	timeout := time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
	}
	return raftErr(n.raft.Barrier(timeout).Error())
}

// decide reads the plan from the local state (already known to be current).
func (n *Node) decide(plan string) gate.Response {
	if plan == "" {
		var active []string
		for _, p := range n.fsm.Plans() {
			if !p.Phase.Terminal() {
				active = append(active, p.Name)
			}
		}
		switch len(active) {
		case 0:
			return gate.Closed("", "no active plan")
		case 1:
			plan = active[0]
		default:
			return gate.Closed("", fmt.Sprintf("%d active plans (%s): name one with /v1/gate/{plan}", len(active), strings.Join(active, ", ")))
		}
	}
	p, ok := n.fsm.Plan(plan)
	if !ok {
		return gate.Closed(plan, fmt.Sprintf("no plan named %q", plan))
	}
	return gate.Decide(p.Name, string(p.Phase), p.Epoch)
}

// gateViaLeader asks the leader. A follower that has not heard from the
// leader within a heartbeat timeout is probably cut off: it answers closed
// at once rather than wait for a dial to fail.
func (n *Node) gateViaLeader(ctx context.Context, plan string) gate.Response {
	id, api, err := n.leaderAPI()
	if err != nil {
		return gate.Closed(plan, fmt.Sprintf("cannot reach a leader: %v (this node may be cut off from the majority)", err))
	}
	if since := time.Since(n.raft.LastContact()); since > n.cfg.HeartbeatTimeout {
		return gate.Closed(plan, fmt.Sprintf("no contact with leader %s for %s (this node may be cut off from the majority)", id, since.Round(time.Millisecond)))
	}
	u := strings.TrimRight(api, "/") + "/v1/gate"
	if plan != "" {
		u += "/" + url.PathEscape(plan)
	}
	u += "?format=" + gate.FormatAlways200
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return gate.Closed(plan, fmt.Sprintf("ask leader %s: %v", id, err))
	}
	req.Header.Set("Authorization", "Bearer "+n.cfg.OperatorToken.Reveal())
	req.Header.Set(hdrForwardedBy, n.cfg.NodeID)
	resp, err := n.client.Do(req)
	if err != nil {
		return gate.Closed(plan, fmt.Sprintf("cannot reach leader %s: %v", id, err))
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil || resp.StatusCode != http.StatusOK {
		return gate.Closed(plan, fmt.Sprintf("leader %s answered HTTP %d", id, resp.StatusCode))
	}
	var r gate.Response
	if err := json.Unmarshal(body, &r); err != nil {
		return gate.Closed(plan, fmt.Sprintf("leader %s: undecodable answer: %v", id, err))
	}
	return r
}
