package site

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"

	"github.com/rebound-dr/rebound/internal/failpoint"
	"github.com/rebound-dr/rebound/internal/fsutil"
)

// The site's state is a snapshot, state.json (every unit, and the
// sequence of the last change it holds), and a log, state.log, of the
// changes since: a save appends one record of the units it changed and
// fsyncs it, so its cost does not grow with the site. When the log
// outgrows the snapshot (and minCompact), the next save writes a new
// snapshot and empties the log; so does every start that finds records.
// One record holds every unit a save changed (a regroup's new and
// dropped units), so a save is atomic as a whole, as the single file
// was. See docs/design/groups.md ("Site state").

const (
	stateVersion = 3
	stateLog     = "state.log"
)

// minCompact: a log this small is never compacted (tests lower it).
var minCompact int64 = 1 << 20

// stateRecord is one save in state.log: the units it wrote, whole, and
// the ones it removed.
type stateRecord struct {
	Seq uint64      `json:"seq"`
	Put []unitState `json:"put,omitempty"`
	Del []string    `json:"del,omitempty"`
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// stateStore writes the site's state. Guarded by Site.mu.
type stateStore struct {
	dir      string
	seq      uint64 // of the last change written
	log      *os.File
	logSize  int64
	snapSize int64
	// broken: an append failed and left the log's tail unknown; the next
	// save writes a snapshot instead.
	broken bool
	// written, when set (tests), holds each unit as the files hold it,
	// to check every save against the whole state.
	written map[string][]byte
}

func (st *stateStore) snapPath() string { return filepath.Join(st.dir, "state.json") }
func (st *stateStore) logPath() string  { return filepath.Join(st.dir, stateLog) }

// loadState reads the snapshot and replays the log. migrated reports a
// snapshot of an older version (its log, if any, is not this one's: it is
// ignored and emptied by the snapshot Open writes); logged reports records
// (or a torn tail) in the log, which Open folds into a new snapshot.
func (st *stateStore) load() (units []unitState, migrated, logged bool, err error) {
	b, err := os.ReadFile(st.snapPath())
	byName := map[string]unitState{}
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, false, false, err
	default:
		var snap []unitState
		var version int
		if snap, version, st.seq, err = decodeState(b); err != nil {
			return nil, false, false, fmt.Errorf("read site state %s: %w", st.snapPath(), err)
		}
		migrated = version != stateVersion
		for _, u := range snap {
			byName[u.Name] = u
		}
		st.snapSize = int64(len(b))
	}
	if !migrated {
		if logged, err = st.replay(byName); err != nil {
			return nil, false, false, fmt.Errorf("read site state %s: %w", st.logPath(), err)
		}
	}
	for _, u := range byName {
		units = append(units, u)
	}
	sort.Slice(units, func(i, j int) bool { return units[i].Name < units[j].Name })
	return units, migrated, logged, nil
}

// replay applies the log's records after the snapshot's sequence. A
// record cut short or failing its checksum is the tail of a save that
// never returned (a save that fails makes the next one a snapshot, so
// nothing acknowledged follows it): it and anything after it are dropped.
func (st *stateStore) replay(units map[string]unitState) (logged bool, err error) {
	b, err := os.ReadFile(st.logPath())
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	logged = len(b) > 0
	for off := 0; off < len(b); {
		if len(b)-off < 8 {
			break
		}
		n := int(binary.LittleEndian.Uint32(b[off:]))
		sum := binary.LittleEndian.Uint32(b[off+4:])
		if n == 0 || n > len(b)-off-8 || crc32.Checksum(b[off+8:off+8+n], castagnoli) != sum {
			break
		}
		var r stateRecord
		if err := json.Unmarshal(b[off+8:off+8+n], &r); err != nil {
			return false, fmt.Errorf("record at offset %d: %w", off, err)
		}
		off += 8 + n
		if r.Seq <= st.seq {
			continue // already in the snapshot (a start killed in its compaction)
		}
		if r.Seq != st.seq+1 {
			return false, fmt.Errorf("record %d follows %d: the log lost a record; restore the site's data directory from a backup", r.Seq, st.seq)
		}
		for _, u := range r.Put {
			units[u.Name] = u
		}
		for _, n := range r.Del {
			delete(units, n)
		}
		st.seq = r.Seq
	}
	return logged, nil
}

// snapshot writes every unit to state.json, then empties the log. A crash
// before the rename leaves the old snapshot and log; after it, the new
// snapshot, whose sequence makes a replay skip the old log's records.
func (st *stateStore) snapshot(units []unitState) error {
	sort.Slice(units, func(i, j int) bool { return units[i].Name < units[j].Name })
	b, err := json.MarshalIndent(siteState{Version: stateVersion, Seq: st.seq, Units: units}, "", "  ")
	if err != nil {
		return err
	}
	st.broken = true // until the log is empty again
	tmp := st.snapPath() + ".tmp"
	if err := writeSync(tmp, b); err != nil {
		return fmt.Errorf("write %s: %w", st.snapPath(), err)
	}
	failpoint.Hit(context.Background(), "site/state/snapshot/written")
	if err := os.Rename(tmp, st.snapPath()); err != nil {
		return fmt.Errorf("write %s: %w", st.snapPath(), err)
	}
	if err := fsutil.SyncDir(st.dir); err != nil {
		return fmt.Errorf("write %s: %w", st.snapPath(), err)
	}
	failpoint.Hit(context.Background(), "site/state/snapshot/renamed")
	st.snapSize = int64(len(b))
	if st.log == nil {
		f, err := os.OpenFile(st.logPath(), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return err
		}
		st.log = f
	}
	if err := errors.Join(st.log.Truncate(0), st.log.Sync(), fsutil.SyncDir(st.dir)); err != nil {
		return fmt.Errorf("empty %s: %w", st.logPath(), err)
	}
	if _, err := st.log.Seek(0, io.SeekStart); err != nil {
		return err
	}
	st.logSize, st.broken = 0, false
	if st.written != nil {
		clear(st.written)
		for _, u := range units {
			st.written[u.Name], _ = json.Marshal(u)
		}
	}
	return nil
}

