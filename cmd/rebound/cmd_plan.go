package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"
)

func init() { extraCommands = append(extraCommands, (*CLI).planCommand) }

// Plans returns the Service's PlanService.
func (c *CLI) Plans() (rebound.PlanService, error) {
	svc, err := c.Service()
	if err != nil {
		return nil, err
	}
	p, ok := svc.(rebound.PlanService)
	if !ok {
		return nil, rebound.Errorf(rebound.EINTERNAL, "this client cannot manage recovery plans")
	}
	return p, nil
}

// readPlan reads a plan file, YAML or JSON. Unknown keys are refused, and a
// relative script path is made absolute against the file's folder (scripts
// run on the server, which must see the same path).
func readPlan(path string) (rebound.Plan, error) {
	var p rebound.Plan
	var b []byte
	var err error
	if path == "-" {
		b, err = io.ReadAll(os.Stdin)
	} else {
		b, err = os.ReadFile(path)
	}
	if err != nil {
		return p, usagef("plan apply: %v", err)
	}
	j, err := yaml.YAMLToJSON(b)
	if err != nil {
		return p, usagef("plan apply: %s is not YAML or JSON: %v", path, err)
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return p, usagef("plan apply: %s: %v (see docs/plans.md for the format)", path, strings.TrimPrefix(err.Error(), "json: "))
	}
	dir := "."
	if path != "-" {
		dir = filepath.Dir(path)
	}
	for i := range p.Stages {
		for _, acts := range [][]rebound.PlanAction{p.Stages[i].Before, p.Stages[i].After} {
			for k := range acts {
				if s := acts[k].Script; s != "" && !filepath.IsAbs(s) {
					abs, err := filepath.Abs(filepath.Join(dir, s))
					if err != nil {
						return p, usagef("plan apply: script %s: %v", s, err)
					}
					acts[k].Script = abs
				}
			}
		}
	}
	return p, nil
}

func (c *CLI) planCommand() *cobra.Command {
	cmd := groupCommand("plan", "Recovery plans: apply, list, show, delete, and run a verb on every member, stage by stage")
	var file string
	apply := &cobra.Command{
		Use:   "apply -f FILE",
		Short: "Create or replace a plan from a YAML or JSON file (idempotent)",
		Long: `Create or replace a recovery plan from a file (YAML or JSON; - reads stdin).
Applying the same file again changes nothing. A relative script path is
resolved against the file's folder; scripts run on the server. See
docs/plans.md for the format.`,
		Example: `  rebound plan apply -f shop.yaml`,
		Args:    argNames(),
		RunE: func(cmd *cobra.Command, args []string) error {
			if file == "" {
				return usagef("plan apply: -f FILE is required")
			}
			p, err := readPlan(file)
			if err != nil {
				return err
			}
			ps, err := c.Plans()
			if err != nil {
				return err
			}
			v, err := ps.ApplyPlan(cmd.Context(), p)
			if err != nil {
				return err
			}
			return c.print(v, func(w io.Writer) { writePlan(w, v) })
		},
	}
	apply.Flags().StringVarP(&file, "file", "f", "", "plan file (YAML or JSON; - for stdin)")

	list := &cobra.Command{
		Use:   "list",
		Short: "List the plans",
		Args:  argNames(),
		RunE: func(cmd *cobra.Command, args []string) error {
			ps, err := c.Plans()
			if err != nil {
				return err
			}
			v, err := ps.ListPlans(cmd.Context())
			if err != nil {
				return err
			}
			return c.print(v, func(w io.Writer) { writePlans(w, v) })
		},
	}
	show := &cobra.Command{
		Use:   "show NAME",
		Short: "Show a plan's stages, members and actions",
		Args:  argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ps, err := c.Plans()
			if err != nil {
				return err
			}
			v, err := ps.GetPlan(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return c.print(v, func(w io.Writer) { writePlan(w, v) })
		},
	}
	del := &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a plan (its machines are not touched)",
		Args:  argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ps, err := c.Plans()
			if err != nil {
				return err
			}
			if err := ps.DeletePlan(cmd.Context(), args[0]); err != nil {
				return err
			}
			return c.print(map[string]string{"deleted": args[0]}, func(w io.Writer) { fmt.Fprintf(w, "plan %s deleted\n", args[0]) })
		},
	}
	var op string
	preflight := &cobra.Command{
		Use:   "preflight NAME [--operation VERB]",
		Short: "Check every member of a plan is ready for a verb (default failover)",
		Args:  argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ps, err := c.Plans()
			if err != nil {
				return err
			}
			rep, err := ps.PreflightPlan(cmd.Context(), args[0], op)
			if err != nil {
				return err
			}
			if err := c.print(rep, func(w io.Writer) { writePlanPreflight(w, rep) }); err != nil {
				return err
			}
			if !rep.OK {
				return &checksFailed{fmt.Sprintf("plan %s is not ready to %s", rep.Plan, rep.Operation)}
			}
			return nil
		},
	}
	preflight.Flags().StringVar(&op, "operation", "", "the verb to check: "+strings.Join(rebound.PlanVerbs, ", "))

	tf := c.planVerbCommand(rebound.PlanTestFailover, "test-failover NAME [--point SEL]", "Test-fail over every member of a plan, stage by stage, in isolation")
	tf.AddCommand(c.planVerbCommand(rebound.PlanTestFailoverCleanup, "cleanup NAME", "Remove the test failovers of a plan's members"))
	cmd.AddCommand(apply, list, show, del, preflight,
		c.planVerbCommand(rebound.PlanFailover, "failover NAME [--planned] [--point SEL] [--skip-unready M,...]", "Fail over every member of a plan, stage by stage"),
		tf,
		c.planVerbCommand(rebound.PlanChangePoint, "change-point NAME --point SEL", "Move every failed-over member of a plan to another point"),
		c.planVerbCommand(rebound.PlanCancel, "cancel NAME", "Cancel the uncommitted failover of every member of a plan"),
		c.planVerbCommand(rebound.PlanCommit, "commit NAME", "Commit the failover of every member of a plan"),
		c.planVerbCommand(rebound.PlanReprotect, "reprotect NAME [--verify]", "Reprotect every member of a plan back to the site it came from"),
		c.planVerbCommand(rebound.PlanFailback, "failback NAME [--planned] [--point SEL] [--skip-unready M,...]", "Fail every member of a plan back, stage by stage"),
	)
	return cmd
}

