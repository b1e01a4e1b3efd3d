rule evaluate:
    input:
        "results/runs/{dataset}-{run}/seed{seed}/result.json",
    output:
        "results/runs/{dataset}-{run}/seed{seed}/eval.json",
    log:
        "logs/evaluate/{dataset}-{run}/seed{seed}.log",
    threads: config.get("threads_per_job", 1)
    conda:
        "../envs/imgclf.yaml"
    script:
        "../scripts/evaluate.py"
