package main

import (
	"fmt"
	"math"
	"math/big"
	"strconv"
	"strings"

	"github.com/rebound-dr/rebound"
)

// ParseSize parses a disk size: plain bytes ("1048576"), or a number with a
// K, M, G, T or P suffix, optionally followed by "iB" or "B" ("512M",
// "4GiB", "1.5G", "512B"). Like qemu-img, every suffix is a power of 1024.
// The size must be a positive whole number of bytes.
func ParseSize(s string) (int64, error) {
	bad := func(why string) error {
		return rebound.Errorf(rebound.EINVALID, "invalid size %q: %s", s, why)
	}
	u := strings.ToUpper(strings.TrimSpace(s))
	needUnit := false
	if strings.HasSuffix(u, "IB") {
		u, needUnit = u[:len(u)-2], true
	} else if strings.HasSuffix(u, "B") {
		u = u[:len(u)-1]
	}
	shift := uint(0)
	if n := len(u); n > 0 {
		if i := strings.IndexByte("KMGTP", u[n-1]); i >= 0 {
			shift, u = uint(10*(i+1)), u[:n-1]
		}
	}
	if needUnit && shift == 0 {
		return 0, bad("want bytes or a number with K, M, G, T (powers of 1024), e.g. 512M or 4GiB")
	}
	// Only digits and one dot: no signs, exponents or hex.
	if u == "" || u == "." || strings.Trim(u, "0123456789.") != "" || strings.Count(u, ".") > 1 {
		return 0, bad("want bytes or a number with K, M, G, T (powers of 1024), e.g. 512M or 4GiB")
	}
	r, ok := new(big.Rat).SetString(u)
	if !ok {
		return 0, bad("not a number")
	}
	r.Mul(r, new(big.Rat).SetInt(new(big.Int).Lsh(big.NewInt(1), shift)))
	if !r.IsInt() {
		return 0, bad("not a whole number of bytes")
	}
	n := r.Num()
	if n.Sign() <= 0 {
		return 0, bad("must be positive")
	}
	if !n.IsInt64() {
		return 0, bad("too large")
	}
	return n.Int64(), nil
}

// formatSize prints bytes with a binary suffix: 0B, 512B, 1.5KiB, 4GiB.
func formatSize(n int64) string {
	const units = "KMGTPE"
	if n < 1024 && n > -1024 {
		return fmt.Sprintf("%dB", n)
	}
	v := float64(n)
	i := -1
	for math.Abs(v) >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	s := strconv.FormatFloat(v, 'f', 1, 64)
	s = strings.TrimSuffix(s, ".0")
	return s + string(units[i]) + "iB"
}
