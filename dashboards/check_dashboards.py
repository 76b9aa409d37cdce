#!/usr/bin/env python3
"""Offline check of the Grafana dashboards in this directory (python3 stdlib only).

For every dashboards/*.json it verifies that:
  * the file is valid JSON and holds a dashboard (a "panels" list);
  * every panel, including panels nested in rows, has an integer id, unique
    within the dashboard; dashboard uids are unique across files;
  * every metric name used in a panel query or a template variable query
    (a token starting with `vigil_`, outside quoted strings) is one the agent
    declares with a `# TYPE <name> <type>` line in agent/src/metrics.rs;
  * every panel title and query is listed in dashboards/README.md.

A metric counts as declared when agent/src/metrics.rs either has a literal
`# TYPE <name> <type>` line, or writes its `# TYPE` lines from a format string
("# TYPE {name} ...") and has <name> as a complete string literal ("<name>")
outside its test module. The second form is how the file declares most metrics
(names are passed to a helper that writes "# HELP {name} ...\n# TYPE {name} ...");
a literal-only grep would miss every one of them. Limitation: any other string
literal that starts with vigil_ (e.g. a kernel program name) also passes.

Usage: python3 dashboards/check_dashboards.py [--root REPO_ROOT]
Exits 0 when everything holds, 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

METRIC_TOKEN = re.compile(r"(?<![A-Za-z0-9_:])vigil_[A-Za-z0-9_:]*")
# Quoted strings in PromQL: label values and regexes, never metric names.
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
LITERAL_TYPE_LINE = re.compile(r"#\s*TYPE\s+(vigil_[A-Za-z0-9_:]+)\s+(counter|gauge|histogram|summary|untyped)\b")
# A `# TYPE` line written from a format string: "# TYPE {name} counter", "# TYPE {name} {kind}".
TEMPLATED_TYPE_LINE = re.compile(r"#\s*TYPE\s+\{[A-Za-z0-9_]*\}")
NAME_LITERAL = re.compile(r'"(vigil_[A-Za-z0-9_:]+)"')
TEST_MODULE = "#[cfg(test)]"
# Series a histogram or summary named NAME exposes besides NAME itself.
DERIVED_SUFFIXES = ("_bucket", "_sum", "_count")


def declared_metrics(metrics_rs: Path) -> dict[str, str]:
    """Metric name -> type for agent/src/metrics.rs. The type is "declared" when
    the name reaches a templated `# TYPE` line; then "declared+histogram" if the
    file writes histograms or summaries at all (their _bucket/_sum/_count series)."""
    text = metrics_rs.read_text(encoding="utf-8")
    code = text.split(TEST_MODULE, 1)[0]
    declared = {name: kind for name, kind in LITERAL_TYPE_LINE.findall(code)}
    if TEMPLATED_TYPE_LINE.search(code):
        kind = "declared+histogram" if ('"histogram"' in code or '"summary"' in code) else "declared"
        for name in NAME_LITERAL.findall(code):
            declared.setdefault(name, kind)
    return declared


def metric_names(expr: str) -> set[str]:
    """`vigil_` tokens of a PromQL expression (or label_values(...) query), outside quotes."""
    return set(METRIC_TOKEN.findall(QUOTED.sub('""', expr)))


def is_declared(name: str, declared: dict[str, str]) -> bool:
    if name in declared:
        return True
    for suffix in DERIVED_SUFFIXES:
        base = name[: -len(suffix)] if name.endswith(suffix) else None
        if base and declared.get(base) in ("histogram", "summary", "declared+histogram"):
            return True
    return False


def walk_panels(panels: list) -> list[dict]:
    """Every panel, rows' nested panels included, in document order."""
    out = []
    for p in panels:
        if isinstance(p, dict):
            out.append(p)
            out.extend(walk_panels(p.get("panels") or []))
    return out


