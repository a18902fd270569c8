package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

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

// isUniqueViolation reports a PRIMARY KEY/UNIQUE constraint failure.
// modernc reports it in the message; matching text avoids importing lib.
func isUniqueViolation(err error) bool {
	return err != nil && strings.Contains(err.Error(), "UNIQUE constraint failed")
}

// Sites

// PutSite creates or replaces a site.
func (db *DB) PutSite(ctx context.Context, s rebound.Site) error {
	if s.Name == "" {
		return rebound.Errorf(rebound.EINVALID, "site name is empty")
	}
	doc, err := marshal(s)
	if err != nil {
		return err
	}
	if _, err := db.exec(ctx, `INSERT INTO sites (name, doc) VALUES (?, ?)
		ON CONFLICT (name) DO UPDATE SET doc = excluded.doc`, s.Name, doc); err != nil {
		return fmt.Errorf("put site %q: %w", s.Name, err)
	}
	return nil
}

// GetSite returns a site or ENOTFOUND.
func (db *DB) GetSite(ctx context.Context, name string) (*rebound.Site, error) {
	var s rebound.Site
	if err := db.getDoc(ctx, `SELECT doc FROM sites WHERE name = ?`, name, &s); errors.Is(err, sql.ErrNoRows) {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "site %q not found", name)
	} else if err != nil {
		return nil, fmt.Errorf("get site %q: %w", name, err)
	}
	return &s, nil
}

// ListSites returns all sites by name.
func (db *DB) ListSites(ctx context.Context) ([]rebound.Site, error) {
	out := []rebound.Site{}
	err := db.listDocs(ctx, `SELECT doc FROM sites ORDER BY name`, nil, func(doc string) error {
		var s rebound.Site
		if err := unmarshal(doc, &s); err != nil {
			return err
		}
		out = append(out, s)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list sites: %w", err)
	}
	return out, nil
}

// Machines

// CreateMachine inserts a machine; ECONFLICT if the name is taken. A zero
// CreatedAt is set to now.
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
	_, err = db.exec(ctx, `INSERT INTO machines (name, created_at, doc) VALUES (?, ?, ?)`,
		m.Name, m.CreatedAt.UnixNano(), doc)
	if isUniqueViolation(err) {
		return rebound.Errorf(rebound.ECONFLICT, "machine %q already exists", m.Name)
	} else if err != nil {
		return fmt.Errorf("create machine %q: %w", m.Name, err)
	}
	return nil
}

// GetMachine returns a machine or ENOTFOUND.
func (db *DB) GetMachine(ctx context.Context, name string) (*rebound.Machine, error) {
	var m rebound.Machine
	if err := db.getDoc(ctx, `SELECT doc FROM machines WHERE name = ?`, name, &m); errors.Is(err, sql.ErrNoRows) {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "machine %q not found", name)
	} else if err != nil {
		return nil, fmt.Errorf("get machine %q: %w", name, err)
	}
	return &m, nil
}

// ListMachines returns all machines by name.
func (db *DB) ListMachines(ctx context.Context) ([]rebound.Machine, error) {
	out := []rebound.Machine{}
	err := db.listDocs(ctx, `SELECT doc FROM machines ORDER BY name`, nil, func(doc string) error {
		var m rebound.Machine
		if err := unmarshal(doc, &m); err != nil {
			return err
		}
		out = append(out, m)
		return nil
	})
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
	res, err := db.exec(ctx, `UPDATE machines SET doc = ?, revision = ? WHERE name = ? AND revision = ?`, doc, m.Revision, m.Name, old)
	if err != nil {
		m.Revision = old
		return fmt.Errorf("update machine %q: %w", m.Name, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		m.Revision = old
		if _, err := db.GetMachine(ctx, m.Name); err != nil {
			return err
		}
		return rebound.MachineChangedError(m.Name)
	}
	return nil
}

// DeleteMachine removes a machine; ENOTFOUND if it does not exist. Its jobs
// and events are kept as history.
func (db *DB) DeleteMachine(ctx context.Context, name string) error {
	res, err := db.exec(ctx, `DELETE FROM machines WHERE name = ?`, name)
	if err != nil {
		return fmt.Errorf("delete machine %q: %w", name, err)
	}
	return notFoundIfNone(res, "machine %q not found", name)
}

// Policies

// PutPolicy creates or replaces a policy.
func (db *DB) PutPolicy(ctx context.Context, p rebound.Policy) error {
	if p.Name == "" {
		return rebound.Errorf(rebound.EINVALID, "policy name is empty")
	}
	doc, err := marshal(p)
	if err != nil {
		return err
	}
	if _, err := db.exec(ctx, `INSERT INTO policies (name, doc) VALUES (?, ?)
		ON CONFLICT (name) DO UPDATE SET doc = excluded.doc`, p.Name, doc); err != nil {
		return fmt.Errorf("put policy %q: %w", p.Name, err)
	}
	return nil
}

// GetPolicy returns a policy or ENOTFOUND.
func (db *DB) GetPolicy(ctx context.Context, name string) (*rebound.Policy, error) {
	var p rebound.Policy
	if err := db.getDoc(ctx, `SELECT doc FROM policies WHERE name = ?`, name, &p); errors.Is(err, sql.ErrNoRows) {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "policy %q not found", name)
	} else if err != nil {
		return nil, fmt.Errorf("get policy %q: %w", name, err)
	}
	return &p, nil
}

