"""A deterministic, monorepo-shaped source tree for the sync benchmark.

Same parameters, same tree: every path, byte and mtime comes from one seeded
``random.Random``. The tree holds ``files`` entries outside ``node_modules``
(``.git`` included) and ``nm_files`` inside ``node_modules``:

    package.json, package-lock.json, tsconfig.base.json, turbo.json,
    README.md, .gitignore, .editorconfig            (root)
    .git/                                           refs, hooks, index, a pack,
                                                    ~8% of ``files`` as loose objects
    services/<name>/  and  packages/<name>/         package.json, a lock file,
        tsconfig.json, README.md, Dockerfile, .eslintrc.json,
        src/<area>/<topic>[/<topic>]/*.ts(x)|*.css  text, 200 B - 20 kB (log-uniform)
        test/<area>/*.test.ts                       same
        docs/*.md                                   same
        assets/{img,fonts,media}/*                  binary, 1 kB - 1 MB (log-uniform), ~1%
    node_modules/ (and a few per-service ones)      small files, 100 B - 4 kB

Nothing matches the root ``.gitignore`` except ``node_modules``, so an
rsync that excludes only ``node_modules/`` and ``.git/`` sends exactly the
files dev-sync sends.

A marker file *next to* the tree (``<dir>.json``) records the parameters and
whether the benchmark left the tree modified; :func:`ensure_tree` reuses a
clean tree with the same parameters and rebuilds anything else. Usable alone:

    python bench/treegen.py DIR --files 20000 --nm-files 30000 --seed 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

GEN_VERSION = 2
EPOCH = 1_690_000_000  # fixed mtimes: two generations are byte- and time-identical

SERVICE_NAMES = (
    "accounts", "billing", "catalog", "checkout", "edge", "fulfilment", "identity",
    "invoicing", "ledger", "mailer", "notifications", "onboarding", "orders", "partners",
    "payouts", "pricing", "ratings", "recommend", "refunds", "reporting", "search", "shipping",
    "storefront", "support", "tax", "telemetry", "tenants", "uploads", "wallet", "warehouse",
)
PACKAGE_NAMES = (
    "ui-kit", "http-client", "logger", "config", "feature-flags", "i18n", "auth-sdk",
    "db-utils", "queue", "testing", "tracing", "validation",
)
AREAS = (
    "api", "domain", "infra", "adapters", "handlers", "components", "pages", "hooks",
    "store", "jobs", "models", "routes", "schemas", "utils", "middleware", "workers",
)
TOPICS = (
    "accounts", "audit", "batch", "cache", "cart", "common", "core", "events", "export",
    "forms", "graph", "health", "history", "import", "internal", "legacy", "mappers",
    "metrics", "orders", "payments", "queries", "search", "session", "shared", "sync",
    "users", "v1", "v2", "views", "widgets",
)
WORDS = (
    "account", "address", "amount", "batch", "buffer", "cart", "channel", "client", "config",
    "cursor", "customer", "delivery", "discount", "entry", "event", "filter", "invoice",
    "item", "ledger", "limit", "locale", "message", "order", "page", "payload", "payment",
    "policy", "price", "product", "profile", "quota", "record", "refund", "region", "request",
    "response", "result", "review", "route", "schedule", "session", "shipment", "snapshot",
    "status", "stock", "tenant", "token", "user", "warehouse", "webhook",
)
VERBS = (
    "apply", "build", "cancel", "check", "collect", "compute", "create", "decode", "encode",
    "ensure", "fetch", "find", "format", "handle", "index", "list", "load", "merge", "normalize",
    "parse", "publish", "refresh", "remove", "render", "resolve", "retry", "save", "select",
    "serialize", "split", "store", "sync", "track", "update", "validate",
)
TS_TYPES = (
    "string", "number", "boolean", "Date", "unknown", "string[]", "Readonly<Options>",
    "Promise<void>", "Record<string, number>", "Map<string, Entry>", "Result<Item>",
)
NPM_NAMES = (
    "react", "react-dom", "scheduler", "express", "body-parser", "debug", "ms", "semver",
    "lodash", "zod", "axios", "follow-redirects", "tslib", "rxjs", "uuid", "yargs",
    "cliui", "chalk", "supports-color", "commander", "glob", "minimatch", "brace-expansion",
    "picomatch", "micromatch", "fast-glob", "esbuild", "postcss", "nanoid", "source-map",
    "@babel/core", "@babel/parser", "@babel/types", "@types/node", "@types/react",
    "@jest/core", "@jest/expect", "jest-util", "ws", "qs", "mime-types", "cookie",
)


@dataclass(frozen=True)
class TreeSpec:
    files: int = 20_000  # outside node_modules, .git included
    nm_files: int = 30_000
    seed: int = 1

    @property
    def name(self) -> str:
        return f"mono-f{self.files}-nm{self.nm_files}-s{self.seed}-v{GEN_VERSION}"


@dataclass
class TreeStats:
    files: int = 0
    bytes: int = 0
    dirs: int = 0
    nm_files: int = 0
    nm_bytes: int = 0
    git_files: int = 0
    seconds: float = 0.0


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _name(rng: random.Random) -> str:
    return rng.choice(VERBS) + rng.choice(WORDS).capitalize()


def _type_name(rng: random.Random) -> str:
    return rng.choice(WORDS).capitalize() + rng.choice(("", "Dto", "Event", "State", "Props"))


class TextPool:
    """A few MB of TypeScript-looking lines; source files are slices of it."""

    def __init__(self, rng: random.Random, target: int = 3_000_000) -> None:
        lines: list[str] = []
        size = 0
        depth = 0
        while size < target:
            line = self._line(rng, depth)
            if line.endswith("{"):
                depth = min(depth + 1, 4)
            elif line.strip() == "}":
                depth = max(depth - 1, 0)
            lines.append(line)
            size += len(line) + 1
        self.text = "\n".join(lines) + "\n"

    @staticmethod
    def _line(rng: random.Random, depth: int) -> str:
        pad = "  " * depth
        r = rng.random()
        if r < 0.10:
            args = ", ".join(
                f"{rng.choice(WORDS)}: {rng.choice(TS_TYPES)}" for _ in range(rng.randint(0, 3))
            )
            return f"{pad}export async function {_name(rng)}({args}): {rng.choice(TS_TYPES)} {{"
        if r < 0.22:
            return (
                f"{pad}const {rng.choice(WORDS)}{rng.randint(1, 9)} = await "
                f"{_name(rng)}({rng.choice(WORDS)}, {{ limit: {rng.randint(1, 500)} }});"
            )
        if r < 0.32:
            return (
                f"{pad}if ({rng.choice(WORDS)}.{rng.choice(WORDS)} === undefined) "
                f"throw new {_type_name(rng)}Error('{rng.choice(WORDS)} not set');"
            )
        if r < 0.42:
            return (
                f"{pad}// {rng.choice(VERBS)} every {rng.choice(WORDS)} before the "
                f"{rng.choice(WORDS)} is {rng.choice(VERBS)}d (ticket {rng.randint(100, 9999)})"
            )
        if r < 0.52:
            return (
                f"{pad}return {rng.choice(WORDS)}s.{rng.choice(('map', 'filter', 'reduce'))}"
                f"((x) => x.{rng.choice(WORDS)} ?? {rng.randint(0, 99)});"
            )
        if r < 0.60:
            return f"{pad}readonly {rng.choice(WORDS)}{rng.choice(('Id', 'At', 'Count'))}: " \
                   f"{rng.choice(TS_TYPES)};"
        if r < 0.68:
            return (
                f"{pad}log.{rng.choice(('debug', 'info', 'warn'))}('{_name(rng)}', "
                f"{{ {rng.choice(WORDS)}, {rng.choice(WORDS)} }});"
            )
        if r < 0.76:
            return f"{pad}export interface {_type_name(rng)} {{"
        if r < 0.88:
            return pad + "}"
        if r < 0.94:
            return ""
        return f"{pad}import {{ {_name(rng)} }} from '../{rng.choice(AREAS)}/{rng.choice(TOPICS)}';"

    def slice(self, rng: random.Random, size: int, header: str) -> bytes:
        text = self.text
        start = rng.randrange(0, len(text) - 30_000)
        start = text.index("\n", start) + 1
        body = text[start : start + max(0, size - len(header))]
        return (header + body).encode()


class _Writer:
    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.made: set[str] = set()
        self.stats = TreeStats()

    def write(self, rel: str, data: bytes | str, kind: str = "src") -> None:
        path = os.path.join(self.root, rel)
        parent = os.path.dirname(path)
        if parent not in self.made:
            os.makedirs(parent, exist_ok=True)
            self.made.add(parent)
        if isinstance(data, str):
            data = data.encode()
        with open(path, "wb") as fh:
            fh.write(data)
        stamp = EPOCH + self.rng.randrange(0, 200 * 86_400)
        os.utime(path, (stamp, stamp))
        if kind == "nm":
            self.stats.nm_files += 1
            self.stats.nm_bytes += len(data)
        else:
            self.stats.files += 1
            self.stats.bytes += len(data)
            if kind == "git":
                self.stats.git_files += 1


def _package_json(rng: random.Random, name: str) -> str:
    deps = {d: f"^{rng.randint(0, 18)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}"
            for d in rng.sample(NPM_NAMES, 10)}
    dev = {d: f"^{rng.randint(1, 9)}.0.0" for d in rng.sample(NPM_NAMES, 5)}
    data = {
        "name": name,
        "version": f"{rng.randint(0, 3)}.{rng.randint(0, 40)}.{rng.randint(0, 9)}",
        "private": True,
        "scripts": {"build": "tsc -b", "test": "jest", "dev": "tsx watch src/index.ts"},
        "dependencies": deps,
        "devDependencies": dev,
    }
    return json.dumps(data, indent=2) + "\n"


def _lock_json(rng: random.Random, name: str, packages: int) -> str:
    entries: dict[str, object] = {"": {"name": name, "version": "1.0.0"}}
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for i in range(packages):
        pkg = rng.choice(NPM_NAMES) + ("" if i < len(NPM_NAMES) else f"-{i}")
        entries[f"node_modules/{pkg}"] = {
            "version": f"{rng.randint(0, 20)}.{rng.randint(0, 40)}.{rng.randint(0, 20)}",
            "resolved": f"https://registry.npmjs.org/{pkg}/-/{pkg.rsplit('/', 1)[-1]}.tgz",
            "integrity": "sha512-" + "".join(rng.choice(alphabet) for _ in range(86)) + "==",
            "dev": rng.random() < 0.35,
        }
    data = {"name": name, "lockfileVersion": 3, "requires": True, "packages": entries}
    return json.dumps(data, indent=2) + "\n"


_MAGIC = {
    "png": b"\x89PNG\r\n\x1a\n", "jpg": b"\xff\xd8\xff\xe0", "woff2": b"wOF2",
    "webp": b"RIFF\0\0\0\0WEBP", "mp4": b"\0\0\0\x20ftypisom",
}


def _binary(rng: random.Random, size: int, ext: str) -> bytes:
    head = _MAGIC[ext]
    return head + rng.randbytes(max(0, size - len(head)))


def _hex(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def _git(w: _Writer, files: int) -> int:
    rng = w.rng
    fixed = {
        ".git/HEAD": "ref: refs/heads/main\n",
        ".git/config": "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n"
                       "\tbare = false\n[remote \"origin\"]\n"
                       "\turl = git@example.com:acme/mono.git\n",
        ".git/description": "Unnamed repository; edit this file 'description' to name it.\n",
        ".git/info/exclude": "# git ls-files --others --exclude-from=.git/info/exclude\n",
        ".git/refs/heads/main": _hex(rng, 40) + "\n",
        ".git/refs/remotes/origin/main": _hex(rng, 40) + "\n",
        ".git/packed-refs": "".join(f"{_hex(rng, 40)} refs/tags/v1.{i}.0\n" for i in range(40)),
        ".git/logs/HEAD": "".join(
            f"{_hex(rng, 40)} {_hex(rng, 40)} Dev <dev@example.com> {EPOCH + i * 3600} +0000\t"
            f"commit: change {i}\n" for i in range(200)),
        ".git/FETCH_HEAD": _hex(rng, 40) + "\tbranch 'main' of example.com:acme/mono\n",
    }
    for hook in ("applypatch-msg", "commit-msg", "post-update", "pre-applypatch", "pre-commit",
                 "pre-push", "pre-rebase", "prepare-commit-msg", "update"):
        body = "#\n" * rng.randint(5, 60)
        fixed[f".git/hooks/{hook}.sample"] = "#!/bin/sh\n# sample hook\n" + body
    for rel, text in fixed.items():
        w.write(rel, text, "git")
    pack = _hex(rng, 40)
    w.write(".git/index", rng.randbytes(min(4_000_000, files * 90)), "git")
    w.write(f".git/objects/pack/pack-{pack}.pack", rng.randbytes(1_000_000), "git")
    w.write(f".git/objects/pack/pack-{pack}.idx", rng.randbytes(60_000), "git")
    loose = int(files * 0.08)
    for _ in range(loose):
        name = _hex(rng, 40)
        w.write(f".git/objects/{name[:2]}/{name[2:]}", rng.randbytes(_log_uniform(rng, 60, 6000)),
                "git")
    return len(fixed) + 3 + loose


def _node_modules(w: _Writer, pool: TextPool, base: str, count: int) -> None:
    rng = w.rng
    made = 0
    serial = 0
    while made < count:
        pkg = NPM_NAMES[serial] if serial < len(NPM_NAMES) else f"{rng.choice(NPM_NAMES)}-{serial}"
        serial += 1
        n = min(count - made, rng.randint(4, 40))
        names = ["package.json", "README.md", "LICENSE", "index.js"]
        for i in range(n):
            if i < len(names):
                rel = names[i]
            else:
                sub = rng.choice(("lib", "dist", "lib/internal", "dist/esm", "types"))
                ext = ".d.ts" if sub == "types" else rng.choice((".js", ".js", ".mjs", ".cjs"))
                rel = f"{sub}/{rng.choice(WORDS)}-{i}{ext}"
            data = pool.slice(rng, _log_uniform(rng, 100, 4000), f"/* {pkg}/{rel} */\n")
            w.write(f"{base}/{pkg}/{rel}", data, "nm")
        made += n


def generate(root: Path, spec: TreeSpec) -> TreeStats:
    """Write the tree for ``spec`` into the (empty or missing) folder ``root``."""
    started = time.monotonic()
    rng = random.Random(spec.seed)
    pool = TextPool(random.Random(spec.seed * 1_000_003 + 17))
    w = _Writer(root, rng)

    root_files = {
        "package.json": _package_json(rng, "@acme/mono"),
        "package-lock.json": _lock_json(rng, "@acme/mono", 700),
        "tsconfig.base.json": json.dumps({"compilerOptions": {"strict": True, "target": "ES2022",
                                          "module": "NodeNext"}}, indent=2) + "\n",
        "turbo.json": json.dumps({"pipeline": {"build": {"dependsOn": ["^build"]}}}, indent=2),
        "README.md": "# acme monorepo\n\nSynthetic fixture for the dev-sync benchmark.\n",
        ".gitignore": "node_modules/\ndist/\ncoverage/\n*.log\n.env.local\n.DS_Store\n",
        ".editorconfig": "root = true\n\n[*]\nindent_style = space\nindent_size = 2\n",
    }
    for rel, text in root_files.items():
        w.write(rel, text)
    budget = spec.files - len(root_files)
    budget -= _git(w, spec.files)

    units: list[str] = []
    n_units = max(4, round(spec.files / 700))
    n_packages = max(1, n_units // 5)
    for i in range(n_units - n_packages):
        base = SERVICE_NAMES[i % len(SERVICE_NAMES)]
        units.append(f"services/{base}" + ("" if i < len(SERVICE_NAMES) else f"-{i}"))
    for i in range(n_packages):
        base = PACKAGE_NAMES[i % len(PACKAGE_NAMES)]
        units.append(f"packages/{base}" + ("" if i < len(PACKAGE_NAMES) else f"-{i}"))

    for unit in units:
        name = "@acme/" + unit.rsplit("/", 1)[-1]
        w.write(f"{unit}/package.json", _package_json(rng, name))
        w.write(f"{unit}/package-lock.json", _lock_json(rng, name, rng.randint(40, 160)))
        w.write(f"{unit}/tsconfig.json", '{ "extends": "../../tsconfig.base.json" }\n')
        w.write(f"{unit}/README.md", f"# {name}\n\n" + pool.slice(rng, 600, "").decode())
        w.write(f"{unit}/Dockerfile", "FROM node:20-slim\nWORKDIR /app\nCOPY . .\n"
                "RUN npm ci\nCMD [\"node\", \"dist/index.js\"]\n")
        w.write(f"{unit}/.eslintrc.json", '{ "root": false, "rules": {} }\n')
    budget -= 6 * len(units)

    n_assets = max(10, budget // 100)
    for i in range(n_assets):
        unit = rng.choice(units[: max(1, len(units) - n_packages)])
        ext = rng.choice(("png", "png", "jpg", "webp", "woff2", "mp4"))
        folder = {"woff2": "fonts", "mp4": "media"}.get(ext, "img")
        size = _log_uniform(rng, 1_000, 1_000_000)
        w.write(f"{unit}/assets/{folder}/{rng.choice(WORDS)}-{i}.{ext}", _binary(rng, size, ext))
    budget -= n_assets

    # Text sources: spread over each unit's folders, ~14 files per folder.
    share = [rng.uniform(0.5, 1.5) for _ in units]
    scale = budget / sum(share)
    counts = [int(s * scale) for s in share]
    counts[0] += budget - sum(counts)
    for unit, count in zip(units, counts, strict=True):
        n_tests = count // 5
        n_docs = count // 25
        n_src = count - n_tests - n_docs
        src_dirs: list[str] = []
        seen: set[str] = set()
        while len(src_dirs) < max(1, n_src // 14):
            parts = [rng.choice(AREAS), rng.choice(TOPICS)]
            if rng.random() < 0.4:
                parts.append(rng.choice(TOPICS))
            d = f"{unit}/src/" + "/".join(parts)
            if d not in seen:
                seen.add(d)
                src_dirs.append(d)
        test_dirs = [f"{unit}/test/{a}" for a in rng.sample(AREAS, 6)]
        plan = ([("src", i) for i in range(n_src)] + [("test", i) for i in range(n_tests)]
                + [("docs", i) for i in range(n_docs)])
        for kind, i in plan:
            if kind == "src":
                folder = rng.choice(src_dirs)
                ext = rng.choice((".ts", ".ts", ".ts", ".tsx", ".tsx", ".css"))
                rel = f"{folder}/{rng.choice(WORDS)}-{rng.choice(VERBS)}-{i}{ext}"
            elif kind == "test":
                rel = f"{rng.choice(test_dirs)}/{rng.choice(WORDS)}-{i}.test.ts"
            else:
                rel = f"{unit}/docs/{rng.choice(TOPICS)}-{i}.md"
            size = _log_uniform(rng, 200, 20_000)
            header = f"// {rel}\n"
            w.write(rel, pool.slice(rng, size, header))

    nm_root = int(spec.nm_files * 0.8)
    _node_modules(w, pool, "node_modules", nm_root)
    rest = spec.nm_files - nm_root
    with_nm = units[: min(len(units), 6)]
    for k, unit in enumerate(with_nm):
        part = rest // len(with_nm) + (rest % len(with_nm) if k == 0 else 0)
        if part:
            _node_modules(w, pool, f"{unit}/node_modules", part)

    w.stats.dirs = sum(1 for _ in _walk_dirs(root))
    w.stats.seconds = round(time.monotonic() - started, 2)
    return w.stats


def _walk_dirs(root: Path):  # type: ignore[no-untyped-def]
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("node_modules", ".git")]
        yield dirpath


def marker_path(root: Path) -> Path:
    return root.with_name(root.name + ".json")


def read_marker(root: Path) -> dict[str, object] | None:
    try:
        data = json.loads(marker_path(root).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def set_dirty(root: Path, dirty: bool) -> None:
    """Record that the tree differs from its generated state (a run is mutating it)."""
    data = read_marker(root) or {}
    data["dirty"] = dirty
    marker_path(root).write_text(json.dumps(data, indent=2) + "\n")


def ensure_tree(parent: Path, spec: TreeSpec, log=print) -> tuple[Path, TreeStats, bool]:  # type: ignore[no-untyped-def]
    """The tree for ``spec`` under ``parent``: reused when clean, else (re)built.

    Returns (root, stats, reused).
    """
    root = parent / spec.name
    marker = read_marker(root)
    if (
        root.is_dir()
        and marker is not None
        and marker.get("spec") == asdict(spec)
        and marker.get("version") == GEN_VERSION
        and not marker.get("dirty", True)
    ):
        return root, TreeStats(**marker["stats"]), True  # type: ignore[arg-type]
    if root.exists():
        log(f"tree {root} is missing its marker or was left modified; rebuilding it")
        shutil.rmtree(root)
    marker_path(root).unlink(missing_ok=True)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / (spec.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    log(f"generating {spec.files:,} files + {spec.nm_files:,} in node_modules into {root} ...")
    stats = generate(tmp, spec)
    tmp.rename(root)
    marker_path(root).write_text(json.dumps(
        {"spec": asdict(spec), "version": GEN_VERSION, "stats": asdict(stats), "dirty": False},
        indent=2) + "\n")
    return root, stats, False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parent", type=Path,
                    help="folder that receives the tree (named by its parameters)")
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--nm-files", type=int, default=30_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    spec = TreeSpec(args.files, args.nm_files, args.seed)
    root, stats, reused = ensure_tree(args.parent, spec, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"root": str(root), "reused": reused, **asdict(stats)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
