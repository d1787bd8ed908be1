"""Check the least-privilege shape of compose.yaml, as `docker-compose config` resolves it (with
the cluster profile's nodes): no broker port is published, every Vigil service runs with
separate broker roles and reads its broker URL from a file in a volume that no other service
mounts, that volume holds the URL of the service's own broker user (the one `broker-users`
writes into it), only the console holds the operator role's URL, the audit writer signs with a
key no other service mounts while the console checks under its public half, the evidence
volume is the audit writer's alone (the console reads the trail through its read API, with a
token only the two mount), and no password is written in the file.

Run with Debian's python3, which docker-compose's own PyYAML comes with:
    docker-compose --profile cluster -f compose.yaml config | /usr/bin/python3 scripts/check-compose.py
"""

import re
import sys

import yaml

SERVICES = {"edge-1", "edge-2", "console", "worker", "audit"}
# The broker user each service must run as (`vigil broker provision` writes each user's URL to
# /out/<user>/amqp.url), and the one the console's admin API speaks as.
NAMESPACE = "vigil"
USER_OF = {
    "worker": f"{NAMESPACE}-worker",
    "audit": f"{NAMESPACE}-audit",
    "edge-1": f"{NAMESPACE}-edge-edge-1",
    "edge-2": f"{NAMESPACE}-edge-edge-2",
    "console": f"{NAMESPACE}-edge-console",
}
OPERATOR_USER = f"{NAMESPACE}-operator"
CLUSTER_NODES = {"rabbitmq", "rabbitmq-2", "rabbitmq-3"}
BROKER_PORTS = {5672, 5671, 15672, 15671, 25672, 4369}

config = yaml.safe_load(sys.stdin)
services = config["services"]
problems = []


