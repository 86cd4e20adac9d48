package agent

import (
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
)

// Bounded history. The audit log and each plan's steps would otherwise grow
// without end (a plan retried every second for a day adds tens of
// thousands of steps), and they live in every snapshot. Past a cap, the
// oldest entries are folded into one summary entry that keeps their count,
// their index range and their count per operation. Export the whole log
// first (GET /v1/audit, cutover audit export) to keep it all.
//
// Compaction happens in Apply only, from the state and the command: the cap
// travels in the command (the proposer's configuration), so every node
// compacts the same entries at the same index.

// Defaults for the history caps.
const (
	DefaultAuditMax = 10000
	DefaultStepsMax = 1000
)

// OpCompacted names the summary entry of compacted audit entries.
const OpCompacted Op = "compacted"

// StepCompacted names the summary step of compacted steps.
const StepCompacted = "compacted"

// AuditSummary counts the audit entries a summary entry stands for.
type AuditSummary struct {
	Entries int `json:"entries"`
	// FirstIndex and LastIndex bound the Raft indexes compacted.
	FirstIndex uint64         `json:"first_index"`
	LastIndex  uint64         `json:"last_index"`
	Ops        map[string]int `json:"ops"`
	Refused    int            `json:"refused,omitempty"`
}

func (s *AuditSummary) add(e AuditEntry) {
	if e.Summary != nil {
		s.Entries += e.Summary.Entries
		s.Refused += e.Summary.Refused
		for op, n := range e.Summary.Ops {
			s.Ops[op] += n
		}
		if s.FirstIndex == 0 || (e.Summary.FirstIndex != 0 && e.Summary.FirstIndex < s.FirstIndex) {
			s.FirstIndex = e.Summary.FirstIndex
		}
		s.LastIndex = max(s.LastIndex, e.Summary.LastIndex)
		return
	}
	s.Entries++
	s.Ops[string(e.Op)]++
	if e.Refused != "" {
		s.Refused++
	}
	if s.FirstIndex == 0 || e.Index < s.FirstIndex {
		s.FirstIndex = e.Index
	}
	s.LastIndex = max(s.LastIndex, e.Index)
}

func (s *AuditSummary) String() string {
	ops := slices.Sorted(maps.Keys(s.Ops))
	parts := make([]string, len(ops))
	for i, op := range ops {
		parts[i] = fmt.Sprintf("%s %d", op, s.Ops[op])
	}
	return fmt.Sprintf("%d entries compacted (indexes %d to %d): %s; %d refused", s.Entries, s.FirstIndex, s.LastIndex, strings.Join(parts, ", "), s.Refused)
}

// compactAudit folds the oldest entries into one summary once the log holds
// more than max, down to nine tenths of max, so that it does not compact
// at every command.
func (s *state) compactAudit(max int) {
	if max <= 0 {
		max = DefaultAuditMax
	}
	if len(s.Audit) <= max {
		return
	}
	keep := max - max/10 - 1
	if keep < 1 {
		keep = 1
	}
	cut := len(s.Audit) - keep
	sum := &AuditSummary{Ops: map[string]int{}}
	for _, e := range s.Audit[:cut] {
		sum.add(e)
	}
	last := s.Audit[cut-1]
	head := AuditEntry{Index: sum.LastIndex, At: last.At, Node: last.Node, Op: OpCompacted, Detail: sum.String(), Summary: sum}
	s.Audit = append([]AuditEntry{head}, s.Audit[cut:]...)
}

// compactSteps folds a plan's oldest steps into one summary step once it
// has more than max. It never folds the step in progress (the last) nor a
// flip step: the state machine reads those (openStep, flipBegun).
func (p *planRecord) compactSteps(max int) {
	if max <= 0 {
		max = DefaultStepsMax
	}
	if len(p.Steps) <= max {
		return
	}
	keep := max - max/10 - 1
	if keep < 1 {
		keep = 1
	}
	fold := len(p.Steps) - keep
	var sum *Step
	counts := map[string]int{}
	kept := make([]Step, 0, keep+1)
	for i, st := range p.Steps {
		if fold == 0 || i == len(p.Steps)-1 || st.Name == StepFlip {
			kept = append(kept, st)
			continue
		}
		fold--
		n := 1
		if st.Name == StepCompacted {
			n = st.Compacted
			for _, part := range strings.Split(strings.TrimPrefix(st.Detail, "compacted: "), ", ") {
				var name string
				var c int
				if _, err := fmt.Sscanf(part, "%s %d", &name, &c); err == nil {
					counts[name] += c
				}
			}
		} else {
			counts[st.Name+"/"+string(st.Outcome)]++
		}
		if sum == nil {
			sum = &Step{Name: StepCompacted, Epoch: st.Epoch, Phase: st.Phase, Node: st.Node, Began: st.Began, Outcome: StepOK}
		}
		sum.Compacted += n
		sum.Phase, sum.Ended, sum.EndIndex = st.Phase, st.Ended, st.EndIndex
	}
	if sum == nil {
		return
	}
	names := make([]string, 0, len(counts))
	for k := range counts {
		names = append(names, k)
	}
	sort.Strings(names)
	parts := make([]string, len(names))
	for i, k := range names {
		parts[i] = fmt.Sprintf("%s %d", k, counts[k])
	}
	sum.Detail = "compacted: " + strings.Join(parts, ", ")
	p.Steps = append([]Step{*sum}, kept...)
}

// deletePlan forgets a finished plan: terminal and finalized (the driver
// released what it held). Its audit entries stay.
func (s *state) deletePlan(c *Command) error {
	p := s.Plans[c.Plan]
	if p == nil {
		return fmt.Errorf("%w: %q", ErrPlanNotFound, c.Plan)
	}
	if !p.Phase.Terminal() {
		return &TransitionError{Plan: p.Name, From: p.Phase, To: p.Phase, Reason: fmt.Sprintf("only a finished plan can be deleted; %s is not terminal (abort it or let it complete first)", p.Phase)}
	}
	if p.Finalized.IsZero() {
		return &TransitionError{Plan: p.Name, From: p.Phase, To: p.Phase, Reason: "the plan is not finalized yet: the driver has not released its slots, publications and fences; wait for it"}
	}
	delete(s.Plans, c.Plan)
	return nil
}