// writeSync writes path with b and fsyncs it.
func writeSync(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	return errors.Join(err, f.Sync(), f.Close())
}

// appendRecord writes one record at the log's end and fsyncs it.
func (st *stateStore) appendRecord(r stateRecord) error {
	payload, err := json.Marshal(r)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	var hdr [8]byte
	binary.LittleEndian.PutUint32(hdr[:], uint32(len(payload)))
	binary.LittleEndian.PutUint32(hdr[4:], crc32.Checksum(payload, castagnoli))
	buf.Write(hdr[:])
	buf.Write(payload)
	st.broken = true // until the record is durable
	if _, err := st.log.WriteAt(buf.Bytes(), st.logSize); err != nil {
		return fmt.Errorf("write %s: %w", st.logPath(), err)
	}
	if err := st.log.Sync(); err != nil {
		return fmt.Errorf("write %s: %w", st.logPath(), err)
	}
	st.logSize += int64(buf.Len())
	st.seq, st.broken = r.Seq, false
	if st.written != nil {
		for _, u := range r.Put {
			st.written[u.Name], _ = json.Marshal(u)
		}
		for _, n := range r.Del {
			delete(st.written, n)
		}
	}
	return nil
}

// unitStateOf is u as the state files hold it.
func unitStateOf(u *unit) unitState {
	us := unitState{Name: u.name, unitFields: u.state}
	for _, m := range u.members {
		us.Members = append(us.Members, m.state)
	}
	return us
}

// saveLocked makes the state of the units given, and of every unit added
// or dropped since the last save (addUnitLocked, dropUnitLocked), durable:
// one record in the log, or a snapshot of every unit when the log has
// outgrown the last one or an earlier save failed. A caller that changed
// a unit in place names it.
func (s *Site) saveLocked(changed ...*unit) error {
	for _, u := range changed {
		s.dirty[u.name] = true
	}
	st := &s.store
	var err error
	if st.broken || st.log == nil || st.logSize > max(st.snapSize, minCompact) {
		err = s.snapshotLocked()
	} else if len(s.dirty) > 0 {
		r := stateRecord{Seq: st.seq + 1}
		names := make([]string, 0, len(s.dirty))
		for n := range s.dirty {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			if u, ok := s.units[n]; ok {
				r.Put = append(r.Put, unitStateOf(u))
			} else {
				r.Del = append(r.Del, n)
			}
		}
		err = st.appendRecord(r)
	}
	if err != nil {
		return err // the units stay dirty; the next save is a snapshot
	}
	clear(s.dirty)
	if st.written != nil {
		s.checkWrittenLocked()
	}
	return nil
}

// snapshotLocked writes every unit as the new snapshot.
func (s *Site) snapshotLocked() error {
	units := make([]unitState, 0, len(s.units))
	for _, u := range s.units {
		units = append(units, unitStateOf(u))
	}
	return s.store.snapshot(units)
}

// checkWrittenLocked (tests, at Close) panics when the files do not hold
// a unit as it is: a change whose save did not name its unit.
func (s *Site) checkWrittenLocked() {
	w := s.store.written
	if len(w) != len(s.units) {
		panic(fmt.Sprintf("site state: the files hold %d units, the site %d", len(w), len(s.units)))
	}
	for n, u := range s.units {
		b, _ := json.Marshal(unitStateOf(u))
		if !bytes.Equal(b, w[n]) {
			panic(fmt.Sprintf("site state: unit %s changed without a save naming it:\nfiles %s\nsite  %s", n, w[n], b))
		}
	}
}

// closeState closes the log.
func (s *Site) closeState() error {
	if s.store.log == nil {
		return nil
	}
	err := s.store.log.Close()
	s.store.log = nil
	return err
}

// openLog opens the log for appends; it holds no record (Open made a
// snapshot of any).
func (st *stateStore) openLog() error {
	f, err := os.OpenFile(st.logPath(), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	fi, err := f.Stat()
	if err == nil {
		err = fsutil.SyncDir(st.dir)
	}
	if err != nil {
		f.Close()
		return err
	}
	st.log, st.logSize = f, fi.Size()
	return nil
}

// checkState makes every site check, at each save and at Close, that its
// state files hold each unit as it is: a unit changed without a save
// naming it panics. The site's tests set it; REBOUND_SITE_CHECK_STATE=1
// sets it for a process (cmd/rebound's end-to-end tests, and the real
// binaries they start, which inherit it).
var checkState bool

// checkStateEnv is the environment variable that turns checkState on.
const checkStateEnv = "REBOUND_SITE_CHECK_STATE"

// SavedState returns what a start of the site at dataDir would read, as
// one state.json (version 3) holding every unit: the snapshot with the
// log's records applied. It changes no file.
func SavedState(dataDir string) ([]byte, error) {
	st := stateStore{dir: dataDir}
	units, _, _, err := st.load()
	if err != nil {
		return nil, err
	}
	return json.MarshalIndent(siteState{Version: stateVersion, Seq: st.seq, Units: units}, "", "  ")
}
