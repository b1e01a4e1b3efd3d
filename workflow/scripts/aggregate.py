# Median/min/max over seeds per row -> results/tables/<table>.csv (imgclf.pipeline.aggregate_table).
import _path  # noqa: F401  (Snakemake puts this folder on sys.path)
import sys

sys.stderr = open(snakemake.log[0], "w", encoding="utf-8", errors="surrogateescape")
from imgclf.pipeline import aggregate_table  # noqa: E402

aggregate_table(snakemake.input.spec, "results/runs", snakemake.output[0])
