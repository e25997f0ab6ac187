#!/usr/bin/env python3
"""Module-level import cycles inside each crate of the workspace.

Cargo refuses a cycle between crates; inside a crate nothing stops module A
from using module B while B uses A. This script builds, for each crate under
crates/, the graph "module M names an item of module N" from the source
(`use` trees and inline `crate::` / `super::` / `self::` paths, with
re-exports followed to the module that defines the item) and prints every
cycle (strongly connected component of more than one module). Exit code 1
if there is any.

Test code is left out by default (`#[cfg(test)]` items and modules, which
may reach into whatever they test); `--tests` includes it. Comments and
string literals are ignored. A module is a file (`foo.rs`, `foo/mod.rs`);
inline modules belong to their file's module.

Usage: scripts/module_cycles.py [--tests] [--edges] [CRATE_DIR...]
"""

import re
import sys
from pathlib import Path

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_comments_and_strings(text):
    """Blanks out comments, string and char literals (keeps newlines)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not re.match(r"[A-Za-z0-9_]", text[i - 1])):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            end = n if end < 0 else end + 1 + len(hashes)
            out.append(re.sub(r"[^\n]", " ", text[i:end]))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", text[i : j + 1]))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:]):
            m = re.match(r"'(\\.|[^\\'])'", text[i:])
            out.append(" " * len(m.group(0)))
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def block_end(text, start):
    """Index just past the brace block opening at or after `start`."""
    i = text.index("{", start)
    depth = 0
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def drop_test_code(text):
    """Removes `#[cfg(test)]` items; returns (text, test-only file modules)."""
    test_modules = set()
    while True:
        m = re.search(r"#\[cfg\(test\)\]", text)
        if not m:
            return text, test_modules
        rest = text[m.end() :]
        decl = re.match(r"\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", rest)
        if decl:
            test_modules.add(decl.group(1))
            end = m.end() + decl.end()
        else:
            semi = rest.find(";")
            brace = rest.find("{")
            if brace < 0 or (0 <= semi < brace):
                end = m.end() + semi + 1
            else:
                end = block_end(text, m.end() + brace)
        text = text[: m.start()] + re.sub(r"[^\n]", " ", text[m.start() : end]) + text[end:]


def expand_use_tree(tree):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e] (aliases dropped)."""
    tree = re.sub(r"\s+as\s+" + IDENT, "", tree)
    tree = re.sub(r"\s+", "", tree)
    depth = 0
    for i, ch in enumerate(tree):
        if ch == "{":
            if depth == 0:
                prefix = tree[:i]
                inner = tree[i + 1 : tree.rindex("}")]
                parts, start, d = [], 0, 0
                for j, c in enumerate(inner):
                    if c == "{":
                        d += 1
                    elif c == "}":
                        d -= 1
                    elif c == "," and d == 0:
                        parts.append(inner[start:j])
                        start = j + 1
                parts.append(inner[start:])
                out = []
                for part in parts:
                    if not part:
                        continue
                    if part == "self":
                        out.append(prefix.rstrip(":"))
                    else:
                        out.extend(expand_use_tree(prefix + part))
                return out
            depth += 1
    return [tree]


