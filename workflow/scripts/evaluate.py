# Score one finished seed's final weights on the test set (imgclf.pipeline.evaluate_seed),
# through the launcher and resources its training used.
import _path  # noqa: F401  (Snakemake puts this folder on sys.path)
import os
import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
os.environ.setdefault("IMGCLF_CACHE_DIR", str(Path("resources/cache").resolve()))
from imgclf.pipeline import evaluate_seed  # noqa: E402

evaluate_seed(Path(snakemake.output[0]).parent, threads=snakemake.threads)
