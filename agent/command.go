package agent

import (
	"encoding/json"
	"time"
)

// CommandVersion is the format version of the commands this build writes.
// The state machine understands it and every version since
// minCommandVersion, and refuses any other, the same way on every node that
// runs this build, recording the refusal in the audit log. A new version
// must only be proposed once every voter runs a build that understands it,
// or the nodes' states would diverge.
//
// Version 2 added Origin: from version 2 on, the state machine refuses the
// moves a plan's driver owns (see CheckOrigin) to commands that do not come
// from the driver. Version 1 commands, found in logs written by older
// builds, are applied as those builds applied them.
//
// Version 3 added delete_plan. A build that understands only version 2
// would refuse the op as unknown while newer nodes apply it, so delete_plan
// is written as version 3 (which such a build refuses as too new, saying
// so in its audit log), the state machine refuses a delete_plan stamped
// with an older version, and the leader proposes it only once every voter
// says (in its /v1/status) that it understands version 3.
const CommandVersion = 3

// opVersion is the version a command of the op is written with: the
// oldest version that carries it, so that a leader running this build
// still commits everything older builds understand during a rolling
// upgrade. Ops not listed are written as version 2.
var opVersion = map[Op]int{OpDeletePlan: 3}

// baseCommandVersion is the version of ops opVersion does not list.
const baseCommandVersion = 2

// versionOf returns the version a command of op is written with.
func versionOf(op Op) int {
	if v, ok := opVersion[op]; ok {
		return v
	}
	return baseCommandVersion
}

// minCommandVersion is the oldest command version this build applies.
const minCommandVersion = 1

// CommandOrigin says where a command comes from. It is set by the agent itself,
// never taken from an API call: the leader's driver proposes with
// OriginDriver, every API call (forwarded or not) with OriginOperator.
type CommandOrigin string

// The origins of commands.
const (
	// OriginDriver: the leader's plan driver (and the leader loop acting
	// for it, such as aborting a plan whose error cannot heal).
	OriginDriver CommandOrigin = "driver"
	// OriginOperator: an API call.
	OriginOperator CommandOrigin = "operator"
)

// Op names what a command does.
type Op string

// The operations of the replicated state machine.
const (
	// OpCreatePlan adds a plan in phase pending.
	OpCreatePlan Op = "create_plan"
	// OpTransition moves a plan to another phase in one step (the API's
	// start, abort and transition calls). Its index becomes the epoch.
	OpTransition Op = "transition"
	// OpIntent records that the leader is about to run a step, before the
	// side effect. Its index becomes the epoch the side effect carries.
	OpIntent Op = "intent"
	// OpOutcome records how the step begun at Epoch ended, after the side
	// effect, and optionally moves the plan to To in the same entry.
	OpOutcome Op = "outcome"
	// OpFinalize records that the driver released what a terminal plan held
	// (slots, publications, fences), so that no later leader does it again.
	OpFinalize Op = "finalize"
	// OpSetMember records a member's Raft and API addresses.
	OpSetMember Op = "set_member"
	// OpRemoveMember forgets a member.
	OpRemoveMember Op = "remove_member"
	// OpDeletePlan forgets a finished (terminal, finalized) plan.
	OpDeletePlan Op = "delete_plan"
	// OpDriverError records how the leader's driver fares with a plan that
	// fails and is retried: the consecutive failures, the total retries and
	// the last (redacted) error. It changes neither the phase nor the
	// epoch, nor the plan's Index: the driver is not called again for it.
	OpDriverError Op = "driver_error"
)

// Command is one entry of the replicated log. Everything Apply needs is in
// the command, including the time (At): Apply never reads the clock, so
// every node computes the same state from the same log.
type Command struct {
	// Version is CommandVersion when proposed by this build.
	Version int `json:"v"`
	Op      Op  `json:"op"`
	// At is when the proposing leader accepted the command.
	At time.Time `json:"at"`
	// Node is the node that proposed the command (the leader at the time).
	Node string `json:"node"`
	// Via is the node that received the API call, when it was forwarded.
	Via string `json:"via,omitempty"`
	// Actor says who asked: "driver", or the API caller. It is for people;
	// the state machine decides on Origin.
	Actor string `json:"actor,omitempty"`
	// Origin says whether the driver or an operator asked (version 2 on).
	// Empty is an operator.
	Origin CommandOrigin `json:"origin,omitempty"`
	// Reason is the free-text why, kept in the audit log.
	Reason string `json:"reason,omitempty"`
	// Plan names the plan the command acts on.
	Plan string `json:"plan,omitempty"`
	// IfEpoch, when not zero, makes the command apply only if the plan's
	// epoch is still IfEpoch (compare-and-set); otherwise ErrStaleEpoch.
	IfEpoch uint64 `json:"if_epoch,omitempty"`

	// Spec is the plan's specification (create_plan), sealed with SealPlan:
	// it holds DSN passwords and must never reach a log, an audit entry or
	// an API response.
	Spec json.RawMessage `json:"spec,omitempty"`
	// Source says where the spec came from: "config" or "api".
	Source string `json:"source,omitempty"`

	// To is the target phase (transition; optional for outcome).
	To Phase `json:"to,omitempty"`
	// Step names the step (intent).
	Step string `json:"step,omitempty"`
	// Epoch is the epoch of the intent an outcome closes.
	Epoch uint64 `json:"epoch,omitempty"`
	// OK says whether the step succeeded (outcome).
	OK bool `json:"ok,omitempty"`
	// Detail is the outcome's detail or error text. It must hold no secret.
	Detail string `json:"detail,omitempty"`
	// Facts are merged into the plan's facts (outcome): positions, slot
	// names, marker ids. They must hold no secret.
	Facts map[string]string `json:"facts,omitempty"`

	// Member is the member to record or forget.
	Member *Member `json:"member,omitempty"`

	// Failures and Retries are the driver's consecutive failures and total
	// retries of the plan (driver_error); Detail holds the last error.
	Failures int `json:"failures,omitempty"`
	Retries  int `json:"retries,omitempty"`

	// AuditMax and StepsMax are the proposer's history caps (0: the
	// defaults). They travel in the command so that every node compacts
	// the same way (see history.go).
	AuditMax int `json:"audit_max,omitempty"`
	StepsMax int `json:"steps_max,omitempty"`
}

// Result is what applying a command produced, as returned to the proposer.
type Result struct {
	// Index is the command's Raft log index.
	Index uint64
	// Plan is the plan after the command, when the command names an
	// existing plan.
	Plan *Plan
	// Err is why the state machine refused the command; nil if applied.
	Err error
}
