# The single entry point: CI runs `make test`.
GO      ?= go
PKGS    ?= ./...
TIMEOUT ?= 40m

.PHONY: all build test unit vet fmt-check mod-check seam-check bench demo nemesis mutations clean

all: build

build:
	$(GO) build -o bin/cutover ./cmd/cutover

# Everything CI checks: formatting, vet, go.mod tidy, the engine seam, and
# the whole suite (unit and integration tests against throwaway
# PostgreSQL, MariaDB and Redis instances) under the race detector.
test: fmt-check vet mod-check seam-check
	$(GO) test -race -count=1 -timeout $(TIMEOUT) $(PKGS)

# Pure-logic tests only, no database servers.
unit:
	$(GO) test -race -count=1 -short $(PKGS)

vet:
	$(GO) vet $(PKGS)

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

# go.mod and go.sum as `go mod tidy` leaves them (direct requirements not
# marked indirect, nothing missing or unused).
mod-check:
	@$(GO) mod tidy -diff || { echo "go.mod is not tidy: run go mod tidy"; exit 1; }

# The plan driver speaks to engines, not to databases (docs/design.md, "The
# engine seam"): it links no database or Redis client.
seam-check:
	@deps=$$($(GO) list -deps ./agent/driver | grep -E 'jackc/pgx|jackc/pglogrepl|go-redis|go-mysql'); \
	if [ -n "$$deps" ]; then echo "agent/driver links database clients:"; echo "$$deps"; exit 1; fi

bench:
	$(GO) test -run '^$$' -bench . -benchtime 1x -timeout 60m $(PKGS)

# The README's first command: a whole cutover on this machine.
demo: build
	./bin/cutover demo

# The fault suite: RUNS whole cutovers under the fault schedules of seeds
# SEED, SEED+1... (three agents, blue, green, Redis, an application, a
# nemesis), each history checked. A failure prints the seed, the schedule
# and the history's file (under nemesis-out/). SCHEDULE='{...}' runs a
# hand-made schedule instead (nemesis.Schedule in JSON, durations in ns).
RUNS ?= 20
SEED ?= 1
nemesis:
	RUNS=$(RUNS) SEED=$(SEED) NEMESIS_SCHEDULE='$(SCHEDULE)' NEMESIS_DIR=$(CURDIR)/nemesis-out NEMESIS_QUIET=1 \
		$(GO) test -count=1 -v -timeout 0 -run TestTheCutoverKeepsItsInvariantsUnderSeededFaults ./integration/nemesis/

# The mutation check: builds of the product with a defect planted (build
# tags mutation_noepoch, mutation_nocatchup) must each be caught by the
# checkers within MUTATION_RUNS runs of the schedule designed for it.
MUTATION_RUNS ?= 3
mutations:
	NEMESIS_MUTATIONS=all MUTATION_RUNS=$(MUTATION_RUNS) NEMESIS_DIR=$(CURDIR)/nemesis-out NEMESIS_QUIET=1 \
		$(GO) test -count=1 -v -timeout 0 -run TestEveryMutantIsCaught ./integration/nemesis/

clean:
	rm -rf bin
