package http

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rebound-dr/rebound"
)

// Client implements rebound.Service, rebound.LoopService,
// rebound.PowerService and rebound.GroupService (group.go) over the REST
// API. Errors come back as *rebound.Error with the server's code; a server
// that cannot be reached is EUNAVAILABLE.
type Client struct {
	BaseURL    string // "https://host:port", no trailing slash
	Token      string // bearer token
	HTTPClient *http.Client
	// Fallback are the other servers of the control plane, tried in order
	// when one cannot be reached (refused, timed out, TLS handshake
	// failed), never after an HTTP answer. The one that answered is tried
	// first by the next request.
	Fallback []string

	current int32 // index into BaseURL+Fallback that answered last (atomic)
}

var (
	_ rebound.Service      = (*Client)(nil)
	_ rebound.LoopService  = (*Client)(nil)
	_ rebound.PowerService = (*Client)(nil)
)

// maxResponseBytes bounds what the client reads of an answer.
const maxResponseBytes = 64 << 20

// NewClient returns a client of the server at baseURL, or of the servers
// at several URLs separated by commas (see Fallback). If caPEM is given,
// TLS trusts only the certificates in it (the Rebound CA); otherwise the
// system roots.
func NewClient(baseURL, token string, caPEM []byte) (*Client, error) {
	var urls []string
	for _, b := range strings.Split(baseURL, ",") {
		b = strings.TrimSpace(b)
		if b == "" && strings.Contains(baseURL, ",") {
			continue
		}
		u, err := url.Parse(b)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, rebound.Errorf(rebound.EINVALID, "server URL %q must look like https://host:port (several servers: comma-separated)", b)
		}
		urls = append(urls, strings.TrimRight(b, "/"))
	}
	if len(urls) == 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "server URL %q must look like https://host:port (several servers: comma-separated)", baseURL)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	if len(caPEM) > 0 {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(caPEM) {
			return nil, rebound.Errorf(rebound.EINVALID, "the CA file holds no PEM certificate")
		}
		tr.TLSClientConfig.RootCAs = pool
	}
	return &Client{
		BaseURL:  urls[0],
		Fallback: urls[1:],
		Token:    token,
		// A generous bound so a hung server does not hang the CLI; job
		// verbs answer at once and CreatePoint waits only for one point.
		HTTPClient: &http.Client{Transport: tr, Timeout: 2 * time.Minute},
	}, nil
}

// do sends a request with an optional JSON body and decodes a JSON answer
// into out (if not nil).
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	b, err := c.send(ctx, method, path, in, "application/json")
	if err != nil || out == nil {
		return err
	}
	if err := json.Unmarshal(b, out); err != nil {
		return rebound.Errorf(rebound.EINTERNAL, "cannot decode the answer to %s %s: %v", method, path, err)
	}
	return nil
}

// send sends a request with an optional JSON body and returns the body of a
// successful answer; an error answer becomes *rebound.Error.
func (c *Client) send(ctx context.Context, method, path string, in any, accept string) ([]byte, error) {
	b, _, err := c.exchange(ctx, method, path, in, accept)
	return b, err
}

