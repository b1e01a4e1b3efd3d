# One seed of one run: train (or resume from its last checkpoint), then score the saved final
# weights, in one job and so in one SLURM allocation. eval.json is what the tables read.
rule train:
    input:
        "resources/cache/{dataset}.pt",
    output:
        "results/runs/{dataset}-{run}/seed{seed}/result.json",
        "results/runs/{dataset}-{run}/seed{seed}/eval.json",
    log:
        "logs/train/{dataset}-{run}/seed{seed}.log",
    params:
        job=get_train_job,
    threads: get_train_threads
    priority: get_train_priority
    resources:
        # Under SLURM this job only waits on its cluster job: the profile bounds how many wait
        # at once (`resources: {slurm_jobs: N}`), not the login node's cores.
        slurm_jobs=get_slurm_jobs,
        attempt=get_attempt,
    conda:
        "../envs/imgclf.yaml"
    script:
        "../scripts/train.py"
