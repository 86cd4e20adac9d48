package nemesis

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/cutover/cutover/agent"
)

// Kind is a kind of fault.
type Kind string

// The faults the nemesis injects.
const (
	// KindKill kills an agent (SIGKILL) and starts it again from its data
	// directory after For.
	KindKill Kind = "kill"
	// KindPause stops an agent (SIGSTOP) and continues it (SIGCONT) after
	// For.
	KindPause Kind = "pause"
	// KindLatency adds Latency to every chunk between the agents and a
	// database for For.
	KindLatency Kind = "latency"
	// KindDrop closes every connection between the agents and a database,
	// replication stream included, at once.
	KindDrop Kind = "drop"
	// KindBlackhole holds every byte between the agents and a database for
	// For, as a partition does.
	KindBlackhole Kind = "blackhole"
	// KindTerminate ends the agents' sessions on a database from the
	// server's side (pg_terminate_backend), the walsender of a
	// replication stream included.
	KindTerminate Kind = "terminate"
	// KindStall holds what the agents' connections to a database open at
	// the moment carry until For has passed, then delivers it (new
	// connections pass): a delayed message, which the epoch guards are
	// there for. A dead agent's last request still lands.
	KindStall Kind = "stall"
	// KindStreamDelay delays the replication streams through a
	// database's link by Latency for For, without limiting their
	// throughput: the stream runs behind.
	KindStreamDelay Kind = "stream-delay"
	// KindIsolate cuts the leader or a follower off from the other
	// agents (its Raft links, both ways) for For.
	KindIsolate Kind = "isolate"
	// KindOneWay makes the leader or a follower unreachable by the other
	// agents for For, while it still reaches them: an asymmetric
	// partition.
	KindOneWay Kind = "one-way"
	// KindCutDB cuts the leader or a follower off from one database (DB)
	// for For; the other agents still reach it.
	KindCutDB Kind = "cut-db"
	// KindRestart stops blue or green at once (immediate shutdown, as a
	// crash) and starts it again on its data directory after For.
	KindRestart Kind = "restart"
	// KindDiskFull fills the leader's or a follower's data directory (a
	// tmpfs of its own) for For, then frees it.
	KindDiskFull Kind = "disk-full"
	// KindClockJump shifts the wall clock of the leader, a follower or
	// every agent (internal/clock, which the suite's build of the agent,
	// tag nemesis_clock, lets it shift at run time) by Jump, forward or
	// backward, for For; then it jumps back, as NTP stepping a wrong
	// clock back would.
	KindClockJump Kind = "clockjump"
	// KindSlowDisk throttles the I/O of the leader or a follower on its
	// data directory's disk to IOPS operations (and IOPS×64 KiB) a
	// second for For (a cgroup's block I/O throttle on its loop device;
	// disk.go).
	KindSlowDisk Kind = "slow-disk"
)

// Fault is one fault of a schedule, triggered either at a moment (After the
// plan's start) or when the plan is first seen in Phase.
type Fault struct {
	Phase agent.Phase   `json:"phase,omitempty"`
	After time.Duration `json:"after,omitempty"`
	Kind  Kind          `json:"kind"`
	// Target is "leader" or "follower" (agent faults), "blue" or "green"
	// (database link faults).
	Target string `json:"target"`
	// WaitHeld, for a fault tied to a phase, waits (up to 30 s) until the
	// stall on that database's link holds a request.
	WaitHeld string `json:"wait_held,omitempty"`
	// Match narrows a stall to the first request holding it, on each
	// connection open at the moment.
	Match string `json:"match,omitempty"`
	// DB is the database a cut-db fault cuts the agent off from.
	DB string `json:"db,omitempty"`
	// Delay, for a fault tied to a phase, waits that long after the
	// phase is seen.
	Delay   time.Duration `json:"delay,omitempty"`
	For     time.Duration `json:"for,omitempty"`
	Latency time.Duration `json:"latency,omitempty"`
	// Jump is a clock jump's shift (negative: backward).
	Jump time.Duration `json:"jump,omitempty"`
	// IOPS is a slow disk's operations a second.
	IOPS int `json:"iops,omitempty"`
}

