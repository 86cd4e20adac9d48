package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cutover/cutover/agent/client"
)

// Read-after-write across runs. Each run of the CLI is a new client: the
// Raft index its write reached (X-Cutover-Index) would be forgotten, and
// the next run's read, answered by a follower that has not applied the
// write yet, could show an older phase than the one the operator just
// caused. So the CLI keeps, per agent address, the highest index a run
// saw, in $CUTOVER_STATE_DIR/indexes.json (default
// $XDG_STATE_HOME/cutover, else ~/.local/state/cutover), and the next
// run's reads to that address pass it (?index=N: the agent waits until it
// has applied N, 10 s at most). An entry is used for indexTTL only: a
// cluster rebuilt at the same address starts its log again, and an old
// index would make its reads wait for an entry that never comes.

// indexTTL is how long a kept index is used.
const indexTTL = 10 * time.Minute

// addrClient is a client and the address it calls.
type addrClient struct {
	addr string
	c    *client.Client
}

type keptIndex struct {
	Index uint64    `json:"index"`
	At    time.Time `json:"at"`
}

// indexFile is where the indexes are kept; "" when no folder is known.
func indexFile() string {
	dir, set := os.LookupEnv("CUTOVER_STATE_DIR")
	if !set {
		if x := os.Getenv("XDG_STATE_HOME"); x != "" {
			dir = filepath.Join(x, "cutover")
		} else if home, err := os.UserHomeDir(); err == nil {
			dir = filepath.Join(home, ".local", "state", "cutover")
		}
	}
	if dir == "" {
		return ""
	}
	return filepath.Join(dir, "indexes.json")
}

func readIndexes(path string) map[string]keptIndex {
	out := map[string]keptIndex{}
	if data, err := os.ReadFile(path); err == nil {
		_ = json.Unmarshal(data, &out) // a damaged file only loses the guarantee
	}
	return out
}

func indexKey(addr string) string { return strings.TrimRight(addr, "/") }

// lastIndex returns the index kept for addr, or 0.
func lastIndex(addr string) uint64 {
	path := indexFile()
	if path == "" {
		return 0
	}
	k, ok := readIndexes(path)[indexKey(addr)]
	if !ok || time.Since(k.At) > indexTTL {
		return 0
	}
	return k.Index
}

// keepIndexes saves the index every client of this run reached. Errors are
// ignored: the file is a convenience, not the state.
func (g *globals) keepIndexes() {
	path := indexFile()
	if path == "" || len(g.clients) == 0 {
		return
	}
	all := readIndexes(path)
	now := time.Now().UTC()
	changed := false
	for _, ac := range g.clients {
		i := ac.c.Index()
		if i == 0 {
			continue
		}
		key := indexKey(ac.addr)
		if k, ok := all[key]; ok && k.Index > i && now.Sub(k.At) <= indexTTL {
			continue
		}
		all[key] = keptIndex{Index: i, At: now}
		changed = true
	}
	for key, k := range all {
		if now.Sub(k.At) > indexTTL {
			delete(all, key)
			changed = true
		}
	}
	if !changed {
		return
	}
	data, err := json.Marshal(all)
	if err != nil || os.MkdirAll(filepath.Dir(path), 0o700) != nil {
		return
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".indexes-*")
	if err != nil {
		return
	}
	_, werr := tmp.Write(data)
	if cerr := tmp.Close(); werr != nil || cerr != nil {
		os.Remove(tmp.Name())
		return
	}
	if os.Rename(tmp.Name(), path) != nil {
		os.Remove(tmp.Name())
	}
}