// exchange is send that also returns the answer's header.
func (c *Client) exchange(ctx context.Context, method, path string, in any, accept string) ([]byte, http.Header, error) {
	if p, _, _ := strings.Cut(path, "?"); strings.Contains(p, "//") || strings.HasSuffix(p, "/") {
		return nil, nil, rebound.Errorf(rebound.EINVALID, "a name in %s %s is empty", method, path)
	}
	var reqBody []byte
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, nil, fmt.Errorf("encode request: %w", err)
		}
		reqBody = b
	}
	hc := c.HTTPClient
	if hc == nil {
		hc = http.DefaultClient
	}
	urls := append([]string{c.BaseURL}, c.Fallback...)
	start := int(atomic.LoadInt32(&c.current)) % len(urls)
	var resp *http.Response
	var base string
	var errs []error
	for k := range urls {
		i := (start + k) % len(urls)
		base = urls[i]
		var body io.Reader
		if in != nil {
			body = bytes.NewReader(reqBody)
		}
		req, err := http.NewRequestWithContext(ctx, method, base+path, body)
		if err != nil {
			return nil, nil, rebound.Errorf(rebound.EINVALID, "bad request %s %s: %v", method, path, err)
		}
		if in != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		req.Header.Set("Accept", accept)
		if c.Token != "" {
			req.Header.Set("Authorization", "Bearer "+c.Token)
		}
		// A request that reached a server may have been acted on: only
		// one that was never written goes to the next server.
		var wrote atomic.Bool
		req = req.WithContext(httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{WroteRequest: func(httptrace.WroteRequestInfo) { wrote.Store(true) }}))
		resp, err = hc.Do(req)
		if err == nil {
			atomic.StoreInt32(&c.current, int32(i))
			break
		}
		if ctx.Err() != nil {
			return nil, nil, ctx.Err()
		}
		err = (&Client{BaseURL: base}).transportError(err)
		if len(urls) == 1 {
			return nil, nil, err
		}
		errs = append(errs, err)
		if wrote.Load() && method != http.MethodGet && method != http.MethodHead {
			return nil, nil, rebound.Errorf(rebound.EUNAVAILABLE, "%s %s: the connection to %s failed after the request was sent, so it is not sent to another server (it may have been done): check with rebound job list, then retry (%s)", method, path, base, rebound.ErrorMessage(err))
		}
	}
	if resp == nil {
		msgs := make([]string, len(errs))
		for i, e := range errs {
			msgs[i] = rebound.ErrorMessage(e)
		}
		return nil, nil, rebound.Errorf(rebound.EUNAVAILABLE, "no Rebound server answered (%s): %s", strings.Join(urls, ", "), strings.Join(msgs, "; "))
	}
	at := &Client{BaseURL: base} // the errors below name the server that answered
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBytes))
	if err != nil {
		return nil, nil, rebound.Errorf(rebound.EUNAVAILABLE, "reading the answer of the Rebound server at %s: %v", at.BaseURL, err)
	}
	if resp.StatusCode >= 300 {
		var e errorResponse
		if json.Unmarshal(b, &e) == nil && e.Error.Code != "" {
			return nil, nil, &rebound.Error{Code: e.Error.Code, Message: e.Error.Message}
		}
		return nil, nil, at.foreignAnswer(resp, b)
	}
	if accept == "application/json" && len(b) > 0 && !isJSON(resp.Header) {
		return nil, nil, at.foreignAnswer(resp, b)
	}
	return b, resp.Header, nil
}

// unwrapURLError drops url.Error's "Get \"https://...\":" prefix, which
// repeats what the message already says.
func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

func seg(s string) string { return url.PathEscape(s) }

func (c *Client) ListSites(ctx context.Context) ([]rebound.Site, error) {
	var v []rebound.Site
	return v, c.do(ctx, "GET", "/api/v1/sites", nil, &v)
}

func (c *Client) CreateEnrollToken(ctx context.Context, site string) (string, error) {
	var v tokenBody
	err := c.do(ctx, "POST", "/api/v1/sites/"+seg(site)+"/enroll-tokens", nil, &v)
	return v.Token, err
}

