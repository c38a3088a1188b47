"""``slmops deploy``: ship the serve image and a bundle to a Docker host and start it there,
health-checked, with rollback to the previous container when the new one does not become SERVING.

Hosts: ``local`` (this machine's engine, ``$DOCKER_HOST`` respected), ``ssh://user@host[:port]``
(the Docker SDK over the local ``ssh`` client: keys, agent and ``~/.ssh/config`` apply; the remote
user must be allowed to use Docker) and ``tcp://host:port``.

Images travel as a ``docker save`` stream (gzip-compressed for remote hosts) loaded by the remote
engine, or through a registry (``--registry HOST:PORT``: push here, pull there). The bundle travels
into a named volume per bundle (``slmops-bundle-<target>-<sha12>``, content-addressed by
``bundle.json``'s sha256): a helper container that is created but never started mounts it and
``put_archive`` streams the bundle's files into it; the server mounts it read-only at ``/bundle``.
A volume already filled on that host is reused, so redeploys of the same bundle move no data, and
the previous container keeps its own bundle for a rollback.

Needs the ``deploy`` extra (the ``docker`` SDK): ``pip install 'slmops[deploy]'``.
"""

from __future__ import annotations

# Labels on everything slmops deploys (containers, volumes); `slmops deploy status` lists by them.
LABEL_DEPLOY = "io.slmops.deploy"
LABEL_NAME = "io.slmops.deploy.name"
LABEL_IMAGE = "io.slmops.deploy.image"
LABEL_IMAGE_ID = "io.slmops.deploy.image-id"
LABEL_CONFIG = "io.slmops.deploy.config"
LABEL_DEPLOYED_AT = "io.slmops.deploy.deployed-at"
LABEL_BUNDLE_SHA = "io.slmops.bundle.sha256"
LABEL_BUNDLE_NAME = "io.slmops.bundle.name"
LABEL_ARCH = "io.slmops.deploy.arch"  # the host engine's architecture (amd64, arm64) at deploy time

BUNDLE_MOUNT = "/bundle"
CONTAINER_PORT = 50051
CONTAINER_METRICS_PORT = 9090
HEALTH_PROBE = ["/opt/venv/bin/python", "/usr/local/lib/slmops/healthcheck.py", "--timeout", "3"]
