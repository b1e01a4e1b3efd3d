rule data:
    output:
        "resources/cache/{dataset}.pt",
    log:
        "logs/data/{dataset}.log",
    params:
        data_root=config.get("data_root", ""),
        download=config.get("download", True),
    localrule: True
    conda:
        "../envs/imgclf.yaml"
    script:
        "../scripts/data.py"
