"""Every place where imgclf knowingly departs from the reference says so in one form,
``Deviation from the reference (<title>): ...``, and each title is a bullet of the README's
"Known differences" list: the list is complete."""
from __future__ import annotations

import re

from oracle import REPO

MARK = re.compile(r"Deviation from the reference \(([^()]+)\):")


def _code_notes() -> dict[str, list[str]]:
    notes: dict[str, list[str]] = {}
    for path in sorted((REPO / "src").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "Deviation" in line or "deviation from" in line:  # not "standard deviation"
                m = MARK.search(line)
                assert m, (f"{path.relative_to(REPO)}:{n}: a deviation note reads 'Deviation from the reference "
                           f"(<title of its README bullet>): ...': {line.strip()}")
                notes.setdefault(m.group(1), []).append(f"{path.relative_to(REPO)}:{n}")
    return notes


def _readme_titles() -> set[str]:
    text = (REPO / "docs" / "fidelity.md").read_text(encoding="utf-8")
    section = text.split("## Known differences from the reference", 1)[1].split("\n# ", 1)[0]
    return {t.replace("`", "") for t in re.findall(r"^- \*\*(.+?)\*\*", section, flags=re.M)}


def test_every_deviation_in_the_code_is_in_the_readme_list():
    notes, titles = _code_notes(), _readme_titles()
    assert len(notes) >= 6, notes  # warmup, no-WD-on-BN, clipping, label smoothing, CutMix, LARS
    missing = {t: where for t, where in notes.items() if t not in titles}
    assert not missing, f"deviations missing from README's Known differences list {sorted(titles)}: {missing}"
