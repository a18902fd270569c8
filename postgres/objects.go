package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rebound-dr/rebound"
)

func marshal(v any) (string, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return "", fmt.Errorf("encode %T: %w", v, err)
	}
	return string(b), nil
}

func unmarshal(doc string, v any) error {
	if err := json.Unmarshal([]byte(doc), v); err != nil {
		return fmt.Errorf("decode %T: %w", v, err)
	}
	return nil
}

func notFoundIfNone(tag pgconn.CommandTag, format string, args ...any) error {
	if tag.RowsAffected() == 0 {
		return rebound.Errorf(rebound.ENOTFOUND, format, args...)
	}
	return nil
}

// getDoc reads one document into v; pgx.ErrNoRows when there is none.
func (db *DB) getDoc(ctx context.Context, q, key string, v any) error {
	var doc string
	if err := db.pool.QueryRow(ctx, q, key).Scan(&doc); err != nil {
		return err
	}
	return unmarshal(doc, v)
}

// listDocs decodes every document q returns into a T.
func listDocs[T any](ctx context.Context, db *DB, q string, args ...any) ([]T, error) {
	rows, err := db.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, translate(err)
	}
	defer rows.Close()
	out := []T{}
	for rows.Next() {
		var doc string
		if err := rows.Scan(&doc); err != nil {
			return nil, err
		}
		var v T
		if err := unmarshal(doc, &v); err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, translate(rows.Err())
}

// putDoc creates or replaces the document name of table.
func (db *DB) putDoc(ctx context.Context, table, name string, v any) error {
	doc, err := marshal(v)
	if err != nil {
		return err
	}
	_, err = db.exec(ctx, `INSERT INTO `+table+` (name, doc) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET doc = excluded.doc`, name, doc)
	return err
}

// PutSite creates or replaces a site.
func (db *DB) PutSite(ctx context.Context, s rebound.Site) error {
	if s.Name == "" {
		return rebound.Errorf(rebound.EINVALID, "site name is empty")
	}
	if err := db.putDoc(ctx, "sites", s.Name, s); err != nil {
		return fmt.Errorf("put site %q: %w", s.Name, err)
	}
	return nil
}

// GetSite returns a site or ENOTFOUND.
func (db *DB) GetSite(ctx context.Context, name string) (*rebound.Site, error) {
	var s rebound.Site
	if err := db.getDoc(ctx, `SELECT doc FROM sites WHERE name = $1`, name, &s); errors.Is(err, pgx.ErrNoRows) {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "site %q not found", name)
	} else if err != nil {
		return nil, fmt.Errorf("get site %q: %w", name, translate(err))
	}
	return &s, nil
}

// ListSites returns all sites by name.
func (db *DB) ListSites(ctx context.Context) ([]rebound.Site, error) {
	out, err := listDocs[rebound.Site](ctx, db, `SELECT doc FROM sites ORDER BY name COLLATE "C"`)
	if err != nil {
		return nil, fmt.Errorf("list sites: %w", err)
	}
	return out, nil
}

// DeleteSite forgets a site's record.
func (db *DB) DeleteSite(ctx context.Context, name string) error {
	if _, err := db.exec(ctx, `DELETE FROM sites WHERE name = $1`, name); err != nil {
		return fmt.Errorf("delete site %q: %w", name, err)
	}
	return nil
}

// CreateMachine inserts a machine; ECONFLICT if the name is taken.
func (db *DB) CreateMachine(ctx context.Context, m *rebound.Machine) error {
	if m.Name == "" {
		return rebound.Errorf(rebound.EINVALID, "machine name is empty")
	}
	if m.CreatedAt.IsZero() {
		m.CreatedAt = db.now().UTC()
	}
	m.Revision = 0
	doc, err := marshal(m)
	if err != nil {
		return err
	}
	_, err = db.pool.Exec(ctx, `INSERT INTO machines (name, created_at, doc) VALUES ($1, $2, $3)`, m.Name, m.CreatedAt.UnixNano(), doc)
	if isUniqueViolation(err) {
		return rebound.Errorf(rebound.ECONFLICT, "machine %q already exists", m.Name)
	} else if err != nil {
		return fmt.Errorf("create machine %q: %w", m.Name, translate(err))
	}
	return nil
}

// GetMachine returns a machine or ENOTFOUND.
func (db *DB) GetMachine(ctx context.Context, name string) (*rebound.Machine, error) {
	var m rebound.Machine
	if err := db.getDoc(ctx, `SELECT doc FROM machines WHERE name = $1`, name, &m); errors.Is(err, pgx.ErrNoRows) {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "machine %q not found", name)
	} else if err != nil {
		return nil, fmt.Errorf("get machine %q: %w", name, translate(err))
	}
	return &m, nil
}

