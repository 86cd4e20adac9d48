// Package agent is the clustered cutover agent: a Raft node
// (hashicorp/raft, raft-wal log and stable store, file snapshots, TCP
// transport with optional mutual TLS), the replicated state machine of
// cutover plans, the leader's plan driver, the HTTP API and the gate.
//
// One file per concept, as in hashicorp/raft:
//
//   - phase.go: the phases of a plan and which moves are legal;
//   - command.go: the versioned commands of the replicated log;
//   - state.go, fsm.go: the state machine (plans, epochs, steps, members,
//     audit log), who may move a plan (the driver or an operator: commands
//     carry their origin), its snapshots, and its read methods;
//   - spec.go: sealing a plan's specification (with its secrets) for the log;
//   - node.go: starting and stopping an agent, proposing commands;
//   - leader.go: the leader loop (one per term, from raft's NotifyCh, after a
//     Barrier), the Driver, Finalizer and Proposer contracts, and what it
//     does with a driver's errors (retried and recorded, or, when marked
//     Permanent, the plan aborted);
//   - gate.go: the linearizable gate;
//   - api.go: the HTTP API, its authorization and forwarding;
//   - transport.go: the Raft stream layer and TLS;
//   - metrics.go, hclog.go: Prometheus metrics, raft's logs into zap.
//
// The epoch of a plan is the Raft index of the command that began its
// current step; it only grows, and every side effect carries it as a
// fencing token. agent/agenttest runs clusters in a test process;
// agent/faultnet cuts their links; agent/client calls the API.
package agent
