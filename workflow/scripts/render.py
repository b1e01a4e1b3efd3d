# Render the table beside the reference README's numbers, as Markdown and as HTML for
# `snakemake --report` (imgclf.pipeline.render_table).
import _path  # noqa: F401  (Snakemake puts this folder on sys.path)
import sys

sys.stderr = open(snakemake.log[0], "w", encoding="utf-8", errors="surrogateescape")
from imgclf.pipeline import render_table  # noqa: E402

render_table(snakemake.input.spec, snakemake.input.csv, snakemake.output.md, snakemake.output.html)
