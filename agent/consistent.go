package agent

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"time"
)

// Consistent reads, as Consul has them. Every answer carries, in
// X-Cutover-Index, the Raft index of the state it reflects (at least: the
// state may be a little newer). A read may ask:
//
//   - ?index=N: answer once this agent has applied index N, waiting up to
//     maxIndexWait (then 504, with the index it did reach). A client that
//     passes the index of its own last write never reads a state older
//     than one it caused, whichever agent it asks;
//   - ?consistent: answer only after the leader confirmed with a majority
//     that it still leads and applied everything committed before the
//     read (a follower forwards the read to the leader).

// HeaderIndex is the header that carries the Raft index of an answer.
const HeaderIndex = "X-Cutover-Index"

// maxIndexWait bounds how long a read waits for ?index.
const maxIndexWait = 10 * time.Second

// setIndex stamps the answer with the index this agent has applied.
func (n *Node) setIndex(w http.ResponseWriter) {
	w.Header().Set(HeaderIndex, strconv.FormatUint(n.fsm.Index(), 10))
}

// readAt applies ?index and ?consistent to a read. It answers itself (an
// error, or a read forwarded to the leader) and returns false, or stamps
// the index and returns true for the handler to answer.
func (n *Node) readAt(w http.ResponseWriter, r *http.Request) bool {
	q := r.URL.Query()
	if q.Has("consistent") {
		if !n.IsLeader() {
			if r.Header.Get(hdrForwardedBy) != "" {
				n.setIndex(w)
				n.writeError(w, ErrNotLeader)
				return false
			}
			n.forward(w, r, nil)
			return false
		}
		ctx, cancel := context.WithTimeout(r.Context(), maxIndexWait)
		err := n.confirmLeadership(ctx)
		cancel()
		if err != nil {
			n.setIndex(w)
			n.writeError(w, err)
			return false
		}
	}
	if s := q.Get("index"); s != "" {
		want, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			n.setIndex(w)
			writeJSON(w, http.StatusBadRequest, errorBody{Error: fmt.Sprintf("index %q is not a Raft index (a whole number)", s), Code: "bad_request"})
			return false
		}
		ctx, cancel := context.WithTimeout(r.Context(), maxIndexWait)
		err = n.fsm.WaitIndex(ctx, want)
		cancel()
		if err != nil {
			n.setIndex(w)
			writeJSON(w, http.StatusGatewayTimeout, errorBody{
				Error: fmt.Sprintf("%s has applied up to index %d, not %d, after waiting %s: it is behind the leader; ask again, or ask another agent", n.cfg.NodeID, n.fsm.Index(), want, maxIndexWait),
				Code:  "index_timeout",
			})
			return false
		}
	}
	n.setIndex(w)
	return true
}

// confirmLeadership is the leader's side of a consistent read: leadership
// established, confirmed by a majority, and the state applied up to the
// commit index seen before the confirmation.
func (n *Node) confirmLeadership(ctx context.Context) error {
	for !n.Established() {
		if !n.IsLeader() {
			return ErrNotLeader
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("leadership not established in time: %w", ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
	readIndex := n.raft.CommitIndex()
	if err := n.verifyLeader(ctx); err != nil {
		return fmt.Errorf("leadership not confirmed by a majority: %w", err)
	}
	if err := n.waitApplied(ctx, readIndex); err != nil {
		return fmt.Errorf("state not applied up to %d: %w", readIndex, err)
	}
	return nil
}