// planVerbCommand is a plan verb: it starts a plan job.
func (c *CLI) planVerbCommand(verb, use, short string) *cobra.Command {
	var (
		req  rebound.PlanRequest
		wait bool
	)
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Long: short + `.

Stages run in order (a planned move first stops the VMs, stages in reverse
order); the members of a stage run in parallel, between the stage's before
and after actions. A manual action suspends the job until rebound job resume
ID; a failed stage continues with rebound job retry ID. With --wait the
command follows the job and exits 1 unless it succeeds.`,
		Args: argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ps, err := c.Plans()
			if err != nil {
				return err
			}
			req.Plan, req.Verb = args[0], verb
			return c.startJob(cmd, wait, func(ctx context.Context, svc rebound.Service) (*rebound.Job, error) {
				return ps.RunPlan(ctx, req)
			})
		},
	}
	f := cmd.Flags()
	f.BoolVar(&wait, "wait", false, "wait for the job to end")
	switch verb {
	case rebound.PlanFailover, rebound.PlanFailback:
		f.BoolVar(&req.Planned, "planned", false, "stop the VMs (stages in reverse order) and drain before failing over: no data loss")
		f.StringSliceVar(&req.SkipUnready, "skip-unready", nil, "members to leave behind when their readiness check fails")
		fallthrough
	case rebound.PlanTestFailover, rebound.PlanChangePoint:
		f.StringVar(&req.Point, "point", "", "latest, latest-processed, latest-app-consistent, latest-multi-vm-processed, latest-multi-vm-app-consistent, or an RFC 3339 time")
	case rebound.PlanReprotect:
		f.BoolVar(&req.Verify, "verify", false, "compare block digests of both copies instead of trusting change tracking")
	}
	return cmd
}

func writePlans(w io.Writer, ps []rebound.Plan) {
	row(w, "NAME", "STAGES", "MACHINES", "UPDATED")
	for _, p := range ps {
		n := 0
		for _, st := range p.Stages {
			n += len(st.Machines)
		}
		row(w, p.Name, fmt.Sprint(len(p.Stages)), fmt.Sprint(n), fmtTime(p.UpdatedAt))
	}
}

func writePlan(w io.Writer, p *rebound.Plan) {
	row(w, "Name:", p.Name)
	row(w, "Updated:", fmtTime(p.UpdatedAt))
	flush(w)
	row(w, "STAGE", "MEMBERS", "BEFORE", "AFTER")
	for _, st := range p.Stages {
		members := append([]string(nil), st.Machines...)
		for _, g := range st.Groups {
			members = append(members, "group "+g)
		}
		row(w, st.Name, strings.Join(members, ", "), actionsText(st.Before), actionsText(st.After))
	}
}

func actionsText(as []rebound.PlanAction) string {
	var out []string
	for _, a := range as {
		if a.Script != "" {
			out = append(out, "script "+a.Script)
		} else {
			out = append(out, "manual: "+a.Manual)
		}
	}
	return orDash(strings.Join(out, "; "))
}

func writePlanPreflight(w io.Writer, r *rebound.PlanPreflight) {
	row(w, "Plan:", r.Plan)
	row(w, "Operation:", r.Operation)
	row(w, "Ready:", fmt.Sprint(r.OK))
	if len(r.Missing) > 0 {
		row(w, "Missing:", strings.Join(r.Missing, ", "))
	}
	flush(w)
	row(w, "MACHINE", "CHECK", "OK", "MESSAGE")
	for _, m := range r.Machines {
		for _, ch := range m.Checks {
			row(w, m.Machine, ch.Name, fmt.Sprint(ch.OK), ch.Message)
		}
	}
}

// writePlanJob prints a plan job's stages, members and actions.
func writePlanJob(w io.Writer, p *rebound.PlanProgress) {
	flush(w)
	row(w, "Plan:", p.Name+" ("+p.Verb+", "+p.Direction+")")
	row(w, "  STAGE", "MEMBER", "STATE", "POINT", "SECONDS", "DETAIL")
	for _, st := range p.Stages {
		row(w, "  "+st.Name, "-", st.State, "-", fmt.Sprintf("%.1f", st.Seconds), "")
		for _, a := range st.Actions {
			what := "script " + a.Script
			if a.Manual != "" {
				what = "manual: " + a.Manual
			}
			detail := what
			if a.ExitCode != 0 {
				detail += fmt.Sprintf(" (exit %d)", a.ExitCode)
			}
			row(w, "  ", a.Phase, a.State, "-", fmt.Sprintf("%.1f", a.Seconds), detail)
		}
		for _, m := range st.Members {
			row(w, "  ", m.Machine, m.State, orDash(m.Point), fmt.Sprintf("%.1f", m.Seconds), m.Error)
		}
	}
}
