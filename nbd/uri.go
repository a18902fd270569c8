package nbd

import (
	"fmt"
	"net"
	"net/url"
	"strings"

	"github.com/rebound-dr/rebound"
)

// DefaultPort is the IANA NBD port.
const DefaultPort = "10809"

// ParseURI splits an NBD URI ("nbd://host[:port]/export", "nbds://..." or
// "nbd+unix:///export?socket=/path") into a network ("tcp" or "unix"), an
// address for net.Dial and the export name.
func ParseURI(uri string) (network, addr, export string, err error) {
	p, err := parseURI(uri)
	return p.network, p.addr, p.export, err
}

// parsedURI is an NBD URI taken apart.
type parsedURI struct {
	network, addr, export string
	host                  string // the TCP host, checked against the server's certificate
	tls                   bool   // nbds, nbds+unix
	certDir               string // tls-certificates=DIR (libnbd's name)
	tlsHost               string // tls-hostname=NAME: the name the server's certificate carries
}

func parseURI(uri string) (parsedURI, error) {
	var p parsedURI
	u, err := url.Parse(uri)
	if err != nil {
		return p, rebound.Errorf(rebound.EINVALID, "bad NBD URI %q: %v", uri, err)
	}
	p.export = strings.TrimPrefix(u.Path, "/")
	p.certDir = u.Query().Get("tls-certificates")
	p.tlsHost = u.Query().Get("tls-hostname")
	switch u.Scheme {
	case "nbd", "nbd+tcp", "nbds", "nbds+tcp":
		if u.Host == "" {
			return p, rebound.Errorf(rebound.EINVALID, "NBD URI %q has no host", uri)
		}
		host, port := u.Hostname(), u.Port()
		if port == "" {
			port = DefaultPort
		}
		p.network, p.addr, p.host = "tcp", net.JoinHostPort(host, port), host
		p.tls = strings.HasPrefix(u.Scheme, "nbds")
		return p, nil
	case "nbd+unix", "nbds+unix":
		sock := u.Query().Get("socket")
		if sock == "" {
			return p, rebound.Errorf(rebound.EINVALID, "NBD URI %q has no socket= parameter", uri)
		}
		if u.Host != "" {
			return p, rebound.Errorf(rebound.EINVALID, "NBD URI %q: nbd+unix takes no host", uri)
		}
		p.network, p.addr = "unix", sock
		p.tls = u.Scheme == "nbds+unix"
		return p, nil
	}
	return p, rebound.Errorf(rebound.EINVALID, "NBD URI %q: unsupported scheme %q (want nbd, nbds or nbd+unix)", uri, u.Scheme)
}

// URI builds an NBD URI that qemu, libnbd (nbdinfo, nbdcopy) and Dial accept.
// network is "tcp" (or "tcp4"/"tcp6") or "unix".
func URI(network, addr, export string) string {
	path := "/" + url.PathEscape(export)
	if strings.HasPrefix(network, "unix") {
		if strings.ContainsAny(addr, "?&#%+ ;=") {
			addr = url.QueryEscape(addr) // plain paths stay readable
		}
		return "nbd+unix://" + path + "?socket=" + addr
	}
	return fmt.Sprintf("nbd://%s%s", addr, path)
}

// TLSURI builds an nbds:// URI (NBD over TLS) for a TCP address.
func TLSURI(addr, export string) string {
	return "nbds" + strings.TrimPrefix(URI("tcp", addr, export), "nbd")
}

// IsTLSURI reports whether an NBD URI asks for TLS (nbds://).
func IsTLSURI(uri string) bool {
	p, err := parseURI(uri)
	return err == nil && p.tls
}
