# Train the seeds of one pack in one job (imgclf.pipeline.train_pack). The log starts with one
# "FAILED <line>" per failed seed (what the workflow prints at its end), then the traceback.
import _path  # noqa: F401  (Snakemake puts this folder on sys.path)
import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("IMGCLF_CACHE_DIR", str(Path(snakemake.input[0]).parent.resolve()))  # the dataset cache
from imgclf.pipeline import PackFailed, train_pack  # noqa: E402
from imgclf.utils import atomic_write_text  # noqa: E402

pack_dir = Path(snakemake.output[0]).parent
job = snakemake.params.job
with open(snakemake.log[0], "w", encoding="utf-8", errors="surrogateescape") as log:
    try:
        results = train_pack(pack_dir, [tuple(s) for s in job["seeds"]], launcher=job["launcher"],
                             resources=job["resources"], data_root=job["data_root"],
                             attempt=int(snakemake.resources.attempt))
    except KeyboardInterrupt:
        sys.exit(130)
    except PackFailed as e:
        log.write("".join(f"FAILED {line}\n" for line in e.lines) + "\n")
        for line in e.lines:
            print(f"imgclf: FAILED {line}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as e:
        line = f"{pack_dir.parent.name}/{pack_dir.name}: {type(e).__name__}: {' '.join(str(e).split())}"
        log.write(f"FAILED {line}\n\n")
        traceback.print_exc(file=log)
        print(f"imgclf: FAILED {line}", file=sys.stderr, flush=True)
        sys.exit(1)
    for label, result in results.items():
        said = f"diverged: {result.get('message')}" if result.get("diverged") else \
            f"test error {result['test_error']:.2f}% in {result['wall_seconds']:.0f} s"
        log.write(f"{label}: {said}\n")
atomic_write_text(snakemake.output[0], json.dumps(sorted(results), indent=1) + "\n")
