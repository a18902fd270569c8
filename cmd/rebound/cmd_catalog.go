package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

// Catalog returns the Service's CatalogService (site show, policy delete,
// filtered and paged points and events).
func (c *CLI) Catalog() (rebound.CatalogService, error) {
	svc, err := c.Service()
	if err != nil {
		return nil, err
	}
	cs, ok := svc.(rebound.CatalogService)
	if !ok {
		return nil, rebound.Errorf(rebound.EINTERNAL, "this client cannot show sites, delete policies or filter lists")
	}
	return cs, nil
}

// listFlags are the filters of `points` and `events`.
type listFlags struct {
	since, until, kind, cursor string
	limit                      int
}

func (l *listFlags) add(cmd *cobra.Command, kindHelp string) {
	f := cmd.Flags()
	f.StringVar(&l.since, "since", "", "only items at or after this time: RFC 3339 (2026-11-27T14:00:00Z) or a duration ago (90m)")
	f.StringVar(&l.until, "until", "", "only items before this time: RFC 3339 or a duration ago")
	f.StringVar(&l.kind, "kind", "", kindHelp)
	f.IntVar(&l.limit, "limit", 0, fmt.Sprintf("at most N items (1 to %d); when more follow, the command says how to get them", rebound.MaxPageSize))
	f.StringVar(&l.cursor, "cursor", "", "continue after an earlier --limit listing (the cursor it printed)")
}

// filtered reports whether any filter was given: without one, the verbs
// list as they always did (every point; the newest page of events).
func (l *listFlags) filtered(cmd *cobra.Command) bool {
	for _, n := range []string{"since", "until", "kind", "limit", "cursor"} {
		if cmd.Flags().Changed(n) {
			return true
		}
	}
	return false
}

// query turns the flags into a ListQuery; times are resolved against now.
func (l *listFlags) query(verb string, now time.Time) (rebound.ListQuery, error) {
	q := rebound.ListQuery{Kind: l.kind, Cursor: l.cursor, Limit: l.limit}
	var err error
	if q.Since, err = parseWhen(verb, "--since", l.since, now); err != nil {
		return q, err
	}
	if q.Until, err = parseWhen(verb, "--until", l.until, now); err != nil {
		return q, err
	}
	if !q.Since.IsZero() && !q.Until.IsZero() && !q.Until.After(q.Since) {
		return q, usagef("%s: --until %s must be after --since %s", verb, l.until, l.since)
	}
	if l.limit < 0 || l.limit > rebound.MaxPageSize {
		return q, usagef("%s: --limit must be from 1 to %d, not %d", verb, rebound.MaxPageSize, l.limit)
	}
	return q, nil
}

// parseWhen reads an RFC 3339 time or a duration before now.
func parseWhen(verb, flag, s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	if d, err := time.ParseDuration(s); err == nil && d >= 0 {
		return now.Add(-d), nil
	}
	return time.Time{}, usagef("%s: %s %q is neither an RFC 3339 time (2026-11-27T14:00:00Z) nor a duration ago (90m)", verb, flag, s)
}

// morePages tells, on stderr, how to get the page after a --limit listing:
// the same command line with --cursor.
func (c *CLI) morePages(cmd *cobra.Command, what, next string, args []string) {
	if next == "" {
		return
	}
	line := append([]string{"rebound", cmdPath(cmd)}, args...)
	for _, n := range []string{"machine", "group", "since", "until", "kind", "limit"} {
		if f := cmd.Flags().Lookup(n); f != nil && f.Changed {
			line = append(line, "--"+n+"="+f.Value.String())
		}
	}
	fmt.Fprintf(c.Stderr, "rebound: more %s follow: %s --cursor=%s\n", what, strings.Join(line, " "), next)
}

// listPoints lists a machine's points: all of them, or the filtered page.
// positional is the command line's arguments for morePages (none when
// --group names the group).
func (c *CLI) listPoints(cmd *cobra.Command, machine string, positional []string, l *listFlags) error {
	if !l.filtered(cmd) {
		svc, err := c.Service()
		if err != nil {
			return err
		}
		ps, err := svc.ListPoints(cmd.Context(), machine)
		if err != nil {
			return err
		}
		if ps == nil {
			ps = []rebound.RecoveryPoint{}
		}
		return c.print(ps, func(w io.Writer) { writePoints(w, ps) })
	}
	q, err := l.query("points", time.Now())
	if err != nil {
		return err
	}
	if q.Kind != "" && q.Kind != string(rebound.PointCrash) && q.Kind != string(rebound.PointApp) {
		return usagef("points: --kind must be crash or app, not %q", q.Kind)
	}
	cs, err := c.Catalog()
	if err != nil {
		return err
	}
	ps, next, err := collect(cmd.Context(), q, func(ctx context.Context, q rebound.ListQuery) ([]rebound.RecoveryPoint, string, error) {
		p, err := cs.QueryPoints(ctx, machine, q)
		if err != nil {
			return nil, "", err
		}
		return p.Points, p.Next, nil
	})
	if err != nil {
		return err
	}
	if err := c.print(ps, func(w io.Writer) { writePoints(w, ps) }); err != nil {
		return err
	}
	c.morePages(cmd, "points", next, positional)
	return nil
}

// collect gets one page with a limit, or follows every page without one.
func collect[T any](ctx context.Context, q rebound.ListQuery, get func(context.Context, rebound.ListQuery) ([]T, string, error)) ([]T, string, error) {
	all := []T{}
	limited := q.Limit > 0
	if !limited {
		q.Limit = rebound.MaxPageSize
	}
	for {
		items, next, err := get(ctx, q)
		if err != nil {
			return nil, "", err
		}
		all = append(all, items...)
		if limited || next == "" {
			return all, next, nil
		}
		q.Cursor = next
	}
}

// listEvents lists events: the newest page, or the filtered one.
func (c *CLI) listEvents(cmd *cobra.Command, machine string, l *listFlags) error {
	var evs []rebound.Event
	var next string
	if !l.filtered(cmd) {
		svc, err := c.Service()
		if err != nil {
			return err
		}
		if evs, err = svc.ListEvents(cmd.Context(), machine); err != nil {
			return err
		}
	} else {
		q, err := l.query("events", time.Now())
		if err != nil {
			return err
		}
		q.Machine = machine
		cs, err := c.Catalog()
		if err != nil {
			return err
		}
		if q.Limit == 0 {
			q.Limit = rebound.DefaultPageSize // the newest page, as without filters
		}
		p, err := cs.QueryEvents(cmd.Context(), q)
		if err != nil {
			return err
		}
		evs, next = p.Events, p.Next
	}
	if evs == nil {
		evs = []rebound.Event{}
	}
	if err := c.print(evs, func(w io.Writer) {
		row(w, "TIME", "KIND", "MACHINE", "SITE", "MESSAGE")
		for _, e := range evs {
			row(w, fmtTime(e.Time), e.Kind, orDash(e.Machine), orDash(e.Site), e.Message)
		}
	}); err != nil {
		return err
	}
	c.morePages(cmd, "events", next, nil)
	return nil
}
