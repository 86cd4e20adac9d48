// Package deploy holds the ways to install the agent (a container image, a
// systemd unit, Kubernetes manifests with the agent as a sidecar and the
// gate in a Flagger canary and an Argo Rollout, a Grafana dashboard) and
// the tests that keep them true to the product.
package deploy
