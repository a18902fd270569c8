package rebound

// RecordKind says what a stream record does.
type RecordKind uint8

const (
	// RecordWrite sets Length bytes at Offset of disk Disk to Data.
	RecordWrite RecordKind = 1
	// RecordZero sets Length bytes at Offset to zero (WRITE_ZEROES).
	RecordZero RecordKind = 2
	// RecordTrim discards Length bytes at Offset. Rebound reads trimmed
	// ranges back as zeroes, so a trim replays exactly like RecordZero.
	RecordTrim RecordKind = 3
	// RecordMark is a recovery point bookmark at this position. It carries no
	// data; PointKind says whether it is crash- or app-consistent.
	RecordMark RecordKind = 4
	// RecordResyncBegin opens a window in which the records that follow copy
	// regions of the source disks (initial copy or dirty-region resync). No
	// position inside the window is a consistent state.
	RecordResyncBegin RecordKind = 5
	// RecordResyncEnd closes the window; its position is consistent again.
	RecordResyncEnd RecordKind = 6
	// RecordGap is never on the wire: a target's journal writes it where it
	// dropped damaged records (Offset = the first seq lost, Seq = the last).
	// It opens a window that only a repair resync (a ResyncBegin tagged
	// ResyncRepair, then its ResyncEnd) closes.
	RecordGap RecordKind = 7
)

// ResyncRepair tags (in PointKind) the ResyncBegin of a resync that
// repairs a target's damaged journal: it follows the source's compare of
// its disks with the target's digests.
const ResyncRepair PointKind = "repair"

// ResyncSourceCrash tags (in PointKind) the ResyncBegin a source appends
// when it restarts after a crash that lost records it held only in memory
// (capture's protocol A). Its seq may jump past seqs the target never got:
// the target records them as a gap whose window the matching ResyncEnd
// closes (docs/design/journal.md, "Source crash").
const ResyncSourceCrash PointKind = "source-crash"

func (k RecordKind) String() string {
	switch k {
	case RecordWrite:
		return "write"
	case RecordZero:
		return "zero"
	case RecordTrim:
		return "trim"
	case RecordMark:
		return "mark"
	case RecordResyncBegin:
		return "resync-begin"
	case RecordResyncEnd:
		return "resync-end"
	case RecordGap:
		return "gap"
	}
	return "unknown"
}

// Record is one entry of a replication stream. A stream is the totally
// ordered sequence of everything applied to the disks of its machines; the
// state after any prefix that is not inside a resync window is a
// crash-consistent state of all those machines.
type Record struct {
	Seq    uint64     // position in the stream, starting at 1, no gaps
	Time   int64      // source wall clock, Unix nanoseconds, non-decreasing
	Kind   RecordKind //
	Disk   uint32     // index of the disk in the stream's disk table
	Offset int64      // byte offset on the disk
	Length int64      // byte length (len(Data) for writes)
	Data   []byte     // payload for RecordWrite, nil otherwise

	PointKind PointKind // for RecordMark
}

// PointKind is the consistency of a recovery point.
type PointKind string

const (
	PointCrash PointKind = "crash"
	PointApp   PointKind = "app"
)
