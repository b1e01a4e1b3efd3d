# The report's figures for one table: learning curves per row and ours vs the reference README
# (imgclf.tables.plots.plot_table).
import _path  # noqa: F401  (Snakemake puts this folder on sys.path)
import sys

sys.stderr = open(snakemake.log[0], "w", encoding="utf-8", errors="surrogateescape")
from imgclf.tables.plots import plot_table  # noqa: E402

plot_table(snakemake.input.spec, snakemake.input.csv, snakemake.params.runs_dir,
           snakemake.output.learning_curves, snakemake.output.paper_vs_ours)
