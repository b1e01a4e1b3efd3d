# Train one seed of one run through the configured launcher (imgclf.pipeline.train_seed).
# The terminal gets one line per event (submitted, re-attached, failed); the log keeps the
# failure's one line first, then the traceback.
import _path  # noqa: F401  (Snakemake puts this folder on sys.path)
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("IMGCLF_CACHE_DIR", str(Path(snakemake.input[0]).parent.resolve()))
from imgclf.pipeline import train_seed  # noqa: E402

run_dir = Path(snakemake.output[0]).parent
job = snakemake.params.job
with open(snakemake.log[0], "w", encoding="utf-8", errors="surrogateescape") as log:
    try:
        result = train_seed(run_dir, job["config"], int(snakemake.wildcards.seed), launcher=job["launcher"],
                            resources=job["resources"], data_root=job["data_root"], progress=job["progress"],
                            attempt=int(snakemake.resources.attempt))
    except KeyboardInterrupt:
        sys.exit(130)  # what still runs was said when the interrupt came
    except Exception as e:
        line = " ".join(str(e).split()) or type(e).__name__
        if not line.startswith(f"{run_dir.parent.name}/{run_dir.name}"):
            line = f"{run_dir.parent.name}/{run_dir.name}: {type(e).__name__}: {line}"
        log.write(line + "\n\n")
        traceback.print_exc(file=log)
        print(f"imgclf: FAILED {line}", file=sys.stderr, flush=True)
        sys.exit(1)
    if result.get("diverged"):
        log.write(f"{run_dir}: diverged: {result['message']}\n")
    else:
        log.write(f"{run_dir}: test error {result['test_error']:.2f}% in {result['wall_seconds']:.0f} s\n")
