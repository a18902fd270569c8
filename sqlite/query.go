package sqlite

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/rebound-dr/rebound"
)

// DeletePolicy removes a policy; ENOTFOUND if it does not exist. The
// caller checks that no machine uses it.
func (db *DB) DeletePolicy(ctx context.Context, name string) error {
	res, err := db.exec(ctx, `DELETE FROM policies WHERE name = ?`, name)
	if err != nil {
		return fmt.Errorf("delete policy %q: %w", name, err)
	}
	return notFoundIfNone(res, "policy %q not found", name)
}

// QueryEvents returns a page of events newest first, filtered by q. The
// cursor is the ID of the last event of the previous page: the page goes
// on below it, so events added meanwhile do not shift it. q.Limit must be
// positive.
func (db *DB) QueryEvents(ctx context.Context, q rebound.ListQuery) (*rebound.EventPage, error) {
	if q.Limit <= 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "limit must be positive, not %d", q.Limit)
	}
	var where []string
	var args []any
	if q.Cursor != "" {
		id, err := strconv.ParseInt(q.Cursor, 10, 64)
		if err != nil || id < 1 {
			return nil, rebound.Errorf(rebound.EINVALID, "cursor %q is not one this server gave: start again without it", q.Cursor)
		}
		where, args = append(where, `id < ?`), append(args, id)
	}
	if q.Machine != "" {
		where, args = append(where, `machine = ?`), append(args, q.Machine)
	}
	if q.Kind != "" {
		// A dotted prefix: "job" is every "job.*" kind.
		where = append(where, `(kind = ? OR substr(kind, 1, ?) = ?)`)
		args = append(args, q.Kind, len(q.Kind)+1, q.Kind+".")
	}
	if !q.Since.IsZero() {
		where, args = append(where, `time >= ?`), append(args, q.Since.UnixNano())
	}
	if !q.Until.IsZero() {
		where, args = append(where, `time < ?`), append(args, q.Until.UnixNano())
	}
	stmt := `SELECT id, time, machine, site, kind, message FROM events`
	if len(where) > 0 {
		stmt += ` WHERE ` + strings.Join(where, ` AND `)
	}
	// One more than the limit tells whether another page follows.
	stmt += ` ORDER BY id DESC LIMIT ?`
	args = append(args, q.Limit+1)
	rows, err := db.db.QueryContext(ctx, stmt, args...)
	if err != nil {
		return nil, fmt.Errorf("query events: %w", err)
	}
	defer rows.Close()
	page := &rebound.EventPage{Events: []rebound.Event{}}
	for rows.Next() {
		var e rebound.Event
		var t int64
		if err := rows.Scan(&e.ID, &t, &e.Machine, &e.Site, &e.Kind, &e.Message); err != nil {
			return nil, fmt.Errorf("query events: %w", err)
		}
		e.Time = unixNano(t)
		page.Events = append(page.Events, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("query events: %w", err)
	}
	if len(page.Events) > q.Limit {
		page.Events = page.Events[:q.Limit]
		page.Next = strconv.FormatInt(page.Events[q.Limit-1].ID, 10)
	}
	return page, nil
}
