"""``python -m benchmarks.fidelity --smoke``: the reference and imgclf trained on the same real
MNIST subset in seconds, both error distributions and the two-sample test written out."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

if str(REPO) not in sys.path:  # `benchmarks` is a top-level folder beside src/
    sys.path.insert(0, str(REPO))

from benchmarks.fidelity import permutation_p, welch_t  # noqa: E402


def test_permutation_test_is_exact():
    # 3 v 3 fully separated: 2 of the 20 splits are as extreme (the observed one and its mirror).
    assert permutation_p([1.0, 2.0, 3.0], [10.0, 11.0, 12.0]) == pytest.approx(2 / 20)
    assert permutation_p([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    assert welch_t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(-3 / (2 / 3) ** 0.5)


def test_smoke_trains_both_sides_on_real_mnist(ref, data_root, tmp_path):
    out = tmp_path / "FIDELITY.md"
    out.write_text("# old numbers\n\n## Notes\nthe reading of the numbers, kept\n")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fidelity", "--smoke", "--out", str(out),
                           "--data-root", str(data_root), "--work", str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "SMOKE RUN" in text and "old numbers" not in text
    assert text.endswith("## Notes\nthe reading of the numbers, kept\n")
    assert re.search(r"imgclf at commit [0-9a-f]{7}", text)
    rows = [ln for ln in text.splitlines() if ln.startswith("| ResNet")]
    assert len(rows) == 2 and "`mnist: rp20`" in rows[0] and "`mnist: rp20_mixup_alpha1`" in rows[1]
    for line in re.findall(r"^- ResNet.*$", text, flags=re.M):
        ref_errs, ours = (re.findall(r"\d+\.\d\d", part) for part in line.split("; imgclf ")[0:2])
        ours = ours[:2]
        assert len(ref_errs) == 2 and len(ours) == 2, line  # 2 seeds a side
        assert all(0 <= float(x) <= 100 for x in ref_errs + ours)
        assert ref_errs[0] != ref_errs[1] or ours[0] != ours[1]  # the seed reaches the runs
    for row in rows:
        p = float(row.split("|")[-3])
        assert 0 < p <= 1
    assert (tmp_path / "work" / "cache" / "mnist.pt").is_file()
    assert not list((tmp_path / "work").glob("fidelity-*"))  # run directories removed
