package redistarget

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/switch/target"
)

func flip(epoch uint64, to string) target.Flip {
	return target.Flip{Plan: "orders", From: "blue", To: to, Epoch: epoch, Positions: map[string]string{"db": "0/16B3748"}, At: time.Unix(0, 0).UTC()}
}

// Moved from switch/target with the Redis target.
func TestRedisTargetSetsRouteRefusesLowerEpochAndPublishes(t *testing.T) {
	ctx := context.Background()
	srv := integration.NewRedis(t, integration.RedisOptions{})
	r, err := NewRedis(srv.URL(), "cutover:orders:route", "cutover:orders:events")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	// Warm loads the flip script before the outage: the flip runs it by hash.
	if err := r.Warm(ctx); err != nil {
		t.Fatal(err)
	}
	if ok, err := redis.NewClient(&redis.Options{Addr: srv.Addr()}).ScriptExists(ctx, flipScript.Hash()).Result(); err != nil || len(ok) != 1 || !ok[0] {
		t.Errorf("flip script not loaded by Warm: %v %v", ok, err)
	}
	sub := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { sub.Close() })
	ps := sub.Subscribe(ctx, "cutover:orders:events")
	if _, err := ps.Receive(ctx); err != nil {
		t.Fatal(err)
	}

	if err := r.Flip(ctx, flip(10, "green")); err != nil {
		t.Fatal(err)
	}
	if err := r.Flip(ctx, flip(10, "green")); err != nil {
		t.Fatalf("retry with the same epoch: %v", err)
	}
	if err := r.Flip(ctx, flip(9, "blue")); !errors.Is(err, target.ErrStaleEpoch) {
		t.Fatalf("lower epoch: err = %v, want target.ErrStaleEpoch", err)
	}
	colour, epoch, err := r.Route(ctx)
	if err != nil || colour != "green" || epoch != 10 {
		t.Fatalf("route = %q@%d, %v; want green@10", colour, epoch, err)
	}
	msg, err := ps.ReceiveMessage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got target.Flip
	if err := json.Unmarshal([]byte(msg.Payload), &got); err != nil || got.To != "green" || got.Epoch != 10 {
		t.Errorf("published %q (%v)", msg.Payload, err)
	}
	if err := r.Flip(ctx, flip(11, "blue")); err != nil {
		t.Fatalf("higher epoch: %v", err)
	}
	if colour, _, _ := r.Route(ctx); colour != "blue" {
		t.Errorf("route = %q after flip back", colour)
	}
}

func TestAnUnreachableRedisTargetFailsItsWarmUp(t *testing.T) {
	srv := integration.NewRedis(t, integration.RedisOptions{})
	url := srv.URL()
	if err := srv.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	r, err := NewRedis(url, "cutover:orders:route", "")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.Warm(ctx); err == nil || !strings.Contains(err.Error(), "key cutover:orders:route") {
		t.Errorf("warm-up of a stopped Redis: err = %v", err)
	}
}
