package load

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/switch/target"
	"github.com/cutover/cutover/switch/target/redistarget"
)

func waitColour(t *testing.T, f *Follower, want string, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for f.Colour() != want {
		if time.Since(start) > within {
			t.Fatalf("colour %q after %s, want %q", f.Colour(), within, want)
		}
		time.Sleep(time.Millisecond)
	}
	return time.Since(start)
}

func TestFollowerSwitchesOnThePublishedFlipAndIgnoresALowerEpoch(t *testing.T) {
	ctx := context.Background()
	srv := integration.NewRedis(t, integration.RedisOptions{})
	tg, err := redistarget.NewRedis(srv.URL(), "cutover:p:route", "") // channel defaults to the key
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tg.Close() })
	// Polling only every hour: the switch can only come from the channel.
	f, err := Follow(ctx, FollowOptions{URL: srv.URL(), Key: "cutover:p:route", Poll: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Colour() != "blue" {
		t.Fatalf("initial colour %q", f.Colour())
	}
	dsns := map[string]string{"blue": "b", "green": "g"}
	target := f.Target(dsns)
	if err := tg.Flip(ctx, flipTo(7, "green")); err != nil {
		t.Fatal(err)
	}
	waitColour(t, f, "green", 2*time.Second)
	if target() != "g" {
		t.Errorf("target %q after the flip", target())
	}
	// A stale flip published by a deposed leader (the target refuses it;
	// someone else might still publish it) is ignored.
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer rdb.Close()
	if err := rdb.Publish(ctx, "cutover:p:route", `{"to":"blue","epoch":6}`).Err(); err != nil {
		t.Fatal(err)
	}
	if err := rdb.Publish(ctx, "cutover:p:route", `{"to":"green","epoch":7}`).Err(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if c := f.Colour(); c != "green" {
		t.Errorf("colour %q after a stale flip", c)
	}
	if ch, polled, _ := f.Learnt(); ch != 1 || polled != 0 {
		t.Errorf("learnt %d from the channel, %d from polling; want 1, 0", ch, polled)
	}
}

func TestFollowerFallsBackToPollingAndStartsFromTheKey(t *testing.T) {
	ctx := context.Background()
	srv := integration.NewRedis(t, integration.RedisOptions{})
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer rdb.Close()
	if err := rdb.MSet(ctx, "k", "green", "k:epoch", "3").Err(); err != nil {
		t.Fatal(err)
	}
	// Flips published on a channel nobody listens to: polling finds them.
	f, err := Follow(ctx, FollowOptions{URL: srv.URL(), Key: "k", Channel: "elsewhere", Poll: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Colour() != "green" {
		t.Fatalf("initial colour %q, want the key's green", f.Colour())
	}
	if err := rdb.MSet(ctx, "k", "blue", "k:epoch", "4").Err(); err != nil {
		t.Fatal(err)
	}
	waitColour(t, f, "blue", 2*time.Second)
	if ch, polled, _ := f.Learnt(); ch != 0 || polled != 1 {
		t.Errorf("learnt %d from the channel, %d from polling; want 0, 1", ch, polled)
	}
}

func TestSwitchGap(t *testing.T) {
	t0 := time.Now()
	rs := []Receipt{{At: t0, DSN: "b"}, {At: t0.Add(10 * time.Millisecond), DSN: "b"}, {At: t0.Add(90 * time.Millisecond), DSN: "g"}, {At: t0.Add(80 * time.Millisecond), DSN: "g"}}
	if gap, ok := SwitchGap(rs, "b", "g"); !ok || gap != 70*time.Millisecond {
		t.Errorf("gap %s %v, want 70ms", gap, ok)
	}
	if _, ok := SwitchGap(rs[:2], "b", "g"); ok {
		t.Error("a gap without writes on green")
	}
}

func flipTo(epoch uint64, to string) target.Flip {
	return target.Flip{Plan: "p", From: "blue", To: to, Epoch: epoch, At: time.Now()}
}
