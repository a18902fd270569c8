package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
)

// TestOverHTTP runs the CLI with its default Service factory against the
// real REST server (package http) over TLS, serving a fake Service: config
// resolution, CA pinning, auth and error codes survive the wire.
func TestOverHTTP(t *testing.T) {
	f := &fakeService{
		GetMachineFn: func(name string) (*rebound.Machine, error) {
			if name != "web1" {
				return nil, rebound.Errorf(rebound.ENOTFOUND, "machine %q not found", name)
			}
			return sampleMachine(), nil
		},
		FailoverFn: func(req rebound.FailoverRequest) (*rebound.Job, error) {
			if req.Machine != "web1" {
				return nil, rebound.Errorf(rebound.ECONFLICT, "machine %s is not protected", req.Machine)
			}
			return &rebound.Job{ID: "j1", Type: "failover", Machine: "web1", State: rebound.JobQueued}, nil
		},
		ListJobsFn: func() ([]rebound.Job, error) {
			return []rebound.Job{{ID: "j1", Machine: "web1"}, {ID: "j2", Machine: "db"}}, nil
		},
		GetJobFn: jobScript(
			rebound.Job{Type: "failover", Machine: "web1", State: rebound.JobRunning, Step: "activate", Progress: 0.5},
			rebound.Job{Type: "failover", Machine: "web1", State: rebound.JobSucceeded, Progress: 1},
		),
	}
	hs := &rhttp.Server{Service: f, Authenticate: func(ctx context.Context, tok string) (rebound.Principal, error) {
		if tok != "good" {
			return rebound.Principal{}, rebound.Errorf(rebound.EUNAUTHORIZED, "bad token")
		}
		return rebound.Principal{User: "admin", Role: rebound.RoleAdmin, Via: "token"}, nil
	}}
	srv := httptest.NewTLSServer(hs.Handler())
	defer srv.Close()

	dir := clearEnv(t)
	ca := filepath.Join(dir, "ca.crt")
	os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644)
	if _, err := WriteClientConfig(ClientConfig{Server: srv.URL, Token: "good", CAFile: ca}); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) result {
		var out, errb bytes.Buffer
		c := NewCLI(nil, &out, &errb) // the default factory: rhttp.NewClient
		c.PollInterval = time.Millisecond
		c.IsTerminal = func(io.Writer) bool { return false }
		code := c.Run(context.Background(), args)
		return result{code, out.String(), errb.String()}
	}

	r := run("machine", "show", "web1", "-o", "json")
	wantCode(t, r, 0)
	if m := decode[rebound.Machine](t, r.stdout); m.Disks[1].NBD != "nbd://a:10809/web1-disk1" {
		t.Fatalf("json %+v", m)
	}
	wantCode(t, run("machine", "show", "nope"), ExitNotFound)
	wantCode(t, run("failover", "db"), ExitConflict)
	r = run("failover", "web1", "--wait", "-o", "json")
	wantCode(t, r, 0)
	if j := decode[rebound.Job](t, r.stdout); j.State != rebound.JobSucceeded {
		t.Fatalf("json %+v", j)
	}
	r = run("job", "list", "--machine", "db", "-o", "json")
	wantCode(t, r, 0)
	if js := decode[[]rebound.Job](t, r.stdout); len(js) != 1 || js[0].ID != "j2" {
		t.Fatalf("json %+v", js)
	}
	r = run("machine", "show", "web1", "--token", "bad")
	wantCode(t, r, ExitUnauthorized)
	if !strings.HasPrefix(r.stderr, "rebound: bad token (token from --token): use the admin token of the server") {
		t.Fatalf("stderr %q", r.stderr)
	}

	// A CA that did not sign the server's certificate is not trusted.
	otherCA := filepath.Join(dir, "other-ca.crt")
	os.WriteFile(otherCA, selfSignedPEM(t), 0o644)
	r = run("machine", "show", "web1", "--ca", otherCA)
	wantCode(t, r, ExitUnavailable)
	if !strings.Contains(r.stderr, "certificate") {
		t.Fatalf("stderr %q", r.stderr)
	}
	// A CA file without a certificate is a usage error.
	os.WriteFile(otherCA, []byte("junk"), 0o644)
	wantCode(t, run("machine", "show", "web1", "--ca", otherCA), ExitUsage)
	// A server that is down.
	url := srv.URL
	srv.Close()
	r = run("machine", "list", "--server", url)
	wantCode(t, r, ExitUnavailable)
}

func selfSignedPEM(t *testing.T) []byte {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "other CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}