def env_of(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def volumes_of(service):
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v.get("source"), v.get("target")
        out[target] = source
    return out


for name, service in services.items():
    for port in service.get("ports") or []:
        published = port.get("target") if isinstance(port, dict) else int(str(port).split(":")[-1])
        if int(published) in BROKER_PORTS:
            problems.append(f"{name} publishes broker port {published}")
    for key, value in env_of(service).items():
        if value and re.search(r"://[^/@\s]+:[^/@\s]+@", str(value)):
            problems.append(f"{name}: {key} carries a password in the open")
        if key in {"RABBITMQ_DEFAULT_PASS", "RABBITMQ_ERLANG_COOKIE", "POSTGRES_PASSWORD"}:
            problems.append(f"{name}: {key} is a secret in the environment")

broker_volume = {}
for name in sorted(SERVICES):
    service = services.get(name)
    if service is None:
        problems.append(f"no {name} service")
        continue
    env = env_of(service)
    if env.get("VIGIL_BROKER_ROLES") != "separate":
        problems.append(f"{name} does not run with separate broker roles")
    if "VIGIL_AMQP_URL" in env or env.get("VIGIL_AMQP_URL_FILE") != "/run/vigil/broker/amqp.url":
        problems.append(f"{name} does not read its broker URL from /run/vigil/broker/amqp.url")
    source = volumes_of(service).get("/run/vigil/broker")
    if not source:
        problems.append(f"{name} mounts no broker volume at /run/vigil/broker")
    broker_volume[name] = source
    holds_admin = "VIGIL_ADMIN_AMQP_URL_FILE" in env or "VIGIL_ADMIN_AMQP_URL" in env
    if holds_admin != (name == "console"):
        problems.append(f"{name}: only the console holds the admin role's URL")
    if "VIGIL_ADMIN_LISTEN" in env and name != "console":
        problems.append(f"{name} serves the admin API, which only the console does")

# One user per role and per edge: each broker volume is mounted by one Vigil service (the
# worker's replicas share it), and by no other service but the one that writes them.
for name, source in broker_volume.items():
    others = [
        other
        for other, service in services.items()
        if other not in (name, "broker-users") and source in volumes_of(service).values()
    ]
    if others:
        problems.append(f"{name}'s broker volume {source} is also mounted by {', '.join(others)}")
if len(set(broker_volume.values())) != len(broker_volume):
    problems.append(f"services share a broker user: {broker_volume}")

# Whose URL is in each volume: the user whose folder `broker-users` mounts it at.
provisioned = {
    source: target.removeprefix("/out/")
    for target, source in volumes_of(services.get("broker-users", {})).items()
    if target.startswith("/out/")
}
if env_of(services.get("broker-users", {})).get("VIGIL_NAMESPACE") != NAMESPACE:
    problems.append(f"broker-users does not provision the {NAMESPACE} namespace")
for name, source in broker_volume.items():
    user = provisioned.get(source)
    if user != USER_OF[name]:
        problems.append(f"{name}'s broker volume {source} holds the URL of {user}, not {USER_OF[name]}")
console = services.get("console", {})
operator_file = env_of(console).get("VIGIL_ADMIN_AMQP_URL_FILE", "")
operator_source = volumes_of(console).get(operator_file.rsplit("/", 1)[0])
if provisioned.get(operator_source) != OPERATOR_USER:
    problems.append(
        f"the console's admin link reads {operator_file} from {operator_source}, which holds the "
        f"URL of {provisioned.get(operator_source)}, not {OPERATOR_USER}"
    )
# The trail is signed: the writer holds the private key, in a volume no other Vigil service
# mounts, and the console checks every view under the public key.
audit = services.get("audit", {})
key_file = env_of(audit).get("VIGIL_AUDIT_KEY", "")
key_source = volumes_of(audit).get(key_file.rsplit("/", 1)[0]) if key_file else None
if not key_source:
    problems.append("the audit writer signs nothing: no VIGIL_AUDIT_KEY in a volume of its own")
else:
    readers = [
        other
        for other, service in services.items()
        if other not in ("audit", "audit-key") and key_source in volumes_of(service).values()
    ]
    if readers:
        problems.append(f"the audit writer's private key volume {key_source} is also mounted by {', '.join(readers)}")
if not env_of(console).get("VIGIL_AUDIT_PUBLIC_KEY"):
    problems.append("the console checks the trail without the writer's public key (VIGIL_AUDIT_PUBLIC_KEY)")
# Services share nothing but the broker: the evidence volume is the audit writer's alone, and
# the console reads the trail through its read API, with a token only the two of them mount.
evidence_file = env_of(audit).get("VIGIL_EVIDENCE_DIR", "")
evidence_source = volumes_of(audit).get(evidence_file)
if not evidence_source:
    problems.append("the audit writer keeps its evidence in no volume (VIGIL_EVIDENCE_DIR)")
else:
    others = [o for o, svc in services.items() if o != "audit" and evidence_source in volumes_of(svc).values()]
    if others:
        problems.append(f"the evidence volume {evidence_source} is also mounted by {', '.join(others)}")
for name in SERVICES - {"audit"}:
    if "VIGIL_EVIDENCE_DIR" in env_of(services.get(name, {})):
        problems.append(f"{name} sets VIGIL_EVIDENCE_DIR: only the audit writer reads its folder")
if not env_of(audit).get("VIGIL_AUDIT_API_LISTEN"):
    problems.append("the audit writer serves no read API (VIGIL_AUDIT_API_LISTEN) for the console")
if not env_of(console).get("VIGIL_AUDIT_API_URL"):
    problems.append("the console reads no audit trail (VIGIL_AUDIT_API_URL)")
# The API speaks HTTPS; its key and token sit in a volume only the writer mounts, and the
# console's copy of the token in one only the console mounts.
if not (env_of(audit).get("VIGIL_AUDIT_API_TLS_CERT") and env_of(audit).get("VIGIL_AUDIT_API_TLS_KEY")):
    problems.append("the audit writer's read API speaks plain HTTP (VIGIL_AUDIT_API_TLS_CERT, _KEY)")
if not env_of(console).get("VIGIL_AUDIT_API_URL", "").startswith("https://"):
    problems.append("the console reads the audit trail over plain HTTP")
for name, allowed in (("audit", {"audit", "audit-key"}), ("console", {"console", "audit-key"})):
    token_file = env_of(services.get(name, {})).get("VIGIL_AUDIT_API_TOKEN_FILE", "")
    source = volumes_of(services.get(name, {})).get(token_file.rsplit("/", 1)[0]) if token_file else None
    if not source:
        problems.append(f"{name} holds no read API token file in a volume (VIGIL_AUDIT_API_TOKEN_FILE)")
        continue
    holders = {o for o, svc in services.items() if source in volumes_of(svc).values()}
    if holders - allowed:
        problems.append(f"{name}'s read API volume {source} is also mounted by {', '.join(sorted(holders - allowed))}")
missing_nodes = CLUSTER_NODES - set(services)
if missing_nodes:
    problems.append(f"no {', '.join(sorted(missing_nodes))}: run with --profile cluster")

provision = services.get("broker-users", {}).get("command") or []
for edge in ("edge-1", "edge-2", "console"):
    if f"--edge" not in provision or edge not in provision:
        problems.append(f"broker-users makes no user for edge {edge}")

if problems:
    print("compose.yaml:", file=sys.stderr)
    for p in problems:
        print("  " + p, file=sys.stderr)
    sys.exit(1)
print(f"compose.yaml: {len(broker_volume)} services, each its own broker user; no broker port published")
