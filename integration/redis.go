package integration

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// RedisOptions configures StartRedis. The zero value is ready to use.
type RedisOptions struct {
	// Settings are redis-server options, passed as --name value after the
	// defaults (port, bind, save "", appendonly no, dir, daemonize no), so
	// they override them.
	Settings map[string]string
}

// Redis is a running throwaway Redis server without persistence or
// password.
type Redis struct {
	Port            int
	Dir             string        // working directory; removed by Stop
	LogFile         string        // server log (stdout)
	StartupDuration time.Duration // how long StartRedis took

	srv server
}

// StartRedis starts redis-server on a free loopback port with persistence
// off and returns once it answers PING, or with an error that includes the
// tail of its log. Cancelling ctx aborts the start and removes everything it
// made. The caller must call Stop.
func StartRedis(ctx context.Context, opts RedisOptions) (*Redis, error) {
	begin := time.Now()
	bin, err := findBinary("redis-server", "redis-server")
	if err != nil {
		return nil, fmt.Errorf("start redis: %w", err)
	}
	as, err := serverAccount("redis", "redis-server", true)
	if err != nil {
		return nil, fmt.Errorf("start redis: %w", err)
	}
	dir, err := makeInstanceDir("redis", as)
	if err != nil {
		return nil, fmt.Errorf("start redis: %w", err)
	}
	r := &Redis{
		Dir:     dir,
		LogFile: filepath.Join(dir, "redis.log"),
		srv:     server{dir: dir, logPath: filepath.Join(dir, "redis.log")},
	}
	err = withPortRetry(func(port int) error {
		r.Port = port
		return r.srv.launch(ctx, procSpec{
			path:     bin,
			args:     r.args(opts.Settings),
			dir:      dir,
			as:       as,
			deathSig: syscall.SIGKILL, // no persistence: nothing to flush
		}, r.ping)
	})
	if err != nil {
		r.srv.stop(context.Background())
		return nil, fmt.Errorf("start redis: %w", err)
	}
	r.StartupDuration = time.Since(begin)
	return r, nil
}

func (r *Redis) args(extra map[string]string) []string {
	args := []string{
		"--port", strconv.Itoa(r.Port),
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--dir", r.Dir,
		"--daemonize", "no",
		"--logfile", "",
	}
	keys := make([]string, 0, len(extra))
	for k := range extra {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		args = append(args, "--"+k, extra[k])
	}
	return args
}

// ping sends a raw PING; a server still loading answers -LOADING.
func (r *Redis) ping(ctx context.Context) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", r.Addr())
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if _, err := c.Write([]byte("*1\r\n$4\r\nPING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line = strings.TrimSpace(line); line != "+PONG" {
		return fmt.Errorf("PING: %s", line)
	}
	return nil
}

// Addr returns host:port, e.g. 127.0.0.1:41234.
func (r *Redis) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(r.Port)) }

// URL returns a redis:// URL for database 0, e.g. redis://127.0.0.1:41234/0.
func (r *Redis) URL() string { return "redis://" + r.Addr() + "/0" }

// Stop kills the server (SIGKILL to its process group), waits for it and
// removes r.Dir. It is idempotent and safe to call concurrently; later calls
// return the first call's result.
func (r *Redis) Stop(ctx context.Context) error { return r.srv.stop(ctx) }
