package capture

import "math/bits"

// setBits sets bits first..last (inclusive) of a bitmap and returns the
// span of bytes that changed, lo..hi (lo < 0 when none did), and how many
// bits went from clear to set. Dirty maps and trackers persist that span
// with one write before the change they cover.
func setBits(bm []byte, first, last int64) (lo, hi, added int64) {
	lo, hi = -1, -1
	for i := first / 8; i <= last/8; i++ {
		old := bm[i]
		b := old
		if i > first/8 && i < last/8 {
			b = 0xff
		} else {
			for r := max(first, i*8); r <= min(last, i*8+7); r++ {
				b |= 1 << (r % 8)
			}
		}
		if b == old {
			continue
		}
		bm[i] = b
		added += int64(bits.OnesCount8(b &^ old))
		if lo < 0 {
			lo = i
		}
		hi = i
	}
	return lo, hi, added
}
