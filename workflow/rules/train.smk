rule train:
    input:
        "resources/cache/{dataset}.pt",
    output:
        "results/runs/{dataset}-{run}/seed{seed}/result.json",
    log:
        "logs/train/{dataset}-{run}/seed{seed}.log",
    params:
        job=get_train_job,
    threads: config.get("threads_per_job", 1)
    conda:
        "../envs/imgclf.yaml"
    script:
        "../scripts/train.py"