func (f Fault) String() string {
	var b strings.Builder
	if f.Phase != "" {
		fmt.Fprintf(&b, "in %-11s", f.Phase)
		if f.Delay > 0 {
			fmt.Fprintf(&b, " +%s", f.Delay)
		}
		if f.WaitHeld != "" {
			fmt.Fprintf(&b, " once %s holds a request", f.WaitHeld)
		}
	} else {
		fmt.Fprintf(&b, "at +%-9s", f.After.Round(time.Millisecond))
	}
	target := f.Target
	if f.DB != "" {
		target += "-" + f.DB
	}
	fmt.Fprintf(&b, " %-9s %-8s", f.Kind, target)
	if f.Match != "" {
		fmt.Fprintf(&b, " %q", f.Match)
	}
	if f.Latency > 0 {
		fmt.Fprintf(&b, " +%s", f.Latency)
	}
	if f.Jump > 0 {
		fmt.Fprintf(&b, " +%s", f.Jump)
	} else if f.Jump < 0 {
		fmt.Fprintf(&b, " %s", f.Jump)
	}
	if f.IOPS > 0 {
		fmt.Fprintf(&b, " %d IOPS", f.IOPS)
	}
	if f.For > 0 {
		fmt.Fprintf(&b, " for %s", f.For.Round(time.Millisecond))
	}
	return b.String()
}

// Schedule is what a seed decides for one run.
type Schedule struct {
	Seed   uint64  `json:"seed"`
	Faults []Fault `json:"faults"`
	// Hold is the phase the agents linger in (the CUTOVER_TEST_HOLD hook)
	// so that a fault lands inside a phase that otherwise lasts
	// milliseconds; empty for none.
	Hold agent.Phase `json:"hold,omitempty"`
	// HoldAt, when set, is the driver's fault point the agents hold at
	// (instead of Hold's), for HoldFor (default 2s).
	HoldAt  string        `json:"hold_at,omitempty"`
	HoldFor time.Duration `json:"hold_for,omitempty"`
	// Rollback rolls the plan back after the flip.
	Rollback bool `json:"rollback,omitempty"`
	// NoVerify turns the plan's verification off and MaxDelay, when set,
	// loosens its lag threshold: the mutation schedules use them so that
	// a mutant's defect is not masked by the product's second line of
	// defence (the in-fence verification would abort on the lag a
	// skipped catch-up proof leaves).
	NoVerify bool          `json:"no_verify,omitempty"`
	MaxDelay time.Duration `json:"max_delay,omitempty"`
	// MaxWindow, when set, is the plan's max_fence_window.
	MaxWindow time.Duration `json:"max_window,omitempty"`
}

// hold returns the CUTOVER_TEST_HOLD value for s ("" for none).
func (s Schedule) hold() string {
	d := s.HoldFor
	if d <= 0 {
		d = 2 * time.Second
	}
	if s.HoldAt != "" {
		return s.HoldAt + "=" + d.String()
	}
	if point, ok := holdPoints[s.Hold]; ok {
		return point + "=" + d.String()
	}
	return ""
}

func (s Schedule) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "seed %d: %d faults", s.Seed, len(s.Faults))
	if s.Hold != "" {
		fmt.Fprintf(&b, ", agents hold in %s", s.Hold)
	}
	if s.HoldAt != "" {
		fmt.Fprintf(&b, ", agents hold %s", s.hold())
	}
	if s.NoVerify {
		b.WriteString(", no verification")
	}
	if s.MaxDelay > 0 {
		fmt.Fprintf(&b, ", lag max_delay %s", s.MaxDelay)
	}
	if s.MaxWindow > 0 {
		fmt.Fprintf(&b, ", max_fence_window %s", s.MaxWindow)
	}
	if s.Rollback {
		b.WriteString(", rollback after the flip")
	}
	for _, f := range s.Faults {
		b.WriteString("\n  " + f.String())
	}
	return b.String()
}

// holdPoints are the driver's fault points (the test hook) that keep a
// plan in a phase of milliseconds for a while.
var holdPoints = map[agent.Phase]string{
	agent.PhaseFenced:     "before catch-up",
	agent.PhaseCaughtUp:   "before verify",
	agent.PhaseVerified:   "before authorize",
	agent.PhaseAuthorized: "before flip intent",
}

// faultPhases are the named phases a fault may be tied to.
var faultPhases = []agent.Phase{agent.PhaseCopying, agent.PhaseReplicating, agent.PhaseReady, agent.PhaseFenced,
	agent.PhaseCaughtUp, agent.PhaseVerified, agent.PhaseAuthorized, agent.PhaseSwitched}