def variable_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(variable name, query text) of every query-type template variable."""
    out = []
    for var in (dashboard.get("templating") or {}).get("list") or []:
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        for text in (query, var.get("definition")):
            if isinstance(text, str) and text:
                out.append((var.get("name", "?"), text))
    return out


def check_dashboard(path: Path, declared: dict[str, str], readme: str | None, uids: dict[str, Path]) -> list[str]:
    problems: list[str] = []
    try:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return [f"{path.name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"]
    if not isinstance(dashboard, dict) or not isinstance(dashboard.get("panels"), list):
        return [f"{path.name}: not a Grafana dashboard (no top-level \"panels\" list)"]

    uid = dashboard.get("uid")
    if uid in uids:
        problems.append(f"{path.name}: dashboard uid {uid!r} is also used by {uids[uid].name}")
    elif uid:
        uids[uid] = path

    seen_ids: dict[int, str] = {}
    for panel in walk_panels(dashboard["panels"]):
        title = panel.get("title") or "(untitled)"
        pid = panel.get("id")
        if not isinstance(pid, int) or isinstance(pid, bool):
            problems.append(f"{path.name}: panel {title!r} has no integer id (id={pid!r})")
        elif pid in seen_ids:
            problems.append(f"{path.name}: panel id {pid} is used by both {seen_ids[pid]!r} and {title!r}")
        else:
            seen_ids[pid] = title
        if readme is not None and panel.get("type") != "row" and title not in readme:
            problems.append(f"{path.name}: panel {title!r} is not listed in dashboards/README.md")
        for target in panel.get("targets") or []:
            expr = target.get("expr")
            if expr is None:
                continue
            if not isinstance(expr, str) or not expr.strip():
                problems.append(f"{path.name}: panel {title!r} target {target.get('refId', '?')} has an empty expr")
                continue
            for name in sorted(metric_names(expr)):
                if not is_declared(name, declared):
                    problems.append(
                        f"{path.name}: panel {title!r} uses {name}, which agent/src/metrics.rs does not declare "
                        f"(no '# TYPE {name}' line)"
                    )
            if readme is not None and expr not in readme:
                problems.append(f"{path.name}: the query of panel {title!r} is not in dashboards/README.md: {expr}")

    for var_name, query in variable_queries(dashboard):
        for name in sorted(metric_names(query)):
            if not is_declared(name, declared):
                problems.append(
                    f"{path.name}: template variable ${var_name} uses {name}, which agent/src/metrics.rs does not "
                    f"declare (no '# TYPE {name}' line)"
                )
    return problems


def main() -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=here.parent, help="repository root (default: this file's parent's parent)")
    args = parser.parse_args()
    root: Path = args.root.resolve()
    dashboards_dir = root / "dashboards"
    metrics_rs = root / "agent" / "src" / "metrics.rs"

    if not metrics_rs.is_file():
        print(f"check_dashboards: {metrics_rs} not found (wrong --root?)", file=sys.stderr)
        return 1
    declared = declared_metrics(metrics_rs)
    if not declared:
        print(f"check_dashboards: no '# TYPE vigil_...' declarations found in {metrics_rs}", file=sys.stderr)
        return 1

    files = sorted(dashboards_dir.glob("*.json"))
    if not files:
        print(f"check_dashboards: no dashboards (*.json) in {dashboards_dir}", file=sys.stderr)
        return 1
    readme_path = dashboards_dir / "README.md"
    readme = readme_path.read_text(encoding="utf-8") if readme_path.is_file() else None
    problems: list[str] = []
    if readme is None:
        problems.append("dashboards/README.md is missing: it must list every panel and its query")

    uids: dict[str, Path] = {}
    for path in files:
        problems.extend(check_dashboard(path, declared, readme, uids))

    if problems:
        print(f"check_dashboards: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"check_dashboards: {len(files)} dashboard(s) OK; {len(declared)} metrics declared in agent/src/metrics.rs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
