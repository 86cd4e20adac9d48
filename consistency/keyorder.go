package consistency

import (
	"math/big"
	"strings"
)

// keyOrder compares keys in Go exactly as the engine orders them in
// spans. It is nil for a table with a key column of KindOther.
type keyOrder []KeyKind

func newKeyOrder(kinds []KeyKind) keyOrder {
	if len(kinds) == 0 {
		return nil
	}
	for _, k := range kinds {
		if k == KindOther {
			return nil
		}
	}
	return keyOrder(kinds)
}

// compare returns -1, 0 or +1 as a sorts before, with or after b. Values
// that do not parse as their kind sort as text, so a malformed key never
// panics (it may only widen what is re-checked).
func (o keyOrder) compare(a, b []string) int {
	for i, kind := range o {
		if i >= len(a) || i >= len(b) {
			return cmpInt(len(a), len(b))
		}
		if c := compareValue(kind, a[i], b[i]); c != 0 {
			return c
		}
	}
	return 0
}

func compareValue(kind KeyKind, a, b string) int {
	if a == b {
		return 0
	}
	switch kind {
	case KindInt:
		if c, ok := compareIntText(a, b); ok {
			return c
		}
	case KindNumeric:
		an, bn := strings.EqualFold(a, "nan"), strings.EqualFold(b, "nan")
		switch {
		case an && bn:
			return 0
		case an:
			return 1
		case bn:
			return -1
		}
		ra, oka := new(big.Rat).SetString(a)
		rb, okb := new(big.Rat).SetString(b)
		if oka && okb {
			return ra.Cmp(rb)
		}
	}
	return strings.Compare(a, b)
}

// compareIntText compares decimal integers of any length without parsing
// into a fixed width.
func compareIntText(a, b string) (int, bool) {
	an, a := strings.HasPrefix(a, "-"), strings.TrimPrefix(a, "-")
	bn, b := strings.HasPrefix(b, "-"), strings.TrimPrefix(b, "-")
	if !digits(a) || !digits(b) {
		return 0, false
	}
	a, b = strings.TrimLeft(a, "0"), strings.TrimLeft(b, "0")
	if a == "" && b == "" {
		return 0, true
	}
	if an != bn {
		if an && a != "" {
			return -1, true
		}
		if bn && b != "" {
			return 1, true
		}
		// -0 against a positive number.
		if a == "" {
			return -1, true
		}
		return 1, true
	}
	c := cmpInt(len(a), len(b))
	if c == 0 {
		c = strings.Compare(a, b)
	}
	if an {
		c = -c
	}
	return c, true
}

func digits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

func cmpInt(a, b int) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// contains reports whether key k lies in the range s (not a key set).
func (o keyOrder) contains(s Span, k []string) bool {
	if s.Lo != nil && o.compare(k, s.Lo) < 0 {
		return false
	}
	if s.Hi != nil {
		c := o.compare(k, s.Hi)
		if c > 0 || (c == 0 && !s.HiInclusive) {
			return false
		}
	}
	return true
}
