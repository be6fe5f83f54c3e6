package maglev

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
)

// SeedLen is the number of random bytes in a [Seed].
const SeedLen = 12

// ErrInvalidSeed is wrapped by every error returned by [ParseSeed].
var ErrInvalidSeed = errors.New("invalid maglev seed")

// seedHint tells an operator how to make a valid seed.
const seedHint = "generate one with: head -c12 /dev/urandom | base64 -w0"

// Seed is the cluster-wide hash seed: 12 random bytes, written in
// configuration as standard base64 (16 characters). Every node must use the
// same seed to build identical tables and to hash flows identically.
//
// The bytes are split into three little-endian uint32 words:
//
//	bytes 0..3   OffsetSeed   Murmur3 seed for a backend's permutation offset
//	bytes 4..7   SkipSeed     Murmur3 seed for a backend's permutation skip
//	bytes 8..11  DatapathSeed initval of [FlowHash] (packet 5-tuples)
//
// The zero Seed is valid but predictable; use [GenerateSeed] or [ParseSeed].
type Seed [SeedLen]byte

// ParseSeed decodes s, which must be standard base64 (RFC 4648 with '+', '/'
// and '=' padding) of exactly 12 bytes. Errors wrap [ErrInvalidSeed] and say
// what is wrong: empty input, the position of the first bad character, or the
// decoded length.
func ParseSeed(s string) (Seed, error) {
	var seed Seed
	if s == "" {
		return seed, fmt.Errorf("%w: empty (%s)", ErrInvalidSeed, seedHint)
	}
	raw, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		var ce base64.CorruptInputError
		if errors.As(err, &ce) {
			return seed, fmt.Errorf("%w: not standard base64: %s (%s)", ErrInvalidSeed, base64Problem(s, int(ce)), seedHint)
		}
		return seed, fmt.Errorf("%w: %v", ErrInvalidSeed, err)
	}
	if len(raw) != SeedLen {
		return seed, fmt.Errorf("%w: decodes to %d bytes, want %d (%s)", ErrInvalidSeed, len(raw), SeedLen, seedHint)
	}
	copy(seed[:], raw)
	return seed, nil
}

// base64Problem describes the decoding failure Go reports at byte pos of s.
func base64Problem(s string, pos int) string {
	switch {
	case pos >= len(s):
		return fmt.Sprintf("input ends early at position %d (truncated, or missing '=' padding)", pos)
	case s[pos] == '=':
		return fmt.Sprintf("misplaced '=' padding at position %d", pos)
	case isBase64Char(s[pos]):
		return fmt.Sprintf("unexpected data at position %d (truncated group, or data after '=' padding)", pos)
	case s[pos] == '-' || s[pos] == '_':
		return fmt.Sprintf("illegal character %q at position %d (URL-safe alphabet; use standard base64 with '+' and '/')", s[pos], pos)
	default:
		return fmt.Sprintf("illegal character %q at position %d", s[pos], pos)
	}
}

func isBase64Char(c byte) bool {
	return 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '+' || c == '/'
}

// GenerateSeed returns a new random seed from crypto/rand.
func GenerateSeed() (Seed, error) {
	var seed Seed
	if _, err := rand.Read(seed[:]); err != nil {
		return seed, fmt.Errorf("maglev: generating seed: %w", err)
	}
	return seed, nil
}

// String returns the seed as standard base64, the form [ParseSeed] accepts.
func (s Seed) String() string { return base64.StdEncoding.EncodeToString(s[:]) }

// MarshalText implements encoding.TextMarshaler (standard base64).
func (s Seed) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler via [ParseSeed].
func (s *Seed) UnmarshalText(b []byte) error {
	v, err := ParseSeed(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// OffsetSeed is bytes 0..3 as a little-endian uint32.
func (s Seed) OffsetSeed() uint32 { return binary.LittleEndian.Uint32(s[0:4]) }

// SkipSeed is bytes 4..7 as a little-endian uint32.
func (s Seed) SkipSeed() uint32 { return binary.LittleEndian.Uint32(s[4:8]) }

// DatapathSeed is bytes 8..11 as a little-endian uint32: the seed the
// datapath passes to [FlowHash].
func (s Seed) DatapathSeed() uint32 { return binary.LittleEndian.Uint32(s[8:12]) }
