package main

import (
	"context"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/rebound-dr/rebound"
)

// browser drives a headless chromium against the console.
type browser struct {
	t    *testing.T
	ctx  context.Context
	base string // https://127.0.0.1:port
	art  string // screenshots go here
}

// newBrowser starts Debian's chromium (headless, a fresh profile, no
// network but loopback) for the console at base.
func newBrowser(t *testing.T, base string) *browser {
	t.Helper()
	needTools(t, "chromium")
	path, _ := exec.LookPath("chromium")
	art := os.Getenv("REBOUND_ARTIFACTS")
	if art == "" {
		art = t.TempDir()
	}
	art = filepath.Join(art, "console")
	if err := os.MkdirAll(art, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Logf("console screenshots in %s", art)
	actx, cancelA := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(path), chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.NoFirstRun, chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true), chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("ignore-certificate-errors", true), // the server's certificate is of the test's own CA
		chromedp.UserDataDir(t.TempDir()), chromedp.WindowSize(1280, 900))
	ctx, cancelC := chromedp.NewContext(actx)
	t.Cleanup(func() { cancelC(); cancelA() })
	if err := chromedp.Do(ctx, chromedp.Navigate("about:blank")); err != nil { // starts the browser
		t.Fatalf("start chromium: %v", err)
	}
	return &browser{t: t, ctx: ctx, base: base, art: art}
}

// do runs steps with a bound, failing the test with what the page shows.
func (b *browser) do(what string, steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 90*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		loc, _ := chromedp.Run(b.ctx, chromedp.Location())
		body, _ := chromedp.Run(b.ctx, chromedp.Evaluate[string]("document.body ? document.body.innerText : ''"))
		b.t.Fatalf("%s: %v\nat %s:\n%s", what, err, loc, body)
	}
}

func (b *browser) text(sel string) string {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
	if err != nil {
		b.t.Fatalf("text of %s: %v", sel, err)
	}
	return s
}

func (b *browser) eval(js string) string {
	b.t.Helper()
	s, err := chromedp.Run(b.ctx, chromedp.Evaluate[string](js))
	if err != nil {
		b.t.Fatalf("evaluate %s: %v", js, err)
	}
	return s
}

func (b *browser) open(path, waitFor string) {
	b.t.Helper()
	b.do("open "+path, chromedp.Navigate(b.base+path), chromedp.WaitVisible(chromedp.CSS(waitFor)))
}

func (b *browser) shot(name string) {
	b.t.Helper()
	png, err := chromedp.Run(b.ctx, chromedp.FullScreenshot(100))
	if err != nil {
		b.t.Fatalf("screenshot %s: %v", name, err)
	}
	if err := os.WriteFile(filepath.Join(b.art, name+".png"), png, 0o644); err != nil {
		b.t.Fatal(err)
	}
}

func (b *browser) path() string {
	loc, err := chromedp.Run(b.ctx, chromedp.Location())
	if err != nil {
		b.t.Fatal(err)
	}
	u, _ := url.Parse(loc)
	return u.Path
}

func (b *browser) login(user, pw string) {
	b.t.Helper()
	b.open("/login", "#login")
	b.do("log in as "+user, chromedp.SendKeys(chromedp.CSS("#user"), user), chromedp.SendKeys(chromedp.CSS("#password"), pw),
		chromedp.Click(chromedp.CSS("#login")), chromedp.WaitVisible(chromedp.CSS("#who")))
	if got := b.text("#who"); !strings.HasPrefix(got, user+" ") {
		b.t.Fatalf("logged in as %q, want %s", got, user)
	}
}

// act clicks an action of the machine page and, on its confirmation page,
// confirms; it returns the job the action started (the page it lands on).
func (b *browser) act(machine, sel string, confirm bool) string {
	b.t.Helper()
	b.open("/machines/"+machine, "#actions")
	b.do("click "+sel, chromedp.Click(chromedp.CSS(sel)))
	if confirm {
		b.do("confirm "+sel, chromedp.WaitVisible(chromedp.CSS("#confirm-go")), chromedp.Click(chromedp.CSS("#confirm-go")))
	}
	b.do("job page after "+sel, chromedp.WaitVisible(chromedp.CSS("#job-live")))
	p := b.path()
	if !strings.HasPrefix(p, "/jobs/") {
		b.t.Fatalf("%s landed on %s, not a job", sel, p)
	}
	return strings.TrimPrefix(p, "/jobs/")
}

