package postgres

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the replicator's Prometheus series, labelled by plan and
// pair.
type metrics struct {
	lagBytes    prometheus.Gauge
	lagSeconds  prometheus.Gauge
	commitAge   prometheus.Gauge
	txns        prometheus.Counter
	changes     prometheus.Counter
	batches     prometheus.Counter
	missingRows prometheus.Counter
	copyRows    prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer, plan, pair string) *metrics {
	labels := []string{"plan", "pair"}
	gauge := func(name, help string) prometheus.Gauge {
		v := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, labels)
		return register(reg, v).WithLabelValues(plan, pair)
	}
	counter := func(name, help string) prometheus.Counter {
		v := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labels)
		return register(reg, v).WithLabelValues(plan, pair)
	}
	return &metrics{
		lagBytes:    gauge("cutover_replication_lag_bytes", "Blue's current WAL position minus the position applied on green."),
		lagSeconds:  gauge("cutover_replication_lag_seconds", "How long green has been behind blue, measured with heartbeat rows."),
		commitAge:   gauge("cutover_replication_last_commit_age_seconds", "Age of the last source commit applied on green (grows while blue is idle)."),
		txns:        counter("cutover_replication_applied_transactions_total", "Source transactions applied on green."),
		changes:     counter("cutover_replication_applied_changes_total", "Row changes applied on green (before merging within a batch)."),
		batches:     counter("cutover_replication_apply_batches_total", "Green transactions committed by the applier."),
		missingRows: counter("cutover_replication_missing_rows_total", "Rows that blue updated or deleted but green did not have."),
		copyRows:    gauge("cutover_replication_copy_rows", "Rows copied so far by the initial copy."),
	}
}

// register registers c, or returns the collector already registered under
// the same description (a replicator restarted in the same process).
func register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if reg == nil {
		return c
	}
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
	}
	return c
}
