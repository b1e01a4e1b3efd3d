# Render the table beside the reference README's numbers: Markdown (imgclf.pipeline.render_table)
# and the same rows as HTML for `snakemake --report` (imgclf.tables.report.render_table_html).
import _path  # noqa: F401  (Snakemake puts this folder on sys.path)
import sys

sys.stderr = open(snakemake.log[0], "w")
from imgclf.pipeline import render_table  # noqa: E402
from imgclf.tables.report import render_table_html  # noqa: E402

render_table(snakemake.input.spec, snakemake.input.csv, snakemake.output.md)
render_table_html(snakemake.input.spec, snakemake.input.csv, snakemake.output.html)
