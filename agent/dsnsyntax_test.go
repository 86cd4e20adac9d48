package agent

// The agent validates posted plans and redacts their secrets with the DSN
// readers a binary installs (cmd/cutover); its tests install them too.
import _ "github.com/cutover/cutover/internal/dsnsyntax/register"
