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

// ParseURI splits an NBD URI ("nbd://host[:port]/export" or
// "nbd+unix:///export?socket=/path") into a network ("tcp" or "unix"), an
// address for net.Dial and the export name.
func ParseURI(uri string) (network, addr, export string, err error) {
	u, err := url.Parse(uri)
	if err != nil {
		return "", "", "", rebound.Errorf(rebound.EINVALID, "bad NBD URI %q: %v", uri, err)
	}
	export = strings.TrimPrefix(u.Path, "/")
	switch u.Scheme {
	case "nbd", "nbd+tcp":
		if u.Host == "" {
			return "", "", "", rebound.Errorf(rebound.EINVALID, "NBD URI %q has no host", uri)
		}
		host, port := u.Hostname(), u.Port()
		if port == "" {
			port = DefaultPort
		}
		return "tcp", net.JoinHostPort(host, port), export, nil
	case "nbd+unix":
		sock := u.Query().Get("socket")
		if sock == "" {
			return "", "", "", rebound.Errorf(rebound.EINVALID, "NBD URI %q has no socket= parameter", uri)
		}
		if u.Host != "" {
			return "", "", "", rebound.Errorf(rebound.EINVALID, "NBD URI %q: nbd+unix takes no host", uri)
		}
		return "unix", sock, export, nil
	}
	return "", "", "", rebound.Errorf(rebound.EINVALID, "NBD URI %q: unsupported scheme %q (want nbd or nbd+unix)", uri, u.Scheme)
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
