# Cluster execution (e.g. --profile workflow/profiles/slurm): rules that run on the
# submitting machine instead of as cluster jobs. They only read and summarise other jobs'
# small outputs (tables, figures), so a queue wait would cost more than the work.


localrules:
    preprocessing_summary,
    make_split,
    pseudo_label_quality,
    ablation_table,
    sweep_table,
    comparison_table,
    figure_qualitative,
    figure_training_curves,
    figure_pseudo_quality,
    figure_sweep,
    figure_comparison,
