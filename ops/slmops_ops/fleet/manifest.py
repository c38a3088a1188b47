"""``slmops fleet manifest --format kubernetes``: the same rollout for k3s/Kubernetes fleets.

A DaemonSet (one pod per device, like Swarm's global mode) or, with ``--replicas N``, a Deployment;
``nodeSelector`` on ``kubernetes.io/arch`` from the bundle's architecture; native gRPC liveness and
readiness probes on the server's health service (Kubernetes >= 1.24); resource limits; Prometheus
scrape annotations; a rolling update one pod at a time (maxUnavailable 1, maxSurge 0 for a
DaemonSet: with hostPort a node cannot run two pods); a Service in front. The image is the one
``slmops fleet deploy`` bakes and pushes (REGISTRY/slmops-bundle:TARGET-SHA12).
"""

from __future__ import annotations

from typing import Any

from slmops_ops.deploy import CONTAINER_METRICS_PORT, CONTAINER_PORT
from slmops_ops.fleet import LABEL_BUNDLE_NAME, LABEL_BUNDLE_SHA

HTTP_PORT = 8000


def kubernetes(name: str, image: str, arch: str | None, sha256: str, target: str, replicas: int | None = None,
               memory: str = "2Gi", cpus: str = "2", serve_args: list[str] | None = None, namespace: str = "default",
               host_port: int | None = None, token_secret: str | None = None) -> list[dict[str, Any]]:
    labels = {"app.kubernetes.io/name": "slmops-serve", "app.kubernetes.io/instance": name}
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(CONTAINER_METRICS_PORT),
                   "prometheus.io/path": "/metrics", LABEL_BUNDLE_SHA: sha256, LABEL_BUNDLE_NAME: target}
    grpc_port: dict[str, Any] = {"name": "grpc", "containerPort": CONTAINER_PORT, "protocol": "TCP"}
    if host_port:
        grpc_port["hostPort"] = host_port
    container: dict[str, Any] = {
        "name": "serve",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["serve", "/bundle", "--port", str(CONTAINER_PORT), "--metrics-port", str(CONTAINER_METRICS_PORT),
                 "--http-port", str(HTTP_PORT), *(serve_args or [])],
        "ports": [grpc_port, {"name": "metrics", "containerPort": CONTAINER_METRICS_PORT, "protocol": "TCP"},
                  {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "readinessProbe": {"grpc": {"port": CONTAINER_PORT}, "periodSeconds": 2, "failureThreshold": 3},
        "livenessProbe": {"grpc": {"port": CONTAINER_PORT}, "periodSeconds": 15, "failureThreshold": 3,
                          "timeoutSeconds": 5},
        "startupProbe": {"grpc": {"port": CONTAINER_PORT}, "periodSeconds": 2, "failureThreshold": 60},
        "resources": {"limits": {"memory": memory, "cpu": cpus}, "requests": {"memory": "256Mi", "cpu": "250m"}},
        "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                            "runAsNonRoot": True, "runAsUser": 10001, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if token_secret:
        container["env"] = [{"name": "SLMOPS_ADMIN_TOKEN",
                             "valueFrom": {"secretKeyRef": {"name": token_secret, "key": "token"}}}]
    pod: dict[str, Any] = {
        "metadata": {"labels": labels, "annotations": annotations},
        "spec": {
            "containers": [container],
            "terminationGracePeriodSeconds": 40,
            "volumes": [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}}],
        },
    }
    if arch:
        pod["spec"]["nodeSelector"] = {"kubernetes.io/arch": arch}
    meta = {"name": name, "namespace": namespace, "labels": labels}
    workload: dict[str, Any]
    if replicas is None:
        workload = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta, "spec": {
            "selector": {"matchLabels": labels}, "template": pod,
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}}}
    else:
        workload = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {
            "replicas": replicas, "selector": {"matchLabels": labels}, "template": pod,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0 if not host_port else 1,
                                                                     "maxSurge": 1 if not host_port else 0}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {
        "selector": labels, "ports": [
            {"name": "grpc", "port": CONTAINER_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
            {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
            {"name": "metrics", "port": CONTAINER_METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}]}}
    return [workload, service]
