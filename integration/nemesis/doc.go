// Package nemesis runs whole cutovers under injected faults and checks the
// recorded histories, the way Jepsen checks a database.
//
// A run (Run) starts blue and green PostgreSQL and a Redis holding the
// routing key (the integration harness), three `cutover agent` processes
// (internal/demo.StartAgents) that reach blue and green only through a TCP
// Proxy each, and an application: writers that follow the routing key and
// keep a receipt of every acknowledged write (integration/load), a prober
// that tries a write on both sides every 10ms, and a gate reader that asks
// the agents' gate in turn, recording invoke and complete times. One plan
// runs to its end: completed (switched, then done), rolled back (a quarter
// of the seeds ask for it after the flip) or aborted (by the driver, when a
// fault makes a step fail).
//
// # Faults
//
// A seed draws a Schedule (NewSchedule; printed at the start of the run):
// one to four faults, each at a random moment of the plan's first twelve
// seconds or when the plan is first seen at (or past) a named phase. For
// phases of milliseconds (fenced, caught_up, verified, authorized) the
// agents hold there for two seconds (the CUTOVER_TEST_HOLD hook), one such
// phase per run.
//
//   - kill: SIGKILL the leader or a follower, start it again from its data
//     directory 1–5 s later;
//   - pause: SIGSTOP the leader or a follower, SIGCONT 1–5 s later;
//   - latency: 20–300 ms per chunk on the agents' link to blue or green,
//     for 2–6 s;
//   - drop: close every connection of the agents to blue or green at once,
//     the replication stream included;
//   - blackhole: the link to blue or green carries nothing for 0.5–5 s (new
//     connections hang), as through a partition;
//   - terminate: end the agents' sessions on blue or green from the
//     server's side (pg_terminate_backend), the replication stream's
//     walsender included (a third of the seeds add one, in copying,
//     replicating or ready, or at a moment).
//
// Not injected yet: a database restart (the harness's PostgreSQL can be
// stopped, but Stop removes its directory and port, so it cannot come back
// on the same address), partitions between agents (network namespaces),
// clock jumps and disk faults.
//
// # Checkers
//
//   - lost writes: every acknowledged write (and its row in the key-less
//     table) is on the side that serves at the end (load.Missing);
//   - split brain: no prober sample found both sides taking an
//     application write (load.BothWritable);
//   - gate: the gate reads are linearizable (porcupine) against the phase
//     commits of the audit log, modelled as a register "gate open" that
//     each committed transition writes (open for authorized and switched,
//     closed for every other phase); a commit's interval runs from its
//     audit timestamp (its proposal) to the first moment an agent was seen
//     to have applied it; reads that failed or answered closed without
//     reading the plan (no leader) are left out;
//   - end state: the plan ended completed, aborted or rolled back (never
//     stuck: 150 s after the last fault healed at most); the serving side
//     is unfenced (cutover.fence_state_v3) and takes the application's
//     writes, the other does not, never both fenced; the routing key
//     points at the serving side;
//   - story: the audit log and the history agree: no application write
//     was acknowledged on green before the plan committed authorized;
//   - orphans: no slot or publication named cutover_… is left on blue or
//     green once the plan ended and was finalized (within a minute).
//
// `make nemesis RUNS=N SEED=S` runs seeds S..S+N-1 and prints, for a
// failure, the seed, the schedule and the history's file (timeline, audit
// log, observations, gate reads, receipts, prober samples), and a
// porcupine visualization (gate.html) when the gate check fails. `go test`
// runs one seed (RUNS and SEED are read from the environment).
package nemesis
