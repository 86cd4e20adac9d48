package config

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/cutover/cutover/internal/redact"
)

// Duration is a time.Duration written as "500ms", "5s" or "2m" in YAML.
type Duration time.Duration

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// UnmarshalYAML accepts Go duration strings. A bare number is refused: a
// unit-less fence window is too easy to get wrong by a factor of 1000.
func (d *Duration) UnmarshalYAML(unmarshal func(any) error) error {
	var v any
	if err := unmarshal(&v); err != nil {
		return err
	}
	parsed, err := parseDuration(v)
	if err != nil {
		return err
	}
	*d = Duration(parsed)
	return nil
}

func parseDuration(v any) (time.Duration, error) {
	switch v := v.(type) {
	case string:
		parsed, err := time.ParseDuration(strings.TrimSpace(v))
		if err != nil {
			return 0, fmt.Errorf("%q is not a duration (use a number with a unit, e.g. 500ms, 5s, 2m)", v)
		}
		return parsed, nil
	case nil:
		return 0, nil
	default:
		return 0, fmt.Errorf("%v is not a duration: give a unit, e.g. %vs", v, v)
	}
}

// MarshalText renders the duration the way it is written.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// ByteSize is a size in bytes written as 1048576, "512KiB", "16MiB" or "1GB".
type ByteSize int64

// UnmarshalYAML accepts integers and sizes with binary or decimal units.
func (b *ByteSize) UnmarshalYAML(unmarshal func(any) error) error {
	var v any
	if err := unmarshal(&v); err != nil {
		return err
	}
	parsed, err := parseByteSize(v)
	if err != nil {
		return err
	}
	*b = ByteSize(parsed)
	return nil
}

var byteUnits = []struct {
	suffix string
	mult   int64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
	{"KB", 1000}, {"MB", 1000 * 1000}, {"GB", 1000 * 1000 * 1000}, {"TB", 1000 * 1000 * 1000 * 1000},
	{"B", 1},
}

func parseByteSize(v any) (int64, error) {
	switch v := v.(type) {
	case uint64:
		return int64(v), nil
	case int64:
		return v, nil
	case int:
		return int64(v), nil
	case nil:
		return 0, nil
	case string:
		s := strings.TrimSpace(v)
		mult := int64(1)
		for _, u := range byteUnits {
			if strings.HasSuffix(s, u.suffix) {
				mult = u.mult
				s = strings.TrimSpace(strings.TrimSuffix(s, u.suffix))
				break
			}
		}
		n, err := strconv.ParseFloat(s, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("%q is not a size (use bytes or a unit, e.g. 512KiB, 16MiB)", v)
		}
		return int64(n * float64(mult)), nil
	default:
		return 0, fmt.Errorf("%v is not a size (use bytes or a unit, e.g. 512KiB, 16MiB)", v)
	}
}

// MarshalText renders the size with the largest exact binary unit.
func (b ByteSize) MarshalText() ([]byte, error) {
	n := int64(b)
	for _, u := range []struct {
		s string
		m int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n != 0 && n%u.m == 0 {
			return []byte(strconv.FormatInt(n/u.m, 10) + u.s), nil
		}
	}
	return []byte(strconv.FormatInt(n, 10)), nil
}

// DSN is a connection string. It prints with its password masked; Reveal
// gives the full string to the driver.
type DSN string

// Reveal returns the DSN with its password, for the driver only.
func (d DSN) Reveal() string { return string(d) }

// String returns the DSN with its password masked.
func (d DSN) String() string { return redact.DSN(string(d)) }

// GoString keeps %#v from printing the password.
func (d DSN) GoString() string { return strconv.Quote(d.String()) }

// MarshalText keeps the password out of JSON and YAML renderings.
func (d DSN) MarshalText() ([]byte, error) { return []byte(d.String()), nil }
