"""Orchestration above the stages: what runs train and build together (the Olive-style `run --config`
pipeline), and what ships their products to devices (deploy to one host, fleet rollouts on Swarm,
Kubernetes manifests). The stages (slmops_train, slmops_build, slmops_serve) and the shared `slmops`
package never import from here."""
