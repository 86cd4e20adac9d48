package integration

import (
	"context"
	"strings"
	"testing"

	"github.com/go-mysql-org/go-mysql/client"
	"github.com/go-mysql-org/go-mysql/mysql"
)

func mysqlConnect(t *testing.T, m *MariaDB) *client.Conn {
	t.Helper()
	c, err := client.Connect(m.Addr(), m.User(), m.Password(), m.Database)
	if err != nil {
		t.Fatalf("connect %s: %v", m.Addr(), err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func mysqlQuery(t *testing.T, c *client.Conn, q string) *mysql.Result {
	t.Helper()
	r, err := c.Execute(q)
	if err != nil {
		t.Fatalf("%s: %v", q, err)
	}
	return r
}

func TestMariaDBHasRowBinlogWithGTIDAndUniqueServerIDs(t *testing.T) {
	t.Parallel()
	a := NewMariaDB(t, MariaDBOptions{})
	b := NewMariaDB(t, MariaDBOptions{})
	if a.ServerID == b.ServerID {
		t.Fatalf("both servers got server_id %d", a.ServerID)
	}
	for _, m := range []*MariaDB{a, b} {
		if m.Port == 3306 || m.Port == 0 {
			t.Fatalf("port %d: want a fresh one", m.Port)
		}
		c := mysqlConnect(t, m)

		r := mysqlQuery(t, c, "SHOW MASTER STATUS")
		if r.RowNumber() != 1 {
			t.Fatalf("SHOW MASTER STATUS: %d rows, want 1 (binlog off?)", r.RowNumber())
		}
		file, _ := r.GetStringByName(0, "File")
		pos, _ := r.GetUintByName(0, "Position")
		if file == "" || pos == 0 {
			t.Errorf("SHOW MASTER STATUS: File %q Position %d", file, pos)
		}

		r = mysqlQuery(t, c, "SELECT @@binlog_format, @@binlog_row_image, @@gtid_strict_mode, @@log_slave_updates, @@server_id, DATABASE(), @@port, @@bind_address")
		format, _ := r.GetString(0, 0)
		image, _ := r.GetString(0, 1)
		strict, _ := r.GetInt(0, 2)
		slaveUpdates, _ := r.GetInt(0, 3)
		serverID, _ := r.GetUint(0, 4)
		db, _ := r.GetString(0, 5)
		if format != "ROW" || image != "FULL" || strict != 1 || slaveUpdates != 1 {
			t.Errorf("binlog_format %q, binlog_row_image %q, gtid_strict_mode %d, log_slave_updates %d; want ROW, FULL, 1, 1",
				format, image, strict, slaveUpdates)
		}
		if serverID != uint64(m.ServerID) {
			t.Errorf("@@server_id = %d, want %d", serverID, m.ServerID)
		}
		if db != "cutover" {
			t.Errorf("DATABASE() = %q, want cutover", db)
		}

		// A write gets a GTID in the binlog.
		if err := m.Exec(context.Background(), "CREATE TABLE t (id INT PRIMARY KEY)"); err != nil {
			t.Fatal(err)
		}
		if err := m.Exec(context.Background(), "INSERT INTO t VALUES (?)", 1); err != nil {
			t.Fatal(err)
		}
		r = mysqlQuery(t, c, "SELECT @@gtid_binlog_pos")
		gtid, _ := r.GetString(0, 0)
		if !strings.HasPrefix(gtid, "0-") {
			t.Errorf("@@gtid_binlog_pos = %q after a write, want 0-<server_id>-<seq>", gtid)
		}
	}
}

func TestMariaDBAddressing(t *testing.T) {
	m := &MariaDB{Port: 41234, Database: "cutover"}
	for _, tc := range []struct{ got, want string }{
		{m.DSN(), "root@tcp(127.0.0.1:41234)/cutover"},
		{m.DSNFor("d", "app", "pw"), "app:pw@tcp(127.0.0.1:41234)/d"},
		{m.Addr(), "127.0.0.1:41234"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}
