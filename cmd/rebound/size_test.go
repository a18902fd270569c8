package main

import (
	"testing"

	"github.com/rebound-dr/rebound"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"1":                   1,
		"1048576":             1 << 20,
		"512B":                512,
		"1K":                  1 << 10,
		"1k":                  1 << 10,
		"1KiB":                1 << 10,
		"512M":                512 << 20,
		"512MB":               512 << 20,
		"1G":                  1 << 30,
		"4GiB":                4 << 30,
		"4gib":                4 << 30,
		"1.5G":                3 << 29,
		"0.5K":                512,
		"2T":                  2 << 40,
		"1P":                  1 << 50,
		" 10G ":               10 << 30,
		"8191P":               8191 << 50,
		"9223372036854775807": 1<<63 - 1,
	} {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{
		"", "G", "GiB", "iB", "B", "0", "0G", "-1", "-1G", "+1G", "1e9", "0x10", "1.2.3G",
		"1.0000001K", "0.1", "1X", "1 G", "1Gi", "8192P", "9223372036854775808", "abc", ".",
	} {
		got, err := ParseSize(in)
		if err == nil {
			t.Errorf("ParseSize(%q) = %d, want an error", in, got)
		} else if rebound.ErrorCode(err) != rebound.EINVALID {
			t.Errorf("ParseSize(%q): code %s", in, rebound.ErrorCode(err))
		}
	}
}

func TestFormatSize(t *testing.T) {
	for n, want := range map[int64]string{
		0: "0B", 512: "512B", 1024: "1KiB", 1536: "1.5KiB", 512 << 20: "512MiB", 4 << 30: "4GiB", 10 << 40: "10TiB",
	} {
		if got := formatSize(n); got != want {
			t.Errorf("formatSize(%d) = %q, want %q", n, got, want)
		}
	}
}
