rule data:
    output:
        "resources/cache/{dataset}.pt",
    log:
        "logs/data/{dataset}.log",
    params:
        data_root=config.get("data_root", ""),
    localrule: True
    script:
        "../scripts/data.py"
