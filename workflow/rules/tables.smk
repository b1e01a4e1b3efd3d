rule aggregate:
    input:
        spec="config/tables/{table}.yaml",
        seeds=get_table_seeds,
    output:
        "results/tables/{table}.csv",
    log:
        "logs/tables/{table}.aggregate.log",
    localrule: True
    conda:
        "../envs/imgclf.yaml"
    script:
        "../scripts/aggregate.py"


rule render:
    input:
        spec="config/tables/{table}.yaml",
        csv="results/tables/{table}.csv",
    output:
        report("results/tables/{table}.md", caption="../report/table.rst", category="Tables"),
    log:
        "logs/tables/{table}.render.log",
    localrule: True
    conda:
        "../envs/imgclf.yaml"
    script:
        "../scripts/render.py"


rule all_tables:
    input:
        get_all_tables(),
