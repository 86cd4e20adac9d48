package consistency

import (
	"sync"
	"time"
)

// Progress is where a pass stands, for logs, status and progress bars.
type Progress struct {
	Pass        Pass          `json:"pass"`
	Table       string        `json:"table,omitempty"` // table being compared
	TablesDone  int           `json:"tables_done"`
	TablesTotal int           `json:"tables_total"`
	Chunks      int64         `json:"chunks"`
	Rows        int64         `json:"rows"`       // rows compared on blue
	RowsTotal   int64         `json:"rows_total"` // estimate (planner statistics)
	Differences int64         `json:"differences"`
	Elapsed     time.Duration `json:"elapsed"`
	// ETA is the estimated time left; 0 when unknown.
	ETA time.Duration `json:"eta"`
}

type progress struct {
	mu    sync.Mutex
	start time.Time
	p     Progress
	// rowsTotal is the sum of estimates; grows when a table turns out
	// larger than estimated.
	rowsTotal int64
	tableRows int64 // rows compared in the current table
}

func newProgress(pass Pass, tables []*Table) *progress {
	p := &progress{start: time.Now(), p: Progress{Pass: pass, TablesTotal: len(tables)}}
	for _, t := range tables {
		p.rowsTotal += max(t.EstimatedRows, 0)
	}
	return p
}

func (p *progress) beginTable(name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.p.Table = name
	p.tableRows = 0
}

// endTable corrects the total once a table's real size is known.
func (p *progress) endTable(estimated int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.p.TablesDone++
	if estimated > 0 && p.tableRows != estimated {
		p.rowsTotal += p.tableRows - estimated
	}
	p.p.Table = ""
}

func (p *progress) chunkDone(rows int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.p.Chunks++
	p.p.Rows += rows
	p.tableRows += rows
}

func (p *progress) differences(n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.p.Differences += n
}

func (p *progress) snapshot() Progress {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := p.p
	out.Elapsed = time.Since(p.start)
	out.RowsTotal = max(p.rowsTotal, out.Rows)
	if out.Rows > 0 && out.RowsTotal > out.Rows {
		out.ETA = time.Duration(float64(out.Elapsed) * float64(out.RowsTotal-out.Rows) / float64(out.Rows))
	}
	return out
}
