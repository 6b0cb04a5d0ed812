"""The engine's own decisions that need no remote (the sync itself: test_sync.py)."""

from __future__ import annotations

from pathlib import Path

from dev_sync.config import load_config
from dev_sync.engine import Engine, batch_cap, follow_cap
from dev_sync.events import Fanout


def _engine(root: Path, exclude: list[str]) -> Engine:
    listed = ", ".join(f'"{p}"' for p in exclude)
    (root / "dev-sync.toml").write_text(
        f'[remote]\nhost = "devbox"\npath = "/srv/app"\n\n[sync]\nexclude = [{listed}]\n'
    )
    return Engine(load_config(root / "dev-sync.toml"), Fanout([]), once=True)


def test_a_batch_is_filtered_by_each_paths_type_where_a_rule_depends_on_it(
    tmp_path: Path,
) -> None:
    # "out/" and "cache/" match folders only: a file of that name is synced.
    engine = _engine(tmp_path, ["out/", "cache/", "*.log"])
    (tmp_path / "out").write_text("a file named out\n")
    (tmp_path / "src" / "cache").mkdir(parents=True)
    (tmp_path / "src" / "cache" / "x.js").write_text("x\n")
    (tmp_path / "src" / "main.js").write_text("main\n")
    (tmp_path / "debug.log").write_text("log\n")
    assert engine._included("out")
    assert not engine._included("src/cache")
    assert not engine._included("src/cache/x.js")  # below an excluded folder
    assert engine._included("src/main.js")
    assert not engine._included("debug.log")
    # Gone: excluded if it would be as a file or as a folder (it may have been
    # a folder whose remote copy holds what must be kept).
    assert not engine._included("gone/out")
    assert engine._included("gone/main.js")
    assert not engine._included("gone.log")


def test_only_the_agents_batches_stream_a_burst_with_a_shorter_cap() -> None:
    assert follow_cap(None, agent=True) == 0.01
    assert batch_cap(None, agent=True) == 0.02  # the first cut of a burst
    assert follow_cap(None, agent=False) is None  # rsync batches stay coarse
    assert follow_cap(25, agent=True) is None  # a configured cap is the cap throughout
