# semiseg: two-stage semi-supervised 3D medical image segmentation.
# A thin entry point: the rules live in workflow/rules/, by stage.


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/splits.smk"
include: "workflow/rules/stage1.smk"
include: "workflow/rules/between.smk"
include: "workflow/rules/stage2.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/figures.smk"


rule all:
    default_target: True
    input:
        default_targets(),
