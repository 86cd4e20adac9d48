package integration

import (
	"context"
	"testing"

	"github.com/redis/go-redis/v9"
)

func TestRedisRoundTripWithoutPersistence(t *testing.T) {
	t.Parallel()
	r := NewRedis(t, RedisOptions{})
	if r.Port == 6379 || r.Port == 0 {
		t.Fatalf("port %d: want a fresh one", r.Port)
	}
	opts, err := redis.ParseURL(r.URL())
	if err != nil {
		t.Fatal(err)
	}
	c := redis.NewClient(opts)
	t.Cleanup(func() { c.Close() })
	ctx := context.Background()

	if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if got, err := c.Get(ctx, "k").Result(); err != nil || got != "v" {
		t.Errorf("GET k = %q, %v; want v", got, err)
	}
	for name, want := range map[string]string{"save": "", "appendonly": "no", "bind": "127.0.0.1"} {
		got, err := c.ConfigGet(ctx, name).Result()
		if err != nil {
			t.Fatal(err)
		}
		if got[name] != want {
			t.Errorf("CONFIG GET %s = %q, want %q", name, got[name], want)
		}
	}
}

func TestRedisSettingsOverrideDefaults(t *testing.T) {
	t.Parallel()
	r := NewRedis(t, RedisOptions{Settings: map[string]string{"databases": "4"}})
	c := redis.NewClient(&redis.Options{Addr: r.Addr()})
	t.Cleanup(func() { c.Close() })
	got, err := c.ConfigGet(context.Background(), "databases").Result()
	if err != nil {
		t.Fatal(err)
	}
	if got["databases"] != "4" {
		t.Errorf("databases = %q, want 4", got["databases"])
	}
}
