package console

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
)

func (c *Console) jobs(w http.ResponseWriter, r *http.Request, s *session) {
	var js []rebound.Job
	path := p("jobs")
	m := r.URL.Query().Get("machine")
	if m != "" {
		path += "?machine=" + url.QueryEscape(m)
	}
	if err := c.caller(r, s).get(path, &js); err != nil {
		c.fail(w, r, s, err)
		return
	}
	if len(js) > 200 {
		js = js[:200]
	}
	c.page(w, r, s, "jobs", "Jobs", "jobs", map[string]any{"Jobs": js, "Machine": m})
}

func (c *Console) job(w http.ResponseWriter, r *http.Request, s *session) {
	var j rebound.Job
	if err := c.caller(r, s).get(p("jobs", r.PathValue("id")), &j); err != nil {
		c.fail(w, r, s, err)
		return
	}
	frag, err := c.fragment(&j, s)
	if err != nil {
		c.fail(w, r, s, err)
		return
	}
	c.page(w, r, s, "job", "Job "+j.ID, "jobs", jobPage{Job: &j, Version: version(frag)})
}

// jobPage is the job page's data: the job, and the version of its live
// part the page shows, so the stream sends only what differs from it.
type jobPage struct {
	*rebound.Job
	Version string
}

func (c *Console) fragment(j *rebound.Job, s *session) (string, error) {
	var buf bytes.Buffer
	err := c.pages["job"].ExecuteTemplate(&buf, "jobLive", liveJob{J: j, CSRF: s.CSRF})
	return buf.String(), err
}

func version(frag string) string {
	sum := sha256.Sum256([]byte(frag))
	return hex.EncodeToString(sum[:8])
}

// jobEvents streams the job's progress fragment as server-sent events: an
// "update" event with the fragment's HTML whenever it differs from the
// last one sent (at first, from the version ?v= the page shows), and "end"
// once the job ended. The job is read through the API every 250 ms (its
// progress is saved at most every 300 ms).
func (c *Console) jobEvents(w http.ResponseWriter, r *http.Request, s *session) {
	a := c.caller(r, s)
	id := r.PathValue("id")
	var j rebound.Job
	if err := a.get(p("jobs", id), &j); err != nil {
		c.fail(w, r, s, err)
		return
	}
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	last := r.URL.Query().Get("v") // the version the page shows
	for {
		frag, err := c.fragment(&j, s)
		if err != nil {
			c.Logger.Error("console job fragment", "err", err)
			return
		}
		if v := version(frag); v != last {
			last = v
			w.Write([]byte("event: update\n"))
			for _, line := range strings.Split(strings.TrimRight(frag, "\n"), "\n") {
				w.Write([]byte("data: " + line + "\n"))
			}
			w.Write([]byte("\n"))
		}
		if j.State == rebound.JobSucceeded || j.State == rebound.JobFailed || j.State == rebound.JobCancelled {
			w.Write([]byte("event: end\ndata: " + j.State + "\n\n"))
			rc.Flush()
			return
		}
		if rc.Flush() != nil {
			return
		}
		select {
		case <-r.Context().Done():
			return
		case <-c.ctx.Done():
			return
		case <-tick.C:
		}
		if err := a.get(p("jobs", id), &j); err != nil {
			return
		}
	}
}

func (c *Console) jobConfirm(w http.ResponseWriter, r *http.Request, s *session) {
	id := r.PathValue("id")
	var j rebound.Job
	if err := c.caller(r, s).get(p("jobs", id), &j); err != nil {
		c.fail(w, r, s, err)
		return
	}
	base := "/jobs/" + url.PathEscape(id)
	d := confirmData{Sj: &subject{Kind: "job", Name: id, Base: base}, A: action{Name: "cancel", Label: "Cancel job", Danger: true},
		Post: base + "/do/cancel", Back: base,
		Cost: []string{"The " + j.Type + " job of " + j.Machine + " stops at step " + j.Step + "; what it started is undone (a cancelled protect leaves the machine unprotected)."}}
	c.page(w, r, s, "confirm", "Cancel job "+id, "jobs", d)
}

func (c *Console) jobDo(w http.ResponseWriter, r *http.Request, s *session) {
	id, act := r.PathValue("id"), r.PathValue("action")
	base := "/jobs/" + url.PathEscape(id)
	switch act {
	case "cancel":
		if r.PostFormValue("confirm") != "yes" {
			http.Redirect(w, r, base+"/confirm?action=cancel", http.StatusSeeOther)
			return
		}
	case "resume", "retry":
	default:
		c.fail(w, r, s, &apiError{Status: http.StatusNotFound, Code: rebound.ENOTFOUND, Message: "no such job action: use cancel, resume or retry"})
		return
	}
	var body any
	if note := strings.TrimSpace(r.PostFormValue("note")); act == "resume" && note != "" {
		body = map[string]string{"note": note}
	}
	var j rebound.Job
	if err := c.caller(r, s).do("POST", p("jobs", id, act), body, &j); err != nil {
		c.fail(w, r, s, err)
		return
	}
	http.Redirect(w, r, base, http.StatusSeeOther)
}
