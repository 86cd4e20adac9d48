package nemesis

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// An agent's data directory is a small file system of its own (root
// only), for the disk faults: an ext4 on a loop device whose image lives
// in /dev/shm (a fsync costs what it costs on memory, until the nemesis
// throttles the device), else a tmpfs (full disk only).
//
// A slow disk is the block I/O controller's throttle on that loop device
// for the agent's process: cgroup v1 blkio.throttle.* or v2 io.max, the
// agent moved into a cgroup of its own. Writes the agent forces out
// (fsync, the Raft log's) are submitted by the agent and wait for the
// throttle; measured here, 10 IOPS turn a 5 ms fsync into 100 ms.

// diskSize is the size of each agent's file system: room for a run's Raft
// log, small enough to fill at once.
const diskSize = 384 << 20

// disk is an agent's data directory's file system.
type disk struct {
	dir   string
	image string // the loop device's backing file; "" for a tmpfs
	loop  string // /dev/loopN
	dev   string // its major:minor
}

// mountDisk mounts a file system of diskSize at dir: ext4 on a loop
// device if it can, else a tmpfs.
func mountDisk(dir string) (*disk, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	d, lerr := mountLoop(dir)
	if lerr == nil {
		return d, nil
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d,mode=0700", diskSize)); err != nil {
		return nil, fmt.Errorf("no loop device (%v), no tmpfs: %w", lerr, err)
	}
	return &disk{dir: dir}, lerr
}

func mountLoop(dir string) (*disk, error) {
	img, err := os.CreateTemp("/dev/shm", "cutover-nemesis-disk-")
	if err != nil {
		return nil, err
	}
	d := &disk{dir: dir, image: img.Name()}
	err = img.Truncate(diskSize)
	img.Close()
	if err == nil {
		var out []byte
		out, err = exec.Command("losetup", "-f", "--show", d.image).CombinedOutput()
		d.loop = strings.TrimSpace(string(out))
		if err != nil {
			err, d.loop = fmt.Errorf("losetup: %v: %s", err, out), ""
		}
	}
	if err == nil {
		if out, merr := exec.Command("mkfs.ext4", "-q", "-m", "0", d.loop).CombinedOutput(); merr != nil {
			err = fmt.Errorf("mkfs.ext4: %v: %s", merr, out)
		}
	}
	if err == nil {
		err = syscall.Mount(d.loop, dir, "ext4", 0, "")
	}
	if err == nil {
		var st syscall.Stat_t
		if err = syscall.Stat(d.loop, &st); err == nil {
			d.dev = fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
			return d, nil
		}
		syscall.Unmount(dir, syscall.MNT_DETACH)
	}
	d.detach()
	return nil, err
}

func (d *disk) detach() {
	if d.loop != "" {
		exec.Command("losetup", "-d", d.loop).Run()
	}
	if d.image != "" {
		os.Remove(d.image)
	}
}

// unmount undoes mountDisk.
func (d *disk) unmount() {
	syscall.Unmount(d.dir, syscall.MNT_DETACH)
	d.detach()
}

// throttle is a cgroup of one agent whose I/O to its disk is limited.
type throttle struct {
	group string // the cgroup's directory
	v1    bool
	root  string // where the process goes back to
	pid   int
}

// slowDown moves the process pid into a cgroup of its own whose reads and
// writes on d are limited to iops operations and bps bytes a second.
func slowDown(d *disk, pid int, iops, bps int) (*throttle, error) {
	if d.dev == "" {
		return nil, errors.New("not a loop device (tmpfs): nothing to throttle")
	}
	name := fmt.Sprintf("cutover-nemesis-%d-%d", os.Getpid(), pid)
	t := &throttle{pid: pid}
	var rules []string
	if _, err := os.Stat("/sys/fs/cgroup/blkio/blkio.throttle.write_iops_device"); err == nil {
		t.v1, t.root = true, "/sys/fs/cgroup/blkio"
		t.group = filepath.Join(t.root, name)
		for _, r := range []string{"read_iops_device", "write_iops_device"} {
			rules = append(rules, r+"="+d.dev+" "+strconv.Itoa(iops))
		}
		for _, r := range []string{"read_bps_device", "write_bps_device"} {
			rules = append(rules, r+"="+d.dev+" "+strconv.Itoa(bps))
		}
	} else if b, err := os.ReadFile("/sys/fs/cgroup/cgroup.controllers"); err == nil && strings.Contains(string(b), "io") {
		t.root = "/sys/fs/cgroup"
		t.group = filepath.Join(t.root, name)
		// The io controller must be enabled for the root's children.
		os.WriteFile(filepath.Join(t.root, "cgroup.subtree_control"), []byte("+io"), 0o644)
		rules = append(rules, fmt.Sprintf("max=%s riops=%d wiops=%d rbps=%d wbps=%d", d.dev, iops, iops, bps, bps))
	} else {
		return nil, errors.New("no block I/O controller (cgroup v1 blkio or v2 io)")
	}
	if err := os.Mkdir(t.group, 0o755); err != nil && !os.IsExist(err) {
		return nil, err
	}
	for _, r := range rules {
		file, val, _ := strings.Cut(r, "=")
		if t.v1 {
			file = "blkio.throttle." + file
		} else {
			file = "io." + file
		}
		if err := os.WriteFile(filepath.Join(t.group, file), []byte(val), 0o644); err != nil {
			os.Remove(t.group)
			return nil, fmt.Errorf("%s: %w", file, err)
		}
	}
	if err := os.WriteFile(filepath.Join(t.group, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
		os.Remove(t.group)
		return nil, fmt.Errorf("move the agent into %s: %w", t.group, err)
	}
	return t, nil
}

// restore moves the process back (if it still runs) and removes the
// cgroup.
func (t *throttle) restore() error {
	os.WriteFile(filepath.Join(t.root, "cgroup.procs"), []byte(strconv.Itoa(t.pid)), 0o644)
	var err error
	for range 50 { // a process that just exited leaves the cgroup a moment later
		if err = os.Remove(t.group); err == nil || os.IsNotExist(err) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return err
}
