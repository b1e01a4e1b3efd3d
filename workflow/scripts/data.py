# Prepare + verify one dataset and write its decoded tensor cache (imgclf.data.prepare).
import _path  # noqa: F401  (Snakemake puts this folder on sys.path)
import os
import sys

sys.stderr = open(snakemake.log[0], "w", encoding="utf-8", errors="surrogateescape")
os.environ["IMGCLF_CACHE_DIR"] = os.path.dirname(snakemake.output[0])
from imgclf.data import data_root, prepare  # noqa: E402

prepare(snakemake.wildcards.dataset, root=data_root(snakemake.params.data_root), download=snakemake.params.download)