class Crate:
    def __init__(self, src, with_tests):
        self.src = src
        self.with_tests = with_tests
        self.modules = {}  # path tuple -> cleaned code
        self.reexports = {}  # module -> {name: full path segments}
        self.load(src / ("lib.rs" if (src / "lib.rs").exists() else "main.rs"), ())

    def child_file(self, dir_, name):
        for candidate in (dir_ / f"{name}.rs", dir_ / name / "mod.rs"):
            if candidate.exists():
                return candidate
        return None

    def load(self, path, module):
        text = strip_comments_and_strings(path.read_text())
        tests = set()
        if not self.with_tests:
            text, tests = drop_test_code(text)
        self.modules[module] = text
        is_dir_module = path.name in ("lib.rs", "main.rs", "mod.rs")
        dir_ = path.parent if is_dir_module else path.parent / path.stem
        # A `#[path]` attribute points a module elsewhere (none in the crates).
        for m in re.finditer(r"(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", text):
            name = m.group(1)
            if name in tests:
                continue
            child = self.child_file(dir_, name)
            if child:
                self.load(child, module + (name,))
        reexports = {}
        for m in re.finditer(r"pub(?:\([^)]*\))?\s+use\s+([^;]+);", text):
            for path_ in expand_use_tree(m.group(1)):
                segs = path_.split("::")
                reexports[segs[-1]] = segs
        self.reexports[module] = reexports

    def resolve(self, module, segs, depth=0, inline=0):
        """The module defining what `segs` (as written in `module`, `inline`
        inline modules deep) names."""
        if not segs:
            return None
        if segs[0] == "crate":
            cur, rest = (), segs[1:]
        elif segs[0] in ("super", "self"):
            cur, rest = module, segs
            # `super` inside an inline module first leaves the inline ones.
            while inline and rest and rest[0] == "super":
                inline, rest = inline - 1, rest[1:]
            while rest and rest[0] in ("super", "self"):
                if rest[0] == "super":
                    cur = cur[:-1]
                rest = rest[1:]
        elif segs[0] in [s[-1] for s in self.modules if len(s) == len(module) + 1 and s[:-1] == module]:
            cur, rest = module, segs  # a child module named without `self::`
        else:
            return None  # another crate, std, or a local item
        while rest and cur + (rest[0],) in self.modules:
            cur, rest = cur + (rest[0],), rest[1:]
        if rest and depth < 8:
            target = self.reexports.get(cur, {}).get(rest[0])
            if target is not None:
                resolved = self.resolve(cur, target, depth + 1)
                if resolved is not None:
                    return resolved
        return cur

    def edges(self):
        graph = {m: set() for m in self.modules}
        for module, text in self.modules.items():
            inline = [
                (m.start(), block_end(text, m.start()))
                for m in re.finditer(r"\bmod\s+" + IDENT + r"\s*\{", text)
            ]

            def depth(at):
                return sum(1 for start, end in inline if start < at < end)

            paths = []
            for m in re.finditer(r"\buse\s+([^;]+);", text):
                paths.extend((p, m.start()) for p in expand_use_tree(m.group(1)))
            code = re.sub(r"\buse\s+[^;]+;", lambda m: " " * len(m.group(0)), text)
            paths.extend(
                (m.group(0), m.start())
                for m in re.finditer(r"\b(?:crate|super|self)(?:::" + IDENT + r")+", code)
            )
            # Child modules named directly (`child::item`).
            for m in re.finditer(r"(?<!::)\b(" + IDENT + r")::" + IDENT, code):
                if module + (m.group(1),) in self.modules:
                    paths.append((m.group(0), m.start()))
            for path_, at in paths:
                segs = [s for s in path_.split("::") if s]
                if segs and segs[-1] == "*":
                    segs = segs[:-1]
                target = self.resolve(module, segs, inline=depth(at))
                if target is not None and target != module:
                    graph[module].add(target)
        return graph


def cycles(graph):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def name(module):
    return "::".join(("crate",) + module)


def main(argv):
    with_tests = "--tests" in argv
    show_edges = "--edges" in argv
    dirs = [a for a in argv if not a.startswith("--")]
    root = Path(__file__).resolve().parent.parent
    crates = [Path(d) for d in dirs] or sorted(p.parent for p in root.glob("crates/*/Cargo.toml"))
    found = False
    for crate_dir in crates:
        src = crate_dir / "src"
        crate = Crate(src, with_tests)
        graph = crate.edges()
        components = cycles(graph)
        label = crate_dir.name
        if show_edges:
            for m in sorted(graph):
                for t in sorted(graph[m]):
                    print(f"{label}: {name(m)} -> {name(t)}")
        if components:
            found = True
            for comp in components:
                inside = {m: sorted(t for t in graph[m] if t in comp) for m in comp}
                detail = "; ".join(
                    f"{name(m)} -> {', '.join(name(t) for t in inside[m])}" for m in comp
                )
                print(f"{label}: cycle among {len(comp)} modules: {detail}")
        else:
            print(f"{label}: {len(graph)} modules, {sum(map(len, graph.values()))} edges, no cycle")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