// ListMachines returns all machines by name.
func (db *DB) ListMachines(ctx context.Context) ([]rebound.Machine, error) {
	out, err := listDocs[rebound.Machine](ctx, db, `SELECT doc FROM machines ORDER BY name COLLATE "C"`)
	if err != nil {
		return nil, fmt.Errorf("list machines: %w", err)
	}
	return out, nil
}

// UpdateMachine replaces a stored machine whose revision is still
// m.Revision and bumps it (see rebound.Store).
func (db *DB) UpdateMachine(ctx context.Context, m *rebound.Machine) error {
	old := m.Revision
	m.Revision++
	doc, err := marshal(m)
	if err != nil {
		m.Revision = old
		return err
	}
	tag, err := db.exec(ctx, `UPDATE machines SET doc = $1, revision = $2 WHERE name = $3 AND revision = $4`, doc, m.Revision, m.Name, old)
	if err != nil {
		m.Revision = old
		return fmt.Errorf("update machine %q: %w", m.Name, err)
	}
	if tag.RowsAffected() == 0 {
		m.Revision = old
		if _, err := db.GetMachine(ctx, m.Name); err != nil {
			return err
		}
		return rebound.MachineChangedError(m.Name)
	}
	return nil
}

// DeleteMachine removes a machine; its jobs and events stay.
func (db *DB) DeleteMachine(ctx context.Context, name string) error {
	tag, err := db.exec(ctx, `DELETE FROM machines WHERE name = $1`, name)
	if err != nil {
		return fmt.Errorf("delete machine %q: %w", name, err)
	}
	return notFoundIfNone(tag, "machine %q not found", name)
}

// PutPolicy creates or replaces a policy.
func (db *DB) PutPolicy(ctx context.Context, p rebound.Policy) error {
	if p.Name == "" {
		return rebound.Errorf(rebound.EINVALID, "policy name is empty")
	}
	if err := db.putDoc(ctx, "policies", p.Name, p); err != nil {
		return fmt.Errorf("put policy %q: %w", p.Name, err)
	}
	return nil
}

// GetPolicy returns a policy or ENOTFOUND.
func (db *DB) GetPolicy(ctx context.Context, name string) (*rebound.Policy, error) {
	var p rebound.Policy
	if err := db.getDoc(ctx, `SELECT doc FROM policies WHERE name = $1`, name, &p); errors.Is(err, pgx.ErrNoRows) {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "policy %q not found", name)
	} else if err != nil {
		return nil, fmt.Errorf("get policy %q: %w", name, translate(err))
	}
	return &p, nil
}

// ListPolicies returns all policies by name.
func (db *DB) ListPolicies(ctx context.Context) ([]rebound.Policy, error) {
	out, err := listDocs[rebound.Policy](ctx, db, `SELECT doc FROM policies ORDER BY name COLLATE "C"`)
	if err != nil {
		return nil, fmt.Errorf("list policies: %w", err)
	}
	return out, nil
}

// DeletePolicy removes a policy; ENOTFOUND if it does not exist.
func (db *DB) DeletePolicy(ctx context.Context, name string) error {
	tag, err := db.exec(ctx, `DELETE FROM policies WHERE name = $1`, name)
	if err != nil {
		return fmt.Errorf("delete policy %q: %w", name, err)
	}
	return notFoundIfNone(tag, "policy %q not found", name)
}

// AddEvent appends an event, unless one with its EventID is stored: of
// two servers adding it at once, the unique index keeps one row.
func (db *DB) AddEvent(ctx context.Context, e rebound.Event) error {
	if e.Time.IsZero() {
		e.Time = db.now().UTC()
	}
	var id any // NULL without an EventID: never collides
	if e.EventID != "" {
		id = e.EventID
	}
	if _, err := db.exec(ctx, `INSERT INTO events (time, machine, site, kind, message, event_id) VALUES ($1, $2, $3, $4, $5, $6)
		ON CONFLICT (event_id) DO NOTHING`,
		e.Time.UnixNano(), e.Machine, e.Site, e.Kind, e.Message, id); err != nil {
		return fmt.Errorf("add event: %w", err)
	}
	return nil
}

func (db *DB) events(ctx context.Context, q string, args ...any) ([]rebound.Event, error) {
	rows, err := db.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, translate(err)
	}
	defer rows.Close()
	out := []rebound.Event{}
	for rows.Next() {
		var e rebound.Event
		var t int64
		if err := rows.Scan(&e.ID, &t, &e.Machine, &e.Site, &e.Kind, &e.Message); err != nil {
			return nil, err
		}
		e.Time = unixNano(t)
		out = append(out, e)
	}
	return out, translate(rows.Err())
}