// NewSchedule draws a run's faults from seed: one to four, each tied to a
// named phase or to a random moment in the first seconds of the plan.
func NewSchedule(seed uint64) Schedule {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	s := Schedule{Seed: seed, Rollback: rng.IntN(4) == 0}
	kinds := []Kind{KindKill, KindPause, KindLatency, KindDrop, KindBlackhole}
	n := 1 + rng.IntN(3)
	for range n {
		f := Fault{Kind: kinds[rng.IntN(len(kinds))]}
		if rng.IntN(2) == 0 {
			f.Phase = faultPhases[rng.IntN(len(faultPhases))]
			if _, short := holdPoints[f.Phase]; short {
				if s.Hold != "" && s.Hold != f.Phase {
					// One hold point per run: tie this fault to a moment.
					f.Phase = ""
				} else {
					s.Hold = f.Phase
				}
			}
		}
		if f.Phase == "" {
			f.After = time.Duration(rng.IntN(12000)) * time.Millisecond
		}
		switch f.Kind {
		case KindKill, KindPause:
			f.Target = []string{"leader", "follower"}[rng.IntN(2)]
			f.For = time.Duration(1000+rng.IntN(4000)) * time.Millisecond
		default:
			f.Target = []string{"blue", "green"}[rng.IntN(2)]
		}
		switch f.Kind {
		case KindLatency:
			f.Latency = time.Duration(20+rng.IntN(280)) * time.Millisecond
			f.For = time.Duration(2000+rng.IntN(4000)) * time.Millisecond
		case KindBlackhole:
			f.For = time.Duration(500+rng.IntN(4500)) * time.Millisecond
		}
		s.Faults = append(s.Faults, f)
	}
	// Drawn last, so that adding it left the earlier draws of every seed
	// as they were.
	if rng.IntN(3) == 0 {
		f := Fault{Kind: KindTerminate, Target: []string{"blue", "green"}[rng.IntN(2)]}
		if rng.IntN(2) == 0 {
			f.Phase = faultPhases[rng.IntN(3)] // a phase with a stream running
		} else {
			f.After = time.Duration(rng.IntN(12000)) * time.Millisecond
		}
		s.Faults = append(s.Faults, f)
	}
	// Partitions between the agents and between an agent and a
	// database: drawn after the rest, so that adding them left the
	// earlier draws of every seed as they were.
	if rng.IntN(2) == 0 {
		kinds := []Kind{KindIsolate, KindOneWay, KindCutDB}
		f := Fault{Kind: kinds[rng.IntN(len(kinds))], Target: []string{"leader", "follower"}[rng.IntN(2)],
			For: time.Duration(1000+rng.IntN(5000)) * time.Millisecond}
		if f.Kind == KindCutDB {
			f.DB = []string{"blue", "green"}[rng.IntN(2)]
		}
		if rng.IntN(2) == 0 {
			f.Phase = faultPhases[rng.IntN(len(faultPhases))]
			if _, short := holdPoints[f.Phase]; short && s.Hold != f.Phase {
				f.Phase = ""
			}
		}
		if f.Phase == "" {
			f.After = time.Duration(rng.IntN(12000)) * time.Millisecond
		}
		s.Faults = append(s.Faults, f)
	}
	// A database restart, drawn last for the same reason.
	if rng.IntN(4) == 0 {
		f := Fault{Kind: KindRestart, Target: []string{"blue", "green"}[rng.IntN(2)], For: time.Duration(500+rng.IntN(3500)) * time.Millisecond}
		if rng.IntN(2) == 0 {
			f.Phase = faultPhases[rng.IntN(len(faultPhases))]
			if _, short := holdPoints[f.Phase]; short && s.Hold != f.Phase {
				f.Phase = ""
			}
		}
		if f.Phase == "" {
			f.After = time.Duration(rng.IntN(12000)) * time.Millisecond
		}
		s.Faults = append(s.Faults, f)
	}
	// A full disk under an agent, drawn last for the same reason.
	if rng.IntN(5) == 0 {
		f := Fault{Kind: KindDiskFull, Target: []string{"leader", "follower"}[rng.IntN(2)], For: time.Duration(1000+rng.IntN(5000)) * time.Millisecond}
		if rng.IntN(2) == 0 {
			f.Phase = faultPhases[rng.IntN(len(faultPhases))]
			if _, short := holdPoints[f.Phase]; short && s.Hold != f.Phase {
				f.Phase = ""
			}
		}
		if f.Phase == "" {
			f.After = time.Duration(rng.IntN(12000)) * time.Millisecond
		}
		s.Faults = append(s.Faults, f)
	}
	// A clock jump (a third of the seeds), drawn last for the same
	// reason: 5 s to 5 min, forward or backward, on the leader, a
	// follower or every agent (one host's clock), for 2-15 s.
	if rng.IntN(3) == 0 {
		jump := time.Duration(5+rng.IntN(296)) * time.Second
		if rng.IntN(2) == 0 {
			jump = -jump
		}
		f := Fault{Kind: KindClockJump, Target: []string{"leader", "follower", "all"}[rng.IntN(3)], Jump: jump,
			For: time.Duration(2000+rng.IntN(13000)) * time.Millisecond}
		if rng.IntN(2) == 0 {
			f.Phase = faultPhases[rng.IntN(len(faultPhases))]
			if _, short := holdPoints[f.Phase]; short && s.Hold != f.Phase {
				f.Phase = ""
			}
		}
		if f.Phase == "" {
			f.After = time.Duration(rng.IntN(12000)) * time.Millisecond
		}
		s.Faults = append(s.Faults, f)
	}
	// A slow disk under the leader or a follower (a quarter of the
	// seeds), drawn last for the same reason: 2 to 50 operations a
	// second for 2-10 s.
	if rng.IntN(4) == 0 {
		f := Fault{Kind: KindSlowDisk, Target: []string{"leader", "follower"}[rng.IntN(2)], IOPS: 2 + rng.IntN(49),
			For: time.Duration(2000+rng.IntN(8000)) * time.Millisecond}
		if rng.IntN(2) == 0 {
			f.Phase = faultPhases[rng.IntN(len(faultPhases))]
			if _, short := holdPoints[f.Phase]; short && s.Hold != f.Phase {
				f.Phase = ""
			}
		}
		if f.Phase == "" {
			f.After = time.Duration(rng.IntN(12000)) * time.Millisecond
		}
		s.Faults = append(s.Faults, f)
	}
	return s
}

