# Lets the rule scripts import imgclf from this checkout when it is not installed
# (e.g. inside a `--sdm conda` environment built from workflow/envs/imgclf.yaml).
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("imgclf") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
