package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/rebound-dr/rebound"
)

// print writes v as indented JSON with -o json, else lets table write
// through a tabwriter.
func (c *CLI) print(v any, table func(w io.Writer)) error {
	if c.JSON() {
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return fmt.Errorf("encode output: %w", err)
		}
		_, err = fmt.Fprintf(c.Stdout, "%s\n", b)
		return err
	}
	tw := tabwriter.NewWriter(c.Stdout, 0, 4, 2, ' ', 0)
	table(tw)
	return tw.Flush()
}

// row writes tab-separated cells and a newline.
func row(w io.Writer, cells ...any) {
	s := make([]string, len(cells))
	for i, c := range cells {
		s[i] = fmt.Sprint(c)
	}
	fmt.Fprintln(w, strings.Join(s, "\t"))
}

// flush ends a tabwriter section so the next one aligns independently.
func flush(w io.Writer) {
	if tw, ok := w.(*tabwriter.Writer); ok {
		tw.Flush()
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Format(time.RFC3339)
}

func fmtPercent(f float64) string { return fmt.Sprintf("%.0f%%", f*100) }

func fmtSeconds(s float64) string {
	return (time.Duration(s * float64(time.Second))).Round(100 * time.Millisecond).String()
}

func fmtLag(m *rebound.Machine) string {
	if m.Protection == nil {
		return "-"
	}
	return fmtSeconds(m.Protection.LagSeconds)
}

func fmtDisks(disks []rebound.Disk) string {
	if len(disks) == 0 {
		return "-"
	}
	s := make([]string, len(disks))
	for i, d := range disks {
		s[i] = formatSize(d.Size)
	}
	return strings.Join(s, ",")
}

func fmtPoint(p rebound.RecoveryPoint) string {
	return fmt.Sprintf("%s (%s, %s)", p.ID, p.Kind, fmtTime(p.Time))
}

func writeMachine(w io.Writer, m *rebound.Machine) {
	row(w, "Name:", m.Name)
	if m.Group != "" {
		row(w, "Group:", m.Group+" (its verbs take --group "+m.Group+")")
	}
	row(w, "State:", m.State)
	row(w, "Active site:", orDash(m.ActiveSite))
	row(w, "Home site:", orDash(m.HomeSite))
	if m.PreviousSite != "" {
		row(w, "Previous site:", m.PreviousSite)
	}
	health := orDash(m.Health)
	if m.HealthReason != "" {
		health += " (" + m.HealthReason + ")"
	}
	row(w, "Health:", health)
	row(w, "Driver:", orDash(m.Driver))
	if v := m.VM; v != nil {
		row(w, "VM:", fmtVM(v))
		row(w, "Boot:", fmtBoot(v, m.Disks))
	}
	if m.VM != nil || m.VMStatus != nil {
		row(w, "Power:", fmtVMStatus(m.VMStatus))
	}
	row(w, "Created:", fmtTime(m.CreatedAt))
	if st := m.Settings; st.FreezeHook != "" || st.ThawHook != "" {
		row(w, "Hooks:", fmt.Sprintf("freeze %s, thaw %s", orDash(st.FreezeHook), orDash(st.ThawHook)))
	}
	if st := m.Settings; st.Shutdown != "" || st.ShutdownTimeout != 0 {
		row(w, "Shutdown:", fmtShutdown(st))
	}
	if p := m.Protection; p != nil {
		row(w, "Protection:", fmt.Sprintf("%s -> %s, policy %s", p.SourceSite, p.TargetSite, orDash(p.Policy)))
		repl := orDash(p.ReplState)
		if p.ReplState == "syncing" || p.ReplState == "resyncing" {
			repl += " " + fmtPercent(p.SyncProgress)
		}
		row(w, "Replication:", fmt.Sprintf("%s, lag %s, backlog %s, %s/s", repl,
			fmtSeconds(p.LagSeconds), formatSize(p.BacklogBytes), formatSize(int64(p.ThroughputBps))))
		if p.ThrottledWrites > 0 {
			row(w, "Throttled:", fmt.Sprintf("%d writes held back until the target caught up (congestion policy throttle)", p.ThrottledWrites))
		}
		row(w, "Last point:", fmtTime(p.LastPointTime))
	}
	if f := m.Failover; f != nil {
		kind := "unplanned"
		if f.Planned {
			kind = "planned"
		}
		row(w, "Failover:", fmt.Sprintf("%s -> %s, %s, point %s", f.FromSite, f.ToSite, kind, fmtPoint(f.Point)))
	}
	flush(w) // the disk table aligns on its own
	row(w, "Disks:")
	row(w, "  NAME", "SIZE", "NBD")
	for _, d := range m.Disks {
		row(w, "  "+d.Name, formatSize(d.Size), orDash(d.NBD))
	}
	if t := m.TestFailover; t != nil {
		flush(w)
		row(w, "Test failover:", fmt.Sprintf("at %s, point %s", t.Site, fmtPoint(t.Point)))
		flush(w)
		row(w, "  NAME", "SIZE", "NBD")
		for _, d := range t.Disks {
			row(w, "  "+d.Name, formatSize(d.Size), orDash(d.NBD))
		}
	}
	for _, dc := range m.DetachedCopies {
		flush(w)
		row(w, "Detached copy:", fmt.Sprintf("at %s, point %s, detached %s", dc.Site, fmtPoint(dc.Point), fmtTime(dc.Time)))
		for i, p := range dc.Paths {
			name := fmt.Sprintf("disk%d", i)
			if i < len(m.Disks) {
				name = m.Disks[i].Name
			}
			row(w, "  "+name, p)
		}
	}
}

func writeJob(w io.Writer, j *rebound.Job) {
	row(w, "ID:", j.ID)
	row(w, "Type:", j.Type)
	row(w, "Machine:", orDash(j.Machine))
	row(w, "State:", j.State)
	row(w, "Progress:", fmtPercent(j.Progress))
	row(w, "Step:", orDash(j.Step))
	if r := fmtResync(j); r != "" {
		row(w, "Resync:", r)
	}
	if j.Cancel == rebound.CancelRequested && j.EndedAt == nil {
		row(w, "Cancel:", "requested; the server running the job stops it shortly (rebound job wait "+j.ID+")")
	}
	if j.Error != "" {
		row(w, "Error:", j.Error)
	}
	if j.Result != nil {
		b, _ := json.Marshal(j.Result)
		row(w, "Result:", string(b))
	}
	row(w, "Created:", fmtTime(j.CreatedAt))
	row(w, "Updated:", fmtTime(j.UpdatedAt))
	if j.EndedAt != nil {
		row(w, "Ended:", fmtTime(*j.EndedAt))
	}
	if len(j.Steps) > 0 {
		flush(w)
		row(w, "Steps:")
		row(w, "  NAME", "STATE", "MESSAGE")
		for _, s := range j.Steps {
			row(w, "  "+s.Name, s.State, s.Message)
		}
	}
	if j.Plan != nil {
		writePlanJob(w, j.Plan)
	}
}

func writeJobs(w io.Writer, jobs []rebound.Job) {
	row(w, "ID", "TYPE", "MACHINE", "STATE", "PROGRESS", "STEP", "CREATED")
	for _, j := range jobs {
		row(w, j.ID, j.Type, orDash(j.Machine), j.State, fmtPercent(j.Progress), orDash(j.Step), fmtTime(j.CreatedAt))
	}
}

func writePoints(w io.Writer, points []rebound.RecoveryPoint) {
	row(w, "ID", "TIME", "KIND", "SEQ")
	for _, p := range points {
		row(w, p.ID, fmtTime(p.Time), p.Kind, p.Seq)
	}
}

func writePolicies(w io.Writer, policies []rebound.Policy) {
	row(w, "NAME", "RPO", "RETENTION", "CRASH-INTERVAL", "APP-INTERVAL", "CONGESTION")
	for _, p := range policies {
		app := p.AppInterval.String()
		if p.AppInterval == 0 {
			app = "never"
		}
		congestion := p.Congestion
		if congestion == "" {
			congestion = rebound.CongestionTrack
		}
		row(w, p.Name, p.RPOThreshold, p.Retention, p.CrashInterval, app, congestion)
	}
}

// fmtResync describes a job's resync figures ("sent 40MiB of 41.2MiB,
// compared 4GiB, ETA 3s"), or "" when it has none.
func fmtResync(j *rebound.Job) string {
	var parts []string
	if j.BytesSent > 0 || j.BytesTotal > 0 {
		s := "sent " + formatSize(j.BytesSent)
		if j.BytesTotal > 0 {
			s += " of " + formatSize(j.BytesTotal)
		}
		parts = append(parts, s)
	}
	if j.BytesCompared > 0 {
		parts = append(parts, "compared "+formatSize(j.BytesCompared))
	}
	if j.ETASeconds > 0 && !jobDone(j) {
		parts = append(parts, "ETA "+fmtETA(j.ETASeconds))
	}
	return strings.Join(parts, ", ")
}

// fmtETA rounds to whole seconds; an ETA under a second is "<1s".
func fmtETA(s float64) string {
	d := time.Duration(s * float64(time.Second)).Round(time.Second)
	if d < time.Second {
		return "<1s"
	}
	return d.String()
}

// fmtVM describes a VM's size and NIC: "2 CPUs, 512MiB memory, network lan".
func fmtVM(v *rebound.VMSpec) string {
	cpus := fmt.Sprintf("%d CPUs", v.CPUs)
	if v.CPUs == 1 {
		cpus = "1 CPU"
	}
	nic := "no network"
	if v.Network != "" {
		nic = "network " + v.Network
	}
	return fmt.Sprintf("%s, %s memory, %s", cpus, formatSize(int64(v.MemoryMiB)<<20), nic)
}

// fmtBoot describes how a VM boots: its kernel (paths at the site) or the
// BIOS from the first disk.
func fmtBoot(v *rebound.VMSpec, disks []rebound.Disk) string {
	if v.Kernel == "" {
		if len(disks) > 0 {
			return "BIOS from " + disks[0].Name
		}
		return "BIOS"
	}
	s := "kernel " + v.Kernel
	if v.Initrd != "" {
		s += ", initrd " + v.Initrd
	}
	if v.Append != "" {
		s += fmt.Sprintf(", append %q", v.Append)
	}
	return s
}

// fmtVMStatus describes what the active site reports of the VM:
// "running (tcg, pid 4242, network br0)", "stopped", or "-" when unknown.
func fmtVMStatus(s *rebound.VMStatus) string {
	if s == nil {
		return "-"
	}
	if !s.Running {
		return "stopped"
	}
	var parts []string
	if s.Accel != "" {
		parts = append(parts, s.Accel)
	}
	if s.PID != 0 {
		parts = append(parts, fmt.Sprintf("pid %d", s.PID))
	}
	if s.Network != "" {
		parts = append(parts, "network "+s.Network)
	}
	if len(parts) == 0 {
		return "running"
	}
	return "running (" + strings.Join(parts, ", ") + ")"
}

// fmtAge rounds an age for a table: seconds under a minute, minutes
// under an hour, then hours and minutes.
func fmtAge(d time.Duration) string {
	switch {
	case d < 0:
		return "0s"
	case d < time.Minute:
		return d.Round(time.Second).String()
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d/time.Minute))
	}
	return fmt.Sprintf("%dh%02dm", int(d/time.Hour), int(d%time.Hour/time.Minute))
}

