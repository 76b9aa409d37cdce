#!/usr/bin/env python3
"""Tests of the Helm chart helm/vigil, run by `cargo xtask chart` and `cargo xtask test`.

Needs (installed by `cargo xtask setup`): helm (env HELM), kubernetes-validate
and PyYAML (this file runs in the venv target/chart-python), promtool
(Debian's prometheus), and a built `vigil` (env VIGIL_BIN) whose
`default-config` the schema is compared with.

For the default values and for each helm/vigil/ci/*-values.yaml:
  * `helm lint --strict` passes;
  * `helm template` renders, and every manifest validates with kubernetes-validate
    (strict: unknown fields fail) against Kubernetes 1.35, except the Prometheus
    Operator kinds, which kubernetes-validate has no schema for: those validate
    against CRD_SCHEMAS below (the fields this chart writes, typed as the
    operator's CRDs type them; unknown fields fail), a kind in neither fails;
  * the DaemonSet has the security properties the chart promises.
Also: values.schema.json rejects bad values at render time (and names them),
its config tables and keys are exactly those `vigil default-config` prints (plus
the optional keys it leaves out), every alert queries only metrics the agent
defines and passes `promtool check rules`, and the chart's copy of the
dashboards equals dashboards/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import tomllib
import unittest
from pathlib import Path

import jsonschema
import yaml
from kubernetes_validate import utils as kubernetes_validate

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "vigil"
sys.path.insert(0, str(ROOT / "dashboards"))
import check_dashboards  # noqa: E402  (the dashboards' metric check, reused for alerts)

KUBERNETES_VERSION = "1.35.0"
RELEASE = "t"
NAMESPACE = "vigil"
VALUES_SETS = {"default": None} | {
    p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))
}
# The capabilities the least-privilege design adds (values.yaml explains each);
# the rendered DaemonSet must add exactly values.yaml's list, and that list these.
INTENDED_CAPABILITIES = {"BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "NET_ADMIN"}
# Config keys `vigil default-config` leaves out because they are unset by default.
OPTIONAL_CONFIG_KEYS = {
    ("agent", "event_log"),
    ("agent", "node_name"),
    ("probes", "cgroup_root"),
    ("probes", "object"),
}
# Alerts issue 18 asks for, by what they watch.
REQUIRED_ALERTS = {
    "VigilAgentDown",
    "VigilSignalDegraded",
    "VigilKernelEventsLost",
    "VigilSeriesBudgetExhausted",
    "VigilRetransmitSpike",
    "VigilListenQueueOverflows",
    "VigilActuationFailingOpen",
}

_STR = {"type": "string"}
_LABELS = {"type": "object", "additionalProperties": _STR}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": _STR, "namespace": _STR, "labels": _LABELS, "annotations": _LABELS},
    "additionalProperties": False,
}
_RELABELING = {
    "type": "object",
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "targetLabel": _STR,
        "regex": _STR,
        "replacement": _STR,
        "separator": _STR,
        "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase", "uppercase", "keepequal", "dropequal"]},
    },
    "additionalProperties": False,
}
_DURATION = {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_ENDPOINT = {
    "type": "object",
    "required": ["port"],
    "properties": {
        "port": _STR,
        "path": _STR,
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array", "items": _RELABELING},
    },
    "additionalProperties": False,
}
_MONITOR_SPEC = {
    "jobLabel": _STR,
    "namespaceSelector": {
        "type": "object",
        "properties": {"matchNames": {"type": "array", "items": _STR}},
        "additionalProperties": False,
    },
    "selector": {
        "type": "object",
        "properties": {"matchLabels": _LABELS},
        "additionalProperties": False,
    },
}


def _crd(api_version: str, kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


# The Prometheus Operator's CRDs, as far as this chart uses them (field names
# and types of monitoring.coreos.com/v1).
CRD_SCHEMAS = {
    "ServiceMonitor": _crd("monitoring.coreos.com/v1", "ServiceMonitor", {
        "type": "object",
        "required": ["selector", "endpoints"],
        "properties": _MONITOR_SPEC | {"endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}},
        "additionalProperties": False,
    }),
    "PodMonitor": _crd("monitoring.coreos.com/v1", "PodMonitor", {
        "type": "object",
        "required": ["selector", "podMetricsEndpoints"],
        "properties": _MONITOR_SPEC | {"podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}},
        "additionalProperties": False,
    }),
    "PrometheusRule": _crd("monitoring.coreos.com/v1", "PrometheusRule", {
        "type": "object",
        "required": ["groups"],
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["name", "rules"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "interval": _DURATION,
                "rules": {"type": "array", "minItems": 1, "items": {
                    "type": "object",
                    "required": ["alert", "expr"],
                    "properties": {
                        "alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]*$"},
                        "expr": {"type": "string", "minLength": 1},
                        "for": _DURATION,
                        "labels": _LABELS,
                        "annotations": _LABELS,
                    },
                    "additionalProperties": False,
                }},
            },
            "additionalProperties": False,
        }}},
        "additionalProperties": False,
    }),
}


def helm_binary() -> str:
    helm = os.environ.get("HELM")
    if not helm or not Path(helm).is_file():
        raise SystemExit(f"test_chart: HELM={helm!r} is not a file; run `cargo xtask setup` (it installs target/tools/helm)")
    return helm


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, cwd=ROOT)


def values_args(values_file: Path | None) -> list[str]:
    return ["-f", str(values_file)] if values_file else []


_RENDERED: dict[str, list[dict]] = {}


def render(name: str) -> list[dict]:
    """The manifests of one values set, parsed (rendered once per run)."""
    if name not in _RENDERED:
        out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values_args(VALUES_SETS[name]))
        if out.returncode != 0:
            raise AssertionError(f"helm template ({name}) failed:\n{out.stderr}")
        _RENDERED[name] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return _RENDERED[name]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def values_yaml() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


class Lint(unittest.TestCase):
    def test_lint_strict(self):
        for name, values_file in VALUES_SETS.items():
            with self.subTest(values=name):
                out = helm("lint", "--strict", str(CHART), *values_args(values_file))
                self.assertEqual(out.returncode, 0, f"helm lint --strict ({name}):\n{out.stdout}\n{out.stderr}")
                self.assertIn("0 chart(s) failed", out.stdout)

    def test_several_values_sets(self):
        self.assertGreaterEqual(len(VALUES_SETS), 3, "helm/vigil/ci/*-values.yaml are missing")


class Validate(unittest.TestCase):
    def test_every_manifest_validates(self):
        for name in VALUES_SETS:
            for doc in render(name):
                kind = doc.get("kind")
                with self.subTest(values=name, kind=kind, name=doc.get("metadata", {}).get("name")):
                    if kind in CRD_SCHEMAS:
                        jsonschema.Draft202012Validator(CRD_SCHEMAS[kind]).validate(doc)
                        continue
                    problem = None
                    try:
                        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
                    except kubernetes_validate.SchemaNotFoundError as e:
                        problem = f"no schema for {kind} ({doc.get('apiVersion')}): {e.message}"
                    except kubernetes_validate.ValidationError as e:
                        problem = f"{kind}: {'.'.join(str(p) for p in e.path)}: {e.message}"
                    self.assertIsNone(problem)

    def test_optional_objects(self):
        kinds = lambda name: sorted({d["kind"] for d in render(name)})  # noqa: E731
        self.assertEqual(kinds("default"), ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "PriorityClass", "Service", "ServiceAccount"])
        self.assertTrue({"ServiceMonitor", "PrometheusRule"} <= set(kinds("all-features")))
        self.assertNotIn("PodMonitor", kinds("all-features"))
        self.assertTrue({"PodMonitor", "PrometheusRule"} <= set(kinds("podmonitor")))
        self.assertFalse({"ServiceMonitor", "Service", "ClusterRole", "PriorityClass"} & set(kinds("podmonitor")))

    def test_the_crd_schemas_refuse_what_the_operator_would(self):
        monitor = one(render("all-features"), "ServiceMonitor")
        bad = json.loads(json.dumps(monitor))
        bad["spec"]["endpoints"][0]["honorLabel"] = True
        with self.assertRaises(jsonschema.ValidationError):
            jsonschema.Draft202012Validator(CRD_SCHEMAS["ServiceMonitor"]).validate(bad)


class Schema(unittest.TestCase):
    # (--set argument, what helm's error must name)
    BAD = [
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("logFormat=xml", "/logFormat"),
        ("serviceMonitr.enabled=true", "serviceMonitr"),
        ("securityContext.privileged=true", "/securityContext/privileged"),
        ("securityContext.allowPrivilegeEscalation=true", "/securityContext/allowPrivilegeEscalation"),
        ("securityContext.capabilities.add={BPF,SYS_ADMIN}", "/securityContext/capabilities/add"),
        ("receiverHostPort=4317", "/receiverHostPort"),
        ("receiverHostPort=70000", "/receiverHostPort"),
        ("priorityClass.value=2000000000", "/priorityClass/value"),
        ("config.probes.ring_buffer_bytes=5000", "/config/probes/ring_buffer_bytes"),
        ("config.probes.ring_bufer_bytes=4096", "ring_bufer_bytes"),
        ("config.agent.metrics_addr=localhost:9464", "/config/agent/metrics_addr"),
        ("config.sampler.interval_ms=fast", "/config/sampler/interval_ms"),
        ("config.actuation.mode=always", "/config/actuation/mode"),
        ("config.actuation.admission_floor=2", "/config/actuation/admission_floor"),
        ("config.nosuchtable.key=1", "nosuchtable"),
        ("prometheusRule.agentDownFor=five", "/prometheusRule/agentDownFor"),
        ("serviceMonitor.interval=30", "/serviceMonitor/interval"),
    ]

    def test_bad_values_fail_at_render(self):
        for setting, field in self.BAD:
            with self.subTest(setting=setting):
                out = helm("template", RELEASE, str(CHART), "--set", setting)
                self.assertNotEqual(out.returncode, 0, f"--set {setting} rendered")
                self.assertIn("don't meet the specifications of the schema", out.stderr)
                self.assertIn(field, out.stderr)

    def test_good_values_render(self):
        # (--set only makes strings of floats: --set-json)
        for setting in ["config.actuation.admission_floor=0.25", "receiverHostPort=0", "config.agent.event_log=null"]:
            with self.subTest(setting=setting):
                out = helm("template", RELEASE, str(CHART), "--set-json", setting)
                self.assertEqual(out.returncode, 0, out.stderr)
        out = helm("template", RELEASE, str(CHART), "--set-json", "config.actuation.admission_floor=0.25")
        self.assertIn("admission_floor = 0.25", out.stdout)

    def test_both_monitors_refused(self):
        out = helm("template", RELEASE, str(CHART), "--set", "serviceMonitor.enabled=true", "--set", "podMonitor.enabled=true")
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("enable one", out.stderr)

    def test_config_keys_are_the_agents(self):
        vigil = os.environ.get("VIGIL_BIN")
        self.assertTrue(vigil and Path(vigil).is_file(), f"VIGIL_BIN={vigil!r}: a built vigil is needed")
        printed = tomllib.loads(subprocess.run([vigil, "default-config"], capture_output=True, text=True, check=True).stdout)
        schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]["properties"]
        self.assertEqual(sorted(schema), sorted(printed), "config tables of values.schema.json vs `vigil default-config`")
        json_type = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}
        for table, fields in printed.items():
            in_schema = schema[table]["properties"]
            expected = set(fields) | {k for t, k in OPTIONAL_CONFIG_KEYS if t == table}
            self.assertEqual(sorted(in_schema), sorted(expected), f"keys of [{table}]")
            for key, value in fields.items():
                types = {s.get("type") for s in in_schema[key]["anyOf"]} | {
                    type(v).__name__ for s in in_schema[key]["anyOf"] for v in s.get("enum", [])
                }
                want = json_type[type(value)]
                ok = want in types or (want == "string" and "str" in types) or (want == "integer" and "int" in types)
                self.assertTrue(ok, f"[{table}] {key} = {value!r}: schema types {types}")


class DaemonSetSecurity(unittest.TestCase):
    def daemonsets(self):
        for name in VALUES_SETS:
            yield name, one(render(name), "DaemonSet")["spec"]["template"]["spec"]

    def test_container_security_context(self):
        listed = values_yaml()["securityContext"]["capabilities"]["add"]
        self.assertEqual(set(listed), INTENDED_CAPABILITIES, "values.yaml's capabilities")
        for name, pod in self.daemonsets():
            with self.subTest(values=name):
                self.assertEqual([c["name"] for c in pod["containers"]], ["agent"])
                self.assertNotIn("initContainers", pod)
                sc = pod["containers"][0]["securityContext"]
                self.assertIs(sc["privileged"], False)
                self.assertIs(sc["allowPrivilegeEscalation"], False)
                self.assertIs(sc["readOnlyRootFilesystem"], True)
                self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
                self.assertEqual(sc["capabilities"]["add"], listed)
                self.assertEqual(sc["seccompProfile"], {"type": "RuntimeDefault"})
                self.assertEqual(sc["runAsUser"], 0, "capabilities reach the effective set only for uid 0")

    def test_host_namespaces_and_paths(self):
        for name, pod in self.daemonsets():
            with self.subTest(values=name):
                self.assertIs(pod["hostPID"], True)
                self.assertIs(pod["hostNetwork"], False)
                self.assertFalse(pod.get("hostIPC", False))
                self.assertIs(pod["enableServiceLinks"], False)
                mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
                host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
                allowed = {"btf": "/sys/kernel/btf", "tracefs": "/sys/kernel/tracing", "cgroup": "/sys/fs/cgroup",
                           "debugfs": "/sys/kernel/debug", "control-socket": "/run/vigil"}
                for vol, path in host.items():
                    self.assertEqual(allowed.get(vol), path, f"hostPath volume {vol}")
                    self.assertEqual(mounts[vol]["mountPath"], path)
                    # The socket directory is the one writable host path.
                    self.assertEqual(mounts[vol].get("readOnly", False), vol != "control-socket", vol)
                self.assertTrue({"btf", "tracefs", "cgroup"} <= set(host))
                self.assertEqual("debugfs" in host, name == "all-features")
                self.assertEqual("control-socket" in host, name != "podmonitor")
                if "control-socket" in host:
                    socket_dir = next(v for v in pod["volumes"] if v["name"] == "control-socket")
                    self.assertEqual(socket_dir["hostPath"]["type"], "DirectoryOrCreate")
                # The query socket lists the node's connections: its directory
                # is the agent's own memory, not a host path pods could mount.
                query = next(v for v in pod["volumes"] if v["name"] == "query-socket")
                self.assertIn("emptyDir", query)
                self.assertEqual(mounts["query-socket"]["mountPath"], "/run/vigil-agent")

    def test_host_ports_only_for_a_running_span_receiver(self):
        for name, pod in self.daemonsets():
            with self.subTest(values=name):
                ports = pod["containers"][0]["ports"]
                host_ports = [(p["name"], p.get("hostPort")) for p in ports if p.get("hostPort")]
                if name == "all-features":  # an OTLP endpoint in extraEnv: the receiver runs
                    self.assertEqual(host_ports, [("otlp-spans", 4319)])
                    spans = next(p for p in ports if p["name"] == "otlp-spans")
                    self.assertEqual(spans["containerPort"], 4319)
                else:  # no traces endpoint: the agent does not run the receiver
                    self.assertEqual(host_ports, [])
                    self.assertNotIn("otlp-spans", [p["name"] for p in ports])
                self.assertFalse({4317, 4318} & {p.get("hostPort") for p in ports})
        # The receiver turned off by OTEL_TRACES_EXPORTER=none publishes nothing either.
        out = helm("template", RELEASE, str(CHART), "-f", str(VALUES_SETS["all-features"]),
                   "--set-json", 'extraEnv=[{"name":"OTEL_EXPORTER_OTLP_ENDPOINT","value":"http://c:4317"},{"name":"OTEL_TRACES_EXPORTER","value":"none"}]')
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertNotIn("hostPort", out.stdout)

    def test_probes(self):
        for name, pod in self.daemonsets():
            with self.subTest(values=name):
                agent = pod["containers"][0]
                self.assertEqual(agent["startupProbe"]["httpGet"], {"path": "/", "port": "metrics"})
                self.assertGreaterEqual(agent["startupProbe"]["periodSeconds"] * agent["startupProbe"]["failureThreshold"], 60)
                self.assertEqual(agent["readinessProbe"]["httpGet"]["path"], "/healthz")
                self.assertEqual(agent["livenessProbe"]["httpGet"]["path"], "/")
                self.assertIn("metrics", [p["name"] for p in agent["ports"]])

    def test_priority_class(self):
        default = render("default")
        pod = one(default, "DaemonSet")["spec"]["template"]["spec"]
        pc = one(default, "PriorityClass")
        self.assertEqual(pod["priorityClassName"], pc["metadata"]["name"])
        self.assertNotIn(pc["metadata"]["name"], ("system-node-critical", "system-cluster-critical"))
        self.assertLessEqual(pc["value"], 1_000_000_000, "user-defined classes stay below the system range")
        self.assertIs(pc["globalDefault"], False)
        pod = one(render("podmonitor"), "DaemonSet")["spec"]["template"]["spec"]
        self.assertEqual(pod["priorityClassName"], "system-node-critical")

    def test_default_image_is_the_one_xtask_builds(self):
        chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
        agent = one(render("default"), "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(agent["image"], f"{values_yaml()['image']['repository']}:{chart['appVersion']}")
        self.assertEqual(agent["command"], ["vigil"])


class Monitors(unittest.TestCase):
    def check_endpoint(self, endpoint: dict):
        self.assertIs(endpoint["honorLabels"], True)
        self.assertEqual(endpoint["port"], "metrics")
        relabel = endpoint["relabelings"]
        self.assertIn({"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}, relabel)
        self.assertIn({"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "agent_pod"}, relabel)
        drops = [r["regex"] for r in relabel if r.get("action") == "labeldrop"]
        self.assertEqual(len(drops), 1)
        import re
        for label in ("namespace", "pod"):
            self.assertTrue(re.fullmatch(drops[0], label), f"{label} target label kept")
        for label in ("node", "agent_pod", "job", "instance"):
            self.assertFalse(re.fullmatch(drops[0], label), f"{label} dropped")
        # The drop comes after the copies (relabelling runs in order).
        self.assertEqual(relabel[-1].get("action"), "labeldrop")

    def test_service_monitor_selects_the_metrics_service(self):
        docs = render("all-features")
        monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
        self.assertEqual(monitor["spec"]["namespaceSelector"]["matchNames"], [NAMESPACE])
        for k, v in monitor["spec"]["selector"]["matchLabels"].items():
            self.assertEqual(service["metadata"]["labels"].get(k), v)
        self.assertIn("metrics", [p["name"] for p in service["spec"]["ports"]])
        self.assertIn(monitor["spec"]["jobLabel"], service["metadata"]["labels"])
        self.assertEqual(monitor["metadata"]["labels"]["release"], "kube-prometheus-stack")
        for endpoint in monitor["spec"]["endpoints"]:
            self.check_endpoint(endpoint)

    def test_pod_monitor_selects_the_agent_pods(self):
        docs = render("podmonitor")
        monitor, ds = one(docs, "PodMonitor"), one(docs, "DaemonSet")
        labels = ds["spec"]["template"]["metadata"]["labels"]
        for k, v in monitor["spec"]["selector"]["matchLabels"].items():
            self.assertEqual(labels.get(k), v)
        self.assertIn(monitor["spec"]["jobLabel"], labels)
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            self.check_endpoint(endpoint)


class Alerts(unittest.TestCase):
    def rules(self) -> list[dict]:
        rule = one(render("all-features"), "PrometheusRule")
        return [r for g in rule["spec"]["groups"] for r in g["rules"]]

    def test_required_alerts_exist(self):
        self.assertTrue(REQUIRED_ALERTS <= {r["alert"] for r in self.rules()})

    def test_alerts_use_only_metrics_the_agent_defines(self):
        declared = check_dashboards.declared_metrics(check_dashboards.source_files(ROOT / "agent" / "src"))
        self.assertIn("vigil_signal_degraded", declared)
        for rule in self.rules():
            names = check_dashboards.metric_names(rule["expr"])
            with self.subTest(alert=rule["alert"]):
                if "up{" not in rule["expr"]:
                    self.assertTrue(names, "no vigil_ metric in the expression")
                for name in names:
                    self.assertTrue(check_dashboards.is_declared(name, declared),
                                    check_dashboards.undeclared_message(rule["alert"], name, declared))
        # The checker is not blind: a name the agent does not define is refused.
        self.assertFalse(check_dashboards.is_declared("vigil_hooks_active", declared))

    def test_promtool_accepts_the_rules(self):
        for name in ("all-features", "podmonitor"):
            rule = one(render(name), "PrometheusRule")
            with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
                yaml.safe_dump({"groups": rule["spec"]["groups"]}, f)
                f.flush()
                out = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
                self.assertEqual(out.returncode, 0, f"promtool ({name}):\n{out.stdout}\n{out.stderr}")
                self.assertIn(f"SUCCESS: {len([r for g in rule['spec']['groups'] for r in g['rules']])} rules found", out.stdout)


class Dashboards(unittest.TestCase):
    def test_chart_copy_equals_dashboards(self):
        source = {p.name: p.read_bytes() for p in (ROOT / "dashboards").glob("*.json")}
        copy = {p.name: p.read_bytes() for p in (CHART / "dashboards").glob("*.json")}
        self.assertTrue(source)
        self.assertEqual(sorted(copy), sorted(source), "helm/vigil/dashboards/ vs dashboards/: cp dashboards/*.json helm/vigil/dashboards/")
        for name in source:
            self.assertEqual(copy[name], source[name], f"helm/vigil/dashboards/{name} differs from dashboards/{name}: cp dashboards/*.json helm/vigil/dashboards/")

    def test_configmap_for_the_sidecar(self):
        cm = next(d for d in of_kind(render("all-features"), "ConfigMap") if d["metadata"]["name"].endswith("-dashboards"))
        self.assertEqual(cm["metadata"]["labels"]["grafana_dashboard"], "1")
        self.assertEqual(cm["metadata"]["namespace"], "monitoring")
        self.assertEqual(sorted(cm["data"]), sorted(p.name for p in (ROOT / "dashboards").glob("*.json")))
        for name, text in cm["data"].items():
            self.assertEqual(json.loads(text), json.loads((ROOT / "dashboards" / name).read_text()), name)
        self.assertFalse([d for d in of_kind(render("default"), "ConfigMap") if d["metadata"]["name"].endswith("-dashboards")])


if __name__ == "__main__":
    helm_binary()
    result = unittest.main(argv=[sys.argv[0], "-v"], exit=False).result
    sys.exit(0 if result.wasSuccessful() and result.testsRun > 0 else 1)