// Mutations are the product's deliberately broken builds (build tags) and,
// for each, a schedule designed to expose it. The mutation check
// (TestEveryMutantIsCaught) builds each and runs its schedule until a
// checker fires.
var Mutations = []Mutation{
	{
		// The fence's epoch guard removed (fencing/postgres,
		// mutation_noepoch.go): a deposed leader's late request lands.
		// The leader's unfence of green at the flip is held by the proxy
		// (the first "unfence" on each connection open when the gate
		// opened) and the leader is killed; the next leader, on new
		// connections, flips again, and the plan is rolled back (green
		// fenced again with a higher epoch, blue unfenced). Then the held
		// request is delivered: the guard refuses it, the mutant
		// unfences green: both sides take writes.
		Tag: "mutation_noepoch",
		Schedule: Schedule{
			HoldAt: "before flip", HoldFor: 2 * time.Second, Rollback: true,
			Faults: []Fault{
				{Phase: agent.PhaseAuthorized, Kind: KindStall, Target: "green", Match: "unfence", For: 90 * time.Second},
				{Phase: agent.PhaseAuthorized, WaitHeld: "green", Kind: KindKill, Target: "leader", For: 2 * time.Second},
			},
		},
	},
	{
		// The catch-up proof skipped (agent/driver, mutation_nocatchup.go):
		// the flip goes ahead without the fence marker applied on green.
		// The stream runs six seconds behind from replicating on (longer
		// than a flip takes on a loaded machine), so the writes of the
		// last moments before the fence are still on their way when the
		// forward stream is closed at the flip. The lag threshold and
		// the fence window are loosened so that the real build, which
		// waits for the marker, completes.
		Tag: "mutation_nocatchup",
		Schedule: Schedule{
			NoVerify: true, MaxDelay: 30 * time.Second, MaxWindow: 30 * time.Second,
			Faults: []Fault{
				{Phase: agent.PhaseReplicating, Kind: KindStreamDelay, Target: "blue", Latency: 6 * time.Second, For: 180 * time.Second},
			},
		},
	},
}

// Mutation is one broken build and the schedule meant to catch it.
type Mutation struct {
	Tag      string
	Schedule Schedule
}
