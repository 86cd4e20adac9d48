// Package nemesis runs whole cutovers under injected faults and checks the
// recorded histories, the way Jepsen checks a database.
//
// A run (Run) starts blue and green PostgreSQL and a Redis holding the
// routing key (the integration harness), three `cutover agent` processes
// (internal/demo.StartAgentsWired) that reach blue and green only through
// a TCP Proxy per agent and database (each agent's DSNs come from its
// environment) and each other through a Proxy per Raft link, each with a
// small file system of its own as its data directory when the test may
// mount (ext4 on a loop device whose image is in /dev/shm, else a tmpfs),
// and a wall clock the suite can shift (the agent is built with the tag
// nemesis_clock: internal/clock reads an offset from the file named by
// CUTOVER_TEST_CLOCK_FILE on every call); and an
// application: writers that follow the routing key and keep a receipt of
// every acknowledged write (integration/load), a prober that tries a write
// on both sides every 10ms, and a gate reader that asks the agents' gate in
// turn, recording invoke and complete times. One plan runs to its end:
// completed (switched, then done), rolled back (a quarter of the seeds ask
// for it after the flip) or aborted (by the driver, when a fault makes a
// step fail).
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
//     replicating or ready, or at a moment);
//   - isolate, one-way, cut-db (half of the seeds): the leader or a
//     follower cut off from the other agents (its Raft links, both ways),
//     unreachable by them while it still reaches them (asymmetric), or cut
//     off from blue or green alone, for 1–6 s;
//   - restart (a quarter of the seeds): blue or green stopped at once
//     (immediate shutdown) and started again on its data directory after
//     0.5–4 s (integration.Postgres.Restart);
//   - disk-full (a fifth of the seeds): the leader's or a follower's data
//     directory filled for 1–6 s;
//   - clockjump (a third of the seeds): the wall clock of the leader, a
//     follower or every agent jumps 5 s to 5 min forward or backward, and
//     back after 2–15 s (as NTP stepping it back would);
//   - slow-disk (a quarter of the seeds): the leader's or a follower's
//     reads and writes on its data directory's disk throttled to 2–50
//     operations (and 64 KiB each) a second for 2–10 s, by the block I/O
//     controller of a cgroup the agent is moved into (cgroup v1
//     blkio.throttle.*, or v2 io.max) on its loop device: a forced write
//     (the Raft log's fsync) waits for the throttle.
//
// The kinds added later are drawn after the earlier ones, so that a seed
// keeps the faults it drew before. Two more serve the mutation check's
// schedules (Mutations): stall (what the connections open at the moment
// carry is held, optionally from the first request matching a string, and
// delivered late, even after the client died) and stream-delay (the
// replication streams run behind without losing throughput).
//
// Clock jumps touch only what the agents stamp with their wall clock: the
// checkers that compare the audit log's times with the test's own clock
// (gate, story, the outage figure) first map each entry's time back onto
// the test's clock through the offsets the proposing agent had (dejump;
// the suite knows them, it set them).
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
//     audit timestamp (its proposal, on the test's clock) to the first
//     moment an agent was seen to have applied it; reads that failed or answered closed without
//     reading the plan (no leader) are left out;
//   - end state: the plan ended completed, aborted or rolled back (never
//     stuck: no progress for 150 s once the timed faults healed: no new
//     phase or step, no change in the leader's replication state or
//     verification progress); the serving side
//     is unfenced (cutover.fence_state_v3) and takes the application's
//     writes, the other does not, never both fenced; the routing key
//     points at the serving side;
//   - story: the audit log and the history agree: no application write
//     was acknowledged on green before the plan committed authorized;
//   - orphans: no slot or publication named cutover_… is left on blue or
//     green once the plan ended and was finalized (within a minute).
//
// # Mutation check
//
// TestEveryMutantIsCaught (make mutations) builds the product with a
// defect planted by a build tag (Mutations: the fence's epoch guard
// removed; the catch-up proof skipped) and runs the schedule designed for
// each until a checker fires; a mutant that survives MUTATION_RUNS runs
// fails the test, and so does the real build breaking an invariant under
// the same schedule.
//
// `make nemesis RUNS=N SEED=S` runs seeds S..S+N-1 and prints, for a
// failure, the seed, the schedule and the history's file (timeline, audit
// log, observations, gate reads, receipts, prober samples), and a
// porcupine visualization (gate.html) when the gate check fails. `go test`
// runs one seed (RUNS and SEED are read from the environment).
package nemesis
