rule evaluate:
    input:
        "results/runs/{run_id}/seed{seed}/result.json",
    output:
        "results/runs/{run_id}/seed{seed}/eval.json",
    log:
        "logs/evaluate/{run_id}/seed{seed}.log",
    params:
        resources=get_run_resources,
        launcher=config["launcher"],
    threads: config.get("threads_per_job", 1)
    conda:
        "../envs/imgclf.yaml"
    script:
        "../scripts/evaluate.py"
