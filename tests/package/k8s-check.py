"""The Kubernetes manifests against what kmodmon needs (schema validity is checked apart, by
kubernetes-validate): the configuration they carry parses with kmodmon's own parser, and the
DaemonSet mounts, probes, capabilities and environment match that configuration and the
systemd unit.

    python3 tests/package/k8s-check.py KMODMON_BIN MANIFEST...

Needs PyYAML (kubernetes-validate brings it). Exits 1 naming every mismatch.
"""
import os
import re
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
problems = []


def problem(msg):
    problems.append(msg)
    print(f"k8s-check: FAIL: {msg}", file=sys.stderr)


def ok(msg):
    print(f"k8s-check: ok: {msg}")


def unit_capabilities():
    with open(os.path.join(ROOT, "dist/kmodmon.service"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("CapabilityBoundingSet="):
                return {c.removeprefix("CAP_") for c in line.split("=", 1)[1].split()}
    return set()


def check_daemonset(ds, configmaps, kmodmon):
    pod = ds["spec"]["template"]["spec"]
    name = ds["metadata"]["name"]
    if not pod.get("hostPID"):
        problem(f"{name}: hostPID must be true (kmodmon reads /proc/PID of the host)")
    containers = [c for c in pod["containers"] if c.get("args", [None])[0] == "run"]
    if len(containers) != 1:
        problem(f"{name}: expected one container running `kmodmon run`")
        return
    c = containers[0]
    sc = c.get("securityContext", {})
    if sc.get("privileged"):
        problem(f"{name}: privileged; use the capabilities kmodmon needs")
    added = set(sc.get("capabilities", {}).get("add", []))
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problem(f"{name}: capabilities must drop ALL before adding")
    want = unit_capabilities()
    if added != want:
        problem(f"{name}: capabilities {sorted(added)} differ from the systemd unit's {sorted(want)}")
    else:
        ok(f"capabilities match the systemd unit: {' '.join(sorted(added))}")

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}

    def host_path(mount):
        return volumes.get(mount["name"], {}).get("hostPath", {}).get("path")

    # The config file named in args comes from a ConfigMap key that exists.
    args = c["args"]
    config_path = args[args.index("--config") + 1] if "--config" in args else "/etc/kmodmon/kmodmon.toml"
    config_dir, config_key = os.path.split(config_path)
    cm_mount = mounts.get(config_dir)
    cm_name = volumes.get(cm_mount["name"], {}).get("configMap", {}).get("name") if cm_mount else None
    data = configmaps.get(cm_name, {})
    if config_key not in data:
        problem(f"{name}: {config_path} is not a key of a mounted ConfigMap")
        return

    with tempfile.TemporaryDirectory() as tmp:
        for key, text in data.items():
            with open(os.path.join(tmp, key), "w", encoding="utf-8") as f:
                f.write(text)
        cmd = [kmodmon, "run", "--check-config", "--config", os.path.join(tmp, config_key)]
        if "policy.toml" in data:
            r = subprocess.run([kmodmon, "policy", "check", os.path.join(tmp, "policy.toml")],
                               capture_output=True, text=True)
            if r.returncode != 0:
                problem(f"{name}: policy.toml: {r.stdout}{r.stderr}")
            else:
                ok(f"policy.toml: {r.stdout.strip()}")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            problem(f"{name}: {config_key}: {r.stderr.strip()}")
        else:
            ok(f"{config_key} parses with kmodmon: {r.stdout.strip()}")

    import tomllib
    cfg = tomllib.loads(data[config_key])

    # Events on stdout for the log pipeline.
    if not cfg.get("forward", {}).get("stdout"):
        problem(f"{name}: [forward] stdout must be true (events as JSON on stdout)")

    # The audit log lands on a writable hostPath.
    audit = cfg.get("audit", {}).get("dir")
    holder = max((p for p in mounts if audit and (audit + "/").startswith(p.rstrip("/") + "/")),
                 key=len, default=None)
    if not audit or not holder or not host_path(mounts[holder]) or mounts[holder].get("readOnly"):
        problem(f"{name}: the audit dir {audit} is not on a writable hostPath mount")
    else:
        ok(f"audit log {audit} on hostPath {host_path(mounts[holder])}")

    # Metrics port, readiness and liveness probes.
    listen = cfg.get("metrics", {}).get("listen", "")
    port = int(listen.rsplit(":", 1)[1]) if ":" in listen else None
    if listen.startswith("127.") or listen.startswith("[::1]"):
        problem(f"{name}: metrics listen {listen} is loopback: the kubelet cannot probe it")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    if port not in ports.values():
        problem(f"{name}: metrics port {port} is not a containerPort")
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/healthz")):
        get = c.get(probe, {}).get("httpGet", {})
        pport = ports.get(get.get("port"), get.get("port"))
        if get.get("path") != path or pport != port:
            problem(f"{name}: {probe} must GET {path} on the metrics port {port}")
    ok(f"metrics on :{port}, readiness /ready, liveness /healthz")

    # Host mounts kmodmon reads, read-only except the pins, the audit log and tracefs (the
    # kretprobe events of the kprobe attempt source are created in its kprobe_events).
    required = {
        "/sys/fs/bpf": "/sys/fs/bpf",
        "/sys/kernel/tracing": "/sys/kernel/tracing",
        "/lib/modules": "/lib/modules",
        "/run/containerd": "/run/containerd",
        "/run/containers/storage": "/run/containers/storage",
    }
    by_host = {host_path(m): m for m in mounts.values() if host_path(m)}
    for host, why in required.items():
        if host not in by_host:
            problem(f"{name}: host path {host} is not mounted")
    for host, m in by_host.items():
        writable = host in ("/sys/fs/bpf", "/var/lib/kmodmon", "/sys/kernel/tracing")
        if not writable and not m.get("readOnly"):
            problem(f"{name}: host path {host} must be mounted readOnly")
    if by_host.get("/sys/fs/bpf", {}).get("mountPropagation") != "HostToContainer":
        problem(f"{name}: /sys/fs/bpf needs mountPropagation HostToContainer")

    # The host's cgroup tree, named to kmodmon.
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    cg = by_host.get("/sys/fs/cgroup")
    if not cg or env.get("KMODMON_CGROUP_ROOT") != cg["mountPath"]:
        problem(f"{name}: KMODMON_CGROUP_ROOT must name the mount of the host's /sys/fs/cgroup")
    else:
        ok(f"host cgroup tree at {cg['mountPath']} (KMODMON_CGROUP_ROOT)")

    # Memory: a limit, and a request at least the measured idle RSS.
    res = c.get("resources", {})
    limit = res.get("limits", {}).get("memory")
    request = res.get("requests", {}).get("memory")
    mib = lambda v: int(re.fullmatch(r"(\d+)Mi", v).group(1)) if v and re.fullmatch(r"(\d+)Mi", v) else None
    if mib(limit) is None or mib(request) is None or not (32 <= mib(request) <= mib(limit)):
        problem(f"{name}: memory request {request} / limit {limit} (want Mi values, 32Mi <= request <= limit)")
    else:
        ok(f"memory request {request}, limit {limit}")


API_PORTS = {443, 6443}


def is_api_egress(np):
    """The node labels' policy: egress only (to the API server), no ingress."""
    spec = np["spec"]
    return spec.get("policyTypes") == ["Egress"] and not spec.get("ingress")


def check_api_egress(np, ds_name):
    pname = np["metadata"]["name"]
    if not RBAC_FOR.get(ds_name):
        problem(f"NetworkPolicy {pname}: opens egress for the node labels, but no RBAC lets "
                f"{ds_name}'s service account patch nodes")
    for rule in np["spec"].get("egress", []):
        for p in rule.get("ports") or [{}]:
            if p.get("port") not in API_PORTS or p.get("protocol", "TCP") != "TCP":
                problem(f"NetworkPolicy {pname}: egress {p} is not the API server's (TCP 443/6443)")
        for peer in rule.get("to") or []:
            if "ipBlock" not in peer:
                problem(f"NetworkPolicy {pname}: egress peers may only be ipBlocks of the control plane")
    ok(f"NetworkPolicy {pname}: egress to the API server only (TCP {sorted(API_PORTS)})")


# DaemonSet name -> ClusterRoles bound to its service account (filled by check_rbac).
RBAC_FOR = {}


def check_rbac(ds, docs):
    """What the DaemonSet's service account may do: at most get and patch nodes (the node
    labels); and the token is mounted exactly when the node labels are on."""
    name = ds["metadata"]["name"]
    ns = ds["metadata"].get("namespace")
    pod = ds["spec"]["template"]["spec"]
    sa = pod.get("serviceAccountName", "default")
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}
    bound = []
    for b in (d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        if any(s.get("kind") == "ServiceAccount" and s.get("name") == sa
               and s.get("namespace", b["metadata"].get("namespace")) == ns
               for s in b.get("subjects", [])):
            ref = b["roleRef"]
            if b["kind"] != "ClusterRoleBinding" or ref.get("kind") != "ClusterRole":
                problem(f"{name}: binding {b['metadata']['name']}: only a ClusterRoleBinding of the node-label ClusterRole is expected")
                continue
            role = roles.get(ref["name"])
            if role is None:
                problem(f"{name}: binding {b['metadata']['name']} names ClusterRole {ref['name']}, which is not in the manifests")
                continue
            for rule in role.get("rules", []):
                if (rule.get("apiGroups") != [""] or rule.get("resources") != ["nodes"]
                        or not set(rule.get("verbs", [])) <= {"get", "patch"}
                        or rule.get("resourceNames")):
                    problem(f"ClusterRole {ref['name']}: {rule} grants more than get/patch on nodes")
            bound.append(ref["name"])
    RBAC_FOR[name] = bound
    if bound:
        ok(f"{name}: service account {sa} may get and patch nodes ({', '.join(bound)}), nothing else")
    env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
    node = env.get("NODE_NAME")
    if node and node.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
        problem(f"{name}: NODE_NAME must come from the downward API's spec.nodeName")
    return sa


def check_node_labels(ds, cfg):
    """[node_labels] on needs the token, the node name and the RBAC; off needs no token."""
    name = ds["metadata"]["name"]
    pod = ds["spec"]["template"]["spec"]
    enabled = cfg.get("node_labels", {}).get("enabled", False)
    automount = pod.get("automountServiceAccountToken", True)
    env = {e["name"] for c in pod["containers"] for e in c.get("env", [])}
    if enabled:
        if not automount:
            problem(f"{name}: [node_labels] is enabled but the service account token is not mounted")
        if "NODE_NAME" not in env and not cfg["node_labels"].get("node_name"):
            problem(f"{name}: [node_labels] is enabled but NODE_NAME is not set")
        if not RBAC_FOR.get(name):
            problem(f"{name}: [node_labels] is enabled but no RBAC lets it patch nodes")
        ok(f"{name}: node labels on, with token, node name and RBAC")
    elif automount:
        problem(f"{name}: the service account token is mounted but kmodmon does not use it "
                f"([node_labels] is off): set automountServiceAccountToken: false")
    else:
        ok(f"{name}: node labels off, no API token mounted")


def check_networkpolicy(ds, policies, listen):
    """The metrics port is reachable only from a selected scraper, and kmodmon opens nothing."""
    name = ds["metadata"]["name"]
    ns = ds["metadata"].get("namespace")
    labels = ds["spec"]["template"]["metadata"].get("labels", {})
    c = [c for c in ds["spec"]["template"]["spec"]["containers"] if c.get("args", [None])[0] == "run"][0]
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    metrics_port = int(listen.rsplit(":", 1)[1]) if ":" in listen else None

    def selects(np):
        sel = np["spec"].get("podSelector", {})
        match = sel.get("matchLabels", {})
        return (np["metadata"].get("namespace") == ns and not sel.get("matchExpressions")
                and match and all(labels.get(k) == v for k, v in match.items()))

    mine = [np for np in policies if selects(np) and not is_api_egress(np)]
    for np in policies:
        if selects(np) and is_api_egress(np):
            check_api_egress(np, name)
    if not mine:
        problem(f"{name}: no NetworkPolicy selects its pods (labels {labels}); the metrics port "
                f"would be open to every pod")
        return
    before = len(problems)
    for np in mine:
        pname = np["metadata"]["name"]
        spec = np["spec"]
        types = set(spec.get("policyTypes", []))
        if types != {"Ingress", "Egress"}:
            problem(f"NetworkPolicy {pname}: policyTypes must be Ingress and Egress, not {sorted(types)}")
        if spec.get("egress"):
            problem(f"NetworkPolicy {pname}: kmodmon opens no connection; egress must be empty")
        for rule in spec.get("ingress", []):
            peers = rule.get("from")
            if not peers:
                problem(f"NetworkPolicy {pname}: an ingress rule without `from` admits everyone")
            for peer in peers or []:
                if "ipBlock" in peer:
                    problem(f"NetworkPolicy {pname}: ipBlock peers are not a scraper selector")
                if not peer.get("podSelector", {}).get("matchLabels"):
                    problem(f"NetworkPolicy {pname}: each peer must select the scraper's pods by label")
            rports = rule.get("ports") or []
            if not rports:
                problem(f"NetworkPolicy {pname}: an ingress rule without ports admits every port")
            for p in rports:
                port = ports.get(p.get("port"), p.get("port"))
                if port != metrics_port or p.get("protocol", "TCP") != "TCP":
                    problem(f"NetworkPolicy {pname}: ingress port {p} is not the metrics port {metrics_port}/TCP")
    if len(problems) == before:
        ok(f"NetworkPolicy {', '.join(np['metadata']['name'] for np in mine)}: only the scraper "
           f"reaches :{metrics_port}, no egress")


def main():
    kmodmon, manifests = sys.argv[1], sys.argv[2:]
    docs = []
    for path in manifests:
        with open(path, encoding="utf-8") as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    daemonsets = [d for d in docs if d["kind"] == "DaemonSet"]
    if not daemonsets:
        problem("no DaemonSet in the manifests")
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    for ds in daemonsets:
        check_rbac(ds, docs)
        check_daemonset(ds, configmaps, kmodmon)
        import tomllib
        c = [c for c in ds["spec"]["template"]["spec"]["containers"] if c.get("args", [None])[0] == "run"]
        data = {}
        for v in ds["spec"]["template"]["spec"].get("volumes", []):
            data.update(configmaps.get(v.get("configMap", {}).get("name"), {}))
        cfg = tomllib.loads(data.get("kmodmon.toml", "")) if c else {}
        check_node_labels(ds, cfg)
        listen = cfg.get("metrics", {}).get("listen", "")
        if listen and not (listen.startswith("127.") or listen.startswith("[::1]")):
            check_networkpolicy(ds, policies, listen)
    if problems:
        print(f"k8s-check: {len(problems)} problem(s)", file=sys.stderr)
        sys.exit(1)
    print("k8s-check: the manifests match what kmodmon needs")


if __name__ == "__main__":
    main()
