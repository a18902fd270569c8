package site

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"github.com/rebound-dr/rebound"
)

// Power sets the VM of a qemu machine at this site.
func (s *Site) Power(ctx context.Context, name, state string, test bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.getLocked(name); err != nil {
		return err
	}
	switch state {
	case rebound.PowerOn, rebound.PowerOff, rebound.PowerKill:
	default:
		return rebound.Errorf(rebound.EINVALID, "unknown power state %q: use on, off or kill", state)
	}
	return nil // machines without a VM: nothing to power
}

// Console returns the end of the VM's serial console log.
func (s *Site) Console(ctx context.Context, name string, tail int, test bool) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.getLocked(name); err != nil {
		return nil, err
	}
	return nil, rebound.Errorf(rebound.ENOTFOUND, "machine %q has no VM at site %s", name, s.cfg.Name)
}

// importDisks converts the images a machine is created from into its disk
// files and returns the disks with their sizes (an imported disk of size 0
// takes the image's virtual size).
func (s *Site) importDisks(ctx context.Context, req rebound.SiteMachine) ([]rebound.Disk, error) {
	disks := append([]rebound.Disk(nil), req.Disks...)
	for i, img := range req.Import {
		if img == "" {
			continue
		}
		if i >= len(disks) {
			return nil, rebound.Errorf(rebound.EINVALID, "image %q has no disk to go to", img)
		}
		out, err := exec.CommandContext(ctx, "qemu-img", "info", "--output=json", img).Output()
		if err != nil {
			return nil, rebound.Errorf(rebound.EINVALID, "cannot read image %q at site %s: %v", img, s.cfg.Name, exitText(err))
		}
		var info struct {
			Format      string `json:"format"`
			VirtualSize int64  `json:"virtual-size"`
		}
		if err := json.Unmarshal(out, &info); err != nil {
			return nil, fmt.Errorf("qemu-img info %s: %w", img, err)
		}
		if info.Format != "raw" && info.Format != "qcow2" {
			return nil, rebound.Errorf(rebound.EINVALID, "image %q is %s; import takes raw or qcow2", img, info.Format)
		}
		size := max(disks[i].Size, (info.VirtualSize+511)/512*512)
		dst := s.diskPath(req.Name, i)
		// -S 4k keeps zero runs as holes; -n would need a pre-created file.
		cmd := exec.CommandContext(ctx, "qemu-img", "convert", "-f", info.Format, "-O", "raw", "-S", "4k", img, dst)
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, rebound.Errorf(rebound.EINTERNAL, "import %q into disk %d: %v: %s", img, i, err, strings.TrimSpace(string(out)))
		}
		if err := os.Truncate(dst, size); err != nil {
			return nil, err
		}
		disks[i].Size = size
		s.logger.Info("disk imported", "machine", req.Name, "disk", i, "image", img, "format", info.Format, "size", size)
	}
	return disks, nil
}

// exitText returns an exec error with the command's stderr.
func exitText(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) && len(ee.Stderr) > 0 {
		return strings.TrimSpace(string(ee.Stderr))
	}
	return err.Error()
}
