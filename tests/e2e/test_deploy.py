"""The Kubernetes manifests: they parse, probe the admin endpoint, and ``tcpfwd check``
accepts the configuration they ship. The other deployment files are checked in
tests/unit/test_deploy.py."""

from __future__ import annotations

import yaml

from support import ROOT, run_command, write_config

DEPLOY = ROOT / "deploy"


def test_kubernetes_manifests_parse_and_probe_the_admin_endpoint(tmp_path):
    documents = []
    for name in ("configmap.yaml", "deployment.yaml", "daemonset.yaml"):
        documents += [
            d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d
        ]
    kinds = {d["kind"] for d in documents}
    assert kinds == {"ConfigMap", "Deployment", "Service", "DaemonSet"}
    for workload in (d for d in documents if d["kind"] in ("Deployment", "DaemonSet")):
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["args"][:1] == ["run"]
    (configmap,) = (d for d in documents if d["kind"] == "ConfigMap")
    config = write_config(tmp_path, configmap["data"]["tcpfwd.toml"])
    result = run_command("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
