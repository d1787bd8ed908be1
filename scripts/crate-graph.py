#!/usr/bin/env python3
"""The workspace's crate graph, drawn from `cargo metadata` (read from stdin).

Prints a markdown block: each workspace crate, its folder, and the workspace crates it depends
on (normal and build dependencies). ARCHITECTURE.md holds this block between its crate-graph
markers; scripts/check-boundaries.sh fails when the two differ. `--count` adds how many packages
each crate builds on (transitively), which changes with every lock update, so it is not part of
the checked block.

    cargo metadata --format-version 1 --locked --offline \
        --filter-platform x86_64-unknown-linux-gnu | python3 scripts/crate-graph.py [--count]
"""
import json
import os
import sys


def main() -> None:
    meta = json.load(sys.stdin)
    packages = {p["id"]: p for p in meta["packages"]}
    members = [packages[i] for i in meta["workspace_members"]]
    member_names = {p["name"] for p in members}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = meta["workspace_root"].rstrip("/")

    def normal_deps(node_id):
        for d in nodes[node_id]["deps"]:
            if any(k["kind"] in (None, "build") for k in d["dep_kinds"]):
                yield d["pkg"]

    def closure(start):
        seen, todo = set(), [start]
        while todo:
            for dep in normal_deps(todo.pop()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    lines = ["```mermaid", "graph TD"]
    count = "--count" in sys.argv[1:]
    head = "| crate | path | depends on (workspace) |" + (" packages it builds on |" if count else "")
    table = ["", head, "|---|---|---|" + ("---|" if count else "")]
    for p in sorted(members, key=lambda p: p["name"]):
        path = os.path.relpath(os.path.dirname(p["manifest_path"]), root)
        node = p["name"].replace("-", "_")
        inner = sorted(
            packages[d]["name"] for d in normal_deps(p["id"]) if packages[d]["name"] in member_names
        )
        lines.append(f'    {node}["{p["name"]}"]')
        for dep in inner:
            lines.append(f"    {node} --> {dep.replace('-', '_')}")
        row = f"| `{p['name']}` | `{path}` | {', '.join(f'`{d}`' for d in inner) or 'none'} |"
        if count:
            row += f" {len(closure(p['id']))} |"
        table.append(row)
    lines.append("```")
    print("\n".join(lines + table))


if __name__ == "__main__":
    main()
