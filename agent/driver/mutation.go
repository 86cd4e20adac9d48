//go:build !mutation_nocatchup

package driver

// skipCatchUpProof is true only in a mutant built for the fault suite's
// mutation check (integration/nemesis, tag mutation_nocatchup): the
// cutover then flips without proving that green applied the fence marker.
const skipCatchUpProof = false
