package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"syscall"

	msqlite "modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/rebound-dr/rebound"
)

// isFull reports a write that failed for want of space: SQLite's
// SQLITE_FULL (a short write hit ENOSPC), the -shm file that could not
// grow, or a bare ENOSPC.
func isFull(err error) bool {
	var e *msqlite.Error
	if errors.As(err, &e) {
		return e.Code()&0xff == sqlite3.SQLITE_FULL || e.Code() == sqlite3.SQLITE_IOERR_SHMSIZE
	}
	return errors.Is(err, syscall.ENOSPC)
}

// Dir is the directory that holds the database (absolute when Open could
// make it so): the place an operator frees space in.
func (db *DB) Dir() string { return filepath.Dir(db.path) }

// FullError is the error of a write the full data disk refused.
func (db *DB) FullError() error {
	return rebound.Errorf(rebound.ENOSPACE, "server data disk full at %s: the store (%s) cannot be written; free space in %s, then retry", db.Dir(), filepath.Base(db.path), db.Dir())
}

// DiskFull is signalled (coalesced) after a write failed because the data
// disk is full. The server watches it to report the condition; only a
// write that succeeds again ends it, which the watcher checks itself.
func (db *DB) DiskFull() <-chan struct{} { return db.full }

// note translates a write's error at the edge: a full disk becomes
// rebound.ENOSPACE naming the directory, and DiskFull is signalled.
func (db *DB) note(err error) error {
	if err == nil || !isFull(err) {
		return err
	}
	select {
	case db.full <- struct{}{}:
	default:
	}
	return fmt.Errorf("%w (%v)", db.FullError(), err)
}

// exec runs a write statement outside a transaction.
func (db *DB) exec(ctx context.Context, q string, args ...any) (sql.Result, error) {
	res, err := db.db.ExecContext(ctx, q, args...)
	return res, db.note(err)
}

// FreeBytes is the space left to unprivileged writers on the database's
// file system.
func (db *DB) FreeBytes() (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(db.Dir(), &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}
