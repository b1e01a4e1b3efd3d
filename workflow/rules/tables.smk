rule aggregate:
    input:
        spec="config/tables/{table}.yaml",
        seeds=get_table_seeds,
    output:
        "results/tables/{table}.csv",
    log:
        "logs/tables/{table}.aggregate.log",
    priority: get_table_priority
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
        md=report(
            "results/tables/{table}.md",
            caption="../report/table_markdown.rst",
            category="Results tables",
            subcategory="{table}",
            labels=get_report_labels("Markdown"),
        ),
        html=report(
            "results/tables/{table}.html",
            caption="../report/table.rst",
            category="Results tables",
            subcategory="{table}",
            labels=get_report_labels("table"),
        ),
    log:
        "logs/tables/{table}.render.log",
    priority: get_table_priority
    localrule: True
    conda:
        "../envs/imgclf.yaml"
    script:
        "../scripts/render.py"


rule plots:
    input:
        spec="config/tables/{table}.yaml",
        csv="results/tables/{table}.csv",
    output:
        learning_curves=report(
            "results/tables/{table}/learning_curves.png",
            caption="../report/learning_curves.rst",
            category="Results tables",
            subcategory="{table}",
            labels=get_report_labels("learning curves"),
        ),
        paper_vs_ours=report(
            "results/tables/{table}/paper_vs_ours.png",
            caption="../report/paper_vs_ours.rst",
            category="Results tables",
            subcategory="{table}",
            labels=get_report_labels("ours vs reference"),
        ),
    log:
        "logs/tables/{table}.plots.log",
    params:
        runs_dir=str(RUNS_DIR),
    priority: get_table_priority
    localrule: True
    conda:
        "../envs/imgclf.yaml"
    script:
        "../scripts/plots.py"


rule all_tables:
    input:
        get_all_tables(),