func (c *Client) CreateMachine(ctx context.Context, req rebound.CreateMachineRequest) (*rebound.Machine, error) {
	var v rebound.Machine
	if err := c.do(ctx, "POST", "/api/v1/machines", req, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

func (c *Client) ListMachines(ctx context.Context) ([]rebound.Machine, error) {
	var v []rebound.Machine
	return v, c.do(ctx, "GET", "/api/v1/machines", nil, &v)
}

func (c *Client) GetMachine(ctx context.Context, name string) (*rebound.Machine, error) {
	var v rebound.Machine
	if err := c.do(ctx, "GET", "/api/v1/machines/"+seg(name), nil, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

func (c *Client) DeleteMachine(ctx context.Context, name string) error {
	return c.do(ctx, "DELETE", "/api/v1/machines/"+seg(name), nil, nil)
}

func (c *Client) ListPolicies(ctx context.Context) ([]rebound.Policy, error) {
	var v []rebound.Policy
	return v, c.do(ctx, "GET", "/api/v1/policies", nil, &v)
}

func (c *Client) PutPolicy(ctx context.Context, p rebound.Policy) (*rebound.Policy, error) {
	if p.Name == "" {
		return nil, rebound.Errorf(rebound.EINVALID, "policy name is empty")
	}
	var v rebound.Policy
	if err := c.do(ctx, "PUT", "/api/v1/policies/"+seg(p.Name), bodyOfPolicy(p), &v); err != nil {
		return nil, err
	}
	return &v, nil
}

func (c *Client) Protect(ctx context.Context, req rebound.ProtectRequest) (*rebound.Job, error) {
	return c.job(ctx, "/api/v1/machines/"+seg(req.Machine)+"/protect", protectBody{To: req.To, Policy: req.Policy, Group: req.Group})
}

func (c *Client) CreatePoint(ctx context.Context, machine string, app bool) (*rebound.RecoveryPoint, error) {
	var v rebound.RecoveryPoint
	if err := c.do(ctx, "POST", "/api/v1/machines/"+seg(machine)+"/points", pointBody{AppConsistent: app}, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

func (c *Client) Failover(ctx context.Context, req rebound.FailoverRequest) (*rebound.Job, error) {
	return c.job(ctx, "/api/v1/machines/"+seg(req.Machine)+"/failover", failoverBody{Point: req.Point, Planned: req.Planned,
		Shutdown: req.Shutdown.Mode, ShutdownTimeout: req.Shutdown.Timeout})
}

func (c *Client) ChangePoint(ctx context.Context, machine, point string) (*rebound.Job, error) {
	return c.job(ctx, "/api/v1/machines/"+seg(machine)+"/failover/change-point", changePointBody{Point: point})
}

func (c *Client) CancelFailover(ctx context.Context, machine string) (*rebound.Job, error) {
	return c.job(ctx, "/api/v1/machines/"+seg(machine)+"/failover/cancel", nil)
}

func (c *Client) Commit(ctx context.Context, machine string) (*rebound.Job, error) {
	return c.job(ctx, "/api/v1/machines/"+seg(machine)+"/commit", nil)
}

func (c *Client) TestFailover(ctx context.Context, machine, point string) (*rebound.Job, error) {
	return c.job(ctx, "/api/v1/machines/"+seg(machine)+"/test-failover", testFailoverBody{Point: point})
}

func (c *Client) TestFailoverCleanup(ctx context.Context, machine string) (*rebound.Job, error) {
	return c.job(ctx, "/api/v1/machines/"+seg(machine)+"/test-failover/cleanup", nil)
}

func (c *Client) Reprotect(ctx context.Context, req rebound.ReprotectRequest) (*rebound.Job, error) {
	return c.job(ctx, "/api/v1/machines/"+seg(req.Machine)+"/reprotect", reprotectBody{
		To: req.To, Policy: req.Policy, Verify: req.Verify, WaitReady: req.WaitReady, Keep: req.Keep})
}

// Unprotect stops a machine's replication and removes its replica (or
// keeps it as a detached copy).
func (c *Client) Unprotect(ctx context.Context, req rebound.UnprotectRequest) (*rebound.Job, error) {
	return c.job(ctx, "/api/v1/machines/"+seg(req.Machine)+"/unprotect", unprotectBody{KeepReplica: req.KeepReplica})
}

func (c *Client) Failback(ctx context.Context, req rebound.FailoverRequest) (*rebound.Job, error) {
	return c.job(ctx, "/api/v1/machines/"+seg(req.Machine)+"/failback", failbackBody{Point: req.Point, Planned: req.Planned,
		Shutdown: req.Shutdown.Mode, ShutdownTimeout: req.Shutdown.Timeout})
}

func (c *Client) Preflight(ctx context.Context, machine, operation string) (*rebound.PreflightReport, error) {
	path := "/api/v1/machines/" + seg(machine) + "/preflight"
	if operation != "" {
		path += "?operation=" + url.QueryEscape(operation)
	}
	var v rebound.PreflightReport
	if err := c.do(ctx, "GET", path, nil, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

func (c *Client) StartMachine(ctx context.Context, name string) (*rebound.Job, error) {
	return c.job(ctx, "/api/v1/machines/"+seg(name)+"/start", nil)
}

func (c *Client) StopMachine(ctx context.Context, name string) (*rebound.Job, error) {
	return c.job(ctx, "/api/v1/machines/"+seg(name)+"/stop", nil)
}

// Console returns the end of the machine's serial log, at most tailBytes
// (the server refuses more than MaxConsoleTail); tailBytes <= 0 asks for the
// server's default, DefaultConsoleTail. The bytes are the guest's, raw.
func (c *Client) Console(ctx context.Context, name string, tailBytes int) ([]byte, error) {
	path := "/api/v1/machines/" + seg(name) + "/console"
	if tailBytes > 0 {
		path += "?tail=" + strconv.Itoa(tailBytes)
	}
	b, err := c.send(ctx, "GET", path, nil, "text/plain")
	if err != nil {
		return nil, err
	}
	if b == nil {
		b = []byte{}
	}
	return b, nil
}

func (c *Client) job(ctx context.Context, path string, body any) (*rebound.Job, error) {
	var v rebound.Job
	if err := c.do(ctx, "POST", path, body, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

func (c *Client) ListJobs(ctx context.Context) ([]rebound.Job, error) {
	return c.ListMachineJobs(ctx, "")
}

// ListMachineJobs lists the jobs of one machine (all if machine is empty).
func (c *Client) ListMachineJobs(ctx context.Context, machine string) ([]rebound.Job, error) {
	path := "/api/v1/jobs"
	if machine != "" {
		path += "?machine=" + url.QueryEscape(machine)
	}
	var v []rebound.Job
	return v, c.do(ctx, "GET", path, nil, &v)
}

func (c *Client) GetJob(ctx context.Context, id string) (*rebound.Job, error) {
	var v rebound.Job
	if err := c.do(ctx, "GET", "/api/v1/jobs/"+seg(id), nil, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

func (c *Client) CancelJob(ctx context.Context, id string) (*rebound.Job, error) {
	var v rebound.Job
	if err := c.do(ctx, "POST", "/api/v1/jobs/"+seg(id)+"/cancel", nil, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// Health checks the server answers /healthz (no token needed).
func (c *Client) Health(ctx context.Context) error {
	var v healthBody
	if err := c.do(ctx, "GET", "/healthz", nil, &v); err != nil {
		return err
	}
	if v.Status != "ok" {
		return rebound.Errorf(rebound.EUNAVAILABLE, "the Rebound server at %s reports status %q", c.BaseURL, v.Status)
	}
	return nil
}

func (c *Client) SetMachine(ctx context.Context, req rebound.SetMachineRequest) (*rebound.Machine, error) {
	var v rebound.Machine
	if err := c.do(ctx, "PATCH", "/api/v1/machines/"+seg(req.Name), setMachineBody{FreezeHook: req.FreezeHook,
		ThawHook: req.ThawHook, Shutdown: req.Shutdown, ShutdownTimeout: req.ShutdownTimeout}, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// Users, tokens, whoami and the audit log (http/users.go).

// WhoAmI returns who the client's token authenticates as.
func (c *Client) WhoAmI(ctx context.Context) (*rebound.Principal, error) {
	var v rebound.Principal
	if err := c.do(ctx, "GET", "/api/v1/whoami", nil, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

func (c *Client) ListUsers(ctx context.Context) ([]rebound.User, error) {
	var v []rebound.User
	return v, c.do(ctx, "GET", "/api/v1/users", nil, &v)
}

// CreateUser creates a user; the result holds the generated password when
// req has none.
func (c *Client) CreateUser(ctx context.Context, req rebound.CreateUserRequest) (*rebound.CreateUserResult, error) {
	var v rebound.CreateUserResult
	if err := c.do(ctx, "POST", "/api/v1/users", req, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

func (c *Client) DeleteUser(ctx context.Context, name string) error {
	return c.do(ctx, "DELETE", "/api/v1/users/"+seg(name), nil, nil)
}

// SetRole changes a user's role and returns the user.
func (c *Client) SetRole(ctx context.Context, name string, role rebound.Role) (*rebound.User, error) {
	var v rebound.User
	if err := c.do(ctx, "PATCH", "/api/v1/users/"+seg(name), setRoleBody{Role: role}, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// SetPassword sets a user's password; with password "" the server
// generates one and it is returned (this once).
func (c *Client) SetPassword(ctx context.Context, name, password string) (string, error) {
	var v setPasswordResult
	err := c.do(ctx, "PUT", "/api/v1/users/"+seg(name)+"/password", setPasswordBody{Password: password}, &v)
	return v.Password, err
}

// ListTokens lists the caller's tokens, user's (user != ""), or everyone's
// (all).
func (c *Client) ListTokens(ctx context.Context, user string, all bool) ([]rebound.APIToken, error) {
	q := url.Values{}
	if user != "" {
		q.Set("user", user)
	}
	if all {
		q.Set("all", "true")
	}
	path := "/api/v1/tokens"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var v []rebound.APIToken
	return v, c.do(ctx, "GET", path, nil, &v)
}

// CreateToken creates an API token named name of user (the caller when
// empty) and returns it with its secret.
func (c *Client) CreateToken(ctx context.Context, user, name string) (*rebound.CreateTokenResult, error) {
	var v rebound.CreateTokenResult
	if err := c.do(ctx, "POST", "/api/v1/tokens", createTokenBody{Name: name, User: user}, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

func (c *Client) RevokeToken(ctx context.Context, id string) error {
	return c.do(ctx, "DELETE", "/api/v1/tokens/"+seg(id), nil, nil)
}

// ListAudit returns the audit entries f selects, newest first.
func (c *Client) ListAudit(ctx context.Context, f rebound.AuditFilter) ([]rebound.AuditEntry, error) {
	q := url.Values{}
	if !f.Since.IsZero() {
		q.Set("since", f.Since.UTC().Format(time.RFC3339Nano))
	}
	if f.User != "" {
		q.Set("user", f.User)
	}
	if f.Limit > 0 {
		q.Set("limit", strconv.Itoa(f.Limit))
	}
	path := "/api/v1/audit"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var v []rebound.AuditEntry
	return v, c.do(ctx, "GET", path, nil, &v)
}
