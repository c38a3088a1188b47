"""``slmops fleet``: roll a bundle out to a fleet of devices with Docker Swarm, health-gated and
staged, with Swarm's own automatic rollback; and write the same thing as a Kubernetes manifest.

What Swarm does: it keeps one task per device (global mode, the default) or N replicas, updates
them one device at a time (``--update-parallelism 1``), waits for each new task's health check (the
serve image's gRPC ``HEALTHCHECK``: a task is RUNNING only once it answers SERVING), watches it for
``--update-monitor`` and rolls the whole service back to its previous spec when a task fails
(``--update-failure-action rollback``, max failure ratio 0). Each device pulls the image from the
registry itself.

What we do: bake the bundle into an image (``FROM`` the serve image; the model files and the
adapters are separate layers, so a change of adapters re-ships only the adapter layer), tag it by
the bundle's content hash and push it to ``--registry``; create or update the service; follow the
update task by task and, when Swarm rolled back, exit non-zero naming the node, the task's error
and its last log lines; ``--canary K`` (a first batch of K tasks, each sent a real Generate per
adapter whose answer must equal what the bundle itself answers, computed here with
``slmops.runtime.LocalModel``, before the rest follow; a wrong answer makes Swarm roll back);
several ``--bundle`` (one per architecture: each baked from its architecture's serve image and
pushed, a manifest list over them put to the registry, the service placed by
``Placement.Platforms`` so each node pulls its own member); ``fleet status`` (a row per task, health asked over gRPC);
``fleet adapters load|unload`` on every replica, all or nothing; ``fleet rollback``.

Ports are published in host mode (``mode=host``: each device's own address; the routing mesh
needs IPVS, which small edge kernels often lack, and it would hide which replica answers). A
device cannot run two tasks on one host port, so updates are stop-first; a client that spreads
requests over the devices and retries UNAVAILABLE on another sees no failure. Host-mode ports
also make every replica individually reachable, which ``fleet adapters`` needs.
"""

from __future__ import annotations

LABEL_FLEET = "io.slmops.fleet"
LABEL_PORT = "io.slmops.fleet.port"
LABEL_SPEC = "io.slmops.fleet.spec"  # sha256 of the spec slmops asked for: same again = "unchanged"
LABEL_BUNDLE_SHA = "io.slmops.bundle.sha256"
LABEL_BUNDLE_NAME = "io.slmops.bundle.name"
LABEL_ADAPTERS = "io.slmops.bundle.adapters"
LABEL_MEMBERS = "io.slmops.fleet.members"  # multi-arch: "amd64=SHA,arm64=SHA", each member's bundle.json sha256
BUNDLE_REPO = "slmops-bundle"  # REGISTRY/slmops-bundle:TARGET-SHA12
