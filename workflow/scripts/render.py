# Render the Markdown table beside the reference README's numbers (imgclf.pipeline.render_table).
import _path  # noqa: F401  (Snakemake puts this folder on sys.path)
import sys

sys.stderr = open(snakemake.log[0], "w")
from imgclf.pipeline import render_table  # noqa: E402

render_table(snakemake.input.spec, snakemake.input.csv, snakemake.output[0])
