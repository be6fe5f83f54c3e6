package maglev

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// DefaultSize is the table size used when a configuration does not choose
// one. It suits services of up to about 160 backends (see [RecommendSize]).
const DefaultSize uint32 = 16381

// sizes are the supported table sizes, ascending. They are the same primes
// Linux IPVS offers for its "mh" scheduler.
var sizes = [...]uint32{251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071}

// ErrInvalidSize is wrapped by every error about a table size.
var ErrInvalidSize = errors.New("invalid maglev table size")

// Sizes returns the supported table sizes in ascending order.
func Sizes() []uint32 {
	out := make([]uint32, len(sizes))
	copy(out, sizes[:])
	return out
}

// ValidateSize reports whether m is one of the supported table sizes. The
// error (which wraps [ErrInvalidSize]) says whether m is not prime at all or
// is a prime that is simply not a preset, and lists the allowed values.
func ValidateSize(m uint32) error {
	for _, s := range sizes {
		if s == m {
			return nil
		}
	}
	reason := "not prime"
	if isPrime(m) {
		reason = "prime but not a supported preset"
	}
	return fmt.Errorf("%w %d: %s (allowed: %s)", ErrInvalidSize, m, reason, allowedSizes())
}

// RecommendSize returns the smallest supported size M with M >= 100*n, the
// rule that keeps the slot-count imbalance between equally weighted backends
// at or below 1%. For n == 0 it returns the smallest preset. When n is so
// large that no preset satisfies the rule (n > 1310) it returns the largest
// preset together with an error wrapping [ErrInvalidSize]; callers may still
// use that size and accept the larger imbalance.
func RecommendSize(n int) (uint32, error) {
	if n < 0 {
		n = 0
	}
	need := uint64(n) * 100
	for _, s := range sizes {
		if uint64(s) >= need {
			return s, nil
		}
	}
	largest := sizes[len(sizes)-1]
	return largest, fmt.Errorf("%w: %d backends need M >= %d, the largest preset is %d",
		ErrInvalidSize, n, need, largest)
}

func allowedSizes() string {
	parts := make([]string, len(sizes))
	for i, s := range sizes {
		parts[i] = strconv.FormatUint(uint64(s), 10)
	}
	return strings.Join(parts, ", ")
}

// isPrime is trial division; m is at most 2^32-1 so at most 65536 divisions.
func isPrime(m uint32) bool {
	if m < 2 {
		return false
	}
	if m%2 == 0 {
		return m == 2
	}
	for d := uint64(3); d*d <= uint64(m); d += 2 {
		if uint64(m)%d == 0 {
			return false
		}
	}
	return true
}
