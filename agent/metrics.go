package agent

import (
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the node's Prometheus metrics, in a registry of its own (so
// that several nodes can run in one test process). State metrics are read
// at scrape time, so they are never stale.
type metrics struct {
	reg          *prometheus.Registry
	apiRequests  *prometheus.CounterVec
	gateDuration *prometheus.HistogramVec
}

func newMetrics(n *Node) *metrics {
	reg := n.cfg.Registry
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	m := &metrics{
		reg: reg,
		apiRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cutover_api_requests_total", Help: "API requests by route and status.",
		}, []string{"route", "code"}),
		gateDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "cutover_gate_duration_seconds", Help: "Time to answer the gate (linearizable read), by answer.",
			Buckets: []float64{.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2},
		}, []string{"open"}),
	}
	m.reg.MustRegister(m.apiRequests, m.gateDuration, &stateCollector{n: n},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

func (m *metrics) observeGate(open bool, took time.Duration) {
	label := "false"
	if open {
		label = "true"
	}
	m.gateDuration.WithLabelValues(label).Observe(took.Seconds())
}

var (
	descRaftState    = prometheus.NewDesc("cutover_raft_state", "1 for the node's current Raft state.", []string{"state"}, nil)
	descRaftLeader   = prometheus.NewDesc("cutover_raft_leader", "1 labelled with the id of the leader this node knows.", []string{"id"}, nil)
	descIsLeader     = prometheus.NewDesc("cutover_raft_is_leader", "1 if this node is the leader.", nil, nil)
	descTerm         = prometheus.NewDesc("cutover_raft_term", "Current Raft term.", nil, nil)
	descCommitIndex  = prometheus.NewDesc("cutover_raft_commit_index", "Raft commit index known to this node.", nil, nil)
	descAppliedIndex = prometheus.NewDesc("cutover_raft_applied_index", "Raft index last handed to the state machine.", nil, nil)
	descFSMIndex     = prometheus.NewDesc("cutover_fsm_index", "Raft index of the last command the state machine applied.", nil, nil)
	descLastContact  = prometheus.NewDesc("cutover_raft_last_contact_seconds", "Seconds since this follower last heard from the leader.", nil, nil)
	descPhase        = prometheus.NewDesc("cutover_plan_phase", "1 for the plan's committed phase, 0 for the others.", []string{"plan", "phase"}, nil)
	descEpoch        = prometheus.NewDesc("cutover_plan_epoch", "The plan's epoch (fencing token).", []string{"plan"}, nil)
	descGateOpen     = prometheus.NewDesc("cutover_gate_open", "1 if the plan's phase, as this node has applied it, opens the gate (not a linearizable read: ask /v1/gate).", []string{"plan"}, nil)
	descRetries      = prometheus.NewDesc("cutover_plan_driver_retries_total", "Driver failures of the plan that were retried, over its life (replicated state).", []string{"plan"}, nil)
	descFailures     = prometheus.NewDesc("cutover_plan_driver_consecutive_failures", "The driver's consecutive failures of the plan; 0 once it succeeds (replicated state).", []string{"plan"}, nil)
	descWriteOutage  = prometheus.NewDesc("cutover_write_outage_seconds", "The application's write outage of the plan's flip: from the fence on blue to a writable green with the route flipped (replicated state; absent before the flip).", []string{"plan"}, nil)
)

type stateCollector struct{ n *Node }

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descRaftState, descRaftLeader, descIsLeader, descTerm, descCommitIndex,
		descAppliedIndex, descFSMIndex, descLastContact, descPhase, descEpoch, descGateOpen, descRetries, descFailures, descWriteOutage} {
		ch <- d
	}
}

func gauge(d *prometheus.Desc, v float64, labels ...string) prometheus.Metric {
	return prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	r := c.n.raft
	state := r.State()
	for _, s := range []raft.RaftState{raft.Follower, raft.Candidate, raft.Leader, raft.Shutdown} {
		ch <- gauge(descRaftState, b2f(s == state), strings.ToLower(s.String()))
	}
	if id := c.n.Leader(); id != "" {
		ch <- gauge(descRaftLeader, 1, id)
	}
	ch <- gauge(descIsLeader, b2f(state == raft.Leader))
	ch <- gauge(descTerm, float64(r.CurrentTerm()))
	ch <- gauge(descCommitIndex, float64(r.CommitIndex()))
	ch <- gauge(descAppliedIndex, float64(r.AppliedIndex()))
	ch <- gauge(descFSMIndex, float64(c.n.fsm.Index()))
	if state != raft.Leader {
		if lc := r.LastContact(); !lc.IsZero() {
			ch <- gauge(descLastContact, time.Since(lc).Seconds())
		}
	}
	for _, p := range c.n.fsm.Plans() {
		for _, ph := range Phases {
			ch <- gauge(descPhase, b2f(p.Phase == ph), p.Name, string(ph))
		}
		ch <- gauge(descEpoch, float64(p.Epoch), p.Name)
		ch <- gauge(descGateOpen, b2f(p.GateOpen()), p.Name)
		var d DriverStatus
		if p.Driver != nil {
			d = *p.Driver
		}
		ch <- prometheus.MustNewConstMetric(descRetries, prometheus.CounterValue, float64(d.Retries), p.Name)
		ch <- gauge(descFailures, float64(d.Failures), p.Name)
		if ms, ok := p.WriteOutageMS(); ok {
			ch <- gauge(descWriteOutage, float64(ms)/1000, p.Name)
		}
	}
}
