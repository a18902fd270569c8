package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
)

// mapData runs nbdinfo --map on uri and returns the bytes reported as
// data and as zero holes; any other kind fails the test.
func mapData(t *testing.T, uri string) (data, holes int64) {
	t.Helper()
	out := run(t, "nbdinfo", "--map", uri)
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 4 {
			t.Fatalf("nbdinfo --map %s: line %q", uri, line)
		}
		n, _ := strconv.ParseInt(f[1], 10, 64)
		switch strings.Join(f[3:], " ") {
		case "data":
			data += n
		case "hole,zero", "zero":
			holes += n
		default:
			t.Fatalf("nbdinfo --map %s: line %q", uri, line)
		}
	}
	return data, holes
}

// TestExportsMapSparse: the exports of a running site report block status
// to the real clients: a 1 GiB disk holding 16 MiB maps as 16 MiB of data
// (and not much more) on the active export, on the protected source's
// export and on a test failover's export at the recovery site, and the
// bytes read back from it match.
func TestExportsMapSparse(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, svc := testUp(t, t.TempDir())
	const size, chunk = 1 << 30, 1 << 20
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "sparse", Site: "primary", Disks: []int64{size}})
	if err != nil {
		t.Fatal(err)
	}
	uri := m.Disks[0].NBD
	var cmds []string
	for i := 0; i < 16; i++ {
		cmds = append(cmds, "-c", fmt.Sprintf("write -P %d %d %d", i+1, int64(i)*(size/16), chunk))
	}
	run(t, "qemu-io", append([]string{"-f", "raw", uri}, cmds...)...)
	check := func(what, uri string) {
		t.Helper()
		data, holes := mapData(t, uri)
		if data < 16*chunk || data > 16*chunk*11/10 || data+holes != size {
			t.Fatalf("%s: nbdinfo --map reports %d data and %d hole bytes of %d; 16 MiB were written", what, data, holes, size)
		}
	}
	check("active export", uri)
	sum := diskSum(t, uri)
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "sparse", To: "recovery"}))
	check("protected source export", getMachine(t, svc, "sparse").Disks[0].NBD)
	waitJob(t, svc)(svc.TestFailover(ctx, "sparse", rebound.PointLatest))
	tf := getMachine(t, svc, "sparse").TestFailover
	check("test failover export", tf.Disks[0].NBD)
	if got := diskSum(t, tf.Disks[0].NBD); got != sum {
		t.Fatalf("test failover export: %s, want %s", got, sum)
	}
	waitJob(t, svc)(svc.TestFailoverCleanup(ctx, "sparse"))
}