// ListEvents returns events newest first.
func (db *DB) ListEvents(ctx context.Context, machine string, limit int) ([]rebound.Event, error) {
	q, args := `SELECT id, time, machine, site, kind, message FROM events`, []any{}
	if machine != "" {
		args = append(args, machine)
		q += ` WHERE machine = $1`
	}
	q += ` ORDER BY id DESC`
	if limit > 0 {
		args = append(args, limit)
		q += ` LIMIT $` + strconv.Itoa(len(args))
	}
	out, err := db.events(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list events: %w", err)
	}
	return out, nil
}

// QueryEvents returns a page of events newest first (see rebound.Store).
func (db *DB) QueryEvents(ctx context.Context, q rebound.ListQuery) (*rebound.EventPage, error) {
	if q.Limit <= 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "limit must be positive, not %d", q.Limit)
	}
	var where []string
	var args []any
	arg := func(v any) string {
		args = append(args, v)
		return "$" + strconv.Itoa(len(args))
	}
	if q.Cursor != "" {
		id, err := strconv.ParseInt(q.Cursor, 10, 64)
		if err != nil || id < 1 {
			return nil, rebound.Errorf(rebound.EINVALID, "cursor %q is not one this server gave: start again without it", q.Cursor)
		}
		where = append(where, `id < `+arg(id))
	}
	if q.Machine != "" {
		where = append(where, `machine = `+arg(q.Machine))
	}
	if q.Kind != "" {
		// A dotted prefix: "job" is every "job.*" kind.
		where = append(where, `(kind = `+arg(q.Kind)+` OR starts_with(kind, `+arg(q.Kind+".")+`))`)
	}
	if !q.Since.IsZero() {
		where = append(where, `time >= `+arg(q.Since.UnixNano()))
	}
	if !q.Until.IsZero() {
		where = append(where, `time < `+arg(q.Until.UnixNano()))
	}
	stmt := `SELECT id, time, machine, site, kind, message FROM events`
	if len(where) > 0 {
		stmt += ` WHERE ` + strings.Join(where, ` AND `)
	}
	// One more than the limit tells whether another page follows.
	stmt += ` ORDER BY id DESC LIMIT ` + arg(q.Limit+1)
	evs, err := db.events(ctx, stmt, args...)
	if err != nil {
		return nil, fmt.Errorf("query events: %w", err)
	}
	page := &rebound.EventPage{Events: evs}
	if len(page.Events) > q.Limit {
		page.Events = page.Events[:q.Limit]
		page.Next = strconv.FormatInt(page.Events[q.Limit-1].ID, 10)
	}
	return page, nil
}

// GetSetting returns a server setting and whether it is set.
func (db *DB) GetSetting(ctx context.Context, key string) (string, bool, error) {
	var v string
	err := db.pool.QueryRow(ctx, `SELECT value FROM settings WHERE key = $1`, key).Scan(&v)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", false, nil
	} else if err != nil {
		return "", false, fmt.Errorf("get setting %q: %w", key, translate(err))
	}
	return v, true, nil
}

// PutSetting sets a server setting.
func (db *DB) PutSetting(ctx context.Context, key, value string) error {
	if _, err := db.exec(ctx, `INSERT INTO settings (key, value) VALUES ($1, $2)
		ON CONFLICT (key) DO UPDATE SET value = excluded.value`, key, value); err != nil {
		return fmt.Errorf("put setting %q: %w", key, err)
	}
	return nil
}

// PutPlan creates or replaces a plan.
func (db *DB) PutPlan(ctx context.Context, p rebound.Plan) error {
	if err := db.putDoc(ctx, "plans", p.Name, p); err != nil {
		return fmt.Errorf("put plan %q: %w", p.Name, err)
	}
	return nil
}

// GetPlan returns a plan or ENOTFOUND.
func (db *DB) GetPlan(ctx context.Context, name string) (*rebound.Plan, error) {
	var p rebound.Plan
	if err := db.getDoc(ctx, `SELECT doc FROM plans WHERE name = $1`, name, &p); errors.Is(err, pgx.ErrNoRows) {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "plan %q not found: rebound plan list shows the plans", name)
	} else if err != nil {
		return nil, fmt.Errorf("get plan %q: %w", name, translate(err))
	}
	return &p, nil
}

// ListPlans returns every plan by name.
func (db *DB) ListPlans(ctx context.Context) ([]rebound.Plan, error) {
	out, err := listDocs[rebound.Plan](ctx, db, `SELECT doc FROM plans ORDER BY name COLLATE "C"`)
	if err != nil {
		return nil, fmt.Errorf("list plans: %w", err)
	}
	return out, nil
}

// DeletePlan removes a plan; ENOTFOUND if there is none.
func (db *DB) DeletePlan(ctx context.Context, name string) error {
	tag, err := db.exec(ctx, `DELETE FROM plans WHERE name = $1`, name)
	if err != nil {
		return fmt.Errorf("delete plan %q: %w", name, err)
	}
	return notFoundIfNone(tag, "plan %q not found", name)
}
