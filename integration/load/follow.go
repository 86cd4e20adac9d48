package load

import (
	"context"
	"encoding/json"
	"strconv"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Follower follows a Redis routing key (switch/target's redis target) the
// way an application should: subscribed to the channel on which every flip
// is published, it switches the moment the message arrives; it also polls
// the key, slowly, as a fallback for a message missed while its
// subscription was down. A flip carrying a lower epoch than one already
// seen is ignored, whichever way it came.
type Follower struct {
	rdb    *redis.Client
	key    string
	cancel context.CancelFunc
	done   chan struct{}

	mu       sync.Mutex
	colour   string
	epoch    uint64
	changed  time.Time // when the colour last changed here
	messages int       // flips learnt from the channel
	polls    int       // flips learnt from polling
}

// FollowOptions configure a Follower.
type FollowOptions struct {
	// URL is the Redis server's redis:// URL.
	URL string
	// Key is the routing key; Channel the channel flips are published on
	// (default: the key, as the redis target's default).
	Key, Channel string
	// Initial is the colour assumed while the key is unset (default blue).
	Initial string
	// Poll is the fallback polling interval (default 1 s).
	Poll time.Duration
}

// Follow subscribes to the routing key's channel and returns once the
// subscription is confirmed and the key read, so that no flip after Follow
// returns can be missed. Close ends it.
func Follow(ctx context.Context, opts FollowOptions) (*Follower, error) {
	ropts, err := redis.ParseURL(opts.URL)
	if err != nil {
		return nil, err
	}
	if opts.Channel == "" {
		opts.Channel = opts.Key
	}
	if opts.Initial == "" {
		opts.Initial = "blue"
	}
	if opts.Poll <= 0 {
		opts.Poll = time.Second
	}
	rdb := redis.NewClient(ropts)
	ps := rdb.Subscribe(ctx, opts.Channel)
	// Subscribed first, read second: a flip between the two is then seen
	// on the channel at the latest.
	if _, err := ps.Receive(ctx); err != nil {
		ps.Close()
		rdb.Close()
		return nil, err
	}
	fctx, cancel := context.WithCancel(context.Background())
	f := &Follower{rdb: rdb, key: opts.Key, cancel: cancel, done: make(chan struct{}), colour: opts.Initial}
	if err := f.poll(ctx); err != nil {
		cancel()
		ps.Close()
		rdb.Close()
		return nil, err
	}
	f.polls = 0 // the initial read is not a flip
	msgs := ps.Channel()
	go func() {
		defer close(f.done)
		defer ps.Close()
		tick := time.NewTicker(opts.Poll)
		defer tick.Stop()
		for {
			select {
			case <-fctx.Done():
				return
			case m, ok := <-msgs:
				if !ok {
					return
				}
				var flip struct {
					To    string `json:"to"`
					Epoch uint64 `json:"epoch"`
				}
				if json.Unmarshal([]byte(m.Payload), &flip) == nil && flip.To != "" {
					f.set(flip.To, flip.Epoch, true)
				}
			case <-tick.C:
				_ = f.poll(fctx)
			}
		}
	}()
	return f, nil
}

func (f *Follower) poll(ctx context.Context) error {
	vals, err := f.rdb.MGet(ctx, f.key, f.key+":epoch").Result()
	if err != nil {
		return err
	}
	colour, _ := vals[0].(string)
	var epoch uint64
	if s, ok := vals[1].(string); ok {
		epoch, _ = strconv.ParseUint(s, 10, 64)
	}
	if colour != "" {
		f.set(colour, epoch, false)
	}
	return nil
}

func (f *Follower) set(colour string, epoch uint64, fromChannel bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if epoch < f.epoch || colour == f.colour {
		if epoch > f.epoch {
			f.epoch = epoch
		}
		return
	}
	f.colour, f.epoch, f.changed = colour, epoch, time.Now()
	if fromChannel {
		f.messages++
	} else {
		f.polls++
	}
}

// Colour is the colour traffic should go to now.
func (f *Follower) Colour() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.colour
}

// Target returns a Target for Options: the DSN of the current colour.
func (f *Follower) Target(dsns map[string]string) func() string {
	return func() string { return dsns[f.Colour()] }
}

// Learnt says how many colour changes came from the channel and how many
// from polling, and when the last one was seen.
func (f *Follower) Learnt() (fromChannel, fromPolling int, last time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.messages, f.polls, f.changed
}

// Close stops following.
func (f *Follower) Close() error {
	f.cancel()
	<-f.done
	return f.rdb.Close()
}

// SwitchGap is the gap the clients saw: from the last write acknowledged on
// fromDSN to the first acknowledged on toDSN (0, false when either side has
// none).
func SwitchGap(receipts []Receipt, fromDSN, toDSN string) (time.Duration, bool) {
	var last, first time.Time
	for _, r := range receipts {
		switch r.DSN {
		case fromDSN:
			if r.At.After(last) {
				last = r.At
			}
		case toDSN:
			if first.IsZero() || r.At.Before(first) {
				first = r.At
			}
		}
	}
	if last.IsZero() || first.IsZero() {
		return 0, false
	}
	return first.Sub(last), true
}