// ListPolicies returns all policies by name.
func (db *DB) ListPolicies(ctx context.Context) ([]rebound.Policy, error) {
	out := []rebound.Policy{}
	err := db.listDocs(ctx, `SELECT doc FROM policies ORDER BY name`, nil, func(doc string) error {
		var p rebound.Policy
		if err := unmarshal(doc, &p); err != nil {
			return err
		}
		out = append(out, p)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list policies: %w", err)
	}
	return out, nil
}

// Events

// AddEvent appends an event. The ID is assigned; a zero Time is now. An
// event whose EventID is already stored is not added again.
func (db *DB) AddEvent(ctx context.Context, e rebound.Event) error {
	if e.Time.IsZero() {
		e.Time = db.now().UTC()
	}
	if _, err := db.exec(ctx, `INSERT INTO events (time, machine, site, kind, message, event_id) VALUES (?, ?, ?, ?, ?, ?)
		ON CONFLICT (event_id) DO NOTHING`,
		e.Time.UnixNano(), e.Machine, e.Site, e.Kind, e.Message, eventID(e)); err != nil {
		return fmt.Errorf("add event: %w", err)
	}
	return nil
}

// eventID is e's EventID for its column: NULL when empty, so events
// without one never collide.
func eventID(e rebound.Event) any {
	if e.EventID == "" {
		return nil
	}
	return e.EventID
}

// ListEvents returns events newest first, only those of machine unless it
// is empty, at most limit unless limit <= 0.
func (db *DB) ListEvents(ctx context.Context, machine string, limit int) ([]rebound.Event, error) {
	q, args := `SELECT id, time, machine, site, kind, message FROM events`, []any{}
	if machine != "" {
		q += ` WHERE machine = ?`
		args = append(args, machine)
	}
	q += ` ORDER BY id DESC`
	if limit > 0 {
		q += ` LIMIT ?`
		args = append(args, limit)
	}
	rows, err := db.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list events: %w", err)
	}
	defer rows.Close()
	out := []rebound.Event{}
	for rows.Next() {
		var e rebound.Event
		var t int64
		if err := rows.Scan(&e.ID, &t, &e.Machine, &e.Site, &e.Kind, &e.Message); err != nil {
			return nil, fmt.Errorf("list events: %w", err)
		}
		e.Time = unixNano(t)
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list events: %w", err)
	}
	return out, nil
}

// Settings

// GetSetting returns a server setting and whether it is set.
func (db *DB) GetSetting(ctx context.Context, key string) (string, bool, error) {
	var v string
	err := db.db.QueryRowContext(ctx, `SELECT value FROM settings WHERE key = ?`, key).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return "", false, nil
	} else if err != nil {
		return "", false, fmt.Errorf("get setting %q: %w", key, err)
	}
	return v, true, nil
}

// PutSetting sets a server setting.
func (db *DB) PutSetting(ctx context.Context, key, value string) error {
	if _, err := db.exec(ctx, `INSERT INTO settings (key, value) VALUES (?, ?)
		ON CONFLICT (key) DO UPDATE SET value = excluded.value`, key, value); err != nil {
		return fmt.Errorf("put setting %q: %w", key, err)
	}
	return nil
}

// helpers

func (db *DB) getDoc(ctx context.Context, q, key string, v any) error {
	var doc string
	if err := db.db.QueryRowContext(ctx, q, key).Scan(&doc); err != nil {
		return err
	}
	return unmarshal(doc, v)
}

func (db *DB) listDocs(ctx context.Context, q string, args []any, fn func(doc string) error) error {
	rows, err := db.db.QueryContext(ctx, q, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var doc string
		if err := rows.Scan(&doc); err != nil {
			return err
		}
		if err := fn(doc); err != nil {
			return err
		}
	}
	return rows.Err()
}

func notFoundIfNone(res sql.Result, format string, args ...any) error {
	n, err := res.RowsAffected()
	if err != nil {
		return err
	}
	if n == 0 {
		return rebound.Errorf(rebound.ENOTFOUND, format, args...)
	}
	return nil
}

// Plans

// PutPlan creates or replaces a plan.
func (db *DB) PutPlan(ctx context.Context, p rebound.Plan) error {
	doc, err := marshal(p)
	if err != nil {
		return err
	}
	if _, err := db.exec(ctx, `INSERT INTO plans (name, doc) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET doc = excluded.doc`, p.Name, doc); err != nil {
		return fmt.Errorf("put plan %q: %w", p.Name, err)
	}
	return nil
}

// GetPlan returns a plan or ENOTFOUND.
func (db *DB) GetPlan(ctx context.Context, name string) (*rebound.Plan, error) {
	var p rebound.Plan
	if err := db.getDoc(ctx, `SELECT doc FROM plans WHERE name = ?`, name, &p); errors.Is(err, sql.ErrNoRows) {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "plan %q not found: rebound plan list shows the plans", name)
	} else if err != nil {
		return nil, fmt.Errorf("get plan %q: %w", name, err)
	}
	return &p, nil
}

// ListPlans returns every plan by name.
func (db *DB) ListPlans(ctx context.Context) ([]rebound.Plan, error) {
	out := []rebound.Plan{}
	err := db.listDocs(ctx, `SELECT doc FROM plans ORDER BY name`, nil, func(doc string) error {
		var p rebound.Plan
		if err := unmarshal(doc, &p); err != nil {
			return err
		}
		out = append(out, p)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list plans: %w", err)
	}
	return out, nil
}

// DeletePlan removes a plan; ENOTFOUND if there is none.
func (db *DB) DeletePlan(ctx context.Context, name string) error {
	res, err := db.exec(ctx, `DELETE FROM plans WHERE name = ?`, name)
	if err != nil {
		return fmt.Errorf("delete plan %q: %w", name, err)
	}
	return notFoundIfNone(res, "plan %q not found", name)
}
