#!/usr/bin/env python3
"""Import cycles between source files (and top-level modules) of a crate: edges from `crate::a::b`
paths outside test modules, resolved to the file that defines the named item (following `pub use`
re-exports); strongly connected components with more than one member are cycles."""
import os, re, sys
root = sys.argv[1] if len(sys.argv) > 1 else "src"
files = {}
for d, _, fs in os.walk(root):
    for f in fs:
        if f.endswith(".rs"):
            p = os.path.join(d, f)
            rel = os.path.relpath(p, root)[:-3]
            parts = rel.split(os.sep)
            if parts[-1] in ("mod", "lib", "main"):
                parts = parts[:-1]
            files[tuple(parts)] = p
def strip_tests(text):
    # drop `#[cfg(test)] mod x { ... }` blocks
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub(\(crate\))?\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i: continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while depth and j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0); j += 1
        i = j
    out.append(text[i:])
    return "".join(out)
src = {k: strip_tests(re.sub(r"//[^\n]*", "", open(p).read())) for k, p in files.items()}
def reexport(mod, name, seen=()):
    """The module defining `name` when `mod` re-exports it with `pub use`."""
    t = src.get(mod, "")
    for m in re.finditer(r"pub(?:\([^)]*\))?\s+use\s+([^;]+);", t):
        body = m.group(1).replace("\n", " ")
        pre = re.match(r"([\w:]+)::\{(.*)\}$", body.strip())
        items = [(pre.group(1), x.strip()) for x in pre.group(2).split(",")] if pre else [(body.strip().rsplit("::", 1)[0], body.strip().rsplit("::", 1)[-1])]
        for base, item in items:
            if item.split(" as ")[-1].strip() == name:
                segs = base.split("::")
                target = resolve_path(mod, segs)
                if target and target != mod and (target, name) not in seen:
                    return reexport(target, name, seen + ((mod, name),)) or target
    return None
def resolve_path(mod, segs):
    if segs[0] == "crate": cur = ()
    elif segs[0] == "super": cur = mod[:-1]
    elif segs[0] == "self": cur = mod
    else: cur = mod
    segs = segs[1:] if segs[0] in ("crate", "super", "self") else segs
    best = cur if cur in files else None
    for s in segs:
        cur = cur + (s,)
        if cur in files: best = cur
        else: break
    return best
edges = {k: set() for k in files}
for mod, t in src.items():
    uses = []
    for m in re.finditer(r"\buse\s+((?:crate|super|self)::[^;]+);", t):
        body = m.group(1).replace("\n", " ").replace(" ", "")
        mm = re.match(r"([\w:]+)::\{(.*)\}$", body)
        if mm:
            for it in re.split(r",(?![^{]*\})", mm.group(2)):
                it = it.split("as")[0] if "as" in it and "::" not in it else it
                uses.append(mm.group(1) + "::" + re.sub(r"::\{.*", "", it))
        else:
            uses.append(body)
    for m in re.finditer(r"\b((?:crate|super)(?:::\w+)+)", t):
        uses.append(m.group(1))
    for m in re.finditer(r"\b(\w+)::", t):
        if mod + (m.group(1),) in files and not re.search(r"\b(crate|super|self)::$", t[max(0, m.start()-8):m.start()]):
            uses.append("self::" + m.group(1))
    for u in uses:
        segs = [s for s in u.split("::") if s]
        tgt = resolve_path(mod, segs)
        if tgt is None: continue
        depth = len(tgt) - (0 if segs[0] == "crate" else len(mod) - (1 if segs[0] == "super" else 0))
        rest = segs[1 + len(tgt) - (0 if segs[0] == "crate" else len(mod[:-1] if segs[0] == "super" else mod)):]
        if rest:
            r = reexport(tgt, rest[0])
            if r: tgt = r
        if tgt != mod: edges[mod].add(tgt)
def sccs(g):
    idx, low, st, on, out, n = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)
    def v(x):
        idx[x] = low[x] = n[0]; n[0] += 1; st.append(x); on.add(x)
        for y in g[x]:
            if y not in idx: v(y); low[x] = min(low[x], low[y])
            elif y in on: low[x] = min(low[x], idx[y])
        if low[x] == idx[x]:
            c = []
            while True:
                y = st.pop(); on.discard(y); c.append(y)
                if y == x: break
            out.append(c)
    for x in g:
        if x not in idx: v(x)
    return [c for c in out if len(c) > 1]
name = lambda m: "::".join(m) or "crate"
fc = sccs(edges)
print(f"file-level: {len(fc)} cycle component(s)")
for c in fc: print("  ", sorted(name(m) for m in c))
top = {}
for a, bs in edges.items():
    ta = a[:1]
    top.setdefault(ta, set())
    for b in bs:
        if b[:1] != ta: top[ta].add(b[:1])
for k in list(top.values()):
    for b in k: top.setdefault(b, set())
tc = sccs(top)
print(f"top-level-module: {len(tc)} cycle component(s)")
for c in tc: print("  ", sorted(name(m) for m in c))
if "-v" in sys.argv:
    for a in sorted(edges):
        if a[:1] == ("config",): print(name(a), "->", sorted(name(b) for b in edges[a]))