// TestConsoleBrowser runs the loop from the web console in chromium:
// protect (watching the job's progress pushed live), test failover and
// cleanup, failover to a point picked on the timeline (the bytes over NBD
// are the source's at that point), commit, reprotect; then a viewer finds
// every action refused. The audit log records the operator's actions.
func TestConsoleBrowser(t *testing.T) {
	ctx := context.Background()
	up, svc := testUp(t, t.TempDir())
	db := up.Server.DB
	for _, u := range []rebound.CreateUserRequest{
		{Name: "olivia", Role: rebound.RoleOperator, Password: "operator-pass-1"},
		{Name: "victor", Role: rebound.RoleViewer, Password: "viewer-pass-12"},
	} {
		if _, err := db.CreateUser(ctx, u); err != nil {
			t.Fatal(err)
		}
	}
	const size = 16 << 20
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{size}})
	if err != nil {
		t.Fatal(err)
	}
	src := m.Disks[0].NBD
	for _, n := range []string{"db1", "web1"} { // more rows for the screenshots
		if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: n, Site: "primary", Disks: []int64{1 << 20}}); err != nil {
			t.Fatal(err)
		}
	}
	o := newOracle(t, size, 7)
	o.write(src, 100)

	// The protect job waits in its initial copy until the page shows it.
	var block atomic.Bool
	block.Store(true)
	entered, release := make(chan string, 1), make(chan struct{})
	var once sync.Once
	let := func() { once.Do(func() { block.Store(false); close(release) }) }
	t.Cleanup(let) // before the server closes, should the test fail early
	up.Server.Service.StepHook = func(ctx context.Context, j *rebound.Job, step string) {
		if j.Type == "protect" && step == "initial copy" && block.Load() {
			entered <- j.ID
			<-release
		}
	}

	b := newBrowser(t, up.Server.APIURL)
	b.open("/machines", "#login") // no session: the login page
	b.shot("login")
	b.login("olivia", "operator-pass-1")
	b.open("/machines/vm1", "#act-protect")
	b.shot("machine-unprotected")
	b.do("protect", chromedp.SetValue(chromedp.CSS(`select[name="to"]`), "recovery"), chromedp.Click(chromedp.CSS("#act-protect")),
		chromedp.WaitVisible(chromedp.CSS("#job-live")))
	id := <-entered
	if p := b.path(); p != "/jobs/"+id {
		t.Fatalf("protect landed on %s, want /jobs/%s", p, id)
	}
	// The page may show an earlier step; the stream brings this one.
	b.do("the step shows", chromedp.Poll[chromedp.Void](`document.getElementById("job-step") && document.getElementById("job-step").innerText === "initial copy"`))
	before := b.eval(`document.getElementById("job-live").innerText`)
	b.eval(`window.notReloaded = "yes"; "ok"`)
	b.shot("job-running")
	let()
	b.do("the job ends on the page", chromedp.WaitVisible(chromedp.CSS(`#job-live[data-ended="true"]`)))
	after := b.eval(`document.getElementById("job-live").innerText`)
	if b.eval(`String(window.notReloaded)`) != "yes" {
		t.Fatal("the job page reloaded; the progress should arrive over server-sent events")
	}
	if after == before || !strings.Contains(after, "succeeded") || b.eval(`document.getElementById("job-progress").value.toString()`) != "1" {
		t.Fatalf("progress did not update live:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if n := b.eval(`document.getElementById("job-live").getAttribute("data-updates")`); n == "0" {
		t.Fatal("no server-sent update arrived")
	}
	b.shot("job")
	waitJobDone(t, svc, &rebound.Job{ID: id}, nil)

	// Points to pick from.
	o.write(src, 60)
	p1 := o.point(svc, "vm1", false)
	o.write(src, 60)
	o.point(svc, "vm1", false)

	// Test failover and its cleanup.
	id = b.act("vm1", "#act-test-failover", true)
	waitJobDone(t, svc, &rebound.Job{ID: id}, nil)
	if m := getMachine(t, svc, "vm1"); m.TestFailover == nil {
		t.Fatal("no test failover after the console's test failover")
	}
	id = b.act("vm1", "#act-test-failover-cleanup", true)
	waitJobDone(t, svc, &rebound.Job{ID: id}, nil)
	if m := getMachine(t, svc, "vm1"); m.TestFailover != nil {
		t.Fatal("test failover still there after the console's cleanup")
	}

	// Fail over to p1, picked on the timeline; the confirmation shows its
	// age and the preflight first.
	b.open("/machines/vm1", "#timeline")
	b.shot("machine")
	b.do("pick "+p1.ID, chromedp.Click(chromedp.CSS(`a.pick-failover[data-point="`+p1.ID+`"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-go")))
	if got := b.text("#chosen-point"); got != p1.ID {
		t.Fatalf("confirmation for point %q, want %s", got, p1.ID)
	}
	if cost := b.text("#cost"); !strings.Contains(cost, "Data loss") || !strings.Contains(cost, p1.Time.UTC().Format(time.RFC3339)) {
		t.Fatalf("the cost does not name the point's time %s:\n%s", p1.Time.UTC().Format(time.RFC3339), cost)
	}
	if pf := b.text("#preflight"); !strings.Contains(pf, "Preflight of failover") {
		t.Fatalf("no preflight before the failover:\n%s", pf)
	}
	b.shot("confirm-failover")
	b.do("confirm the failover", chromedp.Click(chromedp.CSS("#confirm-go")), chromedp.WaitVisible(chromedp.CSS("#job-live")))
	waitJobDone(t, svc, &rebound.Job{ID: strings.TrimPrefix(b.path(), "/jobs/")}, nil)
	m = getMachine(t, svc, "vm1")
	if m.State != rebound.MachineFailedOver || m.Failover == nil || m.Failover.Point.ID != p1.ID {
		t.Fatalf("after the console's failover: %s at %+v", m.State, m.Failover)
	}
	if got := diskSum(t, m.Disks[0].NBD); got != o.points[p1.ID] {
		t.Fatalf("failed-over disk hash %s, want point %s's %s", got, p1.ID, o.points[p1.ID])
	}
	b.open("/machines/vm1", "#failover-point")
	if got := b.text("#failover-point"); got != p1.ID {
		t.Fatalf("machine page shows failover point %q, want %s", got, p1.ID)
	}
	b.shot("machine-failed-over")

	// Commit and reprotect.
	waitJobDone(t, svc, &rebound.Job{ID: b.act("vm1", "#act-commit", true)}, nil)
	waitJobDone(t, svc, &rebound.Job{ID: b.act("vm1", "#act-reprotect", true)}, nil)
	m = getMachine(t, svc, "vm1")
	if m.State != rebound.MachineProtected || m.ActiveSite != "recovery" || m.Protection.TargetSite != "primary" {
		t.Fatalf("after the console's reprotect: %s at %s", m.State, m.ActiveSite)
	}

	// A plan test failover stops at a manual step; the job page offers
	// Resume (pushed when the job suspends), which takes a note.
	const manual = "Check the test copy"
	if _, err := up.Server.Service.ApplyPlan(ctx, rebound.Plan{Name: "app", Stages: []rebound.PlanStage{{Name: "all", Machines: []string{"vm1"},
		Before: []rebound.PlanAction{{Manual: manual, Verbs: []string{rebound.PlanTestFailover}}}}}}); err != nil {
		t.Fatal(err)
	}
	b.open("/plans/app", "#plan-test-failover")
	b.do("plan test failover", chromedp.Click(chromedp.CSS("#plan-test-failover")), chromedp.WaitVisible(chromedp.CSS("#preflight")),
		chromedp.Click(chromedp.CSS("#confirm-go")), chromedp.WaitVisible(chromedp.CSS("#job-live")))
	planJob := strings.TrimPrefix(b.path(), "/jobs/")
	b.do("resume offered", chromedp.WaitVisible(chromedp.CSS("#job-resume")))
	b.shot("job-suspended")
	b.do("resume with a note", chromedp.SendKeys(chromedp.CSS("#job-note"), "test copy checked"), chromedp.Click(chromedp.CSS("#job-resume")),
		chromedp.WaitVisible(chromedp.CSS(`#job-live[data-ended="true"]`)))
	j := waitJobDone(t, svc, &rebound.Job{ID: planJob}, nil)
	if a := j.Plan.Stages[0].Actions; len(a) != 1 || a[0].Manual != manual || a[0].Output != "resumed by olivia: test copy checked" {
		t.Fatalf("the plan job's manual step: %+v", a)
	}
	b.open("/plans/app", "#plan-test-failover-cleanup")
	b.do("plan test failover cleanup", chromedp.Click(chromedp.CSS("#plan-test-failover-cleanup")),
		chromedp.Click(chromedp.CSS("#confirm-go")), chromedp.WaitVisible(chromedp.CSS("#job-live")))
	waitJobDone(t, svc, &rebound.Job{ID: strings.TrimPrefix(b.path(), "/jobs/")}, nil)

	// A group, for its pages.
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "db1", To: "recovery", Group: "db"}))

	// Every page, for the record.
	for _, pg := range []struct{ path, wait, name string }{
		{"/", "#overview", "overview"}, {"/machines", "#items", "replicated-items"}, {"/machines/vm1", "#timeline", "machine-reprotected"},
		{"/groups", "main table", "groups"}, {"/groups/db", "#actions", "group"}, {"/plans", "main table", "plans"}, {"/plans/app", "#actions", "plan"},
		{"/jobs", "main table", "jobs"}, {"/audit", "table.audit", "audit"},
	} {
		b.open(pg.path, pg.wait)
		b.shot(pg.name)
	}
	// Replicated items: the name filter applies as one types (htmx, under
	// the strict CSP), without a reload; sorting is a query.
	b.open("/machines", "#items")
	b.eval(`window.notReloaded = "items"; "ok"`)
	b.do("filter by name", chromedp.SendKeys(chromedp.CSS(`input[name="q"]`), "vm"),
		chromedp.Poll[chromedp.Void](`document.querySelectorAll("#items tr[data-machine]").length === 1`))
	if got := b.eval(`window.notReloaded + " " + document.querySelector("#items tr[data-machine]").dataset.machine + " " + location.search`); got != "items vm1 ?q=vm&state=&health=&group=&sort=name&dir=asc" {
		t.Fatalf("after typing vm in the filter: %q", got)
	}
	b.open("/machines?state=protected&sort=name&dir=desc", "#items")
	if got := b.eval(`Array.from(document.querySelectorAll("#items tr[data-machine]")).map(r => r.dataset.machine).join(" ")`); got != "vm1 db1" {
		t.Fatalf("protected machines by name, descending: %q", got)
	}
	b.do("phone", chromedp.EmulateViewport(390, 844), chromedp.Navigate(b.base+"/machines"), chromedp.WaitVisible(chromedp.CSS("#items")))
	b.shot("replicated-items-phone")
	b.do("desktop", chromedp.EmulateViewport(1280, 900))

	// The audit log has the operator's actions, made through the console.
	entries, err := db.ListAudit(ctx, rebound.AuditFilter{User: "olivia"})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, e := range entries {
		if e.Via == "session" && e.Status < 300 {
			seen[e.Action[strings.LastIndex(e.Action, "}")+1:]] = true
		}
	}
	for _, want := range []string{"/protect", "/test-failover", "/test-failover/cleanup", "/failover", "/commit", "/reprotect"} {
		if !seen[want] {
			t.Fatalf("audit log lacks %s by olivia via session: %v", want, entries)
		}
	}

	// A viewer: every action is refused with the API's 403.
	b.do("log out", chromedp.Click(chromedp.CSS(".who button")), chromedp.WaitVisible(chromedp.CSS("#login")))
	b.login("victor", "viewer-pass-12")
	refused := func(page, sel string) {
		t.Helper()
		b.open(page, sel)
		b.do("click "+sel, chromedp.Click(chromedp.CSS(sel)), chromedp.WaitVisible(chromedp.CSS("#confirm-go, #error-message")))
		if ok, _ := chromedp.Run(b.ctx, chromedp.Evaluate[bool](`!!document.getElementById("confirm-go")`)); ok {
			b.do("confirm "+sel, chromedp.Click(chromedp.CSS("#confirm-go")), chromedp.WaitVisible(chromedp.CSS("#error-message")))
		}
		if h := b.text("h1"); !strings.HasPrefix(h, "403") {
			t.Fatalf("viewer's %s on %s: %q, %s", sel, page, h, b.text("#error-message"))
		}
		if msg := b.text("#error-message"); !strings.Contains(msg, "viewer") {
			t.Fatalf("viewer's %s on %s: message %q does not name the role", sel, page, msg)
		}
	}
	b.open("/machines/vm1", "#actions")
	list := b.eval(`Array.from(document.querySelectorAll("#actions form.action")).map(f => f.dataset.action).join(" ")`)
	if len(strings.Fields(list)) < 4 {
		t.Fatalf("viewer sees actions %q", list)
	}
	for _, a := range strings.Fields(list) {
		refused("/machines/vm1", `form[data-action="`+a+`"] button`)
	}
	b.shot("viewer-refused")
	for _, v := range rebound.PlanVerbs {
		refused("/plans/app", "#plan-"+v)
	}
	// A suspended job: neither resumed nor cancelled by a viewer.
	j, err = up.Server.Service.RunPlan(ctx, rebound.PlanRequest{Plan: "app", Verb: rebound.PlanTestFailover})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, time.Minute, "the plan job suspended", func() bool {
		g, err := svc.GetJob(ctx, j.ID)
		return err == nil && g.State == rebound.JobSuspended
	})
	refused("/jobs/"+j.ID, "#job-resume")
	refused("/jobs/"+j.ID, "#job-cancel")
	if g, _ := svc.GetJob(ctx, j.ID); g.State != rebound.JobSuspended {
		t.Fatalf("the viewer changed the job: %s", g.State)
	}
}
