package config

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Secret files. A text field may take a value from a file with a
// ${file:/abs/path} reference, the way ${NAME} takes it from the
// environment (a Docker or Kubernetes secret mount, a file written by a
// vault agent). The reference is what the replicated state keeps; each
// agent reads the file when it acts, so the value never reaches the Raft
// log. The path must be absolute (agents do not share a working
// directory), and the file, as libpq requires of ~/.pgpass, must give no
// access to group or others: a secret file that other users can read is
// refused, and reported like a missing variable, with the reason.

// filePrefix marks a reference name that names a file: "file:/run/x".
const filePrefix = "file:"

// maxSecretFile bounds what is read of a secret file.
const maxSecretFile = 64 << 10

// SecretFilePath returns the path a reference name names, if it names a
// file.
func SecretFilePath(name string) (string, bool) {
	return strings.CutPrefix(name, filePrefix)
}

// ReadSecretFile reads the secret in the file at path: its text without
// one trailing newline. The file must be a regular file (symbolic links
// are followed, as secret mounts use them) with no permission for group
// or others, and not empty.
func ReadSecretFile(path string) (string, error) {
	if !filepath.IsAbs(path) {
		return "", fmt.Errorf("secret file %s: the path must be absolute", path)
	}
	f, err := os.Open(path)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return "", fmt.Errorf("secret file %s: %v", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("secret file %s: %v", path, err)
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("secret file %s: not a regular file", path)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return "", fmt.Errorf("secret file %s: mode %04o gives group or others access; chmod 600 it (or 400)", path, perm)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxSecretFile+1))
	if err != nil {
		return "", fmt.Errorf("secret file %s: %v", path, err)
	}
	if len(data) > maxSecretFile {
		return "", fmt.Errorf("secret file %s: larger than %d bytes", path, maxSecretFile)
	}
	v := strings.TrimSuffix(strings.TrimSuffix(string(data), "\n"), "\r")
	if v == "" {
		return "", fmt.Errorf("secret file %s: empty", path)
	}
	return v, nil
}

// WithSecretFiles returns a lookup that reads ${file:...} references with
// ReadSecretFile and asks getenv for every other name.
func WithSecretFiles(getenv func(string) (string, bool)) func(string) (string, bool) {
	return func(name string) (string, bool) {
		if path, ok := SecretFilePath(name); ok {
			v, err := ReadSecretFile(path)
			return v, err == nil
		}
		return getenv(name)
	}
}

// DescribeMissing says why a reference name could not be resolved: the
// name of a variable, or "file PATH: " and what is wrong with the file.
func DescribeMissing(name string) string {
	path, ok := SecretFilePath(name)
	if !ok {
		return name
	}
	if _, err := ReadSecretFile(path); err != nil {
		return strings.TrimPrefix(err.Error(), "secret ")
	}
	return "file " + path + ": unreadable on this agent"
}