// fmtDirection is where a machine runs and replicates to: "a -> b", or its
// active site alone when it is not protected.
func fmtDirection(m *rebound.Machine) string {
	if p := m.Protection; p != nil {
		return p.SourceSite + " -> " + p.TargetSite
	}
	return orDash(m.ActiveSite)
}

// fmtLagRPO is the lag against the RPO threshold: "2.1s / 30s"; rpo 0 is
// an unknown threshold.
func fmtLagRPO(m *rebound.Machine, rpo time.Duration) string {
	if m.Protection == nil {
		return "-"
	}
	lag := fmtSeconds(m.Protection.LagSeconds)
	if rpo <= 0 {
		return lag
	}
	return lag + " / " + rpo.String()
}

// fmtPointAge is how old the machine's newest point is.
func fmtPointAge(m *rebound.Machine, now time.Time) string {
	if m.Protection == nil || m.Protection.LastPointTime.IsZero() {
		return "-"
	}
	return fmtAge(now.Sub(m.Protection.LastPointTime)) + " ago"
}

// fmtHome is the machine's home site, marked when it runs elsewhere.
func fmtHome(m *rebound.Machine) string {
	if m.HomeSite != "" && m.ActiveSite != "" && m.HomeSite != m.ActiveSite {
		return m.HomeSite + " (away)"
	}
	return orDash(m.HomeSite)
}
