//go:build mutation_nocatchup

package driver

// A mutant for the fault suite's mutation check (integration/nemesis),
// never built without the tag: the catch-up proof (the fence marker
// applied on green, nothing after it) is skipped.
const skipCatchUpProof = true
