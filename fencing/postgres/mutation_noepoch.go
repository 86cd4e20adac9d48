//go:build mutation_noepoch

package postgres

import "strings"

// A mutant for the fault suite's mutation check (integration/nemesis),
// never built without the tag: the fence's epoch guard removed, so that a
// deposed leader's late fence or unfence lands. The server-side functions
// are created with every "the database has seen a higher epoch" test made
// false.
func init() {
	for i := range serverObjects {
		serverObjects[i].sql = strings.ReplaceAll(serverObjects[i].sql, "v_epoch > p_epoch", "false")
		serverObjects[i].body = strings.ReplaceAll(serverObjects[i].body, "v_epoch > p_epoch", "false")
	}
}
