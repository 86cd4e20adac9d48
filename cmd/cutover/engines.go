package main

import (
	"github.com/cutover/cutover/engine"
	pgengine "github.com/cutover/cutover/engine/postgres"
	"github.com/cutover/cutover/internal/config"
	// The readers of PostgreSQL and Redis DSNs config validates with.
	_ "github.com/cutover/cutover/internal/dsnsyntax/register"
)

// engines is the one registry of the database engines this binary carries:
// the plan driver and every command that touches a pair's databases
// (replicate, cleanup, verify --config) choose the engine here. Adding an
// engine is one package (engine/<name>) and one line below.
var engines = engine.Registry{
	config.Postgres: pgengine.Engine{},
}
