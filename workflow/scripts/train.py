# Train one seed of one run through the configured launcher (imgclf.pipeline.train_seed).
# The progress bar goes to the terminal; the log keeps the outcome or the traceback.
import _path  # noqa: F401  (Snakemake puts this folder on sys.path)
import os
import traceback
from pathlib import Path

os.environ.setdefault("IMGCLF_CACHE_DIR", str(Path(snakemake.input[0]).parent.resolve()))
from imgclf.pipeline import train_seed  # noqa: E402

run_dir = Path(snakemake.output[0]).parent
job = snakemake.params.job
with open(snakemake.log[0], "w") as log:
    try:
        result = train_seed(run_dir, job["config"], int(snakemake.wildcards.seed), launcher=job["launcher"],
                            resources=job["resources"], threads=snakemake.threads, data_root=job["data_root"],
                            progress=job["progress"])
    except BaseException:
        traceback.print_exc(file=log)
        raise
    if result.get("diverged"):
        log.write(f"{run_dir}: diverged: {result['message']}\n")
    else:
        log.write(f"{run_dir}: test error {result['test_error']:.2f}% in {result['wall_seconds']:.0f} s\n")
