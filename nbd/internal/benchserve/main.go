// Command benchserve serves a raw file through Rebound's NBD server so
// scripts/bench_nbd.sh can compare it with qemu-nbd on the same kind of file.
//
//	benchserve -file disk.raw [-name disk] [-listen 127.0.0.1:10809 | -socket /path]
//
// It prints the export's URI on stdout and serves until SIGINT/SIGTERM.
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/nbd/internal/rawfile"
)

func main() {
	file := flag.String("file", "", "raw image to serve (required)")
	name := flag.String("name", "disk", "export name")
	listen := flag.String("listen", "127.0.0.1:0", "TCP address to listen on")
	socket := flag.String("socket", "", "unix socket to listen on instead of TCP")
	flag.Parse()
	if err := run(*file, *name, *listen, *socket); err != nil {
		fmt.Fprintln(os.Stderr, "benchserve:", err)
		os.Exit(1)
	}
}

func run(file, name, listen, socket string) error {
	if file == "" {
		return fmt.Errorf("-file is required")
	}
	f, err := rawfile.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	network, addr := "tcp", listen
	if socket != "" {
		network, addr = "unix", socket
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		return err
	}
	exp := &nbd.Export{Name: name, Description: "benchserve " + file, Backend: sparse{f}}
	s := &nbd.Server{
		Lookup: func(n string) (*nbd.Export, error) {
			if n != name {
				return nil, fmt.Errorf("no export %q", n)
			}
			return exp, nil
		},
		List:   func() []string { return []string{name} },
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
	fmt.Println(nbd.URI(network, l.Addr().String(), name))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() { <-sig; s.Close() }()
	if err := s.Serve(l); err != net.ErrClosed {
		return err
	}
	return nil
}

// sparse reports the file's holes, as the site's disk backends do.
type sparse struct{ *rawfile.File }

func (f sparse) Extents(off, length int64) ([]nbd.Extent, error) {
	return nbd.SeekExtents(f.OSFile(), off, length)
}
