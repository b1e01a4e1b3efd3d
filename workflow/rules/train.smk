rule train:
    input:
        get_dataset_cache,
    output:
        "results/runs/{run_id}/seed{seed}/result.json",
    log:
        "logs/train/{run_id}/seed{seed}.log",
    params:
        config=get_run_config,
        resources=get_run_resources,
        launcher=config["launcher"],
        data_root=config.get("data_root", ""),
        progress=config.get("progress", True),
    threads: config.get("threads_per_job", 1)
    resources:
        runtime=get_job_time,
    conda:
        "../envs/imgclf.yaml"
    script:
        "../scripts/train.py"
