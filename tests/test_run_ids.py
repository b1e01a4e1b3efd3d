"""Every planned row keeps its run id: a refactor that moves one orphans finished seeds on every
cluster that trained them. A change that moves ids on purpose updates tests/fixtures/run_ids.json
in a commit of its own that lists the rows."""
import json
from pathlib import Path

from imgclf.tables import spec

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).with_name("fixtures") / "run_ids.json"


def test_every_row_keeps_its_run_id():
    tables = spec.load_all(ROOT / "config" / "tables", ROOT / "config" / "recipes")
    now = {f"{name}/{row.id}": row.run_id for name, t in tables.items() for row in t.rows if row.run_id}
    expected = json.loads(FIXTURE.read_text())
    moved = sorted(k for k in expected.keys() & now.keys() if expected[k] != now[k])
    assert not moved, f"{len(moved)} rows changed run id, e.g. {moved[:5]}"
    assert now.keys() == expected.keys(), (
        f"rows added {sorted(now.keys() - expected.keys())[:5]}, removed {sorted(expected.keys() - now.keys())[:5]}")
