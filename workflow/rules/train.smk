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


# A pack: seeds of runs with seeds_per_gpu k > 1, k side by side in one job (one GPU, or with
# gpus 0 k times the CPUs), each its own process and run directory (imgclf.launch.pack). Its marker
# stands for all k; a seed that fails fails the pack, whose re-run trains only the seeds not done
# (its inputs are the seeds' folders: one deleted or set aside runs the pack again).
rule train_pack:
    input:
        get_pack_inputs,
    output:
        "results/packs/{dataset}-{pack}/seeds.json",
    log:
        "logs/train/packs/{dataset}-{pack}.log",
    params:
        job=get_pack_job,
    threads: get_pack_threads
    priority: get_pack_priority
    resources:
        slurm_jobs=get_slurm_jobs,
        attempt=get_attempt,
    conda:
        "../envs/imgclf.yaml"
    script:
        "../scripts/train_pack.py"
