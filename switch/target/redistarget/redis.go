package redistarget

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/redis/go-redis/v9"

	"github.com/cutover/cutover/internal/redact"
	"github.com/cutover/cutover/switch/target"
)

// Redis sets a routing key to the active colour. The key holds the colour
// alone (GET it), KEY:epoch holds the epoch, and the change is published on
// a channel as JSON, so that applications and proxies can either poll or
// subscribe.
type Redis struct {
	client  *redis.Client
	addr    string
	key     string
	channel string
}

// flipScript sets the colour and epoch atomically and refuses a lower epoch
// than the stored one. The same epoch is accepted, so a retry is harmless.
var flipScript = redis.NewScript(`
local stored = redis.call('GET', KEYS[2])
if stored and tonumber(stored) > tonumber(ARGV[2]) then
	return redis.error_reply('STALE_EPOCH ' .. stored)
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
`)

// NewRedis returns a Redis target. dsn is a redis:// URL.
func NewRedis(dsn, key, channel string) (*Redis, error) {
	opts, err := redis.ParseURL(dsn)
	if err != nil {
		return nil, fmt.Errorf("redis target: %s", redact.Text(err.Error()))
	}
	if key == "" {
		return nil, errors.New("redis target: no key")
	}
	if channel == "" {
		channel = key
	}
	return &Redis{client: redis.NewClient(opts), addr: opts.Addr, key: key, channel: channel}, nil
}

// Name implements Target.
func (r *Redis) Name() string { return fmt.Sprintf("redis %s key %s", r.addr, r.key) }

// Flip implements Target.
func (r *Redis) Flip(ctx context.Context, f target.Flip) error {
	payload, err := json.Marshal(f)
	if err != nil {
		return err
	}
	err = flipScript.Run(ctx, r.client, []string{r.key, r.key + ":epoch"}, f.To, strconv.FormatUint(f.Epoch, 10), r.channel, string(payload)).Err()
	if err != nil && strings.HasPrefix(err.Error(), "STALE_EPOCH") {
		return fmt.Errorf("%w: key %s holds epoch %s, flip carries %d", target.ErrStaleEpoch, r.key, strings.TrimPrefix(err.Error(), "STALE_EPOCH "), f.Epoch)
	}
	if err != nil {
		return fmt.Errorf("set %s: %w", r.key, err)
	}
	return nil
}

// Warm implements Warmer: it connects and loads the flip script.
func (r *Redis) Warm(ctx context.Context) error {
	if err := flipScript.Load(ctx, r.client).Err(); err != nil {
		return fmt.Errorf("%s: %w", r.Name(), err)
	}
	return nil
}

// Route reads the routing key: the active colour and its epoch ("" and 0
// when never set).
func (r *Redis) Route(ctx context.Context) (colour string, epoch uint64, err error) {
	vals, err := r.client.MGet(ctx, r.key, r.key+":epoch").Result()
	if err != nil {
		return "", 0, fmt.Errorf("read %s: %w", r.key, err)
	}
	if s, ok := vals[0].(string); ok {
		colour = s
	}
	if s, ok := vals[1].(string); ok {
		epoch, _ = strconv.ParseUint(s, 10, 64)
	}
	return colour, epoch, nil
}

// Close releases the connection pool.
func (r *Redis) Close() error { return r.client.Close() }
