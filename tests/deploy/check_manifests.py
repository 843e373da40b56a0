#!/usr/bin/env python3
"""The deploy files against the attnd binary and the Dockerfile.

usage: check_manifests.py ATTND_BINARY

- Every attnd flag they pass (the Kubernetes ConfigMap's flagfile, the DaemonSet's args, the
  compose command, the Dockerfile's CMD) is one attnd accepts: `attnd --check_config` exits 0.
- They are valid YAML, and the probes and health checks ask attnd's gRPC health service: the
  Kubernetes gRPC probes on the port attnd listens on (--tcp_address), for a name attnd serves;
  compose's and the Dockerfile's health checks through attnctl on attnd's --unix_socket.
- They name the top-level Dockerfile's targets and run as its user.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
# grpc.health.v1 names attnd serves (README, "Operators"): the server, the service, a device.
HEALTH_NAMES = re.compile(r"^(|attnd\.v1\.Attention|attnd\.v1\.Attention/device/\d+)$")
failures = []
passed = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    (passed if ok else failures).append(what)


def check_config(attnd, args, what):
    """attnd --check_config ARGS: 0, and the resolved flags."""
    run = subprocess.run([attnd, "--check_config", *args], capture_output=True, text=True)
    check(run.returncode == 0 and run.stdout.rstrip().endswith("config OK"),
          f"{what}: attnd --check_config accepts {len(args)} arguments"
          + ("" if run.returncode == 0 else f" (exit {run.returncode}: {run.stderr.strip()})"))
    return dict(line.split("=", 1) for line in run.stdout.splitlines() if line.startswith("--"))


def dockerfile():
    text = open(os.path.join(ROOT, "Dockerfile")).read().replace("\\\n", " ")
    targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I))
    user = re.search(r"^USER\s+(\d+):(\d+)", text, re.M).groups()
    cmd = json.loads(re.search(r"^CMD\s+(\[.*\])", text, re.M).group(1))
    health = json.loads(re.search(r"^HEALTHCHECK\s.*?CMD\s+(\[.*\])", text, re.M).group(1))
    return targets, tuple(int(u) for u in user), cmd, health


def unix_target_of(command):
    """The socket an attnctl command line talks to."""
    for arg in command:
        if arg.startswith("--target=unix://"):
            return arg[len("--target=unix://"):]
    return None


def main(attnd):
    targets, user, cmd, health = dockerfile()
    check({"cpu", "cuda"} <= targets, f"Dockerfile has targets cpu and cuda ({sorted(targets)})")
    flags = check_config(attnd, cmd, "Dockerfile CMD")
    check(health[0] == "attnctl" and "health" in health
          and unix_target_of(health) == flags.get("--unix_socket"),
          "Dockerfile HEALTHCHECK asks attnctl health on the CMD's --unix_socket")

    # Kubernetes: the ConfigMap's flagfile where the DaemonSet mounts it.
    docs = list(yaml.safe_load_all(open(os.path.join(ROOT, "deploy/kubernetes/attnd.yaml"))))
    check(all(isinstance(d, dict) and "kind" in d for d in docs), "attnd.yaml: valid YAML")
    by_kind = {d["kind"]: d for d in docs}
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    pod = by_kind["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "attnd"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    with tempfile.TemporaryDirectory() as tmp:
        args = []
        for arg in container.get("args", []):
            for mount in container.get("volumeMounts", []):
                source = volumes[mount["name"]].get("configMap")
                prefix = mount["mountPath"].rstrip("/") + "/"
                if source and "=" + prefix in arg:
                    data = configmaps[source["name"]]
                    key = arg.split("=" + prefix, 1)[1]
                    path = os.path.join(tmp, key)
                    with open(path, "w") as f:
                        f.write(data[key])
                    arg = arg.split("=", 1)[0] + "=" + path
            args.append(arg)
        check(any(a.startswith("--flagfile=" + tmp) for a in args),
              "DaemonSet: attnd reads the ConfigMap's flagfile")
        flags = check_config(attnd, args, "DaemonSet args + ConfigMap flagfile")
    grpc_port = {p["name"]: p["containerPort"] for p in container["ports"]}.get("grpc")
    listen = flags.get("--tcp_address", "")
    check(grpc_port is not None and listen.endswith(f":{grpc_port}"),
          f"DaemonSet: port grpc ({grpc_port}) is attnd's --tcp_address ({listen})")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        spec = container.get(probe, {}).get("grpc", {})
        port = spec.get("port")
        port = grpc_port if port == "grpc" else port
        check(port == grpc_port and HEALTH_NAMES.match(spec.get("service", "")) is not None,
              f"DaemonSet {probe}: gRPC health on port {port}, name '{spec.get('service', '')}'")
    security = pod.get("securityContext", {})
    check(security.get("runAsNonRoot") is True
          and (security.get("runAsUser"), security.get("runAsGroup")) == user,
          f"DaemonSet runs as the image's user {user[0]}:{user[1]}, non-root")
    check(container["image"] == "attnd:cuda", "DaemonSet runs attnd:cuda")

    # Compose: the command, the health check, the build.
    compose = yaml.safe_load(open(os.path.join(ROOT, "deploy/docker-compose.yml")))
    check(isinstance(compose, dict) and "services" in compose, "docker-compose.yml: valid YAML")
    service = compose["services"]["attnd"]
    flags = check_config(attnd, service["command"], "compose command")
    check(unix_target_of(service["healthcheck"]["test"]) == flags.get("--unix_socket"),
          "compose healthcheck asks attnctl health on the command's --unix_socket")
    build = service["build"]
    dockerfile_path = os.path.normpath(os.path.join(ROOT, "deploy", build["context"],
                                                    build["dockerfile"]))
    check(dockerfile_path == os.path.normpath(os.path.join(ROOT, "Dockerfile"))
          and build.get("target") in targets,
          f"compose builds the top-level Dockerfile, target {build.get('target')}")
    check(service.get("user", "").endswith(f"{user[0]}:{user[1]}}}") and service.get("ipc") == "host",
          "compose runs as the image's user by default and shares the host's IPC namespace")

    # A bad flag is refused, and the message names it.
    run = subprocess.run([attnd, "--check_config", "--num_kv_heads=3"], capture_output=True, text=True)
    check(run.returncode == 2 and "num_kv_heads" in run.stderr, "a bad value: exit 2, named")
    run = subprocess.run([attnd, "--check_config", "--no_such_flag=1"], capture_output=True, text=True)
    check(run.returncode != 0 and "no_such_flag" in run.stderr, "an unknown flag: refused, named")

    print(f"deploy: {len(passed)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
