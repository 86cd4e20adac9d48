package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/raft"
	"go.uber.org/zap"

	"github.com/cutover/cutover/internal/config"
)

// handOver is called by a leader whose driver cannot resolve a plan's
// spec: it lacks a variable the plan references. It asks the other voters
// (their /v1/status says, per plan, which variables each lacks) and hands
// leadership to the first that has them all. When none has, the plan waits
// with the reason in its driver status, and the next failure asks again.
func (n *Node) handOver(ctx context.Context, plan string, missing *config.MissingEnvError, log *zap.Logger) {
	f := n.raft.GetConfiguration()
	if f.Error() != nil {
		return
	}
	for _, s := range f.Configuration().Servers {
		id := string(s.ID)
		if id == n.cfg.NodeID || s.Suffrage != raft.Voter {
			continue
		}
		ok, err := n.peerHas(ctx, id, plan)
		if err != nil {
			log.Debug("cannot ask a peer for its variables", zap.String("peer", id), zap.Error(err))
			continue
		}
		if !ok {
			continue
		}
		log.Warn("this agent lacks variables the plan needs; handing leadership to a peer that has them",
			zap.Strings("missing", missing.Names), zap.String("to", id))
		if err := n.raft.LeadershipTransferToServer(s.ID, s.Address).Error(); err != nil {
			log.Warn("leadership transfer failed", zap.String("to", id), zap.Error(err))
		}
		return
	}
}

// peerHas reports whether peer id knows every variable plan references.
func (n *Node) peerHas(ctx context.Context, id, plan string) (bool, error) {
	st, err := n.peerStatus(ctx, id)
	if err != nil {
		return false, err
	}
	for _, p := range st.Plans {
		if p.Name == plan {
			return len(p.MissingEnv) == 0, nil
		}
	}
	return false, nil // not applied there yet
}

// peerStatus asks peer id for its /v1/status.
func (n *Node) peerStatus(ctx context.Context, id string) (Status, error) {
	api := n.peerAPI[id]
	if m, ok := n.fsm.Member(id); ok && m.API != "" {
		api = m.API
	}
	if api == "" {
		return Status{}, fmt.Errorf("the API address of %s is unknown", id)
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimRight(api, "/")+"/v1/status", nil)
	if err != nil {
		return Status{}, err
	}
	req.Header.Set("Authorization", "Bearer "+n.cfg.OperatorToken.Reveal())
	resp, err := n.client.Do(req)
	if err != nil {
		return Status{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return Status{}, fmt.Errorf("status %d", resp.StatusCode)
	}
	var st Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return Status{}, err
	}
	return st, nil
}

// votersUnderstand checks, on the leader, that every voter applies command
// version v, asking each other voter's /v1/status. A voter that runs an
// older build, or cannot be asked, makes it refuse: a command some voters
// refuse and others apply would make their states diverge.
func (n *Node) votersUnderstand(ctx context.Context, v int, op Op) error {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return fmt.Errorf("%w: read the Raft configuration: %v", ErrNoLeader, err)
	}
	for _, s := range f.Configuration().Servers {
		id := string(s.ID)
		if id == n.cfg.NodeID || s.Suffrage != raft.Voter {
			continue
		}
		st, err := n.peerStatus(ctx, id)
		if err != nil {
			return fmt.Errorf("%w: %s cannot be asked which command versions it applies (%v); %s needs every voter to apply version %d: bring %s back or remove it first",
				ErrUnsupportedVersion, id, err, op, v, id)
		}
		if st.CommandVersion < v {
			return fmt.Errorf("%w: %s applies command versions up to %d; %s needs version %d on every voter: upgrade %s first",
				ErrUnsupportedVersion, id, st.CommandVersion, op, v, id)
		}
	}
	if n.fsm.maxCommandVersion() < v {
		return fmt.Errorf("%w: this agent applies command versions up to %d; %s needs version %d", ErrUnsupportedVersion, n.fsm.maxCommandVersion(), op, v)
	}
	return nil
}
