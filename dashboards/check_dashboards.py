#!/usr/bin/env python3
"""Offline check of the Grafana dashboards in this directory (python3 stdlib only).

For every dashboards/*.json it verifies that:
  * the file is valid JSON and holds a dashboard (a "panels" list);
  * every panel, including panels nested in rows, has an integer id, unique
    within the dashboard; dashboard uids are unique across files;
  * every metric name used in a panel query or a template variable query
    (a token starting with `vigil_`, outside quoted strings) is one the agent
    declares with a `# TYPE <name> <type>` line in a .rs file under agent/src
    (searched recursively: metrics.rs, socket_health.rs, ...); a name ending in
    _bucket, _sum or _count also passes when its base name is a histogram or
    summary;
  * every panel title and query is listed in dashboards/README.md.

A metric counts as declared when a .rs file under agent/src either has a
literal `# TYPE <name> <type>` line, or some file writes its `# TYPE` lines from
a format string ("# TYPE {name} ...") and this file has <name> as a complete
string literal ("<name>") outside its test module. The second form is how the
agent declares most metrics (names are passed to a helper in metrics.rs that
writes "# HELP {name} ...\n# TYPE {name} {kind}"); a literal-only grep would
miss every one of them. The type of such a name is the first type literal
("counter", "gauge", "histogram", "summary", "untyped") that follows it in the
same file, as in `let name = "vigil_x_seconds"; x.family(name, "histogram", ..)`
or an array of names followed by one `x.family(name, "counter", help)`; only a
histogram or summary name passes with the _bucket/_sum/_count suffixes.
Limitation: any other string literal that starts with vigil_ (e.g. a kernel
program name) also passes, as a metric of unknown type.

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
# A metric name literal, or a metric type literal (the kind passed to the helper).
NAME_OR_KIND_LITERAL = re.compile(r'"(vigil_[A-Za-z0-9_:]+)"|"(counter|gauge|histogram|summary|untyped)"')
TEST_MODULE = "#[cfg(test)]"
# Series a histogram or summary named NAME exposes besides NAME itself.
DERIVED_SUFFIXES = ("_bucket", "_sum", "_count")
# Type of a name literal that no type literal follows in its file.
UNKNOWN_KIND = "unknown"


def source_files(src_dir: Path) -> list[Path]:
    """Every .rs file under agent/src, recursively, in a stable order."""
    return sorted(src_dir.rglob("*.rs"))


def declared_metrics(src_files: list[Path]) -> dict[str, str]:
    """Metric name -> type ("counter", "gauge", "histogram", ..., or "unknown")
    for the agent's sources, test modules excluded."""
    codes = [f.read_text(encoding="utf-8").split(TEST_MODULE, 1)[0] for f in src_files]
    declared: dict[str, str] = {}
    for code in codes:
        for name, kind in LITERAL_TYPE_LINE.findall(code):
            declared.setdefault(name, kind)
    if any(TEMPLATED_TYPE_LINE.search(code) for code in codes):
        untyped: list[str] = []
        for code in codes:
            pending: list[str] = []
            for name, kind in NAME_OR_KIND_LITERAL.findall(code):
                if name:
                    pending.append(name)
                    continue
                for n in pending:
                    declared.setdefault(n, kind)
                pending = []
            untyped.extend(pending)
        # Last, so a type found in any file wins over a bare mention in another.
        for n in untyped:
            declared.setdefault(n, UNKNOWN_KIND)
    return declared


def metric_names(expr: str) -> set[str]:
    """`vigil_` tokens of a PromQL expression (or label_values(...) query), outside quotes."""
    return set(METRIC_TOKEN.findall(QUOTED.sub('""', expr)))


def histogram_base(name: str, declared: dict[str, str]) -> str | None:
    """NAME when `name` is NAME_bucket/_sum/_count and NAME is declared (any type)."""
    for suffix in DERIVED_SUFFIXES:
        base = name[: -len(suffix)] if name.endswith(suffix) else None
        if base and base in declared:
            return base
    return None


def is_declared(name: str, declared: dict[str, str]) -> bool:
    if name in declared:
        return True
    base = histogram_base(name, declared)
    return base is not None and declared[base] in ("histogram", "summary")


def undeclared_message(where: str, name: str, declared: dict[str, str]) -> str:
    base = histogram_base(name, declared)
    if base is not None:
        return (
            f"{where} uses {name}, but agent/src declares {base} as a {declared[base]}, "
            f"not a histogram or summary (no '# TYPE {name}' line)"
        )
    return f"{where} uses {name}, which agent/src does not declare (no '# TYPE {name}' line)"


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
                    problems.append(undeclared_message(f"{path.name}: panel {title!r}", name, declared))
            if readme is not None and expr not in readme:
                problems.append(f"{path.name}: the query of panel {title!r} is not in dashboards/README.md: {expr}")

    for var_name, query in variable_queries(dashboard):
        for name in sorted(metric_names(query)):
            if not is_declared(name, declared):
                problems.append(undeclared_message(f"{path.name}: template variable ${var_name}", name, declared))
    return problems


def main() -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=here.parent, help="repository root (default: this file's parent's parent)")
    args = parser.parse_args()
    root: Path = args.root.resolve()
    dashboards_dir = root / "dashboards"
    src_dir = root / "agent" / "src"

    src_files = source_files(src_dir) if src_dir.is_dir() else []
    if not (src_dir / "metrics.rs").is_file():
        print(f"check_dashboards: {src_dir / 'metrics.rs'} not found (wrong --root?)", file=sys.stderr)
        return 1
    declared = declared_metrics(src_files)
    if not declared:
        print(f"check_dashboards: no '# TYPE vigil_...' declarations found in {src_dir}/**/*.rs", file=sys.stderr)
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
    typed = sum(kind != UNKNOWN_KIND for kind in declared.values())
    print(
        f"check_dashboards: {len(files)} dashboard(s) OK; {typed} metrics declared "
        f"in {len(src_files)} file(s) under agent/src"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
