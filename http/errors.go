package http

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"mime"
	"net/http"
	"strings"
	"syscall"

	"github.com/rebound-dr/rebound"
)

// What a client says when the address it was given is not a Rebound API,
// and where the API really is.
const apiHint = "check --server (or REBOUND_SERVER); the API listens on the --api-addr of `rebound server`, https://127.0.0.1:8440 by default"

// transportError explains a request that got no HTTP answer: the next step
// for a server that is down, a port that does not speak TLS, or a
// certificate the configured CA did not sign.
func (c *Client) transportError(err error) error {
	err = unwrapURLError(err)
	var unknownCA x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	var recordErr tls.RecordHeaderError
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return rebound.Errorf(rebound.EUNAVAILABLE, "cannot reach the Rebound server at %s: connection refused. Is it running? Start one with `rebound up` (or `rebound server` on its host), or %s", c.BaseURL, apiHint)
	case strings.Contains(err.Error(), "server gave HTTP response to HTTPS client"):
		return rebound.Errorf(rebound.EUNAVAILABLE, "%s is not a Rebound API (it answered in plain HTTP; the API speaks only HTTPS): %s", c.BaseURL, apiHint)
	case errors.As(err, &recordErr):
		return rebound.Errorf(rebound.EUNAVAILABLE, "%s is not a Rebound API (it does not speak TLS): %s", c.BaseURL, apiHint)
	case errors.As(err, &unknownCA):
		return rebound.Errorf(rebound.EUNAVAILABLE, "the certificate of %s is not signed by the configured CA (--ca, REBOUND_CA or the config file): use the server's ca.crt (in the ca directory under its --data) or the one `rebound up` wrote next to its config; with several servers, every one must run with a copy of the first's CA (rebound server --ca-dir) (%v)", c.BaseURL, err)
	case errors.As(err, &hostErr):
		return rebound.Errorf(rebound.EUNAVAILABLE, "the certificate of %s does not cover that name: use an address the server certificate names, or add it with `rebound server --host NAME` (%v)", c.BaseURL, err)
	}
	return rebound.Errorf(rebound.EUNAVAILABLE, "cannot reach the Rebound server at %s: %v; %s", c.BaseURL, err, apiHint)
}

// foreignAnswer explains an answer without Rebound's JSON error body: an
// HTTPS port asked in plain HTTP, or another service (a gRPC port answers
// 415 Unsupported Media Type).
func (c *Client) foreignAnswer(resp *http.Response, body []byte) error {
	if resp.StatusCode == http.StatusBadRequest && strings.Contains(string(body), "HTTP request to an HTTPS server") {
		https := "https://" + strings.TrimPrefix(c.BaseURL, "http://")
		return rebound.Errorf(rebound.EINVALID, "%s speaks HTTPS, not HTTP: use --server %s (or REBOUND_SERVER)", c.BaseURL, https)
	}
	code := rebound.EUNAVAILABLE // no Rebound server at that address
	if resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden {
		code = rebound.EUNAUTHORIZED // a proxy in front refused us
	}
	return rebound.Errorf(code, "%s is not a Rebound API (HTTP %s): %s", c.BaseURL, resp.Status, apiHint)
}

// isJSON reports whether an answer says it is JSON.
func isJSON(h http.Header) bool {
	mt, _, err := mime.ParseMediaType(h.Get("Content-Type"))
	return err == nil && mt == "application/json"
}
