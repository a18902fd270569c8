package agent

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"

	"github.com/rebound-dr/rebound/digest"
)

// digestsMagic starts a digests file: then per disk the size and block
// size (uint64 little endian) and the packed 16-byte digests, and a CRC-32C
// of everything before it.
const digestsMagic = "RBAGDG1\n"

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func (a *Agent) digestsPath(streamID string) string {
	return filepath.Join(a.cfg.StateDir, "streams", streamID, "digests")
}

// loadDigests returns the digests the last cycle of stream streamID kept,
// or nil if it kept none (a new stream: everything is sent).
func (a *Agent) loadDigests(streamID string) ([][][]byte, error) {
	b, err := os.ReadFile(a.digestsPath(streamID))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	if len(b) < len(digestsMagic)+4 || string(b[:len(digestsMagic)]) != digestsMagic {
		return nil, fmt.Errorf("agent: %s is not a digests file", a.digestsPath(streamID))
	}
	body, sum := b[:len(b)-4], binary.LittleEndian.Uint32(b[len(b)-4:])
	if crc32.Checksum(body, castagnoli) != sum {
		return nil, fmt.Errorf("agent: %s has a bad checksum", a.digestsPath(streamID))
	}
	r := body[len(digestsMagic):]
	out := make([][][]byte, len(a.disks))
	for i, d := range a.disks {
		if len(r) < 16 {
			return nil, fmt.Errorf("agent: digests file is short")
		}
		size, bs := int64(binary.LittleEndian.Uint64(r)), int64(binary.LittleEndian.Uint64(r[8:]))
		r = r[16:]
		if size != d.Size || bs != a.cfg.BlockSize {
			return nil, fmt.Errorf("agent: digests of disk %d are for %d bytes in %d-byte blocks, not %d in %d", i, size, bs, d.Size, a.cfg.BlockSize)
		}
		n := int((size + bs - 1) / bs)
		if len(r) < n*digest.Size {
			return nil, fmt.Errorf("agent: digests file is short")
		}
		packed := bytes.Clone(r[:n*digest.Size])
		r = r[n*digest.Size:]
		sums := make([][]byte, n)
		for k := range sums {
			sums[k] = packed[k*digest.Size : (k+1)*digest.Size : (k+1)*digest.Size]
		}
		out[i] = sums
	}
	return out, nil
}

// saveDigests writes the digests of stream streamID atomically.
func (a *Agent) saveDigests(streamID string, sums [][][]byte) error {
	var buf bytes.Buffer
	buf.WriteString(digestsMagic)
	var hdr [16]byte
	for i, d := range a.disks {
		binary.LittleEndian.PutUint64(hdr[:], uint64(d.Size))
		binary.LittleEndian.PutUint64(hdr[8:], uint64(a.cfg.BlockSize))
		buf.Write(hdr[:])
		for _, s := range sums[i] {
			buf.Write(s)
		}
	}
	var crc [4]byte
	binary.LittleEndian.PutUint32(crc[:], crc32.Checksum(buf.Bytes(), castagnoli))
	buf.Write(crc[:])
	path := a.digestsPath(streamID)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return writeFileAtomic(path, buf.Bytes())
}

// removeOtherStreams drops the digests of streams other than the current
// one: a new protection starts from an empty target.
func (a *Agent) removeOtherStreams(streamID string) {
	dir := filepath.Join(a.cfg.StateDir, "streams")
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if e.Name() != streamID {
			_ = os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}
}

func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
