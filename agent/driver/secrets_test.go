package driver

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/internal/config"
)

// A leader that lacks a variable the plan references must not abort the
// plan: another agent may have it, or an operator may set it.
func TestAPlanWhoseVariableThisAgentLacksIsRetriedNotAborted(t *testing.T) {
	const dsn = "postgres://app:${CUTOVER_T_DRIVER_NEVER_SET}@h1/db"
	spec, err := agent.SealPlan(config.Plan{Name: "orders",
		Pairs: []config.Pair{{Name: "db", Engine: config.Postgres, Blue: config.Endpoint{DSN: "postgres://app:x@h1/db"}, Green: config.Endpoint{DSN: "postgres://app:x@h1/db"}}},
		Refs:  config.Refs{"pairs[0].blue.dsn": dsn, "pairs[0].green.dsn": dsn}})
	if err != nil {
		t.Fatal(err)
	}
	fsm := agent.NewFSM()
	data, _ := json.Marshal(agent.Command{Version: agent.CommandVersion, Op: agent.OpCreatePlan, Plan: "orders", Spec: spec, At: time.Now()})
	fsm.Apply(&raft.Log{Index: 1, Type: raft.LogCommand, Data: data})
	p, ok := fsm.Plan("orders")
	if !ok {
		t.Fatal("the plan was not created")
	}
	err = checkSpec(p, testEngines)
	var missing *config.MissingEnvError
	if !errors.As(err, &missing) || permanent(err) || !strings.Contains(err.Error(), "CUTOVER_T_DRIVER_NEVER_SET") {
		t.Fatalf("checkSpec = %v (permanent: %v)", err, permanent(err))
	}
}
