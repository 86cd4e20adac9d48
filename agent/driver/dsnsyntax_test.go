package driver

// The agents of these tests validate plans with the DSN readers a binary
// installs (cmd/cutover).
import _ "github.com/cutover/cutover/internal/dsnsyntax/register"
