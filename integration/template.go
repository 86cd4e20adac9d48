package integration

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// templateVersion is part of every template key: bump it whenever a build
// function changes what it leaves in the directory, so old templates are not
// reused.
const templateVersion = "1"

const templateMarker = ".cutover-template-complete"

// templateLocks serialises builds of one template inside this process;
// between processes the atomic rename decides.
var templateLocks sync.Map // name -> *sync.Mutex

// cachedTemplate returns the directory of the template identified by
// engine and key, building it first if no complete one exists. build gets an
// empty directory owned by as and must leave the template inside it; it runs
// at most once per process for a given key, unless it fails.
//
// Templates live in os.TempDir()/cutover-it-cache-<uid>/ and are published
// by renaming a finished build into place, so a reader never sees a partial
// one, and two processes that build the same template at once both succeed
// (the loser discards its copy).
func cachedTemplate(ctx context.Context, engine string, key []string, as account, build func(ctx context.Context, dir string) error) (string, error) {
	h := sha256.Sum256([]byte(templateVersion + "\x00" + strings.Join(key, "\x00")))
	name := engine + "-" + hex.EncodeToString(h[:8])
	root, err := cacheRoot()
	if err != nil {
		return "", err
	}
	final := filepath.Join(root, name)

	mu, _ := templateLocks.LoadOrStore(name, new(sync.Mutex))
	mu.(*sync.Mutex).Lock()
	defer mu.(*sync.Mutex).Unlock()

	if complete(final) {
		return final, nil
	}
	if _, err := os.Lstat(final); err == nil {
		// Not published by us (renames are atomic): remove and rebuild.
		if err := os.RemoveAll(final); err != nil {
			return "", fmt.Errorf("remove broken template: %w", err)
		}
	}
	tmp, err := os.MkdirTemp("", "cutover-it-build-"+engine+"-")
	if err != nil {
		return "", err
	}
	if err := as.chown(tmp); err != nil {
		os.RemoveAll(tmp)
		return "", err
	}
	if err := build(ctx, tmp); err != nil {
		os.RemoveAll(tmp)
		return "", fmt.Errorf("build %s template: %w", engine, err)
	}
	if err := os.WriteFile(filepath.Join(tmp, templateMarker), []byte(strings.Join(key, "\n")+"\n"), 0o644); err != nil {
		os.RemoveAll(tmp)
		return "", err
	}
	if err := os.Rename(tmp, final); err != nil {
		os.RemoveAll(tmp)
		if complete(final) {
			return final, nil // another process published it first
		}
		return "", fmt.Errorf("publish %s template: %w", engine, err)
	}
	return final, nil
}

func complete(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, templateMarker))
	return err == nil
}

// cacheRoot returns the per-user template cache, refusing one that another
// user could have prepared (it would be copied into every server).
func cacheRoot() (string, error) {
	root := filepath.Join(os.TempDir(), "cutover-it-cache-"+strconv.Itoa(os.Geteuid()))
	if err := os.Mkdir(root, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return "", err
	}
	fi, err := os.Lstat(root)
	if err != nil {
		return "", err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.IsDir() || !ok || int(st.Uid) != os.Geteuid() || fi.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("template cache %s: not a private directory of uid %d; remove it", root, os.Geteuid())
	}
	return root, nil
}

// binaryKey identifies a binary for a template key: path, size and mtime,
// so an upgraded package gets new templates.
func binaryKey(path string) string {
	fi, err := os.Stat(path)
	if err != nil {
		return path
	}
	return fmt.Sprintf("%s:%d:%d", path, fi.Size(), fi.ModTime().UnixNano())
}

// copyTree copies the directory src to dst (which must not exist), keeping
// modes, giving everything to as. Sockets and other special files are
// skipped.
func copyTree(src, dst string, as account) error {
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case fi.IsDir():
			if err := os.Mkdir(target, 0o700); err != nil {
				return err
			}
			if err := os.Chmod(target, fi.Mode().Perm()); err != nil {
				return err
			}
		case fi.Mode().IsRegular():
			if err := copyFile(path, target, fi.Mode().Perm()); err != nil {
				return err
			}
		case fi.Mode()&fs.ModeSymlink != 0:
			link, err := os.Readlink(path)
			if err != nil {
				return err
			}
			if err := os.Symlink(link, target); err != nil {
				return err
			}
		default:
			return nil
		}
		if as.cred != nil {
			return os.Lchown(target, as.uid, as.gid)
		}
		return nil
	})
}

func copyFile(src, dst string, perm fs.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Chmod(perm); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
